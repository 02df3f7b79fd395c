//! Turning a SOURCE string from the command line or config into a [`BlockSource`].
//!
//! A path to a block device is raw, always: a guest may write any header into its disk,
//! and probing a raw device for an image format would let it choose how vmkeep reads it.
//! A regular file is probed by its magic bytes (`?format=raw` turns probing off).
//!
//! A probed image with a backing file is refused (see [`open_source`]), and a qcow2
//! `PATH?bitmap=PREFIX` is only checked here: its bitmaps are handled under the VM lock
//! ([`super::tracked`]).

use std::path::{Path, PathBuf};

use super::file::FileSource;
use super::nbd::NbdSource;
use super::tracked::TrackedImage;
use super::{bitmap, qemu, BlockSource, SourceIdentity};
use crate::error::{Error, Result};

/// A parsed SOURCE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// A path, with its `?key=value` options.
    Path {
        /// The image file or block device, as given (before the `?` options).
        path: PathBuf,
        /// `?format=`: the image format (`raw`, `qcow2`, ...; never empty); `None` probes the
        /// file's first bytes.
        format: Option<String>,
        /// `?bitmap=`: the persistent qcow2 bitmap that tracks changes for incremental runs; never
        /// empty.
        bitmap: Option<String>,
    },
    /// An NBD URI (`nbd://`, `nbd+unix://`, `nbds://`, `nbds+unix://`).
    Nbd(String),
}

impl SourceSpec {
    /// Parse a SOURCE: an NBD URI, or a path with `?format=`/`?bitmap=` options.
    pub fn parse(s: &str) -> Result<SourceSpec> {
        if s.is_empty() {
            return Err(Error::usage("empty disk source"));
        }
        if crate::nbd::uri::is_nbd_uri(s) {
            return Ok(SourceSpec::Nbd(s.to_string()));
        }
        let (path, query) = match s.rsplit_once('?') {
            Some((p, q)) if q.contains('=') => (p, Some(q)),
            _ => (s, None),
        };
        let (mut format, mut bitmap) = (None, None);
        for kv in query.into_iter().flat_map(|q| q.split('&')) {
            match kv.split_once('=') {
                Some(("format", v)) if !v.is_empty() => format = Some(v.to_string()),
                Some(("bitmap", v)) if !v.is_empty() => bitmap = Some(v.to_string()),
                _ => {
                    return Err(Error::usage(format!(
                        "source {s:?}: unknown option {kv:?} (format=, bitmap=)"
                    )))
                }
            }
        }
        Ok(SourceSpec::Path {
            path: PathBuf::from(path),
            format,
            bitmap,
        })
    }
}

/// Image formats recognised by their first bytes; anything else is raw.
pub fn probe_format(path: &Path) -> Result<&'static str> {
    use std::io::Read;
    let mut head = [0u8; 512];
    let mut f = std::fs::File::open(path).map_err(|e| Error::source(path.display(), e))?;
    let n = f
        .read(&mut head)
        .map_err(|e| Error::source(path.display(), e))?;
    let h = &head[..n];
    let fmt = if h.starts_with(b"QFI\xfb") {
        "qcow2"
    } else if h.starts_with(b"KDMV")
        || h.starts_with(b"# Disk DescriptorFile")
        || h.starts_with(b"COWD")
    {
        "vmdk"
    } else if h.starts_with(b"vhdxfile") {
        "vhdx"
    } else if h.starts_with(b"conectix") {
        "vpc"
    } else if h.starts_with(b"QED\0") {
        "qed"
    } else if h.len() >= 0x44 && h[0x40..0x44] == [0x7f, 0x10, 0xda, 0xbe] {
        "vdi"
    } else if h.starts_with(b"LUKS\xba\xbe") {
        "luks"
    } else {
        "raw"
    };
    Ok(fmt)
}

/// Open a raw file or device. Other formats go through qemu-nbd (the `qemu` source).
pub fn open_raw(path: &Path) -> Result<Box<dyn BlockSource>> {
    Ok(Box::new(FileSource::open(path)?))
}

/// Is `path` a block device?
pub fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
}

/// The format of the file at `path`, honouring an explicit `format`.
pub fn format_of(path: &Path, format: Option<&str>) -> Result<String> {
    if !path.exists() {
        return Err(Error::source(path.display(), "no such file or device"));
    }
    Ok(match format {
        Some(f) => f.to_string(),
        None if is_block_device(path) => "raw".into(),
        None => probe_format(path)?.to_string(),
    })
}

/// A disk's SOURCE opened before the VM lock is taken, or one whose bitmap waits for it.
pub enum Opened {
    /// A source ready to read, and what it is (recorded with the generation).
    Ready(Box<dyn BlockSource>, SourceIdentity),
    /// A qcow2 `PATH?bitmap=PREFIX`, checked: open it under the lock with
    /// [`super::tracked::BitmapRun::open`].
    Tracked(TrackedImage),
}

/// Open one disk's SOURCE for a backup; a qcow2 `PATH?bitmap=PREFIX` is only checked here
/// (its bitmaps are handled under the lock).
pub fn open_disk_source(spec: &str) -> Result<Opened> {
    let SourceSpec::Path {
        path,
        format,
        bitmap: Some(prefix),
    } = SourceSpec::parse(spec)?
    else {
        let (source, identity) = open_source(spec)?;
        return Ok(Opened::Ready(source, identity));
    };
    let fmt = format_of(&path, format.as_deref())?;
    if fmt != "qcow2" {
        return Err(Error::usage(format!(
            "{}: ?bitmap= needs a qcow2 image (this is {fmt})",
            path.display()
        )));
    }
    if format.is_none() {
        refuse_probed_backing_file(&path, &fmt)?;
    }
    Ok(Opened::Tracked(TrackedImage { path, prefix }))
}

/// Open a SOURCE string: a raw file or device, an image for qemu-nbd, or an NBD URI; and
/// what the source is (recorded with the generation).
pub fn open_source(spec: &str) -> Result<(Box<dyn BlockSource>, SourceIdentity)> {
    match SourceSpec::parse(spec)? {
        SourceSpec::Path {
            path,
            format,
            bitmap: _,
        } => {
            let identity = SourceIdentity::of_path(&path);
            let fmt = format_of(&path, format.as_deref())?;
            if fmt == "raw" {
                return Ok((open_raw(&path)?, identity));
            }
            if format.is_none() {
                refuse_probed_backing_file(&path, &fmt)?;
            }
            Ok((qemu::open_image(&path, &fmt, None)?, identity))
        }
        SourceSpec::Nbd(uri) => Ok((
            Box::new(NbdSource::open(&uri, None)?),
            SourceIdentity::named(&uri),
        )),
    }
}

/// A probed image with a backing file is refused: a guest that can write a raw image file
/// could plant an image header naming any file of the host as its backing file, and
/// following it would copy that file into the backup. `?format=FMT` says the format is
/// known, and then the chain is followed.
fn refuse_probed_backing_file(path: &Path, fmt: &str) -> Result<()> {
    let info = bitmap::info(path, Some(fmt))?;
    if let Some(backing) = info.get("backing-filename").and_then(|b| b.as_str()) {
        return Err(Error::usage(format!(
            "{} looks like a {fmt} image with backing file {backing}; vmkeep follows backing files only when the format is given: use {}?format={fmt}",
            path.display(),
            path.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!(
            SourceSpec::parse("/a/b.qcow2?bitmap=vmkeep").unwrap(),
            SourceSpec::Path {
                path: "/a/b.qcow2".into(),
                format: None,
                bitmap: Some("vmkeep".into())
            }
        );
        assert_eq!(
            SourceSpec::parse("nbd+unix:///vda?socket=/s").unwrap(),
            SourceSpec::Nbd("nbd+unix:///vda?socket=/s".into())
        );
        assert_eq!(
            SourceSpec::parse("/weird?name").unwrap(),
            SourceSpec::Path {
                path: "/weird?name".into(),
                format: None,
                bitmap: None
            }
        );
        assert!(SourceSpec::parse("/a?colour=red").is_err());
        for tls in [
            "nbds://h:1/vda?tls-certificates=/d",
            "nbds+unix:///vda?socket=/s&tls-certificates=/d",
        ] {
            assert_eq!(SourceSpec::parse(tls).unwrap(), SourceSpec::Nbd(tls.into()));
        }
        // An empty format is a mistake, not "probe".
        let e = SourceSpec::parse("/a.img?format=").unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Usage);
        assert!(e.to_string().contains("format="), "{e}");
        assert!(SourceSpec::parse("").is_err());
    }
}
