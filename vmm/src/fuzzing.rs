//! Fuzz bodies for the guest-facing parsers, shared by the cargo-fuzz
//! targets in `vmm/fuzz` and by `cargo test` (which runs them over a fixed
//! set of mutated inputs, so they cannot rot).
//!
//! Each body lays the input out in a small guest memory as a driver would:
//!
//! ```text
//! 0x000  descriptor table, 16 entries (256 bytes, raw from the input)
//! 0x100  available ring: flags, idx (= 1 + input byte % 16), 16 heads
//! 0x200  used ring
//! 0x1000 buffers: the rest of the input
//! ```
//!
//! and runs the device's queue processing on it. Descriptors may point
//! anywhere, loop, or lie about lengths: the device must neither panic nor
//! touch memory outside the guest's.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::OnceLock;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::devices::virtio::block::Block;
use crate::devices::virtio::net::{Net, SocketFrames};
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{Interrupt, QueueContext, VirtioDevice};
use crate::event_loop::{EventLoop, Registrar};
use crate::memory::{self, GuestMemory};

const QUEUE_SIZE: u16 = 16;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x100;
const USED_RING: u64 = 0x200;
const BUFFERS: u64 = 0x1000;
const MEMORY_SIZE: usize = 0x10000;

fn guest_memory(data: &[u8]) -> Option<GuestMemory> {
    let mem = memory::allocate(&[(GuestAddress(0), MEMORY_SIZE)]).ok()?;
    let table_len = (QUEUE_SIZE as usize * 16).min(data.len());
    mem.write_slice(&data[..table_len], GuestAddress(DESC_TABLE))
        .ok()?;
    let rest = &data[table_len..];
    let entries = rest.first().map_or(1, |b| 1 + u16::from(*b) % QUEUE_SIZE);
    mem.write_obj(0u16, GuestAddress(AVAIL_RING)).ok()?;
    mem.write_obj(entries, GuestAddress(AVAIL_RING + 2)).ok()?;
    for i in 0..QUEUE_SIZE {
        let head = rest.get(1 + i as usize).map_or(i, |b| u16::from(*b));
        mem.write_obj(head, GuestAddress(AVAIL_RING + 4 + 2 * u64::from(i)))
            .ok()?;
    }
    let buffers = rest.get(1 + QUEUE_SIZE as usize..).unwrap_or(&[]);
    let len = buffers.len().min(MEMORY_SIZE - BUFFERS as usize);
    mem.write_slice(&buffers[..len], GuestAddress(BUFFERS))
        .ok()?;
    Some(mem)
}

fn configured_queue() -> Option<Queue> {
    let mut queue = Queue::new(QUEUE_SIZE).ok()?;
    queue.set_size(QUEUE_SIZE);
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_ready(true);
    Some(queue)
}

struct Harness {
    _event_loop: EventLoop,
    registrar: Registrar,
    interrupt: Interrupt,
}

fn harness() -> Option<Harness> {
    let mut event_loop = EventLoop::new().ok()?;
    let registrar = event_loop.registrar();
    let interrupt = Interrupt::new(EventFd::new(EFD_NONBLOCK).ok()?);
    Some(Harness {
        _event_loop: event_loop,
        registrar,
        interrupt,
    })
}

fn run_device(device: &mut dyn VirtioDevice, queue_index: usize, data: &[u8]) {
    let Some(mem) = guest_memory(data) else {
        return;
    };
    let Some(h) = harness() else { return };
    let mut queues = Vec::new();
    for (i, size) in device.queue_max_sizes().into_iter().enumerate() {
        let queue = if i == queue_index {
            configured_queue()
        } else {
            Queue::new(size).ok()
        };
        let Some(queue) = queue else { return };
        queues.push(queue);
    }
    let mut ctx = QueueContext {
        mem: &mem,
        queues: &mut queues,
        interrupt: &h.interrupt,
        registrar: &h.registrar,
    };
    // Errors are the expected outcome for most inputs; panics are the bug.
    let _ = device.activate(device.features(), &mut ctx);
    let _ = device.queue_notified(queue_index, &mut ctx);
    device.reset(&h.registrar);
}

fn scratch_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vmm-fuzz-{}-{name}", std::process::id()))
}

/// Runs one virtio-blk request queue over `data`.
pub fn fuzz_block_queue(data: &[u8]) {
    static DISK: OnceLock<PathBuf> = OnceLock::new();
    let path = DISK.get_or_init(|| {
        let path = scratch_path("disk");
        let _ = std::fs::write(&path, vec![0u8; 8 * 512]);
        path
    });
    let Ok(mut block) = Block::open(path, false, "fuzz") else {
        return;
    };
    run_device(&mut block, 0, data);
}

/// Runs one virtio-vsock TX queue (and the RX answers) over `data`. A host
/// listener on port 52 lets REQUESTs reach a real connection.
pub fn fuzz_vsock_tx(data: &[u8]) {
    static LISTENER: OnceLock<Option<UnixListener>> = OnceLock::new();
    let uds = scratch_path("vsock");
    LISTENER.get_or_init(|| {
        let port = PathBuf::from(format!("{}_52", uds.display()));
        let _ = std::fs::remove_file(&port);
        UnixListener::bind(&port).ok()
    });
    let Ok(mut vsock) = Vsock::new(3, &uds) else {
        return;
    };
    run_device(&mut vsock, 1, data);
}

/// Runs one virtio-net TX queue over `data`, with every offload acked:
/// headers and frames parsed from arbitrary chains and handed to a socket
/// pair standing in for the tap.
pub fn fuzz_net_tx(data: &[u8]) {
    let Ok((device_end, host_end)) = std::os::unix::net::UnixDatagram::pair() else {
        return;
    };
    if device_end.set_nonblocking(true).is_err() {
        return;
    }
    let backend = SocketFrames {
        socket: device_end,
        offloads: Default::default(),
    };
    let mut net = Net::new(
        Box::new(backend),
        crate::config::MacAddress([2, 0, 0, 0, 0, 1]),
    );
    run_device(&mut net, 1, data);
    drop(host_end);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic inputs: structured seeds plus xorshift mutations.
    fn inputs() -> Vec<Vec<u8>> {
        let mut seeds: Vec<Vec<u8>> = vec![Vec::new(), vec![0xff; 600], vec![0; 300]];
        // A well-formed 3-descriptor chain at 0x1000/0x1010/0x1400.
        let mut good = Vec::new();
        for (addr, len, flags, next) in [
            (0x1011u64, 16u32, 1u16, 1u16),
            (0x1100, 512, 3, 2),
            (0x1400, 1, 2, 0),
        ] {
            good.extend_from_slice(&addr.to_le_bytes());
            good.extend_from_slice(&len.to_le_bytes());
            good.extend_from_slice(&flags.to_le_bytes());
            good.extend_from_slice(&next.to_le_bytes());
        }
        good.resize(256, 0);
        good.push(0);
        good.extend_from_slice(&[0u8; 16]);
        good.extend_from_slice(&[0u8; 0x20]);
        seeds.push(good);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut all = seeds.clone();
        for round in 0..200 {
            let mut input = seeds[round % seeds.len()].clone();
            if input.is_empty() {
                input.resize(300, 0);
            }
            for _ in 0..(1 + next() % 16) {
                let at = (next() as usize) % input.len();
                input[at] = next() as u8;
            }
            all.push(input);
        }
        all
    }

    #[test]
    fn block_queue_survives_mutated_inputs() {
        for input in inputs() {
            fuzz_block_queue(&input);
        }
        let _ = std::fs::remove_file(scratch_path("disk"));
    }

    #[test]
    fn net_tx_survives_mutated_inputs() {
        for input in inputs() {
            fuzz_net_tx(&input);
        }
    }

    #[test]
    fn vsock_tx_survives_mutated_inputs() {
        for input in inputs() {
            fuzz_vsock_tx(&input);
        }
        let _ = std::fs::remove_file(scratch_path("vsock_52"));
    }
}
