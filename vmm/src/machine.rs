//! A whole microVM: builds the VM, devices and vCPUs from a [`VmConfig`],
//! runs it, and tears it down when it stops.
//!
//! Threads: one per vCPU, one device thread (the virtio event loop), plus
//! the caller's thread, which waits for an [`ExitReason`] and then stops and
//! joins everything it started. Nothing the machine created outlives
//! [`Machine::run`].
//!
//! Device order (and so guest names and IRQs): drives (vda, vdb, ...),
//! then network cards, then vsock, then rng; each in its own 4 KiB virtio-mmio window from
//! [`VIRTIO_MMIO_BASE`] with IRQs from [`FIRST_VIRTIO_IRQ`], announced to
//! the guest with `virtio_mmio.device=` command-line entries.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VcpuFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::arch::x86_64::layout::BOOT_STACK_POINTER;
use crate::arch::x86_64::regs::{EntryMode, EntryPoint};
use crate::config::{SerialOutput, VmConfig};
use crate::devices::boot_timer::{BOOT_TIMER_PORT, BOOT_TIMER_PORT_COUNT, BootMark, BootTimer};
use crate::devices::bus::{Bus, BusError};
use crate::devices::i8042::{AUX_IRQ, I8042, I8042_PORT, I8042_PORT_COUNT, KEYBOARD_IRQ};
use crate::devices::serial::{
    BoundedWriter, COM1_IRQ, COM1_PORT, IrqLine, SerialDevice, UART_PORT_COUNT,
};
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::mmio::{
    MMIO_WINDOW_SIZE, MmioTransport, QUEUE_NOTIFY_OFFSET, TransportError,
};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::net::tap::{Tap, TapError};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::vsock::muxer::MuxerError;
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::event_loop::{EventLoop, EventLoopError};
use crate::lifecycle::{ExitReason, ExitSignal, LifecycleError};
use crate::loader::{self, LoaderError};
use crate::memory;
use crate::seccomp::{Filters, SeccompError, ThreadKind};
use crate::vcpu::{self, VcpuError, VcpuRunner};
use crate::vm::{Vm, VmError};

/// Guest-physical address of the first virtio-mmio window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Interrupt of the first virtio-mmio device; later ones count up.
pub const FIRST_VIRTIO_IRQ: u32 = 5;
/// Last usable interrupt (the in-kernel I/O APIC has 24 pins).
pub const LAST_VIRTIO_IRQ: u32 = 23;

/// What the bootstrap processor runs.
#[derive(Debug, Clone)]
pub enum BootSource {
    /// The kernel image named in the configuration.
    Kernel,
    /// Raw 64-bit code, copied to `address` and entered in long mode (for
    /// KVM tests with hand-written guests).
    Flat64 {
        /// The machine code.
        code: Vec<u8>,
        /// Guest-physical load and entry address.
        address: u64,
    },
}

/// Errors of machine construction and teardown.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// VM creation failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A device could not be placed on a bus.
    #[error("device placement: {0}")]
    Bus(#[from] BusError),
    /// The serial output could not be opened.
    #[error("serial output {path}: {source}")]
    SerialOutput {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An eventfd could not be created.
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    /// Kernel loading failed.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// Raw code could not be written to guest memory.
    #[error("cannot load code: {0}")]
    LoadCode(vm_memory::GuestMemoryError),
    /// vCPU setup failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A block device could not be opened.
    #[error("drives[{index}]: {source}")]
    Block {
        /// Position in the configuration.
        index: usize,
        /// The error.
        source: BlockError,
    },
    /// A virtio transport could not be built.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The device thread could not be set up.
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    /// A tap device could not be attached.
    #[error("net[{index}]: {source}")]
    Tap {
        /// Position in the configuration.
        index: usize,
        /// The error.
        source: TapError,
    },
    /// A network device's rate limiter could not be set up.
    #[error("net[{index}] rate limiter: {source}")]
    RateLimiter {
        /// Position in the configuration.
        index: usize,
        /// The error.
        source: crate::rate_limiter::RateLimiterError,
    },
    /// The vsock host socket could not be set up.
    #[error("vsock: {0}")]
    Vsock(MuxerError),
    /// More virtio devices than interrupt lines.
    #[error("too many virtio devices (at most {0})")]
    TooManyDevices(u32),
    /// A KVM ioeventfd could not be registered.
    #[error("KVM_IOEVENTFD failed: {0}")]
    IoEventFd(kvm_ioctls::Error),
    /// The exit channel failed.
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    /// A seccomp filter could not be built or installed.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// The test hooks' fault port could not be attached.
    #[cfg(any(test, feature = "test-hooks"))]
    #[error(transparent)]
    FaultPort(#[from] crate::test_hooks::FaultPortError),
}

/// A built, not yet running microVM.
pub struct Machine {
    vm: Vm,
    vcpus: Vec<VcpuFd>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitSignal>,
    serial: Arc<Mutex<SerialDevice>>,
    boot_marks: Arc<Mutex<Vec<BootMark>>>,
    event_loop: EventLoop,
}

/// Places virtio devices in consecutive MMIO windows with their own IRQs.
struct VirtioPlacer<'a> {
    vm: &'a Vm,
    mmio: &'a mut Bus,
    event_loop: &'a mut EventLoop,
    cmdline_entries: Vec<String>,
}

impl VirtioPlacer<'_> {
    fn add(&mut self, device: Box<dyn VirtioDevice>) -> Result<(), MachineError> {
        let slot = self.cmdline_entries.len() as u32;
        let irq = FIRST_VIRTIO_IRQ + slot;
        if irq > LAST_VIRTIO_IRQ {
            return Err(MachineError::TooManyDevices(
                LAST_VIRTIO_IRQ - FIRST_VIRTIO_IRQ + 1,
            ));
        }
        let base = VIRTIO_MMIO_BASE + u64::from(slot) * MMIO_WINDOW_SIZE;
        let irq_event = EventFd::new(EFD_NONBLOCK).map_err(MachineError::EventFd)?;
        self.vm.register_irqfd(&irq_event, irq)?;
        let registrar = self.event_loop.registrar();
        let device_type = device.device_type();
        let transport = MmioTransport::new(
            device,
            self.vm.memory().clone(),
            Arc::new(Interrupt::new(irq_event)),
            registrar.clone(),
        )?;
        for (index, event) in transport.queue_events().iter().enumerate() {
            self.vm
                .fd()
                .register_ioevent(
                    event,
                    &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                    index as u32,
                )
                .map_err(MachineError::IoEventFd)?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(transport.clone(), base, MMIO_WINDOW_SIZE)?;
        self.event_loop.set_handler(&registrar, transport);
        log::debug!("virtio device type {device_type} at {base:#x}, IRQ {irq}");
        self.cmdline_entries
            .push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
        Ok(())
    }
}

fn serial_sink(config: &VmConfig) -> Result<Box<dyn Write + Send>, MachineError> {
    Ok(match &config.serial.output {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::Null => Box::new(std::io::sink()),
        SerialOutput::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(path)
                .map_err(|source| MachineError::SerialOutput {
                    path: path.clone(),
                    source,
                })?,
        ),
    })
}

impl Machine {
    /// Builds the VM described by `config` (already validated), booting
    /// `boot`, reporting its end to `exit`.
    pub fn build(
        config: &VmConfig,
        boot: &BootSource,
        exit: Arc<ExitSignal>,
    ) -> Result<Self, MachineError> {
        let vm = Vm::new(config.memory_bytes())?;
        log::debug!("VM created: {} MiB", config.memory_mib);

        let mut pio = Bus::new();
        let irq = EventFd::new(EFD_NONBLOCK).map_err(MachineError::EventFd)?;
        vm.register_irqfd(&irq, COM1_IRQ)?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            irq,
            BoundedWriter::new(serial_sink(config)?, config.serial.max_bytes),
        )));
        pio.insert(serial.clone(), COM1_PORT, UART_PORT_COUNT)?;
        let keyboard_irq = EventFd::new(EFD_NONBLOCK).map_err(MachineError::EventFd)?;
        vm.register_irqfd(&keyboard_irq, KEYBOARD_IRQ)?;
        let aux_irq = EventFd::new(EFD_NONBLOCK).map_err(MachineError::EventFd)?;
        vm.register_irqfd(&aux_irq, AUX_IRQ)?;
        pio.insert(
            Arc::new(Mutex::new(I8042::new(
                exit.clone(),
                Some(IrqLine(keyboard_irq)),
                Some(IrqLine(aux_irq)),
            ))),
            I8042_PORT,
            I8042_PORT_COUNT,
        )?;
        let timer = BootTimer::new();
        let boot_marks = timer.marks();
        if config.boot_timer {
            pio.insert(
                Arc::new(Mutex::new(timer)),
                BOOT_TIMER_PORT,
                BOOT_TIMER_PORT_COUNT,
            )?;
        }
        let mut mmio = Bus::new();
        let mut event_loop = EventLoop::new()?;
        #[cfg(any(test, feature = "test-hooks"))]
        crate::test_hooks::attach_fault_port(&mut pio, &mut event_loop)?;
        let mut placer = VirtioPlacer {
            vm: &vm,
            mmio: &mut mmio,
            event_loop: &mut event_loop,
            cmdline_entries: Vec::new(),
        };
        for (index, drive) in config.drives.iter().enumerate() {
            let id = format!("kindling-vd{}", (b'a' + index as u8) as char);
            let block = Block::open(&drive.path, drive.read_only, &id)
                .map_err(|source| MachineError::Block { index, source })?;
            placer.add(Box::new(block))?;
        }
        for (index, net) in config.net.iter().enumerate() {
            let tap = match net.tap_fd {
                Some(fd) => Tap::from_fd(fd),
                None => Tap::open(&net.tap),
            }
            .map_err(|source| MachineError::Tap { index, source })?;
            let device = Net::new(Box::new(tap), net.mac)
                .with_limits(net.rx_limit, net.tx_limit)
                .map_err(|source| MachineError::RateLimiter { index, source })?;
            placer.add(Box::new(device))?;
        }
        if let Some(vsock) = &config.vsock {
            let device = Vsock::new(u64::from(vsock.guest_cid), &vsock.uds_path)
                .map_err(MachineError::Vsock)?;
            placer.add(Box::new(device))?;
        }
        if config.rng {
            placer.add(Box::new(Rng::new()))?;
        }
        let cmdline_entries = placer.cmdline_entries;

        let entry = match boot {
            BootSource::Kernel => {
                let kernel = loader::load_kernel(vm.memory(), &config.kernel)?;
                log::info!(
                    "kernel {:?} loaded, entry {:#x} ({:?})",
                    kernel.format,
                    kernel.entry.address.0,
                    kernel.entry.mode
                );
                let cmdline = loader::build_cmdline(&config.cmdline, &cmdline_entries)?;
                loader::write_boot_info(vm.memory(), &kernel, &cmdline, config.vcpus)?;
                kernel.entry
            }
            BootSource::Flat64 { code, address } => {
                vm.memory()
                    .write_slice(code, GuestAddress(*address))
                    .map_err(MachineError::LoadCode)?;
                EntryPoint {
                    address: GuestAddress(*address),
                    mode: EntryMode::Long64,
                    stack_pointer: BOOT_STACK_POINTER,
                    boot_info: GuestAddress(0),
                }
            }
        };

        let vcpus = (0..config.vcpus)
            .map(|index| vcpu::create_vcpu(&vm, index, config.vcpus, &entry))
            .collect::<Result<Vec<_>, _>>()?;
        log::debug!("{} vCPUs configured", vcpus.len());

        Ok(Self {
            vm,
            vcpus,
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            exit,
            serial,
            boot_marks,
            event_loop,
        })
    }

    /// The VM (for inspection in tests).
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Boot-timer marks recorded so far.
    pub fn boot_marks(&self) -> Arc<Mutex<Vec<BootMark>>> {
        Arc::clone(&self.boot_marks)
    }

    /// Runs the VM until it stops, then stops and joins every thread.
    /// No seccomp filters (library and KVM tests); the `vmm` command uses
    /// [`Machine::run_with_seccomp`].
    pub fn run(self) -> Result<ExitReason, MachineError> {
        self.run_with_seccomp(None)
    }

    /// Runs the VM like [`Machine::run`]; with `filters`, every thread
    /// installs its seccomp filter: the device thread before its first
    /// event, each vCPU before its first `KVM_RUN`, this thread once all
    /// others run. A thread that cannot install its filter fails the start.
    pub fn run_with_seccomp(self, filters: Option<&Filters>) -> Result<ExitReason, MachineError> {
        vcpu::install_kick_handler()?;
        let devices = self.event_loop.spawn(filters.cloned(), self.exit.clone())?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::with_capacity(self.vcpus.len());
        for (index, fd) in self.vcpus.into_iter().enumerate() {
            let runner = VcpuRunner::new(
                index as u8,
                fd,
                self.pio.clone(),
                self.mmio.clone(),
                self.exit.clone(),
                stop.clone(),
            );
            match runner.spawn(filters.cloned()) {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    vcpu::stop_vcpus(&stop, threads);
                    devices.stop();
                    return Err(e.into());
                }
            }
        }
        if let Some(filters) = filters
            && let Err(e) = filters.install(ThreadKind::Main)
        {
            vcpu::stop_vcpus(&stop, threads);
            devices.stop();
            return Err(e.into());
        }
        let reason = self.exit.wait();
        match memory::overhead_rss_kib(self.vm.memory()) {
            Ok(kib) => log::info!("VMM memory overhead (RSS outside guest RAM): {kib} KiB"),
            Err(e) => log::debug!("cannot measure RSS: {e}"),
        }
        vcpu::stop_vcpus(&stop, threads);
        devices.stop();
        let serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let out = serial.output();
        log::debug!(
            "serial: {} bytes written, {} dropped over the bound",
            out.written(),
            out.dropped()
        );
        if out.dropped() > 0 {
            log::warn!(
                "serial: {} bytes of guest output dropped (bound reached)",
                out.dropped()
            );
        }
        Ok(reason?)
    }
}

#[cfg(test)]
mod tests {
    //! KVM tests (tiny guests) of how a failing thread ends the machine;
    //! skipped without /dev/kvm. The faults come from the test hooks'
    //! fault port, as in the `vmm-test-hooks` binary.

    use std::path::Path;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::test_hooks::{DEVICE_ERROR_MARK, DEVICE_PANIC_MARK, FAULT_PORT, VCPU_PANIC_MARK};

    /// mov dx, FAULT_PORT; mov al, `mark`; out dx, al; jmp $
    fn fault_guest(mark: u8) -> BootSource {
        let port = (FAULT_PORT as u16).to_le_bytes();
        BootSource::Flat64 {
            code: vec![0x66, 0xba, port[0], port[1], 0xb0, mark, 0xee, 0xeb, 0xfe],
            address: 0x1000,
        }
    }

    /// Runs a 2-vCPU machine whose BSP writes `mark` to the fault port;
    /// returns its exit reason and how long the run took.
    fn run_with_fault(mark: u8) -> Option<(ExitReason, Duration)> {
        if !Path::new("/dev/kvm").exists() {
            println!("SKIPPED: /dev/kvm is absent");
            return None;
        }
        let mut config = VmConfig::with_kernel("/unused");
        config.vcpus = 2;
        config.memory_mib = 16;
        config.serial.output = SerialOutput::Null;
        let exit = ExitSignal::new().unwrap();
        let machine = Machine::build(&config, &fault_guest(mark), exit.clone()).unwrap();
        // A machine that hangs (the failed thread ended silently) is ended
        // by this watchdog, with a reason the assertions reject.
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(10));
            exit.request(ExitReason::DeviceError {
                device: "watchdog".into(),
                message: "nothing stopped the machine within 10 s".into(),
            });
        });
        let started = Instant::now();
        let reason = machine.run().unwrap();
        Some((reason, started.elapsed()))
    }

    fn assert_thread_ended(mark: u8, thread: &str, message: &str) {
        let Some((reason, took)) = run_with_fault(mark) else {
            return;
        };
        match &reason {
            ExitReason::ThreadEnded {
                thread: t,
                message: m,
            } => {
                assert_eq!(t, thread, "{reason}");
                assert!(m.contains(message), "{reason}");
            }
            other => panic!("unexpected reason {other:?}"),
        }
        assert_ne!(reason.exit_code(), 0);
        // Every vCPU (one spinning, one waiting for a SIPI) was kicked out
        // and joined: `run` returned, and promptly.
        assert!(took < Duration::from_secs(10), "took {took:?}");
    }

    #[test]
    fn a_device_thread_error_stops_the_machine_with_its_reason() {
        assert_thread_ended(DEVICE_ERROR_MARK, "devices", "device failure requested");
    }

    #[test]
    fn a_device_thread_panic_stops_the_machine() {
        assert_thread_ended(DEVICE_PANIC_MARK, "devices", "panicked");
    }

    #[test]
    fn a_vcpu_thread_panic_stops_the_machine() {
        assert_thread_ended(VCPU_PANIC_MARK, "vcpu0", "panicked");
    }
}
