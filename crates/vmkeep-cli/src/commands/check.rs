//! `vmkeep check`

use anyhow::Result;
use vmkeep::engine::check::{check, CheckReport, GenSelect};
use vmkeep::error::ErrorKind;

use super::Ctx;
use crate::cli::CheckArgs;
use crate::output::{bytes, EXIT_DAMAGE, EXIT_FAILURE};

pub fn run(ctx: &Ctx, a: CheckArgs) -> Result<i32> {
    if super::from_target(&a.offsite) {
        return super::offsite::check(ctx, &a);
    }
    let repo = ctx.open_repo()?;
    let vms = ctx.archived_targets(&repo, &a.targets)?;
    let select = if a.generation == "all" {
        GenSelect::All
    } else {
        GenSelect::Rev(a.generation.clone())
    };
    let single = vms.len() == 1;
    let mut reports: Vec<CheckReport> = Vec::new();
    let mut errors = Vec::new();
    let mut damaged = false;
    for vm in &vms {
        vmkeep::interrupt::check()?;
        match check(&repo, vm, a.deep, &select, &ctx.progress) {
            Ok(r) => {
                for line in &r.recovered {
                    ctx.say(format!("{vm}: {line}"));
                }
                if !ctx.json {
                    for p in &r.problems {
                        // Damage is the result of a check, not a side remark: always shown.
                        crate::output::say(format!("DAMAGE: {p}"));
                    }
                }
                ctx.say(line(&r));
                reports.push(r);
            }
            // A damaged archive that cannot even be checked (a VM folder or lock file that
            // is a symbolic link, say) is damage found: exit 3, like damage reported.
            Err(e) if single && !ctx.json && e.kind() != ErrorKind::Corrupt => return Err(e.into()),
            Err(e) => {
                if e.kind() == ErrorKind::Corrupt {
                    damaged = true;
                }
                crate::output::error_line(&anyhow::Error::from(e).context(format!("VM {vm}")));
                errors.push(vm.clone());
            }
        }
    }
    if ctx.json {
        crate::output::json(
            &serde_json::json!({ "ok": errors.is_empty() && reports.iter().all(CheckReport::ok), "vms": reports, "failed": errors }),
        );
    }
    Ok(if damaged || reports.iter().any(|r| !r.ok()) {
        EXIT_DAMAGE
    } else if !errors.is_empty() {
        EXIT_FAILURE
    } else {
        0
    })
}

fn line(r: &CheckReport) -> String {
    let kind = if r.deep { "deep check" } else { "check" };
    if r.ok() {
        let proven = if r.deep {
            format!(", {} proven", r.generations_proven)
        } else {
            String::new()
        };
        format!(
            "{}: {kind} ok ({} generations{proven}, {} verified)",
            r.vm,
            r.generations,
            bytes(r.bytes_verified)
        )
    } else {
        format!("{}: {kind} found {} problems", r.vm, r.problems.len())
    }
}
