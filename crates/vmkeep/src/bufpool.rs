//! Reusable I/O buffers for the pipelines.
//!
//! A pipeline reads a few megabytes per job. A fresh `vec![0; 4 MiB]` per job costs a
//! zero fill, and, since allocations that large come from `mmap`, page faults and the
//! kernel's page zeroing on first touch and an `munmap` on free: about a tenth of a full
//! backup's CPU time before this pool. A buffer taken from the pool goes back to it when
//! dropped, so a run touches a fixed, small set of buffers whatever the disk size.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

/// A bounded free list of byte buffers.
pub struct BufPool {
    free: Mutex<Vec<Vec<u8>>>,
    keep: usize,
}

/// Capacity of every pool buffer: the largest read of any pipeline. One size for all, so
/// that any free buffer serves any request: jobs of mixed sizes (a disk's extents) would
/// otherwise grow and free buffers all the time, and the allocator would keep the peak.
pub const BUF_CAP: usize = 4 << 20;

impl BufPool {
    /// A pool that keeps at most `keep` free buffers (more are freed when returned).
    pub fn new(keep: usize) -> Arc<BufPool> {
        Arc::new(BufPool {
            free: Mutex::new(Vec::new()),
            keep,
        })
    }

    /// A buffer of exactly `len` bytes. Its contents are unspecified (whatever an earlier
    /// user left), so callers overwrite or clear every byte they hand on.
    pub fn take(self: &Arc<Self>, len: usize) -> PoolBuf {
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            free.iter()
                .position(|v| v.capacity() >= len)
                .map(|i| free.swap_remove(i))
        };
        let mut v = reused.unwrap_or_else(|| Vec::with_capacity(len.max(BUF_CAP)));
        if v.len() >= len {
            v.truncate(len);
        } else {
            v.resize(len, 0);
        }
        PoolBuf {
            v,
            pool: Some(self.clone()),
        }
    }

    fn give_back(&self, v: Vec<u8>) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        // Only buffers of the usual size are kept: a rare huge one is freed.
        if free.len() < self.keep && (BUF_CAP..=2 * BUF_CAP).contains(&v.capacity()) {
            free.push(v);
        }
    }
}

/// A buffer that returns to its pool when dropped.
pub struct PoolBuf {
    v: Vec<u8>,
    pool: Option<Arc<BufPool>>,
}

impl PoolBuf {
    /// Wrap a buffer that came from elsewhere; it joins `pool` when dropped.
    pub fn adopt(v: Vec<u8>, pool: Option<&Arc<BufPool>>) -> PoolBuf {
        PoolBuf {
            v,
            pool: pool.cloned(),
        }
    }

    /// The memory the buffer holds (its capacity, which may exceed its length).
    pub fn footprint(&self) -> usize {
        self.v.capacity()
    }

    /// Take the bytes out (the buffer no longer returns to the pool).
    pub fn into_vec(mut self) -> Vec<u8> {
        self.pool = None;
        std::mem::take(&mut self.v)
    }
}

impl Deref for PoolBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.v
    }
}

impl DerefMut for PoolBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.v
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.give_back(std::mem::take(&mut self.v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_bounded() {
        let pool = BufPool::new(2);
        let mut a = pool.take(100);
        a[0] = 7;
        let ptr = a.as_ptr();
        drop(a);
        let b = pool.take(50);
        assert_eq!(
            (b.len(), b.as_ptr()),
            (50, ptr),
            "the free buffer is reused"
        );
        assert!(
            b.v.capacity() >= BUF_CAP,
            "every buffer has the same capacity"
        );
        let c = pool.take(BUF_CAP + 1);
        assert_eq!(c.len(), BUF_CAP + 1);
        let d = pool.take(10);
        drop((b, c, d));
        assert_eq!(pool.free.lock().unwrap().len(), 2);
        let owned = pool.take(8).into_vec();
        assert_eq!(owned.len(), 8);
        assert_eq!(pool.free.lock().unwrap().len(), 1);
        // A buffer from elsewhere that is too small is not kept.
        drop(PoolBuf::adopt(vec![1; 10], Some(&pool)));
        assert_eq!(pool.free.lock().unwrap().len(), 1);
    }
}
