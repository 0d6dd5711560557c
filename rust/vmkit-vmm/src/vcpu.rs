//! vCPU threads: `KVM_RUN`, dispatch of port and MMIO exits to the buses,
//! and the exits that end the VM. A real-time signal whose handler sets
//! `immediate_exit` takes a vCPU out of `KVM_RUN` for pause, stop and
//! watchdog samples without ever losing a kick.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Once};
use std::time::Instant;

use kvm_bindings::{KVM_MP_STATE_HALTED, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::control::{Control, StopReason};
use crate::devices::Bus;
use crate::snapshot::vcpu::VcpuState;
use crate::snapshot::SnapshotError;

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick signal handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    IMMEDIATE_EXIT.with(|flag| {
        let flag = flag.get();
        if !flag.is_null() {
            // SAFETY: the pointer is this thread's mapped kvm_run, set while
            // the vCPU fd is alive and cleared before it is dropped.
            unsafe { std::ptr::write_volatile(flag, 1) };
        }
    });
}

/// The signal that kicks vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

static REGISTER_KICK: Once = Once::new();

/// Installs the kick handler (once per process).
pub fn register_kick_handler() -> std::result::Result<(), String> {
    let mut result = Ok(());
    REGISTER_KICK.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), kick_handler) {
            result = Err(format!("cannot install the vCPU kick signal handler: {e}"));
        }
    });
    result
}

/// Interrupts `thread`'s `KVM_RUN` (or its next one).
pub fn kick(thread: libc::pthread_t) {
    // SAFETY: the thread is alive or finished but not yet joined, so its
    // handle is valid; the signal has a handler installed.
    unsafe { libc::pthread_kill(thread, kick_signal()) };
}

/// What the watchdog last saw of one vCPU.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub rip: u64,
    /// All general-purpose registers folded together: a `rep movs` or a
    /// counting loop at one RIP is still progress.
    pub registers: u64,
    pub interrupts_enabled: bool,
    pub halted: bool,
    /// Not yet started by INIT/SIPI: cannot run by itself.
    pub waiting_for_sipi: bool,
    /// Since when rip, flags and run state have not changed.
    pub unchanged_since: Instant,
    pub sampled: bool,
}

impl Default for Sample {
    fn default() -> Self {
        Sample {
            rip: 0,
            registers: 0,
            interrupts_enabled: true,
            halted: false,
            waiting_for_sipi: false,
            unchanged_since: Instant::now(),
            sampled: false,
        }
    }
}

impl Sample {
    /// This vCPU cannot make progress on its own.
    pub fn stuck(&self) -> bool {
        self.sampled && (self.waiting_for_sipi || !self.interrupts_enabled)
    }
}

pub struct VcpuThreadContext {
    pub index: u8,
    pub control: Arc<Control>,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub sample: Arc<Mutex<Sample>>,
    pub host_cpus: Option<Vec<usize>>,
    /// Where the vCPU goes when the guest ejects it: KVM cannot destroy a
    /// vCPU, so a later hot-add runs the same one again (as Cloud
    /// Hypervisor reuses its inactive vCPUs).
    pub ejected: Arc<Mutex<BTreeMap<u8, VcpuFd>>>,
}

fn set_affinity(cpus: &[usize]) -> std::result::Result<(), String> {
    // SAFETY: cpu_set_t is plain data; CPU_SET bounds-checks against its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            if cpu >= libc::CPU_SETSIZE as usize {
                return Err(format!("host CPU {cpu} is out of range"));
            }
            libc::CPU_SET(cpu, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(format!(
                "cannot pin to host CPUs {cpus:?}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

fn unblock_kick_signal() {
    // SAFETY: manipulating this thread's signal mask with a valid set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, kick_signal());
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

/// Describes an emulation failure: RIP, CPL, control registers and the
/// instruction bytes KVM reported.
fn internal_error_message(vcpu: &mut VcpuFd, index: u8) -> String {
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
    // active union member.
    let internal = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal };
    let ndata = (internal.ndata as usize).min(internal.data.len());
    let data = &internal.data[..ndata];
    let mut bytes = Vec::new();
    // Emulation failures (suberror 1) may carry: flags (bit 0 = bytes valid),
    // then a byte count and the instruction bytes packed little-endian.
    if internal.suberror == 1 && data.len() >= 2 && data[0] & 1 == 1 {
        let raw: Vec<u8> = data[1..].iter().flat_map(|w| w.to_le_bytes()).collect();
        let count = usize::from(raw[0]).min(raw.len() - 1);
        bytes = raw[1..1 + count].to_vec();
    }
    let regs = vcpu.get_regs().ok();
    let sregs = vcpu.get_sregs().ok();
    let mut message = format!(
        "vCPU {index}: KVM could not run the guest (KVM_EXIT_INTERNAL_ERROR, suberror {}{})",
        internal.suberror,
        if internal.suberror == 1 {
            ": instruction emulation failed"
        } else {
            ""
        }
    );
    if let Some(regs) = regs {
        message.push_str(&format!(" at RIP {:#x}", regs.rip));
    }
    if let Some(s) = sregs {
        message.push_str(&format!(
            " (CPL {}, CR0 {:#x}, CR4 {:#x}, EFER {:#x})",
            s.cs.dpl, s.cr0, s.cr4, s.efer
        ));
    }
    if !bytes.is_empty() {
        let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
        message.push_str(&format!("; instruction bytes: {}", hex.join(" ")));
    }
    if !data.is_empty() && bytes.is_empty() {
        let words: Vec<String> = data.iter().map(|w| format!("{w:#x}")).collect();
        message.push_str(&format!("; data: [{}]", words.join(", ")));
    }
    message
}

fn take_sample(vcpu: &VcpuFd, sample: &Mutex<Sample>) {
    let Ok(regs) = vcpu.get_regs() else {
        return;
    };
    let mp_state = vcpu
        .get_mp_state()
        .map(|m| m.mp_state)
        .unwrap_or(KVM_MP_STATE_RUNNABLE);
    let now = Instant::now();
    let mut s = sample.lock().unwrap_or_else(|p| p.into_inner());
    let interrupts_enabled = regs.rflags & (1 << 9) != 0;
    let halted = mp_state == KVM_MP_STATE_HALTED;
    let waiting_for_sipi = mp_state != KVM_MP_STATE_RUNNABLE && !halted;
    let registers = [
        regs.rax, regs.rbx, regs.rcx, regs.rdx, regs.rsi, regs.rdi, regs.rsp, regs.rbp, regs.r8,
        regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
    ]
    .iter()
    .fold(0u64, |acc, r| acc.rotate_left(7) ^ r);
    let changed = !s.sampled
        || s.rip != regs.rip
        || s.registers != registers
        || s.interrupts_enabled != interrupts_enabled
        || s.halted != halted
        || s.waiting_for_sipi != waiting_for_sipi;
    if changed {
        s.unchanged_since = now;
    }
    s.rip = regs.rip;
    s.registers = registers;
    s.interrupts_enabled = interrupts_enabled;
    s.halted = halted;
    s.waiting_for_sipi = waiting_for_sipi;
    s.sampled = true;
}

/// Tells the boot this vCPU thread is done however it ends: a panic that
/// skipped it would leave the VMM waiting for the thread forever.
struct ExitGuard<'a> {
    control: &'a Control,
    index: u8,
}

impl Drop for ExitGuard<'_> {
    fn drop(&mut self) {
        IMMEDIATE_EXIT.with(|f| f.set(std::ptr::null_mut()));
        if std::thread::panicking() {
            self.control.request_stop(StopReason::VmmError {
                message: format!("vCPU {}: the VMM failed (panic)", self.index),
            });
        }
        self.control.thread_exited(self.index);
    }
}

/// This parked vCPU's state for a snapshot. A KVM_RUN with `immediate_exit`
/// first lets KVM finish what the last exit left pending (the value of a
/// port or MMIO read goes into the guest's register on the next entry), so
/// the state holds it.
fn capture_state(
    vcpu: &mut VcpuFd,
    msr_list: &[u32],
    xsave: bool,
) -> std::result::Result<VcpuState, SnapshotError> {
    vcpu.set_kvm_immediate_exit(1);
    let completed = vcpu.run().map(|_| ());
    vcpu.set_kvm_immediate_exit(0);
    match completed {
        Err(e) if e.errno() == libc::EINTR => {}
        Err(source) => {
            return Err(SnapshotError::Kvm {
                what: "KVM_RUN (completing the last exit)",
                source,
            })
        }
        // An exit KVM had queued came back: its handling is still due, but
        // the vCPU stays parked; the state is still the guest's.
        Ok(()) => {}
    }
    let msrs = crate::snapshot::vcpu::saved_msr_indices(vcpu, msr_list)?;
    VcpuState::capture(vcpu, &msrs, xsave)
}

/// The body of a vCPU thread: runs until told to stop or the VM stops.
pub fn run_vcpu(mut vcpu: VcpuFd, ctx: VcpuThreadContext) {
    let _exit = ExitGuard {
        control: &ctx.control,
        index: ctx.index,
    };
    unblock_kick_signal();
    if let Some(cpus) = &ctx.host_cpus {
        if let Err(e) = set_affinity(cpus) {
            ctx.control.request_stop(StopReason::VmmError {
                message: format!("vCPU {}: {e}", ctx.index),
            });
        }
    }
    let flag: *mut u8 = &mut vcpu.get_kvm_run().immediate_exit;
    IMMEDIATE_EXIT.with(|f| f.set(flag));
    let index = ctx.index;
    // The filter's installation and the set-up above ran deeper than the loop.
    crate::stack::release_unused_stack();
    while ctx.control.vcpu_gate(index, &mut |msr_list, xsave| {
        capture_state(&mut vcpu, msr_list, xsave)
    }) {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                ctx.pio.write(u64::from(port), data);
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                ctx.pio.read(u64::from(port), data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                ctx.mmio.read(addr, data);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                ctx.mmio.write(addr, data);
            }
            Ok(VcpuExit::Hlt) => {}
            // The EOI of a level-triggered IOAPIC vector: the pins' sources
            // are edge sources, so there is no remote IRR to clear
            // (devices::ioapic).
            Ok(VcpuExit::IoapicEoi(_)) => {}
            Ok(VcpuExit::Shutdown) => {
                ctx.control
                    .request_stop(StopReason::TripleFault { vcpu: index });
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                let reason = match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => StopReason::PowerOff,
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => StopReason::Reset,
                    other => StopReason::InternalError {
                        vcpu: index,
                        message: format!("vCPU {index}: KVM system event {other} (guest crash)"),
                    },
                };
                ctx.control.request_stop(reason);
            }
            Ok(VcpuExit::InternalError) => {
                let message = internal_error_message(&mut vcpu, index);
                ctx.control.request_stop(StopReason::InternalError {
                    vcpu: index,
                    message,
                });
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                ctx.control.request_stop(StopReason::InternalError {
                    vcpu: index,
                    message: format!(
                        "vCPU {index}: KVM could not enter the guest (hardware reason {reason:#x}, host CPU {cpu})"
                    ),
                });
            }
            Ok(other) => {
                ctx.control.request_stop(StopReason::InternalError {
                    vcpu: index,
                    message: format!("vCPU {index}: unexpected KVM exit {other:?}"),
                });
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                take_sample(&vcpu, &ctx.sample);
            }
            Err(e) => {
                ctx.control.request_stop(StopReason::VmmError {
                    message: format!("vCPU {index}: KVM_RUN failed: {e}"),
                });
            }
        }
    }
    IMMEDIATE_EXIT.with(|f| f.set(std::ptr::null_mut()));
    if ctx.control.vcpu_removed(index) {
        ctx.ejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(index, vcpu);
    } else {
        drop(vcpu);
    }
}
