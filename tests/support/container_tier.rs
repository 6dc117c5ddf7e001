//! The container test tier's gate (real buildah, as root), like the VM tier's
//! (`tests/support/vm_tier.rs`): `build.rs` sets `--cfg container_tier` when
//! `BUILDER_CONTAINER_TESTS=1`, and every container test carries
//!
//! ```text
//! #[cfg_attr(
//!     not(container_tier),
//!     ignore = "container tier: set BUILDER_CONTAINER_TESTS=1 and BUILDER_TEST_CONTAINER (scripts/test does)"
//! )]
//! ```
//!
//! so without the variable it shows as ignored, and with it [`base_container`] fails the test,
//! saying what to do, when the fixture image is missing.

// Each test file that includes this uses part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The fixture base container image (`BUILDER_TEST_CONTAINER`: an OCI archive of Debian 12,
/// `fixtures/base-container.sh` prints it). Panics with what to do when it is missing.
pub fn base_container() -> PathBuf {
    assert!(
        std::env::var("BUILDER_CONTAINER_TESTS").as_deref() == Ok("1"),
        "this is a container test: run it with BUILDER_CONTAINER_TESTS=1 and \
         BUILDER_TEST_CONTAINER=$(fixtures/base-container.sh) (scripts/test sets both)"
    );
    let Some(path) = std::env::var_os("BUILDER_TEST_CONTAINER") else {
        panic!(
            "BUILDER_CONTAINER_TESTS=1 needs BUILDER_TEST_CONTAINER=<debian-12-container.oci.tar> (fixtures/base-container.sh prints it)"
        );
    };
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "BUILDER_TEST_CONTAINER={} does not exist (fixtures/base-container.sh builds it)",
        path.display()
    );
    path
}

/// The mounts below `dir` (findmnt), deepest first.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let out = std::process::Command::new("findmnt")
        .args(["-rn", "-o", "TARGET"])
        .output()
        .expect("findmnt");
    let prefix = format!("{}/", dir.display());
    let mut found: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(str::to_owned)
        .collect();
    found.sort();
    found.reverse();
    found
}

/// Removes a private engine folder: every image and container in it, the storage driver's
/// own mounts, then the folder.
pub fn remove_engine_dir(dir: &Path) {
    let _ = std::process::Command::new("buildah")
        .arg("--root")
        .arg(dir.join("storage"))
        .arg("--runroot")
        .arg(dir.join("run"))
        .args(["rmi", "--all", "--force"])
        .output();
    for m in mounts_under(dir) {
        let _ = std::process::Command::new("umount")
            .args(["-l", &m])
            .status();
    }
    let _ = fs_err::remove_dir_all(dir);
}

/// Removes the engine folder when dropped (a failed test too): [`remove_engine_dir`].
pub struct EngineDir(pub PathBuf);

impl Drop for EngineDir {
    fn drop(&mut self) {
        remove_engine_dir(&self.0);
    }
}
