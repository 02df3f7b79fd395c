//! Offsite copies: a repository's finished generations copied, encrypted and
//! authenticated, into object storage (an S3-compatible bucket or a folder), and read back
//! from there (see `docs/offsite.md`; the layout is in `docs/FORMAT.md`, "Offsite layout").

pub mod index;
pub mod key;
pub mod manifest;
pub mod pack;
pub mod prune;
pub mod read;
pub mod s3;
pub mod store;
pub mod sync;
pub mod target;
