//! Cloud Hypervisor's automatic device ids: devices without an id are named
//! when the VM is built, in its device creation order, with one counter
//! shared by every prefix (`_disk0`, `_disk1`, `_net2`, ...).

use std::collections::HashSet;

use crate::types::VmConfig;

impl VmConfig {
    /// Gives every device without an id its automatic one; returns how many
    /// were named.
    pub fn assign_device_ids(&mut self) -> usize {
        self.assign_device_ids_counting().0
    }

    /// `assign_device_ids`, also returning where Cloud Hypervisor's shared
    /// counter stands afterwards (a hot-plugged device's automatic id
    /// continues from it: `next_device_name`).
    pub fn assign_device_ids_counting(&mut self) -> (usize, usize) {
        let mut taken: HashSet<String> = HashSet::new();
        macro_rules! each_id {
            ($f:expr) => {{
                let mut f = $f;
                for d in self.disks.iter_mut().flatten() {
                    f("_disk", &mut d.id);
                }
                for d in self.net.iter_mut().flatten() {
                    f("_net", &mut d.id);
                }
                for d in self.fs.iter_mut().flatten() {
                    f("_fs", &mut d.id);
                }
                for d in self.pmem.iter_mut().flatten() {
                    f("_pmem", &mut d.id);
                }
                if let Some(d) = self.vsock.as_mut() {
                    f("_vsock", &mut d.id);
                }
                for d in self.vdpa.iter_mut().flatten() {
                    f("_vdpa", &mut d.id);
                }
                for d in self.devices.iter_mut().flatten() {
                    f("_vfio", &mut d.id);
                }
                for d in self.user_devices.iter_mut().flatten() {
                    f("_vfio_user", &mut d.id);
                }
            }};
        }
        each_id!(|_: &str, id: &mut Option<String>| {
            if let Some(id) = id {
                taken.insert(id.clone());
            }
        });
        let mut counter = 0usize;
        let mut named = 0;
        each_id!(|prefix: &str, id: &mut Option<String>| {
            if id.is_none() {
                let name = loop {
                    let candidate = format!("{prefix}{counter}");
                    counter += 1;
                    if !taken.contains(&candidate) {
                        break candidate;
                    }
                };
                taken.insert(name.clone());
                *id = Some(name);
                named += 1;
            }
        });
        (named, counter)
    }
}

/// Cloud Hypervisor's `next_device_name`: `prefix` and the counter, which
/// advances past every name in `taken`; None once it wrapped around.
pub fn next_device_name(
    prefix: &str,
    counter: &mut usize,
    taken: &HashSet<String>,
) -> Option<String> {
    let start = *counter;
    loop {
        let name = format!("{prefix}{counter}");
        *counter = counter.wrapping_add(1);
        if !taken.contains(&name) {
            return Some(name);
        }
        if *counter == start {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::types::{DiskConfig, NetConfig, VmConfig};

    #[test]
    fn one_counter_across_prefixes_skipping_taken_names() {
        let mut config = VmConfig {
            disks: Some(vec![
                DiskConfig::default(),
                DiskConfig {
                    id: Some("_disk1".into()),
                    ..Default::default()
                },
                DiskConfig::default(),
            ]),
            net: Some(vec![NetConfig::parse("tap=tap0").unwrap()]),
            ..Default::default()
        };
        assert_eq!(config.assign_device_ids(), 3);
        let disks: Vec<_> = config
            .disks
            .iter()
            .flatten()
            .map(|d| d.id.clone().unwrap())
            .collect();
        assert_eq!(disks, ["_disk0", "_disk1", "_disk2"]);
        assert_eq!(config.net.unwrap()[0].id.as_deref(), Some("_net3"));
    }

    #[test]
    fn hot_plugged_names_continue_the_boot_counter_past_taken_ones() {
        let mut config = VmConfig {
            disks: Some(vec![DiskConfig::default()]),
            net: Some(vec![NetConfig::parse("tap=tap0,id=_net1").unwrap()]),
            ..Default::default()
        };
        assert_eq!(config.assign_device_ids_counting(), (1, 1));
        let taken: std::collections::HashSet<String> =
            ["_disk0", "_net1", "_disk2"].map(String::from).into();
        let mut counter = 1;
        // As v37: _disk1 is free; from 2, _disk2 is taken (_disk3), and the
        // one counter goes on for every prefix (_vsock4).
        assert_eq!(
            super::next_device_name("_disk", &mut counter, &taken).as_deref(),
            Some("_disk1")
        );
        let mut at_two = 2;
        assert_eq!(
            super::next_device_name("_disk", &mut at_two, &taken).as_deref(),
            Some("_disk3")
        );
        assert_eq!(
            super::next_device_name("_vsock", &mut at_two, &taken).as_deref(),
            Some("_vsock4")
        );
    }
}
