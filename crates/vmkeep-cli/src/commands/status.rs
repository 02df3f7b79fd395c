//! `vmkeep status`

use std::fmt::Write as _;

use anyhow::Result;
use vmkeep::archive::profile::parse_time;
use vmkeep::engine::status::{vm_status_seen, HealthLevel, Hosts, VmStatus};

use super::Ctx;
use crate::cli::StatusArgs;
use crate::output::bytes;

pub fn run(ctx: &Ctx, a: StatusArgs) -> Result<i32> {
    if super::from_target(&a.offsite) {
        return super::offsite::status(ctx, &a);
    }
    let repo = ctx.open_repo()?;
    let names = if a.vms.is_empty() {
        repo.vm_names()?
    } else {
        a.vms.clone()
    };
    let hosts = Hosts::load(&repo);
    let vms: Vec<VmStatus> = names
        .iter()
        .map(|n| vm_status_seen(&repo, n, &hosts))
        .collect::<Result<_, _>>()?;
    if let Some(path) = &a.prometheus {
        write_prometheus(path, &vms)?;
    }
    if a.check_health {
        return health(ctx, &vms);
    }
    let recoveries = instant::recoveries(ctx, &names);
    if ctx.json {
        crate::output::json(&serde_json::json!({
            "repository": repo.root(), "vms": vms, "instant": recoveries,
        }));
        return Ok(0);
    }
    for (i, vm) in vms.iter().enumerate() {
        if i > 0 {
            crate::output::say("");
        }
        crate::output::say(table(vm));
    }
    if vms.is_empty() {
        crate::output::say(format!("no VMs in {}", repo.root().display()));
    }
    if !recoveries.is_empty() {
        crate::output::say("");
        crate::output::say(instant::table(&recoveries));
    }
    Ok(0)
}

/// Instant recoveries of these VMs, from their servers' progress files.
#[cfg(feature = "libvirt")]
mod instant {
    use std::fmt::Write as _;

    use serde::Serialize;
    use vmkeep::engine::finish::{FinishState, Phase, STATE_FILE};
    use vmkeep::engine::recover::DEFAULT_RUN_DIR;

    use crate::commands::Ctx;
    use crate::output::bytes;

    /// One recovery as `status` shows it.
    #[derive(Debug, Serialize)]
    pub struct Recovery {
        #[serde(flatten)]
        pub state: FinishState,
        /// Its server still runs.
        pub serving: bool,
        /// The recovery's folder.
        pub dir: std::path::PathBuf,
    }

    /// Every recovery under the run folder whose archived VM is one of `vms`, newest
    /// progress first.
    pub fn recoveries(ctx: &Ctx, vms: &[String]) -> Vec<Recovery> {
        let run = ctx
            .config
            .run_dir
            .clone()
            .unwrap_or_else(|| DEFAULT_RUN_DIR.into());
        let Ok(entries) = std::fs::read_dir(&run) else {
            return Vec::new();
        };
        let mut out: Vec<Recovery> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("instant-"))
            .filter_map(|e| {
                let state = FinishState::load(&e.path().join(STATE_FILE)).ok()?;
                vms.contains(&state.vm).then(|| Recovery {
                    serving: serving(state.pid),
                    state,
                    dir: e.path(),
                })
            })
            .collect();
        out.sort_by(|a, b| b.state.updated.cmp(&a.state.updated));
        out
    }

    /// Whether process `pid` is a running `vmkeep serve`.
    fn serving(pid: u32) -> bool {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.split(|&b| b == 0).any(|arg| arg == b"serve"))
    }

    /// The human lines: one per recovery, one per disk.
    pub fn table(recoveries: &[Recovery]) -> String {
        let mut out = String::from("instant recoveries:\n");
        for r in recoveries {
            let s = &r.state;
            let phase = match (s.phase, r.serving) {
                (Phase::Finished, _) => "finished: the disks hold every block".to_string(),
                (Phase::Gone, _) => "ended: the VM no longer exists".to_string(),
                (_, false) => format!(
                    "SERVER NOT RUNNING (pid {}): the VM cannot read what is not yet copied",
                    s.pid
                ),
                (Phase::Waiting, true) => "waiting for the VM to run".to_string(),
                (Phase::Pulling, true) => "copying".to_string(),
            };
            let _ = writeln!(
                out,
                "  {} (from {} generation {}, {}): {phase}",
                s.domain, s.vm, s.generation, s.uri
            );
            for d in &s.disks {
                let pct = if d.pulled {
                    100.0
                } else if d.total > 0 {
                    100.0 * d.done as f64 / d.total as f64
                } else {
                    0.0
                };
                let _ = writeln!(
                    out,
                    "    {:<6} {:>5.1} % copied ({} of {})",
                    d.target,
                    pct,
                    bytes(d.done),
                    bytes(d.total)
                );
            }
            if let Some(note) = &s.note {
                let _ = writeln!(out, "    note: {note}");
            }
        }
        out.trim_end().to_string()
    }
}

#[cfg(not(feature = "libvirt"))]
mod instant {
    use crate::commands::Ctx;

    pub fn recoveries(_ctx: &Ctx, _vms: &[String]) -> Vec<()> {
        Vec::new()
    }

    pub fn table(_recoveries: &[()]) -> String {
        String::new()
    }
}

/// The human table for one VM.
pub fn table(vm: &VmStatus) -> String {
    let mut out = format!(
        "VM {} — {} generations, {} on disk, block size {}\n",
        vm.name,
        vm.generations.len(),
        bytes(vm.space_used),
        bytes(vm.block_size as u64)
    );
    out.push_str(&format!(
        "{:<3} {:<36} {:<20} {:<5} {:>10} {:>10} {:>10} {:>8} {}\n",
        "N", "GENERATION", "TIME", "MODE", "SIZE", "CHANGED", "STORED", "TOOK", "FLAGS"
    ));
    for (n, g) in vm.generations.iter().enumerate() {
        let size: u64 = g.disks.iter().map(|d| d.size).sum();
        let changed: u64 = g.disks.iter().map(|d| d.changed_bytes).sum();
        let stored: u64 = g.disks.iter().map(|d| d.stored_bytes).sum();
        out.push_str(&format!(
            "{:<3} {:<36} {:<20} {:<5} {:>10} {:>10} {:>10} {:>7.1}s {}\n",
            n,
            g.id,
            g.time,
            g.mode,
            bytes(size),
            bytes(changed),
            bytes(stored),
            g.duration_secs,
            [
                g.protected.then_some("protected"),
                g.consistency.map(|c| c.as_str()),
            ]
            .into_iter()
            .flatten()
            .chain(g.state.iter().map(|k| k.as_str()))
            .collect::<Vec<_>>()
            .join(",")
        ));
    }
    if let Some(h) = &vm.host {
        out.push_str(&format!(
            "host: {} ({}), seen {}\n",
            h.hostname, h.uri, h.time
        ));
    }
    if let Some(cp) = vm.generations.first().and_then(|g| g.checkpoint.as_ref()) {
        out.push_str(&format!(
            "libvirt checkpoint of this repository: {cp} (the next backup starts from it)\n"
        ));
    }
    if vm.interrupted {
        out.push_str(
            "an interrupted command awaits recovery (the next command on this VM does it)\n",
        );
    }
    match &vm.last_check {
        Some(c) => out.push_str(&format!(
            "last {}check: {} {}\n",
            if c.deep { "deep " } else { "" },
            c.time,
            if c.ok {
                "ok".to_string()
            } else {
                format!("{} problems", c.problems)
            }
        )),
        None => out.push_str("last check: never\n"),
    }
    out.trim_end().to_string()
}

/// Nagios/Icinga plugin output: one status line, then details; exit 0 OK, 1 WARNING,
/// 2 CRITICAL (the rules: [`vmkeep::engine::status::health`]; interval default one day).
fn health(ctx: &Ctx, vms: &[VmStatus]) -> Result<i32> {
    let mut worst = HealthLevel::Ok;
    let mut details = Vec::new();
    for vm in vms {
        let interval = ctx.config.interval_for(&vm.name)?.unwrap_or(86400);
        let (level, why) = vmkeep::engine::status::health(vm, interval);
        worst = worst.max(level);
        details.push((level, format!("{} {}: {why}", level.word(), vm.name)));
    }
    let bad = details.iter().filter(|(l, _)| *l > HealthLevel::Ok).count();
    crate::output::say(format!(
        "VMKEEP {} - {} VMs, {bad} need attention",
        worst.word(),
        vms.len()
    ));
    for (_, d) in details {
        crate::output::say(d);
    }
    Ok(worst.exit_code())
}

/// Metrics for node_exporter's textfile collector, written atomically.
fn write_prometheus(path: &std::path::Path, vms: &[VmStatus]) -> Result<()> {
    type Getter = fn(&VmStatus) -> Option<f64>;
    let metrics: [(&str, &str, Getter); 7] = [
        ("vmkeep_generations", "Generations kept.", |v| {
            Some(v.generations.len() as f64)
        }),
        (
            "vmkeep_space_used_bytes",
            "Bytes the VM's archive occupies.",
            |v| Some(v.space_used as f64),
        ),
        (
            "vmkeep_last_backup_timestamp_seconds",
            "Start of the newest generation (Unix time).",
            |v| parse_time(&v.generations.first()?.time).map(|t| t.unix_timestamp() as f64),
        ),
        (
            "vmkeep_last_backup_duration_seconds",
            "Duration of the newest backup.",
            |v| Some(v.generations.first()?.duration_secs),
        ),
        (
            "vmkeep_last_backup_stored_bytes",
            "Bytes the newest backup added.",
            |v| {
                Some(
                    v.generations
                        .first()?
                        .disks
                        .iter()
                        .map(|d| d.stored_bytes)
                        .sum::<u64>() as f64,
                )
            },
        ),
        (
            "vmkeep_last_check_ok",
            "1 if the last check found no damage.",
            |v| v.last_check.as_ref().map(|c| c.ok as u8 as f64),
        ),
        (
            "vmkeep_last_check_timestamp_seconds",
            "Time of the last check (Unix time).",
            |v| parse_time(&v.last_check.as_ref()?.time).map(|t| t.unix_timestamp() as f64),
        ),
    ];
    let mut m = String::new();
    for (name, help, get) in metrics {
        let _ = writeln!(m, "# HELP {name} {help}\n# TYPE {name} gauge");
        for vm in vms {
            if let Some(v) = get(vm) {
                let label = vm.name.replace('\\', "\\\\").replace('"', "\\\"");
                let _ = writeln!(m, "{name}{{vm=\"{label}\"}} {v}");
            }
        }
    }
    // 0644 on purpose: node_exporter reads the textfile folder as its own user, and the
    // metrics name VMs and count bytes, nothing more (docs/security.md). Made fresh
    // (O_EXCL: never through an entry planted at the temporary name), mode set on the
    // open file so that the umask does not decide it, then renamed into place.
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let tmp = path.with_extension("prom.tmp");
    let io = |p: &std::path::Path, e| vmkeep::Error::io(p, e);
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&tmp, e).into()),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .map_err(|e| io(&tmp, e))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o644))
        .and_then(|()| f.write_all(m.as_bytes()))
        .map_err(|e| io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))?;
    Ok(())
}
