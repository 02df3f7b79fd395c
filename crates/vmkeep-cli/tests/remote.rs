//! A remote hypervisor: vmkeep reaches libvirt over `qemu+tcp://127.0.0.1/system` and the
//! backup job's NBD export over TCP with TLS, from a private mount namespace in which the
//! domain's disk folder and libvirt's run folder are hidden, so that any local shortcut
//! (reading the image, the unix socket, QEMU's pid file) fails the test.
//!
//! The test reconfigures the host's libvirtd for its run and puts it back afterwards:
//! `backup_tls_x509_cert_dir` in /etc/libvirt/qemu.conf (a CA, server and client
//! certificates made with certtool), and libvirtd listening on TCP on 127.0.0.1 with a
//! config file of its own. The tests of this file run one at a time.

#![cfg(feature = "libvirt")]

mod common;
#[path = "../../vmkeep/tests/support/libvirt.rs"]
#[allow(dead_code)]
mod lv;
#[path = "../../vmkeep/tests/nbd_support/pki.rs"]
mod pki;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use lv::{virsh, TestVm};

/// The tests here restart libvirtd: one at a time.
static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

const QEMU_CONF: &str = "/etc/libvirt/qemu.conf";
/// libvirtd's TCP port in these tests (not the default 16509, which a real set-up may use).
const LIBVIRT_PORT: u16 = 16599;

fn remote_uri() -> String {
    format!("qemu+tcp://127.0.0.1:{LIBVIRT_PORT}/system")
}

/// The x509 material of a test: QEMU's server folder (for `backup_tls_x509_cert_dir`),
/// vmkeep's client folder, and a client folder whose certificate another CA signed.
struct Pki {
    server: PathBuf,
    client: PathBuf,
    stranger: PathBuf,
}

fn make_pki(root: &Path) -> Pki {
    let ours = pki::make_pki(root, "test");
    let other = pki::make_pki(root, "other");
    // QEMU runs as libvirt-qemu and reads its folder.
    for d in [root, &root.join("test"), &ours.server] {
        set_mode(d, 0o755);
    }
    for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
        set_mode(&ours.server.join(f), 0o644);
    }
    Pki {
        server: ours.server,
        client: ours.client,
        stranger: other.client,
    }
}

/// libvirtd reconfigured for this test, put back as it was when dropped.
struct RemoteLibvirtd {
    saved_conf: String,
}

impl RemoteLibvirtd {
    /// Restart libvirtd listening on TCP, with `tls_dir` as the backup TLS folder (`None`:
    /// the host's qemu.conf as it was, so no TLS for backups).
    fn start(dir: &Path, tls_dir: Option<&Path>) -> RemoteLibvirtd {
        Self::start_with(dir, tls_dir, None)
    }

    /// [`Self::start`], and with `nbd_client` QEMU's client credentials for NBD disks
    /// with TLS (`nbd_tls_x509_cert_dir`: an instant recovery's backing export).
    fn start_with(dir: &Path, tls_dir: Option<&Path>, nbd_client: Option<&Path>) -> RemoteLibvirtd {
        let saved_conf = std::fs::read_to_string(QEMU_CONF).unwrap();
        let mut conf = saved_conf.clone();
        if let Some(t) = tls_dir {
            conf.push_str(&format!(
                "\n# vmkeep test (removed when the test ends)\nbackup_tls_x509_cert_dir = \"{}\"\n",
                t.display()
            ));
        }
        if let Some(t) = nbd_client {
            conf.push_str(&format!(
                "\n# vmkeep test (removed when the test ends)\nnbd_tls_x509_cert_dir = \"{}\"\n",
                t.display()
            ));
        }
        std::fs::write(QEMU_CONF, conf).unwrap();
        let daemon_conf = dir.join("libvirtd.conf");
        std::fs::write(
            &daemon_conf,
            format!(
                "listen_tls = 0\nlisten_tcp = 1\nlisten_addr = \"127.0.0.1\"\ntcp_port = \"{LIBVIRT_PORT}\"\nauth_tcp = \"none\"\n"
            ),
        )
        .unwrap();
        let me = RemoteLibvirtd { saved_conf };
        lv::restart_libvirtd(&["-d", "--listen", "-f", daemon_conf.to_str().unwrap()]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !Command::new("virsh")
            .args(["-c", &remote_uri(), "version"])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            assert!(Instant::now() < deadline, "libvirtd did not answer on TCP");
            std::thread::sleep(Duration::from_millis(200));
        }
        me
    }
}

impl Drop for RemoteLibvirtd {
    fn drop(&mut self) {
        let _ = std::fs::write(QEMU_CONF, &self.saved_conf);
        lv::restart_libvirtd(&["-d"]);
    }
}

/// `vmkeep ARGS…` in a private mount namespace where `hidden` (the domain's disk folder)
/// and libvirt's run folder (its unix sockets, QEMU's pid files) are empty tmpfs mounts.
fn blind(env: &Env, hidden: &Path, args: &[&str]) -> Output {
    let inner = env.std_cmd(args);
    let mut c = Command::new("unshare");
    c.args(["-m", "--propagation", "private", "--", "sh", "-ec"])
        .arg(
            "mount -t tmpfs none /run/libvirt; mount -t tmpfs none \"$1\"; \
             ls /run/libvirt | grep -q . && exit 99; shift; exec \"$@\"",
        )
        .arg("sh")
        .arg(hidden)
        .arg(inner.get_program())
        .args(inner.get_args());
    for (k, v) in inner.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c.stdin(std::process::Stdio::null());
    c.output().unwrap()
}

/// A transient storage pool, destroyed when dropped.
/// The disk as the guest sees it now (QEMU's caches flushed to the file first).
fn disk_now(vm: &TestVm) -> Vec<u8> {
    vm.flush(0);
    let d = vm.disk("vda");
    lv::read_all(d.path.to_str().unwrap(), d.format, &vm.path("now.raw"))
}

/// (mode, read bytes) of disk vda of the newest generation.
fn newest(env: &Env, vm: &TestVm) -> (String, u64) {
    let d = env.newest_disk(&vm.name, "vda");
    (
        d["mode"].as_str().unwrap().to_string(),
        d["read_bytes"].as_u64().unwrap(),
    )
}

/// The test's environment: a config naming the remote host and the client credentials.
fn remote_env(client: &Path) -> Env {
    let env = Env::live();
    let cfg = env.path("no-config.toml");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!(
        "connect = \"{}\"\nnbd_tls_dir = \"{}\"\nnbd_ports = \"10870-10879\"\n",
        remote_uri(),
        client.display()
    ));
    std::fs::write(&cfg, text).unwrap();
    env
}

/// Full and incremental backups of a running domain through the remote connection, the
/// export on TCP with TLS, vmkeep blind to the host's files; then a shut-off run (started
/// paused on the remote host) is incremental too. A client certificate of another CA is
/// refused with a clear error and nothing is committed.
#[test]
fn a_remote_host_is_backed_up_over_tls_without_seeing_its_files() {
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    lv::ensure_libvirtd();
    let tmp = tempfile::tempdir().unwrap();
    let pki = make_pki(tmp.path());
    let _daemon = RemoteLibvirtd::start(tmp.path(), Some(&pki.server));
    let vm = TestVm::start("remote", &[("vda", "qcow2", 32)]);
    let hidden = vm.disk("vda").path.parent().unwrap().to_path_buf();
    let env = remote_env(&pki.client);
    vm.guest_write(0, 0x11, "0", "2M");
    let out = blind(&env, &hidden, &["backup", &vm.name]);
    let err = succeeded(&out, "full: ");
    assert_eq!(newest(&env, &vm).0, "full", "{err}");
    assert!(
        env.latest(&vm.name, "vda") == disk_now(&vm),
        "latest/vda.raw is the disk"
    );
    vm.guest_write(0, 0x22, "8M", "64k");
    succeeded(&blind(&env, &hidden, &["backup", &vm.name]), "incr: ");
    assert_eq!(newest(&env, &vm), ("incr".to_string(), 65536));
    assert!(env.latest(&vm.name, "vda") == disk_now(&vm));

    // Restored as a new VM on the remote host: its disk uploaded into a storage pool
    // through the libvirt connection; the new domain starts; its disk is the generation.
    let pool_dir = tmp.path().join("pool");
    let pool = format!("vmkeep-test-pool-{}", std::process::id());
    let _pool = lv::PoolGuard::create(&pool, &pool_dir);
    let copy = format!("{}-copy", vm.name);
    let _copy = lv::Undefine(copy.clone());
    let out = blind(
        &env,
        &hidden,
        &[
            "restore", &vm.name, "--as-vm", &copy, "--pool", &pool, "--start",
        ],
    );
    succeeded(&out, "restore --as-vm: ");
    assert!(virsh(&["domstate", &copy]).contains("running"));
    let volume = pool_dir.join(format!("{copy}-vda.qcow2"));
    assert!(
        virsh(&["dumpxml", &copy]).contains(volume.to_str().unwrap()),
        "the copy's disk is the volume"
    );
    let uploaded = lv::read_all(volume.to_str().unwrap(), "qcow2", &vm.path("copy.raw"));
    assert!(
        uploaded == env.restored(&vm.name, "0", Some("vda")),
        "the uploaded volume is the generation"
    );
    // The same name again is refused, nothing overwritten.
    let out = blind(
        &env,
        &hidden,
        &["restore", &vm.name, "--as-vm", &copy, "--pool", &pool],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    // The host is recorded by the backup and by `update`, as the URI was configured.
    let status = env.status(&vm.name);
    assert_eq!(
        status["vms"][0]["host"]["uri"].as_str(),
        Some(remote_uri().as_str()),
        "{status}"
    );
    succeeded(&blind(&env, &hidden, &["update"]), "update: ");
    let inventory = std::fs::read_to_string(env.repo().join("allvm.toml")).unwrap();
    assert!(inventory.contains(&remote_uri()), "{inventory}");

    // A client certificate from another CA: refused in the TLS handshake.
    let strange = remote_env(&pki.stranger);
    let out = blind(&strange, &hidden, &["backup", &vm.name]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(e.to_lowercase().contains("tls"), "{e}");
    assert_eq!(e.lines().filter(|l| l.contains("error")).count(), 1, "{e}");
    assert!(
        strange.generations(&vm.name).is_empty(),
        "nothing committed"
    );
    assert!(
        !virsh(&["domjobinfo", &vm.name]).contains("Backup"),
        "no job left"
    );

    // Shut off: started paused on the remote host, backed up incrementally, shut off.
    vm.guest_write(0, 0x33, "16M", "64k");
    vm.flush(0);
    virsh(&["destroy", &vm.name, "--graceful"]);
    let expected = {
        let d = vm.disk("vda");
        lv::read_all(d.path.to_str().unwrap(), d.format, &vm.path("off.raw"))
    };
    succeeded(&blind(&env, &hidden, &["backup", &vm.name]), "shut off: ");
    assert_eq!(newest(&env, &vm), ("incr".to_string(), 65536));
    assert!(virsh(&["domstate", &vm.name]).contains("shut off"));
    assert!(env.latest(&vm.name, "vda") == expected);
    // `--offline-read files` cannot work on a remote host: one clear error.
    let out = blind(
        &env,
        &hidden,
        &["backup", &vm.name, "--offline-read", "files"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("remote"), "{}", stderr(&out));
    env.ok(&["check", &vm.name, "--deep"]);
}

/// Instant recovery onto the remote host: `serve` listens here on TCP with TLS, the new
/// domain's overlay (uploaded into a pool) names that export as its backing store, the
/// domain boots from it, and the server copies everything into the overlay and ends by
/// itself. A server whose certificate the hypervisor does not trust: the start fails with
/// one error line, and nothing is left (no domain, no volume, no server).
#[test]
fn instant_recovery_onto_a_remote_host_over_tls_finishes_by_itself() {
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    lv::ensure_libvirtd();
    let tmp = tempfile::tempdir().unwrap();
    let pki = make_pki(tmp.path());
    // QEMU (libvirt-qemu) reads its NBD client credentials.
    set_mode(&pki.client, 0o755);
    for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        set_mode(&pki.client.join(f), 0o644);
    }
    let _daemon = RemoteLibvirtd::start_with(tmp.path(), Some(&pki.server), Some(&pki.client));
    let vm = TestVm::start("rinstant", &[("vda", "qcow2", 32)]);
    let hidden = vm.disk("vda").path.parent().unwrap().to_path_buf();
    let env = remote_env(&pki.client);
    let cfg = env.path("no-config.toml");
    let base = std::fs::read_to_string(&cfg).unwrap();
    let serve_config = |tls: &Path| {
        let serve = format!(
            "\n[serve]\naddress = \"127.0.0.1\"\ntls_dir = \"{}\"\n",
            tls.display()
        );
        std::fs::write(&cfg, format!("{base}{serve}")).unwrap();
    };
    serve_config(&pki.server);
    vm.guest_write(0, 0x11, "0", "3M");
    succeeded(&blind(&env, &hidden, &["backup", &vm.name]), "backup: ");
    let generation = env.restored(&vm.name, "0", Some("vda"));
    let pool_dir = tmp.path().join("pool");
    let pool = format!("vmkeep-test-ipool-{}", std::process::id());
    let _pool = lv::PoolGuard::create(&pool, &pool_dir);

    let instant = |name: &str| {
        blind(
            &env,
            &hidden,
            &[
                "restore",
                &vm.name,
                "--as-vm",
                name,
                "--instant",
                "--pool",
                &pool,
                "--start",
            ],
        )
    };

    // A server certificate of another CA: QEMU refuses it, the start fails, nothing stays.
    let other = pki::make_pki(tmp.path(), "other-server");
    serve_config(&other.server);
    let bad = format!("{}-bad", vm.name);
    let _bad = lv::Undefine(bad.clone());
    let out = instant(&bad);
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert_eq!(e.lines().filter(|l| l.contains("error")).count(), 1, "{e}");
    assert!(e.contains("certificate"), "{e}");
    assert!(
        !lv::virsh_quiet(&["domstate", &bad]),
        "the failed recovery's domain is gone"
    );
    assert!(
        !pool_dir.join(format!("{bad}-vda.qcow2")).exists(),
        "the failed recovery's volume is gone"
    );

    serve_config(&pki.server);
    let new = format!("{}-instant", vm.name);
    let _new = lv::Undefine(new.clone());
    let out = instant(&new);
    succeeded(&out, "instant: ");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        said.contains("NBD server 127.0.0.1:1087") && said.contains("(TLS)"),
        "{said}"
    );
    let pid = server_pid(&said);
    let _server = KillServer(pid);
    assert!(virsh(&["domstate", &new]).contains("running"));
    // (The pull of so small a disk may be complete already: the overlay was uploaded
    // empty, so what it holds at the end came through the TLS export.)
    wait_gone(pid, 180, "instant recovery onto the remote host");
    let status = env.status(&vm.name);
    assert_eq!(status["instant"][0]["phase"], "finished", "{status}");
    assert_eq!(status["instant"][0]["disks"][0]["pulled"], true, "{status}");
    for xml in [
        virsh(&["dumpxml", &new]),
        virsh(&["dumpxml", "--inactive", &new]),
    ] {
        assert!(
            !xml.contains("protocol='nbd'"),
            "the export is still named: {xml}"
        );
    }
    virsh(&[
        "qemu-monitor-command",
        &new,
        "--hmp",
        "qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend flush",
    ]);
    let volume = pool_dir.join(format!("{new}-vda.qcow2"));
    let info = lv::run(Command::new("qemu-img").args(["info", "-U"]).arg(&volume));
    assert!(!info.contains("backing file"), "{info}");
    let pulled = lv::read_all(volume.to_str().unwrap(), "qcow2", &vm.path("pulled.raw"));
    assert!(
        pulled == generation,
        "the volume holds the generation, without the archive"
    );
}

/// sshd on 127.0.0.1:`port` for root, with a key pair of its own (host key and client key
/// in `dir`), ended when dropped; the client's known-hosts entry for it is removed then.
struct Sshd {
    child: std::process::Child,
    port: u16,
}

impl Sshd {
    fn start(dir: &Path, port: u16) -> (Sshd, PathBuf) {
        let keygen = |file: &Path| {
            lv::run(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                    .arg(file),
            );
        };
        let (host_key, client_key) = (dir.join("host_key"), dir.join("id_ed25519"));
        keygen(&host_key);
        keygen(&client_key);
        let authorized = dir.join("authorized_keys");
        std::fs::copy(client_key.with_extension("pub"), &authorized).unwrap();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
                 PermitRootLogin prohibit-password\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\n",
                host_key.display(),
                authorized.display()
            ),
        )
        .unwrap();
        // Privilege separation needs its empty folder.
        std::fs::create_dir_all("/run/sshd").unwrap();
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stderr(std::fs::File::create(dir.join("sshd.log")).unwrap())
            .spawn()
            .expect("sshd (install openssh-server)");
        let sshd = Sshd { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "sshd did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        (sshd, client_key)
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("ssh-keygen")
            .args(["-R", &format!("[127.0.0.1]:{}", self.port)])
            .output();
    }
}

/// The README's remote backup: `qemu+ssh://root@HOST/system`. Full and incremental
/// backups through libvirt over ssh, the export on TCP with TLS, vmkeep blind to the
/// host's files.
#[test]
fn a_remote_host_is_backed_up_through_qemu_ssh() {
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    lv::ensure_libvirtd();
    let tmp = tempfile::tempdir().unwrap();
    let pki = make_pki(tmp.path());
    let _daemon = RemoteLibvirtd::start(tmp.path(), Some(&pki.server));
    let port = pki::free_port();
    let (_sshd, key) = Sshd::start(tmp.path(), port);
    let uri = format!(
        "qemu+ssh://root@127.0.0.1:{port}/system?keyfile={}&no_verify=1",
        key.display()
    );
    let vm = TestVm::start("ssh", &[("vda", "qcow2", 32)]);
    let hidden = vm.disk("vda").path.parent().unwrap().to_path_buf();
    let env = remote_env(&pki.client);
    vm.guest_write(0, 0x41, "0", "2M");
    succeeded(
        &blind(&env, &hidden, &["backup", &vm.name, "--connect", &uri]),
        "full over ssh: ",
    );
    assert_eq!(newest(&env, &vm).0, "full");
    assert!(env.latest(&vm.name, "vda") == disk_now(&vm));
    vm.guest_write(0, 0x42, "12M", "64k");
    succeeded(
        &blind(&env, &hidden, &["backup", &vm.name, "--connect", &uri]),
        "incr over ssh: ",
    );
    assert_eq!(newest(&env, &vm), ("incr".to_string(), 65536));
    assert!(env.latest(&vm.name, "vda") == disk_now(&vm));
    let status = env.status(&vm.name);
    // Recorded without the user (a URI may carry a password there).
    let recorded = uri.replace("root@", "");
    assert_eq!(
        status["vms"][0]["host"]["uri"].as_str(),
        Some(recorded.as_str()),
        "{status}"
    );
    // A connection that fails names the host, never the user or a password.
    let bad = format!(
        "qemu+ssh://root:s3cret@127.0.0.1:{}/system?no_verify=1",
        pki::free_port()
    );
    let out = env.run(&["backup", &vm.name, "--connect", &bad]);
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(e.contains("cannot connect to qemu+ssh://127.0.0.1:"), "{e}");
    assert!(!e.contains("s3cret") && !e.contains("root@"), "{e}");
}

/// A host without backup TLS set up: vmkeep never falls back to plain NBD by itself (the
/// run fails and says how to set TLS up); `--insecure-nbd` exports over plain TCP.
#[test]
fn plain_tcp_only_when_asked_for() {
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    lv::ensure_libvirtd();
    let tmp = tempfile::tempdir().unwrap();
    let pki = make_pki(tmp.path());
    // /etc/pki/qemu, libvirt's fallback, must not hold credentials for this to mean much.
    let _daemon = RemoteLibvirtd::start(tmp.path(), None);
    let vm = TestVm::start("plain", &[("vda", "qcow2", 32)]);
    let hidden = vm.disk("vda").path.parent().unwrap().to_path_buf();
    let env = remote_env(&pki.client);
    vm.guest_write(0, 0x11, "0", "1M");
    let out = blind(&env, &hidden, &["backup", &vm.name]);
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{e}");
    if !Path::new("/etc/pki/qemu/ca-cert.pem").exists() {
        assert!(e.contains("backup_tls_x509_cert_dir"), "{e}");
    }
    assert!(env.generations(&vm.name).is_empty());
    let out = blind(&env, &hidden, &["backup", &vm.name, "--insecure-nbd"]);
    succeeded(&out, "insecure: ");
    assert!(env.latest(&vm.name, "vda") == disk_now(&vm));
}
