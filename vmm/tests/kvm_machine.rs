//! KVM tests of the assembled machine with tiny hand-written guests: serial
//! output, the boot timer, i8042 reset, triple fault, and prompt stop with
//! all vCPU threads joined. Skipped (with a message) without /dev/kvm.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm::config::{SerialOutput, VmConfig};
use vmm::lifecycle::{ExitReason, ExitSignal};
use vmm::machine::{BootSource, Machine};

const CODE_ADDRESS: u64 = 0x1000;

/// mov dx,0x3f8; out "hi\n"; mov dx,0x440; out 0x7b; out 0x64,0xfe; jmp $
const SERIAL_TIMER_RESET: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, 0xb0, 0x68, 0xee, 0xb0, 0x69, 0xee, 0xb0, 0x0a, 0xee, 0x66, 0xba, 0x40,
    0x04, 0xb0, 0x7b, 0xee, 0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe,
];
/// ud2 with an empty IDT: #UD -> #GP -> #DF -> triple fault.
const UD2: &[u8] = &[0x0f, 0x0b];
/// jmp $
const SPIN: &[u8] = &[0xeb, 0xfe];

fn kvm_available() -> bool {
    if Path::new("/dev/kvm").exists() {
        true
    } else {
        println!("SKIPPED: /dev/kvm is absent");
        false
    }
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vmm-test-{}-{name}", std::process::id()))
}

fn config(vcpus: u8, serial: &Path) -> VmConfig {
    let mut config = VmConfig::with_kernel("/unused");
    config.vcpus = vcpus;
    config.memory_mib = 16;
    config.serial.output = SerialOutput::File(serial.to_path_buf());
    config.boot_timer = true;
    config
}

fn flat(code: &[u8]) -> BootSource {
    BootSource::Flat64 {
        code: code.to_vec(),
        address: CODE_ADDRESS,
    }
}

#[test]
fn serial_boot_timer_and_i8042_reset() {
    if !kvm_available() {
        return;
    }
    for vcpus in [1, 2] {
        let serial = temp_path(&format!("serial-{vcpus}"));
        let exit = ExitSignal::new().unwrap();
        let machine = Machine::build(&config(vcpus, &serial), &flat(SERIAL_TIMER_RESET), exit)
            .expect("build");
        let marks = machine.boot_marks();
        let reason = machine.run().expect("run");
        assert_eq!(reason, ExitReason::GuestReset);
        assert_eq!(reason.exit_code(), 0);
        assert_eq!(std::fs::read(&serial).unwrap(), b"hi\n");
        std::fs::remove_file(&serial).unwrap();
        let marks = marks.lock().unwrap();
        assert_eq!(marks.len(), 1);
        assert_eq!(marks[0].value, 0x7b);
    }
}

#[test]
fn triple_fault_is_an_error_exit() {
    if !kvm_available() {
        return;
    }
    let serial = temp_path("serial-tf");
    let machine =
        Machine::build(&config(1, &serial), &flat(UD2), ExitSignal::new().unwrap()).unwrap();
    let reason = machine.run().unwrap();
    std::fs::remove_file(&serial).unwrap();
    assert_eq!(reason, ExitReason::TripleFault { vcpu: 0 });
    assert_ne!(reason.exit_code(), 0);
}

#[test]
fn stop_request_ends_a_spinning_guest_promptly() {
    if !kvm_available() {
        return;
    }
    let serial = temp_path("serial-spin");
    let exit = ExitSignal::new().unwrap();
    let machine = Machine::build(&config(2, &serial), &flat(SPIN), exit.clone()).unwrap();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        let asked = Instant::now();
        exit.request(ExitReason::Signal(libc::SIGTERM));
        asked
    });
    let reason = machine.run().unwrap();
    let stopped = Instant::now();
    let asked = stopper.join().unwrap();
    std::fs::remove_file(&serial).unwrap();
    assert_eq!(reason, ExitReason::Signal(libc::SIGTERM));
    assert_eq!(reason.exit_code(), 143);
    let latency = stopped - asked;
    assert!(latency < Duration::from_secs(1), "stop took {latency:?}");
}
