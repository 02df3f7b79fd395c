//! The image formats a restore can create a disk in (`restore --as-vm --format`).

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// The format of a disk image vmkeep creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageFormat {
    /// A qcow2 image (sparse, snapshots, bitmaps).
    #[default]
    Qcow2,
    /// A plain sparse raw image.
    Raw,
}

impl ImageFormat {
    /// The name qemu-img and libvirt use, which is also the file name suffix.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ImageFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<ImageFormat, Error> {
        match s {
            "qcow2" => Ok(ImageFormat::Qcow2),
            "raw" => Ok(ImageFormat::Raw),
            _ => Err(Error::usage(format!(
                "unknown image format {s:?} (qcow2 or raw)"
            ))),
        }
    }
}
