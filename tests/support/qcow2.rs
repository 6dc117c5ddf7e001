//! Small qcow2 chains made with the real qemu-img and qemu-io (qemu-utils), for the layer
//! cache's tests: `store::layers`' unit tests and tests/cache_cli.rs include this file.

use std::ffi::OsStr;
use std::path::Path;

/// Run `program` with `args`, which must succeed; its stdout.
pub fn run(program: &str, args: &[&OsStr]) -> Vec<u8> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} is needed for this test (qemu-utils): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A 4 MiB qcow2 at `path` (on the qcow2 `backing` when given) with `len` bytes of
/// `pattern` written at `offset` (qemu-io's syntax: `0x5a`, `64k`).
pub fn image(path: &Path, backing: Option<&Path>, pattern: &str, offset: &str, len: &str) {
    let mut args: Vec<&OsStr> = vec![
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
    ];
    if let Some(backing) = backing {
        args.extend([
            "-b".as_ref(),
            backing.as_os_str(),
            "-F".as_ref(),
            "qcow2".as_ref(),
        ]);
    }
    args.extend([path.as_os_str(), "4M".as_ref()]);
    run("qemu-img", &args);
    let write = format!("write -P {pattern} {offset} {len}");
    run(
        "qemu-io",
        &["-c".as_ref(), write.as_ref(), path.as_os_str()],
    );
}
