//! Guest NUMA nodes from `--numa`, built as Cloud Hypervisor v37 builds them
//! when it creates the VM: each node's vCPUs, the guest-physical ranges of
//! its memory zones, its distances and PCI segments. The ACPI SRAT, SLIT and
//! the host bridges' `_PXM` are written from these.

use std::collections::BTreeMap;

use vmkit_config::VmConfig;

use crate::error::{ErrorKind, ModuleError, Result};
use crate::memory::zone_ranges;

/// Why the `--numa` nodes cannot be built. v37 logs the reason and fails
/// the boot with `InvalidNumaConfig`; the texts say both.
#[derive(Debug, thiserror::Error)]
pub enum NumaError {
    #[error("--numa: NUMA node {0} is defined twice (InvalidNumaConfig)")]
    DuplicateNode(u32),
    #[error("--numa: NUMA node {node}: unknown memory zone '{zone}' (InvalidNumaConfig)")]
    UnknownMemoryZone { node: u32, zone: String },
    #[error(
        "--numa: NUMA node {node}: unknown destination NUMA node {destination} \
         (InvalidNumaConfig)"
    )]
    UnknownDestination { node: u32, destination: u32 },
    #[error(
        "--numa: NUMA node {node}: the distance to NUMA node {destination} is given twice \
         (InvalidNumaConfig)"
    )]
    DuplicateDestination { node: u32, destination: u32 },
}

impl ModuleError for NumaError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Config
    }
}

/// One guest NUMA node (its ACPI proximity domain is its id).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NumaNode {
    pub id: u32,
    /// vCPU indices, as given (v37 neither sorts nor checks them).
    pub cpus: Vec<u8>,
    /// (start, size) of each memory zone's ranges, zones in the order given.
    pub memory: Vec<(u64, u64)>,
    /// (start, size) of each of its zones' virtio-mem regions (hot-pluggable).
    pub hotplug: Vec<(u64, u64)>,
    /// Distances to other nodes, where given.
    pub distances: BTreeMap<u32, u8>,
    pub pci_segments: Vec<u16>,
}

/// The nodes of `config`, by id (v37 keeps them in a map by id, which sets
/// the order of the SRAT's entries and of the SLIT's rows). Empty without
/// `--numa`. `sgx_epc_sections` is refused before this (vm.rs).
pub fn nodes(config: &VmConfig) -> Result<Vec<NumaNode>> {
    let Some(list) = config.numa.as_ref().filter(|l| !l.is_empty()) else {
        return Ok(Vec::new());
    };
    let zones = zone_ranges(&config.memory)?;
    let hotplug = crate::memory::virtio_mem_ranges(&config.memory)?;
    let mut nodes: BTreeMap<u32, NumaNode> = BTreeMap::new();
    for numa in list {
        let id = numa.guest_numa_id;
        if nodes.contains_key(&id) {
            return Err(NumaError::DuplicateNode(id).into());
        }
        let mut node = NumaNode {
            id,
            ..NumaNode::default()
        };
        for zone in numa.memory_zones.iter().flatten() {
            let found = zones.iter().find(|z| &z.id == zone).ok_or_else(|| {
                NumaError::UnknownMemoryZone {
                    node: id,
                    zone: zone.clone(),
                }
            })?;
            node.memory.extend_from_slice(&found.ranges);
            let regions = hotplug.iter().filter(|(id, _, _)| id == zone);
            node.hotplug
                .extend(regions.map(|&(_, start, size)| (start, size)));
        }
        node.cpus.extend(numa.cpus.iter().flatten());
        node.pci_segments.extend(numa.pci_segments.iter().flatten());
        for distance in numa.distances.iter().flatten() {
            let destination = distance.destination;
            if !list.iter().any(|n| n.guest_numa_id == destination) {
                return Err(NumaError::UnknownDestination {
                    node: id,
                    destination,
                }
                .into());
            }
            if node
                .distances
                .insert(destination, distance.distance)
                .is_some()
            {
                return Err(NumaError::DuplicateDestination {
                    node: id,
                    destination,
                }
                .into());
            }
        }
        nodes.insert(id, node);
    }
    Ok(nodes.into_values().collect())
}

/// The node a PCI segment belongs to: the first that lists it, else 0.
pub fn segment_node(nodes: &[NumaNode], segment: u16) -> u32 {
    nodes
        .iter()
        .find(|n| n.pci_segments.contains(&segment))
        .map_or(0, |n| n.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config of `memory`, `zones`, boot vCPUs and `numa` nodes.
    fn config(memory: &str, zones: &[&str], boot: u8, numa: &[&str]) -> VmConfig {
        let strings = |list: &[&str]| -> Option<Vec<String>> {
            (!list.is_empty()).then(|| list.iter().map(|s| s.to_string()).collect())
        };
        let params = vmkit_config::VmParams {
            cpus: format!("boot={boot}"),
            memory: memory.into(),
            memory_zones: strings(zones),
            numa: strings(numa),
            ..Default::default()
        };
        VmConfig::parse(&params).unwrap()
    }

    #[test]
    fn nodes_take_their_zones_ranges_and_sort_by_id() {
        let c = config(
            "size=0",
            &["id=a,size=2G", "id=b,size=2G"],
            4,
            &[
                "guest_numa_id=1,cpus=[2,3],distances=[0@20],memory_zones=[b]",
                "guest_numa_id=0,cpus=[0,1],memory_zones=[a]",
            ],
        );
        let nodes = nodes(&c).unwrap();
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[0].id, 0);
        assert_eq!(nodes[0].memory, vec![(0, 2 << 30)]);
        assert_eq!(nodes[1].cpus, vec![2, 3]);
        // Zone b is split around the 32-bit hole.
        assert_eq!(
            nodes[1].memory,
            vec![(2 << 30, 1 << 30), (4 << 30, 1 << 30)]
        );
        assert_eq!(nodes[1].distances, BTreeMap::from([(0, 20)]));
        assert!(nodes[0].distances.is_empty());
    }

    #[test]
    fn plain_memory_is_mem0_and_no_numa_gives_no_nodes() {
        let c = config("size=64M", &[], 1, &["memory_zones=[mem0]"]);
        assert_eq!(nodes(&c).unwrap()[0].memory, vec![(0, 64 << 20)]);
        assert!(nodes(&config("size=64M", &[], 1, &[])).unwrap().is_empty());
    }

    #[test]
    fn what_v37_refuses_at_boot_is_refused() {
        let cases: [(&[&str], &str); 4] = [
            (
                &["guest_numa_id=0", "guest_numa_id=0"],
                "NUMA node 0 is defined twice",
            ),
            (
                &["guest_numa_id=0,memory_zones=[nope]"],
                "NUMA node 0: unknown memory zone 'nope'",
            ),
            (
                &["guest_numa_id=0,distances=[1@20]"],
                "unknown destination NUMA node 1",
            ),
            (
                &["guest_numa_id=0,distances=[1@20,1@30]", "guest_numa_id=1"],
                "the distance to NUMA node 1 is given twice",
            ),
        ];
        for (numa, text) in cases {
            let err = nodes(&config("size=64M", &[], 1, numa)).unwrap_err();
            assert_eq!(err.kind, ErrorKind::Config);
            assert!(err.message.contains(text), "{}", err.message);
            assert!(err.message.ends_with("(InvalidNumaConfig)"));
        }
    }

    #[test]
    fn segments_belong_to_the_node_listing_them_else_node_0() {
        let nodes = vec![
            NumaNode {
                id: 0,
                ..NumaNode::default()
            },
            NumaNode {
                id: 3,
                pci_segments: vec![1, 2],
                ..NumaNode::default()
            },
        ];
        assert_eq!(segment_node(&nodes, 2), 3);
        assert_eq!(segment_node(&nodes, 0), 0);
        assert_eq!(segment_node(&[], 5), 0);
    }
}
