//! Test support for S3: a real single-node Garage server (the binary that
//! `VMKEEP_TEST_GARAGE` names, which `scripts/test.sh` builds and sets), on free loopback
//! ports, with its own folders, one key and one bucket. Dropping it kills the server and
//! removes its folders.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The environment variable naming the Garage binary.
pub const GARAGE_VAR: &str = "VMKEEP_TEST_GARAGE";

/// The region the server signs for.
pub const REGION: &str = "garage";

/// A running single-node Garage with one key allowed to read, write and own one bucket.
pub struct Garage {
    child: Child,
    dir: tempfile::TempDir,
    binary: PathBuf,
    /// The S3 API's base URL (`http://127.0.0.1:PORT`).
    pub endpoint: String,
    /// The region requests are signed for: [`REGION`].
    pub region: String,
    /// The access key id of the test key.
    pub access_key_id: String,
    /// Its secret.
    pub secret_access_key: String,
    /// The bucket the key may use.
    pub bucket: String,
}

impl Garage {
    /// A fresh server, or `None` (with the reason printed) when `VMKEEP_TEST_GARAGE` is
    /// unset. A set variable that names no runnable binary fails the test.
    pub fn start() -> Option<Garage> {
        let Some(binary) = std::env::var_os(GARAGE_VAR) else {
            eprintln!(
                "skipped: {GARAGE_VAR} is not set (scripts/test.sh builds Garage and sets it)"
            );
            return None;
        };
        let binary = PathBuf::from(binary);
        assert!(
            binary.is_file(),
            "{GARAGE_VAR}={} names no file (build it with scripts/test.sh)",
            binary.display()
        );
        // Free ports are found by binding and letting go; another process may take one in
        // between, which shows as a server that exits at once: try again with new ports.
        let mut last = String::new();
        for _ in 0..3 {
            match Garage::try_start(&binary) {
                Ok(g) => return Some(g),
                Err(e) => last = e,
            }
        }
        panic!("Garage did not start: {last}");
    }

    fn try_start(binary: &Path) -> Result<Garage, String> {
        let dir = tempfile::Builder::new()
            .prefix("vmkeep-garage.")
            .tempdir()
            .map_err(|e| format!("temporary folder: {e}"))?;
        let ports = free_ports(3);
        let (s3, rpc, admin) = (ports[0], ports[1], ports[2]);
        let config = format!(
            r#"metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
admin_token = "{token}"
"#,
            meta = dir.path().join("meta").display(),
            data = dir.path().join("data").display(),
            secret = random_hex(32),
            token = random_hex(16),
        );
        let conf = dir.path().join("garage.toml");
        std::fs::write(&conf, config).map_err(|e| format!("{}: {e}", conf.display()))?;
        let log = std::fs::File::create(dir.path().join("server.log"))
            .map_err(|e| format!("server log: {e}"))?;
        let child = Command::new(binary)
            .arg("-c")
            .arg(&conf)
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
        let mut g = Garage {
            child,
            dir,
            binary: binary.to_path_buf(),
            endpoint: format!("http://127.0.0.1:{s3}"),
            region: REGION.to_string(),
            access_key_id: String::new(),
            secret_access_key: String::new(),
            bucket: "vmkeep-test".to_string(),
        };
        g.set_up()
            .map_err(|e| format!("{e}; server log:\n{}", g.log_tail()))?;
        Ok(g)
    }

    /// Wait for the server, give it its layout, make the key and the bucket.
    fn set_up(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("the server exited ({status})"));
            }
            if self.garage_quiet(&["status"]) {
                break;
            }
            if Instant::now() > deadline {
                return Err("the server did not answer `garage status` within 60 s".into());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let id = self.garage(&["node", "id", "-q"])?;
        let id = id.trim().split('@').next().unwrap_or_default().to_string();
        self.garage(&["layout", "assign", "-z", "dc1", "-c", "1G", &id])?;
        self.garage(&["layout", "apply", "--version", "1"])?;
        let key = self.garage(&["key", "create", "vmkeep-test"])?;
        let field = |name: &str| {
            key.lines()
                .find_map(|l| l.trim().strip_prefix(name))
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| format!("no {name:?} in the output of `garage key create`: {key}"))
        };
        self.access_key_id = field("Key ID:")?;
        self.secret_access_key = field("Secret key:")?;
        let bucket = self.bucket.clone();
        self.garage(&["bucket", "create", &bucket])?;
        self.garage(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            &bucket,
            "--key",
            "vmkeep-test",
        ])?;
        Ok(())
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.binary);
        c.arg("-c").arg(self.dir.path().join("garage.toml"));
        c.env("RUST_LOG", "warn");
        c
    }

    /// The S3 settings of `target` (`s3://BUCKET/PREFIX`) on this server, its key,
    /// region and endpoint given explicitly: the environment plays no part.
    pub fn settings(&self, target: &str) -> vmkeep::offsite::s3::S3Settings {
        let explicit = vmkeep::offsite::s3::S3Overrides {
            endpoint: Some(self.endpoint.clone()),
            region: Some(self.region.clone()),
            access_key_id: Some(self.access_key_id.clone()),
            secret_access_key: Some(self.secret_access_key.clone()),
            ..Default::default()
        };
        vmkeep::offsite::s3::S3Settings::from_target_with(target, &explicit, |_| None).unwrap()
    }

    /// The store of `target` on this server (see [`Garage::settings`]).
    pub fn store(&self, target: &str) -> vmkeep::offsite::s3::S3Store {
        vmkeep::offsite::s3::S3Store::open(&self.settings(target)).unwrap()
    }

    /// vmkeep's `[offsite.s3]` table for this server, its secret written to `secret`
    /// (mode 0600).
    pub fn offsite_config(&self, secret: &Path) -> String {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(secret, format!("{}\n", self.secret_access_key)).unwrap();
        std::fs::set_permissions(secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        format!(
            "[offsite.s3]\nendpoint = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key_file = \"{}\"\n",
            self.endpoint,
            self.region,
            self.access_key_id,
            secret.display()
        )
    }

    /// Run `garage ARGS…` against this server; its stdout, or an error with its output.
    pub fn garage(&self, args: &[&str]) -> Result<String, String> {
        let out = self
            .command()
            .args(args)
            .output()
            .map_err(|e| format!("cannot run garage {args:?}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "garage {args:?} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn garage_quiet(&self, args: &[&str]) -> bool {
        self.command()
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The last lines of the server's log, for a failure message.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `n` distinct loopback ports that were free a moment ago.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// `n` random bytes from the OS, in hex.
fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}
