//! The per-VM uid/gid range as a free list: a VM takes an id when it
//! starts and gives it back when it is torn down, so no two live VMs ever
//! share one, however long a warm VM waits for its job.
//!
//! Ids are handed out first from the never-used part of the range, then
//! from the freed ones, oldest first (a returned id is reused as late as
//! possible). An exhausted range is an error, never a shared id.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

/// Every id of the range is held by a live VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "no free VM uid: all {count} ids of jail.uid_base {base}..+uid_count are held by live VMs \
     (raise jail.uid_count)"
)]
pub struct UidsExhausted {
    /// `uid_base`.
    pub base: u32,
    /// `uid_count`.
    pub count: u32,
}

#[derive(Debug)]
struct FreeList {
    /// Offsets below this were handed out at least once.
    next_unused: u32,
    /// Returned offsets, oldest first.
    returned: VecDeque<u32>,
}

/// The uid range `base..base + count`, shared by every slot.
#[derive(Debug)]
pub struct UidAllocator {
    base: u32,
    count: u32,
    free: Mutex<FreeList>,
}

impl UidAllocator {
    /// An allocator of `base..base + count` (validated by
    /// [`super::JailConfig::validate`]: `base > 0`, no overflow).
    pub fn new(base: u32, count: u32) -> Arc<Self> {
        Arc::new(Self {
            base,
            count,
            free: Mutex::new(FreeList {
                next_unused: 0,
                returned: VecDeque::new(),
            }),
        })
    }

    /// Takes a free id; it is returned when the lease is dropped.
    pub fn allocate(self: &Arc<Self>) -> Result<UidLease, UidsExhausted> {
        // The list stays consistent under a panic elsewhere (every update
        // is a single push or pop), so a poisoned lock is still usable.
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        let offset = if free.next_unused < self.count {
            free.next_unused += 1;
            free.next_unused - 1
        } else {
            free.returned.pop_front().ok_or(UidsExhausted {
                base: self.base,
                count: self.count,
            })?
        };
        Ok(UidLease {
            uid: self.base + offset,
            allocator: Arc::clone(self),
        })
    }

    fn release(&self, uid: u32) {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        free.returned.push_back(uid - self.base);
    }
}

/// One VM's uid (also its gid), held until dropped.
#[derive(Debug)]
pub struct UidLease {
    uid: u32,
    allocator: Arc<UidAllocator>,
}

impl UidLease {
    /// The id.
    pub fn uid(&self) -> u32 {
        self.uid
    }
}

impl Drop for UidLease {
    fn drop(&mut self) {
        self.allocator.release(self.uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_vms_never_share_an_id_and_freed_ids_are_reused() {
        let ids = UidAllocator::new(900_000, 2);
        let a = ids.allocate().unwrap();
        let b = ids.allocate().unwrap();
        assert_ne!(a.uid(), b.uid());
        // A third live VM gets no id rather than a shared one.
        let err = ids.allocate().unwrap_err();
        assert_eq!(
            err,
            UidsExhausted {
                base: 900_000,
                count: 2
            }
        );
        assert!(err.to_string().contains("raise jail.uid_count"), "{err}");
        let freed = a.uid();
        drop(a);
        let c = ids.allocate().unwrap();
        assert_eq!(c.uid(), freed);
        assert_ne!(c.uid(), b.uid());
        assert!(ids.allocate().is_err());
    }

    #[test]
    fn ids_stay_in_range_and_the_oldest_freed_id_is_reused_first() {
        let ids = UidAllocator::new(10, 3);
        let all: Vec<UidLease> = (0..3).map(|_| ids.allocate().unwrap()).collect();
        let uids: Vec<u32> = all.iter().map(UidLease::uid).collect();
        assert_eq!(uids, [10, 11, 12]);
        let mut all = all.into_iter();
        let (first, second, third) = (
            all.next().unwrap(),
            all.next().unwrap(),
            all.next().unwrap(),
        );
        drop(second);
        drop(first);
        assert_eq!(ids.allocate().unwrap().uid(), 11);
        drop(third);
    }
}
