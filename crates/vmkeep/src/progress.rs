//! Progress reporting. The library calls these hooks; the CLI draws bars on a terminal
//! or stays silent. The default does nothing.

/// Progress of one disk of one operation.
pub trait Task: Send + Sync {
    /// `bytes` more bytes of the task's `total` are done (a delta, not a position).
    fn advance(&self, _bytes: u64) {}
    /// The task is over; no `advance` follows.
    fn finish(&self) {}
}

/// A sink for progress and warnings.
pub trait Progress: Send + Sync {
    /// A new disk starts; `total` is the number of bytes it will examine.
    fn task(&self, _label: &str, _total: u64) -> Box<dyn Task> {
        Box::new(NoTask)
    }
    /// Something the user should know that does not fail the operation.
    fn warn(&self, msg: &str) {
        tracing::warn!("{msg}");
    }
}

/// A [`Task`] that reports nothing; what [`Progress::task`] returns by default.
pub struct NoTask;
impl Task for NoTask {}

/// Progress that reports nothing (warnings go to the log).
pub struct NoProgress;
impl Progress for NoProgress {}
