//! Turning a SOURCE string from the command line or config into a [`BlockSource`].
//!
//! A path to a block device is raw, always: a guest may write any header into its disk,
//! and probing a raw device for an image format would let it choose how vmkeep reads it.
//! A regular file is probed by its magic bytes (`?format=raw` turns probing off).

use std::path::{Path, PathBuf};

use super::file::FileSource;
use super::BlockSource;
use crate::error::{Error, Result};

/// A parsed SOURCE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// A path, with its `?key=value` options.
    Path {
        path: PathBuf,
        format: Option<String>,
        bitmap: Option<String>,
    },
    /// An NBD URI.
    Nbd(String),
}

impl SourceSpec {
    pub fn parse(s: &str) -> Result<SourceSpec> {
        if s.is_empty() {
            return Err(Error::usage("empty disk source"));
        }
        if s.starts_with("nbd://") || s.starts_with("nbd+unix://") || s.starts_with("nbds://") {
            return Ok(SourceSpec::Nbd(s.to_string()));
        }
        let (path, query) = match s.rsplit_once('?') {
            Some((p, q)) if q.contains('=') => (p, Some(q)),
            _ => (s, None),
        };
        let (mut format, mut bitmap) = (None, None);
        for kv in query.into_iter().flat_map(|q| q.split('&')) {
            match kv.split_once('=') {
                Some(("format", v)) => format = Some(v.to_string()),
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
        assert!(SourceSpec::parse("").is_err());
    }
}
