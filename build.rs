//! Builds the guest agent (`agent/`) as a static executable and puts it in `OUT_DIR`, so the
//! `builder` binary embeds it and users never have to find or build it themselves.
//!
//! Why a nested cargo: the agent must link statically (`+crt-static`) so it runs on any x86_64
//! guest whatever its glibc, and rustflags cannot be set for one package of a build. A
//! separate target dir keeps the nested build off the outer build's lock.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// The slow or tool-dependent test tiers are chosen when the tests are compiled, so a test
/// whose tier is off shows as *ignored* (with its reason) instead of passing without running:
/// `BUILDER_VM_TESTS=1` sets `cfg(vm_tier)` (tests/support/vm_tier.rs), `BUILDER_S3_TESTS=1`
/// sets `cfg(s3_tier)` (tests/support/s3s.rs), `BUILDER_CONTAINER_TESTS=1` sets
/// `cfg(container_tier)` (tests/support/container_tier.rs: real buildah, as root).
fn test_tiers() {
    for (var, cfg) in [
        ("BUILDER_VM_TESTS", "vm_tier"),
        ("BUILDER_S3_TESTS", "s3_tier"),
        ("BUILDER_CONTAINER_TESTS", "container_tier"),
    ] {
        println!("cargo::rustc-check-cfg=cfg({cfg})");
        println!("cargo::rerun-if-env-changed={var}");
        if env::var(var).as_deref() == Ok("1") {
            println!("cargo::rustc-cfg={cfg}");
        }
    }
}

fn main() {
    for path in [
        "agent/src",
        "agent/Cargo.toml",
        "src/agent/protocol.rs",
        "Cargo.lock",
    ] {
        println!("cargo::rerun-if-changed={path}");
    }
    println!("cargo::rerun-if-env-changed=BUILDER_AGENT_BINARY");
    test_tiers();

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dest = out_dir.join("builder-agent");

    // An escape hatch for packagers who build the agent themselves.
    if let Some(prebuilt) = env::var_os("BUILDER_AGENT_BINARY") {
        fs_err::copy(&prebuilt, &dest).unwrap_or_else(|e| panic!("BUILDER_AGENT_BINARY: {e}"));
        return;
    }

    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let target_dir = manifest_dir.join("target").join("agent");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());

    let mut cmd = Command::new(cargo);
    cmd.current_dir(&manifest_dir)
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "builder-agent",
            "--target",
            TRIPLE,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static");
    // The outer build's settings must not leak into this one (clippy's wrapper, encoded
    // flags, a forced target dir or profile).
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .expect("could not run cargo to build the guest agent");
    assert!(
        status.success(),
        "building the guest agent (agent/) failed: {status}"
    );

    let built = target_dir
        .join(TRIPLE)
        .join("release")
        .join("builder-agent");
    fs_err::copy(&built, &dest).unwrap_or_else(|e| panic!("{e}"));
}
