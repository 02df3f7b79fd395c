//! `vmkeep serve`: export one generation's disks read-only over NBD until SIGINT or
//! SIGTERM.
//!
//! The signals are blocked before any thread starts and taken by one thread with
//! `sigwait`, which asks the server to stop; the server then removes its socket, lets
//! requests in flight finish and returns, and the pin on the generation goes with it.

use anyhow::Result;
use vmkeep::engine::serve::{serve, ServeOptions, ServedGeneration, TlsPaths};
use vmkeep::nbd::server::{Export, Server};

use super::Ctx;
use crate::cli::ServeArgs;

pub fn run(ctx: &Ctx, a: ServeArgs) -> Result<i32> {
    // Before any thread starts, so that every thread inherits the mask (a process-wide
    // matter, so the command's, not the library's).
    let signals = block_signals()?;
    let finish = finish_options(ctx, &a)?;
    let c = &ctx.config.serve;
    let flags = TlsPaths {
        dir: a.tls_dir,
        cert: a.tls_cert,
        key: a.tls_key,
        ca: a.tls_ca,
    };
    let config = TlsPaths {
        dir: c.tls_dir.clone(),
        cert: c.tls_cert.clone(),
        key: c.tls_key.clone(),
        ca: c.tls_ca.clone(),
    };
    let opts = ServeOptions {
        vm: a.vm,
        rev: a.generation,
        socket: a.socket,
        listen: a.listen,
        allow_remote: a.allow_remote,
        tls: flags.or(config),
        insecure_tcp: a.insecure_tcp,
        idle_timeout: (a.idle_timeout > 0).then(|| std::time::Duration::from_secs(a.idle_timeout)),
        socket_group: a.socket_group,
    };
    serve(&ctx.repo_path(), &opts, &mut |served, server| {
        announce(ctx, served, server);
        let stop = server.shutdown_handle();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let sig = wait_signal(&signals);
                tracing::info!("signal {sig}: stopping");
                stop.shutdown();
            })
            .map_err(|e| vmkeep::Error::io_ctx("signal thread", e))?;
        if let Some(f) = &finish {
            finisher(f, served, server)?;
        }
        Ok(())
    })?;
    Ok(0)
}

/// `--finish-domain` without libvirt support.
#[cfg(not(feature = "libvirt"))]
struct FinishArgs;

#[cfg(not(feature = "libvirt"))]
fn finish_options(_ctx: &Ctx, a: &ServeArgs) -> Result<Option<FinishArgs>> {
    if a.finish_domain.is_some() {
        anyhow::bail!(vmkeep::Error::usage(
            "--finish-domain needs libvirt: this vmkeep was built without it"
        ));
    }
    Ok(None)
}

#[cfg(not(feature = "libvirt"))]
fn finisher(_f: &FinishArgs, _served: &ServedGeneration, _server: &Server) -> vmkeep::Result<()> {
    Ok(())
}

/// `--finish-domain NAME [--connect URI] [--state FILE]`.
#[cfg(feature = "libvirt")]
struct FinishArgs {
    domain: String,
    uri: String,
    state: std::path::PathBuf,
}

#[cfg(feature = "libvirt")]
fn finish_options(ctx: &Ctx, a: &ServeArgs) -> Result<Option<FinishArgs>> {
    let Some(domain) = &a.finish_domain else {
        return Ok(None);
    };
    Ok(Some(FinishArgs {
        domain: domain.clone(),
        uri: ctx.connect_uri(Some(domain), a.connect.as_deref())?,
        state: a
            .state
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(format!("vmkeep-finish-{domain}.json"))),
    }))
}

/// Start the thread that finishes the instant recovery into `f.domain` and stops the
/// server when it is complete.
#[cfg(feature = "libvirt")]
fn finisher(f: &FinishArgs, served: &ServedGeneration, server: &Server) -> vmkeep::Result<()> {
    use vmkeep::engine::finish::{self, Finish, OurExport};

    let ours = match (server.socket_path(), server.local_addr()) {
        (Some(socket), _) => OurExport::Unix(socket.to_path_buf()),
        (None, Some(addr)) => OurExport::Tcp(addr.port()),
        (None, None) => {
            return Err(vmkeep::Error::usage(
                "--finish-domain: the server has no address",
            ))
        }
    };
    let plan = Finish {
        uri: f.uri.clone(),
        domain: f.domain.clone(),
        ours,
        exports: served
            .exports
            .iter()
            .map(|e| e.name().to_string())
            .collect(),
        vm: served.vm.clone(),
        generation: served.generation.to_string(),
        state: f.state.clone(),
    };
    let stop = server.shutdown_handle();
    std::thread::Builder::new()
        .name("finish".into())
        .spawn(move || {
            let phase = finish::run(&plan);
            tracing::info!("instant recovery of {}: {phase:?}; stopping", plan.domain);
            stop.shutdown();
        })
        .map_err(|e| vmkeep::Error::io_ctx("finish thread", e))?;
    Ok(())
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
