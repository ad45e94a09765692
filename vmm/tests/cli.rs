//! Tests of the `vmm` binary: configuration errors exit 2 naming the field
//! before anything is created; with /dev/kvm, tiny ELF "kernels" check the
//! exit codes of a guest reset (0), a triple fault (1, reason on stderr) and
//! SIGTERM (143, promptly), and that a guest looping on the boot timer
//! leaves a bounded log, capped by `--log-max-bytes`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn vmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmm"))
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vmm-cli-{}-{name}", std::process::id()))
}

fn run(args: &[&str]) -> Output {
    vmm().args(args).output().expect("spawn vmm")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn invalid_configurations_exit_2_naming_the_field() {
    let cases: [(&[&str], &str); 5] = [
        (&["--kernel", "/nonexistent/vmlinux"], "kernel:"),
        (&["--kernel", "/proc/self/exe", "--vcpus", "0"], "vcpus:"),
        (
            &["--kernel", "/proc/self/exe", "--memory-mib", "1"],
            "memory_mib:",
        ),
        (
            &[
                "--kernel",
                "/proc/self/exe",
                "--vsock",
                "cid=1,uds=/tmp/x.sock",
            ],
            "vsock.guest_cid:",
        ),
        (
            &[
                "--kernel",
                "/proc/self/exe",
                "--drive",
                "path=/nonexistent.img",
            ],
            "drives[0].path:",
        ),
    ];
    for (args, field) in cases {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(field), "{args:?}: {}", stderr(&out));
    }
    let out = run(&["--kernel", "/k", "--drive", "ro"]);
    assert_eq!(out.status.code(), Some(2), "clap usage error");
}

#[test]
fn json_config_is_validated_too() {
    let path = temp("bad.json");
    std::fs::write(&path, r#"{"kernel":"/proc/self/exe","vcpus":99}"#).unwrap();
    let out = run(&["--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("vcpus:"), "{}", stderr(&out));
    std::fs::write(&path, r#"{"kernel":"/proc/self/exe","vcpu":1}"#).unwrap();
    let out = run(&["--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("unknown field"), "{}", stderr(&out));
    std::fs::remove_file(&path).unwrap();
}

/// Writes a minimal ELF64 executable whose one PT_LOAD segment puts `code`
/// at 1 MiB, entered there in 64-bit mode.
fn tiny_elf(path: &Path, code: &[u8]) {
    const LOAD: u64 = 0x10_0000;
    const OFFSET: u64 = 0x1000;
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&LOAD.to_le_bytes()); // e_entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for half in [64u16, 56, 1, 64, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for word in [
        OFFSET,
        LOAD,
        LOAD,
        code.len() as u64,
        code.len() as u64,
        0x1000,
    ] {
        elf.extend_from_slice(&word.to_le_bytes());
    }
    elf.resize(OFFSET as usize, 0);
    elf.extend_from_slice(code);
    std::fs::write(path, elf).unwrap();
}

fn kvm_available() -> bool {
    if Path::new("/dev/kvm").exists() {
        true
    } else {
        println!("SKIPPED: /dev/kvm is absent");
        false
    }
}

fn boot(code: &[u8], name: &str) -> (std::process::Child, PathBuf, PathBuf) {
    boot_with(code, name, &[], "info")
}

/// Boots `code` with `extra` flags and `VMM_LOG=log_level`.
fn boot_with(
    code: &[u8],
    name: &str,
    extra: &[&str],
    log_level: &str,
) -> (std::process::Child, PathBuf, PathBuf) {
    let kernel = temp(&format!("{name}.elf"));
    let serial = temp(&format!("{name}.serial"));
    tiny_elf(&kernel, code);
    let child = vmm()
        .args(["--kernel", kernel.to_str().unwrap(), "--memory-mib", "32"])
        .args(["--serial", &format!("file:{}", serial.display())])
        .args(extra)
        .env("VMM_LOG", log_level)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm");
    (child, kernel, serial)
}

#[test]
fn guest_reset_exits_0_with_serial_output() {
    if !kvm_available() {
        return;
    }
    // mov dx,0x3f8; out 'h','i','\n'; mov al,0xfe; out 0x64,al; jmp $
    let code = [
        0x66, 0xba, 0xf8, 0x03, 0xb0, 0x68, 0xee, 0xb0, 0x69, 0xee, 0xb0, 0x0a, 0xee, 0xb0, 0xfe,
        0xe6, 0x64, 0xeb, 0xfe,
    ];
    let (child, kernel, serial) = boot(&code, "reset");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(std::fs::read(&serial).unwrap(), b"hi\n");
    std::fs::remove_file(kernel).unwrap();
    std::fs::remove_file(serial).unwrap();
}

#[test]
fn triple_fault_exits_1_with_reason() {
    if !kvm_available() {
        return;
    }
    let (child, kernel, serial) = boot(&[0x0f, 0x0b], "ud2");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("triple fault"), "{}", stderr(&out));
    std::fs::remove_file(kernel).unwrap();
    std::fs::remove_file(serial).unwrap();
}

#[test]
fn sigterm_stops_a_running_guest_promptly() {
    if !kvm_available() {
        return;
    }
    let (child, kernel, serial) = boot(&[0xeb, 0xfe], "spin");
    std::thread::sleep(Duration::from_millis(300));
    let asked = Instant::now();
    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let out = child.wait_with_output().unwrap();
    let took = asked.elapsed();
    assert_eq!(out.status.code(), Some(143), "{}", stderr(&out));
    assert!(took < Duration::from_secs(2), "stop took {took:?}");
    std::fs::remove_file(kernel).unwrap();
    std::fs::remove_file(serial).unwrap();
}

/// mov edx,0x440; mov ecx,20000; l: out dx,al; inc al; loop l; ud2
const BOOT_TIMER_LOOP: &[u8] = &[
    0xba, 0x40, 0x04, 0x00, 0x00, 0xb9, 0x20, 0x4e, 0x00, 0x00, 0xee, 0xfe, 0xc0, 0xe2, 0xfb, 0x0f,
    0x0b,
];

#[test]
fn a_guest_looping_on_the_boot_timer_writes_a_bounded_log() {
    if !kvm_available() {
        return;
    }
    let (child, kernel, serial) =
        boot_with(BOOT_TIMER_LOOP, "timer-loop", &["--boot-timer"], "info");
    let out = child.wait_with_output().unwrap();
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    let marks = log.matches("boot-timer: guest mark").count();
    assert_eq!(marks, 8, "{log}");
    assert!(log.contains("boot-timer marks: more than 8"), "{log}");
    assert!(log.lines().count() < 40, "{log}");
    assert!(log.contains("triple fault"), "{log}");
    std::fs::remove_file(kernel).unwrap();
    std::fs::remove_file(serial).unwrap();
}

#[test]
fn the_log_stops_at_log_max_bytes_but_keeps_the_exit_reason() {
    if !kvm_available() {
        return;
    }
    let args = ["--boot-timer", "--log-max-bytes", "1024"];
    // Debug lines fill the 1 KiB before the guest's loop ends.
    let (child, kernel, serial) = boot_with(BOOT_TIMER_LOOP, "log-cap", &args, "debug");
    let out = child.wait_with_output().unwrap();
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    let notice = log
        .find("log truncated")
        .unwrap_or_else(|| panic!("no truncation notice: {log}"));
    // Whole lines up to the notice's own line.
    let logged = log[..notice].rfind('\n').map_or(0, |end| end + 1);
    assert!(logged <= 1024, "{logged} bytes before the notice: {log}");
    let after = &log[notice..];
    // The notice's line, then only the VMM's last words (not logged).
    let mut rest = after.lines().skip(1);
    assert!(rest.next().unwrap_or("").contains("triple fault"), "{log}");
    assert_eq!(rest.next(), None, "{log}");
    std::fs::remove_file(kernel).unwrap();
    std::fs::remove_file(serial).unwrap();
}
