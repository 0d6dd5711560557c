//! A VM and its lifecycle: Cloud Hypervisor's state machine, one "boot"
//! (KVM VM, memory, devices, vCPU threads) at a time, rebuilt on guest reset,
//! and a VMM thread that waits for the boot to end and runs the watchdog.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::GuestMemoryBackend;
use vmkit_config::{ConsoleOutputMode, HotplugMethod, ValidatedConfig, VmConfig};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi;
use crate::boot::{self, KernelFormat};
use crate::control::{Control, StopReason, VcpuCommand};
use crate::cpu::{self, HostCpu, Topology};
use crate::device_manager::{
    DeviceContext, DeviceManager, DeviceManagerError, DeviceNode, HotplugError,
};
use crate::devices::legacy::{
    DebugPortWrite, GED_CPU_DEVICES_CHANGED, GED_MEMORY_DEVICES_CHANGED, GED_PCI_DEVICES_CHANGED,
    GED_POWER_BUTTON,
};
use crate::devices::memory_hotplug::{Dimm, SavedHotplug};
use crate::devices::serial::SerialBackend;
use crate::error::{ErrorKind, ModuleError, Result};
use crate::memory::{
    create_guest_ram, create_guest_ram_to_fill, map_guest_ram_from_file,
    map_guest_ram_from_shared_files, restores_copy_on_write, GuestRam, DEFAULT_MEMORY_ZONE,
};
use crate::migration::{self, ConfigMessage, Kind, MigrationError, TapHandover, Wire};
use crate::numa;
use crate::seccomp::{self, SeccompMode, Spawner, ThreadGroups, ThreadKind};
use crate::snapshot;
use crate::snapshot::SavedState;
use crate::vcpu::{self, Sample, VcpuThreadContext};
use crate::virtio::block::ImageLock;
use crate::virtio::pci::{DeviceEvent, DeviceEventLog, DeviceEvents};

/// Why a VM could not be created, booted or controlled.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("invalid VM state transition: {from} to {to}")]
    InvalidTransition { from: VmState, to: VmState },
    #[error("VM is not running")]
    NotRunning,
    #[error("vCPUs did not pause within 10 s")]
    PauseTimeout,
    #[error("cannot start {what}")]
    Thread {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is not supported yet")]
    NotSupported { what: &'static str },
    #[error(
        "A VM with a TPM (--tpm) cannot be {what}: its TPM's state lives in swtpm, which \
         vmkit cannot carry along"
    )]
    TpmState { what: &'static str },
    #[error(
        "The virtio console cannot use a socket (--console socket=...): only --serial can \
         (NoSocketOptionSupportForConsoleDevice)"
    )]
    ConsoleSocket,
    #[error(
        "--platform serial_number, uuid and oem_strings (SMBIOS tables) are not supported yet"
    )]
    Smbios,
    #[error("{what} {size} is not a multiple of the page size {page_size} (MisalignedMemorySize)")]
    MisalignedMemorySize {
        what: String,
        size: u64,
        page_size: u64,
    },
    #[error(
        "kvm_hyperv=on needs KVM's Hyper-V support (KVM_CAP_HYPERV), which this host's KVM lacks"
    )]
    NoHyperv,
    #[error("Failed to open hypervisor interface (is hypervisor interface available?)")]
    OpenKvm {
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{0}")]
    KickHandler(String),
    #[error("{what}")]
    Kvm {
        what: String,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("guest memory region {slot} has no host mapping")]
    HostAddress { slot: usize },
    #[error("cannot prefault the hot-added RAM ({size} bytes at {base:#x}; prefault=on)")]
    Prefault {
        base: u64,
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("No kernel specified")]
    NoKernel,
    #[error("power button")]
    PowerButton {
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the VM's exit event")]
    ExitEvent {
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the VM's device event signal")]
    DeviceEvents {
        #[source]
        source: std::io::Error,
    },
    #[error("Trying to snapshot while VM is running")]
    SnapshotNotPaused,
    #[error("the snapshot has {found} vCPU states but its config boots {expected} vCPUs")]
    SnapshotVcpus { found: usize, expected: u8 },
    #[error("the snapshot's config ({file}): {detail}")]
    SnapshotConfig { file: String, detail: String },
    #[error("disk {id}: {detail}")]
    SnapshotDisk { id: String, detail: String },
    #[error("the migrated VM's config: {detail}")]
    MigrationConfig { detail: String },
    #[error("Error from device manager: MissingVirtioBalloon")]
    NoBalloon,
    /// v37's words for a refused memory resize (its `Error::MemoryManager`).
    #[error("Memory manager error: {0}")]
    MemoryManager(String),
    /// v37's answer to `vm.resize-zone` for an unknown zone or less than
    /// the zone's boot RAM.
    #[error("Failed resizing a memory zone")]
    ResizeZone,
    #[error(
        "A VM cannot be {what} while vCPU {index} is marked for removal: the guest has not \
         ejected it yet"
    )]
    VcpuRemovalPending { what: &'static str, index: usize },
    #[error(
        "A VM cannot be {what} while device {id} is marked for removal: the guest has not \
         ejected it yet"
    )]
    DeviceRemovalPending { what: &'static str, id: String },
    #[error(
        "A VM cannot be {what} while device {id} of its config is off the PCI bus (the guest \
         ejected it without vm.remove-device)"
    )]
    DeviceEjectedByGuest { what: &'static str, id: String },
    /// v37's words (its `Error::CpuManager`).
    #[error("Error from CPU manager: {0}")]
    CpuResize(crate::devices::cpu_hotplug::ResizeError),
    #[error("Cannot notify the guest of the vCPU change: {source}")]
    Ged { source: std::io::Error },
    /// v37's words (its `Error::MemoryManager`).
    #[error("Memory manager error: {0}")]
    MemoryResize(crate::devices::memory_hotplug::ResizeError),
    #[error(
        "Migration of a VM with vhost-user devices (--disk/--net vhost_user=on, --fs) is not \
         supported yet: a backend serves one VMM at a time, and vmkit cannot hand it to the \
         receiving one"
    )]
    VhostUserMigration,
    /// A vhost-user backend whose own state a snapshot needs did not give it.
    #[error("Cannot snapshot the VM: {why}")]
    BackendState { why: String },
    #[error("Cannot give unplugged virtio-mem blocks at {addr:#x} back to the host")]
    DiscardUnplugged {
        addr: u64,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{option} {key} cannot be used with vhost_user=on{id}: the vhost-user backend does that \
         work, so set it in the backend's own options"
    )]
    VhostUserOption {
        option: &'static str,
        key: &'static str,
        id: String,
    },
}

impl ModuleError for VmError {
    fn kind(&self) -> ErrorKind {
        use VmError::*;
        match self {
            InvalidTransition { .. } | NotRunning | PauseTimeout => ErrorKind::State,
            Thread { .. } | PowerButton { .. } | ExitEvent { .. } | DeviceEvents { .. } => {
                ErrorKind::Device
            }
            NotSupported { .. } | TpmState { .. } | ConsoleSocket | Smbios | NoHyperv => {
                ErrorKind::Unsupported
            }
            OpenKvm { .. } | KickHandler(_) | Kvm { .. } => ErrorKind::Kvm,
            HostAddress { .. }
            | Prefault { .. }
            | MisalignedMemorySize { .. }
            | DiscardUnplugged { .. } => ErrorKind::Memory,
            NoKernel => ErrorKind::Kernel,
            SnapshotNotPaused => ErrorKind::State,
            SnapshotVcpus { .. } | SnapshotConfig { .. } | SnapshotDisk { .. } => {
                ErrorKind::Snapshot
            }
            MigrationConfig { .. } => ErrorKind::Migration,
            NoBalloon
            | CpuResize(_)
            | Ged { .. }
            | MemoryManager(_)
            | ResizeZone
            | MemoryResize(_) => ErrorKind::Device,
            VcpuRemovalPending { .. }
            | DeviceRemovalPending { .. }
            | DeviceEjectedByGuest { .. } => ErrorKind::Unsupported,
            VhostUserMigration | VhostUserOption { .. } => ErrorKind::Unsupported,
            BackendState { .. } => ErrorKind::Snapshot,
        }
    }
}

/// Asks memory zone `zone`'s virtio-mem device to plug `size` bytes, with
/// v37's errors.
fn resize_virtio_mem(instance: &Instance, zone: &str, size: u64) -> Result<()> {
    let Some(device) = instance.devices.virtio_mem(zone) else {
        log::error!("Failed resizing virtio-mem region: No virtio-mem handler");
        return Err(VmError::MemoryManager("MissingVirtioMemHandler".to_owned()).into());
    };
    device.resize(size).map_err(|e| {
        VmError::MemoryManager(format!(
            "VirtioMemResizeFail(ResizeError(Failed to update virtio configuration: \
             ResizeError({e})))"
        ))
        .into()
    })
}

/// Whether `fd` polled readable within `timeout` (None: no limit); false
/// also when a signal interrupted the wait.
fn readable_within(fd: RawFd, timeout: Option<Duration>) -> bool {
    let millis = timeout.map_or(-1, |t| {
        // Rounded up: a wait never ends before its timeout.
        i32::try_from(t.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX)
    });
    let mut ready = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one pollfd that lives on this stack frame.
    let n = unsafe { libc::poll(&mut ready, 1, millis) };
    n > 0
}

fn kvm_error(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    let what = what.into();
    move |source| VmError::Kvm { what, source }
}

/// Cloud Hypervisor's VM states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum VmState {
    Created,
    Running,
    Shutdown,
    Paused,
    BreakPoint,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl VmState {
    const ALL: [VmState; 5] = [
        VmState::Created,
        VmState::Running,
        VmState::Shutdown,
        VmState::Paused,
        VmState::BreakPoint,
    ];

    /// Cloud Hypervisor's transition rules and error text.
    pub fn check_transition(self, to: VmState) -> Result<()> {
        use VmState::*;
        let ok = match self {
            Created => matches!(to, Running | Shutdown | Paused | BreakPoint),
            Running => matches!(to, Shutdown | Paused | BreakPoint),
            Shutdown => matches!(to, Running),
            Paused => matches!(to, Running | Shutdown),
            BreakPoint => matches!(to, Created | Running),
        };
        if ok {
            Ok(())
        } else {
            Err(VmError::InvalidTransition { from: self, to }.into())
        }
    }
}

/// Knobs that are not part of Cloud Hypervisor's config.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// End the VM when no vCPU makes progress for this long (None, the
    /// default: never, as in Cloud Hypervisor).
    pub watchdog_timeout: Option<Duration>,
    /// Lock each disk image (shared if read-only, else exclusive) while its
    /// device lives, refusing an image another VM or process holds.
    pub lock_disks: bool,
    /// `--seccomp`: the filter every VM thread runs under, and what a call
    /// outside it does.
    pub seccomp: SeccompMode,
    /// The CPU groups the VM's threads move into (vCPUs to one, the rest to
    /// the other); empty: they stay where their creator runs.
    pub thread_groups: ThreadGroups,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            watchdog_timeout: None,
            lock_disks: true,
            seccomp: SeccompMode::Trap,
            thread_groups: ThreadGroups::default(),
        }
    }
}

/// One boot of the VM.
/// Fields drop in order, and guest RAM is last: unmapped while the KVM VM
/// (its fd, its vCPUs, the devices that hold it) still lives, each range
/// runs KVM's MMU notifier inside the SRCU read section that every
/// process's notifiers share, and a fleet's teardowns then wait on each
/// other's grace periods.
struct Instance {
    vm_fd: Arc<VmFd>,
    /// `settle_kvm_srcu`'s placeholder, held with the boot (a descriptor
    /// that came and went while the guest runs would look like a leak).
    srcu_placeholder: Option<Arc<EventFd>>,
    control: Arc<Control>,
    /// Each vCPU thread with its vCPU's index.
    threads: Vec<(u8, JoinHandle<()>)>,
    samples: Vec<Arc<Mutex<Sample>>>,
    kernel_format: Option<KernelFormat>,
    devices: DeviceManager,
    /// vCPUs built but not yet running: started once the boot is recorded.
    unstarted: Vec<UnstartedVcpu>,
    seccomp: SeccompMode,
    thread_groups: ThreadGroups,
    /// The host CPU facts the boot's vCPUs were set up with (hot-added
    /// vCPUs get the same CPUID).
    host: HostCpu,
    /// vCPUs the guest ejected, kept for a later hot-add.
    ejected: Arc<Mutex<BTreeMap<u8, VcpuFd>>>,
    /// Each started vCPU thread, for the eject handler to kick.
    vcpu_threads: Arc<Mutex<BTreeMap<u8, libc::pthread_t>>>,
    /// `--memory size` this boot was built with (a later boot starts the
    /// size `vm.resize` set).
    memory_size: u64,
    _ram: GuestRam,
}

/// The placeholder's datamatch: it is matched only by an 8-byte write of
/// this value, and only while `settle_kvm_srcu` runs.
const SRCU_SETTLE_DATAMATCH: u64 = 0x7674_6c65_7474_6573;

/// Ends, at the expedited pace, the grace period of the KVM VM's SRCU that
/// registering the boot's ioeventfds started.
///
/// Newer kernels (6.18 here) free the device bus an ioeventfd replaces
/// through `call_srcu`, and `kvm_destroy_vm` waits for that callback. At the
/// idle pace the grace period outlasts a short boot: a guest that powered off
/// soon after its start was reaped 6–8 ms late. Removing an ioeventfd waits
/// for an expedited grace period, and the placeholder leaves nothing behind.
fn settle_kvm_srcu(vm_fd: &VmFd, placeholder: &EventFd) {
    let address = IoEventAddress::Mmio(crate::layout::SRCU_SETTLE_ADDRESS);
    if vm_fd
        .register_ioevent(placeholder, &address, SRCU_SETTLE_DATAMATCH)
        .is_ok()
    {
        let _ = vm_fd.unregister_ioevent(placeholder, &address, SRCU_SETTLE_DATAMATCH);
    }
}

/// A vCPU whose thread has not been started.
struct UnstartedVcpu {
    fd: VcpuFd,
    context: VcpuThreadContext,
}

impl Instance {
    /// Starts a thread per built vCPU; with `parked`, they wait at their gate
    /// (a pause that arrived while the previous boot was ending).
    fn start_vcpus(&mut self, parked: bool) -> Result<()> {
        if parked {
            self.control.set_command(VcpuCommand::Park);
        }
        for vcpu in self.unstarted.drain(..) {
            let index = vcpu.context.index;
            self.control.thread_started(index);
            let spawned = seccomp::spawn_confined(
                format!("vcpu{index}"),
                ThreadKind::Vcpu,
                self.seccomp,
                &self.thread_groups,
                move || vcpu::run_vcpu(vcpu.fd, vcpu.context),
            );
            match spawned {
                Ok(handle) => {
                    self.vcpu_threads
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(index, handle.as_pthread_t());
                    self.threads.push((index, handle));
                }
                Err(e) => {
                    self.control.thread_exited(index);
                    return Err(VmError::Thread {
                        what: "vCPU thread",
                        source: e,
                    }
                    .into());
                }
            }
        }
        Ok(())
    }

    /// Gives the guest `dimm`, part of the hot-plug area that is already
    /// mapped in the VMM: a KVM memory slot of its own. With `prefault`
    /// (`--memory prefault=on`, or a restore's) its pages are allocated first,
    /// as boot RAM's are and as v37 does for each DIMM, so the guest never
    /// waits on them.
    fn plug_dimm(&self, dimm: Dimm, prefault: bool) -> Result<()> {
        // The DIMM must lie within one host mapping (the hot-plug area's).
        let region = migration::dimm_slot(&self._ram, &dimm, false);
        let (Some(region), Ok(len)) = (region, usize::try_from(dimm.length)) else {
            return Err(VmError::HostAddress { slot: dimm.slot }.into());
        };
        let host = region.userspace_addr as *mut u8;
        if prefault {
            // SAFETY: [host, host + len) lies in the hot-plug area's mapping
            // (checked above); populating pages changes none of their bytes.
            if unsafe { libc::madvise(host.cast(), len, libc::MADV_POPULATE_WRITE) } != 0 {
                return Err(VmError::Prefault {
                    base: dimm.base,
                    size: dimm.length,
                    source: std::io::Error::last_os_error(),
                }
                .into());
            }
        }
        // SAFETY: the range is inside the hot-plug area's mapping, which the
        // Instance holds (with the VM fd) until the VM fd is gone.
        unsafe { self.vm_fd.set_user_memory_region(region) }
            .map_err(kvm_error("KVM_SET_USER_MEMORY_REGION (hot-added RAM)"))?;
        Ok(())
    }

    fn kick_all(&self) {
        for (_, t) in &self.threads {
            vcpu::kick(t.as_pthread_t());
        }
    }

    /// Kicks the vCPU threads still in their run loop.
    fn kick_running(&self) {
        for (index, t) in &self.threads {
            if self.control.vcpu_running(*index) {
                vcpu::kick(t.as_pthread_t());
            }
        }
    }

    /// Stops every vCPU thread and device worker and joins them. What is
    /// left (the KVM VM and guest memory) goes when the Instance is dropped.
    fn stop(&mut self, reason: StopReason) {
        self.control.request_stop(reason);
        // Every vCPU checks the stop command before each KVM_RUN and the kick
        // ends a KVM_RUN in progress (or the next one), so one kick suffices;
        // kicking again is only a safety net for a thread that is slow to go.
        self.kick_running();
        while !self.control.wait_threads_exited(STOP_REKICK) {
            self.kick_running();
        }
        self.vcpu_threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        for (_, t) in self.threads.drain(..) {
            let _ = t.join();
        }
        // vCPUs never started still hold the buses.
        self.unstarted.clear();
        // Device workers stop (their IO done) before guest memory goes away.
        self.devices.stop_devices();
    }
}

impl Instance {
    /// Joins the threads of vCPUs the guest ejected (they left their run
    /// loop on their own).
    /// Tears down the PCI devices the guest ejected; returns their ids.
    fn reap_ejected_devices(&mut self) -> Vec<String> {
        let vm_fd = self.vm_fd.clone();
        self.devices.reap_ejected(&vm_fd)
    }

    fn reap_ejected_vcpus(&mut self) {
        let (gone, kept): (Vec<_>, Vec<_>) = self
            .threads
            .drain(..)
            .partition(|(index, t)| t.is_finished() && self.control.vcpu_removed(*index));
        self.threads = kept;
        let mut pthreads = self.vcpu_threads.lock().unwrap_or_else(|p| p.into_inner());
        for (index, _) in &gone {
            pthreads.remove(index);
        }
        drop(pthreads);
        for (_, t) in gone {
            let _ = t.join();
        }
    }

    /// Builds vCPU `index` for a hot-add (one the guest ejected earlier, as
    /// it left it, or a new one set up as the boot's other vCPUs are: it
    /// waits for the guest's INIT-SIPI) and starts its thread.
    fn add_vcpu(&mut self, index: u8, kvm: &Kvm, config: &VmConfig) -> Result<()> {
        let reused = self
            .ejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&index);
        let fd = match reused {
            Some(fd) => fd,
            None => {
                let apic_id = Topology::from_config(&config.cpus).apic_id(index);
                let fd = self
                    .vm_fd
                    .create_vcpu(u64::from(apic_id))
                    .map_err(kvm_error(format!("KVM_CREATE_VCPU {index}")))?;
                let cpuid = cpu::cpuid_for(kvm, &config.cpus, index, self.host)?;
                fd.set_cpuid2(&cpuid).map_err(kvm_error("KVM_SET_CPUID2"))?;
                cpu::setup_msrs(&fd)?;
                cpu::setup_fpu(&fd)?;
                cpu::setup_lapic(&fd)?;
                fd
            }
        };
        let sample = match self.samples.get(usize::from(index)) {
            Some(sample) => sample.clone(),
            None => {
                let sample = Arc::new(Mutex::new(Sample::default()));
                self.samples.push(sample.clone());
                sample
            }
        };
        let host_cpus = vcpu_host_cpus(config, index);
        let context = VcpuThreadContext {
            index,
            control: self.control.clone(),
            pio: self.devices.pio_bus().clone(),
            mmio: self.devices.mmio_bus().clone(),
            sample,
            host_cpus,
            ejected: self.ejected.clone(),
        };
        self.control.vcpu_added(index);
        self.unstarted.push(UnstartedVcpu { fd, context });
        // A paused VM's command is Park already: the new thread parks.
        self.start_vcpus(false)
    }
}

/// How long `Instance::stop` waits for vCPU threads before kicking again.
const STOP_REKICK: Duration = Duration::from_millis(100);

impl Instance {
    /// Stops the boot and releases it (KVM VM, guest memory) at once.
    fn stop_and_release(mut self, reason: StopReason) {
        self.stop(reason);
    }
}

/// A boot that goes on from saved state instead of starting the payload.
struct Restore<'a> {
    memory: RestoredMemory<'a>,
    state: &'a SavedState,
    kernel_format: Option<&'a str>,
}

enum RestoredMemory<'a> {
    /// A snapshot's memory file, mapped copy-on-write (`prefault`: read in
    /// up front).
    File {
        file: &'a std::fs::File,
        prefault: bool,
    },
    /// Guest RAM already filled: a migration's.
    Ram(GuestRam),
}

/// What a live migration did.
#[derive(Debug, Clone, Default)]
pub struct MigrationReport {
    /// From the call to the receiver's word that the VM runs there.
    pub total: Duration,
    /// From the vCPUs' stop here to that word: the guest-visible pause.
    pub downtime: Duration,
    /// Passes over guest memory before the stop (the first sends it all).
    pub rounds: u32,
    /// Bytes of guest memory sent (none for a local migration).
    pub bytes: u64,
    /// The memory was handed over as files, not copied.
    pub local: bool,
    /// The receiver runs the VM with the descriptors this process handed
    /// over (taps, the vsock listener): it is on this host.
    pub fds_adopted: bool,
}

/// The pre-copy stops iterating once a round leaves no more than this
/// much to send while the VM is stopped, or after `MAX_PRECOPY_ROUNDS`.
const STOP_AND_COPY_BYTES: u64 = 4 << 20;
const MAX_PRECOPY_ROUNDS: u32 = 10;

/// How far a send got, for undoing it when it fails.
#[derive(Default)]
struct SendProgress {
    dirty_logging: bool,
    parked: bool,
    devices_stopped: bool,
    disks_unlocked: bool,
    complete_sent: bool,
}

struct Lifecycle {
    /// Changed only through `Vm::set_state`, which publishes it.
    state: VmState,
    instance: Option<Instance>,
    /// Why the VM last stopped, once it has.
    exit: Option<StopReason>,
    boots: u64,
    vmm_thread: Option<JoinHandle<()>>,
    /// The format of the kernel the last boot ran (None for a restored VM
    /// whose snapshot did not say).
    kernel_format: Option<KernelFormat>,
    /// The user asked for a shutdown (seen by a reboot in progress).
    shutdown_requested: bool,
    /// The VMM thread is between two boots: the old one stopped, the new
    /// one not yet recorded.
    rebooting: bool,
    /// The reset under way is the API's `reboot()`, whose caller reports
    /// it; a reset the guest (or its watchdog) asked for is reported as
    /// device events.
    api_reboot: bool,
}

impl Lifecycle {
    /// A reboot is under way: the boot is ending for a reset or the next
    /// one is being built. Control calls wait for the new boot.
    fn reboot_pending(&self) -> bool {
        if self.shutdown_requested || self.state == VmState::Shutdown {
            return false;
        }
        self.rebooting
            || self
                .instance
                .as_ref()
                .is_some_and(|i| i.control.stop_reason() == Some(StopReason::Reset))
    }
}

/// How long a control call waits for a reboot in progress to finish.
const REBOOT_WAIT: Duration = Duration::from_secs(30);

/// What `info()` reports beyond the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmInfo {
    pub state: VmState,
    pub boots: u64,
    pub kernel_format: Option<&'static str>,
    pub serial_pty: Option<PathBuf>,
    pub console_pty: Option<PathBuf>,
    pub memory_size: u64,
    /// Cloud Hypervisor's device tree of the running boot (empty when none runs).
    pub device_tree: Vec<DeviceNode>,
}

/// A VM: its config, serial backend (kept across reboots) and lifecycle.
pub struct Vm {
    config: ValidatedConfig,
    options: VmOptions,
    kvm: Kvm,
    host: HostCpu,
    serial: Option<Arc<SerialBackend>>,
    console: Option<Arc<SerialBackend>>,
    debug_log: Arc<Mutex<Vec<DebugPortWrite>>>,
    device_events: DeviceEvents,
    life: Mutex<Lifecycle>,
    /// `life.state`, for readers that must not wait for the lifecycle lock
    /// (`state`, `wait`): a migration's send holds it for as long as its
    /// receiver takes. Stored with `life.state`, under the lock.
    published_state: AtomicU8,
    changed: Condvar,
    /// The disk images' locks (VmOptions::lock_disks), held from boot until
    /// the VM stops: a reset rebuilds the devices but keeps the images.
    disk_locks: Mutex<Vec<(String, ImageLock)>>,
    /// The image locks of disks hot-added to this boot, by id: released
    /// when the guest ejects the disk or the boot ends.
    hot_disk_locks: Mutex<HashMap<String, ImageLock>>,
    /// Starts the device workers that vCPU threads activate.
    spawner: Spawner,
    /// Readable while the VM is stopped (Shutdown): lets a caller wait for
    /// the VM beside other descriptors (a signal's wake-up pipe, say).
    exit_event: EventFd,
    /// The tap queues a migration's sender handed over, by net device id,
    /// kept until the VM stops: every boot until then (resets) adopts them.
    adopted_taps: Mutex<HashMap<String, Vec<std::fs::File>>>,
    /// The balloon's target once `vm.resize` set it: later boots keep it.
    balloon_size: Mutex<Option<u64>>,
    /// The vCPU count `vm.resize` set on a running VM.
    vcpus_now: Mutex<Option<u8>>,
    /// The device lists as hot-plug and removal left them (None: the
    /// config's); later boots build these, as in Cloud Hypervisor.
    devices_now: Mutex<Option<DeviceLists>>,
    /// Cloud Hypervisor's automatic-id counter, where boot left it.
    device_id_counter: Mutex<usize>,
    /// Each virtio-mem zone's `hotplugged_size` once `vm.resize` or
    /// `vm.resize-zone` set it: later boots keep it.
    virtio_mem_sizes: Mutex<BTreeMap<String, Option<u64>>>,
    /// `--memory size` as `vm.resize {"desired_ram"}` last set it (Cloud
    /// Hypervisor changes its config's size, whether RAM grew or not).
    memory_now: Mutex<Option<u64>>,
    /// Connections to vhost-user backends, from the first boot until the VM
    /// stops: resets keep them.
    vhost_links: crate::device_manager::VhostLinks,
}

/// The hot-pluggable device lists of a config.
#[derive(Clone)]
struct DeviceLists {
    disks: Option<Vec<vmkit_config::DiskConfig>>,
    net: Option<Vec<vmkit_config::NetConfig>>,
    fs: Option<Vec<vmkit_config::FsConfig>>,
    pmem: Option<Vec<vmkit_config::PmemConfig>>,
    vsock: Option<vmkit_config::VsockConfig>,
}

impl DeviceLists {
    fn of(config: &VmConfig) -> Self {
        DeviceLists {
            disks: config.disks.clone(),
            net: config.net.clone(),
            fs: config.fs.clone(),
            pmem: config.pmem.clone(),
            vsock: config.vsock.clone(),
        }
    }

    fn apply(&self, config: &mut VmConfig) {
        config.disks = self.disks.clone();
        config.net = self.net.clone();
        config.fs = self.fs.clone();
        config.pmem = self.pmem.clone();
        config.vsock = self.vsock.clone();
    }

    /// Appends the last device of `candidate`'s list `field` (the one a
    /// hot-plug adds); v37's refusal of a second vsock.
    fn add_last_of(&mut self, candidate: &VmConfig, field: &str) -> Result<()> {
        fn push<T: Clone>(list: &mut Option<Vec<T>>, from: &Option<Vec<T>>) -> bool {
            match from.as_ref().and_then(|l| l.last()) {
                Some(item) => {
                    list.get_or_insert_with(Vec::new).push(item.clone());
                    true
                }
                None => false,
            }
        }
        let found = match field {
            "disks" => push(&mut self.disks, &candidate.disks),
            "net" => push(&mut self.net, &candidate.net),
            "fs" => push(&mut self.fs, &candidate.fs),
            "pmem" => push(&mut self.pmem, &candidate.pmem),
            _ => {
                if self.vsock.is_some() {
                    return Err(HotplugError::TooManyVsock.into());
                }
                self.vsock = candidate.vsock.clone();
                self.vsock.is_some()
            }
        };
        if !found {
            return Err(VmError::NotSupported {
                what: "a hot-plug without its device",
            }
            .into());
        }
        Ok(())
    }

    /// Takes the device with `id` out (Cloud Hypervisor's `remove_device`
    /// on the config).
    fn remove(&mut self, id: &str) {
        let keep = |d: &Option<String>| d.as_deref() != Some(id);
        if let Some(l) = &mut self.disks {
            l.retain(|d| keep(&d.id));
        }
        if let Some(l) = &mut self.net {
            l.retain(|d| keep(&d.id));
        }
        if let Some(l) = &mut self.fs {
            l.retain(|d| keep(&d.id));
        }
        if let Some(l) = &mut self.pmem {
            l.retain(|d| keep(&d.id));
        }
        if self.vsock.as_ref().is_some_and(|v| !keep(&v.id)) {
            self.vsock = None;
        }
    }

    /// The id of the last device of list `field` (the one being added).
    fn last_id<'a>(config: &'a mut VmConfig, field: &str) -> Option<&'a mut Option<String>> {
        match field {
            "disks" => config.disks.iter_mut().flatten().last().map(|d| &mut d.id),
            "net" => config.net.iter_mut().flatten().last().map(|d| &mut d.id),
            "fs" => config.fs.iter_mut().flatten().last().map(|d| &mut d.id),
            "pmem" => config.pmem.iter_mut().flatten().last().map(|d| &mut d.id),
            _ => config.vsock.as_mut().map(|d| &mut d.id),
        }
    }

    /// Every device id of the config's lists.
    fn ids(config: &VmConfig) -> Vec<String> {
        let lists = DeviceLists::of(config);
        let mut ids: Vec<Option<String>> = Vec::new();
        ids.extend(lists.disks.into_iter().flatten().map(|d| d.id));
        ids.extend(lists.net.into_iter().flatten().map(|d| d.id));
        ids.extend(lists.fs.into_iter().flatten().map(|d| d.id));
        ids.extend(lists.pmem.into_iter().flatten().map(|d| d.id));
        ids.extend(lists.vsock.into_iter().map(|d| d.id));
        ids.into_iter().flatten().collect()
    }

    /// Leaves only the last device of list `field` and no other device.
    fn keep_only_last(config: &mut VmConfig, field: &str) {
        fn last<T>(list: &mut Option<Vec<T>>, keep: bool) {
            *list = match (list.take(), keep) {
                (Some(mut l), true) => l.pop().map(|d| vec![d]),
                _ => None,
            };
        }
        last(&mut config.disks, field == "disks");
        last(&mut config.net, field == "net");
        last(&mut config.fs, field == "fs");
        last(&mut config.pmem, field == "pmem");
        if field != "vsock" {
            config.vsock = None;
        }
    }
}

/// The host CPUs `--cpus affinity` pins vCPU `index` to, if any.
fn vcpu_host_cpus(config: &VmConfig, index: u8) -> Option<Vec<usize>> {
    config
        .cpus
        .affinity
        .iter()
        .flatten()
        .find(|a| a.vcpu == index)
        .map(|a| a.host_cpus.clone())
}

fn is_pvm_host() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

impl Vm {
    /// Checks the config against what this VMM supports and opens KVM and the
    /// serial backend. Nothing runs until `boot`.
    pub fn new(mut validated: ValidatedConfig, options: VmOptions) -> Result<Arc<Vm>> {
        check_supported(validated.config())?;
        let (_, device_id_counter) = validated.config().clone().assign_device_ids_counting();
        validated.assign_device_ids();
        let config = validated.config();
        let kvm = Kvm::new().map_err(|source| VmError::OpenKvm { source })?;
        if config.cpus.kvm_hyperv && !kvm.check_extension(Cap::Hyperv) {
            return Err(VmError::NoHyperv.into());
        }
        if config.cpus.kvm_hyperv {
            return Err(VmError::NotSupported {
                what: "kvm_hyperv=on",
            }
            .into());
        }
        vcpu::register_kick_handler().map_err(VmError::KickHandler)?;
        let spawner =
            Spawner::start(options.seccomp, options.thread_groups.clone()).map_err(|source| {
                VmError::Thread {
                    what: "the device worker spawner",
                    source,
                }
            })?;
        let serial = SerialBackend::open(
            &config.serial,
            "serial",
            true,
            options.seccomp,
            &options.thread_groups,
        )?;
        // With both on the terminal, keyboard input goes to the serial port.
        let console_stdin = config.serial.mode != ConsoleOutputMode::Tty;
        let console = SerialBackend::open(
            &config.console,
            "console",
            console_stdin,
            options.seccomp,
            &options.thread_groups,
        )?;
        let exit_event = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|source| VmError::ExitEvent { source })?;
        let device_events =
            DeviceEventLog::new().map_err(|source| VmError::DeviceEvents { source })?;
        let tsc_deadline_timer = kvm.check_extension(Cap::TscDeadlineTimer);
        Ok(Arc::new(Vm {
            config: validated,
            options,
            kvm,
            host: HostCpu {
                pvm: is_pvm_host(),
                tsc_deadline_timer,
                tsc_khz: None,
            },
            serial,
            console,
            debug_log: Arc::new(Mutex::new(Vec::new())),
            device_events: Arc::new(device_events),
            life: Mutex::new(Lifecycle {
                state: VmState::Created,
                instance: None,
                exit: None,
                boots: 0,
                vmm_thread: None,
                kernel_format: None,
                shutdown_requested: false,
                rebooting: false,
                api_reboot: false,
            }),
            published_state: AtomicU8::new(VmState::Created as u8),
            changed: Condvar::new(),
            disk_locks: Mutex::new(Vec::new()),
            hot_disk_locks: Mutex::new(HashMap::new()),
            spawner,
            exit_event,
            adopted_taps: Mutex::new(HashMap::new()),
            balloon_size: Mutex::new(None),
            virtio_mem_sizes: Mutex::new(BTreeMap::new()),
            vcpus_now: Mutex::new(None),
            devices_now: Mutex::new(None),
            device_id_counter: Mutex::new(device_id_counter),
            memory_now: Mutex::new(None),
            vhost_links: Mutex::new(HashMap::new()),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Lifecycle> {
        self.life.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lifecycle once no reboot is in progress (or after `REBOOT_WAIT`),
    /// so that a call never finds no boot while the state says Running.
    fn lock_settled(&self) -> MutexGuard<'_, Lifecycle> {
        let deadline = Instant::now() + REBOOT_WAIT;
        let mut life = self.lock();
        while life.reboot_pending() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            // The VMM thread notifies when the new boot is recorded; the
            // short timeout covers the moment before it has seen the reset.
            let wait = (deadline - now).min(Duration::from_millis(20));
            life = self
                .changed
                .wait_timeout(life, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        life
    }

    /// The state as last changed; never waits (see `published_state`).
    pub fn state(&self) -> VmState {
        let value = self.published_state.load(Ordering::Acquire);
        VmState::ALL[usize::from(value)]
    }

    fn set_state(&self, life: &mut Lifecycle, state: VmState) {
        life.state = state;
        self.published_state.store(state as u8, Ordering::Release);
    }

    pub fn serial(&self) -> Option<&Arc<SerialBackend>> {
        self.serial.as_ref()
    }

    /// Device events (Cloud Hypervisor's event-monitor events devices
    /// raise) from index `since` on, and the next call's `since`.
    pub fn device_events(&self, since: usize) -> (Vec<DeviceEvent>, usize) {
        self.device_events.since(since)
    }

    /// Readable after a device event, until read (8 bytes): to wait for
    /// events beside `exit_fd` instead of polling `device_events`.
    pub fn device_events_fd(&self) -> RawFd {
        self.device_events.signal_fd()
    }

    pub fn debug_port_writes(&self) -> Vec<DebugPortWrite> {
        self.debug_log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn info(&self) -> VmInfo {
        let life = self.lock_settled();
        VmInfo {
            state: life.state,
            boots: life.boots,
            kernel_format: life.kernel_format.map(KernelFormat::name),
            serial_pty: self.serial.as_ref().and_then(|s| s.pty_path().cloned()),
            console_pty: self.console.as_ref().and_then(|s| s.pty_path().cloned()),
            // RAM less what the guest put in its balloon, as v37 reports it.
            memory_size: self.live_config().memory.total_size().saturating_sub(
                life.instance
                    .as_ref()
                    .and_then(|i| i.devices.balloon())
                    .map_or(0, |b| b.actual_bytes()),
            ),
            device_tree: life
                .instance
                .as_ref()
                .map(|i| i.devices.device_tree())
                .unwrap_or_default(),
        }
    }

    /// The config with the automatic device ids filled in.
    pub fn config(&self) -> &VmConfig {
        self.config.config()
    }

    /// The config as it stands: `config()` with what `vm.resize` changed.
    pub fn live_config(&self) -> VmConfig {
        let mut config = self.config().clone();
        if let (Some(balloon), Some(size)) = (
            config.balloon.as_mut(),
            *self.balloon_size.lock().unwrap_or_else(|p| p.into_inner()),
        ) {
            balloon.size = size;
        }
        if let Some(vcpus) = *self.vcpus_now.lock().unwrap_or_else(|p| p.into_inner()) {
            config.cpus.boot_vcpus = vcpus;
        }
        if let Some(lists) = &*self.devices_now.lock().unwrap_or_else(|p| p.into_inner()) {
            lists.apply(&mut config);
        }
        config.memory = self.live_memory();
        self.apply_virtio_mem_sizes(&mut config.memory);
        config
    }

    /// Sets each zone's `hotplugged_size` to what `vm.resize`/`resize-zone`
    /// asked of its virtio-mem device.
    fn apply_virtio_mem_sizes(&self, memory: &mut vmkit_config::MemoryConfig) {
        let sizes = self
            .virtio_mem_sizes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (zone, &size) in sizes.iter() {
            match memory.zones.as_mut() {
                Some(zones) => {
                    if let Some(zone) = zones.iter_mut().find(|z| z.id == *zone) {
                        zone.hotplugged_size = size;
                    }
                }
                None if zone == DEFAULT_MEMORY_ZONE => memory.hotplugged_size = size,
                None => {}
            }
        }
    }

    /// Cloud Hypervisor's `vm.add-disk`/`add-net`/`add-fs`/`add-pmem`/
    /// `add-vsock` (and `add-vdpa`/`add-device`/`add-user-device`, refused
    /// as at boot) on a running VM. `candidate` is the live config with the
    /// new device last in its list `field` (validated by the caller). The
    /// device gets its automatic id (v37's counter), the first free slot of
    /// its segment and its BARs; the guest hears of it through the PCI
    /// hot-plug controller and a GED interrupt. Returns (id, BDF).
    pub fn add_device(&self, candidate: VmConfig, field: &str) -> Result<(String, String)> {
        // A kind refused at boot is refused hot-plugged, with the same error.
        check_supported(&candidate)?;
        let mut life = self.lock_settled();
        let Some(instance) = life.instance.as_mut() else {
            return Err(VmError::NotRunning.into());
        };
        let gone = instance.reap_ejected_devices();
        self.forget_vhost_links(&gone);
        let Some(build) = crate::device_manager::hotplug_kind(field) else {
            return Err(VmError::NotSupported {
                what: "hot-plugging this device kind",
            }
            .into());
        };
        // Only the new device comes from `candidate`: the rest is the VM's.
        let live = self.live_config();
        // Name it as v37 does: its counter, past every id in use.
        let taken: std::collections::HashSet<String> = {
            let mut ids = DeviceLists::ids(&live);
            ids.extend(instance.devices.device_tree().into_iter().map(|n| n.id));
            ids.into_iter().collect()
        };
        let mut lists = DeviceLists::of(&live);
        lists.add_last_of(&candidate, field)?;
        let mut full = live;
        lists.apply(&mut full);
        let prefix = match field {
            "disks" => "_disk",
            "net" => "_net",
            "fs" => "_fs",
            "pmem" => "_pmem",
            _ => "_vsock",
        };
        let id = {
            let Some(slot) = DeviceLists::last_id(&mut full, field) else {
                return Err(VmError::NotSupported {
                    what: "a hot-plug without its device",
                }
                .into());
            };
            if let Some(id) = slot.as_ref().filter(|id| taken.contains(*id)) {
                // Removed from the config but not ejected yet: v37 refuses it.
                return Err(HotplugError::IdentifierNotUnique(id.clone()).into());
            }
            if slot.is_none() {
                let mut counter = self
                    .device_id_counter
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                *slot = vmkit_config::ids::next_device_name(prefix, &mut counter, &taken);
            }
            slot.clone().unwrap_or_default()
        };
        let mut only = full.clone();
        DeviceLists::keep_only_last(&mut only, field);
        // A hot-added disk's image is locked as a boot disk's is.
        let lock = match only.disks.iter().flatten().next() {
            Some(disk) if field == "disks" && self.options.lock_disks && !disk.vhost_user => Some(
                ImageLock::take(disk).map_err(|source| DeviceManagerError::Block {
                    id: id.clone(),
                    source: source.into(),
                })?,
            ),
            _ => None,
        };
        let adopted = HashMap::new();
        let ctx = DeviceContext {
            config: &only,
            vm_fd: &instance.vm_fd,
            ram: &instance._ram,
            control: &instance.control,
            gsi_limit: self.kvm.check_extension_int(Cap::IrqRouting).max(0) as u32,
            phys_bits: cpu::guest_phys_bits(&self.kvm, &only.cpus)?,
            serial: self.serial.as_ref(),
            console: self.console.as_ref(),
            debug_log: &self.debug_log,
            device_events: &self.device_events,
            spawner: &self.spawner,
            adopted_taps: &adopted,
            vhost_links: &self.vhost_links,
            balloon_size: None,
            // Memory devices are not hot-plugged: the new device's config lists none.
            virtio_mem_sizes: &BTreeMap::new(),
            placement: None,
        };
        let (_, bdf) = instance.devices.hotplug_virtio(&ctx, build)?;
        if let Some(lock) = lock {
            self.hot_disk_locks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id.clone(), lock);
        }
        *self.devices_now.lock().unwrap_or_else(|p| p.into_inner()) = Some(DeviceLists::of(&full));
        instance
            .devices
            .ged()
            .notify(GED_PCI_DEVICES_CHANGED)
            .map_err(|source| VmError::Ged { source })?;
        Ok((id, bdf))
    }

    /// Closes the vhost-user connections of devices that are gone and
    /// releases the image locks of the disks among them (hot-added, or
    /// built at boot or restore).
    fn forget_vhost_links(&self, ids: &[String]) {
        let mut links = self.vhost_links.lock().unwrap_or_else(|p| p.into_inner());
        let mut locks = self
            .hot_disk_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for id in ids {
            links.remove(id);
            locks.remove(id);
        }
        drop(locks);
        self.held_disk_locks()
            .retain(|(id, _)| !ids.iter().any(|gone| gone == id));
    }

    /// Cloud Hypervisor's `vm.remove-device` on a running VM: the device
    /// leaves the config at once and its slot is marked for removal; the
    /// guest hears of it through a GED interrupt, and the device is torn
    /// down when the guest ejects it (`_EJ0`, a `B0EJ` write).
    pub fn remove_device(&self, id: &str) -> Result<()> {
        let mut life = self.lock_settled();
        let Some(instance) = life.instance.as_mut() else {
            return Err(VmError::NotRunning.into());
        };
        let gone = instance.reap_ejected_devices();
        self.forget_vhost_links(&gone);
        instance.devices.request_removal(id)?;
        let mut lists = DeviceLists::of(&self.live_config());
        lists.remove(id);
        *self.devices_now.lock().unwrap_or_else(|p| p.into_inner()) = Some(lists);
        instance
            .devices
            .ged()
            .notify(GED_PCI_DEVICES_CHANGED)
            .map_err(|source| VmError::Ged { source })?;
        Ok(())
    }

    /// `--memory` with the size `vm.resize` set.
    fn live_memory(&self) -> vmkit_config::MemoryConfig {
        let mut memory = self.config().memory.clone();
        if let Some(size) = *self.memory_now.lock().unwrap_or_else(|p| p.into_inner()) {
            memory.size = size;
        }
        memory
    }

    /// `vm.resize {"desired_ram": bytes}` on a running VM: an ACPI DIMM or
    /// the default zone's virtio-mem device, as `--memory hotplug_method`
    /// says.
    pub fn resize_memory(&self, desired: u64) -> Result<()> {
        match self.config().memory.hotplug_method {
            HotplugMethod::Acpi => self.resize_memory_acpi(desired),
            HotplugMethod::VirtioMem => self.resize_memory_virtio_mem(desired),
        }
    }

    /// `vm.resize {"desired_ram": bytes}` with `hotplug_method=acpi`, as
    /// Cloud Hypervisor v37's ACPI memory hot-plug does it: more RAM than the
    /// guest has becomes one DIMM in the hot-plug area (`hotplug_size`),
    /// mapped for the guest at once and announced through the memory
    /// hot-plug controller and a GED interrupt; less changes nothing (ACPI
    /// RAM is never taken back). Either way the config's `size` becomes
    /// `desired`, which later boots start with.
    fn resize_memory_acpi(&self, desired: u64) -> Result<()> {
        let life = self.lock_settled();
        let Some(instance) = life.instance.as_ref() else {
            return Err(VmError::NotRunning.into());
        };
        let hotplug = instance.devices.memory_hotplug().clone();
        if let Some(dimm) = hotplug.plan(desired).map_err(VmError::MemoryResize)? {
            instance.plug_dimm(dimm, self.config().memory.prefault)?;
            hotplug.insert(dimm);
            instance
                .devices
                .ged()
                .notify(GED_MEMORY_DEVICES_CHANGED)
                .map_err(|source| VmError::Ged { source })?;
        }
        *self.memory_now.lock().unwrap_or_else(|p| p.into_inner()) = Some(desired);
        Ok(())
    }

    /// `vm.resize {"desired_ram": bytes}` on a running VM with
    /// `hotplug_method=virtio-mem`, as Cloud Hypervisor v37 does it: the
    /// default zone's virtio-mem device is asked to plug `bytes` less boot
    /// RAM (a configuration change the guest hears of); less than boot RAM
    /// changes nothing but the config. Refused with `--memory-zone`.
    fn resize_memory_virtio_mem(&self, desired: u64) -> Result<()> {
        let life = self.lock_settled();
        let Some(instance) = &life.instance else {
            return Err(VmError::NotRunning.into());
        };
        let config = self.live_config();
        if config.memory.zones.is_some() {
            return Err(VmError::MemoryManager("InvalidResizeWithMemoryZones".to_owned()).into());
        }
        let boot = config.memory.size;
        if desired >= boot {
            resize_virtio_mem(instance, DEFAULT_MEMORY_ZONE, desired - boot)?;
        }
        let hotplugged = (desired > boot).then(|| desired - boot);
        self.virtio_mem_sizes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(DEFAULT_MEMORY_ZONE.to_owned(), hotplugged);
        Ok(())
    }

    /// `vm.resize-zone {"id": zone, "desired_ram": bytes}` on a running VM,
    /// as Cloud Hypervisor v37 does it: the zone's virtio-mem device is
    /// asked to plug `bytes` less the zone's boot RAM.
    pub fn resize_zone(&self, zone: &str, desired: u64) -> Result<()> {
        let life = self.lock_settled();
        let Some(instance) = &life.instance else {
            return Err(VmError::NotRunning.into());
        };
        let config = self.live_config();
        let Some(found) = config.memory.zones.iter().flatten().find(|z| z.id == zone) else {
            log::error!("Could not find the memory zone {zone} for the resize");
            return Err(VmError::ResizeZone.into());
        };
        if desired < found.size {
            log::error!(
                "Invalid to ask less ({desired}) than boot RAM ({}) for this memory zone",
                found.size
            );
            return Err(VmError::ResizeZone.into());
        }
        let hotplugged = desired - found.size;
        resize_virtio_mem(instance, zone, hotplugged)?;
        self.virtio_mem_sizes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(zone.to_owned(), Some(hotplugged));
        Ok(())
    }

    /// `vm.resize {"desired_vcpus": n}` on a running VM, as Cloud Hypervisor
    /// v37 does it: more vCPUs start at once (waiting for the guest's
    /// INIT-SIPI) and are announced through the CPU hot-plug controller and
    /// a GED interrupt; fewer mark the highest for removal, and each one's
    /// thread stops when the guest ejects it (`_EJ0`). The config's
    /// `boot_vcpus` becomes `desired`.
    pub fn resize_vcpus(&self, desired: u8) -> Result<()> {
        let mut life = self.lock_settled();
        let Some(instance) = life.instance.as_mut() else {
            return Err(VmError::NotRunning.into());
        };
        instance.reap_ejected_vcpus();
        let hotplug = instance.devices.cpu_hotplug().clone();
        let plan = hotplug.resize(desired).map_err(VmError::CpuResize)?;
        for (position, &index) in plan.start.iter().enumerate() {
            if let Err(e) = instance.add_vcpu(index, &self.kvm, self.config()) {
                for &unstarted in &plan.start[position..] {
                    hotplug.start_failed(unstarted);
                }
                return Err(e);
            }
        }
        if plan.notify() {
            instance
                .devices
                .ged()
                .notify(GED_CPU_DEVICES_CHANGED)
                .map_err(|source| VmError::Ged { source })?;
        }
        *self.vcpus_now.lock().unwrap_or_else(|p| p.into_inner()) = Some(desired);
        Ok(())
    }

    /// `vm.resize {"desired_balloon": bytes}`: asks the guest to hold
    /// `bytes` in its balloon (it inflates or deflates to it). Kept for the
    /// VM's later boots, as in Cloud Hypervisor.
    pub fn resize_balloon(&self, bytes: u64) -> Result<()> {
        let life = self.lock_settled();
        let Some(instance) = &life.instance else {
            return Err(VmError::NotRunning.into());
        };
        let Some(balloon) = instance.devices.balloon() else {
            return Err(VmError::NoBalloon.into());
        };
        balloon.set_target(bytes)?;
        *self.balloon_size.lock().unwrap_or_else(|p| p.into_inner()) = Some(bytes);
        Ok(())
    }

    /// Cloud Hypervisor's counters of every device that has some.
    pub fn counters(&self) -> Result<Vec<(String, BTreeMap<&'static str, u64>)>> {
        let life = self.lock_settled();
        let Some(instance) = &life.instance else {
            return Err(VmError::NotRunning.into());
        };
        Ok(instance.devices.counters())
    }

    /// Builds the VM and starts its vCPUs (Created or Shutdown → Running).
    pub fn boot(self: &Arc<Self>) -> Result<()> {
        let mut life = self.lock();
        life.state.check_transition(VmState::Running)?;
        if let Some(old) = life.vmm_thread.take() {
            drop(life);
            let _ = old.join();
            life = self.lock();
        }
        self.launch(life, None)
    }

    /// Builds a boot (fresh, or `restore`d from a snapshot: then Paused),
    /// starts its vCPUs and its VMM thread, and records it.
    fn launch(
        self: &Arc<Self>,
        mut life: MutexGuard<'_, Lifecycle>,
        restore: Option<Restore<'_>>,
    ) -> Result<()> {
        // Dropped, so released, if this boot fails.
        let disk_locks = self.lock_disk_images()?;
        let paused = restore.is_some();
        let mut instance = self.build(restore)?;
        if let Err(e) = instance.start_vcpus(paused) {
            instance.stop_and_release(StopReason::VmmError {
                message: e.message.clone(),
            });
            return Err(e);
        }
        // The VMM thread waits for this lock before it looks at the boot.
        let vm = self.clone();
        let spawned = seccomp::spawn_confined(
            "vmm".into(),
            ThreadKind::Vmm,
            self.options.seccomp,
            &self.options.thread_groups,
            move || vm.vmm_loop(),
        );
        let thread = match spawned {
            Ok(thread) => thread,
            Err(source) => {
                instance.stop_and_release(StopReason::Shutdown);
                return Err(VmError::Thread {
                    what: "the VMM thread",
                    source,
                }
                .into());
            }
        };
        *self.held_disk_locks() = disk_locks;
        life.kernel_format = instance.kernel_format;
        life.instance = Some(instance);
        let state = if paused {
            VmState::Paused
        } else {
            VmState::Running
        };
        self.set_state(&mut life, state);
        life.exit = None;
        life.shutdown_requested = false;
        life.boots += 1;
        life.vmm_thread = Some(thread);
        // Not readable again until this boot stops (EAGAIN when it was not).
        let _ = self.exit_event.read();
        drop(life);
        self.changed.notify_all();
        Ok(())
    }

    pub fn pause(&self) -> Result<()> {
        let mut life = self.lock_settled();
        life.state.check_transition(VmState::Paused)?;
        let Some(instance) = &life.instance else {
            return Err(VmError::NotRunning.into());
        };
        instance.control.set_command(VcpuCommand::Park);
        instance.kick_all();
        if !instance.control.wait_parked(Duration::from_secs(10)) {
            instance.control.set_command(VcpuCommand::Run);
            return Err(VmError::PauseTimeout.into());
        }
        self.set_state(&mut life, VmState::Paused);
        self.changed.notify_all();
        Ok(())
    }

    pub fn resume(&self) -> Result<()> {
        let mut life = self.lock_settled();
        match life.state {
            VmState::Paused => {}
            VmState::Running => VmState::Running.check_transition(VmState::Running)?,
            _ => return Err(VmError::NotRunning.into()),
        }
        if let Some(instance) = &life.instance {
            instance.control.set_command(VcpuCommand::Run);
        }
        self.set_state(&mut life, VmState::Running);
        self.changed.notify_all();
        Ok(())
    }

    /// Stops the VM (Running/Paused → Shutdown). Returns once every vCPU
    /// thread and device worker has stopped and been joined, their output
    /// and IO done. The VMM thread then releases the KVM VM and guest memory
    /// ([`Vm::release`] waits for that): unmapping large touched memory
    /// takes time no caller needs to wait for to know the VM has stopped.
    pub fn shutdown(&self) -> Result<()> {
        let mut life = self.lock();
        if life.state == VmState::Shutdown {
            return Ok(());
        }
        life.state.check_transition(VmState::Shutdown)?;
        life.shutdown_requested = true;
        match (&life.instance, &life.vmm_thread) {
            (Some(instance), _) => instance.control.request_stop(StopReason::Shutdown),
            // A reboot is in progress: the VMM thread sees the request.
            (None, Some(_)) => {}
            (None, None) => {
                let reason = life.exit.clone().unwrap_or(StopReason::Shutdown);
                self.mark_stopped(&mut life, reason);
                drop(life);
                self.changed.notify_all();
                return Ok(());
            }
        }
        // The VMM thread stops the boot and reports it (`finish`).
        while life.state != VmState::Shutdown {
            life = self.changed.wait(life).unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }

    /// Waits until a stopped VM's last boot is released: the VMM thread has
    /// closed the KVM VM, unmapped guest memory and ended. Does nothing
    /// while the VM runs.
    pub fn release(&self) {
        let thread = {
            let mut life = self.lock();
            if !matches!(life.state, VmState::Shutdown | VmState::Created) {
                return;
            }
            life.vmm_thread.take()
        };
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }

    /// A descriptor that is readable while the VM is stopped (Shutdown, after
    /// a boot or a shutdown), for `poll` beside others; never read it. It
    /// lives as long as the Vm.
    pub fn exit_fd(&self) -> RawFd {
        self.exit_event.as_raw_fd()
    }

    /// Reboots a running VM: the current boot stops and a new one starts.
    pub fn reboot(&self) -> Result<()> {
        let mut life = self.lock_settled();
        match life.instance.as_ref().map(|i| i.control.clone()) {
            Some(control) if matches!(life.state, VmState::Running | VmState::Paused) => {
                control.set_command(VcpuCommand::Run);
                life.api_reboot = true;
                control.request_stop(StopReason::Reset);
                // The new boot runs, as in Cloud Hypervisor.
                self.set_state(&mut life, VmState::Running);
                self.changed.notify_all();
                Ok(())
            }
            _ => Err(VmError::NotRunning.into()),
        }
    }

    /// Presses the guest's ACPI power button (a GED event); what happens next
    /// is up to the guest (Linux shuts down in an orderly way).
    pub fn power_button(&self) -> Result<()> {
        let life = self.lock_settled();
        match &life.instance {
            Some(instance) if matches!(life.state, VmState::Running | VmState::Paused) => instance
                .devices
                .ged()
                .notify(GED_POWER_BUTTON)
                .map_err(|source| VmError::PowerButton { source }.into()),
            _ => Err(VmError::NotRunning.into()),
        }
    }

    /// Waits for the VM to stop for good; None on timeout, or at once when
    /// it never booted.
    ///
    /// The stop is awaited on the exit eventfd, not under the lifecycle
    /// lock: a migration's send holds that lock for as long as its receiver
    /// takes, and the timeout must hold all the same.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<StopReason> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            match self.state() {
                VmState::Created => return None,
                VmState::Shutdown => {
                    let life = self.lock();
                    if life.state == VmState::Shutdown {
                        return life.exit.clone();
                    }
                    continue; // booted again meanwhile: wait for that boot
                }
                _ => {}
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let stopped = readable_within(self.exit_event.as_raw_fd(), left);
            // Not readable: the time is up, or a signal cut the poll short.
            if !stopped && deadline.is_some_and(|d| Instant::now() >= d) {
                return None;
            }
        }
    }

    /// Ends the VM and its backends; the VM cannot boot again.
    pub fn close(&self) {
        let _ = self.shutdown();
        for backend in self.serial.iter().chain(&self.console) {
            backend.close();
        }
        // No device starts again. With CPU groups, their owner removes them
        // after `release`, once no VM thread is left in them: the spawner
        // thread ends now rather than when the Vm is dropped.
        if !self.options.thread_groups.is_empty() {
            self.spawner.stop();
        }
    }

    /// Waits for each boot to end; rebuilds on reset; runs the watchdog.
    fn vmm_loop(self: Arc<Self>) {
        let mut reporter = StopReporter {
            vm: &self,
            reported: false,
        };
        self.settle_boot_srcu();
        loop {
            let control = match &self.lock().instance {
                Some(instance) => instance.control.clone(),
                None => return,
            };
            let interval = self
                .options
                .watchdog_timeout
                .map_or(Duration::from_secs(3600), |t| {
                    (t / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
                });
            let reason = match control.wait_stop_or_eject(Some(interval)) {
                Some(Ok(reason)) => reason,
                Some(Err(())) => {
                    let gone = match self.lock().instance.as_mut() {
                        Some(instance) => instance.reap_ejected_devices(),
                        None => Vec::new(),
                    };
                    self.forget_vhost_links(&gone);
                    continue;
                }
                None => {
                    self.watchdog_tick();
                    continue;
                }
            };
            let (mut ended, guest_reset) = {
                let mut life = self.lock();
                life.rebooting = reason == StopReason::Reset;
                let api = std::mem::take(&mut life.api_reboot);
                (life.instance.take(), reason == StopReason::Reset && !api)
            };
            if let Some(instance) = &mut ended {
                instance.stop(reason.clone());
            }
            // Cloud Hypervisor reports a reset the guest asked for as the
            // end of one boot and the start of the next.
            let report = |event| {
                if guest_reset {
                    self.device_events.push("vm", event, Vec::new());
                }
            };
            report("shutdown");
            if reason == StopReason::Reset {
                report("booting");
                // The old boot's VM and memory go before the new ones come.
                drop(ended);
                match self.build_instance() {
                    Ok(mut instance) => {
                        let mut life = self.lock();
                        if life.shutdown_requested {
                            drop(life);
                            instance.stop(StopReason::Shutdown);
                            reporter.finish(StopReason::Shutdown);
                            return;
                        }
                        // Recorded and started under the lock: nobody sees the
                        // new boot half-started. A pause that landed while the
                        // old boot was ending holds for the new one.
                        if let Err(e) = instance.start_vcpus(life.state == VmState::Paused) {
                            drop(life);
                            instance.stop(StopReason::Shutdown);
                            reporter.finish(StopReason::VmmError {
                                message: format!("Rebooting the VM failed: {e}"),
                            });
                            return;
                        }
                        life.boots += 1;
                        life.kernel_format = instance.kernel_format;
                        life.instance = Some(instance);
                        life.rebooting = false;
                        self.changed.notify_all();
                        drop(life);
                        report("booted");
                        self.settle_boot_srcu();
                        continue;
                    }
                    Err(e) => {
                        reporter.finish(StopReason::VmmError {
                            message: format!("Rebooting the VM failed: {e}"),
                        });
                        return;
                    }
                }
            }
            reporter.finish(reason);
            // Reported stopped; what is left is the kernel's (slow) part:
            // closing the KVM VM and unmapping guest memory.
            drop(ended);
            return;
        }
    }

    /// `settle_kvm_srcu` for the running boot, on the VMM thread while the
    /// guest runs (not under the boot's lock: it waits milliseconds).
    fn settle_boot_srcu(&self) {
        let (vm_fd, placeholder) = match &self.lock().instance {
            Some(Instance {
                vm_fd,
                srcu_placeholder: Some(placeholder),
                ..
            }) => (vm_fd.clone(), placeholder.clone()),
            _ => return,
        };
        settle_kvm_srcu(&vm_fd, &placeholder);
    }

    /// Reports a stopped boot (its threads joined, its devices stopped).
    fn finish(&self, reason: StopReason) {
        self.held_disk_locks().clear();
        self.hot_disk_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        // A migration's tap queues go with the VM (later boots open the taps).
        self.adopted_taps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        // Closes the backends' connections (and server mode's sockets).
        self.vhost_links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let mut life = self.lock();
        for backend in self.serial.iter().chain(&self.console) {
            backend.attach(None);
            backend.capture.wake();
        }
        self.mark_stopped(&mut life, reason);
        // Waiters woken under the lock would block on it at once (see
        // `Control::request_stop`).
        drop(life);
        self.changed.notify_all();
    }

    /// Records the VM as stopped for `reason` and makes `exit_fd` readable;
    /// the caller wakes the lifecycle's waiters once it has unlocked it. The
    /// eventfd is written under the lock: a boot that follows drains it.
    fn mark_stopped(&self, life: &mut Lifecycle, reason: StopReason) {
        life.rebooting = false;
        self.set_state(life, VmState::Shutdown);
        life.exit = Some(reason);
        // Only fails when the counter would overflow: it is readable then.
        let _ = self.exit_event.write(1);
    }

    /// Samples every vCPU; ends the VM when none can make progress.
    fn watchdog_tick(&self) {
        let Some(timeout) = self.options.watchdog_timeout else {
            return;
        };
        let life = self.lock();
        if life.state != VmState::Running {
            return;
        }
        let Some(instance) = &life.instance else {
            return;
        };
        instance.kick_all();
        let samples: Vec<Sample> = instance
            .samples
            .iter()
            .map(|s| *s.lock().unwrap_or_else(|p| p.into_inner()))
            .collect();
        let all_stuck = samples.iter().all(|s| s.stuck());
        let since = samples.iter().map(|s| s.unchanged_since).max();
        let running = samples.iter().any(|s| !s.waiting_for_sipi);
        if let (true, true, Some(since)) = (all_stuck, running, since) {
            let stalled = since.elapsed();
            if stalled >= timeout {
                let detail: Vec<String> = samples
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| !s.waiting_for_sipi)
                    .map(|(i, s)| {
                        format!(
                            "vCPU {i} {} at RIP {:#x}",
                            if s.halted { "halted" } else { "spinning" },
                            s.rip
                        )
                    })
                    .collect();
                instance.control.request_stop(StopReason::Hang {
                    message: format!(
                        "No vCPU made progress for {:.1} s with interrupts disabled ({})",
                        stalled.as_secs_f64(),
                        detail.join(", ")
                    ),
                });
            }
        }
    }

    /// Locks every disk image, or none without `lock_disks`.
    fn lock_disk_images(&self) -> Result<Vec<(String, ImageLock)>> {
        if !self.options.lock_disks {
            return Ok(Vec::new());
        }
        let mut locks = Vec::new();
        // The disks the next boot builds: hot-plug changes included.
        let mut config = self.config().clone();
        if let Some(lists) = &*self.devices_now.lock().unwrap_or_else(|p| p.into_inner()) {
            lists.apply(&mut config);
        }
        // A vhost-user disk's image is its backend's to lock.
        for disk in config.disks.iter().flatten().filter(|d| !d.vhost_user) {
            // Named as when the device itself fails to open the image.
            let id = disk.id.clone().unwrap_or_default();
            let lock = ImageLock::take(disk).map_err(|source| DeviceManagerError::Block {
                id: id.clone(),
                source: source.into(),
            })?;
            locks.push((id, lock));
        }
        Ok(locks)
    }

    fn held_disk_locks(&self) -> MutexGuard<'_, Vec<(String, ImageLock)>> {
        self.disk_locks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Builds one boot (KVM VM, memory, devices, tables, payload, vCPUs)
    /// without starting its vCPUs.
    fn build_instance(&self) -> Result<Instance> {
        self.build(None)
    }

    /// Builds a boot, fresh or (`restore`) from a snapshot: then guest
    /// memory is the snapshot's file mapped copy-on-write, and the vCPUs,
    /// clock and platform devices take the snapshot's state instead of
    /// tables, a payload and boot registers.
    fn build(&self, restore: Option<Restore<'_>>) -> Result<Instance> {
        // Later boots start the vCPU count `vm.resize` set, as in Cloud
        // Hypervisor (its config's boot_vcpus changes); but never none.
        // So does the RAM size it set (never none).
        let vcpus = self
            .vcpus_now
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .filter(|&vcpus| vcpus > 0);
        let memory = self
            .memory_now
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .filter(|&size| size > 0);
        let resized = (vcpus.is_some() || memory.is_some()).then(|| {
            let mut config = self.config().clone();
            if let Some(vcpus) = vcpus {
                config.cpus.boot_vcpus = vcpus;
            }
            if let Some(size) = memory {
                config.memory.size = size;
            }
            config
        });
        let hotplugged = self
            .devices_now
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .map(|lists| {
                let mut config = resized.clone().unwrap_or_else(|| self.config().clone());
                lists.apply(&mut config);
                config
            });
        let config = hotplugged
            .as_ref()
            .or(resized.as_ref())
            .unwrap_or(self.config());
        // One descriptor for the process, opened with its first VM rather
        // than its first disk (which may be hot-added much later).
        crate::virtio::block::placement::open_cpu_pressure();
        let vm_fd = Arc::new(crate::cpu::create_vm(&self.kvm).map_err(kvm_error("KVM_CREATE_VM"))?);
        vm_fd
            .set_tss_address(crate::layout::KVM_TSS_ADDRESS as usize)
            .map_err(kvm_error("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .set_identity_map_address(crate::layout::KVM_TSS_ADDRESS - 0x1000)
            .map_err(kvm_error("KVM_SET_IDENTITY_MAP_ADDR"))?;
        crate::interrupts::enable_split_irqchip(&vm_fd)
            .map_err(kvm_error("KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)"))?;

        let placement = restore.as_ref().map(|r| &r.state.platform.placement);
        let (ram, restore, restored_dimms) = match restore {
            None => (create_guest_ram(&config.memory)?, None, None),
            Some(Restore {
                memory,
                state,
                kernel_format,
            }) => {
                let hotplug = SavedHotplug::decode(&state.platform.memory_hotplug)?;
                // `prefault` reads in the DIMMs too: all the guest's memory,
                // as Cloud Hypervisor's restore has it.
                let populate_dimms = matches!(memory, RestoredMemory::File { prefault: true, .. });
                let (ram, from) = match memory {
                    // Private memory (anonymous, or a private `file=`'s,
                    // which only gave the first contents) becomes the file
                    // mapped copy-on-write, and what follows boot RAM is
                    // copied in; shared or huge-page memory is made as the
                    // config says, emptied, and the whole file copied in.
                    RestoredMemory::File { file, prefault }
                        if restores_copy_on_write(&config.memory) =>
                    {
                        let ram = map_guest_ram_from_file(&config.memory, file, prefault)?;
                        let boot = ram.total_size();
                        (ram, Some((file, boot)))
                    }
                    RestoredMemory::File { file, .. } => {
                        (create_guest_ram_to_fill(&config.memory)?, Some((file, 0)))
                    }
                    RestoredMemory::Ram(ram) => (ram, None),
                };
                let layout = ram
                    .hotplug_layout()
                    .ok_or(crate::memory::MemoryError::AddressSpace)?;
                let dimms = hotplug.dimms(layout, ram.total_size())?;
                if let Some((file, from)) = from {
                    let ranges: Vec<(u64, u64)> =
                        dimms.iter().map(|d| (d.base, d.length)).collect();
                    let layout = snapshot::MemoryLayout::new(&ram, &ranges, Vec::new());
                    snapshot::check_memory_file(file, snapshot::MEMORY_FILE, layout.size())?;
                    snapshot::load_memory(&ram, &layout, file, snapshot::MEMORY_FILE, from)?;
                }
                (
                    ram,
                    Some((state, kernel_format)),
                    Some((hotplug, dimms, populate_dimms)),
                )
            }
        };
        for slot in 0..ram.memory.num_regions() {
            // The hot-plug area reaches the guest a DIMM at a time (vm.resize).
            let Some(mem_region) = migration::memory_slot(&ram, slot, false) else {
                if ram.hotplug.is_some() && slot + 1 == ram.memory.num_regions() {
                    continue;
                }
                return Err(VmError::HostAddress { slot }.into());
            };
            // SAFETY: the mapping outlives the VM fd: both live in the Instance,
            // and the VM fd is dropped (after its vCPUs) before the memory.
            unsafe { vm_fd.set_user_memory_region(mem_region) }
                .map_err(kvm_error("KVM_SET_USER_MEMORY_REGION"))?;
        }

        let control = Arc::new(Control::new());
        let adopted_taps = self.adopted_taps.lock().unwrap_or_else(|p| p.into_inner());
        let devices = DeviceManager::build(&DeviceContext {
            config,
            vm_fd: &vm_fd,
            ram: &ram,
            control: &control,
            gsi_limit: self.kvm.check_extension_int(Cap::IrqRouting).max(0) as u32,
            phys_bits: cpu::guest_phys_bits(&self.kvm, &config.cpus)?,
            serial: self.serial.as_ref(),
            console: self.console.as_ref(),
            debug_log: &self.debug_log,
            device_events: &self.device_events,
            spawner: &self.spawner,
            adopted_taps: &adopted_taps,
            vhost_links: &self.vhost_links,
            balloon_size: *self.balloon_size.lock().unwrap_or_else(|p| p.into_inner()),
            virtio_mem_sizes: &self
                .virtio_mem_sizes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(zone, size)| (zone.clone(), size.unwrap_or(0)))
                .collect(),
            placement,
        })?;
        drop(adopted_taps);
        let (payload, kernel_format) = match restore {
            None => {
                let topology = Topology::from_config(&config.cpus);
                let rsdp = acpi::write_tables(
                    &ram.memory,
                    &topology,
                    config.cpus.boot_vcpus,
                    config.cpus.max_vcpus,
                    &devices.segment_layouts(),
                    &numa::nodes(config)?,
                    config.tpm.is_some(),
                    ram.hotplug.is_some(),
                )?;
                let payload_config = config.payload.as_ref().ok_or(VmError::NoKernel)?;
                let payload = boot::load_payload(&ram, payload_config, rsdp)?;
                (Some(payload), Some(payload.format))
            }
            Some((state, kernel_format)) => {
                if state.vcpus.len() != usize::from(config.cpus.boot_vcpus) {
                    return Err(VmError::SnapshotVcpus {
                        found: state.vcpus.len(),
                        expected: config.cpus.boot_vcpus,
                    }
                    .into());
                }
                devices.restore_platform_state(
                    &state.platform.ioapic,
                    state.platform.serial.as_deref(),
                )?;
                devices.restore_pci_state(&state.platform.pci)?;
                if let Some((hotplug, dimms, _)) = &restored_dimms {
                    devices.memory_hotplug().restore(hotplug, dimms);
                }
                // Whatever the saved memory held in blocks the guest had
                // unplugged goes back to the host, as when it unplugged them.
                for (addr, len) in devices.virtio_mem_unplugged() {
                    ram.discard(addr, len)
                        .map_err(|source| VmError::DiscardUnplugged { addr, source })?;
                }
                devices.resume_virtio_after_snapshot();
                let clock = kvm_bindings::kvm_clock_data {
                    clock: state.platform.clock,
                    ..Default::default()
                };
                vm_fd
                    .set_clock(&clock)
                    .map_err(kvm_error("KVM_SET_CLOCK"))?;
                (None, kernel_format.and_then(KernelFormat::from_name))
            }
        };

        let topology = Topology::from_config(&config.cpus);
        let mut host = self.host;
        let mut samples = Vec::new();
        let mut unstarted = Vec::new();
        let ejected = Arc::new(Mutex::new(BTreeMap::new()));
        let vcpu_threads: Arc<Mutex<BTreeMap<u8, libc::pthread_t>>> = Arc::default();
        {
            // The guest ejects a vCPU (CPU hot-unplug): its thread leaves.
            let control = control.clone();
            let vcpu_threads = vcpu_threads.clone();
            devices
                .cpu_hotplug()
                .set_eject_handler(Box::new(move |index| {
                    control.remove_vcpu(index);
                    let threads = vcpu_threads.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(&thread) = threads.get(&index) {
                        vcpu::kick(thread);
                    }
                }));
        }
        for index in 0..config.cpus.boot_vcpus {
            let apic_id = topology.apic_id(index);
            let fd = vm_fd
                .create_vcpu(u64::from(apic_id))
                .map_err(kvm_error(format!("KVM_CREATE_VCPU {index}")))?;
            match (restore, payload) {
                (Some((state, _)), _) => {
                    if index == 0 {
                        let offered = cpu::offered_cpuid(&self.kvm, host)?;
                        for vcpu in &state.vcpus {
                            vcpu.check_cpu_features(&offered)?;
                        }
                    }
                    state.vcpus[usize::from(index)].apply(&fd)?
                }
                (None, Some(payload)) => {
                    if host.tsc_khz.is_none() {
                        host.tsc_khz = fd.get_tsc_khz().ok();
                    }
                    let cpuid = cpu::cpuid_for(&self.kvm, &config.cpus, index, host)?;
                    fd.set_cpuid2(&cpuid).map_err(kvm_error("KVM_SET_CPUID2"))?;
                    cpu::setup_msrs(&fd)?;
                    cpu::setup_fpu(&fd)?;
                    cpu::setup_lapic(&fd)?;
                    if index == 0 {
                        cpu::setup_boot_vcpu(&fd, &ram.memory, payload.entry)?;
                    }
                }
                (None, None) => return Err(VmError::NoKernel.into()),
            }
            let sample = Arc::new(Mutex::new(Sample::default()));
            samples.push(sample.clone());
            let host_cpus = vcpu_host_cpus(config, index);
            let context = VcpuThreadContext {
                index,
                control: control.clone(),
                pio: devices.pio_bus().clone(),
                mmio: devices.mmio_bus().clone(),
                sample,
                host_cpus,
                ejected: ejected.clone(),
            };
            unstarted.push(UnstartedVcpu { fd, context });
        }
        let instance = Instance {
            vm_fd,
            srcu_placeholder: EventFd::new(libc::EFD_CLOEXEC).ok().map(Arc::new),
            control,
            threads: Vec::new(),
            samples,
            kernel_format,
            devices,
            unstarted,
            seccomp: self.options.seccomp,
            thread_groups: self.options.thread_groups.clone(),
            host,
            ejected,
            vcpu_threads,
            memory_size: config.memory.size,
            _ram: ram,
        };
        // The DIMMs the saved VM had get their KVM slots back, each at its base.
        if let Some((_, dimms, populate)) = &restored_dimms {
            for &dimm in dimms {
                instance.plug_dimm(dimm, *populate)?;
            }
        }
        Ok(instance)
    }

    /// Writes the paused VM to `dir` ([`snapshot`]): its config, guest
    /// memory, every vCPU's state, the clock, the platform devices and the
    /// PCI devices' configuration and registers (started virtio devices
    /// finish what they took from their rings first).
    pub fn snapshot(&self, dir: &std::path::Path) -> Result<()> {
        let mut life = self.lock_settled();
        if life.state != VmState::Paused {
            return Err(VmError::SnapshotNotPaused.into());
        }
        if self.config().tpm.is_some() {
            return Err(VmError::TpmState {
                what: "snapshotted",
            }
            .into());
        }
        let Some(instance) = life.instance.as_mut() else {
            return Err(VmError::NotRunning.into());
        };
        // Devices the guest ejected go first: they are not the VM's any more.
        let gone = instance.reap_ejected_devices();
        self.forget_vhost_links(&gone);
        let Some(instance) = &life.instance else {
            return Err(VmError::NotRunning.into());
        };
        // The devices finish what they took from the guest's rings first:
        // their completions land in guest memory and in the vCPUs' LAPICs
        // before those are taken.
        //
        // vhost-user devices snapshot as the built-in ones do: their rings
        // stop once the backend has finished what it took (and a backend
        // with DEVICE_STATE gives its own state, which virtio-fs needs), and
        // a restored VM's start from the used rings with whichever backend
        // serves the socket then.
        instance.devices.stop_virtio_for_snapshot();
        let written = match instance.devices.virtio_snapshot_refusal() {
            Some(why) => Err(VmError::BackendState { why }.into()),
            None => self.write_snapshot(dir, &life, instance),
        };
        instance.devices.resume_virtio_after_snapshot();
        written
    }

    fn write_snapshot(
        &self,
        dir: &std::path::Path,
        life: &Lifecycle,
        instance: &Instance,
    ) -> Result<()> {
        let config = self.saved_config(instance, "snapshotted")?;
        let state = self.capture_state(instance)?;
        snapshot::write_dir(
            dir,
            &snapshot::SnapshotParts {
                config: &config,
                kernel_format: life.kernel_format.map(KernelFormat::name),
                ram: &instance._ram,
                layout: &saved_layout(instance),
                state: &state,
            },
        )?;
        Ok(())
    }

    /// The config a snapshot or migration carries: the vCPUs running now
    /// (after `vm.resize`) are the ones a restore starts, the virtio-mem
    /// sizes asked for now, and the devices hot-plug and removal left (the
    /// saved placement puts each back in its slot). Its `--memory size` is
    /// this boot's (the layout of boot RAM; the DIMMs and the size
    /// `vm.resize` set are in the memory hot-plug state). Refused while a
    /// vCPU or device the guest has not ejected yet is marked for removal:
    /// it would come back as a running one.
    fn saved_config(&self, instance: &Instance, what: &'static str) -> Result<VmConfig> {
        let hotplug = instance.devices.cpu_hotplug();
        if let Some(index) = hotplug
            .slots()
            .iter()
            .position(|s| s.enabled && s.pending_removal)
        {
            return Err(VmError::VcpuRemovalPending { what, index }.into());
        }
        if let Some(id) = instance.devices.pending_removals().into_iter().next() {
            return Err(VmError::DeviceRemovalPending { what, id }.into());
        }
        let mut config = self.config().clone();
        if let Some(lists) = &*self.devices_now.lock().unwrap_or_else(|p| p.into_inner()) {
            lists.apply(&mut config);
        }
        // A device the restore could not put back where it was.
        let on_bus: std::collections::HashSet<String> = instance
            .devices
            .device_tree()
            .into_iter()
            .map(|n| n.id)
            .collect();
        if let Some(id) = DeviceLists::ids(&config)
            .into_iter()
            .find(|id| !on_bus.contains(id))
        {
            return Err(VmError::DeviceEjectedByGuest { what, id }.into());
        }
        config.cpus.boot_vcpus = hotplug.present();
        config.memory.size = instance.memory_size;
        self.apply_virtio_mem_sizes(&mut config.memory);
        Ok(config)
    }

    /// The paused VM's state but its memory: every vCPU's (taken by its
    /// parked thread), the clock, the platform and PCI devices'. Started
    /// virtio devices must have stopped first.
    fn capture_state(&self, instance: &Instance) -> Result<SavedState> {
        let msr_list = snapshot::vcpu::msr_list(&self.kvm)?;
        let xsave = self.kvm.check_extension(Cap::Xsave);
        let vcpus = instance
            .control
            .capture_vcpus(msr_list, xsave, Duration::from_secs(10))?;
        let clock = instance
            .vm_fd
            .get_clock()
            .map_err(kvm_error("KVM_GET_CLOCK"))?;
        let (ioapic, serial) = instance.devices.save_platform_state();
        let pci = instance.devices.save_pci_state();
        let size = *self.memory_now.lock().unwrap_or_else(|p| p.into_inner());
        let memory_hotplug = instance.devices.memory_hotplug().save(size).encode();
        let counter = *self
            .device_id_counter
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let placement = instance.devices.save_placement(counter as u64);
        Ok(SavedState {
            vcpus,
            platform: snapshot::PlatformState {
                clock: clock.clock,
                ioapic,
                serial,
                pci,
                placement,
                memory_hotplug,
            },
        })
    }

    /// A VM from the snapshot in `dir`, Paused (as Cloud Hypervisor leaves
    /// a restored VM): `resume` runs it on from where it was. With
    /// `prefault`, guest memory is read in up front rather than on first
    /// touch.
    ///
    /// `disks`: (disk id, image) pairs the VM uses instead of the images
    /// its config names, each the size the snapshot's was (a clone's own
    /// copy, say).
    pub fn restore(
        dir: &std::path::Path,
        options: VmOptions,
        prefault: bool,
        disks: &[(String, std::path::PathBuf)],
    ) -> Result<Arc<Vm>> {
        let snap = snapshot::read_dir(dir)?;
        let config_file = dir.join(snapshot::CONFIG_FILE).display().to_string();
        let mut config: VmConfig =
            vmkit_config::json::from_json(&snap.config).map_err(|e| VmError::SnapshotConfig {
                file: config_file.clone(),
                detail: e.to_string(),
            })?;
        for (id, image) in disks {
            let disk = config
                .disks
                .iter_mut()
                .flatten()
                .find(|d| d.id.as_deref() == Some(id.as_str()))
                .ok_or_else(|| VmError::SnapshotDisk {
                    id: id.clone(),
                    detail: "the snapshot's VM has no disk with this id".to_owned(),
                })?;
            let size = std::fs::metadata(image)
                .map_err(|e| VmError::SnapshotDisk {
                    id: id.clone(),
                    detail: format!("{}: {e}", image.display()),
                })?
                .len();
            if let Some(&was) = snap.header.disks.get(id) {
                if size != was {
                    return Err(VmError::SnapshotDisk {
                        id: id.clone(),
                        detail: format!(
                            "{} holds {size} bytes, the snapshot's image held {was}",
                            image.display()
                        ),
                    }
                    .into());
                }
            }
            disk.path = Some(image.display().to_string());
        }
        // The memory file is mapped as the config lays guest RAM out, the
        // DIMMs after it: a config asking for more than the file holds would
        // fault the VMM past its end.
        let hotplug = SavedHotplug::decode(&snap.state.platform.memory_hotplug)?;
        let dimms = hotplug
            .slots
            .iter()
            .filter(|slot| slot.active)
            .fold(0u64, |sum, slot| sum.saturating_add(slot.length));
        let size = crate::memory::saved_memory_size(&config.memory)
            .map_err(|e| VmError::SnapshotConfig {
                file: config_file.clone(),
                detail: e.message,
            })?
            .saturating_add(dimms);
        if size != snap.header.memory_size {
            return Err(VmError::SnapshotConfig {
                file: config_file,
                detail: format!(
                    "{size} bytes of guest memory, the snapshot's memory file holds {}",
                    snap.header.memory_size
                ),
            }
            .into());
        }
        let validated = config.validated().map_err(|e| VmError::SnapshotConfig {
            file: config_file,
            detail: e.to_string(),
        })?;
        let vm = Vm::new(validated, options)?;
        vm.set_device_id_counter(&snap.state);
        vm.start_restored(&snap, prefault)?;
        *vm.memory_now.lock().unwrap_or_else(|p| p.into_inner()) = hotplug.size;
        Ok(vm)
    }

    /// Cloud Hypervisor's automatic id counter as the saved VM left it, so
    /// that the next hot-plug is named as there.
    fn set_device_id_counter(&self, state: &SavedState) {
        let saved = state.platform.placement.device_id_counter;
        *self
            .device_id_counter
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = usize::try_from(saved).unwrap_or(usize::MAX);
    }

    fn start_restored(self: &Arc<Self>, snap: &snapshot::Snapshot, prefault: bool) -> Result<()> {
        let life = self.lock();
        let restore = Restore {
            memory: RestoredMemory::File {
                file: &snap.memory,
                prefault,
            },
            state: &snap.state,
            kernel_format: snap.header.kernel_format.as_deref(),
        };
        self.launch(life, Some(restore))
    }

    /// Moves the running (or paused) VM to the VMM listening on the unix
    /// socket `path` ([`Vm::receive_migration`]). Pre-copy: guest memory
    /// goes over while the VM runs, then the pages written meanwhile
    /// (KVM's dirty log and the VMM's own writes), round after round until
    /// few are left; then the vCPUs stop, the devices finish their IO, and
    /// the last pages and the state go. With `local`, the memory files are
    /// handed over instead (shared memory only). Once the receiver runs the
    /// VM, this one stops (`StopReason::Migrated`). On failure the VM runs
    /// on here as before, unless the receiver may already run it (the
    /// connection ended after the last step): then it stays paused.
    pub fn send_migration(&self, path: &std::path::Path, local: bool) -> Result<MigrationReport> {
        if has_vhost_user(&self.live_config()) {
            return Err(VmError::VhostUserMigration.into());
        }
        let started = Instant::now();
        let mut life = self.lock_settled();
        // Devices the guest ejected go first: they are not the VM's any more.
        if let Some(instance) = life.instance.as_mut() {
            let gone = instance.reap_ejected_devices();
            self.forget_vhost_links(&gone);
        }
        let Some(instance) = &life.instance else {
            return Err(VmError::NotRunning.into());
        };
        if !matches!(life.state, VmState::Running | VmState::Paused) {
            return Err(VmError::NotRunning.into());
        }
        if local && instance._ram.shared_files.is_none() {
            return Err(MigrationError::LocalNeedsSharedMemory.into());
        }
        if self.config().tpm.is_some() {
            return Err(VmError::TpmState { what: "migrated" }.into());
        }
        let stream =
            std::os::unix::net::UnixStream::connect(path).map_err(MigrationError::Connect)?;
        let mut wire = Wire { stream };
        let mut progress = SendProgress::default();
        // vm.resize waits for the lock this holds: the DIMMs stay as they are.
        let dimms = instance.devices.memory_hotplug().dimms();
        let sent = self.send_vm(&mut wire, &life, instance, &dimms, local, &mut progress);
        let report = match sent {
            Ok(mut report) => {
                report.total = started.elapsed();
                report
            }
            Err(error) => {
                // A connection that broke may be the receiver refusing: its
                // reason, if it sent one, is waiting to be read. An error of
                // this side's own is not the receiver's to explain.
                let broke = std::error::Error::source(&error)
                    .and_then(|e| e.downcast_ref::<MigrationError>())
                    .is_some_and(|e| matches!(e, MigrationError::Closed | MigrationError::Io(_)));
                let error = if broke {
                    wire.refusal().map_or(error, Into::into)
                } else {
                    error
                };
                // The receiver said no: it does not run the VM.
                let refused = std::error::Error::source(&error)
                    .and_then(|e| e.downcast_ref::<MigrationError>())
                    .is_some_and(|e| matches!(e, MigrationError::Refused(_)));
                if progress.dirty_logging {
                    let _ = migration::set_dirty_logging(
                        &instance.vm_fd,
                        &instance._ram,
                        &dimms,
                        false,
                    );
                }
                // The devices take their rings back (idle while the vCPUs
                // are parked) and the disks are locked again where they can be.
                if progress.disks_unlocked {
                    match self.lock_disk_images() {
                        Ok(locks) => *self.held_disk_locks() = locks,
                        Err(e) => log::warn!("the disks stay unlocked after the migration: {e}"),
                    }
                }
                if progress.devices_stopped {
                    instance.devices.resume_virtio_after_snapshot();
                }
                if progress.complete_sent && !refused {
                    // The receiver may run the VM: running it here too would
                    // split it in two. It stays paused for the user to decide.
                    if progress.parked {
                        self.set_state(&mut life, VmState::Paused);
                    }
                    return Err(MigrationError::Unconfirmed(error.message).into());
                }
                if progress.parked {
                    instance.control.set_command(VcpuCommand::Run);
                }
                return Err(error);
            }
        };
        if report.fds_adopted {
            instance.devices.handed_over();
        }
        instance.control.request_stop(StopReason::Migrated);
        instance.control.set_command(VcpuCommand::Run);
        drop(life);
        self.wait(None);
        Ok(report)
    }

    fn send_vm(
        &self,
        wire: &mut Wire,
        life: &Lifecycle,
        instance: &Instance,
        dimms: &[Dimm],
        local: bool,
        progress: &mut SendProgress,
    ) -> Result<MigrationReport> {
        let ram = &instance._ram;
        let vm_fd = &instance.vm_fd;
        let mut hello = migration::MAGIC.to_vec();
        hello.extend_from_slice(&migration::VERSION.to_le_bytes());
        hello.extend_from_slice(&u32::from(local).to_le_bytes());
        wire.send(Kind::Hello, &hello)?;
        let saved = self.saved_config(instance, "migrated")?;
        let config = serde_json::to_string(&saved).map_err(|e| VmError::MigrationConfig {
            detail: e.to_string(),
        })?;
        let message = ConfigMessage {
            config,
            memory_size: ram.total_size(),
            vcpus: usize::from(saved.cpus.boot_vcpus),
            kernel_format: life.kernel_format.map(|f| f.name().to_owned()),
            boot_id: migration::boot_id(),
        };
        let message = serde_json::to_vec(&message).map_err(|e| VmError::MigrationConfig {
            detail: e.to_string(),
        })?;
        wire.send(Kind::Config, &message)?;
        wire.wait_ack()?;
        send_taps(wire, instance)?;

        let mut report = MigrationReport {
            local,
            ..MigrationReport::default()
        };
        let mut buffer = vec![0u8; migration::PAGES_CHUNK];
        if let (true, Some(files)) = (local, &ram.shared_files) {
            wire.send_files(files)?;
        } else {
            migration::set_dirty_logging(vm_fd, ram, dimms, true)?;
            progress.dirty_logging = true;
            migration::reset_vmm_dirty(ram);
            report.bytes += send_all_memory(wire, ram, &saved_layout(instance), &mut buffer)?;
            report.rounds = 1;
            while report.rounds < MAX_PRECOPY_ROUNDS {
                check_running(instance)?;
                let sent = send_dirty(wire, vm_fd, ram, dimms, &mut buffer)?;
                report.bytes += sent;
                report.rounds += 1;
                if sent <= STOP_AND_COPY_BYTES {
                    break;
                }
            }
        }

        // Stop and copy.
        let stopped = Instant::now();
        if life.state == VmState::Running {
            instance.control.set_command(VcpuCommand::Park);
            progress.parked = true;
            instance.kick_all();
            if !instance.control.wait_parked(Duration::from_secs(10)) {
                return Err(VmError::PauseTimeout.into());
            }
        }
        // The guest may have powered off (or reset) meanwhile.
        check_running(instance)?;
        instance.devices.stop_virtio_for_snapshot();
        progress.devices_stopped = true;
        if !local {
            report.bytes += send_dirty(wire, vm_fd, ram, dimms, &mut buffer)?;
        }
        let state = self.capture_state(instance)?;
        // The receiver opens the disk images now; the devices here are idle.
        *self.held_disk_locks() = Vec::new();
        self.hot_disk_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        progress.disks_unlocked = true;
        wire.send(Kind::State, &state.encode())?;
        wire.wait_ack()?;
        progress.complete_sent = true;
        wire.send(Kind::Complete, &[])?;
        let flags = wire.wait_ack_flags()?;
        report.downtime = stopped.elapsed();
        report.fds_adopted = flags & migration::ACK_ADOPTED_FDS != 0;
        Ok(report)
    }

    /// Receives a VM from [`Vm::send_migration`]: listens on the unix
    /// socket `path` (removed once the sender connects), builds the VM as
    /// its config and state say, and runs it once the sender is done.
    /// Everything received is checked; on failure nothing is left behind
    /// and the sender is told why.
    pub fn receive_migration(path: &std::path::Path, options: VmOptions) -> Result<Arc<Vm>> {
        let listener =
            std::os::unix::net::UnixListener::bind(path).map_err(MigrationError::Bind)?;
        let accepted = listener.accept();
        drop(listener);
        let unlinked = std::fs::remove_file(path);
        let (stream, _) = accepted.map_err(MigrationError::Accept)?;
        unlinked.map_err(MigrationError::Unlink)?;
        let mut wire = Wire { stream };
        let received = Vm::receive_vm(&mut wire, options);
        if let Err(error) = &received {
            let _ = wire.ack(Err(&error.message));
        }
        received
    }

    /// Receives `TAP_FDS` and keeps the tap queues for the net devices to
    /// adopt. Every entry must name a net device of the config, once; where
    /// no descriptor arrived (a relay between hosts drops them) the devices
    /// open their taps by name, except those given as descriptors (`fd=`),
    /// which belong to the sending process and cannot follow.
    fn adopt_taps(&self, wire: &mut Wire) -> Result<()> {
        let protocol = |detail: String| MigrationError::Protocol(detail);
        let (payload, files) =
            wire.receive_with_fds(Kind::TapFds, migration::MAX_FILES_PER_FRAME)?;
        let listed: Vec<TapHandover> =
            serde_json::from_slice(&payload).map_err(|e| protocol(format!("the tap list: {e}")))?;
        let nets: Vec<&vmkit_config::NetConfig> = self.config().net.iter().flatten().collect();
        let vsock_id = self.config().vsock.as_ref().and_then(|v| v.id.clone());
        let mut seen = std::collections::HashSet::new();
        let mut announced = 0usize;
        for entry in &listed {
            if vsock_id.as_deref() == Some(entry.id.as_str()) {
                // The vsock device's listening socket.
                if entry.count != 1 {
                    return Err(protocol(format!(
                        "{} descriptors for the vsock device {}, 1 expected",
                        entry.count, entry.id
                    ))
                    .into());
                }
            } else if !nets
                .iter()
                .any(|n| n.id.as_deref() == Some(entry.id.as_str()))
            {
                return Err(protocol(format!("taps for {}, not a net device", entry.id)).into());
            }
            if !seen.insert(entry.id.as_str()) {
                return Err(protocol(format!("taps for {} twice", entry.id)).into());
            }
            announced = announced.saturating_add(entry.count);
        }
        let mut adopted = HashMap::new();
        if !files.is_empty() {
            if files.len() != announced {
                return Err(protocol(format!(
                    "{announced} tap queues announced, {} received",
                    files.len()
                ))
                .into());
            }
            let mut files = files.into_iter();
            for entry in &listed {
                let taps: Vec<std::fs::File> = files.by_ref().take(entry.count).collect();
                adopted.insert(entry.id.clone(), taps);
            }
        }
        for net in &nets {
            let id = net.id.as_deref().unwrap_or_default();
            let given_fds = net.fds.as_ref().filter(|fds| !fds.is_empty());
            if let (Some(fds), false) = (given_fds, adopted.contains_key(id)) {
                return Err(VmError::MigrationConfig {
                    detail: format!(
                        "net {id}: fd={fds:?} are the sending process's descriptors and did \
                         not come with the migration (they cannot cross hosts)"
                    ),
                }
                .into());
            }
        }
        *self.adopted_taps.lock().unwrap_or_else(|p| p.into_inner()) = adopted;
        Ok(())
    }

    fn receive_vm(wire: &mut Wire, options: VmOptions) -> Result<Arc<Vm>> {
        let protocol = |detail: String| MigrationError::Protocol(detail);
        let mut buffer = Vec::new();
        wire.expect(Kind::Hello, &mut buffer)?;
        let magic = migration::MAGIC.len();
        if buffer.len() != magic + 8 || buffer[..magic] != migration::MAGIC[..] {
            return Err(protocol("not a vmkit migration".to_owned()).into());
        }
        let word = |at: usize| {
            u32::from_le_bytes([buffer[at], buffer[at + 1], buffer[at + 2], buffer[at + 3]])
        };
        let version = word(magic);
        if version != migration::VERSION {
            return Err(protocol(format!(
                "protocol version {version}, this vmkit speaks version {}",
                migration::VERSION
            ))
            .into());
        }
        let local = word(magic + 4) == 1;
        wire.expect(Kind::Config, &mut buffer)?;
        let message: ConfigMessage = serde_json::from_slice(&buffer)
            .map_err(|e| protocol(format!("the config message: {e}")))?;
        let config: VmConfig = vmkit_config::json::from_json(&message.config).map_err(|e| {
            VmError::MigrationConfig {
                detail: e.to_string(),
            }
        })?;
        let size = crate::memory::boot_ram_size(&config.memory)?;
        if size != message.memory_size || message.vcpus != usize::from(config.cpus.boot_vcpus) {
            return Err(protocol(format!(
                "{} bytes of memory and {} vCPUs sent, the config has {size} and {}",
                message.memory_size, message.vcpus, config.cpus.boot_vcpus
            ))
            .into());
        }
        // Copying pages into the file the sender runs the guest in would
        // overwrite its memory with older contents while it runs.
        if !local && message.boot_id.is_some() && message.boot_id == migration::boot_id() {
            if let Some((backing, path)) = crate::memory::shared_file_backing(&config.memory) {
                return Err(MigrationError::SharedFileOnThisHost { backing, path }.into());
            }
        }
        let validated = config.validated().map_err(|e| VmError::MigrationConfig {
            detail: e.to_string(),
        })?;
        let vm = Vm::new(validated, options)?;
        let ram = if local {
            None
        } else {
            Some(create_guest_ram_to_fill(&vm.config().memory)?)
        };
        wire.ack(Ok(()))?;
        vm.adopt_taps(wire)?;
        let ram = match ram {
            Some(ram) => {
                loop {
                    match wire.receive(&mut buffer)? {
                        Kind::Pages => migration::store_pages(&ram, &buffer)?,
                        Kind::State => break,
                        other => {
                            return Err(
                                protocol(format!("a {other:?} frame among the pages")).into()
                            )
                        }
                    }
                }
                ram
            }
            None => {
                let files = wire.receive_files()?;
                let ram = map_guest_ram_from_shared_files(&vm.config().memory, files)?;
                wire.expect(Kind::State, &mut buffer)?;
                ram
            }
        };
        let state = SavedState::decode(&buffer).map_err(|e| protocol(e.to_string()))?;
        vm.set_device_id_counter(&state);
        let restore = Restore {
            memory: RestoredMemory::Ram(ram),
            state: &state,
            kernel_format: message.kernel_format.as_deref(),
        };
        let life = vm.lock();
        vm.launch(life, Some(restore))?;
        let hotplug = SavedHotplug::decode(&state.platform.memory_hotplug)?;
        *vm.memory_now.lock().unwrap_or_else(|p| p.into_inner()) = hotplug.size;
        wire.ack(Ok(()))?;
        wire.expect(Kind::Complete, &mut buffer)?;
        vm.resume()?;
        let adopted = !vm
            .adopted_taps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty();
        wire.ack_complete(if adopted {
            migration::ACK_ADOPTED_FDS
        } else {
            0
        })?;
        Ok(vm)
    }
}

/// Sends `TAP_FDS`: each net device's tap queues, which the receiver adopts
/// if it is on this host (it cannot attach taps this process holds). The
/// devices here go on using them until the stop-and-copy: the receiver
/// builds its devices only after that.
fn send_taps(wire: &mut Wire, instance: &Instance) -> Result<()> {
    let devices = instance.devices.handover_fds();
    let listed: Vec<TapHandover> = devices
        .iter()
        .map(|(id, fds)| TapHandover {
            id: id.clone(),
            count: fds.len(),
        })
        .collect();
    let mut fds: Vec<RawFd> = devices.into_iter().flat_map(|(_, fds)| fds).collect();
    if fds.len() > migration::MAX_FILES_PER_FRAME {
        // More queues than one message carries: the receiver opens the taps
        // by name, which works where it is on another host.
        log::warn!(
            "{} tap queues are more than a migration hands over; the receiver opens its taps",
            fds.len()
        );
        fds.clear();
    }
    let payload = serde_json::to_vec(&listed).map_err(|e| VmError::MigrationConfig {
        detail: e.to_string(),
    })?;
    wire.send_with_fds(Kind::TapFds, &payload, &fds)?;
    Ok(())
}

/// What a snapshot's memory file holds, or a migration sends, of the
/// paused VM: boot RAM, each DIMM, each virtio-mem region's plugged blocks.
fn saved_layout(instance: &Instance) -> snapshot::MemoryLayout {
    let dimms: Vec<(u64, u64)> = instance
        .devices
        .memory_hotplug()
        .dimms()
        .iter()
        .map(|d| (d.base, d.length))
        .collect();
    let unplugged = instance.devices.virtio_mem_unplugged();
    snapshot::MemoryLayout::new(&instance._ram, &dimms, unplugged)
}

/// Sends every page of guest memory in `layout` that may hold data (for
/// private anonymous memory, those the guest touched: the receiver's fresh
/// memory reads zeros elsewhere). Returns the bytes sent.
fn send_all_memory(
    wire: &mut Wire,
    ram: &GuestRam,
    layout: &snapshot::MemoryLayout,
    buffer: &mut [u8],
) -> Result<u64> {
    let mut sent = 0;
    let probe = snapshot::ZeroProbe::new(ram);
    for (base, size, _) in layout.pieces() {
        let mut done = 0u64;
        while done < size {
            let len = (size - done).min(buffer.len() as u64);
            if !probe.reads_zeros(ram, base + done, len) {
                sent += wire.send_pages(ram, buffer, base + done, len)?;
            }
            done += len;
        }
    }
    Ok(sent)
}

/// Fails once the boot is stopping (the guest powered off or reset, or a
/// vCPU failed): there is nothing left to move.
fn check_running(instance: &Instance) -> Result<()> {
    match instance.control.stop_reason() {
        Some(reason) => Err(MigrationError::VmStopped(reason.message()).into()),
        None => Ok(()),
    }
}

/// Sends the pages written since the last round. Returns the bytes sent.
fn send_dirty(
    wire: &mut Wire,
    vm_fd: &VmFd,
    ram: &GuestRam,
    dimms: &[Dimm],
    buffer: &mut [u8],
) -> Result<u64> {
    let mut sent = 0;
    for (addr, len) in migration::take_dirty(vm_fd, ram, dimms)? {
        sent += wire.send_pages(ram, buffer, addr, len)?;
    }
    Ok(sent)
}

impl Drop for Vm {
    fn drop(&mut self) {
        let life = self.life.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(instance) = life.instance.take() {
            instance.stop_and_release(StopReason::Shutdown);
        }
        for backend in self.serial.iter().chain(&self.console) {
            backend.close();
        }
    }
}

/// Reports the VM stopped if its VMM thread ends without having done so (a
/// panic), so that `shutdown` and `wait`, which wait for that, never hang.
struct StopReporter<'a> {
    vm: &'a Vm,
    reported: bool,
}

impl StopReporter<'_> {
    fn finish(&mut self, reason: StopReason) {
        self.vm.finish(reason);
        self.reported = true;
    }
}

impl Drop for StopReporter<'_> {
    fn drop(&mut self) {
        if self.reported {
            return;
        }
        let instance = self.vm.lock().instance.take();
        let reason = StopReason::VmmError {
            message: "The VMM thread ended unexpectedly".to_owned(),
        };
        if let Some(mut instance) = instance {
            instance.stop(reason.clone());
        }
        self.vm.finish(reason);
    }
}

/// Whether a backend process serves some of the VM's devices.
fn has_vhost_user(config: &VmConfig) -> bool {
    config.disks.iter().flatten().any(|d| d.vhost_user)
        || config.net.iter().flatten().any(|n| n.vhost_user)
        || config.fs.as_ref().is_some_and(|f| !f.is_empty())
}

/// Refuses what this VMM cannot provide yet, naming the option.
fn check_supported(config: &VmConfig) -> Result<()> {
    if config.console.mode == ConsoleOutputMode::Socket {
        return Err(VmError::ConsoleSocket.into());
    }
    check_memory_sizes(config)?;
    check_vhost_user_options(config)?;
    let platform = config.platform.as_ref();
    // v37 would build SMBIOS tables from these; vmkit has none to give.
    if platform
        .is_some_and(|p| p.serial_number.is_some() || p.uuid.is_some() || p.oem_strings.is_some())
    {
        return Err(VmError::Smbios.into());
    }
    fn some<T>(list: &Option<Vec<T>>) -> bool {
        list.as_ref().is_some_and(|l| !l.is_empty())
    }
    let requested = [
        (config.iommu, "--iommu"),
        (
            config.disks.iter().flatten().any(|d| d.iommu),
            "--disk iommu=on",
        ),
        (config.rng.iommu, "--rng iommu=on"),
        (
            config.console.iommu || config.serial.iommu,
            "--console/--serial iommu=on",
        ),
        (
            config
                .platform
                .as_ref()
                .is_some_and(|p| p.iommu_segments.as_ref().is_some_and(|s| !s.is_empty())),
            "--platform iommu_segments",
        ),
        (
            config.net.iter().flatten().any(|n| n.iommu),
            "--net iommu=on",
        ),
        (
            config.pmem.iter().flatten().any(|p| p.iommu),
            "--pmem iommu=on",
        ),
        (some(&config.devices), "--device (VFIO)"),
        (some(&config.user_devices), "--user-device (vfio-user)"),
        (some(&config.vdpa), "--vdpa"),
        (
            config.vsock.as_ref().is_some_and(|v| v.iommu),
            "--vsock iommu=on",
        ),
        (some(&config.sgx_epc), "--sgx-epc"),
        (
            // v37 puts SGX EPC sections in a node's SRAT; vmkit has none.
            config
                .numa
                .iter()
                .flatten()
                .any(|n| n.sgx_epc_sections.is_some()),
            "--numa sgx_epc_sections",
        ),
        (config.cpus.features.amx, "--cpus features=amx"),
    ];
    if let Some(&(_, what)) = requested.iter().find(|(asked, _)| *asked) {
        return Err(VmError::NotSupported { what }.into());
    }
    // v37 finds these at boot; refused here with the other checks.
    numa::nodes(config)?;
    Ok(())
}

/// Refuses the keys of built-in disks and nets that a vhost-user device
/// cannot apply (v37 drops them without a word): the backend reads the image
/// and owns the host side of the network.
fn check_vhost_user_options(config: &VmConfig) -> Result<()> {
    let refuse = |option: &'static str, key: &'static str, id: &Option<String>| {
        let id = id
            .as_ref()
            .map(|id| format!(" (id={id})"))
            .unwrap_or_default();
        Err(VmError::VhostUserOption { option, key, id }.into())
    };
    for disk in config.disks.iter().flatten().filter(|d| d.vhost_user) {
        let given = [
            (disk.readonly, "readonly=on"),
            (disk.direct, "direct=on"),
            (disk.serial.is_some(), "serial"),
            (
                disk.rate_limiter_config.is_some(),
                "bw_*/ops_* (rate limits)",
            ),
            (disk.rate_limit_group.is_some(), "rate_limit_group"),
            (disk.disable_io_uring, "_disable_io_uring=on"),
            (disk.disable_aio, "_disable_aio=on"),
        ];
        if let Some(&(_, key)) = given.iter().find(|(set, _)| *set) {
            return refuse("--disk", key, &disk.id);
        }
    }
    for net in config.net.iter().flatten().filter(|n| n.vhost_user) {
        let given = [
            (net.tap.is_some(), "tap"),
            (net.ip != vmkit_config::DEFAULT_NET_IP, "ip"),
            (net.mask != vmkit_config::DEFAULT_NET_MASK, "mask"),
            (net.host_mac.is_some(), "host_mac"),
            (net.fds.as_ref().is_some_and(|f| !f.is_empty()), "fd"),
            (
                net.rate_limiter_config.is_some(),
                "bw_*/ops_* (rate limits)",
            ),
        ];
        if let Some(&(_, key)) = given.iter().find(|(set, _)| *set) {
            return refuse("--net", key, &net.id);
        }
    }
    Ok(())
}

/// v37 maps RAM in whole pages; a size that is not a multiple of the page
/// size would otherwise fail later with KVM's bare EINVAL.
fn check_memory_sizes(config: &VmConfig) -> Result<()> {
    let memory = &config.memory;
    let main = (
        String::from("--memory size"),
        memory.size,
        memory.hugepage_size,
    );
    let zones = memory.zones.iter().flatten().map(|zone| {
        (
            format!("--memory-zone {} size", zone.id),
            zone.size,
            zone.hugepage_size,
        )
    });
    for (what, size, hugepage_size) in std::iter::once(main).chain(zones) {
        // A zero huge page size counts as none given.
        let page_size = hugepage_size
            .filter(|&s| s != 0)
            .unwrap_or(crate::layout::PAGE_SIZE);
        if size % page_size != 0 {
            return Err(VmError::MisalignedMemorySize {
                what,
                size,
                page_size,
            }
            .into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
