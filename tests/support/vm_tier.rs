//! The VM test tier's gate, shared by the test files that boot the fixture image: on only with
//! `BUILDER_VM_TESTS=1`, and then `BUILDER_TEST_IMAGE` must name an existing image.

use std::path::PathBuf;

/// The fixture image for `test`, or `None` (with a note) when the VM tier is off. Panics with
/// what to do when the tier is on but the image is missing.
pub fn test_image(test: &str) -> Option<PathBuf> {
    if std::env::var("BUILDER_VM_TESTS").as_deref() != Ok("1") {
        eprintln!(
            "skipped {test}: VM tests run only with BUILDER_VM_TESTS=1 (and BUILDER_TEST_IMAGE)"
        );
        return None;
    }
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
    Some(path)
}
