//! The virtio-mmio transport, version 2 (virtio 1.2 section 4.2.2).
//!
//! Register map (32-bit accesses; config space at 0x100 any width):
//!
//! ```text
//! 0x000 MagicValue "virt"   0x004 Version (2)      0x008 DeviceID
//! 0x00c VendorID            0x010 DeviceFeatures   0x014 DeviceFeaturesSel
//! 0x020 DriverFeatures      0x024 DriverFeaturesSel
//! 0x030 QueueSel            0x034 QueueNumMax      0x038 QueueNum
//! 0x044 QueueReady          0x050 QueueNotify
//! 0x060 InterruptStatus     0x064 InterruptACK     0x070 Status
//! 0x080/0x084 QueueDesc     0x090/0x094 QueueDriver  0x0a0/0x0a4 QueueDevice
//! 0x0fc ConfigGeneration    0x100.. device config
//! ```
//!
//! Queue notifications normally never reach this code: the machine
//! registers each queue's eventfd as a KVM ioeventfd on QueueNotify with
//! the queue index as datamatch, and the device thread handles it. A write
//! that does arrive here is forwarded to the same eventfd.
//!
//! The status register follows the virtio device status state machine
//! (virtio 1.2 sections 2.1 and 3.1.1; see `write_status`): bits are added
//! only in the order ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK and cleared
//! only by a reset, feature bits are writable only between DRIVER and
//! FEATURES_OK, queue registers only between FEATURES_OK and DRIVER_OK, and
//! the device is activated exactly once per reset.
//!
//! Driver mistakes (features not offered, steps out of order, queues in
//! guest memory that does not exist) never panic: the driver's write is
//! refused or the device enters DEVICE_NEEDS_RESET.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{
    DeviceError, FIRST_BACKEND_TOKEN, Interrupt, QueueContext, VIRTIO_F_VERSION_1, VirtioDevice,
};
use crate::devices::bus::BusDevice;
use crate::event_loop::{EventHandler, EventLoopError, Registrar};
use crate::memory::GuestMemory;

/// Size of one transport's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
/// Offset of the device config space.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

const MAGIC_VALUE: u32 = 0x7472_6976;
const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the guest ("KIND").
const VENDOR_ID: u32 = 0x444e_494b;

/// Device status bits (virtio 1.2 section 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and must be reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// The status bits a driver sets during initialisation, in order.
const INIT_SEQUENCE: [u32; 4] = [
    status::ACKNOWLEDGE,
    status::DRIVER,
    status::FEATURES_OK,
    status::DRIVER_OK,
];

/// Errors of transport construction.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A queue could not be created.
    #[error("cannot create queue {index} of size {size}: {source}")]
    Queue {
        /// The queue index.
        index: usize,
        /// Its maximum size.
        size: u16,
        /// The error.
        source: virtio_queue::Error,
    },
    /// A queue eventfd could not be created.
    #[error("queue eventfd: {0}")]
    EventFd(std::io::Error),
    /// A queue eventfd could not be watched.
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
}

/// One virtio device behind a virtio-mmio register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    registrar: Registrar,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    queue_select: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
}

fn new_queues(device: &dyn VirtioDevice) -> Result<Vec<Queue>, TransportError> {
    device
        .queue_max_sizes()
        .into_iter()
        .enumerate()
        .map(|(index, size)| {
            Queue::new(size).map_err(|source| TransportError::Queue {
                index,
                size,
                source,
            })
        })
        .collect()
}

impl MmioTransport {
    /// Wraps `device`; its queue eventfds are watched through `registrar`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        registrar: Registrar,
    ) -> Result<Self, TransportError> {
        let queues = new_queues(device.as_ref())?;
        let queue_events = (0..queues.len())
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(TransportError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        for (index, event) in queue_events.iter().enumerate() {
            registrar.add(event.as_raw_fd(), index as u32, EventSet::IN)?;
        }
        Ok(Self {
            device,
            mem,
            interrupt,
            registrar,
            queues,
            queue_events,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            queue_select: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// The per-queue notification eventfds (to register as ioeventfds).
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The virtio device id.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// Whether the driver has set DRIVER_OK and the device is running (not
    /// stopped by an error or FAILED since).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The status register as the driver reads it.
    pub fn status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn fail(&mut self, error: &DeviceError) {
        crate::limited_log!(
            kind = "virtio device failures",
            log::Level::Warn,
            "virtio device {}: {error}; device needs reset",
            self.device.device_type()
        );
        self.interrupt.set_needs_reset();
        self.stop_device();
    }

    /// Releases a running device until the driver resets it: its backend
    /// fds leave the device thread's epoll, which is level-triggered and
    /// would otherwise wake the thread, again and again, for host data
    /// that a stopped device does not read.
    fn stop_device(&mut self) {
        if self.activated {
            self.device.reset(&self.registrar);
            self.activated = false;
        }
    }

    fn context(&mut self) -> (&mut Box<dyn VirtioDevice>, QueueContext<'_>) {
        (
            &mut self.device,
            QueueContext {
                mem: &self.mem,
                queues: &mut self.queues,
                interrupt: &self.interrupt,
                registrar: &self.registrar,
            },
        )
    }

    fn reset(&mut self) {
        self.stop_device();
        // The same sizes succeeded at construction, so this cannot fail;
        // keep the old queues (reset below) if it somehow does.
        match new_queues(self.device.as_ref()) {
            Ok(queues) => self.queues = queues,
            Err(_) => self.queues.iter_mut().for_each(Queue::reset),
        }
        for event in &self.queue_events {
            // Drop stale notifications; EAGAIN means there were none.
            let _ = event.read();
        }
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.status = 0;
        self.interrupt.reset();
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.features();
        self.driver_features & !offered == 0 && self.driver_features & VIRTIO_F_VERSION_1 != 0
    }

    fn activate(&mut self) -> Result<(), DeviceError> {
        for (index, queue) in self.queues.iter().enumerate() {
            if queue.ready() && !queue.is_valid(&self.mem) {
                return Err(DeviceError::Queue {
                    queue: index,
                    reason: "rings are misaligned or outside guest memory".into(),
                });
            }
        }
        let features = self.driver_features;
        let (device, mut ctx) = self.context();
        device.activate(features, &mut ctx)?;
        self.activated = true;
        Ok(())
    }

    /// Applies a driver write to the status register, following the
    /// device status state machine (virtio 1.2 sections 2.1 and 3.1.1):
    ///
    /// * 0 resets the device (the only way to clear a bit);
    /// * FAILED is accepted at any time; the device is stopped (as on a
    ///   device error) until the next reset;
    /// * otherwise the write must keep every bit already set and add bits
    ///   only along ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK, in that
    ///   order (several steps in one write are taken one by one); anything
    ///   else is refused and the status stays as it was;
    /// * FEATURES_OK is refused (the bit reads back clear) if the driver
    ///   acked a feature the device did not offer, or not VERSION_1;
    /// * DRIVER_OK activates the device; since no bit can be cleared short
    ///   of a reset, that happens at most once per reset.
    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // DEVICE_NEEDS_RESET is the device's to set: a driver writing back
        // what it read neither sets nor clears it.
        let value = value & !status::DEVICE_NEEDS_RESET;
        if value == self.status {
            return;
        }
        if value & status::FAILED != 0 {
            self.status |= status::FAILED;
            self.stop_device();
            return;
        }
        if let Err(why) = self.check_transition(value) {
            crate::limited_log!(
                kind = "virtio-mmio refused status writes",
                log::Level::Warn,
                "virtio device {}: status {:#x} -> {value:#x} refused: {why}",
                self.device.device_type(),
                self.status
            );
            return;
        }
        for bit in INIT_SEQUENCE {
            if value & bit == 0 || self.status & bit != 0 {
                continue;
            }
            if bit == status::FEATURES_OK && !self.features_acceptable() {
                crate::limited_log!(
                    kind = "virtio-mmio refused feature sets",
                    log::Level::Warn,
                    "virtio device {}: driver accepted unsupported features {:#x}",
                    self.device.device_type(),
                    self.driver_features
                );
                return;
            }
            self.status |= bit;
            if bit == status::DRIVER_OK
                && !self.activated
                && let Err(e) = self.activate()
            {
                self.fail(&e);
            }
        }
    }

    /// Whether `value` is a legal next status from the current one (FAILED
    /// and reset aside).
    fn check_transition(&self, value: u32) -> Result<(), &'static str> {
        if self.status & status::FAILED != 0 {
            return Err("the driver set FAILED; only a reset is accepted");
        }
        if value & self.status != self.status {
            return Err("a status bit can only be cleared by a reset (writing 0)");
        }
        let mut prefix = 0;
        for bit in INIT_SEQUENCE {
            prefix |= bit;
            if value == prefix {
                return Ok(());
            }
        }
        Err("not a step of ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK in order")
    }

    /// Whether the device is running and not stopped by an error or by the
    /// driver giving up.
    fn serving(&self) -> bool {
        self.activated && !self.interrupt.needs_reset() && self.status & status::FAILED == 0
    }

    /// DriverFeatures may be written between DRIVER and FEATURES_OK only
    /// (virtio 1.2 section 3.1.1 step 4): what FEATURES_OK checked stays
    /// what the device is activated with.
    fn features_writable(&self) -> bool {
        self.status == status::ACKNOWLEDGE | status::DRIVER
    }

    /// The queue registers (QueueSel aside, a mere selector) may be written
    /// between FEATURES_OK and DRIVER_OK only (virtio 1.2 section 3.1.1
    /// step 7, 4.2.3.2).
    fn queue_config_writable(&self) -> bool {
        self.status == status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_select as usize);
        match offset {
            0x00 => MAGIC_VALUE,
            0x04 => MMIO_VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR_ID,
            0x10 => match self.device_features_select {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            0x34 => queue.map_or(0, |q| u32::from(q.max_size())),
            0x44 => queue.map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status(),
            0x70 => self.status(),
            0xfc => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let queue_writable = self.queue_config_writable();
        let features_writable = self.features_writable();
        match offset {
            0x14 => self.device_features_select = value,
            0x20 if features_writable => match self.driver_features_select {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value)
                }
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => {}
            },
            0x24 => self.driver_features_select = value,
            // A selector only: harmless in any state.
            0x30 => self.queue_select = value,
            0x38 if queue_writable => {
                if let (Some(queue), Ok(size)) = (self.selected_queue(), u16::try_from(value)) {
                    queue.set_size(size);
                }
            }
            0x44 if queue_writable => {
                if let Some(queue) = self.selected_queue() {
                    queue.set_ready(value == 1);
                }
            }
            0x50 => match self.queue_events.get(value as usize) {
                Some(event) => {
                    let _ = event.write(1);
                }
                None => crate::limited_log!(
                    kind = "virtio-mmio notifies of unknown queues",
                    log::Level::Debug,
                    "virtio: notify of unknown queue {value}"
                ),
            },
            0x64 => self.interrupt.acknowledge(value),
            0x70 => self.write_status(value),
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 if queue_writable => {
                let Some(queue) = self.selected_queue() else {
                    return;
                };
                let (low, high) = if offset & 4 == 0 {
                    (Some(value), None)
                } else {
                    (None, Some(value))
                };
                match offset & !4 {
                    0x80 => queue.set_desc_table_address(low, high),
                    0x90 => queue.set_avail_ring_address(low, high),
                    _ => queue.set_used_ring_address(low, high),
                }
            }
            _ => crate::limited_log!(
                kind = "virtio-mmio ignored register writes",
                log::Level::Debug,
                "virtio-mmio: ignored write of {value:#x} at {offset:#x}"
            ),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
        } else if data.len() == 4 {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            self.config_generation = self.config_generation.wrapping_add(1);
        } else if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
    }
}

impl EventHandler for MmioTransport {
    fn handle_event(&mut self, sub: u32, events: EventSet) {
        if sub < FIRST_BACKEND_TOKEN {
            let index = sub as usize;
            if let Some(event) = self.queue_events.get(index) {
                // EAGAIN: already drained by an earlier wakeup.
                let _ = event.read();
            }
            if !self.serving() || index >= self.queues.len() {
                return;
            }
            let (device, mut ctx) = self.context();
            if let Err(e) = device.queue_notified(index, &mut ctx) {
                self.fail(&e);
            }
        } else if self.serving() {
            let (device, mut ctx) = self.context();
            if let Err(e) = device.backend_event(sub, events, &mut ctx) {
                self.fail(&e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event_loop::EventLoop;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    /// A device that records notifications, activations and resets.
    struct Probe {
        notified: Arc<Mutex<Vec<usize>>>,
        activated: Arc<Mutex<Option<u64>>>,
        activations: Arc<Mutex<u32>>,
        resets: Arc<Mutex<u32>>,
    }

    impl VirtioDevice for Probe {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16, 8]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&[0xaa, 0xbb], offset, data);
        }
        fn activate(&mut self, features: u64, _: &mut QueueContext<'_>) -> Result<(), DeviceError> {
            *self.activated.lock().unwrap() = Some(features);
            *self.activations.lock().unwrap() += 1;
            Ok(())
        }
        fn queue_notified(
            &mut self,
            queue: usize,
            _: &mut QueueContext<'_>,
        ) -> Result<(), DeviceError> {
            if queue == 1 {
                return Err(DeviceError::Backend("queue 1 always fails".into()));
            }
            self.notified.lock().unwrap().push(queue);
            Ok(())
        }
        fn reset(&mut self, _: &Registrar) {
            *self.resets.lock().unwrap() += 1;
        }
    }

    struct Fixture {
        transport: MmioTransport,
        notified: Arc<Mutex<Vec<usize>>>,
        activated: Arc<Mutex<Option<u64>>>,
        activations: Arc<Mutex<u32>>,
        resets: Arc<Mutex<u32>>,
        _event_loop: EventLoop,
    }

    fn fixture() -> Fixture {
        let mem = crate::memory::allocate(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut event_loop = EventLoop::new().unwrap();
        let registrar = event_loop.registrar();
        let notified = Arc::new(Mutex::new(Vec::new()));
        let activated = Arc::new(Mutex::new(None));
        let activations = Arc::new(Mutex::new(0));
        let resets = Arc::new(Mutex::new(0));
        let device = Probe {
            notified: notified.clone(),
            activated: activated.clone(),
            activations: activations.clone(),
            resets: resets.clone(),
        };
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let transport = MmioTransport::new(Box::new(device), mem, interrupt, registrar).unwrap();
        Fixture {
            transport,
            notified,
            activated,
            activations,
            resets,
            _event_loop: event_loop,
        }
    }

    fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write32(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    const ACK_DRIVER: u32 = status::ACKNOWLEDGE | status::DRIVER;
    const ACK_DRIVER_FEATURES: u32 = ACK_DRIVER | status::FEATURES_OK;
    const ALL_OK: u32 = ACK_DRIVER_FEATURES | status::DRIVER_OK;

    fn write_features(t: &mut MmioTransport, features: u64) {
        write32(t, 0x24, 0);
        write32(t, 0x20, features as u32);
        write32(t, 0x24, 1);
        write32(t, 0x20, (features >> 32) as u32);
    }

    fn negotiate(t: &mut MmioTransport, features_high: u32) {
        negotiate_features(t, u64::from(features_high) << 32);
    }

    fn negotiate_features(t: &mut MmioTransport, features: u64) {
        write32(t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        write_features(t, features);
        write32(
            t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, base: u32) {
        write32(t, 0x30, index);
        write32(t, 0x38, 8);
        write32(t, 0x80, base);
        write32(t, 0x90, base + 0x1000);
        write32(t, 0xa0, base + 0x2000);
        write32(t, 0x44, 1);
    }

    #[test]
    fn identification_registers() {
        let mut f = fixture();
        let t = &mut f.transport;
        assert_eq!(read32(t, 0x00), MAGIC_VALUE);
        assert_eq!(read32(t, 0x04), 2);
        assert_eq!(read32(t, 0x08), 42);
        write32(t, 0x14, 1);
        assert_eq!(read32(t, 0x10), 1, "VERSION_1 is bit 32");
        write32(t, 0x30, 1);
        assert_eq!(read32(t, 0x34), 8);
        write32(t, 0x30, 7);
        assert_eq!(read32(t, 0x34), 0, "absent queue");
        let mut config = [0u8; 2];
        t.read(0x100, &mut config);
        assert_eq!(config, [0xaa, 0xbb]);
        // Narrow register reads return zero rather than panicking.
        let mut narrow = [0xffu8; 2];
        t.read(0x00, &mut narrow);
        assert_eq!(narrow, [0, 0]);
    }

    #[test]
    fn full_negotiation_activates_and_notifies() {
        let mut f = fixture();
        let t = &mut f.transport;
        negotiate(t, 1);
        assert_ne!(read32(t, 0x70) & status::FEATURES_OK, 0);
        setup_queue(t, 0, 0x10000);
        write32(t, 0x70, 0xf);
        assert!(t.is_activated());
        assert_eq!(*f.activated.lock().unwrap(), Some(VIRTIO_F_VERSION_1));
        write32(t, 0x50, 0);
        t.handle_event(0, EventSet::IN);
        assert_eq!(*f.notified.lock().unwrap(), vec![0]);
        // Queue registers are frozen after DRIVER_OK.
        write32(t, 0x30, 0);
        write32(t, 0x44, 0);
        assert_eq!(read32(t, 0x44), 1);
    }

    #[test]
    fn unsupported_features_refuse_features_ok() {
        let mut f = fixture();
        let t = &mut f.transport;
        negotiate_features(t, VIRTIO_F_VERSION_1 | 0x2); // bit 1 not offered
        assert_eq!(read32(t, 0x70), ACK_DRIVER, "FEATURES_OK reads back clear");
        // Without VERSION_1 it is refused too.
        write32(t, 0x70, 0);
        negotiate(t, 0);
        assert_eq!(read32(t, 0x70) & status::FEATURES_OK, 0);
        write32(t, 0x70, 0xf);
        assert!(!t.is_activated(), "DRIVER_OK without FEATURES_OK");
    }

    #[test]
    fn queue_outside_memory_needs_reset_and_reset_recovers() {
        let mut f = fixture();
        let t = &mut f.transport;
        negotiate(t, 1);
        setup_queue(t, 0, 0x2000_0000);
        write32(t, 0x70, 0xf);
        assert!(!t.is_activated());
        assert_ne!(read32(t, 0x70) & status::DEVICE_NEEDS_RESET, 0);
        assert_ne!(read32(t, 0x60) & super::super::INTERRUPT_CONFIG, 0);
        write32(t, 0x70, 0);
        assert_eq!(read32(t, 0x70), 0);
        assert_eq!(read32(t, 0x60), 0);
        write32(t, 0x30, 0);
        assert_eq!(read32(t, 0x44), 0, "queues are reset");
        negotiate(t, 1);
        setup_queue(t, 0, 0x10000);
        write32(t, 0x70, 0xf);
        assert!(t.is_activated());
    }

    /// A device activated with queue 0 at 0x10000.
    fn activated_fixture() -> Fixture {
        let mut f = fixture();
        let t = &mut f.transport;
        negotiate(t, 1);
        setup_queue(t, 0, 0x10000);
        write32(t, 0x70, ALL_OK);
        assert!(t.is_activated());
        f
    }

    #[test]
    fn clearing_status_bits_without_a_reset_is_refused() {
        let mut f = activated_fixture();
        let t = &mut f.transport;
        for value in [
            status::ACKNOWLEDGE,
            ACK_DRIVER,
            ACK_DRIVER_FEATURES,
            status::DRIVER_OK,
        ] {
            write32(t, 0x70, value);
            assert_eq!(read32(t, 0x70), ALL_OK, "write of {value:#x}");
        }
        // The queue registers stay frozen and the device stays active.
        write32(t, 0x30, 0);
        write32(t, 0x44, 0);
        write32(t, 0x80, 0x20000);
        assert_eq!(read32(t, 0x44), 1);
        assert_eq!(t.queues[0].desc_table(), 0x10000);
        assert!(t.is_activated());
        write32(t, 0x50, 0);
        t.handle_event(0, EventSet::IN);
        assert_eq!(*f.notified.lock().unwrap(), vec![0]);
    }

    #[test]
    fn a_second_driver_ok_does_not_activate_again() {
        let mut f = activated_fixture();
        let t = &mut f.transport;
        write32(t, 0x70, ALL_OK);
        // Cleared and set again: the clearing is refused, so is nothing new.
        write32(t, 0x70, ACK_DRIVER_FEATURES);
        write32(t, 0x70, ALL_OK);
        write32(t, 0x70, ALL_OK | status::DEVICE_NEEDS_RESET);
        assert_eq!(*f.activations.lock().unwrap(), 1);
        assert_eq!(read32(t, 0x70), ALL_OK);
    }

    #[test]
    fn features_written_after_features_ok_are_ignored() {
        let mut f = fixture();
        let t = &mut f.transport;
        negotiate(t, 1);
        assert_eq!(read32(t, 0x70), ACK_DRIVER_FEATURES);
        // Not offered (bit 1) and VERSION_1 withdrawn: both too late.
        write_features(t, 0x2);
        setup_queue(t, 0, 0x10000);
        write32(t, 0x70, ALL_OK);
        assert!(t.is_activated());
        assert_eq!(*f.activated.lock().unwrap(), Some(VIRTIO_F_VERSION_1));
        // Nor after DRIVER_OK.
        write_features(t, 0x3);
        assert_eq!(t.driver_features, VIRTIO_F_VERSION_1);
    }

    #[test]
    fn features_written_before_driver_are_ignored() {
        let mut f = fixture();
        let t = &mut f.transport;
        write_features(t, VIRTIO_F_VERSION_1);
        write32(t, 0x70, status::ACKNOWLEDGE);
        write_features(t, VIRTIO_F_VERSION_1);
        write32(t, 0x70, ACK_DRIVER);
        write32(t, 0x70, ACK_DRIVER_FEATURES);
        assert_eq!(read32(t, 0x70), ACK_DRIVER, "no VERSION_1 was accepted");
    }

    #[test]
    fn skipped_or_out_of_order_steps_are_refused() {
        let mut f = fixture();
        let t = &mut f.transport;
        for value in [
            status::DRIVER,
            status::FEATURES_OK,
            status::DRIVER_OK,
            status::ACKNOWLEDGE | status::FEATURES_OK,
            status::ACKNOWLEDGE | status::DRIVER_OK,
            0x10,
        ] {
            write32(t, 0x70, value);
            assert_eq!(read32(t, 0x70), 0, "write of {value:#x}");
        }
        write32(t, 0x70, status::ACKNOWLEDGE);
        write32(t, 0x70, status::ACKNOWLEDGE | status::FEATURES_OK);
        assert_eq!(read32(t, 0x70), status::ACKNOWLEDGE);
        write32(t, 0x24, 1);
        write32(t, 0x70, ACK_DRIVER);
        write32(t, 0x20, 1);
        // DRIVER_OK before FEATURES_OK.
        write32(t, 0x70, ACK_DRIVER | status::DRIVER_OK);
        assert_eq!(read32(t, 0x70), ACK_DRIVER);
        assert!(!t.is_activated());
        // Several steps in one write are taken in order.
        write32(t, 0x70, ALL_OK);
        assert!(t.is_activated());
        assert_eq!(read32(t, 0x70), ALL_OK);
    }

    #[test]
    fn queue_registers_are_writable_between_features_ok_and_driver_ok_only() {
        let mut f = fixture();
        let t = &mut f.transport;
        write32(t, 0x70, ACK_DRIVER);
        write32(t, 0x24, 1);
        write32(t, 0x20, 1);
        // Before FEATURES_OK: ignored.
        setup_queue(t, 0, 0x10000);
        assert_eq!(read32(t, 0x44), 0);
        write32(t, 0x70, ACK_DRIVER_FEATURES);
        setup_queue(t, 0, 0x10000);
        assert_eq!(read32(t, 0x44), 1);
        write32(t, 0x70, ALL_OK);
        assert!(t.is_activated());
    }

    #[test]
    fn failed_is_accepted_any_time_and_stops_the_device_until_reset() {
        let mut f = activated_fixture();
        let t = &mut f.transport;
        write32(t, 0x70, ALL_OK | status::FAILED);
        assert_eq!(read32(t, 0x70), ALL_OK | status::FAILED);
        assert_eq!(*f.resets.lock().unwrap(), 1, "the backend is released");
        assert!(!t.is_activated());
        write32(t, 0x50, 0);
        t.handle_event(0, EventSet::IN);
        assert!(f.notified.lock().unwrap().is_empty(), "served after FAILED");
        // Only a reset leaves FAILED.
        write32(t, 0x70, ALL_OK);
        assert_eq!(read32(t, 0x70), ALL_OK | status::FAILED);
        write32(t, 0x70, 0);
        assert_eq!(read32(t, 0x70), 0);
        assert_eq!(*f.resets.lock().unwrap(), 1, "released once");
        // FAILED from the very start too.
        write32(t, 0x70, status::FAILED);
        assert_eq!(read32(t, 0x70), status::FAILED);
        write32(t, 0x70, status::ACKNOWLEDGE);
        assert_eq!(read32(t, 0x70), status::FAILED);
    }

    #[test]
    fn a_reset_allows_exactly_one_new_activation() {
        let mut f = activated_fixture();
        let t = &mut f.transport;
        write32(t, 0x70, 0);
        assert!(!t.is_activated());
        assert_eq!(read32(t, 0x70), 0);
        negotiate(t, 1);
        setup_queue(t, 0, 0x10000);
        write32(t, 0x70, ALL_OK);
        write32(t, 0x70, ALL_OK);
        assert!(t.is_activated());
        assert_eq!(*f.activations.lock().unwrap(), 2);
        write32(t, 0x50, 0);
        t.handle_event(0, EventSet::IN);
        assert_eq!(*f.notified.lock().unwrap(), vec![0]);
    }

    #[test]
    fn a_driver_looping_on_bad_status_writes_logs_a_bounded_number_of_lines() {
        let mut f = fixture();
        let t = &mut f.transport;
        let lines = crate::logger::capture_lines(|| {
            for _ in 0..10_000 {
                write32(t, 0x70, status::DRIVER_OK);
            }
        });
        assert!(
            lines.len() as u64 <= crate::log_limit::DEFAULT_BURST + 1,
            "{} lines",
            lines.len()
        );
    }

    #[test]
    fn a_device_error_stops_the_device_until_the_driver_resets_it() {
        let mut f = fixture();
        let t = &mut f.transport;
        negotiate(t, 1);
        setup_queue(t, 0, 0x10000);
        setup_queue(t, 1, 0x20000);
        write32(t, 0x70, ALL_OK);
        write32(t, 0x50, 1);
        t.handle_event(1, EventSet::IN);
        assert_ne!(read32(t, 0x70) & status::DEVICE_NEEDS_RESET, 0);
        assert!(!t.is_activated());
        assert_eq!(*f.resets.lock().unwrap(), 1, "the backend is released");
        write32(t, 0x50, 0);
        t.handle_event(0, EventSet::IN);
        assert!(
            f.notified.lock().unwrap().is_empty(),
            "served after an error"
        );
        // Writing the status back (NEEDS_RESET included) changes nothing.
        let status = read32(t, 0x70);
        write32(t, 0x70, status);
        assert_eq!(*f.activations.lock().unwrap(), 1);
        write32(t, 0x70, 0);
        assert_eq!(*f.resets.lock().unwrap(), 1, "released once");
        negotiate(t, 1);
        setup_queue(t, 0, 0x10000);
        write32(t, 0x70, ALL_OK);
        assert!(t.is_activated());
        assert_eq!(*f.activations.lock().unwrap(), 2);
    }
}
