//! Which files the VMM binary needs to run: its ELF interpreter and shared
//! libraries, so the jail can hold exactly those.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::error::{JailerError, io};

/// The ELF interpreter of `exe` (None for a static binary).
pub(crate) fn interpreter(exe: &Path) -> Result<Option<PathBuf>, JailerError> {
    let data = std::fs::read(exe).map_err(io(format!("reading {}", exe.display())))?;
    let bad = || JailerError::Invalid(format!("{} is not a 64-bit ELF file", exe.display()));
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 {
        return Err(bad());
    }
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    };
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let phoff = u64_at(0x20).ok_or_else(bad)? as usize;
    let phentsize = u16_at(0x36).ok_or_else(bad)? as usize;
    let phnum = u16_at(0x38).ok_or_else(bad)? as usize;
    for i in 0..phnum {
        let ph = phoff
            .checked_add(i.checked_mul(phentsize).ok_or_else(bad)?)
            .ok_or_else(bad)?;
        let kind = data.get(ph..ph + 4).ok_or_else(bad)?;
        if kind == 3u32.to_le_bytes() {
            // PT_INTERP: p_offset at +8, p_filesz at +32.
            let off = u64_at(ph + 8).ok_or_else(bad)? as usize;
            let len = u64_at(ph + 32).ok_or_else(bad)? as usize;
            let raw = data.get(off..off.saturating_add(len)).ok_or_else(bad)?;
            let raw = raw.split(|&b| b == 0).next().unwrap_or_default();
            return Ok(Some(PathBuf::from(OsStr::from_bytes(raw))));
        }
    }
    Ok(None)
}

/// The VMM binary's shared libraries and loader (`ld.so --list`), so the
/// jail can hold exactly those files.
pub(crate) fn shared_libraries(exe: &Path) -> Result<Vec<PathBuf>, JailerError> {
    let Some(interp) = interpreter(exe)? else {
        return Ok(Vec::new());
    };
    let out = std::process::Command::new(&interp)
        .arg("--list")
        .arg(exe)
        .env_clear()
        .output()
        .map_err(io(format!("running {} --list", interp.display())))?;
    if !out.status.success() {
        return Err(JailerError::Invalid(format!(
            "{} --list {} failed: {}",
            interp.display(),
            exe.display(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let mut libs = vec![interp];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; vdso has no path.
        let path = line.split("=>").last().unwrap_or("").trim();
        let path = path.split(" (").next().unwrap_or("").trim();
        if path.starts_with('/') && !libs.iter().any(|l| l == Path::new(path)) {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_interpreter_and_libraries_of_a_dynamic_binary() {
        let exe = std::env::current_exe().unwrap();
        let interp = interpreter(&exe)
            .unwrap()
            .expect("test binaries are dynamic");
        assert!(interp.to_string_lossy().contains("ld-linux"), "{interp:?}");
        let libs = shared_libraries(&exe).unwrap();
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libs:?}"
        );
        assert!(
            libs.iter().all(|l| l.is_absolute() && l.exists()),
            "{libs:?}"
        );
    }

    #[test]
    fn a_non_elf_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-elf");
        std::fs::write(&path, b"#!/bin/sh\n").unwrap();
        let err = interpreter(&path).unwrap_err().to_string();
        assert!(err.contains("not a 64-bit ELF"), "{err}");
    }
}
