//! Cloud Hypervisor's device tree: a node per device with its resources,
//! parent and children. A virtio device is two nodes, as in CH: the PCI
//! function `_virtio-pci-<id>` (its BDF and BARs) and its child `<id>`.

use crate::pci::config::BarKind;

/// One device in `info()`'s `device_tree`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNode {
    pub id: String,
    pub resources: Vec<Resource>,
    pub parent: Option<String>,
    pub children: Vec<String>,
    /// `ssss:bb:dd.f` of a PCI function.
    pub pci_bdf: Option<String>,
}

impl DeviceNode {
    /// A node with no resources, parent or children.
    pub fn leaf(id: impl Into<String>) -> Self {
        DeviceNode {
            id: id.into(),
            resources: Vec::new(),
            parent: None,
            children: Vec::new(),
            pci_bdf: None,
        }
    }
}

/// A resource a device holds, in Cloud Hypervisor's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// A PCI BAR where it is now (the guest may have moved it).
    PciBar {
        index: usize,
        base: u64,
        size: u64,
        kind: BarKind,
        prefetchable: bool,
    },
    /// Guest-physical memory a device maps beside RAM (virtio-pmem).
    MmioAddressRange { base: u64, size: u64 },
}

/// Cloud Hypervisor's name for a BAR's region type (`type_`).
pub fn bar_type_name(kind: BarKind) -> &'static str {
    match kind {
        BarKind::Io => "Io",
        BarKind::Memory32 => "Mmio32",
        BarKind::Memory64 => "Mmio64",
    }
}

/// The PCI function node's id of the virtio device `id`.
pub fn virtio_pci_node_id(id: &str) -> String {
    format!("_virtio-pci-{id}")
}

/// A PCI function that is a device of its own (pvpanic): one node.
pub fn pci_function_node(id: &str, bdf: String, bars: Vec<Resource>) -> DeviceNode {
    DeviceNode {
        resources: bars,
        pci_bdf: Some(bdf),
        ..DeviceNode::leaf(id)
    }
}

/// The two nodes of a virtio-pci device: the function (with its BARs), then
/// the device (with `resources` of its own).
pub fn virtio_nodes(
    id: &str,
    bdf: String,
    bars: Vec<Resource>,
    resources: Vec<Resource>,
) -> [DeviceNode; 2] {
    let function = virtio_pci_node_id(id);
    [
        DeviceNode {
            id: function.clone(),
            resources: bars,
            parent: None,
            children: vec![id.to_owned()],
            pci_bdf: Some(bdf),
        },
        DeviceNode {
            parent: Some(function),
            resources,
            ..DeviceNode::leaf(id)
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_virtio_device_is_a_function_and_its_child() {
        let bar = Resource::PciBar {
            index: 0,
            base: 0xe7f8_0000,
            size: 0x8_0000,
            kind: BarKind::Memory32,
            prefetchable: false,
        };
        let [function, device] =
            virtio_nodes("_disk0", "0000:00:01.0".into(), vec![bar], Vec::new());
        assert_eq!(function.id, "_virtio-pci-_disk0");
        assert_eq!(function.children, ["_disk0"]);
        assert_eq!(function.pci_bdf.as_deref(), Some("0000:00:01.0"));
        assert_eq!(function.resources, [bar]);
        assert_eq!(device.parent.as_deref(), Some("_virtio-pci-_disk0"));
        assert!(device.pci_bdf.is_none() && device.resources.is_empty());
        assert_eq!(bar_type_name(BarKind::Memory32), "Mmio32");
    }
}
