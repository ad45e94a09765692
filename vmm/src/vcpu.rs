//! vCPUs: their initial state, and the thread that runs each one.
//!
//! Every vCPU gets its own CPUID (APIC id = index), the boot MSRs, the FPU
//! control words and LINT0/LINT1 wiring. Only the bootstrap processor (index
//! 0) gets the kernel entry state; the others wait in KVM for the INIT/SIPI
//! the guest sends through its local APIC.
//!
//! Stopping: the run loop checks a shared stop flag before each `KVM_RUN`.
//! To interrupt a `KVM_RUN` in progress, the stopper sends the thread a
//! real-time signal whose handler does nothing; `KVM_RUN` then returns
//! `EINTR`. The stopper repeats the kick until the thread has finished, so a
//! kick landing just before `KVM_RUN` cannot be lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::arch::x86_64::cpuid::{CpuidError, vcpu_cpuid};
use crate::arch::x86_64::lapic::{LapicError, setup_lint};
use crate::arch::x86_64::msr::{MsrError, setup_msrs};
use crate::arch::x86_64::regs::{EntryPoint, RegsError, setup_fpu, setup_regs, setup_sregs};
use crate::devices::bus::Bus;
use crate::lifecycle::{ExitReason, ExitSignal, ThreadExitGuard};
use crate::logger::since_start;
use crate::seccomp::{Filters, SeccompError, ThreadKind};
use crate::vm::Vm;

/// Errors of vCPU creation and control.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// `KVM_CREATE_VCPU` failed.
    #[error("vCPU {index}: KVM_CREATE_VCPU failed: {source}")]
    Create {
        /// The vCPU index.
        index: u8,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// Building the CPUID failed.
    #[error("vCPU {0}: {1}")]
    Cpuid(u8, CpuidError),
    /// `KVM_SET_CPUID2` failed.
    #[error("vCPU {index}: KVM_SET_CPUID2 failed: {source}")]
    SetCpuid {
        /// The vCPU index.
        index: u8,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// MSR setup failed.
    #[error("vCPU {0}: {1}")]
    Msrs(u8, MsrError),
    /// Register setup failed.
    #[error("vCPU {0}: {1}")]
    Regs(u8, RegsError),
    /// LAPIC setup failed.
    #[error("vCPU {0}: {1}")]
    Lapic(u8, LapicError),
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    KickHandler(vmm_sys_util::errno::Error),
    /// The vCPU thread could not be started.
    #[error("vCPU {0}: cannot spawn thread: {1}")]
    Spawn(u8, std::io::Error),
    /// The vCPU thread could not install its seccomp filter.
    #[error("vCPU {0}: {1}")]
    Seccomp(u8, SeccompError),
}

/// Creates and configures vCPU `index` of `count`. The BSP (index 0) is
/// given `entry`.
pub fn create_vcpu(vm: &Vm, index: u8, count: u8, entry: &EntryPoint) -> Result<VcpuFd, VcpuError> {
    let fd = vm
        .fd()
        .create_vcpu(u64::from(index))
        .map_err(|source| VcpuError::Create { index, source })?;
    let cpuid = vcpu_cpuid(vm.supported_cpuid(), index, count, vm.tsc_deadline())
        .map_err(|e| VcpuError::Cpuid(index, e))?;
    fd.set_cpuid2(&cpuid)
        .map_err(|source| VcpuError::SetCpuid { index, source })?;
    setup_msrs(&fd).map_err(|e| VcpuError::Msrs(index, e))?;
    setup_fpu(&fd).map_err(|e| VcpuError::Regs(index, e))?;
    setup_lint(&fd).map_err(|e| VcpuError::Lapic(index, e))?;
    if index == 0 {
        setup_sregs(vm.memory(), &fd, entry.mode).map_err(|e| VcpuError::Regs(index, e))?;
        setup_regs(&fd, entry).map_err(|e| VcpuError::Regs(index, e))?;
    }
    Ok(fd)
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the (empty) kick handler. Idempotent.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), on_kick).map_err(VcpuError::KickHandler)
}

/// What a vCPU thread needs to run.
pub struct VcpuRunner {
    index: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitSignal>,
    stop: Arc<AtomicBool>,
}

impl VcpuRunner {
    /// Bundles a configured vCPU with the buses and lifecycle handles.
    pub fn new(
        index: u8,
        fd: VcpuFd,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exit: Arc<ExitSignal>,
        stop: Arc<AtomicBool>,
    ) -> Self {
        Self {
            index,
            fd,
            pio,
            mmio,
            exit,
            stop,
        }
    }

    /// Starts the vCPU on its own thread. With `filters`, the thread
    /// installs its seccomp filter before its first `KVM_RUN`; this returns
    /// only once that is done (or failed).
    pub fn spawn(self, filters: Option<Filters>) -> Result<JoinHandle<()>, VcpuError> {
        let index = self.index;
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .stack_size(crate::memory::THREAD_STACK_SIZE)
            .spawn(move || {
                let installed = filters.map_or(Ok(()), |f| f.install(ThreadKind::Vcpu));
                let ok = installed.is_ok();
                let _ = ready_tx.send(installed);
                if ok {
                    // `run` returns when told to stop or after recording
                    // why the VM stops; only an unwinding panic (library
                    // builds: the `vmm` binary ends the process on any
                    // panic) leaves the guard armed.
                    let guard = ThreadExitGuard::new(self.exit.clone(), format!("vcpu{index}"));
                    self.run();
                    guard.stopped();
                }
            })
            .map_err(|e| VcpuError::Spawn(index, e))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(thread),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(VcpuError::Seccomp(index, e))
            }
            Err(_) => {
                let _ = thread.join();
                Err(VcpuError::Spawn(
                    index,
                    std::io::Error::other("the vCPU thread ended before it started"),
                ))
            }
        }
    }

    fn run(mut self) {
        let mut first = true;
        while !self.stop.load(Ordering::Acquire) {
            if first && self.index == 0 {
                log::info!("vCPU 0: first KVM_RUN");
            }
            first = false;
            if let Some(reason) = self.run_once() {
                self.exit.request(reason);
                return;
            }
        }
    }

    /// Runs until the next exit; returns a reason when the VM must stop.
    fn run_once(&mut self) -> Option<ExitReason> {
        let index = self.index;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !self.pio.read(u64::from(port), data) {
                    data.fill(0);
                }
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                self.pio.write(u64::from(port), data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !self.mmio.read(addr, data) {
                    crate::limited_log!(
                        kind = "reads of unassigned MMIO",
                        log::Level::Debug,
                        "vCPU {index}: read of unassigned MMIO {addr:#x}"
                    );
                    data.fill(0);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !self.mmio.write(addr, data) {
                    crate::limited_log!(
                        kind = "writes to unassigned MMIO",
                        log::Level::Debug,
                        "vCPU {index}: write to unassigned MMIO {addr:#x}"
                    );
                }
                None
            }
            Ok(VcpuExit::Shutdown) => Some(ExitReason::TripleFault { vcpu: index }),
            Ok(VcpuExit::FailEntry(reason, _cpu)) => Some(ExitReason::FailEntry {
                vcpu: index,
                reason,
            }),
            Ok(VcpuExit::InternalError) => {
                let run = self.fd.get_kvm_run();
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, for
                // which KVM fills the `internal` member of the union.
                let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                let rip = self.fd.get_regs().map_or(0, |regs| regs.rip);
                Some(ExitReason::InternalError {
                    vcpu: index,
                    suberror,
                    rip,
                })
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Some(ExitReason::GuestPowerOff),
                KVM_SYSTEM_EVENT_RESET => Some(ExitReason::GuestReset),
                KVM_SYSTEM_EVENT_CRASH => Some(ExitReason::VcpuError {
                    vcpu: index,
                    message: "guest reported a crash".into(),
                }),
                other => Some(ExitReason::VcpuError {
                    vcpu: index,
                    message: format!("unexpected system event {other}"),
                }),
            },
            Ok(VcpuExit::Hlt) => Some(ExitReason::VcpuError {
                vcpu: index,
                message: "HLT exit with an in-kernel irqchip".into(),
            }),
            Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => None,
            Ok(other) => Some(ExitReason::VcpuError {
                vcpu: index,
                message: format!("unexpected exit {other:?}"),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(ExitReason::VcpuError {
                vcpu: index,
                message: format!("KVM_RUN failed: {e}"),
            }),
        }
    }
}

/// Stops and joins vCPU threads: sets `stop`, then kicks each thread until
/// it has left `KVM_RUN`.
pub fn stop_vcpus(stop: &AtomicBool, threads: Vec<JoinHandle<()>>) {
    stop.store(true, Ordering::Release);
    for thread in threads {
        while !thread.is_finished() {
            // ESRCH (thread just exited) is harmless: the loop re-checks.
            let _ = thread.kill(kick_signal());
            std::thread::sleep(Duration::from_micros(200));
        }
        // A panic was reported by the thread's exit guard already.
        let _ = thread.join();
    }
    log::debug!("all vCPUs stopped at {:?}", since_start());
}
