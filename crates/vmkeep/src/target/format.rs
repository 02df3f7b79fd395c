//! The image formats a restore can create a disk in (`restore --as-vm --format`).

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
