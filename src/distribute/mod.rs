//! Distribution: a finished image goes where people use it (Image Builder's last stage).
//!
//! Each target takes a stored build ([`StoredImage`]: its folder, manifest, outputs) and
//! returns a [`Receipt`] (a store record) saying where the image went, with digests and ids; the store records
//! every receipt next to the build (`receipts.json`) and `builder images show` prints them.
//!
//! - [`oci`]: push to an OCI registry as an artifact or a KubeVirt containerDisk; pull a
//!   pushed disk back as a parent image (`parentImage: oci://…`); push and pull container
//!   images between registries and OCI image layouts.
//! - [`aws`]: S3 multipart upload, then EC2 ImportSnapshot + RegisterImage (AMI).
//! - [`directory`]: a directory, a Vagrant box (libvirt provider), the local store itself.
//! - [`archive`]: a container image as an `oci-archive` or `docker-archive` file.
//! - [`destination`]: the destinations as the user names them (`--to oci://…`, recipe `distribution:`)
//!   and the dispatcher that sends to one.

pub mod archive;
pub mod aws;
pub mod destination;
pub mod directory;
pub mod oci;

pub use crate::store::{Receipt, StoredImage};

/// What the numbers of a transfer count: bytes moved, or the percent of a conversion (whose
/// total is 100). Build events and every progress printer read it; nothing guesses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Unit {
    Bytes,
    Percent,
}

impl Unit {
    /// For `skip_serializing_if`: bytes are what a transfer event means without a unit.
    pub fn is_bytes(&self) -> bool {
        *self == Unit::Bytes
    }
}

/// Progress of a distribution, for the terminal and `--json` events. Every method has an
/// empty default; implementations must be cheap (they are called per chunk).
pub trait Progress: Send + Sync {
    /// A new step of the target starts (`uploading disk`, `waiting for import-snap-…: 45%
    /// converting`, …).
    fn step(&self, _target: &str, _message: &str) {}
    /// Bytes moved so far of `total` for the thing named `what` (a file or blob).
    fn transfer(&self, _target: &str, _what: &str, _done: u64, _total: Option<u64>) {}
    /// A conversion of the thing named `what` (a disk format) is `percent` done.
    fn converting(&self, _target: &str, _what: &str, _percent: u64) {}
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {}

/// Any target's failure.
#[derive(Debug, thiserror::Error)]
pub enum DistributeError {
    #[error(transparent)]
    Oci(#[from] oci::OciError),
    #[error(transparent)]
    Aws(#[from] aws::AwsError),
    #[error(transparent)]
    Directory(#[from] directory::DirectoryError),
    #[error(transparent)]
    Destination(#[from] destination::DestinationError),
    #[error(transparent)]
    Archive(#[from] archive::ArchiveError),
}
