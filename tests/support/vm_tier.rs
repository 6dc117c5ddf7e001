//! The VM test tier's gate, shared by every test that boots the fixture images.
//!
//! A VM test that cannot run must show as *ignored* in cargo's counts, never as passed. So the
//! tier is decided when the tests are compiled: `build.rs` sets `--cfg vm_tier` when
//! `BUILDER_VM_TESTS=1` (and rebuilds when that variable changes), and every VM test carries
//!
//! ```text
//! #[test]
//! #[cfg_attr(
//!     not(vm_tier),
//!     ignore = "VM tier: set BUILDER_VM_TESTS=1 and BUILDER_TEST_IMAGE (scripts/test does)"
//! )]
//! fn my_vm_test() {
//!     let image = vm_tier::test_image();
//!     …
//! }
//! ```
//!
//! (the same attribute on `#[tokio::test]`s). Without the variable `cargo test` lists them as
//! `ignored, VM tier: …`; with it they run, and [`test_image`] then *fails* the test, saying
//! what to do, when an image is missing. `cargo test -- --ignored` without the tier fails the
//! same way rather than pretend. Toggling `BUILDER_VM_TESTS` recompiles the crate (the cfg
//! is the crate's), so keep it set while working on VM tests.
//!
//! The S3 tests (s3s-fs, moto) use the same scheme with `BUILDER_S3_TESTS=1` and
//! `cfg(s3_tier)`: see `tests/support/s3s.rs`.

// Each test file that includes this uses part of it.
#![allow(dead_code)]

use std::path::PathBuf;

/// The reason cargo shows for an ignored VM test. (`ignore = …` needs a literal, so the
/// attributes spell it out; this is the text they use.)
pub const IGNORED: &str =
    "VM tier: set BUILDER_VM_TESTS=1 and BUILDER_TEST_IMAGE (scripts/test does)";

fn tier_on() {
    assert!(
        std::env::var("BUILDER_VM_TESTS").as_deref() == Ok("1"),
        "this is a VM test: run it with BUILDER_VM_TESTS=1 and BUILDER_TEST_IMAGE=$(fixtures/base-image.sh) \
         (scripts/test sets both)"
    );
}

/// The fixture image (`BUILDER_TEST_IMAGE`, the cloud-init variant). Panics with what to do
/// when the tier is off at run time or the image is missing.
pub fn test_image() -> PathBuf {
    tier_on();
    let Some(path) = std::env::var_os("BUILDER_TEST_IMAGE") else {
        panic!(
            "BUILDER_VM_TESTS=1 needs BUILDER_TEST_IMAGE=<debian-12-cloud-init.qcow2> (fixtures/base-image.sh prints it)"
        );
    };
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "BUILDER_TEST_IMAGE={} does not exist (fixtures/base-image.sh builds it)",
        path.display()
    );
    path
}

/// The Debian 13 fixture image (`BUILDER_TEST_IMAGE_DEBIAN13`: systemd 257, cloud-init 25.1).
/// Panics with what to do when the tier is off at run time or the image is missing.
pub fn debian13_image() -> PathBuf {
    tier_on();
    let Some(path) = std::env::var_os("BUILDER_TEST_IMAGE_DEBIAN13") else {
        panic!(
            "BUILDER_VM_TESTS=1 needs BUILDER_TEST_IMAGE_DEBIAN13=<debian-13-cloud-init.qcow2> (`fixtures/base-image.sh --suite trixie` prints it; scripts/test sets it)"
        );
    };
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "BUILDER_TEST_IMAGE_DEBIAN13={} does not exist (`fixtures/base-image.sh --suite trixie` builds it)",
        path.display()
    );
    path
}

/// The qemu-guest-agent variant: `BUILDER_TEST_IMAGE_QGA` (or its alias
/// `BUILDER_TEST_QGA_IMAGE`), else `debian-12-qga.qcow2` next to the cloud-init image.
/// Panics with what to do when it is missing.
pub fn qga_image() -> PathBuf {
    let path = std::env::var_os("BUILDER_TEST_IMAGE_QGA")
        .or_else(|| std::env::var_os("BUILDER_TEST_QGA_IMAGE"))
        .map(PathBuf::from)
        .unwrap_or_else(|| test_image().with_file_name("debian-12-qga.qcow2"));
    tier_on();
    assert!(
        path.is_file(),
        "the qemu-guest-agent image {} does not exist (BUILDER_TEST_IMAGE_QGA=$(fixtures/base-image.sh --variant qga))",
        path.display()
    );
    path
}
