//! virtio-blk on a raw image file (virtio 1.2 section 5.2).
//!
//! A request is a descriptor chain holding, in order, a 16-byte header
//! (type, reserved, sector) in driver-readable buffers, the data, and one
//! status byte at the very end of the device-writable buffers. Buffers may
//! be framed any way the driver likes, so requests are read through
//! virtio-queue's `Reader`/`Writer`, never by assuming one descriptor per
//! part.
//!
//! Checks, all before any file access: the header is complete, a status
//! byte exists, data lengths are whole sectors, `sector * 512 + length`
//! neither overflows nor passes the capacity, and writes are refused on a
//! read-only drive (which is also opened `O_RDONLY`). A request failing
//! those gets `VIRTIO_BLK_S_IOERR`; an unknown type gets `UNSUPP`; a chain
//! too broken to carry a status (no header, no writable byte, buffers
//! outside guest memory) is returned with length 0 and logged.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::{Reader, Writer};

use crate::memory::GuestMemory;

use super::{
    Chain, DeviceError, QueueContext, VIRTIO_F_VERSION_1, VirtioDevice, process_queue,
    read_config_bytes,
};

/// Virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Bytes per sector.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request the driver may use (queue size minus header and status).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Size of a request header.
const HEADER_SIZE: usize = 16;
/// Bytes moved between file and guest per copy step.
const CHUNK: usize = 128 << 10;

/// Errors of block device creation.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened or sized.
    #[error("{path}: {source}")]
    Open {
        /// The image path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Why a chain could not even carry a status byte.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MalformedChain {
    /// A buffer lies outside guest memory, or lengths overflow.
    #[error("descriptor buffers are invalid: {0}")]
    Buffers(String),
    /// Fewer than 16 driver-readable bytes.
    #[error("request header is incomplete ({0} bytes)")]
    ShortHeader(usize),
    /// No device-writable byte for the status.
    #[error("no writable status byte")]
    NoStatus,
}

/// A parsed request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// `VIRTIO_BLK_T_*`.
    pub kind: u32,
    /// First sector.
    pub sector: u64,
}

impl RequestHeader {
    /// Decodes the little-endian wire header.
    pub fn from_bytes(bytes: &[u8; HEADER_SIZE]) -> Self {
        let kind = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&bytes[8..16]);
        Self {
            kind,
            sector: u64::from_le_bytes(sector),
        }
    }
}

/// A raw-file block device.
pub struct Block {
    file: File,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    buffer: Vec<u8>,
    malformed: u64,
}

impl Block {
    /// Opens `path` (read-only if asked); `id` is reported by GET_ID
    /// (truncated to 20 bytes).
    pub fn open(path: &Path, read_only: bool, id: &str) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.display().to_string(),
                source,
            })?;
        Self::from_file(file, read_only, id).map_err(|source| BlockError::Open {
            path: path.display().to_string(),
            source,
        })
    }

    /// A device on an already open file.
    pub fn from_file(file: File, read_only: bool, id: &str) -> std::io::Result<Self> {
        use std::io::{Seek, SeekFrom};
        let size = (&file).seek(SeekFrom::End(0))?;
        if !size.is_multiple_of(SECTOR_SIZE) {
            log::warn!(
                "virtio-blk {id}: size {size} is not a multiple of 512; the last {} bytes are not visible",
                size % SECTOR_SIZE
            );
        }
        let mut id_bytes = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let len = id.len().min(id_bytes.len());
        id_bytes[..len].copy_from_slice(&id.as_bytes()[..len]);
        Ok(Self {
            file,
            read_only,
            capacity_sectors: size / SECTOR_SIZE,
            id: id_bytes,
            buffer: vec![0; CHUNK],
            malformed: 0,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Chains dropped because they could not carry a status.
    pub fn malformed_chains(&self) -> u64 {
        self.malformed
    }

    /// Serves one request chain; returns the bytes written into it.
    pub fn serve_chain(
        &mut self,
        mem: &GuestMemory,
        chain: Chain<'_>,
    ) -> Result<u32, MalformedChain> {
        let mut reader: Reader<'_> = chain
            .clone()
            .reader(mem)
            .map_err(|e| MalformedChain::Buffers(e.to_string()))?;
        let mut writer: Writer<'_> = chain
            .writer(mem)
            .map_err(|e| MalformedChain::Buffers(e.to_string()))?;
        let mut header = [0u8; HEADER_SIZE];
        if reader.available_bytes() < HEADER_SIZE || reader.read_exact(&mut header).is_err() {
            return Err(MalformedChain::ShortHeader(reader.available_bytes()));
        }
        let header = RequestHeader::from_bytes(&header);
        let data_len = writer
            .available_bytes()
            .checked_sub(1)
            .ok_or(MalformedChain::NoStatus)?;
        let mut status = writer
            .split_at(data_len)
            .map_err(|e| MalformedChain::Buffers(e.to_string()))?;
        let (code, written) = self.execute(header, &mut reader, &mut writer);
        status
            .write_all(&[code as u8])
            .map_err(|_| MalformedChain::NoStatus)?;
        Ok(written + 1)
    }

    /// Checks that `len` bytes at `sector` are whole sectors inside the disk.
    fn check_range(&self, sector: u64, len: usize) -> Result<u64, ()> {
        let len = len as u64;
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(());
        }
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or(())?;
        let end = offset.checked_add(len).ok_or(())?;
        if end > self.capacity_sectors * SECTOR_SIZE {
            return Err(());
        }
        Ok(offset)
    }

    /// Runs a validated request; returns the status and data bytes written.
    fn execute(
        &mut self,
        header: RequestHeader,
        reader: &mut Reader<'_>,
        writer: &mut Writer<'_>,
    ) -> (u32, u32) {
        match header.kind {
            VIRTIO_BLK_T_IN => {
                let len = writer.available_bytes();
                let Ok(offset) = self.check_range(header.sector, len) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                match self.read_into(offset, len, writer) {
                    Ok(()) => (VIRTIO_BLK_S_OK, len as u32),
                    Err(e) => {
                        crate::limited_log!(
                            kind = "virtio-blk read errors",
                            log::Level::Warn,
                            "virtio-blk: read at {offset}: {e}"
                        );
                        (VIRTIO_BLK_S_IOERR, writer.bytes_written() as u32)
                    }
                }
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let len = reader.available_bytes();
                let Ok(offset) = self.check_range(header.sector, len) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                match self.write_from(offset, len, reader) {
                    Ok(()) => (VIRTIO_BLK_S_OK, 0),
                    Err(e) => {
                        crate::limited_log!(
                            kind = "virtio-blk write errors",
                            log::Level::Warn,
                            "virtio-blk: write at {offset}: {e}"
                        );
                        (VIRTIO_BLK_S_IOERR, 0)
                    }
                }
            }
            VIRTIO_BLK_T_FLUSH => match self.file.sync_data() {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(e) => {
                    crate::limited_log!(
                        kind = "virtio-blk flush errors",
                        log::Level::Warn,
                        "virtio-blk: flush: {e}"
                    );
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            },
            VIRTIO_BLK_T_GET_ID => {
                let len = writer.available_bytes().min(self.id.len());
                match writer.write_all(&self.id[..len]) {
                    Ok(()) => (VIRTIO_BLK_S_OK, len as u32),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }

    fn read_into(
        &mut self,
        mut offset: u64,
        mut len: usize,
        writer: &mut Writer<'_>,
    ) -> std::io::Result<()> {
        while len > 0 {
            let step = len.min(self.buffer.len());
            let chunk = &mut self.buffer[..step];
            self.file.read_exact_at(chunk, offset)?;
            writer.write_all(chunk)?;
            offset += step as u64;
            len -= step;
        }
        Ok(())
    }

    fn write_from(
        &mut self,
        mut offset: u64,
        mut len: usize,
        reader: &mut Reader<'_>,
    ) -> std::io::Result<()> {
        while len > 0 {
            let step = len.min(self.buffer.len());
            let chunk = &mut self.buffer[..step];
            reader.read_exact(chunk)?;
            self.file.write_all_at(chunk, offset)?;
            offset += step as u64;
            len -= step;
        }
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut features =
            VIRTIO_F_VERSION_1 | (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_SEG_MAX);
        if self.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // capacity (le64), size_max (le32, unused), seg_max (le32).
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn queue_notified(
        &mut self,
        queue: usize,
        ctx: &mut QueueContext<'_>,
    ) -> Result<(), DeviceError> {
        process_queue(ctx, queue, |mem, chain| {
            match self.serve_chain(mem, chain) {
                Ok(written) => written,
                Err(e) => {
                    self.malformed += 1;
                    crate::limited_log!(
                        kind = "virtio-blk malformed requests",
                        log::Level::Warn,
                        "virtio-blk: dropped a malformed request: {e}"
                    );
                    0
                }
            }
        })
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::{ChainBuilder, TestQueue};
    use vm_memory::{Bytes, GuestAddress};

    const DATA: u64 = 0x10_0000;

    fn image(sectors: u64, read_only: bool) -> (Block, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!(
            "vmm-blk-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let mut content = vec![0u8; (sectors * SECTOR_SIZE) as usize];
        for (i, byte) in content.iter_mut().enumerate() {
            *byte = (i / 512) as u8;
        }
        std::fs::write(&path, content).unwrap();
        (Block::open(&path, read_only, "test-disk").unwrap(), path)
    }

    fn header(mem: &GuestMemory, at: u64, kind: u32, sector: u64) {
        let mut bytes = [0u8; 16];
        bytes[..4].copy_from_slice(&kind.to_le_bytes());
        bytes[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&bytes, GuestAddress(at)).unwrap();
    }

    fn status(mem: &GuestMemory, at: u64) -> u8 {
        mem.read_obj(GuestAddress(at)).unwrap()
    }

    #[test]
    fn read_request_copies_sectors_and_reports_ok() {
        let (mut blk, path) = image(8, true);
        let q = TestQueue::new();
        header(&q.mem, DATA, VIRTIO_BLK_T_IN, 2);
        let chain = ChainBuilder::new()
            .readable(DATA, 16)
            .writable(DATA + 0x1000, 1024)
            .writable(DATA + 0x2000, 1)
            .build(&q);
        assert_eq!(blk.serve_chain(&q.mem, chain), Ok(1025));
        let mut data = [0u8; 1024];
        q.mem
            .read_slice(&mut data, GuestAddress(DATA + 0x1000))
            .unwrap();
        assert!(data[..512].iter().all(|b| *b == 2) && data[512..].iter().all(|b| *b == 3));
        assert_eq!(status(&q.mem, DATA + 0x2000), VIRTIO_BLK_S_OK as u8);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn header_and_status_may_share_buffers_with_data() {
        let (mut blk, path) = image(4, true);
        let q = TestQueue::new();
        // Header split across two descriptors; data and status in one.
        header(&q.mem, DATA, VIRTIO_BLK_T_IN, 1);
        q.mem
            .write_slice(&[0u8; 8], GuestAddress(DATA + 0x800))
            .unwrap();
        let mut head = [0u8; 16];
        q.mem.read_slice(&mut head, GuestAddress(DATA)).unwrap();
        q.mem
            .write_slice(&head[8..], GuestAddress(DATA + 0x800))
            .unwrap();
        let chain = ChainBuilder::new()
            .readable(DATA, 8)
            .readable(DATA + 0x800, 8)
            .writable(DATA + 0x1000, 513)
            .build(&q);
        assert_eq!(blk.serve_chain(&q.mem, chain), Ok(513));
        assert_eq!(status(&q.mem, DATA + 0x1000 + 512), VIRTIO_BLK_S_OK as u8);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn write_then_flush_reaches_the_file() {
        let (mut blk, path) = image(4, false);
        let q = TestQueue::new();
        header(&q.mem, DATA, VIRTIO_BLK_T_OUT, 3);
        q.mem
            .write_slice(&[0xab; 512], GuestAddress(DATA + 0x1000))
            .unwrap();
        let chain = ChainBuilder::new()
            .readable(DATA, 16)
            .readable(DATA + 0x1000, 512)
            .writable(DATA + 0x2000, 1)
            .build(&q);
        assert_eq!(blk.serve_chain(&q.mem, chain), Ok(1));
        assert_eq!(status(&q.mem, DATA + 0x2000), VIRTIO_BLK_S_OK as u8);
        header(&q.mem, DATA, VIRTIO_BLK_T_FLUSH, 0);
        let chain = ChainBuilder::new()
            .readable(DATA, 16)
            .writable(DATA + 0x2000, 1)
            .build(&q);
        assert_eq!(blk.serve_chain(&q.mem, chain), Ok(1));
        let content = std::fs::read(&path).unwrap();
        assert!(content[3 * 512..].iter().all(|b| *b == 0xab));
        assert!(content[2 * 512..3 * 512].iter().all(|b| *b == 2));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn read_only_drive_refuses_writes() {
        let (mut blk, path) = image(4, true);
        assert_ne!(blk.features() & (1 << VIRTIO_BLK_F_RO), 0);
        let q = TestQueue::new();
        header(&q.mem, DATA, VIRTIO_BLK_T_OUT, 0);
        let chain = ChainBuilder::new()
            .readable(DATA, 16)
            .readable(DATA + 0x1000, 512)
            .writable(DATA + 0x2000, 1)
            .build(&q);
        assert_eq!(blk.serve_chain(&q.mem, chain), Ok(1));
        assert_eq!(status(&q.mem, DATA + 0x2000), VIRTIO_BLK_S_IOERR as u8);
        assert!(std::fs::read(&path).unwrap()[..512].iter().all(|b| *b == 0));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn out_of_range_unaligned_and_overflowing_requests_fail() {
        let (mut blk, path) = image(4, false);
        let q = TestQueue::new();
        for (sector, len) in [(4u64, 512u32), (3, 1024), (0, 100), (u64::MAX / 256, 512)] {
            header(&q.mem, DATA, VIRTIO_BLK_T_IN, sector);
            q.mem
                .write_obj(0xffu8, GuestAddress(DATA + 0x3000))
                .unwrap();
            let chain = ChainBuilder::new()
                .readable(DATA, 16)
                .writable(DATA + 0x1000, len)
                .writable(DATA + 0x3000, 1)
                .build(&q);
            assert_eq!(
                blk.serve_chain(&q.mem, chain),
                Ok(1),
                "sector {sector} len {len}"
            );
            assert_eq!(status(&q.mem, DATA + 0x3000), VIRTIO_BLK_S_IOERR as u8);
        }
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn get_id_and_unknown_types() {
        let (mut blk, path) = image(1, true);
        let q = TestQueue::new();
        header(&q.mem, DATA, VIRTIO_BLK_T_GET_ID, 0);
        let chain = ChainBuilder::new()
            .readable(DATA, 16)
            .writable(DATA + 0x1000, 21)
            .build(&q);
        assert_eq!(blk.serve_chain(&q.mem, chain), Ok(21));
        let mut id = [0u8; 9];
        q.mem
            .read_slice(&mut id, GuestAddress(DATA + 0x1000))
            .unwrap();
        assert_eq!(&id, b"test-disk");
        header(&q.mem, DATA, 0x1234, 0);
        let chain = ChainBuilder::new()
            .readable(DATA, 16)
            .writable(DATA + 0x2000, 1)
            .build(&q);
        assert_eq!(blk.serve_chain(&q.mem, chain), Ok(1));
        assert_eq!(status(&q.mem, DATA + 0x2000), VIRTIO_BLK_S_UNSUPP as u8);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn malformed_chains_are_rejected_without_touching_memory() {
        let (mut blk, path) = image(1, false);
        let q = TestQueue::new();
        header(&q.mem, DATA, VIRTIO_BLK_T_IN, 0);
        // No status byte.
        let chain = ChainBuilder::new().readable(DATA, 16).build(&q);
        assert_eq!(
            blk.serve_chain(&q.mem, chain),
            Err(MalformedChain::NoStatus)
        );
        // Short header.
        let chain = ChainBuilder::new()
            .readable(DATA, 8)
            .writable(DATA + 0x1000, 1)
            .build(&q);
        assert_eq!(
            blk.serve_chain(&q.mem, chain),
            Err(MalformedChain::ShortHeader(8))
        );
        // Data buffer beyond guest memory.
        let chain = ChainBuilder::new()
            .readable(DATA, 16)
            .writable(0xffff_f000, 512)
            .writable(DATA + 0x1000, 1)
            .build(&q);
        assert!(matches!(
            blk.serve_chain(&q.mem, chain),
            Err(MalformedChain::Buffers(_))
        ));
        // Only writable descriptors: no header at all.
        let chain = ChainBuilder::new().writable(DATA, 600).build(&q);
        assert_eq!(
            blk.serve_chain(&q.mem, chain),
            Err(MalformedChain::ShortHeader(0))
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn config_space_reports_capacity() {
        let (blk, path) = image(8, false);
        let mut capacity = [0u8; 8];
        blk.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), 8);
        let mut seg_max = [0u8; 4];
        blk.read_config(12, &mut seg_max);
        assert_eq!(u32::from_le_bytes(seg_max), SEG_MAX);
        std::fs::remove_file(path).unwrap();
    }
}
