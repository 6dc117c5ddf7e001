//! Package updates of an image, checked on the host without a VM: do the repositories the
//! image's apt uses offer newer versions of its installed packages now? Reads what a build
//! recorded in the manifest (the installed packages, the sources files and the key files of
//! the image), fetches the repositories' indices (after the store's mirrors), verifies their
//! signatures with only the keys the image trusts for each (`gpgv`), and compares versions by
//! the distribution's own rules. Never answers "no updates" for a repository it could not
//! read or verify: that is a [`CheckError`] naming it.
//!
//! Decides nothing about building (the pipeline does) and writes nothing but temporary files.

pub mod apt;
mod check;
pub mod deb822;
pub mod fetch;
pub mod gpg;
pub mod image;
pub mod version;

pub use check::{
    CheckError, CheckOptions, Outdated, RepositoryChecked, RepositoryFailure, Update, check,
};
