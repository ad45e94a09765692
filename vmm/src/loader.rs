//! Loading the guest kernel and writing everything it reads at entry.
//!
//! The image format is detected from its bytes: an ELF `vmlinux` is loaded
//! at its physical addresses and entered through its PVH entry point when
//! it has one (Xen ELF note), else at `e_entry` in 64-bit mode; a `bzImage`
//! is loaded at 1 MiB and entered at its 64-bit entry (load address +
//! 0x200) with the setup header copied into the zero page.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability, load_cmdline};
use vm_memory::GuestAddress;

use crate::arch::x86_64::boot_params::{
    self, BootParamsError, linux_boot_params, memory_map, write_linux_boot_params,
    write_pvh_start_info,
};
use crate::arch::x86_64::layout::{
    BOOT_STACK_POINTER, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, PVH_INFO_START,
    ZERO_PAGE_START,
};
use crate::arch::x86_64::mptable::{self, MptableError};
use crate::arch::x86_64::regs::{EntryMode, EntryPoint};
use crate::memory::GuestMemory;

/// Offset of the 64-bit entry point from a bzImage's load address.
const BZIMAGE_ENTRY_64_OFFSET: u64 = 0x200;
/// Offset of the "HdrS" magic in a bzImage.
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;

/// The kernel image formats understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An uncompressed ELF `vmlinux`.
    Elf,
    /// A `bzImage`.
    BzImage,
}

/// Errors of kernel loading and boot-information setup.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The kernel file could not be opened or read.
    #[error("kernel {path}: {source}")]
    Io {
        /// The kernel path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The kernel is neither an ELF nor a bzImage.
    #[error("kernel {0}: neither an ELF vmlinux nor a bzImage")]
    UnknownFormat(String),
    /// linux-loader rejected the image.
    #[error("kernel {path}: {source}")]
    Load {
        /// The kernel path.
        path: String,
        /// The loader error.
        source: linux_loader::loader::Error,
    },
    /// The command line is invalid or too long.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// Writing the command line failed.
    #[error("cannot write the kernel command line: {0}")]
    WriteCmdline(linux_loader::loader::Error),
    /// Boot parameters could not be written.
    #[error(transparent)]
    BootParams(#[from] BootParamsError),
    /// The MP table could not be written.
    #[error(transparent)]
    Mptable(#[from] MptableError),
}

/// A kernel in guest memory, ready to be entered.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// The image format.
    pub format: KernelFormat,
    /// Where and how the BSP starts.
    pub entry: EntryPoint,
    /// The bzImage setup header, copied into the zero page.
    pub setup_header: Option<setup_header>,
    /// First guest address past the loaded image.
    pub end: u64,
}

/// Detects the format of the image in `file`.
pub fn detect_format<R: Read + Seek>(file: &mut R) -> std::io::Result<Option<KernelFormat>> {
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(0))?;
    if file.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF" {
        return Ok(Some(KernelFormat::Elf));
    }
    file.seek(SeekFrom::Start(BZIMAGE_MAGIC_OFFSET))?;
    if file.read_exact(&mut magic).is_ok() && magic == *b"HdrS" {
        return Ok(Some(KernelFormat::BzImage));
    }
    Ok(None)
}

/// Loads the kernel at `path` into `mem`.
pub fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<LoadedKernel, LoaderError> {
    let name = path.display().to_string();
    let io_err = |source| LoaderError::Io {
        path: name.clone(),
        source,
    };
    let mut file = File::open(path).map_err(io_err)?;
    let format = detect_format(&mut file)
        .map_err(io_err)?
        .ok_or_else(|| LoaderError::UnknownFormat(name.clone()))?;
    file.seek(SeekFrom::Start(0)).map_err(io_err)?;
    let load_err = |source| LoaderError::Load {
        path: name.clone(),
        source,
    };
    let himem = Some(GuestAddress(HIMEM_START));
    let loaded = match format {
        KernelFormat::Elf => Elf::load(mem, None, &mut file, himem).map_err(load_err)?,
        KernelFormat::BzImage => BzImage::load(mem, None, &mut file, himem).map_err(load_err)?,
    };
    let entry = match (format, loaded.pvh_boot_cap) {
        (KernelFormat::Elf, PvhBootCapability::PvhEntryPresent(address)) => EntryPoint {
            address,
            mode: EntryMode::Pvh32,
            stack_pointer: 0,
            boot_info: GuestAddress(PVH_INFO_START),
        },
        (KernelFormat::Elf, _) => EntryPoint {
            address: loaded.kernel_load,
            mode: EntryMode::Long64,
            stack_pointer: BOOT_STACK_POINTER,
            boot_info: GuestAddress(ZERO_PAGE_START),
        },
        (KernelFormat::BzImage, _) => EntryPoint {
            address: GuestAddress(loaded.kernel_load.0 + BZIMAGE_ENTRY_64_OFFSET),
            mode: EntryMode::Long64,
            stack_pointer: BOOT_STACK_POINTER,
            boot_info: GuestAddress(ZERO_PAGE_START),
        },
    };
    Ok(LoadedKernel {
        format,
        entry,
        setup_header: loaded.setup_header,
        end: loaded.kernel_end,
    })
}

/// Builds the kernel command line: the user's, then `extra` entries
/// (virtio-mmio device descriptions).
pub fn build_cmdline(user: &str, extra: &[String]) -> Result<Cmdline, LoaderError> {
    let mut cmdline = Cmdline::try_from(user, CMDLINE_MAX_SIZE)
        .map_err(|e| LoaderError::Cmdline(e.to_string()))?;
    for item in extra {
        cmdline
            .insert_str(item)
            .map_err(|e| LoaderError::Cmdline(e.to_string()))?;
    }
    Ok(cmdline)
}

/// Writes the command line, the boot parameters matching the entry mode,
/// and the MP table for `vcpus` processors.
pub fn write_boot_info(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    vcpus: u8,
) -> Result<(), LoaderError> {
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(LoaderError::WriteCmdline)?;
    let cmdline_size = cmdline
        .as_cstring()
        .map_err(|e| LoaderError::Cmdline(e.to_string()))?
        .as_bytes_with_nul()
        .len();
    let map = memory_map(mem)?;
    match kernel.entry.mode {
        EntryMode::Pvh32 => write_pvh_start_info(mem, GuestAddress(CMDLINE_START), &map)?,
        EntryMode::Long64 => {
            let params = linux_boot_params(
                kernel.setup_header,
                GuestAddress(CMDLINE_START),
                cmdline_size,
                &map,
            )?;
            write_linux_boot_params(mem, &params)?;
        }
    }
    mptable::write(mem, vcpus)?;
    Ok(())
}

/// Re-exported for callers that only need the memory map.
pub use boot_params::MemoryMapEntry;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use vm_memory::Bytes;

    fn memory() -> GuestMemory {
        crate::memory::allocate(&[(GuestAddress(0), 32 << 20)]).unwrap()
    }

    #[test]
    fn formats_are_detected_from_magic() {
        let mut elf = Cursor::new(b"\x7fELF\x02\x01\x01".to_vec());
        assert_eq!(detect_format(&mut elf).unwrap(), Some(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(
            detect_format(&mut Cursor::new(bz)).unwrap(),
            Some(KernelFormat::BzImage)
        );
        assert_eq!(
            detect_format(&mut Cursor::new(vec![0u8; 16])).unwrap(),
            None
        );
    }

    #[test]
    fn garbage_kernel_is_rejected() {
        let dir = std::env::temp_dir().join(format!("vmm-loader-{}", std::process::id()));
        std::fs::write(&dir, vec![0x5au8; 4096]).unwrap();
        let err = load_kernel(&memory(), &dir).unwrap_err();
        std::fs::remove_file(&dir).unwrap();
        assert!(matches!(err, LoaderError::UnknownFormat(_)));
    }

    #[test]
    fn truncated_elf_is_a_load_error() {
        let path = std::env::temp_dir().join(format!("vmm-loader-elf-{}", std::process::id()));
        std::fs::write(&path, b"\x7fELF\x02\x01\x01\x00").unwrap();
        let err = load_kernel(&memory(), &path).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(err, LoaderError::Load { .. }), "{err}");
    }

    #[test]
    fn cmdline_gets_extra_entries_and_lands_in_memory() {
        let cmdline = build_cmdline(
            "console=ttyS0",
            &["virtio_mmio.device=4K@0xd0000000:5".into()],
        )
        .unwrap();
        let mem = memory();
        let kernel = LoadedKernel {
            format: KernelFormat::Elf,
            entry: EntryPoint {
                address: GuestAddress(0x100_0000),
                mode: EntryMode::Long64,
                stack_pointer: BOOT_STACK_POINTER,
                boot_info: GuestAddress(ZERO_PAGE_START),
            },
            setup_header: None,
            end: 0x200_0000,
        };
        write_boot_info(&mem, &kernel, &cmdline, 2).unwrap();
        let expected = b"console=ttyS0 virtio_mmio.device=4K@0xd0000000:5\0";
        let mut got = vec![0u8; expected.len()];
        mem.read_slice(&mut got, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&got[..], expected);
        let ptr: u32 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x228)).unwrap();
        assert_eq!(u64::from(ptr), CMDLINE_START);
    }

    #[test]
    fn overlong_cmdline_is_rejected() {
        assert!(matches!(
            build_cmdline(&"a".repeat(CMDLINE_MAX_SIZE), &[]),
            Err(LoaderError::Cmdline(_))
        ));
    }
}
