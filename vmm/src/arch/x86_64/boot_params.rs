//! The boot information a kernel reads at entry: the memory map (e820) and
//! either the Linux "zero page" (`boot_params`, 64-bit boot protocol) or the
//! PVH `hvm_start_info`. Both are written through linux-loader's boot
//! configurators.
//!
//! Guest RAM is laid out as one region below the 32-bit MMIO gap and, for
//! large guests, one region from 4 GiB up. The e820 map reports RAM as
//! `[0, EBDA_START)` (the MP table lives above it) and `[1 MiB, end)` per
//! region; the legacy hole and the MMIO gap are absent, i.e. reserved.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::{
    EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START, PVH_INFO_START, PVH_MEMMAP_START,
    ZERO_PAGE_START,
};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;
/// Magic of `hvm_start_info` ("xEn3" with the top bit set).
pub const PVH_START_MAGIC: u32 = 0x336e_c578;
/// `boot_params.hdr.boot_flag` value.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `boot_params.hdr.header` value ("HdrS").
const HDRS_MAGIC: u32 = 0x5372_6448;
/// Loader type "undefined" (0xff): not one of the registered boot loaders.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Alignment the kernel is relocated to when it is relocatable.
const KERNEL_ALIGNMENT: u32 = 0x0100_0000;
/// `boot_params.e820_table` capacity.
const E820_MAX_ENTRIES_ZEROPAGE: usize = 128;

/// Errors of boot information setup.
#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    /// Guest memory is too small to hold the boot structures and a kernel.
    #[error("guest memory of {0} bytes is too small")]
    MemoryTooSmall(u64),
    /// More memory-map entries than the zero page holds.
    #[error("{0} e820 entries do not fit the zero page")]
    TooManyE820Entries(usize),
    /// linux-loader failed to write the structures.
    #[error("cannot write boot parameters: {0}")]
    Write(linux_loader::configurator::Error),
}

/// One entry of the guest memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryMapEntry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// e820 type ([`E820_RAM`] or [`E820_RESERVED`]).
    pub kind: u32,
}

/// The guest RAM ranges for `size` bytes: below the MMIO gap, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > low {
        ranges.push((GuestAddress(MMIO_GAP_END), (size - low) as usize));
    }
    ranges
}

/// The e820 map describing `mem`.
pub fn memory_map<M: GuestMemoryBackend>(mem: &M) -> Result<Vec<MemoryMapEntry>, BootParamsError> {
    let mut map = Vec::new();
    for region in mem.iter() {
        let start = region.start_addr().0;
        let end = start + region.len();
        if start == 0 {
            if end <= HIMEM_START {
                return Err(BootParamsError::MemoryTooSmall(end));
            }
            map.push(MemoryMapEntry {
                addr: 0,
                size: EBDA_START,
                kind: E820_RAM,
            });
            map.push(MemoryMapEntry {
                addr: HIMEM_START,
                size: end - HIMEM_START,
                kind: E820_RAM,
            });
        } else {
            map.push(MemoryMapEntry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    if map.is_empty() {
        return Err(BootParamsError::MemoryTooSmall(0));
    }
    Ok(map)
}

/// Builds the Linux zero page. `header` is the bzImage's setup header, or
/// `None` for an ELF vmlinux.
pub fn linux_boot_params(
    header: Option<setup_header>,
    cmdline_addr: GuestAddress,
    cmdline_size: usize,
    map: &[MemoryMapEntry],
) -> Result<boot_params, BootParamsError> {
    if map.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(BootParamsError::TooManyE820Entries(map.len()));
    }
    let mut params = boot_params::default();
    if let Some(header) = header {
        params.hdr = header;
    } else {
        params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
    }
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = cmdline_addr.0 as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    for (slot, entry) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    Ok(params)
}

/// Writes the Linux zero page at [`ZERO_PAGE_START`].
pub fn write_linux_boot_params<M: GuestMemoryBackend>(
    mem: &M,
    params: &boot_params,
) -> Result<(), BootParamsError> {
    LinuxBootConfigurator::write_bootparams::<M>(
        &BootParams::new::<boot_params>(params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootParamsError::Write)
}

/// Writes `hvm_start_info` at [`PVH_INFO_START`] and its memory map at
/// [`PVH_MEMMAP_START`].
pub fn write_pvh_start_info<M: GuestMemoryBackend>(
    mem: &M,
    cmdline_addr: GuestAddress,
    map: &[MemoryMapEntry],
) -> Result<(), BootParamsError> {
    let memmap: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let start_info = hvm_start_info {
        magic: PVH_START_MAGIC,
        version: 1,
        cmdline_paddr: cmdline_addr.0,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams::<M>(&params, mem).map_err(BootParamsError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap};

    #[test]
    fn small_guest_has_one_region() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let ranges = ram_ranges(4 << 30);
        assert_eq!(ranges[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(ranges[1], (GuestAddress(MMIO_GAP_END), (1 << 30) as usize));
    }

    #[test]
    fn e820_leaves_holes_for_mptable_and_legacy_area() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let map = memory_map(&mem).unwrap();
        assert_eq!(
            map,
            vec![
                MemoryMapEntry {
                    addr: 0,
                    size: EBDA_START,
                    kind: E820_RAM
                },
                MemoryMapEntry {
                    addr: HIMEM_START,
                    size: (64 << 20) - HIMEM_START,
                    kind: E820_RAM
                },
            ]
        );
        let tiny = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert!(matches!(
            memory_map(&tiny),
            Err(BootParamsError::MemoryTooSmall(_))
        ));
    }

    #[test]
    fn zero_page_carries_cmdline_and_e820() {
        let map = [MemoryMapEntry {
            addr: 0,
            size: 0x1000,
            kind: E820_RAM,
        }];
        let params = linux_boot_params(None, GuestAddress(0x20000), 42, &map).unwrap();
        assert_eq!({ params.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ params.hdr.cmdline_size }, 42);
        assert_eq!({ params.hdr.header }, HDRS_MAGIC);
        assert_eq!({ params.hdr.boot_flag }, BOOT_FLAG_MAGIC);
        assert_eq!(params.e820_entries, 1);
        assert_eq!({ params.e820_table[0].size }, 0x1000);

        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_linux_boot_params(&mem, &params).unwrap();
        let magic: u32 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x202)).unwrap();
        assert_eq!(magic, HDRS_MAGIC);
    }

    #[test]
    fn pvh_start_info_points_to_memmap() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let map = memory_map(&mem).unwrap();
        write_pvh_start_info(&mem, GuestAddress(0x20000), &map).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, PVH_START_MAGIC);
        assert_eq!(info.memmap_entries, 2);
        assert_eq!(info.cmdline_paddr, 0x20000);
        let second: hvm_memmap_table_entry =
            mem.read_obj(GuestAddress(PVH_MEMMAP_START + 24)).unwrap();
        assert_eq!(second.addr, HIMEM_START);
    }
}
