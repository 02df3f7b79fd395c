//! `vmkeep prune`

use anyhow::Result;
use vmkeep::archive::retention::Schedule;
use vmkeep::engine::prune::{prune, PruneReport};

use super::Ctx;
use crate::cli::PruneArgs;
use crate::output::EXIT_FAILURE;

pub fn run(ctx: &Ctx, a: PruneArgs) -> Result<i32> {
    let flags = Schedule {
        keep_last: a.keep_last,
        keep_hourly: a.keep_hourly,
        keep_daily: a.keep_daily,
        keep_weekly: a.keep_weekly,
        keep_monthly: a.keep_monthly,
        keep_yearly: a.keep_yearly,
    };
    if super::from_target(&a.offsite) {
        return super::offsite::prune(ctx, &a, &flags);
    }
    let repo = ctx.open_repo()?;
    let vms = ctx.archived_targets(&repo, &a.targets)?;
    let single = vms.len() == 1;
    let mut reports = Vec::new();
    let mut failed = 0;
    for vm in &vms {
        vmkeep::interrupt::check()?;
        let schedule = ctx.config.retention_for(vm).overridden_by(&flags);
        if schedule.is_empty() {
            ctx.say(format!(
                "{vm}: no retention schedule (flags or config); keeping everything"
            ));
        }
        match prune(&repo, vm, &schedule, a.dry_run) {
            Ok(r) => {
                let verb = if a.dry_run { "would remove" } else { "removed" };
                say_pruned(ctx, vm, &r, verb);
                ctx.say(format!(
                    "{vm}: {} kept, {} {verb}",
                    r.kept.len(),
                    r.removed.len()
                ));
                reports.push(r);
            }
            Err(e) if single && !ctx.json => return Err(e.into()),
            Err(e) => {
                failed += 1;
                crate::output::error_line(&anyhow::Error::from(e).context(format!("VM {vm}")));
            }
        }
    }
    if ctx.json {
        crate::output::json(&serde_json::json!({ "vms": reports }));
    }
    Ok(if failed > 0 { EXIT_FAILURE } else { 0 })
}

/// One line per generation `r` removed (`verb`: "removed" or "would remove") and per
/// generation kept because a running serve pinned it.
pub fn say_pruned(ctx: &Ctx, vm: &str, r: &PruneReport, verb: &str) {
    for id in &r.removed {
        ctx.say(format!("{vm}: {verb} generation {id}"));
    }
    for id in &r.pinned {
        ctx.say(format!(
            "{vm}: kept generation {id}: pinned by a running serve"
        ));
    }
}
