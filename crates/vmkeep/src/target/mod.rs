//! Where restores write: a raw file, a block device (later also qcow2 and NBD).

pub mod file;

use crate::error::Result;

/// A restore destination. Writes come in increasing offset order.
pub trait Target: Send {
    /// A short name for messages.
    fn describe(&self) -> String;
    /// Write `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()>;
    /// Make `[offset, offset + len)` read as zeros.
    fn zero(&mut self, offset: u64, len: u64) -> Result<()>;
    /// Make everything durable and put the result in place.
    fn finish(self: Box<Self>) -> Result<()>;
    /// Give up: remove whatever partial result can be removed.
    fn abort(self: Box<Self>);
}
