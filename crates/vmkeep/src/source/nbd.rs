//! Disks read from an NBD server, with vmkeep's own client.
//!
//! Allocation comes from `base:allocation`. A range is [`ExtentKind::Zero`] exactly when
//! the server sets `NBD_STATE_ZERO` for it; a hole without that flag is read as data,
//! because the protocol leaves its contents undefined ("the server could not determine"
//! is always a legal answer) and a backup must never assume zeros it was not promised.
//! Servers without structured replies or without `base:allocation` make the whole disk
//! data.
//!
//! Change tracking comes from `qemu:dirty-bitmap:NAME` (QEMU's `nbd.rst`): every range
//! with `NBD_STATE_DIRTY` set has changed since the bitmap was started.

use std::sync::Arc;

use super::{BlockSource, Extent, ExtentKind};
use crate::bufpool::{BufPool, PoolBuf};
use crate::error::{Error, Result};
use crate::nbd::client::{NbdClient, NbdOptions, NbdUri};
use crate::nbd::proto::{META_BASE_ALLOCATION, META_DIRTY_BITMAP_PREFIX, STATE_DIRTY, STATE_ZERO};

/// Reads kept in flight per connection: enough to hide a network round trip, few enough
/// that the pipeline's buffers (several per worker, `max_read` each) stay small.
const DEPTH_PER_CONNECTION: usize = 8;
/// Cap on the pipeline's workers, whatever the connection count.
const MAX_PARALLELISM: usize = 16;

/// A disk read from an NBD export: ranges the server flags `NBD_STATE_ZERO` in `base:allocation`
/// are not read, and with a bitmap the `qemu:dirty-bitmap:` context says which ranges changed.
pub struct NbdSource {
    client: NbdClient,
    /// The dirty-bitmap context that tracks changes, when one was asked for.
    bitmap: Option<String>,
}

impl NbdSource {
    /// Connect to an NBD URI, asking for `base:allocation` and, with `bitmap`, for
    /// `qemu:dirty-bitmap:BITMAP`.
    pub fn open(uri: &str, bitmap: Option<&str>) -> Result<NbdSource> {
        let uri = NbdUri::parse(uri)?;
        NbdSource::connect(&uri, bitmap, NbdOptions::default())
    }

    /// Connect with explicit options; the contexts needed are added to `opts.contexts`.
    pub fn connect(uri: &NbdUri, bitmap: Option<&str>, mut opts: NbdOptions) -> Result<NbdSource> {
        for c in contexts_for(bitmap) {
            if !opts.contexts.contains(&c) {
                opts.contexts.push(c);
            }
        }
        Ok(NbdSource::from_client(
            NbdClient::connect(uri, &opts)?,
            bitmap,
        ))
    }

    /// Wrap a connected client (it should have selected [`contexts_for`]`(bitmap)`).
    pub fn from_client(client: NbdClient, bitmap: Option<&str>) -> NbdSource {
        NbdSource {
            client,
            bitmap: bitmap.map(|b| format!("{META_DIRTY_BITMAP_PREFIX}{b}")),
        }
    }

    /// The NBD connection underneath, for the export size, flags and contexts the server granted.
    pub fn client(&self) -> &NbdClient {
        &self.client
    }

    fn whole(offset: u64, end: u64, kind: ExtentKind) -> Vec<Extent> {
        vec![Extent {
            offset,
            length: end - offset,
            kind,
        }]
    }
}

/// The metadata contexts an [`NbdSource`] uses.
pub fn contexts_for(bitmap: Option<&str>) -> Vec<String> {
    let mut v = vec![META_BASE_ALLOCATION.to_string()];
    if let Some(b) = bitmap {
        v.push(format!("{META_DIRTY_BITMAP_PREFIX}{b}"));
    }
    v
}

impl BlockSource for NbdSource {
    fn describe(&self) -> String {
        self.client.name().to_string()
    }

    fn size(&self) -> u64 {
        self.client.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.client.read(offset, buf)
    }

    fn read_buf(&self, pool: &Arc<BufPool>, offset: u64, len: usize) -> Result<PoolBuf> {
        let buf = pool.take(len).into_vec();
        let buf = self.client.read_vec(offset, buf)?;
        Ok(PoolBuf::adopt(buf, Some(pool)))
    }

    fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(length).min(self.size());
        if offset >= end {
            return Ok(Vec::new());
        }
        if !self.client.has_context(META_BASE_ALLOCATION) {
            return Ok(NbdSource::whole(offset, end, ExtentKind::Data));
        }
        let mut out: Vec<Extent> = Vec::new();
        let mut at = offset;
        for (len, flags) in self
            .client
            .block_status(META_BASE_ALLOCATION, offset, end - offset)?
        {
            let kind = if flags & STATE_ZERO != 0 {
                ExtentKind::Zero
            } else {
                ExtentKind::Data
            };
            match out.last_mut() {
                Some(last) if last.kind == kind => last.length += len,
                _ => out.push(Extent {
                    offset: at,
                    length: len,
                    kind,
                }),
            }
            at += len;
        }
        Ok(out)
    }

    fn changed_extents(&self) -> Result<Option<Vec<(u64, u64)>>> {
        let Some(ctx) = &self.bitmap else {
            return Ok(None);
        };
        if !self.client.has_context(ctx) {
            return Err(Error::source(
                self.client.name(),
                format!("the server does not offer {ctx}, so changes cannot be tracked"),
            ));
        }
        let size = self.size();
        let mut changed: Vec<(u64, u64)> = Vec::new();
        let mut at = 0;
        while at < size {
            let extents = self.client.block_status(ctx, at, size - at)?;
            if extents.is_empty() {
                return Err(Error::source(
                    self.client.name(),
                    format!("{ctx} has no extents at byte {at}"),
                ));
            }
            for (len, flags) in extents {
                if flags & STATE_DIRTY != 0 {
                    match changed.last_mut() {
                        Some(last) if last.0 + last.1 == at => last.1 += len,
                        _ => changed.push((at, len)),
                    }
                }
                at += len;
            }
        }
        Ok(Some(changed))
    }

    fn parallelism(&self) -> usize {
        crate::tuning::tuning("VMKEEP_NBD_QUEUE", 1..=64)
            .unwrap_or((self.client.connections() * DEPTH_PER_CONNECTION).min(MAX_PARALLELISM))
    }

    fn max_read(&self) -> usize {
        self.client.max_payload() as usize
    }
}
