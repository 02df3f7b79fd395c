//! [`Labelled`]: the one source wrapper that forwards every [`BlockSource`] method, so
//! that a wrapper never silently drops one (a hand-written forwarder once lost
//! `prefetch`).

use std::sync::Arc;

use super::{BlockSource, Extent};
use crate::bufpool::{BufPool, PoolBuf};
use crate::error::Result;

/// A source under a name of its own (a disk's path rather than a temporary NBD socket),
/// which keeps `K` alive as long as it lives: what the inner source needs (a helper
/// process, its private folder). Every method but [`BlockSource::describe`] goes to the
/// inner source.
pub struct Labelled<S: ?Sized = dyn BlockSource, K = ()> {
    // Drop order is field order: the inner source (its connections) closes before what it
    // needs is released.
    inner: Box<S>,
    keep: K,
    label: String,
}

impl<S: BlockSource + ?Sized, K> Labelled<S, K> {
    /// `inner`, described as `label`, keeping `keep` until after `inner` is dropped.
    pub fn new(inner: Box<S>, label: impl Into<String>, keep: K) -> Labelled<S, K> {
        Labelled {
            inner,
            keep,
            label: label.into(),
        }
    }

    /// The wrapped source.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// What the source keeps alive.
    pub fn kept(&self) -> &K {
        &self.keep
    }
}

impl<S: BlockSource + ?Sized, K: Send + Sync> BlockSource for Labelled<S, K> {
    fn describe(&self) -> String {
        self.label.clone()
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn read_buf(&self, pool: &Arc<BufPool>, offset: u64, len: usize) -> Result<PoolBuf> {
        self.inner.read_buf(pool, offset, len)
    }

    fn prefetch(&self, offset: u64, length: u64) {
        self.inner.prefetch(offset, length)
    }

    fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        self.inner.extents(offset, length)
    }

    fn changed_extents(&self) -> Result<Option<Vec<(u64, u64)>>> {
        self.inner.changed_extents()
    }

    fn parallelism(&self) -> usize {
        self.inner.parallelism()
    }

    fn max_read(&self) -> usize {
        self.inner.max_read()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::ExtentKind;
    use std::sync::Mutex;

    /// Records the prefetch hints it gets.
    #[derive(Default)]
    struct Recorder {
        hints: Mutex<Vec<(u64, u64)>>,
    }

    impl BlockSource for Recorder {
        fn describe(&self) -> String {
            "inner".into()
        }
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_at(&self, buf: &mut [u8], _offset: u64) -> Result<()> {
            buf.fill(7);
            Ok(())
        }
        fn prefetch(&self, offset: u64, length: u64) {
            self.hints.lock().unwrap().push((offset, length));
        }
        fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
            Ok(vec![Extent {
                offset,
                length,
                kind: ExtentKind::Data,
            }])
        }
        fn parallelism(&self) -> usize {
            5
        }
        fn max_read(&self) -> usize {
            4096
        }
    }

    #[test]
    fn every_method_but_describe_reaches_the_inner_source() {
        let l = Labelled::new(Box::new(Recorder::default()), "/disk.img", ());
        assert_eq!(l.describe(), "/disk.img");
        l.prefetch(4096, 8192);
        assert_eq!(*l.inner().hints.lock().unwrap(), vec![(4096, 8192)]);
        assert_eq!(
            (l.size(), l.parallelism(), l.max_read()),
            (1 << 20, 5, 4096)
        );
        let mut b = [0u8; 4];
        l.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [7; 4]);
        // Behind a trait object too, as the engine holds its sources.
        let dynamic: Box<dyn BlockSource> = Box::new(Recorder::default());
        let l: Labelled = Labelled::new(dynamic, "x", ());
        l.prefetch(1, 2);
        assert_eq!(l.extents(0, 10).unwrap().len(), 1);
    }
}
