//! SIGINT and SIGTERM: a clean stop.
//!
//! The first signal only sets a flag. The pipelines look at it between jobs and stop with
//! [`Error::Interrupted`]; the command then rolls back what it started (a backup's journal
//! is applied, its new generation removed), stops its helper processes and ends a libvirt
//! backup job through the usual error path, and exits 1 with one message: the archive is
//! as it was. A second signal does not wait: helper processes are killed and the process
//! exits at once (the next command recovers the archive, as after a crash).

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Once;

use crate::error::{Error, Result};

static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    if SIGNAL.swap(sig, Ordering::SeqCst) != 0 {
        crate::source::children::emergency_exit();
    }
}

/// Install the handlers (once; the CLI does it at start).
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: sigaction(2) with a zero-initialised struct (a valid bit pattern) and a
            // handler that only touches an atomic or calls async-signal-safe functions.
            unsafe {
                let mut new: libc::sigaction = std::mem::zeroed();
                new.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                new.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut new.sa_mask);
                libc::sigaction(sig, &new, std::ptr::null_mut());
            }
        }
    });
}

/// The signal that asked us to stop, if any.
pub fn requested() -> Option<&'static str> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        libc::SIGINT => Some("SIGINT"),
        libc::SIGTERM => Some("SIGTERM"),
        _ => Some("a signal"),
    }
}

/// Stop here if a signal asked for it.
pub fn check() -> Result<()> {
    match requested() {
        None => Ok(()),
        Some(sig) => Err(Error::Interrupted(sig.to_string())),
    }
}
