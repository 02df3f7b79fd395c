//! The pipelines that read, hash, compare and write blocks: backup, restore, check, prune.

pub mod backup;
pub mod check;
#[cfg(feature = "libvirt")]
pub mod finish;
#[cfg(feature = "libvirt")]
pub mod firmware;
#[cfg(feature = "libvirt")]
pub mod inventory;
#[cfg(feature = "libvirt")]
pub mod live;
#[cfg(feature = "libvirt")]
pub mod paused;
pub mod pipeline;
pub mod print;
pub mod prune;
#[cfg(feature = "libvirt")]
pub mod quiesce;
#[cfg(feature = "libvirt")]
pub mod recover;
pub mod replicate;
pub mod restore;
pub mod serve;
pub mod status;
pub mod verify;

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// Backup modes (see docs/ARCHITECTURE.md, "Backup of images").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// incr where changes are tracked, else diff where a previous generation exists, else full.
    #[default]
    Auto,
    /// Read every allocated block and compare it with the stored image itself.
    Full,
    /// Read every allocated block; store those whose digest changed.
    Diff,
    /// Read only the blocks a change tracker names.
    Incr,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Auto => "auto",
            Mode::Full => "full",
            Mode::Diff => "diff",
            Mode::Incr => "incr",
        })
    }
}

impl FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "auto" => Ok(Mode::Auto),
            "full" => Ok(Mode::Full),
            "diff" => Ok(Mode::Diff),
            "incr" => Ok(Mode::Incr),
            _ => Err(Error::usage(format!(
                "unknown mode {s:?} (auto, full, diff or incr)"
            ))),
        }
    }
}

/// The knobs moved to [`crate::tuning`] (source/ and nbd/ use them too); these names stay
/// for the engine's callers.
pub use crate::tuning::{cpu_threads, tuning};
