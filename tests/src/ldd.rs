//! Finds the shared libraries a host binary needs, so that it can run inside
//! the L1's initramfs (which has no libc of its own).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Errors resolving shared libraries.
#[derive(Debug, thiserror::Error)]
pub enum LddError {
    /// `ldd` could not be run.
    #[error("cannot run ldd on {path}: {source}")]
    Spawn {
        /// The binary.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A library the binary needs is missing on the host.
    #[error("{binary} needs {library}, which is not found on this host")]
    Missing {
        /// The binary.
        binary: PathBuf,
        /// The missing library.
        library: String,
    },
}

/// The absolute paths of the shared objects `binary` loads, including its
/// ELF interpreter; empty for a static binary.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, LddError> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|source| LddError::Spawn {
            path: binary.to_path_buf(),
            source,
        })?;
    // ldd exits non-zero with "not a dynamic executable" for static binaries.
    let text = String::from_utf8_lossy(&out.stdout);
    parse_ldd(&text).map_err(|library| LddError::Missing {
        binary: binary.to_path_buf(),
        library,
    })
}

/// Parses `ldd` output; `Err(name)` for a library ldd could not find.
fn parse_ldd(text: &str) -> Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some((name, rest)) = line.split_once("=>") {
            let target = rest.split_whitespace().next().unwrap_or("");
            if target == "not" {
                return Err(name.trim().to_string());
            }
            if target.starts_with('/') {
                libs.push(PathBuf::from(target));
            }
        } else if line.starts_with('/')
            && let Some(path) = line.split_whitespace().next()
        {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dynamic_binary() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }

    #[test]
    fn static_binary_needs_nothing_and_missing_library_is_an_error() {
        assert!(
            parse_ldd("\tnot a dynamic executable\n")
                .unwrap()
                .is_empty()
        );
        assert!(parse_ldd("\tstatically linked\n").unwrap().is_empty());
        assert_eq!(
            parse_ldd("\tlibfoo.so.1 => not found\n").unwrap_err(),
            "libfoo.so.1"
        );
    }

    #[test]
    fn finds_the_libraries_of_a_real_binary() {
        let libs = shared_libraries(Path::new("/bin/sh")).unwrap();
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libs:?}"
        );
    }
}
