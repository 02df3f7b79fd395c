//! x509 credentials made with GnuTLS' `certtool` for the TLS tests: a CA, a server
//! certificate and a client certificate, in the layouts of QEMU's `tls-creds-x509`
//! (server: `ca-cert.pem`, `server-cert.pem`, `server-key.pem`) and libnbd's
//! `tls-certificates` (client: `ca-cert.pem`, `client-cert.pem`, `client-key.pem`).
//!
//! One copy for every test that needs credentials: the library's unit tests
//! (`src/tls.rs`), its NBD client tests, and the command-line tests include this file
//! with `#[path]`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The names a server certificate made by [`make_pki`] carries.
pub const LOCAL_NAMES: &str = "dns_name = localhost\nip_address = 127.0.0.1\n";

/// A CA's two credentials folders.
pub struct Pki {
    /// `ca-cert.pem`, `server-cert.pem`, `server-key.pem`.
    pub server: PathBuf,
    /// `ca-cert.pem`, `client-cert.pem`, `client-key.pem`.
    pub client: PathBuf,
}

/// Run certtool in `dir`; it is part of the test set-up (scripts/test.sh installs
/// gnutls-bin).
pub fn certtool(dir: &Path, args: &[&str]) {
    let out = Command::new("certtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("certtool is installed (scripts/test.sh installs gnutls-bin)");
    assert!(out.status.success(), "certtool {args:?}: {out:?}");
}

/// A self-signed CA in `dir`: `ca-key.pem` and `ca-cert.pem`.
pub fn new_ca(dir: &Path, name: &str) {
    std::fs::write(
        dir.join("ca.info"),
        format!("cn = {name} CA\nca\ncert_signing_key\nexpiration_days = 2\n"),
    )
    .unwrap();
    certtool(dir, &["--generate-privkey", "--outfile=ca-key.pem"]);
    certtool(
        dir,
        &[
            "--generate-self-signed",
            "--load-privkey=ca-key.pem",
            "--template=ca.info",
            "--outfile=ca-cert.pem",
        ],
    );
}

/// A new key (`key_type`: certtool's `--key-type`, or its default) at `key` and a
/// certificate at `cert` from the template lines `info`, signed by the CA in `ca`
/// (paths relative to `ca`).
pub fn issue(ca: &Path, key: &str, cert: &str, info: &str, key_type: Option<&str>) {
    let template = format!("{cert}.info");
    std::fs::write(ca.join(&template), format!("{info}expiration_days = 2\n")).unwrap();
    let mut args = vec!["--generate-privkey".to_string(), format!("--outfile={key}")];
    if let Some(t) = key_type {
        args.push(format!("--key-type={t}"));
    }
    certtool(ca, &args.iter().map(String::as_str).collect::<Vec<_>>());
    certtool(
        ca,
        &[
            "--generate-certificate",
            &format!("--load-privkey={key}"),
            "--load-ca-certificate=ca-cert.pem",
            "--load-ca-privkey=ca-key.pem",
            &format!("--template={template}"),
            &format!("--outfile={cert}"),
        ],
    );
}

/// A CA named `name` under `root/name` with a server certificate for localhost and
/// 127.0.0.1 and a client certificate (an ECDSA key, as certtool pads about half of
/// them).
pub fn make_pki(root: &Path, name: &str) -> Pki {
    make_pki_for(root, name, LOCAL_NAMES)
}

/// Like [`make_pki`], the server certificate carrying the template lines `server_names`
/// (`dns_name = …`, `ip_address = …`) instead.
pub fn make_pki_for(root: &Path, name: &str, server_names: &str) -> Pki {
    let dir = root.join(name);
    let (server, client) = (dir.join("server"), dir.join("client"));
    for d in [&server, &client] {
        std::fs::create_dir_all(d).unwrap();
    }
    new_ca(&dir, name);
    issue(
        &dir,
        "server/server-key.pem",
        "server/server-cert.pem",
        &format!("cn = server\n{server_names}tls_www_server\nencryption_key\nsigning_key\n"),
        None,
    );
    issue(
        &dir,
        "client/client-key.pem",
        "client/client-cert.pem",
        "cn = client\ntls_www_client\nsigning_key\n",
        Some("ecdsa"),
    );
    for d in [&server, &client] {
        std::fs::copy(dir.join("ca-cert.pem"), d.join("ca-cert.pem")).unwrap();
    }
    Pki { server, client }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for a server the test starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The qemu-nbd arguments that require TLS with a client certificate, from the server
/// credentials folder `dir` (QEMU's `tls-creds-x509` layout).
pub fn qemu_tls_args(dir: &Path) -> Vec<String> {
    vec![
        "--object".into(),
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
            dir.display()
        ),
        "--tls-creds=tls0".into(),
    ]
}
