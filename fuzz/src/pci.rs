//! The virtio-pci transport: a sequence of PCI configuration-space
//! accesses (ECAM and ports 0xcf8/0xcfc) and BAR 0 accesses through the
//! segment's MMIO windows (common configuration, ISR, device configuration,
//! notifications, MSI-X table and PBA) decoded from the input, against a
//! real virtio-pci function around a real device, in slot 1 of a real PCI
//! segment. The function needs a KVM VM (ioeventfds, MSI routes): one per
//! process.

use std::sync::{Arc, Mutex, OnceLock};

use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress};
use vmkit_config::{DiskConfig, NetConfig};
use vmkit_vmm::devices::serial::SerialBackend;
use vmkit_vmm::devices::Bus;
use vmkit_vmm::fuzzing::{inline_worker_count, run_inline_workers, set_inline_workers};
use vmkit_vmm::interrupts::InterruptRoutes;
use vmkit_vmm::memory::GuestMemoryMmap;
use vmkit_vmm::pci::config::BarKind;
use vmkit_vmm::pci::{
    plan_segments, PciBarWindow, PciConfigIo, PciEcam, PciSegment, ECAM_SIZE_PER_SEGMENT,
};
use vmkit_vmm::virtio::block::Block;
use vmkit_vmm::virtio::console::Console;
use vmkit_vmm::virtio::net::Net;
use vmkit_vmm::virtio::pci::{VirtioPciDevice, BAR_SIZE};
use vmkit_vmm::virtio::rng::Rng;
use vmkit_vmm::virtio::VirtioDevice;

use crate::input::Input;
use crate::ring::guest_memory;

/// Where BAR 0's regions start (Cloud Hypervisor's layout).
const REGIONS: [u64; 6] = [0x0, 0x2000, 0x4000, 0x6000, 0x8000, 0x48000];

static VM: OnceLock<Result<Arc<VmFd>, String>> = OnceLock::new();

/// A fresh routing table (GSIs are never given back, as in a VM, where
/// devices live as long as it) on the process's VM.
pub fn routes() -> Result<Arc<InterruptRoutes>, String> {
    let vm = VM
        .get_or_init(|| {
            let kvm = Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?;
            let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
            vmkit_vmm::interrupts::enable_split_irqchip(&vm)
                .map_err(|e| format!("KVM_CAP_SPLIT_IRQCHIP: {e}"))?;
            Ok(Arc::new(vm))
        })
        .clone()?;
    Ok(Arc::new(InterruptRoutes::new(vm, 1024)))
}

/// The target needs a KVM VM with (KVM's split) irqchip.
pub fn kvm_available() -> Result<(), String> {
    routes().map(|_| ())
}

/// The device behind the function, by the input's first byte.
fn device(kind: u8) -> (Box<dyn VirtioDevice>, Option<Arc<SerialBackend>>) {
    match kind % 4 {
        0 => (
            Box::new(Rng::new("fuzz-rng".into(), "/dev/urandom").expect("/dev/urandom")),
            None,
        ),
        1 => {
            let backend = crate::null_backend("console");
            let console = Console::new("fuzz-console".into(), backend.clone()).expect("console");
            (Box::new(console), Some(backend))
        }
        2 => {
            let text = format!(
                "path={},queue_size=16,num_queues=2,_disable_io_uring=on",
                crate::virtio::image_path()
            );
            let config = DiskConfig::parse(&text).expect("a valid disk option");
            (
                Box::new(Block::with_lock(&config, None, false).expect("the image opens")),
                None,
            )
        }
        _ => {
            let config = NetConfig::parse("mac=12:34:56:78:9a:bc,num_queues=4,queue_size=16")
                .expect("a valid net option");
            let (net, _peers) = Net::over_socketpairs(&config, "fuzz-net").expect("socketpairs");
            (Box::new(net), None)
        }
    }
}

fn access_len(input: &mut Input<'_>) -> usize {
    [1, 2, 4, 8, 4, 4, 3, 0][usize::from(input.u8() % 8)]
}

/// An offset into BAR 0: mostly inside one of its regions.
fn bar_offset(input: &mut Input<'_>) -> u64 {
    let selector = input.u8();
    if selector == 0xff {
        return input.u64();
    }
    let region = REGIONS[usize::from(selector) % REGIONS.len()];
    (region + u64::from(input.u16() % 0x400)) % BAR_SIZE
}

/// The guest's view: configuration space through ECAM (MMIO) and ports
/// 0xcf8/0xcfc, BARs through the segment's MMIO windows, on real buses at
/// the segment's addresses, as the vCPU threads reach them.
struct Platform {
    mmio: Bus,
    pio: Bus,
    ecam_base: u64,
    device: Arc<Mutex<VirtioPciDevice>>,
}

impl Platform {
    /// BAR 0's address now (the guest may have moved it).
    fn bar_address(&self) -> u64 {
        let device = self.device.lock().unwrap_or_else(|p| p.into_inner());
        device.config_space().bar_address(0).unwrap_or(0)
    }
}

pub fn virtio_pci(data: &[u8]) {
    let Ok(routes) = routes() else {
        return;
    };
    let mut input = Input::new(data);
    let memory: GuestMemoryMmap = guest_memory();
    set_inline_workers(true);
    let (device, backend) = device(input.u8());
    let layout = plan_segments(1, 1 << 30, 40).expect("one segment")[0];
    let segment = PciSegment::new(layout);
    let bar_kind = if input.u8() & 1 == 0 {
        BarKind::Memory64
    } else {
        BarKind::Memory32
    };
    let address = if bar_kind == BarKind::Memory64 {
        segment.mem64_allocator.lock().unwrap().allocate(BAR_SIZE)
    } else {
        segment.mem32_allocator.lock().unwrap().allocate(BAR_SIZE)
    }
    .expect("room for BAR 0");
    let function = match VirtioPciDevice::new(
        "fuzz-pci".into(),
        device,
        memory.clone(),
        routes,
        address,
        bar_kind,
    ) {
        Ok(function) => Arc::new(Mutex::new(function)),
        Err(e) => panic!("cannot build the function: {e}"),
    };
    segment.insert(1, function.clone());
    let segment = Arc::new(segment);
    let mut mmio = Bus::new();
    let mut pio = Bus::new();
    let ecam = PciEcam {
        segments: vec![segment.clone()],
    };
    let mem32 = PciBarWindow {
        segment: segment.clone(),
        base: layout.mem32.start,
    };
    let mem64 = PciBarWindow {
        segment: segment.clone(),
        base: layout.mem64.start,
    };
    let placed = [
        mmio.insert(
            layout.ecam_base,
            ECAM_SIZE_PER_SEGMENT,
            Arc::new(Mutex::new(ecam)),
        ),
        mmio.insert_shared(layout.mem32.start, layout.mem32.size, Arc::new(mem32)),
        mmio.insert_shared(layout.mem64.start, layout.mem64.size, Arc::new(mem64)),
        pio.insert(
            PciConfigIo::PORT,
            PciConfigIo::LEN,
            Arc::new(Mutex::new(PciConfigIo::new(segment))),
        ),
    ];
    assert!(placed.iter().all(|&p| p), "the PCI ranges overlap");
    let platform = Platform {
        mmio,
        pio,
        ecam_base: layout.ecam_base,
        device: function,
    };
    let mut buffer = [0u8; 8];
    let mut steps = 0;
    while !input.is_empty() && steps < 1024 {
        steps += 1;
        match input.u8() % 11 {
            op @ (0 | 1) => {
                let slot = u64::from(input.u8() % 4);
                let function = u64::from(input.u8() % 8);
                let reg = u64::from(input.u16() % 4096);
                let offset = (slot << 15) | (function << 12) | reg;
                let len = access_len(&mut input);
                let address = platform.ecam_base + offset;
                if op == 0 {
                    platform.mmio.read(address, &mut buffer[..len]);
                } else {
                    platform.mmio.write(address, input.bytes(len));
                }
            }
            2 => {
                let address = input.u32();
                platform
                    .pio
                    .write(PciConfigIo::PORT, &address.to_le_bytes());
            }
            op @ (3 | 4) => {
                let port = u64::from(input.u8() % 8);
                let len = access_len(&mut input);
                if op == 3 {
                    platform
                        .pio
                        .read(PciConfigIo::PORT + port, &mut buffer[..len]);
                } else {
                    platform
                        .pio
                        .write(PciConfigIo::PORT + port, input.bytes(len));
                }
            }
            op @ 5..=8 => {
                let address = platform.bar_address().wrapping_add(bar_offset(&mut input));
                let len = access_len(&mut input);
                if op <= 6 {
                    platform.mmio.read(address, &mut buffer[..len]);
                } else {
                    platform.mmio.write(address, input.bytes(len));
                }
            }
            9 => {
                // Rings and buffers for the queues the driver sets up.
                let at = u64::from(input.u16()) * 16;
                let len = usize::from(input.u8());
                let _ = memory.write_slice(input.bytes(len), GuestAddress(at));
            }
            _ => {
                run_inline_workers(16);
            }
        }
    }
    run_inline_workers(16);
    if std::env::var_os("VMKIT_FUZZ_DEBUG").is_some() {
        let used: u16 = memory.read_obj(GuestAddress(0x3002)).unwrap_or(0);
        let device = platform.device.lock().unwrap_or_else(|p| p.into_inner());
        eprintln!(
            "BAR 0 at {:#x}, queue 0 used index {used}, {} reset requests, {} workers",
            device.config_space().bar_address(0).unwrap_or(0),
            device.reset_requests(),
            inline_worker_count()
        );
    }
    drop(platform);
    set_inline_workers(false);
    assert_eq!(inline_worker_count(), 0, "a worker outlived its function");
    if let Some(backend) = backend {
        backend.close();
    }
}
