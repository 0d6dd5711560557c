//! Whole-config validation, rule by rule in v37's order.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::error::ValidationError;
use crate::types::*;

type Result<T> = std::result::Result<T, ValidationError>;

/// A config that passed validation, with what validation derived (the
/// top-level `iommu`, set in the config, and the user-given identifiers).
/// Only [`VmConfig::validated`] makes one, and it can only be read, so
/// whoever holds one need not validate again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedConfig {
    config: VmConfig,
    ids: BTreeSet<String>,
}

impl ValidatedConfig {
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Whether any device sits behind the virtual IOMMU (v37 derives it).
    pub fn iommu(&self) -> bool {
        self.config.iommu
    }

    /// Every identifier the user gave, sorted.
    pub fn ids(&self) -> &BTreeSet<String> {
        &self.ids
    }

    /// Names the devices that have no id, as v37 does when it builds the VM;
    /// returns how many were named. The config stays valid: automatic ids
    /// never start with `__` and never repeat a taken one.
    pub fn assign_device_ids(&mut self) -> usize {
        self.config.assign_device_ids()
    }

    pub fn into_config(self) -> VmConfig {
        self.config
    }
}

fn check_identifier(ids: &mut BTreeSet<String>, id: &Option<String>) -> Result<()> {
    if let Some(id) = id {
        check_identifier_str(ids, id)?;
    }
    Ok(())
}

fn check_identifier_str(ids: &mut BTreeSet<String>, id: &str) -> Result<()> {
    if id.starts_with("__") {
        return Err(ValidationError::InvalidIdentifier(id.to_owned()));
    }
    if !ids.insert(id.to_owned()) {
        return Err(ValidationError::IdentifierNotUnique(id.to_owned()));
    }
    Ok(())
}

impl VmConfig {
    /// Memory is shared-memory backed (needed by vhost-user and user devices).
    pub fn backed_by_shared_memory(&self) -> bool {
        if self.memory.shared || self.memory.hugepages {
            return true;
        }
        if self.memory.size == 0 {
            if let Some(zones) = &self.memory.zones {
                return zones.iter().all(|z| z.shared || z.hugepages);
            }
        }
        false
    }

    /// Segment checks for a device that can sit behind an IOMMU.
    fn check_segment(&self, segment: u16, iommu: bool) -> Result<()> {
        if let Some(platform) = &self.platform {
            if segment >= platform.num_pci_segments {
                return Err(ValidationError::InvalidPciSegment(segment));
            }
            if let Some(iommu_segments) = &platform.iommu_segments {
                if iommu_segments.contains(&segment) && !iommu {
                    return Err(ValidationError::OnIommuSegment(segment));
                }
            }
        }
        Ok(())
    }

    /// Segment checks for fs and user devices, which cannot sit behind an IOMMU.
    fn check_segment_no_iommu(&self, segment: u16) -> Result<()> {
        if let Some(platform) = &self.platform {
            if segment >= platform.num_pci_segments {
                return Err(ValidationError::InvalidPciSegment(segment));
            }
            if let Some(iommu_segments) = &platform.iommu_segments {
                if iommu_segments.contains(&segment) {
                    return Err(ValidationError::IommuNotSupportedOnSegment(segment));
                }
            }
        }
        Ok(())
    }

    /// Validates in v37's order and sets the top-level `iommu` as v37 does.
    pub fn validated(mut self) -> Result<ValidatedConfig> {
        let ids = self.validate()?;
        Ok(ValidatedConfig { config: self, ids })
    }

    /// The rules of [`VmConfig::validated`]; returns every user-given identifier.
    fn validate(&mut self) -> Result<BTreeSet<String>> {
        let mut ids = BTreeSet::new();

        if self.payload.is_none() {
            return Err(ValidationError::KernelMissing);
        }
        for console in [&self.console, &self.serial] {
            if console.mode == ConsoleOutputMode::File && console.file.is_none() {
                return Err(ValidationError::ConsoleFileMissing);
            }
        }
        if self.cpus.max_vcpus < self.cpus.boot_vcpus {
            return Err(ValidationError::CpusMaxLowerThanBoot);
        }
        let boot_vcpus = usize::from(self.cpus.boot_vcpus);

        for group in self.rate_limit_groups.iter().flatten() {
            let rl = &group.rate_limiter_config;
            if (rl.bandwidth.is_none() && rl.ops.is_none()) || group.id.is_empty() {
                return Err(ValidationError::InvalidRateLimiterGroup);
            }
            check_identifier_str(&mut ids, &group.id)?;
        }

        for disk in self.disks.iter().flatten() {
            if disk.vhost_socket.is_some() && disk.path.is_some() {
                return Err(ValidationError::DiskSocketAndPath);
            }
            if disk.vhost_user && !self.backed_by_shared_memory() {
                return Err(ValidationError::VhostUserRequiresSharedMemory);
            }
            if disk.vhost_user && disk.vhost_socket.is_none() {
                return Err(ValidationError::VhostUserMissingSocket);
            }
            if let Some(group) = &disk.rate_limit_group {
                let known = self
                    .rate_limit_groups
                    .iter()
                    .flatten()
                    .any(|g| &g.id == group);
                if !known {
                    return Err(ValidationError::InvalidRateLimiterGroup);
                }
            }
            if disk.num_queues > boot_vcpus {
                return Err(ValidationError::TooManyQueues);
            }
            if disk.vhost_user && disk.iommu {
                return Err(ValidationError::IommuNotSupported);
            }
            self.check_segment(disk.pci_segment, disk.iommu)?;
            if disk.rate_limit_group.is_some() && disk.rate_limiter_config.is_some() {
                return Err(ValidationError::InvalidRateLimiterGroup);
            }
            check_identifier(&mut ids, &disk.id)?;
        }

        for net in self.net.iter().flatten() {
            if net.vhost_user && !self.backed_by_shared_memory() {
                return Err(ValidationError::VhostUserRequiresSharedMemory);
            }
            if net.num_queues < 2 {
                return Err(ValidationError::VnetQueueLowerThan2);
            }
            if let Some(fds) = &net.fds {
                if fds.len().saturating_mul(2) != net.num_queues {
                    return Err(ValidationError::VnetQueueFdMismatch);
                }
                if fds.iter().any(|&fd| fd <= 2) {
                    return Err(ValidationError::VnetReservedFd);
                }
            }
            if net.num_queues / 2 > boot_vcpus {
                return Err(ValidationError::TooManyQueues);
            }
            if net.vhost_user && net.iommu {
                return Err(ValidationError::IommuNotSupported);
            }
            self.check_segment(net.pci_segment, net.iommu)?;
            if let Some(mtu) = net.mtu {
                if mtu < MIN_MTU {
                    return Err(ValidationError::InvalidMtu(mtu));
                }
            }
            if !net.offload_csum && (net.offload_tso || net.offload_ufo) {
                return Err(ValidationError::NoHardwareChecksumOffload);
            }
            check_identifier(&mut ids, &net.id)?;
        }

        if let Some(fs_list) = &self.fs {
            if !fs_list.is_empty() && !self.backed_by_shared_memory() {
                return Err(ValidationError::VhostUserRequiresSharedMemory);
            }
            for fs in fs_list {
                if fs.num_queues > boot_vcpus {
                    return Err(ValidationError::TooManyQueues);
                }
                self.check_segment_no_iommu(fs.pci_segment)?;
                check_identifier(&mut ids, &fs.id)?;
            }
        }

        for pmem in self.pmem.iter().flatten() {
            self.check_segment(pmem.pci_segment, pmem.iommu)?;
            check_identifier(&mut ids, &pmem.id)?;
        }

        if let Some(t) = &self.cpus.topology {
            let parts = [
                t.threads_per_core,
                t.cores_per_die,
                t.dies_per_package,
                t.packages,
            ];
            if parts.contains(&0) {
                return Err(ValidationError::CpuTopologyZeroPart);
            }
            let product: u32 = parts.iter().map(|&p| u32::from(p)).product();
            if product != u32::from(self.cpus.max_vcpus) {
                return Err(ValidationError::CpuTopologyCount);
            }
        }

        if let Some(size) = self.memory.hugepage_size {
            if !self.memory.hugepages {
                return Err(ValidationError::HugePageSizeWithoutHugePages);
            }
            if !size.is_power_of_two() {
                return Err(ValidationError::InvalidHugePageSize(size));
            }
        }

        if let Some(user_devices) = &self.user_devices {
            if !user_devices.is_empty() && !self.backed_by_shared_memory() {
                return Err(ValidationError::UserDevicesRequireSharedMemory);
            }
            for device in user_devices {
                self.check_segment_no_iommu(device.pci_segment)?;
                check_identifier(&mut ids, &device.id)?;
            }
        }

        for vdpa in self.vdpa.iter().flatten() {
            self.check_segment(vdpa.pci_segment, vdpa.iommu)?;
            check_identifier(&mut ids, &vdpa.id)?;
        }

        if let Some(vsock) = &self.vsock {
            if matches!(vsock.cid, 0 | 1 | 2 | u32::MAX) {
                return Err(ValidationError::VsockSpecialCid(vsock.cid));
            }
        }

        if let Some(balloon) = &self.balloon {
            let ram = self
                .memory
                .zones
                .iter()
                .flatten()
                .fold(self.memory.size, |acc, z| acc.saturating_add(z.size));
            if balloon.size >= ram {
                return Err(ValidationError::BalloonLargerThanRam(balloon.size, ram));
            }
        }

        if let Some(devices) = &self.devices {
            let mut paths = HashSet::new();
            for device in devices {
                if !paths.insert(device.path.as_str()) {
                    return Err(ValidationError::DuplicateDevicePath(device.path.clone()));
                }
                self.check_segment(device.pci_segment, device.iommu)?;
                check_identifier(&mut ids, &device.id)?;
            }
        }

        if let Some(vsock) = &self.vsock {
            self.check_segment(vsock.pci_segment, vsock.iommu)?;
            check_identifier(&mut ids, &vsock.id)?;
        }

        if let Some(nodes) = &self.numa {
            let num_segments = self
                .platform
                .as_ref()
                .map_or(DEFAULT_NUM_PCI_SEGMENTS, |p| p.num_pci_segments);
            let mut zone_owner: HashMap<&str, u32> = HashMap::new();
            let mut segment_owner: HashMap<u16, u32> = HashMap::new();
            for node in nodes {
                let this = node.guest_numa_id;
                for zone in node.memory_zones.iter().flatten() {
                    if let Some(&earlier) = zone_owner.get(zone.as_str()) {
                        return Err(ValidationError::MemoryZoneReused(
                            zone.clone(),
                            earlier,
                            this,
                        ));
                    }
                    zone_owner.insert(zone, this);
                }
                for &segment in node.pci_segments.iter().flatten() {
                    if segment >= num_segments {
                        return Err(ValidationError::InvalidPciSegment(segment));
                    }
                    if segment == 0 && this != 0 {
                        return Err(ValidationError::DefaultPciSegmentInvalidNode(this));
                    }
                    if let Some(&earlier) = segment_owner.get(&segment) {
                        return Err(ValidationError::PciSegmentReused(segment, earlier, this));
                    }
                    segment_owner.insert(segment, this);
                }
            }
        }

        for zone in self.memory.zones.iter().flatten() {
            check_identifier_str(&mut ids, &zone.id)?;
        }
        for epc in self.sgx_epc.iter().flatten() {
            check_identifier_str(&mut ids, &epc.id)?;
        }

        if let Some(platform) = &self.platform {
            if platform.num_pci_segments == 0 || platform.num_pci_segments > MAX_NUM_PCI_SEGMENTS {
                return Err(ValidationError::InvalidNumPciSegments(
                    platform.num_pci_segments,
                ));
            }
            for &segment in platform.iommu_segments.iter().flatten() {
                if segment >= platform.num_pci_segments {
                    return Err(ValidationError::InvalidPciSegment(segment));
                }
            }
        }

        self.iommu |= self.any_device_behind_iommu();
        Ok(ids)
    }

    fn any_device_behind_iommu(&self) -> bool {
        self.disks.iter().flatten().any(|d| d.iommu)
            || self.net.iter().flatten().any(|n| n.iommu)
            || self.pmem.iter().flatten().any(|p| p.iommu)
            || self.vdpa.iter().flatten().any(|v| v.iommu)
            || self.devices.iter().flatten().any(|d| d.iommu)
            || self.vsock.as_ref().is_some_and(|v| v.iommu)
            || self.rng.iommu
            || self.console.iommu
            || self
                .platform
                .as_ref()
                .is_some_and(|p| p.iommu_segments.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::VmParams;

    fn config(edit: impl FnOnce(&mut VmParams)) -> VmConfig {
        let mut params = VmParams {
            kernel: Some("/k".into()),
            ..VmParams::default()
        };
        edit(&mut params);
        VmConfig::parse(&params).unwrap()
    }

    fn error(edit: impl FnOnce(&mut VmParams)) -> ValidationError {
        config(edit).validated().unwrap_err()
    }

    #[test]
    fn defaults_validate() {
        assert!(config(|_| {}).validated().unwrap().ids().is_empty());
        assert_eq!(error(|p| p.kernel = None), ValidationError::KernelMissing);
    }

    #[test]
    fn cpu_rules() {
        assert_eq!(
            error(|p| p.cpus = "boot=4,max=2".into()),
            ValidationError::CpusMaxLowerThanBoot
        );
        assert_eq!(
            error(|p| p.cpus = "boot=2,topology=1:0:1:2".into()),
            ValidationError::CpuTopologyZeroPart
        );
        assert_eq!(
            error(|p| p.cpus = "boot=2,topology=1:1:1:1".into()),
            ValidationError::CpuTopologyCount
        );
        assert!(config(|p| p.cpus = "boot=2,max=4,topology=1:2:1:2".into())
            .validated()
            .is_ok());
    }

    #[test]
    fn ids_are_collected_and_checked() {
        let c = config(|p| {
            p.disks = Some(vec!["path=/a,id=d0".into(), "path=/b".into()]);
            p.memory_zones = Some(vec!["id=z0,size=1M".into()]);
        });
        let validated = c.validated().unwrap();
        assert_eq!(validated.ids().iter().collect::<Vec<_>>(), ["d0", "z0"]);
        assert_eq!(
            error(|p| p.disks = Some(vec!["path=/a,id=x".into(), "path=/b,id=x".into()])),
            ValidationError::IdentifierNotUnique("x".into())
        );
        assert_eq!(
            error(|p| p.disks = Some(vec!["path=/a,id=__x".into()])),
            ValidationError::InvalidIdentifier("__x".into())
        );
    }

    #[test]
    fn net_rules_in_order() {
        assert_eq!(
            error(|p| p.net = Some(vec!["num_queues=1".into()])),
            ValidationError::VnetQueueLowerThan2
        );
        assert_eq!(
            error(|p| p.net = Some(vec!["fd=[3],num_queues=4".into()])),
            ValidationError::VnetQueueFdMismatch
        );
        assert_eq!(
            error(|p| p.net = Some(vec!["fd=[2]".into()])),
            ValidationError::VnetReservedFd
        );
        assert_eq!(
            error(|p| p.net = Some(vec!["mtu=1000".into()])),
            ValidationError::InvalidMtu(1000)
        );
        assert_eq!(
            error(|p| p.net = Some(vec!["offload_csum=off".into()])),
            ValidationError::NoHardwareChecksumOffload
        );
    }

    #[test]
    fn iommu_is_derived() {
        let iommu = |edit: fn(&mut VmParams)| config(edit).validated().unwrap().iommu();
        assert!(iommu(|p| p.disks = Some(vec!["path=/a,iommu=on".into()])));
        assert!(iommu(
            |p| p.platform = Some("num_pci_segments=2,iommu_segments=[1]".into())
        ));
        assert!(!iommu(|_| {}));
    }

    #[test]
    fn validated_config_carries_the_config_and_what_validation_derived() {
        let given = config(|p| {
            p.disks = Some(vec!["path=/a,id=d0,iommu=on".into(), "path=/b".into()]);
        });
        let mut validated = given.clone().validated().unwrap();
        assert!(validated.config().iommu && !given.iommu);
        assert_eq!(validated.ids().iter().collect::<Vec<_>>(), ["d0"]);
        assert_eq!(validated.assign_device_ids(), 1);
        let disks = validated.config().disks.as_ref().unwrap();
        assert_eq!(disks[1].id.as_deref(), Some("_disk0"));
        // Automatic ids leave the config valid.
        let config = validated.into_config();
        assert!(config.validated().is_ok());
    }

    #[test]
    fn balloon_and_numa() {
        assert_eq!(
            error(|p| p.balloon = Some("size=512M".into())),
            ValidationError::BalloonLargerThanRam(512 << 20, 512 << 20)
        );
        assert_eq!(
            error(|p| {
                p.memory = "size=0".into();
                p.memory_zones = Some(vec!["id=z,size=1M".into()]);
                p.numa = Some(vec![
                    "guest_numa_id=0,memory_zones=[z]".into(),
                    "guest_numa_id=1,memory_zones=[z]".into(),
                ]);
            }),
            ValidationError::MemoryZoneReused("z".into(), 0, 1)
        );
        assert_eq!(
            error(|p| p.numa = Some(vec!["guest_numa_id=1,pci_segments=[0]".into()])),
            ValidationError::DefaultPciSegmentInvalidNode(1)
        );
    }
}
