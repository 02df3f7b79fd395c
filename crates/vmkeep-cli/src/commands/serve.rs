//! `vmkeep serve`: export one generation's disks read-only over NBD until SIGINT or
//! SIGTERM.
//!
//! The signals are blocked before any thread starts and taken by one thread with
//! `sigwait`, which asks the server to stop; the server then removes its socket, lets
//! requests in flight finish and returns, and the pin on the generation goes with it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use vmkeep::engine::serve::{open_generation, ServedGeneration};
use vmkeep::nbd::server::{resolve_listen, Export, Listen, Server, ServerConfig};
use vmkeep::tls::TlsFiles;
use vmkeep::Error;

use super::Ctx;
use crate::cli::ServeArgs;

pub fn run(ctx: &Ctx, a: ServeArgs) -> Result<i32> {
    let signals = block_signals()?;
    raise_fd_limit();
    let listen = endpoint(&a)?;
    let tls = match (&listen, tls_files(ctx, &a)?) {
        (Listen::Tcp(_), Some(files)) => Some(vmkeep::tls::server_config(&files)?),
        (Listen::Tcp(_), None) if a.insecure_tcp => {
            tracing::warn!(
                "serving plain TCP (--insecure-tcp): every local user can read the served disks"
            );
            None
        }
        (Listen::Tcp(_), None) => return Err(Error::usage(NEEDS_TLS).into()),
        (Listen::Unix(_), _) => None,
    };
    let repo = ctx.open_repo()?;
    let served = open_generation(&repo, &a.vm, &a.generation)?;
    let exports: Vec<Arc<dyn Export>> = served
        .exports
        .iter()
        .map(|e| e.clone() as Arc<dyn Export>)
        .collect();
    let config = ServerConfig {
        idle_timeout: (a.idle_timeout > 0).then(|| Duration::from_secs(a.idle_timeout)),
        socket_group: a.socket_group.as_deref().map(group_id).transpose()?,
        tls,
        ..ServerConfig::default()
    };
    let server = Server::bind(&listen, exports, config)?;
    announce(ctx, &served, &server);
    let stop = server.shutdown_handle();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let sig = wait_signal(&signals);
            tracing::info!("signal {sig}: stopping");
            stop.shutdown();
        })?;
    server.run()?;
    drop(served); // releases the pin
    Ok(0)
}

const NEEDS_TLS: &str = "--listen needs TLS: give --tls-dir DIR (ca-cert.pem, server-cert.pem, \
     server-key.pem) or --tls-cert/--tls-key/--tls-ca, or [serve] tls_dir in the config; \
     loopback is no boundary between local users (--insecure-tcp serves without TLS anyway)";

/// Where to listen. Addresses beyond loopback need `--allow-remote`, which needs TLS.
fn endpoint(a: &ServeArgs) -> Result<Listen> {
    Ok(match (&a.socket, &a.listen) {
        (Some(path), None) => Listen::Unix(path.clone()),
        (None, Some(addr)) => resolve_listen(addr, a.allow_remote)?,
        _ => return Err(Error::usage("give one of --socket PATH or --listen ADDR").into()),
    })
}

/// The TLS files from the flags, then the config's `[serve]` keys; `None` when neither
/// names any. Single files override the folder's.
fn tls_files(ctx: &Ctx, a: &ServeArgs) -> Result<Option<TlsFiles>> {
    if a.insecure_tcp {
        return Ok(None);
    }
    let c = &ctx.config.serve;
    let dir = a.tls_dir.clone().or_else(|| c.tls_dir.clone());
    let cert = a.tls_cert.clone().or_else(|| c.tls_cert.clone());
    let key = a.tls_key.clone().or_else(|| c.tls_key.clone());
    let ca = a.tls_ca.clone().or_else(|| c.tls_ca.clone());
    if dir.is_none() && cert.is_none() && key.is_none() && ca.is_none() {
        return Ok(None);
    }
    let from_dir = dir.as_deref().map(TlsFiles::server_dir);
    let pick =
        |flag: Option<std::path::PathBuf>, what: &str, f: fn(&TlsFiles) -> &std::path::Path| {
            flag.or_else(|| from_dir.as_ref().map(|d| f(d).to_path_buf()))
                .ok_or_else(|| {
                    Error::usage(format!(
                        "TLS: no {what}: give --{what} FILE or --tls-dir DIR"
                    ))
                })
        };
    Ok(Some(TlsFiles {
        cert: pick(cert, "tls-cert", |d| &d.cert)?,
        key: pick(key, "tls-key", |d| &d.key)?,
        ca: pick(ca, "tls-ca", |d| &d.ca)?,
    }))
}

/// One line (or a JSON object) naming every export's URI.
fn announce(ctx: &Ctx, served: &ServedGeneration, server: &Server) {
    let uris: Vec<(String, u64, String)> = served
        .exports
        .iter()
        .map(|e| (e.name().to_string(), e.size(), server.uri(e.name())))
        .collect();
    if ctx.json {
        let exports: Vec<_> = uris
            .iter()
            .map(|(disk, size, uri)| serde_json::json!({ "disk": disk, "size": size, "uri": uri }))
            .collect();
        crate::output::json(&serde_json::json!({
            "vm": served.vm, "generation": served.generation, "exports": exports,
        }));
    } else {
        let list: Vec<&str> = uris.iter().map(|(_, _, u)| u.as_str()).collect();
        ctx.say(format!(
            "{}: serving generation {} read-only: {}",
            served.vm,
            served.generation,
            list.join(" ")
        ));
    }
}

/// Each connection holds three descriptors; a 1024 soft limit would cap the server well
/// below its own connection limit, so take what the hard limit allows (up to 64Ki).
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit on our stack.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            let want = lim.rlim_max.min(65536);
            if lim.rlim_cur < want {
                lim.rlim_cur = want;
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
        }
    }
}

/// Block SIGINT and SIGTERM in this thread and every thread it starts later.
fn block_signals() -> std::io::Result<libc::sigset_t> {
    // SAFETY: `set` is plain data that sigemptyset initialises before use; the calls
    // only read and write it through the pointers we pass, valid for their duration.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        Ok(set)
    }
}

/// Wait for one of the blocked signals; returns its number.
fn wait_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    loop {
        // SAFETY: `set` was initialised by block_signals; `sig` is a valid out pointer.
        if unsafe { libc::sigwait(set, &mut sig) } == 0 {
            return sig;
        }
    }
}

/// A group given by name or number.
pub fn group_id(group: &str) -> Result<u32, Error> {
    if let Ok(n) = group.parse() {
        return Ok(n);
    }
    let name = std::ffi::CString::new(group)
        .map_err(|_| Error::usage(format!("bad group name {group:?}")))?;
    // SAFETY: getgrnam takes a NUL-terminated string we own for the call and returns a
    // pointer to static storage (or NULL) that we read once, before any other call.
    let gr = unsafe { libc::getgrnam(name.as_ptr()) };
    if gr.is_null() {
        return Err(Error::usage(format!("unknown group {group:?}")));
    }
    // SAFETY: non-NULL pointer to a valid `struct group` (see above).
    Ok(unsafe { (*gr).gr_gid })
}
