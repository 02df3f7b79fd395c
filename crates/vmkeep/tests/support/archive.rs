//! Reading an archive back through the library, for the property, soak and hostile-archive
//! tests: restore a generation's disk to a file, and require a deep check to pass.

use std::path::Path;

use vmkeep::archive::view::DiskView;
use vmkeep::archive::Repository;
use vmkeep::engine::check::{check, CheckReport, GenSelect};
use vmkeep::engine::restore::restore;
use vmkeep::error::Result;
use vmkeep::progress::NoProgress;
use vmkeep::target::file::FileTarget;

/// Restore `view` to the file `out` (made or replaced; no damage ignored); its bytes.
pub fn restore_view(view: &DiskView, out: &Path) -> Result<Vec<u8>> {
    let target = FileTarget::create(out, view.size)?;
    restore(view, Box::new(target), false, &NoProgress)?;
    Ok(std::fs::read(out).unwrap())
}

/// A deep check of every generation of `vm`; it must find no problem. Its report.
pub fn deep_check_ok(repo: &Repository, vm: &str) -> CheckReport {
    let report = check(repo, vm, true, &GenSelect::All, &NoProgress).unwrap();
    assert!(report.ok(), "deep check found: {:?}", report.problems);
    report
}
