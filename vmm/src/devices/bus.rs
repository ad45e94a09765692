//! Address-range dispatch for port I/O and MMIO exits.
//!
//! A [`Bus`] maps non-overlapping ranges to devices. It is filled while the
//! VM is built and then shared read-only by all vCPU threads; each device
//! sits behind its own mutex, so two vCPUs touching different devices do not
//! contend.

use std::sync::{Arc, Mutex};

/// A device reachable through a bus.
pub trait BusDevice: Send {
    /// Handles a guest read of `data.len()` bytes at `offset` in the range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a guest write of `data` at `offset` in the range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus and its owner.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors of bus construction.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The range is empty or wraps around.
    #[error("invalid range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Start of the range.
        base: u64,
        /// Length of the range.
        len: u64,
    },
    /// The range overlaps one already registered.
    #[error("range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Start of the range.
        base: u64,
        /// Length of the range.
        len: u64,
    },
}

struct Range {
    base: u64,
    len: u64,
    device: SharedDevice,
}

/// A set of devices keyed by non-overlapping address ranges.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.ranges.iter().map(|r| (r.base, r.len)))
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        if self
            .ranges
            .iter()
            .any(|r| base < r.base + r.len && r.base < end)
        {
            return Err(BusError::Overlap { base, len });
        }
        let at = self.ranges.partition_point(|r| r.base < base);
        self.ranges.insert(at, Range { base, len, device });
        Ok(())
    }

    /// The device covering `[addr, addr + size)` and the offset of `addr` in it.
    fn find(&self, addr: u64, size: usize) -> Option<(&SharedDevice, u64)> {
        let at = self.ranges.partition_point(|r| r.base <= addr);
        let range = self.ranges.get(at.checked_sub(1)?)?;
        let offset = addr - range.base;
        let end = offset.checked_add(size as u64)?;
        (end <= range.len).then_some((&range.device, offset))
    }

    /// Dispatches a read; returns false (and leaves `data` alone) when no
    /// device covers the access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((device, offset)) => {
                device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device covers the access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((device, offset)) => {
                device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_offsets() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(b.clone(), 0x3f8, 8).unwrap();
        bus.insert(a.clone(), 0x60, 5).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0x64, &[0xfe]));
        assert_eq!(a.lock().unwrap().last_write, Some((4, vec![0xfe])));
        assert!(!bus.read(0x65, &mut data));
        assert!(!bus.write(0x3f7, &[0]));
        // An access straddling the end of a range is not dispatched.
        assert!(!bus.write(0x3ff, &[0, 0]));
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x1000, 0x100).unwrap();
        assert!(matches!(
            bus.insert(dev.clone(), 0x10ff, 1),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev.clone(), 0xf00, 0x101),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev.clone(), 0x2000, 0),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(dev, u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
    }
}
