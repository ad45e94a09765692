//! The guest console: a 16550A UART (vm-superio) at COM1 (port 0x3f8,
//! IRQ 4), whose output goes to stdout or a file with a size bound.
//!
//! The interrupt line is an eventfd registered with KVM as an irqfd, so
//! raising it costs one `write(2)` and no VM exit of its own.

use std::io::{self, Write};

use vm_superio::{Serial, Trigger, serial::NoEvents};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// Base I/O port of COM1.
pub const COM1_PORT: u64 = 0x3f8;
/// Number of ports a UART decodes.
pub const UART_PORT_COUNT: u64 = 8;
/// Legacy IRQ of COM1.
pub const COM1_IRQ: u32 = 4;

/// An interrupt line backed by an eventfd (an irqfd on the KVM side).
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// A writer that passes through at most `limit` bytes and counts the rest.
pub struct BoundedWriter {
    inner: Box<dyn Write + Send>,
    limit: u64,
    written: u64,
    dropped: u64,
}

impl BoundedWriter {
    /// Wraps `inner`, letting `limit` bytes through.
    pub fn new(inner: Box<dyn Write + Send>, limit: u64) -> Self {
        Self {
            inner,
            limit,
            written: 0,
            dropped: 0,
        }
    }

    /// Bytes passed through so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Bytes dropped because the bound was reached.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

impl Write for BoundedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.limit.saturating_sub(self.written);
        let take = (buf.len() as u64).min(room) as usize;
        if take > 0 {
            self.inner.write_all(&buf[..take])?;
            self.written += take as u64;
        }
        self.dropped += (buf.len() - take) as u64;
        // Report everything consumed: the guest must never block on a full console.
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The COM1 device on the port I/O bus.
pub struct SerialDevice {
    uart: Serial<IrqLine, NoEvents, BoundedWriter>,
    write_errors: u64,
}

impl SerialDevice {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: BoundedWriter) -> Self {
        Self {
            uart: Serial::new(IrqLine(irq), out),
            write_errors: 0,
        }
    }

    /// The output sink (for byte counts).
    pub fn output(&self) -> &BoundedWriter {
        self.uart.writer()
    }

    /// Queues bytes as if typed on the console; returns how many fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Failed writes to the output sink or the interrupt line so far.
    pub fn write_errors(&self) -> u64 {
        self.write_errors
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < UART_PORT_COUNT {
            data[0] = self.uart.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1
            && offset < UART_PORT_COUNT
            && let Err(e) = self.uart.write(offset as u8, data[0])
        {
            // Lost console output must not stop the guest; count it.
            self.write_errors += 1;
            crate::limited_log!(
                kind = "serial output errors",
                log::Level::Warn,
                "serial: {e:?}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bounded_writer_drops_past_limit() {
        let sink = Shared::default();
        let mut w = BoundedWriter::new(Box::new(sink.clone()), 5);
        assert_eq!(w.write(b"hel").unwrap(), 3);
        assert_eq!(w.write(b"lo world").unwrap(), 8);
        assert_eq!(&sink.0.lock().unwrap()[..], b"hello");
        assert_eq!((w.written(), w.dropped()), (5, 6));
    }

    #[test]
    fn guest_writes_reach_output_and_raise_irq_when_enabled() {
        let sink = Shared::default();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(
            irq.try_clone().unwrap(),
            BoundedWriter::new(Box::new(sink.clone()), 100),
        );
        // IER: enable THR-empty interrupt (offset 1, bit 1).
        dev.write(1, &[0x02]);
        for b in b"ok\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&sink.0.lock().unwrap()[..], b"ok\n");
        assert!(irq.read().unwrap() >= 1);
        // LSR (offset 5): transmitter empty bits set.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60);
    }

    #[test]
    fn wide_accesses_are_ignored() {
        let mut dev = SerialDevice::new(
            EventFd::new(EFD_NONBLOCK).unwrap(),
            BoundedWriter::new(Box::new(io::sink()), 10),
        );
        let mut data = [0u8; 2];
        dev.read(0, &mut data);
        assert_eq!(data, [0xff, 0xff]);
        dev.write(0, b"ab");
        assert_eq!(dev.output().written(), 0);
    }
}
