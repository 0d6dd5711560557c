//! The virtio devices of a config, one function per kind. The table's order
//! is Cloud Hypervisor's, which decides the PCI slots: console, disks, nets,
//! rng, fs, pmem, vsock, virtio-mem, balloon, then the watchdog. A new kind is a new device module plus one
//! entry here.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::Result;
use crate::rate_limiter::SharedRateLimiter;
use crate::virtio::balloon::{Balloon, BalloonBacking};
use crate::virtio::block::Block;
use crate::virtio::console::Console;
use crate::virtio::mem::{MemRegion, VirtioMem};
use crate::virtio::net::Net;
use crate::virtio::pmem::{self, Pmem};
use crate::virtio::rng::Rng;
use crate::virtio::vhost_user::link::{Link, SharedLink};
use crate::virtio::vhost_user::{DeviceSpec, NetOffloads, Personality, VhostUserDevice};
use crate::virtio::vsock::Vsock;
use crate::virtio::watchdog::Watchdog;
use crate::virtio::VirtioDevice;

use super::{DeviceContext, DeviceManagerError, Reservations};

/// A virtio device to put on a PCI segment.
pub struct VirtioSpec {
    pub id: String,
    pub segment: u16,
    pub device: Box<dyn VirtioDevice>,
}

pub type VirtioKind = fn(&DeviceContext<'_>, &mut Reservations<'_>) -> Result<Vec<VirtioSpec>>;

/// Every virtio device kind, in Cloud Hypervisor's order.
pub const VIRTIO_KINDS: [VirtioKind; 10] = [
    console, disks, nets, rng, fs, pmem, vsock, virtio_mem, balloon, watchdog,
];

/// The kind function that builds the devices of config list `field`
/// (`disks`, `net`, `fs`, `pmem`, `vsock`), for a hot-plug.
pub fn hotplug_kind(field: &str) -> Option<VirtioKind> {
    Some(match field {
        "disks" => disks,
        "net" => nets,
        "fs" => fs,
        "pmem" => pmem,
        "vsock" => vsock,
        _ => return None,
    })
}

fn console(ctx: &DeviceContext<'_>, _: &mut Reservations<'_>) -> Result<Vec<VirtioSpec>> {
    let Some(backend) = ctx.console else {
        return Ok(Vec::new());
    };
    let id = "__console".to_owned();
    Ok(vec![VirtioSpec {
        device: Box::new(Console::new(id.clone(), backend.clone())?),
        id,
        segment: 0,
    }])
}

fn disks(ctx: &DeviceContext<'_>, _: &mut Reservations<'_>) -> Result<Vec<VirtioSpec>> {
    let groups: HashMap<&str, Arc<SharedRateLimiter>> = ctx
        .config
        .rate_limit_groups
        .iter()
        .flatten()
        .map(|g| {
            let limiter = Arc::new(SharedRateLimiter::new(&g.rate_limiter_config));
            (g.id.as_str(), limiter)
        })
        .collect();
    let mut specs = Vec::new();
    for disk in ctx.config.disks.iter().flatten() {
        let id = disk.id.clone().unwrap_or_default();
        if disk.vhost_user {
            let spec = DeviceSpec {
                option: "--disk",
                id: id.clone(),
                socket: disk.vhost_socket.clone().unwrap_or_default(),
                server: false,
                queue_size: disk.queue_size,
                personality: Personality::Block {
                    num_queues: disk.num_queues,
                },
            };
            specs.push(vhost_user_spec(ctx, spec, disk.pci_segment)?);
            continue;
        }
        let group = match disk.rate_limit_group.as_deref() {
            Some(name) => Some(groups.get(name).cloned().ok_or_else(|| {
                DeviceManagerError::NoRateLimitGroup {
                    id: id.clone(),
                    group: name.to_owned(),
                }
            })?),
            None => None,
        };
        // Unlocked: the Vm holds the image locks, across the resets that
        // rebuild this device.
        let device =
            Block::with_lock(disk, group, false).map_err(|source| DeviceManagerError::Block {
                id: id.clone(),
                source,
            })?;
        specs.push(VirtioSpec {
            id,
            segment: disk.pci_segment,
            device: Box::new(device),
        });
    }
    Ok(specs)
}

fn nets(ctx: &DeviceContext<'_>, _: &mut Reservations<'_>) -> Result<Vec<VirtioSpec>> {
    let mut specs = Vec::new();
    for net in ctx.config.net.iter().flatten() {
        let id = net.id.clone().unwrap_or_default();
        if net.vhost_user {
            let spec = DeviceSpec {
                option: "--net",
                id: id.clone(),
                socket: net.vhost_socket.clone().unwrap_or_default(),
                server: net.vhost_mode == vmkit_config::VhostMode::Server,
                queue_size: net.queue_size,
                personality: Personality::Net {
                    pairs: (net.num_queues / 2).max(1),
                    mac: net.mac.0,
                    mtu: net.mtu,
                    offloads: NetOffloads {
                        csum: net.offload_csum,
                        tso: net.offload_tso,
                        ufo: net.offload_ufo,
                    },
                },
            };
            specs.push(vhost_user_spec(ctx, spec, net.pci_segment)?);
            continue;
        }
        let device = match ctx.adopted_taps.get(&id) {
            Some(fds) => Net::adopt(net, &id, fds)?,
            None => Net::new(net, &id)?,
        };
        specs.push(VirtioSpec {
            device: Box::new(device),
            id,
            segment: net.pci_segment,
        });
    }
    Ok(specs)
}

fn rng(ctx: &DeviceContext<'_>, _: &mut Reservations<'_>) -> Result<Vec<VirtioSpec>> {
    let id = "__rng".to_owned();
    Ok(vec![VirtioSpec {
        device: Box::new(Rng::new(id.clone(), &ctx.config.rng.src)?),
        id,
        segment: 0,
    }])
}

fn fs(ctx: &DeviceContext<'_>, _: &mut Reservations<'_>) -> Result<Vec<VirtioSpec>> {
    let mut specs = Vec::new();
    for fs in ctx.config.fs.iter().flatten() {
        let spec = DeviceSpec {
            option: "--fs",
            id: fs.id.clone().unwrap_or_default(),
            socket: fs.socket.clone(),
            server: false,
            queue_size: fs.queue_size,
            personality: Personality::Fs {
                tag: fs.tag.clone(),
                request_queues: fs.num_queues,
            },
        };
        specs.push(vhost_user_spec(ctx, spec, fs.pci_segment)?);
    }
    Ok(specs)
}

/// A vhost-user device on the VM's link to its backend: made at the first
/// boot, kept across resets (the backend keeps its one connection).
fn vhost_user_spec(ctx: &DeviceContext<'_>, spec: DeviceSpec, segment: u16) -> Result<VirtioSpec> {
    let mut links = ctx.vhost_links.lock().unwrap_or_else(|p| p.into_inner());
    let link: SharedLink = match links.get(&spec.id) {
        Some(link) => link.clone(),
        None => {
            let link = Link::open(spec.wanted(), spec.server)?;
            links.insert(spec.id.clone(), link.clone());
            link
        }
    };
    let device =
        VhostUserDevice::new(&spec, link).map_err(|source| DeviceManagerError::VhostUser {
            id: spec.id.clone(),
            source,
        })?;
    Ok(VirtioSpec {
        id: spec.id,
        segment,
        device: Box::new(device),
    })
}

fn pmem(ctx: &DeviceContext<'_>, reserve: &mut Reservations<'_>) -> Result<Vec<VirtioSpec>> {
    let mut specs = Vec::new();
    for config in ctx.config.pmem.iter().flatten() {
        let id = config.id.clone().unwrap_or_default();
        let (file, size) = pmem::open_backing(config)?;
        let segment = reserve
            .segments
            .get(usize::from(config.pci_segment))
            .ok_or_else(|| DeviceManagerError::NoSuchSegment {
                id: id.clone(),
                segment: config.pci_segment,
            })?;
        // 2 MiB aligned, from the top of the segment's 64-bit window; a
        // restore puts it back where the guest had it.
        let recorded = match ctx.placement {
            Some(placement) => {
                Some(placement.find(&id).and_then(|p| p.region).ok_or_else(|| {
                    super::misplaced(format!("pmem device {id} has no memory region recorded"))
                })?)
            }
            None => None,
        };
        let start = match recorded {
            Some(start) => {
                let fits = start.is_multiple_of(pmem::REGION_ALIGNMENT)
                    && segment.allocator(true).allocate_at(start, size);
                if !fits {
                    return Err(super::misplaced(format!(
                        "pmem device {id}'s region at {start:#x} is not free in segment {}'s \
                         64-bit window",
                        config.pci_segment
                    )));
                }
                start
            }
            None => segment
                .allocator(true)
                .allocate_aligned(size, pmem::REGION_ALIGNMENT)
                .ok_or_else(|| DeviceManagerError::WindowFull { id: id.clone() })?,
        };
        let mapping = match pmem::map_backing(&file, size, config.discard_writes, &config.file) {
            Ok(mapping) => Arc::new(mapping),
            Err(e) => {
                segment.allocator(true).free(start);
                return Err(e);
            }
        };
        let slot = reserve.next_slot;
        reserve.next_slot += 1;
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot,
            guest_phys_addr: start,
            memory_size: size,
            userspace_addr: mapping.host_address(),
            flags: 0,
        };
        // SAFETY: the mapping lives in the device, which the VM's devices
        // hold until the VM fd (and so the slot) is gone.
        if let Err(source) = unsafe { ctx.vm_fd.set_user_memory_region(region) } {
            segment.allocator(true).free(start);
            return Err(crate::vm::VmError::Kvm {
                what: format!("KVM_SET_USER_MEMORY_REGION (pmem {id})"),
                source,
            }
            .into());
        }
        reserve.pmem_regions.insert(id.clone(), region);
        specs.push(VirtioSpec {
            device: Box::new(Pmem::new(id.clone(), file, start, mapping)),
            id,
            segment: config.pci_segment,
        });
    }
    Ok(specs)
}

fn vsock(ctx: &DeviceContext<'_>, _: &mut Reservations<'_>) -> Result<Vec<VirtioSpec>> {
    let Some(vsock) = &ctx.config.vsock else {
        return Ok(Vec::new());
    };
    let id = vsock.id.clone().unwrap_or_default();
    // A migration's sender on this host handed its listening socket over.
    let device = match ctx.adopted_taps.get(&id).and_then(|fds| fds.first()) {
        Some(listener) => Vsock::adopt(id.clone(), vsock.cid, &vsock.socket, listener)?,
        None => Vsock::new(id.clone(), vsock.cid, &vsock.socket)?,
    };
    Ok(vec![VirtioSpec {
        device: Box::new(device),
        id,
        segment: vsock.pci_segment,
    }])
}

/// One device per zone with a virtio-mem region, named as the zone (as
/// Cloud Hypervisor names it), on segment 0.
fn virtio_mem(ctx: &DeviceContext<'_>, reserve: &mut Reservations<'_>) -> Result<Vec<VirtioSpec>> {
    let mut specs = Vec::new();
    for zone in &ctx.ram.virtio_mem {
        let node = ctx.config.numa.iter().flatten().find(|node| {
            node.memory_zones
                .iter()
                .flatten()
                .any(|id| *id == zone.zone)
        });
        let node_id = node.and_then(|n| u16::try_from(n.guest_numa_id).ok());
        let requested = ctx
            .virtio_mem_sizes
            .get(&zone.zone)
            .copied()
            .unwrap_or(zone.hotplugged_size);
        let region = MemRegion {
            addr: zone.addr,
            size: zone.size,
            backing: zone.backing,
        };
        let device = VirtioMem::new(zone.zone.clone(), region, node_id, requested)?;
        reserve
            .virtio_mem
            .push((zone.zone.clone(), device.control()));
        specs.push(VirtioSpec {
            id: zone.zone.clone(),
            segment: 0,
            device: Box::new(device),
        });
    }
    Ok(specs)
}

fn balloon(ctx: &DeviceContext<'_>, reserve: &mut Reservations<'_>) -> Result<Vec<VirtioSpec>> {
    let Some(config) = &ctx.config.balloon else {
        return Ok(Vec::new());
    };
    let mut config = config.clone();
    if let Some(size) = ctx.balloon_size {
        config.size = size;
    }
    let id = "__balloon".to_owned();
    let device = Balloon::new(id.clone(), &config, BalloonBacking::of(&ctx.ram.memory)?)?;
    reserve.balloon = Some(device.control());
    Ok(vec![VirtioSpec {
        device: Box::new(device),
        id,
        segment: 0,
    }])
}

fn watchdog(ctx: &DeviceContext<'_>, _: &mut Reservations<'_>) -> Result<Vec<VirtioSpec>> {
    if !ctx.config.watchdog {
        return Ok(Vec::new());
    }
    let id = "__watchdog".to_owned();
    Ok(vec![VirtioSpec {
        device: Box::new(Watchdog::new(id.clone(), ctx.control.clone())?),
        id,
        segment: 0,
    }])
}
