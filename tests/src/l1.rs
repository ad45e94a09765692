//! The L1 Linux: which kernel boots it and which of its modules it loads.
//!
//! We use Debian's `linux-image-cloud-amd64` (installed by `scripts/setup.sh`):
//! it boots in about two seconds under TCG and ships `kvm-amd` as a module,
//! which gives the L1 a real `/dev/kvm` on QEMU's emulated SVM. Modules are
//! resolved through the kernel's own `modules.dep`, dependencies first.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// Errors finding the L1 kernel or its modules.
#[derive(Debug, thiserror::Error)]
pub enum L1Error {
    /// No kernel image was found.
    #[error(
        "no L1 kernel found (looked for {0}); install one with `apt-get install linux-image-cloud-amd64` or set KINDLING_L1_KERNEL"
    )]
    NoKernel(String),
    /// The modules directory of the kernel is missing or unreadable.
    #[error("cannot read {path}: {source}")]
    Modules {
        /// The file that could not be read.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A requested module is not in `modules.dep` (and not built in).
    #[error("module {0} is neither in modules.dep nor built into the L1 kernel {1}")]
    UnknownModule(String, String),
}

/// An L1 kernel image with its release string and module tree.
#[derive(Debug, Clone)]
pub struct L1Kernel {
    /// Path of the bzImage.
    pub image: PathBuf,
    /// Kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// `/lib/modules/<release>`.
    pub modules_dir: PathBuf,
}

impl L1Kernel {
    /// Finds the L1 kernel: `$KINDLING_L1_KERNEL` if set, else the newest
    /// `/boot/vmlinuz-*-cloud-amd64`.
    pub fn find() -> Result<L1Kernel, L1Error> {
        if let Ok(path) = std::env::var("KINDLING_L1_KERNEL") {
            let image = PathBuf::from(&path);
            let release = image
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .ok_or_else(|| {
                    L1Error::NoKernel(format!("{path} (name must be vmlinuz-<release>)"))
                })?
                .to_string();
            return Ok(Self::from_release(image, release));
        }
        let mut candidates: Vec<String> = std::fs::read_dir("/boot")
            .map_err(|_| L1Error::NoKernel("/boot/vmlinuz-*-cloud-amd64".into()))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|n| n.strip_prefix("vmlinuz-").map(str::to_string))
            .filter(|r| r.ends_with("-cloud-amd64"))
            .collect();
        candidates.sort_by_key(|r| version_key(r));
        let release = candidates
            .pop()
            .ok_or_else(|| L1Error::NoKernel("/boot/vmlinuz-*-cloud-amd64".into()))?;
        Ok(Self::from_release(
            PathBuf::from(format!("/boot/vmlinuz-{release}")),
            release,
        ))
    }

    fn from_release(image: PathBuf, release: String) -> L1Kernel {
        let modules_dir = PathBuf::from(format!("/lib/modules/{release}"));
        L1Kernel {
            image,
            release,
            modules_dir,
        }
    }

    /// Resolves module names (as `modprobe` takes them) to `.ko` paths,
    /// dependencies first and each once. Built-in modules resolve to nothing.
    pub fn resolve_modules(&self, names: &[String]) -> Result<Vec<PathBuf>, L1Error> {
        let read = |file: &str| {
            let path = self.modules_dir.join(file);
            std::fs::read_to_string(&path).map_err(|source| L1Error::Modules { path, source })
        };
        let deps = parse_modules_dep(&read("modules.dep")?);
        let builtin = read("modules.builtin").unwrap_or_default();
        let builtin: HashSet<String> = builtin.lines().map(|l| module_name(Path::new(l))).collect();
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        for name in names {
            let key = normalize(name);
            if builtin.contains(&key) {
                continue;
            }
            if !deps.contains_key(&key) {
                return Err(L1Error::UnknownModule(name.clone(), self.release.clone()));
            }
            visit(&key, &deps, &mut seen, &mut order);
        }
        Ok(order
            .into_iter()
            .map(|rel| self.modules_dir.join(rel))
            .collect())
    }
}

/// A parsed `modules.dep`: module name to (relative path, dependency names).
type DepMap = BTreeMap<String, (String, Vec<String>)>;

fn visit(key: &str, deps: &DepMap, seen: &mut HashSet<String>, order: &mut Vec<String>) {
    if !seen.insert(key.to_string()) {
        return;
    }
    if let Some((path, needs)) = deps.get(key) {
        for dep in needs {
            visit(dep, deps, seen, order);
        }
        order.push(path.clone());
    }
}

/// Parses `modules.dep` lines of the form `path/a.ko: path/b.ko path/c.ko`.
fn parse_modules_dep(text: &str) -> DepMap {
    text.lines()
        .filter_map(|line| {
            let (module, deps) = line.split_once(':')?;
            let needs = deps
                .split_whitespace()
                .map(|d| module_name(Path::new(d)))
                .collect();
            Some((module_name(Path::new(module)), (module.to_string(), needs)))
        })
        .collect()
}

/// `kernel/arch/x86/kvm/kvm-amd.ko` -> `kvm_amd`.
fn module_name(path: &Path) -> String {
    let file = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let stem = file.split(".ko").next().unwrap_or(file);
    normalize(stem)
}

fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// Sort key for kernel releases: the numeric runs, compared as numbers.
fn version_key(release: &str) -> Vec<u64> {
    release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko\n\
kernel/arch/x86/kvm/kvm-amd.ko: kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko\n\
kernel/virt/lib/irqbypass.ko:\n\
kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio.ko\n\
kernel/drivers/virtio/virtio.ko:\n";

    fn kernel_with(dep: &str, builtin: &str) -> (tempfile::TempDir, L1Kernel) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("modules.dep"), dep).unwrap();
        std::fs::write(dir.path().join("modules.builtin"), builtin).unwrap();
        let k = L1Kernel {
            image: PathBuf::from("/nonexistent"),
            release: "test".into(),
            modules_dir: dir.path().to_path_buf(),
        };
        (dir, k)
    }

    #[test]
    fn resolves_dependencies_first_and_once() {
        let (_d, k) = kernel_with(DEP, "");
        let got = k
            .resolve_modules(&["kvm-amd".into(), "kvm".into(), "virtio_blk".into()])
            .unwrap();
        let rel: Vec<_> = got
            .iter()
            .map(|p| {
                p.strip_prefix(&k.modules_dir)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(
            rel,
            [
                "kernel/virt/lib/irqbypass.ko",
                "kernel/arch/x86/kvm/kvm.ko",
                "kernel/arch/x86/kvm/kvm-amd.ko",
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/block/virtio_blk.ko.xz",
            ]
        );
    }

    #[test]
    fn builtin_modules_need_nothing_and_unknown_ones_fail() {
        let (_d, k) = kernel_with(DEP, "kernel/fs/ext4/ext4.ko\n");
        assert!(k.resolve_modules(&["ext4".into()]).unwrap().is_empty());
        let err = k.resolve_modules(&["nope".into()]).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn newest_release_sorts_last() {
        let mut v = [
            "6.1.0-9-cloud-amd64",
            "6.1.0-56-cloud-amd64",
            "6.1.0-10-cloud-amd64",
        ];
        v.sort_by_key(|r| version_key(r));
        assert_eq!(v.last(), Some(&"6.1.0-56-cloud-amd64"));
    }
}
