//! An S3-compatible bucket as an [`ObjectStore`]: AWS S3, Garage, MinIO, Ceph RGW and the
//! like, over HTTP(S) with AWS Signature Version 4.
//!
//! Requests are signed by `rusty-s3` (query-string signatures, renewed for every attempt)
//! and sent by one blocking `ureq` agent, which keeps connections open between requests and
//! is shared by every thread that uses the store. TLS is rustls with the `ring` provider;
//! the server's certificate must chain to Mozilla's roots, or to the CA certificates of
//! [`S3Settings::ca_file`] when it is given.
//!
//! Every upload carries its `Content-MD5`, so the server refuses bytes damaged on the way
//! instead of storing them. Network errors, `5xx` answers (`503 SlowDown` among them) and
//! `429` are retried with exponential back-off a few times; other `4xx` answers are final.
//! A dead server is an error after the connect or read timeout ([`S3Tuning`]), not a hang.
//! Messages name the store, the operation, the key, the HTTP status and the S3 error code
//! and message; they never contain the secret key or a signed URL.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use md5::{Digest as _, Md5};
use rusty_s3::actions::{ListObjectsV2, S3Action};
use rusty_s3::{Bucket, Credentials, UrlStyle};

use super::store::{check_key, ObjectInfo, ObjectStore};
use crate::error::{Error, Result};

/// The region used when neither the settings nor the environment name one.
pub const DEFAULT_REGION: &str = "us-east-1";

/// Where a bucket is and how to sign in to it.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Settings {
    /// The server's base URL (`https://s3.eu-west-1.amazonaws.com`, `http://127.0.0.1:3900`).
    pub endpoint: String,
    /// The region the requests are signed for (Garage's default is `garage`).
    pub region: String,
    /// The bucket's name.
    pub bucket: String,
    /// The folder-like prefix of every object vmkeep writes, without a trailing `/`; empty
    /// for the whole bucket.
    pub prefix: String,
    /// The access key id.
    pub access_key_id: String,
    /// The secret access key (never printed: [`fmt::Debug`] leaves it out).
    pub secret_access_key: String,
    /// The session token of temporary credentials.
    pub session_token: Option<String>,
    /// Path-style URLs (`ENDPOINT/BUCKET/KEY`, what Garage, MinIO and Ceph need) rather than
    /// virtual-host style (`BUCKET.HOST/KEY`).
    pub path_style: bool,
    /// A PEM file of the CA certificates that the server's certificate must chain to,
    /// instead of Mozilla's roots (`ca_file` of the config, else `AWS_CA_BUNDLE`).
    pub ca_file: Option<PathBuf>,
}

impl fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"(hidden)")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "(hidden)"),
            )
            .field("path_style", &self.path_style)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// Values given explicitly (by the configuration or the command line); each one that is
/// set wins over the environment.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct S3Overrides {
    /// The endpoint (else `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, then AWS's endpoint of
    /// the region).
    pub endpoint: Option<String>,
    /// The region (else `AWS_REGION`, `AWS_DEFAULT_REGION`, then [`DEFAULT_REGION`]).
    pub region: Option<String>,
    /// The access key id (else `AWS_ACCESS_KEY_ID`).
    pub access_key_id: Option<String>,
    /// The secret access key (else `AWS_SECRET_ACCESS_KEY`).
    pub secret_access_key: Option<String>,
    /// The session token (else `AWS_SESSION_TOKEN`, only when the access key id came from
    /// the environment too: a token belongs to its key).
    pub session_token: Option<String>,
    /// Path-style URLs (default: yes).
    pub path_style: Option<bool>,
    /// A PEM file of CA certificates (default: Mozilla's roots).
    pub ca_file: Option<PathBuf>,
}

/// The secret in file `path`: its first line, trimmed. The file must be a regular file
/// (not reached through a symbolic link) that neither its group nor others may read.
pub fn read_secret_file(path: &Path) -> Result<String> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let what = |e: String| Error::usage(format!("{}: {e}", path.display()));
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(|e| what(e.to_string()))?;
    let meta = f.metadata().map_err(|e| what(e.to_string()))?;
    if !meta.is_file() {
        return Err(what("not a regular file".into()));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(what(format!(
            "readable by others (mode {:04o}): chmod 600 it",
            meta.mode() & 0o7777
        )));
    }
    let mut text = String::new();
    f.by_ref()
        .take(64 << 10)
        .read_to_string(&mut text)
        .map_err(|e| what(e.to_string()))?;
    let secret = text.lines().next().unwrap_or("").trim().to_string();
    if secret.is_empty() {
        return Err(what("empty".into()));
    }
    Ok(secret)
}

impl fmt::Debug for S3Overrides {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hidden = |v: &Option<String>| v.as_ref().map(|_| "(hidden)");
        f.debug_struct("S3Overrides")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &hidden(&self.secret_access_key))
            .field("session_token", &hidden(&self.session_token))
            .field("path_style", &self.path_style)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl S3Settings {
    /// The settings of target `s3://BUCKET[/PREFIX]`: `explicit` values, else the process
    /// environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
    /// `AWS_REGION` / `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`).
    pub fn from_target(target: &str, explicit: &S3Overrides) -> Result<S3Settings> {
        S3Settings::from_target_with(target, explicit, |name| std::env::var(name).ok())
    }

    /// [`S3Settings::from_target`] with the environment read through `env` (tests pass
    /// their own).
    pub fn from_target_with(
        target: &str,
        explicit: &S3Overrides,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<S3Settings> {
        let env = |name: &str| env(name).filter(|v| !v.is_empty());
        let (bucket, prefix) = parse_target(target)?;
        let region = explicit
            .region
            .clone()
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| DEFAULT_REGION.to_string());
        let endpoint = explicit
            .endpoint
            .clone()
            .or_else(|| env("AWS_ENDPOINT_URL_S3"))
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        let (access_key_id, session_token) = match &explicit.access_key_id {
            Some(id) => (Some(id.clone()), explicit.session_token.clone()),
            None => (
                env("AWS_ACCESS_KEY_ID"),
                explicit
                    .session_token
                    .clone()
                    .or_else(|| env("AWS_SESSION_TOKEN")),
            ),
        };
        let secret_access_key = explicit
            .secret_access_key
            .clone()
            .or_else(|| env("AWS_SECRET_ACCESS_KEY"));
        let (Some(access_key_id), Some(secret_access_key)) = (access_key_id, secret_access_key)
        else {
            return Err(Error::usage(format!(
                "{target}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
                 (or the target's access_key_id and secret_access_key)"
            )));
        };
        Ok(S3Settings {
            endpoint,
            region,
            bucket,
            prefix,
            access_key_id,
            secret_access_key,
            session_token,
            path_style: explicit.path_style.unwrap_or(true),
            ca_file: explicit
                .ca_file
                .clone()
                .or_else(|| env("AWS_CA_BUNDLE").map(PathBuf::from)),
        })
    }

    /// The target as the user writes it: `s3://BUCKET[/PREFIX]`.
    pub fn target(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// Bucket and prefix of `s3://BUCKET[/PREFIX]`. The bucket follows S3's naming rules
/// (3 to 63 lowercase letters, digits, `.` and `-`, starting and ending with a letter or a
/// digit); the prefix is `/`-separated names of ASCII letters, digits, `.`, `_` and `-`
/// (neither `.` nor `..`), its trailing `/` dropped.
pub fn parse_target(target: &str) -> Result<(String, String)> {
    let bad = |why: &str| Error::usage(format!("not an S3 target ({why}): {target:?}"));
    let rest = target
        .strip_prefix("s3://")
        .ok_or_else(|| bad("it must start with s3://"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let edge_ok = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && edge_ok(bucket.bytes().next())
        && edge_ok(bucket.bytes().last())
        && !bucket.contains("..");
    if !bucket_ok {
        return Err(bad(
            "the bucket name must be 3 to 63 lowercase letters, digits, '.' and '-'",
        ));
    }
    let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
    let prefix_ok = prefix.is_empty()
        || prefix.split('/').all(|n| {
            !n.is_empty()
                && n != "."
                && n != ".."
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    if !prefix_ok {
        return Err(bad(
            "the prefix must be '/'-separated names of letters, digits, '.', '_' and '-'",
        ));
    }
    Ok((bucket.to_string(), prefix.to_string()))
}

/// Timeouts, retries and page size of an [`S3Store`]; [`S3Tuning::default`] is what vmkeep
/// uses, tests shorten it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Tuning {
    /// How long making a connection (DNS, TCP, TLS) may take.
    pub connect_timeout: Duration,
    /// How long the server may stay silent: waiting for an answer, and between two reads
    /// or writes of one.
    pub io_timeout: Duration,
    /// How many times a request is tried in all (at least 1).
    pub attempts: u32,
    /// The pause after the first failed attempt; it doubles after each further one.
    pub backoff: Duration,
    /// Keys asked for per listing page (`max-keys`); `None`: the server's default (1000).
    pub page_size: Option<u16>,
}

impl Default for S3Tuning {
    fn default() -> S3Tuning {
        S3Tuning {
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(60),
            attempts: 4,
            backoff: Duration::from_millis(250),
            page_size: None,
        }
    }
}

/// How long a signed URL stays valid (it is signed anew for every attempt).
const SIGNATURE_LIFETIME: Duration = Duration::from_secs(3600);

/// The most bytes of an error answer read for its code and message.
const ERROR_BODY_LIMIT: u64 = 64 * 1024;

/// An S3 bucket (under a prefix) as an [`ObjectStore`]; see the module documentation.
pub struct S3Store {
    bucket: Bucket,
    credentials: Credentials,
    /// `PREFIX/`, or empty: what every key is put behind.
    key_prefix: String,
    agent: ureq::Agent,
    tuning: S3Tuning,
    describe: String,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("store", &self.describe)
            .finish_non_exhaustive()
    }
}

impl S3Store {
    /// The store of `settings` with vmkeep's timeouts and retries. Nothing is sent yet: a
    /// wrong endpoint or key shows with the first request.
    pub fn open(settings: &S3Settings) -> Result<S3Store> {
        S3Store::open_tuned(settings, S3Tuning::default())
    }

    /// [`S3Store::open`] with other timeouts, retries or page size.
    pub fn open_tuned(settings: &S3Settings, tuning: S3Tuning) -> Result<S3Store> {
        let target = settings.target();
        let bad = |why: String| Error::usage(format!("{target}: {why}"));
        let endpoint: url::Url = settings.endpoint.parse().map_err(|e| {
            bad(format!(
                "endpoint {:?} is not a URL: {e}",
                settings.endpoint
            ))
        })?;
        if !matches!(endpoint.scheme(), "http" | "https") || endpoint.host_str().is_none() {
            return Err(bad(format!(
                "endpoint {:?} is not an http:// or https:// URL with a host",
                settings.endpoint
            )));
        }
        if !endpoint.username().is_empty() || endpoint.password().is_some() {
            return Err(bad(
                "the endpoint must not carry a user name or password (use the access key)"
                    .to_string(),
            ));
        }
        if endpoint.query().is_some() || endpoint.fragment().is_some() {
            return Err(bad(format!(
                "endpoint {:?} must not have a query or fragment",
                settings.endpoint
            )));
        }
        let style = if settings.path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        let shown = endpoint.as_str().trim_end_matches('/').to_string();
        let bucket = Bucket::new(
            endpoint,
            style,
            settings.bucket.clone(),
            settings.region.clone(),
        )
        .map_err(|e| bad(format!("bucket {:?} at {shown}: {e}", settings.bucket)))?;
        let credentials = match &settings.session_token {
            Some(token) => Credentials::new_with_token(
                settings.access_key_id.clone(),
                settings.secret_access_key.clone(),
                token.clone(),
            ),
            None => Credentials::new(
                settings.access_key_id.clone(),
                settings.secret_access_key.clone(),
            ),
        };
        let roots = match &settings.ca_file {
            Some(path) => {
                let certs = crate::tls::certificates(path)?
                    .into_iter()
                    .map(|c| ureq::tls::Certificate::from_der(&c).to_owned())
                    .collect();
                ureq::tls::RootCerts::Specific(Arc::new(certs))
            }
            None => ureq::tls::RootCerts::WebPki,
        };
        let tls = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .root_certs(roots)
            .build();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(concat!("vmkeep/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls)
            .timeout_resolve(Some(tuning.connect_timeout))
            .timeout_connect(Some(tuning.connect_timeout))
            .timeout_recv_response(Some(tuning.io_timeout))
            .timeout_per_read(Some(tuning.io_timeout))
            .timeout_per_write(Some(tuning.io_timeout))
            .max_idle_connections(32)
            .max_idle_connections_per_host(32)
            .build()
            .into();
        let key_prefix = if settings.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", settings.prefix)
        };
        Ok(S3Store {
            bucket,
            credentials,
            key_prefix,
            agent,
            tuning: S3Tuning {
                attempts: tuning.attempts.max(1),
                ..tuning
            },
            describe: format!("{target} at {shown}"),
        })
    }

    /// The object's name in the bucket.
    fn full_key(&self, key: &str) -> Result<String> {
        check_key(key)?;
        Ok(format!("{}{key}", self.key_prefix))
    }

    /// A [`Error::Target`] naming this store, `what` (operation and key) and `why`.
    fn failure(&self, what: &str, why: impl fmt::Display) -> Error {
        Error::target(&self.describe, format!("{what}: {why}"))
    }

    /// Send the request `sign` makes (signed anew for every attempt) with `body`, retrying
    /// network errors, `5xx` and `429`; the answer of the last attempt, whatever its status.
    fn exchange(
        &self,
        what: &str,
        sign: impl Fn() -> (Method, url::Url),
        headers: &[(&str, String)],
        body: Option<&[u8]>,
    ) -> Result<Answer> {
        let mut pause = self.tuning.backoff;
        let mut attempt = 1;
        loop {
            let (method, url) = sign();
            let outcome = self.once(method, url, headers, body);
            let retry = match &outcome {
                Ok(a) => a.status >= 500 || a.status == 429,
                Err(e) => transient(e),
            };
            if !retry || attempt >= self.tuning.attempts {
                return match outcome {
                    Ok(a) => Ok(a),
                    Err(e) if attempt > 1 => Err(self.failure(
                        what,
                        format!("{} (after {attempt} attempts)", network_error(&e)),
                    )),
                    Err(e) => Err(self.failure(what, network_error(&e))),
                };
            }
            match &outcome {
                Ok(a) => tracing::debug!(
                    "{}: {what}: {} (attempt {attempt}), retrying in {pause:?}",
                    self.describe,
                    a.status
                ),
                Err(e) => tracing::debug!(
                    "{}: {what}: {} (attempt {attempt}), retrying in {pause:?}",
                    self.describe,
                    network_error(e)
                ),
            }
            std::thread::sleep(pause);
            pause = pause.saturating_mul(2);
            attempt += 1;
        }
    }

    /// One attempt: the status, the headers vmkeep reads and the whole body.
    fn once(
        &self,
        method: Method,
        url: url::Url,
        headers: &[(&str, String)],
        body: Option<&[u8]>,
    ) -> std::result::Result<Answer, ureq::Error> {
        let url = url.as_str();
        let mut response = match method {
            Method::Get => {
                let mut r = self.agent.get(url);
                for (k, v) in headers {
                    r = r.header(*k, v);
                }
                r.call()?
            }
            Method::Delete => {
                let mut r = self.agent.delete(url);
                for (k, v) in headers {
                    r = r.header(*k, v);
                }
                r.call()?
            }
            Method::Put => {
                let mut r = self.agent.put(url);
                for (k, v) in headers {
                    r = r.header(*k, v);
                }
                r.send(body.unwrap_or_default())?
            }
        };
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let content_range = header("content-range");
        let limit = if (200..300).contains(&status) {
            u64::MAX
        } else {
            ERROR_BODY_LIMIT
        };
        let body = match response.body_mut().with_config().limit(limit).read_to_vec() {
            Ok(b) => b,
            // An error answer's body only explains it; one too long is cut, not fatal.
            Err(ureq::Error::BodyExceedsLimit(_)) if limit == ERROR_BODY_LIMIT => Vec::new(),
            Err(e) => return Err(e),
        };
        Ok(Answer {
            status,
            content_range,
            body,
        })
    }

    /// The error for an answer with an unexpected status.
    fn status_error(&self, what: &str, a: &Answer) -> Error {
        self.failure(what, a.explain())
    }

    /// `GET` or `DELETE` found nothing: `true` for a missing object, an error for a missing
    /// bucket (a wrong bucket name must not look like an empty target).
    fn missing(&self, what: &str, a: &Answer) -> Result<bool> {
        if a.status != 404 {
            return Ok(false);
        }
        match s3_error(&a.body) {
            Some((code, _)) if code != "NoSuchKey" => Err(self.status_error(what, a)),
            _ => Ok(true),
        }
    }
}

/// The HTTP methods the store uses.
#[derive(Debug, Clone, Copy)]
enum Method {
    Get,
    Put,
    Delete,
}

/// One answer of the server, read whole.
struct Answer {
    status: u16,
    content_range: Option<String>,
    body: Vec<u8>,
}

impl Answer {
    /// `403 AccessDenied: MESSAGE`, or the status and its reason when the body is no S3
    /// error document.
    fn explain(&self) -> String {
        match s3_error(&self.body) {
            Some((code, message)) if message.is_empty() => format!("{} {code}", self.status),
            Some((code, message)) => format!("{} {code}: {message}", self.status),
            None => {
                let reason = ureq::http::StatusCode::from_u16(self.status)
                    .ok()
                    .and_then(|s| s.canonical_reason())
                    .unwrap_or("unexpected status");
                format!("{} {reason}", self.status)
            }
        }
    }
}

/// The `Code` and `Message` of an S3 error document (`<Error><Code>…</Code>…`), the message
/// on one line and at most 300 characters.
fn s3_error(body: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(body).ok()?;
    let element = |name: &str| {
        let open = format!("<{name}>");
        let start = text.find(&open)? + open.len();
        let end = start + text[start..].find(&format!("</{name}>"))?;
        Some(unescape(&text[start..end]))
    };
    if !text.contains("<Error") {
        return None;
    }
    let code = element("Code").filter(|c| !c.is_empty())?;
    let mut message: String = element("Message")
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    if message.chars().count() > 300 {
        message = message.chars().take(300).collect::<String>() + "…";
    }
    Some((code, message))
}

/// XML's predefined entities replaced by their characters.
fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// Whether another attempt may succeed where `e` failed: network trouble, not a refused
/// certificate or a malformed request.
fn transient(e: &ureq::Error) -> bool {
    if let ureq::Error::Io(io) = e {
        // A TLS refusal (an unknown issuer, a wrong name) arrives as an I/O error that
        // carries rustls' error: the next attempt would be refused the same way.
        if io
            .get_ref()
            .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
        {
            return false;
        }
    }
    matches!(
        e,
        ureq::Error::Io(_)
            | ureq::Error::Timeout(_)
            | ureq::Error::HostNotFound
            | ureq::Error::ConnectionFailed
            | ureq::Error::Protocol(_)
            | ureq::Error::BodyStalled
    )
}

/// A network error for a message (a URL, which would carry the signature, left out).
fn network_error(e: &ureq::Error) -> String {
    match e {
        ureq::Error::BadUri(_) => "bad request URL".to_string(),
        ureq::Error::Http(_) => "bad request".to_string(),
        ureq::Error::Timeout(t) => format!("no answer in time ({t})"),
        ureq::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}

/// `Content-MD5` of `data`: base64 of its MD5 digest.
fn content_md5(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Md5::digest(data))
}

/// A `Content-Range` header: `bytes FIRST-LAST/TOTAL`, or `bytes */TOTAL` for a refused
/// range; TOTAL may be `*` (unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ContentRange {
    /// FIRST and LAST (inclusive), unless the range was refused.
    range: Option<(u64, u64)>,
    /// The object's size, when the server tells it.
    total: Option<u64>,
}

/// The [`ContentRange`] of header value `v`.
fn parse_content_range(v: &str) -> Option<ContentRange> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let total = match total {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    let range = match range {
        "*" => None,
        r => {
            let (a, b) = r.split_once('-')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        }
    };
    Some(ContentRange { range, total })
}

/// `LastModified` of a listing (`2024-05-01T12:00:00.000Z`).
fn parse_time(s: &str) -> Option<SystemTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(SystemTime::from)
}

impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        let what = format!("put {key}");
        let full = self.full_key(key)?;
        let md5 = content_md5(data);
        let a = self.exchange(
            &what,
            || {
                let action = self.bucket.put_object(Some(&self.credentials), &full);
                (Method::Put, action.sign(SIGNATURE_LIFETIME))
            },
            &[("content-md5", md5.clone())],
            Some(data),
        )?;
        if !(200..300).contains(&a.status) {
            return Err(self.status_error(&what, &a));
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let what = format!("get {key}");
        let full = self.full_key(key)?;
        let a = self.exchange(
            &what,
            || {
                let action = self.bucket.get_object(Some(&self.credentials), &full);
                (Method::Get, action.sign(SIGNATURE_LIFETIME))
            },
            &[],
            None,
        )?;
        if self.missing(&what, &a)? {
            return Ok(None);
        }
        if a.status != 200 {
            return Err(self.status_error(&what, &a));
        }
        Ok(Some(a.body))
    }

    fn get_range(&self, key: &str, start: u64, len: u64) -> Result<Vec<u8>> {
        let what = format!("get {key} bytes {start}..{}", start.saturating_add(len));
        let full = self.full_key(key)?;
        let Some(end) = start.checked_add(len) else {
            return Err(Error::usage(format!("{what}: the range overflows")));
        };
        if len == 0 {
            return Ok(Vec::new());
        }
        let corrupt = |why: String| Error::corrupt(&self.describe, format!("{what}: {why}"));
        let a = self.exchange(
            &what,
            || {
                let action = self.bucket.get_object(Some(&self.credentials), &full);
                (Method::Get, action.sign(SIGNATURE_LIFETIME))
            },
            &[("range", format!("bytes={start}-{}", end - 1))],
            None,
        )?;
        let range = a.content_range.as_deref().and_then(parse_content_range);
        match a.status {
            206 => {
                let Some(ContentRange {
                    range: Some((first, last)),
                    total,
                }) = range
                else {
                    return Err(self.failure(&what, "206 without a usable Content-Range"));
                };
                if first != start || a.body.len() as u64 != last.saturating_sub(first) + 1 {
                    return Err(self.failure(
                        &what,
                        format!(
                            "the server sent bytes {first}..={last} in {} bytes",
                            a.body.len()
                        ),
                    ));
                }
                if a.body.len() as u64 != len {
                    let size = total.map_or("fewer".to_string(), |t| t.to_string());
                    return Err(corrupt(format!("the object has {size} bytes")));
                }
                Ok(a.body)
            }
            // A server that ignores Range sends the whole object.
            200 => {
                let size = a.body.len() as u64;
                if end > size {
                    return Err(corrupt(format!("the object has {size} bytes")));
                }
                Ok(a.body[start as usize..end as usize].to_vec())
            }
            416 => {
                let size = range
                    .and_then(|r| r.total)
                    .map_or("fewer".to_string(), |t| t.to_string());
                Err(corrupt(format!("the object has {size} bytes")))
            }
            _ => Err(self.status_error(&what, &a)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let what = if prefix.is_empty() {
            "list".to_string()
        } else {
            format!("list {prefix}")
        };
        let full_prefix = format!("{}{prefix}", self.key_prefix);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let a = self.exchange(
                &what,
                || {
                    let mut action = self.bucket.list_objects_v2(Some(&self.credentials));
                    if !full_prefix.is_empty() {
                        action.with_prefix(full_prefix.as_str());
                    }
                    if let Some(t) = &token {
                        action.with_continuation_token(t.as_str());
                    }
                    if let Some(n) = self.tuning.page_size {
                        action.with_max_keys(usize::from(n));
                    }
                    (Method::Get, action.sign(SIGNATURE_LIFETIME))
                },
                &[],
                None,
            )?;
            if a.status != 200 {
                return Err(self.status_error(&what, &a));
            }
            let text = String::from_utf8_lossy(&a.body);
            let page = ListObjectsV2::parse_response(&text)
                .map_err(|e| self.failure(&what, format!("unreadable listing: {e}")))?;
            for o in page.contents {
                let Some(key) = o.key.strip_prefix(&self.key_prefix) else {
                    return Err(self.failure(
                        &what,
                        format!("the server listed {:?}, outside the prefix", o.key),
                    ));
                };
                // Objects vmkeep never makes (another program's, under the same prefix)
                // are left out, as the folder store leaves them out.
                if check_key(key).is_err() || !key.starts_with(prefix) {
                    continue;
                }
                let Some(size) = o.size else {
                    return Err(self.failure(&what, format!("no size listed for {key}")));
                };
                out.push(ObjectInfo {
                    key: key.to_string(),
                    size,
                    modified: o.last_modified.as_deref().and_then(parse_time),
                });
            }
            match page.next_continuation_token {
                Some(next) if token.as_deref() == Some(next.as_str()) => {
                    return Err(self.failure(&what, "the server repeated a continuation token"));
                }
                Some(next) => token = Some(next),
                None => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let what = format!("delete {key}");
        let full = self.full_key(key)?;
        let a = self.exchange(
            &what,
            || {
                let action = self.bucket.delete_object(Some(&self.credentials), &full);
                (Method::Delete, action.sign(SIGNATURE_LIFETIME))
            },
            &[],
            None,
        )?;
        if self.missing(&what, &a)? || (200..300).contains(&a.status) {
            return Ok(());
        }
        Err(self.status_error(&what, &a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn targets_name_a_bucket_and_a_prefix() {
        let p = |t| parse_target(t).unwrap();
        assert_eq!(p("s3://backups"), ("backups".into(), "".into()));
        assert_eq!(p("s3://backups/"), ("backups".into(), "".into()));
        assert_eq!(
            p("s3://my.backups-1/host1/vms/"),
            ("my.backups-1".into(), "host1/vms".into())
        );
        for bad in [
            "backups",
            "s3:/backups",
            "s3://",
            "s3://ab",
            "s3://Backups",
            "s3://-backups",
            "s3://back_ups",
            "s3://backups//x",
            "s3://backups/a/../b",
            "s3://backups/./b",
            "s3://backups/a b",
            "s3://backups/a?b",
        ] {
            let e = parse_target(bad).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Usage, "{bad}");
            assert!(e.to_string().contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn explicit_values_win_over_the_environment() {
        let env = [
            ("AWS_ACCESS_KEY_ID", "ENVID"),
            ("AWS_SECRET_ACCESS_KEY", "envsecret"),
            ("AWS_SESSION_TOKEN", "envtoken"),
            ("AWS_REGION", "eu-west-3"),
            ("AWS_DEFAULT_REGION", "us-west-2"),
            ("AWS_ENDPOINT_URL", "http://generic:9000"),
            ("AWS_ENDPOINT_URL_S3", "http://s3only:9000"),
            ("AWS_CA_BUNDLE", "/etc/env-ca.pem"),
        ];
        let s = S3Settings::from_target_with("s3://b-1/p", &S3Overrides::default(), env_of(&env))
            .unwrap();
        assert_eq!(s.ca_file.as_deref(), Some(Path::new("/etc/env-ca.pem")));
        assert_eq!(s.endpoint, "http://s3only:9000");
        assert_eq!(s.region, "eu-west-3");
        assert_eq!(s.access_key_id, "ENVID");
        assert_eq!(s.secret_access_key, "envsecret");
        assert_eq!(s.session_token.as_deref(), Some("envtoken"));
        assert!(s.path_style);
        assert_eq!(s.target(), "s3://b-1/p");

        let explicit = S3Overrides {
            endpoint: Some("https://minio.example:9000".into()),
            region: Some("garage".into()),
            access_key_id: Some("GK1".into()),
            secret_access_key: Some("s1".into()),
            path_style: Some(false),
            ca_file: Some("/etc/vmkeep/s3-ca.pem".into()),
            ..S3Overrides::default()
        };
        let s = S3Settings::from_target_with("s3://b-1", &explicit, env_of(&env)).unwrap();
        assert_eq!(
            s.ca_file.as_deref(),
            Some(Path::new("/etc/vmkeep/s3-ca.pem"))
        );
        assert_eq!(s.endpoint, "https://minio.example:9000");
        assert_eq!(s.region, "garage");
        assert_eq!(
            (s.access_key_id.as_str(), s.secret_access_key.as_str()),
            ("GK1", "s1")
        );
        assert_eq!(
            s.session_token, None,
            "the environment's token is not GK1's"
        );
        assert!(!s.path_style);
    }

    #[test]
    fn without_an_endpoint_or_region_aws_is_meant() {
        let env = [
            ("AWS_ACCESS_KEY_ID", "ID"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
            ("AWS_DEFAULT_REGION", "us-west-2"),
        ];
        let s = S3Settings::from_target_with("s3://bkt", &S3Overrides::default(), env_of(&env))
            .unwrap();
        assert_eq!(s.region, "us-west-2");
        assert_eq!(s.endpoint, "https://s3.us-west-2.amazonaws.com");
        let s =
            S3Settings::from_target_with("s3://bkt", &S3Overrides::default(), env_of(&env[..2]))
                .unwrap();
        assert_eq!(s.region, DEFAULT_REGION);
    }

    #[test]
    fn missing_credentials_are_one_usage_error() {
        let e = S3Settings::from_target_with(
            "s3://bkt/x",
            &S3Overrides::default(),
            env_of(&[("AWS_ACCESS_KEY_ID", "ID"), ("AWS_SECRET_ACCESS_KEY", "")]),
        )
        .unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Usage);
        assert!(
            e.to_string().starts_with("s3://bkt/x: no S3 credentials"),
            "{e}"
        );
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let s = S3Settings::from_target_with(
            "s3://bkt",
            &S3Overrides::default(),
            env_of(&[
                ("AWS_ACCESS_KEY_ID", "ID"),
                ("AWS_SECRET_ACCESS_KEY", "topsecret"),
                ("AWS_SESSION_TOKEN", "tokentoken"),
            ]),
        )
        .unwrap();
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("topsecret") && !shown.contains("tokentoken"),
            "{shown}"
        );
        let store = S3Store::open(&s).unwrap();
        let shown = format!("{store:?}");
        assert!(!shown.contains("topsecret"), "{shown}");
        assert_eq!(
            store.describe(),
            "s3://bkt at https://s3.us-east-1.amazonaws.com"
        );
    }

    #[test]
    fn bad_endpoints_are_refused_when_the_store_opens() {
        let env = [("AWS_ACCESS_KEY_ID", "ID"), ("AWS_SECRET_ACCESS_KEY", "s")];
        for endpoint in [
            "localhost:3900",
            "ftp://host",
            "http://user:pw@host:3900",
            "http://host:3900/?x=1",
        ] {
            let explicit = S3Overrides {
                endpoint: Some(endpoint.into()),
                ..S3Overrides::default()
            };
            let s = S3Settings::from_target_with("s3://bkt", &explicit, env_of(&env)).unwrap();
            let e = S3Store::open(&s).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Usage, "{endpoint}");
            assert!(!e.to_string().contains("pw@"), "{e}");
        }
    }

    #[test]
    fn s3_error_documents_give_code_and_message() {
        let body = b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>AccessDenied</Code>\
            <Message>Forbidden: key &lt;GK1&gt;\n  is not allowed</Message><Resource>/b</Resource></Error>";
        assert_eq!(
            s3_error(body),
            Some((
                "AccessDenied".to_string(),
                "Forbidden: key <GK1> is not allowed".to_string()
            ))
        );
        assert_eq!(s3_error(b"<html>bad gateway</html>"), None);
        let a = Answer {
            status: 502,
            content_range: None,
            body: b"<html/>".to_vec(),
        };
        assert_eq!(a.explain(), "502 Bad Gateway");
    }

    #[test]
    fn content_ranges_and_md5_are_read_and_written_right() {
        let cr = |range, total| Some(ContentRange { range, total });
        assert_eq!(
            parse_content_range("bytes 2-4/10"),
            cr(Some((2, 4)), Some(10))
        );
        assert_eq!(parse_content_range("bytes */10"), cr(None, Some(10)));
        assert_eq!(parse_content_range("bytes 0-0/*"), cr(Some((0, 0)), None));
        assert_eq!(parse_content_range("items 0-1/2"), None);
        // RFC 1864's example digest of the empty string.
        assert_eq!(content_md5(b""), "1B2M2Y8AsgTpgAmY7PhCfg==");
        assert_eq!(
            parse_time("2024-05-01T12:00:00.000Z"),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_714_564_800))
        );
    }
}
