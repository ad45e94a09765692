//! A minimal i8042 keyboard controller.
//!
//! Its main job: writing command 0xfe to port 0x64 pulses the CPU reset
//! line. Linux does that for `reboot=k`; here it ends the VM with a clean
//! exit. It also answers the controller commands Linux's i8042 driver
//! sends while probing (read/write the command byte, self tests), because a
//! controller that never answers costs seconds of probe timeouts at boot.
//! There is no keyboard behind it: bytes written to it get an ACK. The
//! auxiliary (mouse) port answers the loopback and interface tests, so
//! Linux's AUX and MUX detection finish without waiting for timeouts.
//!
//! Ports: 0x60 data (read output buffer / write data), 0x64 status (read) and
//! command (write). Output goes through a small FIFO; when the command
//! byte enables keyboard interrupts, each output byte raises IRQ 1.

use std::collections::VecDeque;
use std::sync::Arc;

use vm_superio::Trigger;

use super::bus::BusDevice;
use super::serial::IrqLine;
use crate::lifecycle::{ExitReason, ExitSignal};

/// First port of the controller (data port 0x60; command/status 0x64).
pub const I8042_PORT: u64 = 0x60;
/// Ports decoded: 0x60..=0x64.
pub const I8042_PORT_COUNT: u64 = 5;
/// Legacy IRQ of the keyboard.
pub const KEYBOARD_IRQ: u32 = 1;
/// Legacy IRQ of the auxiliary (mouse) port.
pub const AUX_IRQ: u32 = 12;

const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_COMMAND_LAST: u8 = 0x08;
/// "Keyboard not inhibited" (clear means the keylock is on).
const STATUS_NOT_INHIBITED: u8 = 0x10;
/// The byte in the output buffer comes from the auxiliary port.
const STATUS_AUX_DATA: u8 = 0x20;

const CTR_KBD_INT: u8 = 0x01;
const CTR_AUX_INT: u8 = 0x02;
const CTR_SYSTEM_FLAG: u8 = 0x04;
const CTR_AUX_DISABLE: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_OUTPUT: u8 = 0xd2;
const CMD_WRITE_AUX_OUTPUT: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_RESET_CPU: u8 = 0xfe;

const SELF_TEST_OK: u8 = 0x55;
const INTERFACE_OK: u8 = 0x00;
const KBD_ACK: u8 = 0xfa;
const KBD_RESET: u8 = 0xff;
const KBD_SELF_TEST_OK: u8 = 0xaa;

/// Bytes kept in the output FIFO at most.
const OUTPUT_CAPACITY: usize = 16;

/// The i8042 controller.
#[derive(Debug)]
pub struct I8042 {
    exit: Arc<ExitSignal>,
    irq: Option<IrqLine>,
    aux_irq: Option<IrqLine>,
    command_byte: u8,
    /// Output bytes, each flagged "from the auxiliary port".
    output: VecDeque<(u8, bool)>,
    pending: Option<u8>,
    last_was_command: bool,
}

impl I8042 {
    /// A controller that reports resets to `exit` and raises `irq` (IRQ 1)
    /// or `aux_irq` (IRQ 12) when it has output for the keyboard or the
    /// auxiliary port and the command byte enables that interrupt.
    pub fn new(exit: Arc<ExitSignal>, irq: Option<IrqLine>, aux_irq: Option<IrqLine>) -> Self {
        Self {
            exit,
            irq,
            aux_irq,
            command_byte: CTR_SYSTEM_FLAG | CTR_AUX_DISABLE | CTR_XLATE,
            output: VecDeque::new(),
            pending: None,
            last_was_command: false,
        }
    }

    fn push_output(&mut self, byte: u8) {
        self.push(byte, false);
    }

    fn push(&mut self, byte: u8, aux: bool) {
        if self.output.len() < OUTPUT_CAPACITY {
            self.output.push_back((byte, aux));
        }
        let (enable, line) = if aux {
            (CTR_AUX_INT, &self.aux_irq)
        } else {
            (CTR_KBD_INT, &self.irq)
        };
        if self.command_byte & enable != 0
            && let Some(irq) = line
            && let Err(e) = irq.trigger()
        {
            crate::limited_log!(
                kind = "i8042 interrupt failures",
                log::Level::Warn,
                "i8042: cannot raise an interrupt: {e}"
            );
        }
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_SYSTEM_FLAG | STATUS_NOT_INHIBITED;
        if let Some((_, aux)) = self.output.front() {
            status |= STATUS_OUTPUT_FULL;
            if *aux {
                status |= STATUS_AUX_DATA;
            }
        }
        if self.last_was_command {
            status |= STATUS_COMMAND_LAST;
        }
        status
    }

    fn command(&mut self, command: u8) {
        self.last_was_command = true;
        self.pending = None;
        match command {
            CMD_READ_CTR => self.push_output(self.command_byte),
            CMD_WRITE_CTR
            | CMD_WRITE_OUTPUT_PORT
            | CMD_WRITE_KBD_OUTPUT
            | CMD_WRITE_AUX_OUTPUT
            | CMD_WRITE_AUX => self.pending = Some(command),
            CMD_SELF_TEST => self.push_output(SELF_TEST_OK),
            CMD_KBD_TEST => self.push_output(INTERFACE_OK),
            CMD_AUX_TEST => self.push_output(INTERFACE_OK),
            CMD_AUX_DISABLE => self.command_byte |= CTR_AUX_DISABLE,
            CMD_AUX_ENABLE => self.command_byte &= !CTR_AUX_DISABLE,
            CMD_RESET_CPU => {
                crate::limited_log!(
                    kind = "i8042 CPU reset requests",
                    log::Level::Info,
                    "i8042: guest requested a CPU reset"
                );
                self.exit.request(ExitReason::GuestReset);
            }
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        self.last_was_command = false;
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => self.command_byte = value,
            Some(CMD_WRITE_OUTPUT_PORT) => {
                // Bit 0 of the output port is the CPU reset line (active low).
                if value & 1 == 0 {
                    crate::limited_log!(
                        kind = "i8042 reset-line pulls",
                        log::Level::Info,
                        "i8042: guest pulled the reset line"
                    );
                    self.exit.request(ExitReason::GuestReset);
                }
            }
            Some(CMD_WRITE_KBD_OUTPUT) => self.push_output(value),
            // Loopback through the auxiliary port.
            Some(CMD_WRITE_AUX_OUTPUT) => self.push(value, true),
            // No mouse: bytes for it are dropped.
            Some(CMD_WRITE_AUX) => {}
            _ => {
                // A byte for the keyboard, which is absent but polite.
                self.push_output(KBD_ACK);
                if value == KBD_RESET {
                    self.push_output(KBD_SELF_TEST_OK);
                }
            }
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() != 1 {
            return;
        }
        data[0] = match offset {
            DATA_OFFSET => self.output.pop_front().map_or(0, |(byte, _)| byte),
            COMMAND_OFFSET => self.status(),
            _ => 0,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else { return };
        match offset {
            DATA_OFFSET => self.data(*value),
            COMMAND_OFFSET => self.command(*value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_requests_guest_reset() {
        let exit = ExitSignal::new().unwrap();
        let mut dev = I8042::new(exit.clone(), None, None);
        dev.write(COMMAND_OFFSET, &[0xaa]);
        assert_eq!(exit.reason(), None);
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestReset));
    }

    #[test]
    fn output_port_reset_line() {
        let exit = ExitSignal::new().unwrap();
        let mut dev = I8042::new(exit.clone(), None, None);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_OUTPUT_PORT]);
        dev.write(DATA_OFFSET, &[0x01]);
        assert_eq!(exit.reason(), None);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_OUTPUT_PORT]);
        dev.write(DATA_OFFSET, &[0x00]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestReset));
    }

    #[test]
    fn command_byte_round_trip_and_self_test() {
        let mut dev = I8042::new(ExitSignal::new().unwrap(), None, None);
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_ne!(read(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x64);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[0x47]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x47);
        dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut dev, DATA_OFFSET), SELF_TEST_OK);
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn keyboard_bytes_are_acked_with_interrupt_when_enabled() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(
            ExitSignal::new().unwrap(),
            Some(IrqLine(irq.try_clone().unwrap())),
            None,
        );
        dev.write(DATA_OFFSET, &[KBD_RESET]);
        assert!(irq.read().is_err(), "interrupts still disabled");
        assert_eq!(read(&mut dev, DATA_OFFSET), KBD_ACK);
        assert_eq!(read(&mut dev, DATA_OFFSET), KBD_SELF_TEST_OK);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[CTR_KBD_INT]);
        dev.write(DATA_OFFSET, &[0xf4]);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(read(&mut dev, DATA_OFFSET), KBD_ACK);
    }

    #[test]
    fn aux_loopback_raises_irq_12_when_enabled() {
        let aux = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(
            ExitSignal::new().unwrap(),
            None,
            Some(IrqLine(aux.try_clone().unwrap())),
        );
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[CTR_AUX_INT]);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_AUX_OUTPUT]);
        dev.write(DATA_OFFSET, &[0xa5]);
        assert_eq!(aux.read().unwrap(), 1);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0xa5);
    }

    #[test]
    fn aux_loopback_and_disable_bit() {
        let mut dev = I8042::new(ExitSignal::new().unwrap(), None, None);
        assert_ne!(read(&mut dev, COMMAND_OFFSET) & STATUS_NOT_INHIBITED, 0);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_AUX_OUTPUT]);
        dev.write(DATA_OFFSET, &[0x5a]);
        let status = read(&mut dev, COMMAND_OFFSET);
        assert_eq!(status & (STATUS_OUTPUT_FULL | STATUS_AUX_DATA), 0x21);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x5a);
        dev.write(COMMAND_OFFSET, &[CMD_AUX_ENABLE]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, DATA_OFFSET) & CTR_AUX_DISABLE, 0);
        dev.write(COMMAND_OFFSET, &[CMD_AUX_DISABLE]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_ne!(read(&mut dev, DATA_OFFSET) & CTR_AUX_DISABLE, 0);
    }

    #[test]
    fn output_fifo_is_bounded() {
        let mut dev = I8042::new(ExitSignal::new().unwrap(), None, None);
        for _ in 0..100 {
            dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        }
        let mut count = 0;
        while read(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL != 0 {
            read(&mut dev, DATA_OFFSET);
            count += 1;
        }
        assert_eq!(count, OUTPUT_CAPACITY);
    }
}
