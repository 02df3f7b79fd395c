//! `print FILE`: a human-readable dump of any archive file, for people and golden tests.

use std::io::Write;
use std::path::Path;

use crate::archive::digest::{hex, DigestReader, ZERO_DIGEST};
use crate::archive::format::{DIGEST_MAGIC, RDIFF_MAGIC};
use crate::archive::profile;
use crate::archive::rdiff::{
    self, RdiffHeader, RdiffReader, Record, REC_DAMAGED, REC_ZERO, REC_ZSTD,
};
use crate::error::{Error, Result};

/// Write a description of `path` to `out`.
pub fn print_file(path: &Path, out: &mut dyn Write) -> Result<()> {
    let mut head = [0u8; 8];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let n = f.read(&mut head).map_err(|e| Error::io(path, e))?;
        if n < 8 {
            head[n..].fill(0);
        }
    }
    let w = |e: std::io::Error| Error::io("stdout", e);
    if head == DIGEST_MAGIC {
        print_digest(path, out).map_err(|e| lift(e, w))
    } else if head == RDIFF_MAGIC {
        print_rdiff(path, out).map_err(|e| lift(e, w))
    } else if head.starts_with(b"# ") {
        print_profile(path, out).map_err(|e| lift(e, w))
    } else {
        Err(Error::usage(format!(
            "{}: not a vmkeep archive file",
            path.display()
        )))
    }
}

enum PErr {
    Io(std::io::Error),
    Lib(Error),
}
impl From<std::io::Error> for PErr {
    fn from(e: std::io::Error) -> Self {
        PErr::Io(e)
    }
}
impl From<Error> for PErr {
    fn from(e: Error) -> Self {
        PErr::Lib(e)
    }
}
fn lift(e: PErr, w: impl Fn(std::io::Error) -> Error) -> Error {
    match e {
        PErr::Io(e) => w(e),
        PErr::Lib(e) => e,
    }
}

fn print_digest(path: &Path, out: &mut dyn Write) -> Result<(), PErr> {
    let mut r = DigestReader::open(path)?;
    let h = r.header.clone();
    writeln!(out, "file: digest (format 1)")?;
    writeln!(
        out,
        "generation: {}",
        uuid::Uuid::from_bytes(h.generation).hyphenated()
    )?;
    writeln!(out, "block size: {}", h.block_size)?;
    writeln!(out, "disk size: {}", h.disk_size)?;
    writeln!(out, "blocks: {}", r.blocks())?;
    writeln!(out, "digest root: {}", r.root()?)?;
    let mut zeros = 0u64;
    for b in 0..r.blocks() {
        let d = r.get(b)?;
        if d == ZERO_DIGEST {
            zeros += 1;
        } else {
            writeln!(out, "block {b}: {}", hex(&d))?;
        }
    }
    writeln!(out, "zero blocks: {zeros}")?;
    Ok(())
}

fn header_lines(h: &RdiffHeader, out: &mut dyn Write) -> Result<(), PErr> {
    writeln!(
        out,
        "generation: {}",
        uuid::Uuid::from_bytes(h.generation).hyphenated()
    )?;
    writeln!(out, "flags: {}", if h.is_base() { "base" } else { "-" })?;
    writeln!(out, "block size: {}", h.block_size)?;
    writeln!(
        out,
        "compression: {}",
        if h.compression == 1 { "zstd" } else { "none" }
    )?;
    writeln!(out, "disk size: {}", h.disk_size)?;
    writeln!(out, "next size: {}", h.next_size)?;
    Ok(())
}

fn record_line(r: &Record, out: &mut dyn Write) -> Result<(), PErr> {
    let mut flags = Vec::new();
    if r.flags & REC_ZERO != 0 {
        flags.push("zero");
    }
    if r.flags & REC_ZSTD != 0 {
        flags.push("zstd");
    }
    if r.flags & REC_DAMAGED != 0 {
        flags.push("damaged");
    }
    let flags = if flags.is_empty() {
        "raw".to_string()
    } else {
        flags.join(",")
    };
    writeln!(
        out,
        "block {}: {flags} stored {} of {} digest {}",
        r.block,
        r.body.len(),
        r.raw_len,
        hex(&r.digest)
    )?;
    Ok(())
}

fn print_rdiff(path: &Path, out: &mut dyn Write) -> Result<(), PErr> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if name.ends_with(".partial") {
        let Some(p) = rdiff::scan_partial(path)? else {
            writeln!(
                out,
                "file: reverse diff, partial, with no complete header (nothing to undo)"
            )?;
            return Ok(());
        };
        writeln!(
            out,
            "file: reverse diff, partial (an undo journal; format 1)"
        )?;
        header_lines(&p.header, out)?;
        writeln!(out, "valid records: {}", p.records.len())?;
        for r in &p.records {
            record_line(r, out)?;
        }
        return Ok(());
    }
    let r = RdiffReader::open(path)?;
    writeln!(out, "file: reverse diff (format 1)")?;
    header_lines(&r.header, out)?;
    let hash_ok = r.verify_file_hash().is_ok();
    writeln!(out, "records: {}", r.len())?;
    writeln!(out, "data bytes: {}", r.data_bytes)?;
    writeln!(
        out,
        "file checksum: {}",
        if hash_ok { "ok" } else { "MISMATCH" }
    )?;
    for i in 0..r.len() {
        record_line(&r.read(i)?, out)?;
    }
    Ok(())
}

fn print_profile(path: &Path, out: &mut dyn Write) -> Result<(), PErr> {
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    if len > profile::MAX_PROFILE_LEN {
        return Err(Error::corrupt(path, "file is too large for a profile").into());
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let kind = text.lines().next().unwrap_or("").trim_start_matches("# ");
    let kind = kind.split(" (").next().unwrap_or(kind);
    // Verify the checksum by parsing as the kind the title names.
    let verdict = match kind {
        "vmkeep repository" => profile::parse::<profile::RepoProfile>(path, &text).map(|_| ()),
        "vmkeep VM profile" => profile::parse::<profile::VmProfile>(path, &text).map(|_| ()),
        "vmkeep generation profile" => {
            profile::parse::<profile::GenerationProfile>(path, &text).map(|_| ())
        }
        "vmkeep transaction" => profile::parse::<crate::archive::txn::Txn>(path, &text).map(|_| ()),
        #[cfg(feature = "libvirt")]
        "vmkeep inventory" => {
            profile::parse::<crate::engine::inventory::Inventory>(path, &text).map(|_| ())
        }
        _ => Err(Error::usage(format!(
            "{}: unknown profile kind {kind:?}",
            path.display()
        ))),
    };
    writeln!(out, "file: {kind} (format 1)")?;
    writeln!(
        out,
        "checksum: {}",
        match &verdict {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("BAD ({e})"),
        }
    )?;
    for line in text.lines().skip(1) {
        if !line.starts_with("checksum = ") {
            writeln!(out, "  {line}")?;
        }
    }
    Ok(())
}
