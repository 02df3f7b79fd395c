//! Hook scripts around a backup (`pre_backup`, `post_backup` in the config): an
//! administrator's program that quiesces an application, mounts a snapshot, sends a
//! notification. A hook runs with the VM, the phase and (afterwards) the outcome in its
//! environment, its output in vmkeep's log, and a time limit; a pre-backup hook that fails
//! or runs out of time fails that VM's backup before anything is read.
//!
//! vmkeep runs hooks as the user it runs as (root, usually), so a hook must be a file only
//! that user (or root) can change: one that another user owns or may write is refused
//! before it runs (a planted or loosened script would run as root).

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How long a hook may run unless configured otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// At most this much of a hook's output is kept for its error line and the log.
const MAX_OUTPUT: usize = 64 << 10;

/// The phases a hook runs in (`VMKEEP_PHASE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Before the backup reads anything.
    PreBackup,
    /// After the backup, whether it succeeded or failed.
    PostBackup,
}

impl Phase {
    /// The name in the config and in `VMKEEP_PHASE`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::PreBackup => "pre-backup",
            Phase::PostBackup => "post-backup",
        }
    }
}

/// One configured hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    /// The program (an absolute path; run without a shell, no arguments).
    pub path: PathBuf,
    /// How long it may run; then its whole process group is killed.
    pub timeout: Duration,
}

/// Run `hook` for `phase` with `env` (names and values, added to vmkeep's environment and
/// `VMKEEP_PHASE`). Succeeds when it exits 0 in time; otherwise the error says how it
/// ended and quotes its last line of output.
pub fn run(hook: &Hook, phase: Phase, env: &[(&str, String)]) -> Result<()> {
    let what = format!("{} hook {}", phase.as_str(), hook.path.display());
    trusted(&hook.path).map_err(|e| Error::usage(format!("{what}: {e}")))?;
    let mut cmd = Command::new(&hook.path);
    cmd.env("VMKEEP_PHASE", phase.as_str())
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a timeout ends everything it started.
        .process_group(0);
    // A file that some process still holds open for writing cannot be run (ETXTBSY):
    // one being installed, or written by a thread of this process just before another
    // thread forked. It is tried again for a moment.
    let mut tries = 0;
    let mut child = loop {
        match cmd.spawn() {
            Ok(c) => break c,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(failed(&what, format!("cannot run it: {e}"))),
        }
    };
    let out = child.stdout.take().map(collect);
    let err = child.stderr.take().map(collect);
    let deadline = Instant::now() + hook.timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => break None,
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(failed(&what, format!("cannot wait for it: {e}"))),
        }
    };
    if status.is_none() {
        // SAFETY: kill(2) with the negated process-group id of the child we started,
        // whose group it leads (process_group(0)); no memory is involved.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        let _ = child.wait();
    }
    let text = |h: Option<std::thread::JoinHandle<String>>| {
        h.and_then(|h| h.join().ok()).unwrap_or_default()
    };
    let (out, err) = (text(out), text(err));
    for line in out.lines().chain(err.lines()) {
        tracing::info!("{what}: {line}");
    }
    // The last line it wrote on stderr, else on stdout.
    let last = last_of(&err)
        .or_else(|| last_of(&out))
        .map(|l| format!(": {l}"))
        .unwrap_or_default();
    match status {
        None => Err(Error::source(
            &what,
            format!(
                "did not finish within {} s (killed){last}",
                hook.timeout.as_secs()
            ),
        )),
        Some(s) if s.success() => Ok(()),
        Some(s) => Err(failed(&what, format!("failed ({s}){last}"))),
    }
}

/// A hook that could not run or did not succeed (exit 1; the message is "PHASE hook
/// PATH: what happened").
fn failed(what: &str, detail: String) -> Error {
    Error::io_ctx(what, std::io::Error::other(detail))
}

/// The last line of `text` that is not blank, trimmed.
fn last_of(text: &str) -> Option<&str> {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(str::trim)
}

/// Read a pipe to its end in a thread (keeping at most [`MAX_OUTPUT`] bytes), so that a
/// hook that writes much never blocks on a full pipe.
fn collect(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            let room = MAX_OUTPUT.saturating_sub(kept.len());
            kept.extend_from_slice(&buf[..n.min(room)]);
        }
        String::from_utf8_lossy(&kept).into_owned()
    })
}

/// A hook may run only if it is an absolute path to a regular file that this user (or
/// root) owns and that nobody else may write.
fn trusted(path: &Path) -> std::result::Result<(), String> {
    if !path.is_absolute() {
        return Err("not an absolute path".into());
    }
    let meta = std::fs::metadata(path).map_err(|e| format!("{e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        return Err(format!(
            "owned by uid {}, not by root or this user: refused",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "writable by others (mode {:04o}): refused",
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, name: &str, body: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn hook(path: PathBuf, secs: u64) -> Hook {
        Hook {
            path,
            timeout: Duration::from_secs(secs),
        }
    }

    #[test]
    fn a_hook_sees_its_environment_and_its_failure_is_quoted() {
        let dir = tempfile::tempdir().unwrap();
        let seen = dir.path().join("seen");
        let ok = script(
            dir.path(),
            "ok",
            &format!("echo \"$VMKEEP_PHASE $VMKEEP_VM\" > {}", seen.display()),
            0o755,
        );
        run(
            &hook(ok, 10),
            Phase::PreBackup,
            &[("VMKEEP_VM", "web1".into())],
        )
        .unwrap();
        assert_eq!(std::fs::read_to_string(&seen).unwrap(), "pre-backup web1\n");
        let bad = script(
            dir.path(),
            "bad",
            "echo working; echo 'db not ready' >&2; exit 3",
            0o700,
        );
        let e = run(&hook(bad, 10), Phase::PreBackup, &[]).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("pre-backup hook") && msg.contains("db not ready"),
            "{msg}"
        );
        assert!(msg.contains("3"), "{msg}");
    }

    #[test]
    fn a_hook_past_its_time_is_killed_with_what_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child");
        let slow = script(
            dir.path(),
            "slow",
            &format!("sleep 60 & echo $! > {}; wait", pidfile.display()),
            0o755,
        );
        let t = Instant::now();
        let e = run(&hook(slow, 1), Phase::PostBackup, &[]).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(10));
        assert!(e.to_string().contains("did not finish within 1 s"), "{e}");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        });
        assert!(!alive, "the hook's child {pid} survived the timeout");
    }

    #[test]
    fn a_hook_others_may_change_is_refused_unrun() {
        let dir = tempfile::tempdir().unwrap();
        let ran = dir.path().join("ran");
        let loose = script(
            dir.path(),
            "loose",
            &format!("touch {}", ran.display()),
            0o777,
        );
        let e = run(&hook(loose.clone(), 10), Phase::PreBackup, &[]).unwrap_err();
        assert!(e.to_string().contains("writable by others"), "{e}");
        assert!(!ran.exists(), "a refused hook never runs");
        if rustix::process::geteuid().is_root() {
            std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::os::unix::fs::chown(&loose, Some(65534), None).unwrap();
            let e = run(&hook(loose, 10), Phase::PreBackup, &[]).unwrap_err();
            assert!(e.to_string().contains("owned by uid 65534"), "{e}");
            assert!(!ran.exists(), "a refused hook never runs");
        }
        let e = run(&hook("relative/hook".into(), 10), Phase::PreBackup, &[]).unwrap_err();
        assert!(e.to_string().contains("absolute"), "{e}");
        let e = run(&hook(dir.path().to_path_buf(), 10), Phase::PreBackup, &[]).unwrap_err();
        assert!(e.to_string().contains("regular file"), "{e}");
    }
}
