//! `serve`: one generation of a VM as read-only NBD exports, one per disk.
//!
//! Nothing is materialised: every read is assembled on the fly from the newest image and
//! the reverse diffs through [`DiskView`], and every block is checked against its digest
//! before a byte of it is sent. A block that fails its digest fails the request with
//! `EIO`; the client never sees wrong bytes. Blocks whose digest is the zero digest are
//! zeros by definition, so they are answered without reading and reported as holes.
//!
//! While it serves, the generation is pinned ([`crate::archive::pin`]) so that `prune`
//! leaves it alone. A backup of the same VM may run meanwhile: it updates the newest image
//! in place, and the view finds the overwritten blocks in that backup's undo journal.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::archive::digest::ZERO_DIGEST;
use crate::archive::format::DIGEST_LEN;
use crate::archive::pin::Pin;
use crate::archive::view::{DiskView, Loc, Segment};
use crate::archive::{GenerationId, Repository};
use crate::error::{Error, Result};
use crate::nbd::proto::{STATE_HOLE, STATE_ZERO};
use crate::nbd::server::{resolve_listen, Export, Extent, Listen, Server, ServerConfig};
use crate::tls::TlsFiles;

/// Image blocks are read and verified in runs of at most this many bytes.
const RUN_BYTES: u64 = 4 << 20;
/// One block-status answer looks at no more blocks than this (clients ask for the rest).
const STATUS_BLOCKS: u64 = 1 << 16;
/// ... and reads no more reverse-diff records than this (each is a read of the file).
const STATUS_RECORDS: usize = 1024;

/// A generation opened for serving: its exports, and the pin that keeps it.
pub struct ServedGeneration {
    /// The VM served.
    pub vm: String,
    /// The generation served (pinned for as long as this value lives).
    pub generation: GenerationId,
    /// One export per disk of the generation, in the profile's order, each named after its disk.
    pub exports: Vec<Arc<ArchiveExport>>,
    pin: Pin,
}

impl ServedGeneration {
    /// The pin that keeps prune from dropping the generation while it is served.
    pub fn pin(&self) -> &Pin {
        &self.pin
    }

    /// The exports, as the NBD server takes them.
    pub fn nbd_exports(&self) -> Vec<Arc<dyn Export>> {
        self.exports
            .iter()
            .map(|e| e.clone() as Arc<dyn Export>)
            .collect()
    }
}

/// Pin generation `rev` of `vm` and open every disk of it.
pub fn open_generation(repo: &Repository, vm: &str, rev: &str) -> Result<ServedGeneration> {
    let archive = repo.vm(vm)?;
    let id = archive.resolve(rev)?;
    // Pin first, then open: once pinned, prune no longer drops it under us.
    let pin = Pin::acquire(&archive.dir, &id, "serve")?;
    let chosen = archive.select_pinned(&pin)?;
    let exports = chosen
        .disk_names()
        .into_iter()
        .map(|d| Ok(Arc::new(ArchiveExport::new(vm, chosen.view(d)?))))
        .collect::<Result<Vec<_>>>()?;
    Ok(ServedGeneration {
        vm: vm.to_string(),
        generation: id,
        exports,
        pin,
    })
}

/// Everything `vmkeep serve` needs, resolved from flags and config.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// The VM.
    pub vm: String,
    /// The generation: an id or unique prefix, N (0 = newest), or `latest`.
    pub rev: String,
    /// Listen on a unix socket at this path ...
    pub socket: Option<PathBuf>,
    /// ... or on TCP at `HOST[:PORT]` (one of the two).
    pub listen: Option<String>,
    /// Allow TCP addresses beyond loopback.
    pub allow_remote: bool,
    /// The TLS files named (flags before config); see [`TlsPaths::files`].
    pub tls: TlsPaths,
    /// Serve plain TCP without TLS.
    pub insecure_tcp: bool,
    /// Close a connection after this long without a request (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Make the socket 0660 with this group (name or id).
    pub socket_group: Option<String>,
}

/// The TLS files a server may be given: a credentials folder and single files, each
/// optional (single files override the folder's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsPaths {
    /// A folder with `ca-cert.pem`, `server-cert.pem` and `server-key.pem`.
    pub dir: Option<PathBuf>,
    /// The server's certificate chain.
    pub cert: Option<PathBuf>,
    /// The server's private key.
    pub key: Option<PathBuf>,
    /// The CA client certificates must chain to.
    pub ca: Option<PathBuf>,
}

impl TlsPaths {
    /// Each path from `self`, else from `fallback` (flags, then the config's `[serve]`).
    pub fn or(self, fallback: TlsPaths) -> TlsPaths {
        TlsPaths {
            dir: self.dir.or(fallback.dir),
            cert: self.cert.or(fallback.cert),
            key: self.key.or(fallback.key),
            ca: self.ca.or(fallback.ca),
        }
    }

    /// The server's files: `None` when no path is named; single files override the
    /// folder's; a file neither names is an error.
    pub fn files(&self) -> Result<Option<TlsFiles>> {
        if self.dir.is_none() && self.cert.is_none() && self.key.is_none() && self.ca.is_none() {
            return Ok(None);
        }
        let from_dir = self.dir.as_deref().map(TlsFiles::server_dir);
        let pick = |flag: &Option<PathBuf>, what: &str, f: fn(&TlsFiles) -> &Path| {
            flag.clone()
                .or_else(|| from_dir.as_ref().map(|d| f(d).to_path_buf()))
                .ok_or_else(|| {
                    Error::usage(format!(
                        "TLS: no {what}: give --{what} FILE or --tls-dir DIR"
                    ))
                })
        };
        Ok(Some(TlsFiles {
            cert: pick(&self.cert, "tls-cert", |d| &d.cert)?,
            key: pick(&self.key, "tls-key", |d| &d.key)?,
            ca: pick(&self.ca, "tls-ca", |d| &d.ca)?,
        }))
    }
}

const NEEDS_TLS: &str = "--listen needs TLS: give --tls-dir DIR (ca-cert.pem, server-cert.pem, \
     server-key.pem) or --tls-cert/--tls-key/--tls-ca, or [serve] tls_dir in the config; \
     loopback is no boundary between local users (--insecure-tcp serves without TLS anyway)";

/// `vmkeep serve`: export generation `opts.rev` of `opts.vm` in the repository at
/// `repo_root`, read-only, until the server's shutdown handle is used. `on_listening` is
/// called once the server listens (to announce it and to hand the shutdown handle to
/// whatever stops it); the pin on the generation is released when this returns.
///
/// The endpoint and TLS are checked before the repository is opened.
pub fn serve(
    repo_root: &Path,
    opts: &ServeOptions,
    on_listening: &mut dyn FnMut(&ServedGeneration, &Server) -> Result<()>,
) -> Result<()> {
    raise_fd_limit();
    let listen = endpoint(opts)?;
    let files = if opts.insecure_tcp {
        None
    } else {
        opts.tls.files()?
    };
    let tls = match (&listen, files) {
        (Listen::Tcp(_), Some(files)) => Some(crate::tls::server_config(&files)?),
        (Listen::Tcp(_), None) if opts.insecure_tcp => {
            tracing::warn!(
                "serving plain TCP (--insecure-tcp): every local user can read the served disks"
            );
            None
        }
        (Listen::Tcp(_), None) => return Err(Error::usage(NEEDS_TLS)),
        (Listen::Unix(_), _) => None,
    };
    let repo = Repository::open(repo_root)?;
    let served = open_generation(&repo, &opts.vm, &opts.rev)?;
    let exports = served.nbd_exports();
    let config = ServerConfig {
        idle_timeout: opts.idle_timeout,
        socket_group: opts.socket_group.as_deref().map(group_id).transpose()?,
        tls,
        ..ServerConfig::default()
    };
    let server = Server::bind(&listen, exports, config)?;
    on_listening(&served, &server)?;
    server.run()?;
    drop(served); // releases the pin
    Ok(())
}

/// Where to listen. Addresses beyond loopback need `--allow-remote`, which needs TLS.
fn endpoint(opts: &ServeOptions) -> Result<Listen> {
    Ok(match (&opts.socket, &opts.listen) {
        (Some(path), None) => Listen::Unix(path.clone()),
        (None, Some(addr)) => resolve_listen(addr, opts.allow_remote)?,
        _ => return Err(Error::usage("give one of --socket PATH or --listen ADDR")),
    })
}

/// Each connection holds three descriptors; a 1024 soft limit would cap the server well
/// below its own connection limit, so take what the hard limit allows (up to 64Ki).
pub fn raise_fd_limit() {
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

/// A group given by name or number.
pub fn group_id(group: &str) -> Result<u32> {
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

/// One disk of one generation, as an NBD export named after the disk.
pub struct ArchiveExport {
    view: DiskView,
    /// The view's segments, computed once: every request looks its blocks up here.
    segments: Vec<Segment>,
    description: String,
    /// Bytes up to which a sequential reader's data has been prefetched.
    frontier: AtomicU64,
}

/// How far ahead of a sequential reader its data is prefetched.
const READ_AHEAD: u64 = 16 << 20;

impl ArchiveExport {
    /// An export of `view` named after its disk, described to NBD clients as
    /// `vmkeep: VM <vm>, generation <id>, disk <disk>`. Turns off the kernel's readahead on the
    /// image: the export prefetches what a sequential reader will need itself.
    pub fn new(vm: &str, view: DiskView) -> ArchiveExport {
        let description = format!(
            "vmkeep: VM {vm}, generation {}, disk {}",
            view.generation, view.disk
        );
        // Readahead is ours (see `read_ahead`): the kernel's would read the image's
        // holes too, and knows nothing of the reverse diffs.
        view.planned_reads();
        ArchiveExport {
            segments: view.segments(),
            view,
            description,
            frontier: AtomicU64::new(0),
        }
    }

    fn bs(&self) -> u64 {
        self.view.block_size as u64
    }

    /// The segments that overlap blocks `[first, last)`, clipped to them.
    fn segments_in(&self, first: u64, last: u64) -> impl Iterator<Item = Segment> + '_ {
        let i = self.segments.partition_point(|s| s.end <= first);
        self.segments[i..]
            .iter()
            .take_while(move |s| s.start < last)
            .map(move |s| Segment {
                start: s.start.max(first),
                end: s.end.min(last),
                loc: s.loc,
            })
    }

    fn damaged(&self, b: u64) -> Error {
        let from = b * self.bs();
        let to = (from + self.bs()).min(self.view.size);
        Error::corrupt(
            format!("{}/{}", self.view.generation, self.view.disk),
            format!("bytes {from}..{to} fail their digest"),
        )
    }

    /// The digests of image blocks `[s, e)`.
    fn image_digests(&self, s: u64, e: u64) -> Result<Vec<[u8; DIGEST_LEN]>> {
        let mut raw = vec![0u8; ((e - s) as usize) * DIGEST_LEN];
        self.view.image_digests(s, &mut raw)?;
        Ok(raw
            .chunks_exact(DIGEST_LEN)
            .map(|d| d.try_into().expect("32 bytes"))
            .collect())
    }

    /// Runs `[start, end)` of image blocks `[s, e)` that are all zero or all not, at most
    /// [`RUN_BYTES`] long.
    fn image_runs(&self, s: u64, e: u64) -> Result<Vec<(u64, u64, bool)>> {
        let digests = self.image_digests(s, e)?;
        let max = (RUN_BYTES / self.bs()).max(1);
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        for (i, d) in digests.iter().enumerate() {
            let b = s + i as u64;
            let zero = *d == ZERO_DIGEST;
            match out.last_mut() {
                Some(r) if r.2 == zero && r.1 - r.0 < max => r.1 = b + 1,
                _ => out.push((b, b + 1, zero)),
            }
        }
        Ok(out)
    }

    /// Image blocks `[s, e)` into the request buffer `buf` (disk bytes from `offset`):
    /// the digests are read once, zero blocks are not read, and when the blocks lie
    /// wholly inside the request (any block-aligned read) they are read and verified in
    /// place, with no buffer of their own and no copy.
    fn read_image(&self, s: u64, e: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut digests = vec![0u8; ((e - s) as usize) * DIGEST_LEN];
        self.view.image_digests(s, &mut digests)?;
        let from = s * self.bs();
        let to = (e * self.bs()).min(self.view.size);
        let end = offset + buf.len() as u64;
        let bad = if from >= offset && to <= end {
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            self.view.read_image_verified(s, e, &digests, dst)?
        } else {
            let mut tmp = vec![0u8; (to - from) as usize];
            let bad = self.view.read_image_verified(s, e, &digests, &mut tmp)?;
            place(from, &tmp, offset, buf);
            bad
        };
        match bad.first() {
            Some(&x) => Err(self.damaged(x)),
            None => Ok(()),
        }
    }

    fn read_record(&self, b: u64, chain: u32, rec: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let blk = self.view.read_record(chain, rec)?;
        if !blk.ok {
            return Err(self.damaged(b));
        }
        place(b * self.bs(), &blk.data, offset, buf);
        Ok(())
    }

    /// A read at `[offset, end)` near the prefetch frontier continues a sequential
    /// stream (several clients' requests interleave, so "near" is a window, not the exact
    /// end of the last read): start reading the data of the next [`READ_AHEAD`] bytes,
    /// image blocks with a non-zero digest and reverse-diff records, so that their reads
    /// are in flight before the requests for them come. Random reads prefetch nothing.
    fn read_ahead(&self, offset: u64, end: u64) {
        let f = self.frontier.load(Ordering::Relaxed);
        if offset > f.saturating_add(READ_AHEAD) || end + READ_AHEAD / 2 <= f {
            return;
        }
        let from = f.max(end);
        let to = (end + READ_AHEAD).min(self.view.size);
        if from >= to
            || self
                .frontier
                .compare_exchange(f, to, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return; // nothing left, or another worker moved the frontier just now
        }
        let (first, last) = (from / self.bs(), (to - 1) / self.bs() + 1);
        for seg in self.segments_in(first, last) {
            match seg.loc {
                Loc::Zero => {}
                Loc::Record { chain, rec } => self.view.prefetch_record(chain, rec),
                Loc::Image => {
                    let Ok(runs) = self.image_runs(seg.start, seg.end) else {
                        return;
                    };
                    for (a, b, zero) in runs {
                        if !zero {
                            self.view.prefetch_image(a, b);
                        }
                    }
                }
            }
        }
    }

    /// Whether each block of a segment is zero, as runs `(start, end, zero)`.
    fn zero_runs(&self, seg: Segment) -> Result<Vec<(u64, u64, bool)>> {
        Ok(match seg.loc {
            Loc::Zero => vec![(seg.start, seg.end, true)],
            Loc::Record { chain, rec } => {
                let r = self.view.chain()[chain as usize].read(rec as usize)?;
                vec![(seg.start, seg.end, r.digest == ZERO_DIGEST)]
            }
            Loc::Image => self.image_runs(seg.start, seg.end)?,
        })
    }
}

impl Export for ArchiveExport {
    fn name(&self) -> &str {
        &self.view.disk
    }

    fn description(&self) -> String {
        self.description.clone()
    }

    fn size(&self) -> u64 {
        self.view.size
    }

    fn preferred_block_size(&self) -> u32 {
        self.view.block_size
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        self.read_ahead(offset, end);
        let (first, last) = (offset / self.bs(), (end - 1) / self.bs() + 1);
        for seg in self.segments_in(first, last) {
            match seg.loc {
                Loc::Zero => fill_zero(seg.start * self.bs(), seg.end * self.bs(), offset, buf),
                Loc::Record { chain, rec } => {
                    self.read_record(seg.start, chain, rec, offset, buf)?
                }
                Loc::Image => self.read_image(seg.start, seg.end, offset, buf)?,
            }
        }
        Ok(())
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = (offset + len).min(self.view.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let first = offset / self.bs();
        let last = ((end - 1) / self.bs() + 1).min(first + STATUS_BLOCKS);
        let mut out: Vec<Extent> = Vec::new();
        let mut records = 0;
        for seg in self.segments_in(first, last) {
            if matches!(seg.loc, Loc::Record { .. }) {
                if records == STATUS_RECORDS && !out.is_empty() {
                    break;
                }
                records += 1;
            }
            for (a, b, zero) in self.zero_runs(seg)? {
                let from = (a * self.bs()).max(offset);
                let to = (b * self.bs()).min(end);
                let flags = if zero { STATE_HOLE | STATE_ZERO } else { 0 };
                match out.last_mut() {
                    Some(x) if x.flags == flags => x.len += to - from,
                    _ => out.push(Extent {
                        len: to - from,
                        flags,
                    }),
                }
            }
        }
        Ok(out)
    }
}

/// Copy the part of `src` (disk bytes from `src_off`) that overlaps `dst` (disk bytes
/// from `dst_off`).
fn place(src_off: u64, src: &[u8], dst_off: u64, dst: &mut [u8]) {
    let from = src_off.max(dst_off);
    let to = (src_off + src.len() as u64).min(dst_off + dst.len() as u64);
    if from < to {
        let (s, d, n) = (
            (from - src_off) as usize,
            (from - dst_off) as usize,
            (to - from) as usize,
        );
        dst[d..d + n].copy_from_slice(&src[s..s + n]);
    }
}

/// Zero the part of `dst` (disk bytes from `dst_off`) within disk bytes `[from, to)`.
fn fill_zero(from: u64, to: u64, dst_off: u64, dst: &mut [u8]) {
    let from = from.max(dst_off);
    let to = to.min(dst_off + dst.len() as u64);
    if from < to {
        dst[(from - dst_off) as usize..(to - dst_off) as usize].fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::pin::pinned_generations;
    use crate::engine::backup::{BackupOptions, BackupRun, DiskInput};
    use crate::progress::NoProgress;
    use crate::source::file::FileSource;

    const BS: usize = 64 << 10;

    fn noise(seed: u8, len: usize) -> Vec<u8> {
        let mut x = (seed as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn backup(repo: &Repository, img: &std::path::Path, data: &[u8]) {
        std::fs::write(img, data).unwrap();
        let run = BackupRun::begin(repo, "vm").unwrap();
        let disk = DiskInput::new("vda", Box::new(FileSource::open(img).unwrap()));
        run.execute(vec![disk], &BackupOptions::default(), &NoProgress)
            .unwrap();
    }

    #[test]
    fn an_older_generation_reads_reports_holes_and_catches_damage() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(&dir.path().join("repo")).unwrap();
        let img = dir.path().join("vda.raw");
        let mut old = vec![0u8; 8 * BS];
        old[BS..3 * BS].copy_from_slice(&noise(1, 2 * BS));
        backup(&repo, &img, &old);
        let mut new = noise(2, 10 * BS);
        new[5 * BS..6 * BS].fill(0);
        backup(&repo, &img, &new);

        let served = open_generation(&repo, "vm", "1").unwrap();
        let vm_dir = repo.vm_dir("vm").unwrap();
        assert_eq!(
            pinned_generations(&vm_dir).unwrap(),
            vec![served.generation.clone()]
        );
        let e = &served.exports[0];
        assert_eq!((e.name(), e.size()), ("vda", old.len() as u64));
        let mut buf = vec![0u8; old.len() - 1000];
        e.read(500, &mut buf).unwrap();
        assert!(buf == old[500..old.len() - 500]);
        let flags: Vec<(u64, u32)> = e
            .extents(0, old.len() as u64)
            .unwrap()
            .iter()
            .map(|x| (x.len, x.flags))
            .collect();
        let hole = STATE_HOLE | STATE_ZERO;
        let bs = BS as u64;
        assert_eq!(flags, vec![(bs, hole), (2 * bs, 0), (5 * bs, hole)]);

        // Damage the stored copy of block 2 in the reverse diff.
        let rdiff = vm_dir.join(&served.generation).join("vda.rdiff");
        let mut bytes = std::fs::read(&rdiff).unwrap();
        let needle = &old[2 * BS + 100..2 * BS + 164];
        let at = bytes
            .windows(64)
            .position(|w| w == needle)
            .expect("stored raw");
        bytes[at] ^= 1;
        std::fs::write(&rdiff, &bytes).unwrap();
        drop(served);
        let served = open_generation(&repo, "vm", "1").unwrap();
        let e = &served.exports[0];
        let err = e.read(2 * bs + 10, &mut [0u8; 100]).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Corrupt, "{err}");
        let mut ok = vec![0u8; BS];
        e.read(bs, &mut ok).unwrap();
        assert!(ok == old[BS..2 * BS]);
        drop(served);
        assert!(pinned_generations(&vm_dir).unwrap().is_empty());
    }

    #[test]
    fn a_rev_selects_one_generation_for_every_view() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(&dir.path().join("repo")).unwrap();
        let img = dir.path().join("vda.raw");
        backup(&repo, &img, &noise(1, 3 * BS));
        backup(&repo, &img, &noise(2, 4 * BS));
        let archive = repo.vm("vm").unwrap();
        let older = archive.select("1").unwrap();
        assert_eq!(older.generation().id, archive.generation_ids().unwrap()[0]);
        assert_eq!(older.view("vda").unwrap().size, 3 * BS as u64);
        let newest = archive.view("latest", "vda").unwrap();
        assert_eq!(newest.size, 4 * BS as u64);
        assert!(archive.view("2", "vda").is_err());
        assert!(archive.view("0", "vdb").is_err());
    }

    #[test]
    fn place_copies_only_the_overlap() {
        let mut dst = [9u8; 8];
        place(4, &[1, 2, 3, 4, 5, 6], 6, &mut dst); // src 4..10, dst 6..14
        assert_eq!(dst, [3, 4, 5, 6, 9, 9, 9, 9]);
        place(0, &[7; 4], 6, &mut dst); // no overlap
        assert_eq!(dst[0], 3);
        fill_zero(8, 100, 6, &mut dst);
        assert_eq!(dst, [3, 4, 0, 0, 0, 0, 0, 0]);
    }
}
