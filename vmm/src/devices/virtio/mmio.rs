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
//! Driver mistakes (features not offered, DRIVER_OK without FEATURES_OK,
//! queues in guest memory that does not exist) never panic: the driver's
//! status write is refused or the device enters DEVICE_NEEDS_RESET.

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

    /// Whether the driver has set DRIVER_OK and the device is running.
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
        log::warn!(
            "virtio device {}: {error}; device needs reset",
            self.device.device_type()
        );
        self.interrupt.set_needs_reset();
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
        if self.activated {
            self.device.reset(&self.registrar);
        }
        self.activated = false;
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

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value & !status::DEVICE_NEEDS_RESET;
        let newly_set = value & !self.status;
        if newly_set & status::FEATURES_OK != 0 && !self.features_acceptable() {
            log::warn!(
                "virtio device {}: driver accepted unsupported features {:#x}",
                self.device.device_type(),
                self.driver_features
            );
            value &= !status::FEATURES_OK;
        }
        if newly_set & status::DRIVER_OK != 0 {
            if value & status::FEATURES_OK == 0 {
                log::warn!(
                    "virtio device {}: DRIVER_OK without FEATURES_OK",
                    self.device.device_type()
                );
                value &= !status::DRIVER_OK;
            } else if let Err(e) = self.activate() {
                self.fail(&e);
            }
        }
        self.status = value;
    }

    fn queue_config_writable(&self) -> bool {
        self.status & status::DRIVER_OK == 0
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
        match offset {
            0x14 => self.device_features_select = value,
            0x20 => match self.driver_features_select {
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
                None => log::debug!("virtio: notify of unknown queue {value}"),
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
            _ => log::debug!("virtio-mmio: ignored write of {value:#x} at {offset:#x}"),
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
            if !self.activated || self.interrupt.needs_reset() || index >= self.queues.len() {
                return;
            }
            let (device, mut ctx) = self.context();
            if let Err(e) = device.queue_notified(index, &mut ctx) {
                self.fail(&e);
            }
        } else if self.activated && !self.interrupt.needs_reset() {
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

    /// A device that records notifications.
    struct Probe {
        notified: Arc<Mutex<Vec<usize>>>,
        activated: Arc<Mutex<Option<u64>>>,
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
            Ok(())
        }
        fn queue_notified(
            &mut self,
            queue: usize,
            _: &mut QueueContext<'_>,
        ) -> Result<(), DeviceError> {
            self.notified.lock().unwrap().push(queue);
            Ok(())
        }
    }

    struct Fixture {
        transport: MmioTransport,
        notified: Arc<Mutex<Vec<usize>>>,
        activated: Arc<Mutex<Option<u64>>>,
        _event_loop: EventLoop,
    }

    fn fixture() -> Fixture {
        let mem = crate::memory::allocate(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut event_loop = EventLoop::new().unwrap();
        let registrar = event_loop.registrar();
        let notified = Arc::new(Mutex::new(Vec::new()));
        let activated = Arc::new(Mutex::new(None));
        let device = Probe {
            notified: notified.clone(),
            activated: activated.clone(),
        };
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let transport = MmioTransport::new(Box::new(device), mem, interrupt, registrar).unwrap();
        Fixture {
            transport,
            notified,
            activated,
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

    fn negotiate(t: &mut MmioTransport, features_high: u32) {
        write32(t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        write32(t, 0x24, 1);
        write32(t, 0x20, features_high);
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
        write32(t, 0x24, 0);
        write32(t, 0x20, 0x2); // bit 1 not offered
        negotiate(t, 1);
        assert_eq!(read32(t, 0x70) & status::FEATURES_OK, 0);
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
}
