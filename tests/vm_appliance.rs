//! VM tier, the vm layer of the appliance boot (`boot: appliance`, `src/vm/appliance.rs`): the
//! host's kernel booted directly with the agent as init, on the fixture image. What a caller
//! of the library needs: `VmOptions { boot: Appliance, .. }` + `Session::open`. The builds in
//! appliance mode are tests/appliance_e2e.rs's.
//!
//! Run with `BUILDER_VM_TESTS=1 BUILDER_TEST_IMAGE=$(fixtures/base-image.sh) cargo test --test
//! vm_appliance -- --nocapture` (the host needs a kernel: `scripts/install-deps` installs
//! linux-image-cloud-amd64). Each test owns a [`NoLeftovers`] guard: no process and no file of
//! the VM is left when it ends.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use builder::machine::{Capture, ExecRequest};
use builder::recipe::Boot;
use builder::undo::Outcome;
use builder::vm::session::{Session, SessionOptions};
use builder::vm::{ErrorClass, StopRung, VmError, VmOptions};

#[path = "support/vm_tier.rs"]
mod vm_tier;

#[path = "support/leftovers.rs"]
mod leftovers;
use leftovers::NoLeftovers;

fn appliance_options(guard: &NoLeftovers, image: PathBuf) -> SessionOptions {
    let mut vm = VmOptions::new(image);
    vm.work_dir = Some(guard.runtime());
    vm.boot = Boot::Appliance;
    let mut options = SessionOptions::new(vm);
    // The appliance answers in seconds; a minute is plenty even on a loaded host.
    options.boot_timeout = Duration::from_secs(180);
    options
}

fn progress(message: &str) {
    eprintln!("  vm: {message}");
}

fn load() -> String {
    fs_err::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

async fn run(session: &Session, argv: &[&str]) -> String {
    let capture = Capture::default();
    let out = session
        .target()
        .exec(&ExecRequest::argv(argv.iter().copied()), &capture)
        .await
        .unwrap_or_else(|e| panic!("exec {argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?}: {}; stderr: {}",
        out.status,
        String::from_utf8_lossy(&capture.stderr())
    );
    String::from_utf8_lossy(&capture.stdout()).into_owned()
}

/// One appliance boot: the hello (timed from QEMU's start), a command in the chroot of the
/// guest's root, a reboot (a new boot of the same appliance), a power-off leaving nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(vm_tier),
    ignore = "VM tier: set BUILDER_VM_TESTS=1 and BUILDER_TEST_IMAGE (scripts/test does)"
)]
async fn appliance_boots_serves_the_guest_root_reboots_and_powers_off() {
    let guard = NoLeftovers::new();
    let image = vm_tier::test_image();
    let before = builder::digest::sha256_file(&image, None).expect("hash");
    let load_before = load();
    let session = Session::open(appliance_options(&guard, image.clone()), &progress)
        .await
        .expect("appliance boot and hello");
    let agent_up = session.timings.agent_up;
    eprintln!(
        "appliance: agent up {:.1} s after QEMU started (load before {load_before}, now {})",
        agent_up.as_secs_f64(),
        load()
    );
    let appliance = session.vm().appliance().expect("an appliance boot");
    let readiness = session.readiness.clone().expect("our agent's readiness");
    assert_eq!(
        readiness.system.as_deref(),
        Some(format!("system: appliance (kernel {})", appliance.release).as_str())
    );
    assert_eq!(readiness.hello.os_id, "debian", "{:?}", readiness.hello);
    assert_eq!(session.timings.cloud_init_done, None);
    // QEMU booted the kernel itself: no seed, no firmware of the image's.
    let cmdline =
        fs_err::read_to_string(session.vm().paths().dir.join("qemu.cmdline")).expect("cmdline");
    assert!(cmdline.contains(" -kernel "), "{cmdline}");
    assert!(cmdline.contains("builder.appliance=1"), "{cmdline}");
    assert!(!cmdline.contains("seed"), "{cmdline}");

    // Commands run in the guest's root, not in the initramfs.
    let os_release = run(&session, &["cat", "/etc/os-release"]).await;
    assert!(os_release.contains("ID=debian"), "{os_release}");
    assert!(
        !run(&session, &["ls", "/"]).await.contains("sysroot"),
        "the chroot's / is the guest's"
    );
    let boot_id = run(&session, &["cat", "/proc/sys/kernel/random/boot_id"]).await;
    run(
        &session,
        &["sh", "-c", "echo kept > /var/tmp/appliance-mark"],
    )
    .await;

    // A reboot: the same appliance boots again, a new agent says hello.
    let t = Instant::now();
    session.target().reboot().await.expect("reboot");
    eprintln!("appliance: reboot took {:.1} s", t.elapsed().as_secs_f64());
    let after = run(&session, &["cat", "/proc/sys/kernel/random/boot_id"]).await;
    assert_ne!(after, boot_id, "a new boot");
    assert_eq!(
        run(&session, &["cat", "/var/tmp/appliance-mark"]).await,
        "kept\n",
        "what was written before the reboot was synced to the disk"
    );

    let report = session.close(Outcome::Success, &progress).await;
    eprintln!("shutdown: {:?} in {:?}", report.rung, report.took);
    assert_eq!(report.rung, StopRung::AgentPoweroff, "init powered off");
    assert!(report.unwind.is_clean(), "{:?}", report.unwind);
    assert_eq!(
        builder::digest::sha256_file(&image, None).expect("hash"),
        before,
        "the base image changed"
    );
    drop(guard);
}

/// A disk without any operating system: the agent as init says what it found and powers
/// off; the error is the appliance's (exit 3) with the hint to boot the image fully.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(vm_tier),
    ignore = "VM tier: set BUILDER_VM_TESTS=1 and BUILDER_TEST_IMAGE (scripts/test does)"
)]
async fn an_image_the_appliance_cannot_read_is_a_clear_error() {
    vm_tier::test_image();
    let guard = NoLeftovers::new();
    let host = tempfile::tempdir().expect("temp dir");
    let blank = host.path().join("blank.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&blank)
        .arg("64M")
        .status()
        .expect("qemu-img");
    assert!(made.success());
    let t = Instant::now();
    let err = Session::open(appliance_options(&guard, blank), &progress)
        .await
        .expect_err("no root file system");
    eprintln!("error after {:.1} s: {err}", t.elapsed().as_secs_f64());
    assert!(matches!(err, VmError::Appliance { .. }), "{err:?}");
    assert_eq!(err.class(), ErrorClass::Host);
    assert!(err.to_string().contains("vda"), "{err}");
    assert!(
        err.hint().is_some_and(|h| h.contains("boot: full")),
        "{:?}",
        err.hint()
    );
    assert!(
        guard.wait_clean(Duration::from_secs(10)).is_empty(),
        "{:?}",
        guard.leftovers()
    );
    drop(guard);
}

/// The shutdown ladder without the agent: the appliance has nothing that handles the ACPI
/// power button, so the ladder goes straight to QMP `quit` instead of waiting out the grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(vm_tier),
    ignore = "VM tier: set BUILDER_VM_TESTS=1 and BUILDER_TEST_IMAGE (scripts/test does)"
)]
async fn without_its_agent_the_appliance_is_stopped_at_once() {
    let guard = NoLeftovers::new();
    let options = appliance_options(&guard, vm_tier::test_image());
    let vm = builder::vm::RunningVm::boot(options.vm, &progress)
        .await
        .expect("QEMU started");
    // Nobody connects to the agent: init's own line says the appliance is up.
    let deadline = Instant::now() + Duration::from_secs(180);
    while !vm.console_tail(50).contains("builder-appliance: ready") {
        assert!(Instant::now() < deadline, "{}", vm.console_tail(50));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let report = vm
        .shut_down(Outcome::Success, false, Duration::from_secs(60), &progress)
        .await;
    eprintln!("shutdown: {:?} in {:?}", report.rung, report.took);
    assert_eq!(report.rung, StopRung::Quit);
    assert!(report.took < Duration::from_secs(30), "{:?}", report.took);
    assert!(report.unwind.is_clean(), "{:?}", report.unwind);
    drop(guard);
}
