//! Helper processes that sources start (qemu-nbd), stopped on every exit path.
//!
//! Three mechanisms, because each covers a case the others cannot:
//! - [`Helper`]'s `Drop` stops the process on a normal return, an error or an unwinding
//!   panic, and reaps it.
//! - `PR_SET_PDEATHSIG`: the kernel sends SIGTERM to the helper when vmkeep dies, even by
//!   SIGKILL. The kernel ties it to the *thread* that forked, so every helper is started
//!   by one spawner thread that lives as long as the process; otherwise a helper started
//!   from a short-lived worker thread would die with that thread.
//! - A SIGINT/SIGTERM handler, installed when the first helper starts and only where the
//!   signal still has its default action: it stops the registered helpers, removes their
//!   private folders and exits with status 1 (a failed run; the archive's journal makes
//!   an interrupted backup safe).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicI32, AtomicPtr, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

/// How long a helper gets to exit after SIGTERM before it is killed.
const GRACE: Duration = Duration::from_secs(5);
/// Helpers the signal handler knows about at once (more still get PDEATHSIG and Drop).
const SLOTS: usize = 64;

/// A running helper process; stopped and reaped when dropped.
pub(crate) struct Helper {
    child: Child,
    slot: Option<usize>,
    stopped: bool,
}

impl Helper {
    /// Start `cmd` from the spawner thread with PDEATHSIG set, and register it (and the
    /// files and folder to remove) with the signal handler.
    pub fn spawn(cmd: Command, dir: &Path, files: &[PathBuf]) -> io::Result<Helper> {
        install_signal_handler();
        let child = spawn_from_long_lived_thread(with_death_signal(cmd))?;
        let slot = register(child.id() as i32, dir, files);
        Ok(Helper {
            child,
            slot,
            stopped: false,
        })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if the helper has exited.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// SIGTERM, a grace period, then SIGKILL; always reaps. Idempotent.
    pub fn stop(&mut self) {
        if let Some(i) = self.slot.take() {
            unregister(i);
        }
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child, which is not reaped yet, so its pid cannot
            // have been reused by another process.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + GRACE;
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.stop();
    }
}

fn with_death_signal(mut cmd: Command) -> Command {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the child between fork and exec. It only makes
    // async-signal-safe system calls (prctl, getppid) and builds errors from raw codes,
    // so it neither allocates nor takes locks.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(io::Error::last_os_error());
            }
            // vmkeep died before prctl took effect: no signal will ever come.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        })
    };
    cmd
}

type SpawnJob = (Command, Sender<io::Result<Child>>);

/// Run `cmd.spawn()` on the process-wide spawner thread (see the module docs).
fn spawn_from_long_lived_thread(cmd: Command) -> io::Result<Child> {
    static SPAWNER: Mutex<Option<Sender<SpawnJob>>> = Mutex::new(None);
    let jobs = {
        let mut s = SPAWNER.lock().unwrap_or_else(|e| e.into_inner());
        if s.is_none() {
            let (tx, rx) = crossbeam_channel::unbounded::<SpawnJob>();
            std::thread::Builder::new()
                .name("vmkeep-spawner".into())
                .spawn(move || {
                    for (mut cmd, reply) in rx {
                        let _ = reply.send(cmd.spawn());
                    }
                })?;
            *s = Some(tx);
        }
        s.clone().expect("spawner started above")
    };
    let (tx, rx) = crossbeam_channel::bounded(1);
    jobs.send((cmd, tx))
        .map_err(|_| io::Error::other("the spawner thread stopped"))?;
    rx.recv()
        .map_err(|_| io::Error::other("the spawner thread stopped"))?
}

/// What the signal handler removes for one helper. Leaked on purpose: the handler may
/// read it on another thread at any moment, so it is never freed (a few bytes a helper).
struct Cleanup {
    files: Vec<CString>,
    dir: CString,
}

struct Slot {
    /// 0: free; -1: being filled; otherwise the helper's pid.
    pid: AtomicI32,
    cleanup: AtomicPtr<Cleanup>,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    pid: AtomicI32::new(0),
    cleanup: AtomicPtr::new(std::ptr::null_mut()),
};
static REGISTRY: [Slot; SLOTS] = [FREE; SLOTS];

fn register(pid: i32, dir: &Path, files: &[PathBuf]) -> Option<usize> {
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).ok();
    let cleanup = Cleanup {
        files: files.iter().filter_map(|f| c(f)).collect(),
        dir: c(dir)?,
    };
    let cleanup: *mut Cleanup = Box::into_raw(Box::new(cleanup));
    for (i, s) in REGISTRY.iter().enumerate() {
        if s.pid
            .compare_exchange(0, -1, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            s.cleanup.store(cleanup, Ordering::Release);
            s.pid.store(pid, Ordering::Release);
            return Some(i);
        }
    }
    None
}

fn unregister(i: usize) {
    REGISTRY[i]
        .cleanup
        .store(std::ptr::null_mut(), Ordering::Release);
    REGISTRY[i].pid.store(0, Ordering::Release);
}

extern "C" fn on_signal(_sig: libc::c_int) {
    emergency_exit();
}

/// Stop every registered helper, remove its files, and exit 1 at once. Async-signal-safe:
/// called from signal handlers.
pub(crate) fn emergency_exit() -> ! {
    for s in &REGISTRY {
        let pid = s.pid.load(Ordering::Acquire);
        if pid > 0 {
            // SAFETY: kill(2) is async-signal-safe; the pid is a registered, unreaped child.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
    }
    for s in &REGISTRY {
        let c = s.cleanup.load(Ordering::Acquire);
        if c.is_null() {
            continue;
        }
        // SAFETY: registered cleanups are leaked and never changed, so the pointer is
        // valid; unlink(2) and rmdir(2) are async-signal-safe and get NUL-terminated paths.
        unsafe {
            for f in &(*c).files {
                libc::unlink(f.as_ptr());
            }
            libc::rmdir((*c).dir.as_ptr());
        }
    }
    let msg = b"vmkeep: interrupted; helper processes stopped\n";
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is a static string.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(1);
    }
}

/// Install [`on_signal`] for SIGINT and SIGTERM where they still have the default action
/// (an ignored signal, or one a program handles itself, is left alone).
fn install_signal_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: sigaction(2) with valid pointers to zero-initialised structs (a valid
            // bit pattern for `sigaction`); the handler only makes async-signal-safe calls.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut old) != 0
                    || old.sa_sigaction != libc::SIG_DFL
                {
                    continue;
                }
                let mut new: libc::sigaction = std::mem::zeroed();
                new.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                libc::sigfillset(&mut new.sa_mask);
                libc::sigaction(sig, &new, std::ptr::null_mut());
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_is_stopped_and_reaped_on_drop() {
        let dir = std::env::temp_dir();
        let mut cmd = Command::new("sleep");
        cmd.arg("60");
        let h = Helper::spawn(cmd, &dir.join("vmkeep-no-such-dir"), &[]).unwrap();
        let pid = h.id();
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        drop(h);
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn registry_records_and_frees_slots() {
        // A pid above any pid_max, so a signal arriving now would hit nothing.
        let pid = i32::MAX - 7;
        let i = register(pid, Path::new("/nonexistent-a"), &[]).unwrap();
        assert_eq!(REGISTRY[i].pid.load(Ordering::Acquire), pid);
        assert!(!REGISTRY[i].cleanup.load(Ordering::Acquire).is_null());
        unregister(i);
        assert_eq!(REGISTRY[i].pid.load(Ordering::Acquire), 0);
        assert!(REGISTRY[i].cleanup.load(Ordering::Acquire).is_null());
    }
}
