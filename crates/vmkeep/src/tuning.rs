//! Process-wide knobs shared by the sources, the NBD code and the pipelines: how many
//! worker threads, and the environment variables the benchmarks turn. A module of its own
//! so that `source/` and `nbd/` depend on no engine code.

/// A benchmark knob: the whole number in environment variable `name`, when it is set and
/// within `range` (anything else is ignored). Used by `bench/nbd-sweep.sh` to measure the
/// request size and queue depth that the defaults were chosen from; see docs/BENCHMARKS.md.
pub fn tuning(name: &str, range: std::ops::RangeInclusive<usize>) -> Option<usize> {
    std::env::var(name)
        .ok()?
        .parse()
        .ok()
        .filter(|v| range.contains(v))
}

/// Worker threads for hashing and compression: every core.
pub fn cpu_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}
