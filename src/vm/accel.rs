//! Which accelerator a VM gets. `auto` uses KVM only when a real probe shows it works: a
//! present `/dev/kvm` is not enough (on our CI machines the device exists, but the CPU has
//! no vmx/svm flag, QEMU with KVM hangs in the kernel and `-cpu host` asserts). The probe
//! checks, cheapest first: the device opens, `KVM_GET_API_VERSION` is 12, `KVM_CREATE_VM`
//! succeeds, the CPU advertises vmx or svm, and a real QEMU started with `-accel kvm -cpu
//! host` answers `query-kvm` with KVM enabled within a few seconds. The result is cached for
//! the life of the process.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use tokio::sync::OnceCell;

use super::argv::Accel;
use super::process;
use super::qmp::{HumanMonitorCommand, Qmp, QueryKvm};
use crate::recipe::Accelerator;

#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    /// `kvm` was demanded and the probe says it does not work here.
    #[error("KVM was requested but does not work on this machine: {reason}")]
    KvmUnusable { reason: String },
}

/// The decision, and for a fallback the reason, printed as a one-line notice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelDecision {
    pub accel: Accel,
    /// Why KVM is not used, when `auto` fell back to TCG.
    pub fallback_reason: Option<String>,
}

static PROBE: OnceCell<Result<(), String>> = OnceCell::const_new();

/// Decide the accelerator for `choice`. `qemu` is the system emulator binary used for the
/// last stage of the probe.
pub async fn decide(choice: Accelerator, qemu: &Path) -> Result<AccelDecision, AccelError> {
    match choice {
        Accelerator::Tcg => Ok(AccelDecision {
            accel: Accel::Tcg,
            fallback_reason: None,
        }),
        Accelerator::Kvm => match kvm_works(qemu).await {
            Ok(()) => Ok(AccelDecision {
                accel: Accel::Kvm,
                fallback_reason: None,
            }),
            Err(reason) => Err(AccelError::KvmUnusable { reason }),
        },
        Accelerator::Auto => Ok(match kvm_works(qemu).await {
            Ok(()) => AccelDecision {
                accel: Accel::Kvm,
                fallback_reason: None,
            },
            Err(reason) => AccelDecision {
                accel: Accel::Tcg,
                fallback_reason: Some(reason),
            },
        }),
    }
}

/// `Ok` when KVM really works; otherwise why not. Probed once per process.
pub async fn kvm_works(qemu: &Path) -> Result<(), String> {
    PROBE
        .get_or_init(|| probe(qemu.to_path_buf()))
        .await
        .clone()
}

async fn probe(qemu: std::path::PathBuf) -> Result<(), String> {
    probe_device(Path::new("/dev/kvm"))?;
    let cpuinfo = fs_err::read_to_string("/proc/cpuinfo").map_err(|e| e.to_string())?;
    if !cpu_has_virtualization(&cpuinfo) {
        return Err("the CPU does not advertise hardware virtualization (no vmx or svm flag in /proc/cpuinfo; nested virtualization is off)".into());
    }
    probe_qemu(&qemu).await
}

/// The flags line of /proc/cpuinfo names `vmx` (Intel) or `svm` (AMD).
fn cpu_has_virtualization(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

// KVMIO is 0xAE (linux/kvm.h). Both ioctls take an integer argument that must be 0: the
// kernel refuses KVM_GET_API_VERSION with EINVAL when the (unused) argument is not zero, and a
// variadic call without it passes whatever is in the register.
nix::ioctl_write_int_bad!(kvm_get_api_version, nix::request_code_none!(0xAE, 0x00));
nix::ioctl_write_int_bad!(kvm_create_vm, nix::request_code_none!(0xAE, 0x01));

#[allow(unsafe_code)] // KVM ioctls on a raw descriptor: nix has no safe wrapper for them
fn probe_device(dev: &Path) -> Result<(), String> {
    let file = fs_err::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .map_err(|e| e.to_string())?;
    let fd = file.as_raw_fd();
    // SAFETY: `fd` is an open /dev/kvm descriptor owned by `file` for this whole function;
    // KVM_GET_API_VERSION takes a zero argument and only returns an integer.
    let version = unsafe { kvm_get_api_version(fd, 0) }
        .map_err(|e| format!("KVM_GET_API_VERSION on {} failed: {e}", dev.display()))?;
    if version != 12 {
        return Err(format!(
            "{} speaks KVM API version {version}, QEMU needs 12",
            dev.display()
        ));
    }
    // SAFETY: as above; KVM_CREATE_VM takes the machine type (0, the default) by value and
    // returns a new descriptor, which we wrap so it is closed at once.
    let vm = unsafe { kvm_create_vm(fd, 0) }.map_err(|e| format!("KVM_CREATE_VM failed: {e}"))?;
    // SAFETY: the kernel just returned `vm` as a fresh descriptor that nothing else owns.
    drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(vm) });
    Ok(())
}

/// Start QEMU with KVM and the host CPU (running the firmware, no disk), ask it over QMP
/// whether KVM is enabled and for the vCPU's registers. It must answer within 3 s; it is
/// killed either way.
async fn probe_qemu(qemu: &Path) -> Result<(), String> {
    let dir = tempfile::Builder::new()
        .prefix("builder-kvm-")
        .tempdir()
        .map_err(|e| format!("cannot create a temporary folder for the KVM probe: {e}"))?;
    let sock = dir.path().join("qmp.sock");
    let log = dir.path().join("qemu.log");
    let args: Vec<String> = [
        "-accel",
        "kvm",
        "-machine",
        "q35",
        "-cpu",
        "host",
        "-nodefaults",
        "-display",
        "none",
        "-m",
        "64M",
        "-chardev",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        format!(
            "socket,id=qmp0,path={},server=on,wait=off",
            sock.to_string_lossy().replace(',', ",,")
        ),
        "-mon".into(),
        "chardev=qmp0,mode=control".into(),
    ])
    .collect();
    let child = process::spawn(qemu, &args, &log)
        .map_err(|e| format!("could not start QEMU for the KVM probe: {e}"))?;
    let exit = child.exit_watch();
    let asked = async {
        // The socket appears once QEMU has initialised its machine and vCPUs.
        let qmp = loop {
            if let Some(exit) = child.exit() {
                return Err(format!(
                    "QEMU with KVM {exit}: {}",
                    process::tail(&log, 3).replace('\n', " | ")
                ));
            }
            if let Ok(qmp) = Qmp::connect(&sock, None).await {
                break qmp;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let kvm = qmp
            .execute(&QueryKvm {})
            .await
            .map_err(|e| format!("QEMU with KVM did not answer query-kvm: {e}"))?;
        if !kvm.enabled {
            return Err(format!(
                "QEMU reports KVM present={} enabled=false",
                kvm.present
            ));
        }
        // Reading the registers needs the vCPU thread to come out of KVM_RUN: a vCPU stuck
        // in the kernel (what broken nested KVM does) never answers.
        qmp.execute(&HumanMonitorCommand {
            command_line: "info registers".into(),
        })
        .await
        .map(drop)
        .map_err(|e| format!("QEMU with KVM could not read the vCPU's registers: {e}"))
    };
    let result = tokio::time::timeout(Duration::from_secs(3), asked)
        .await
        .unwrap_or_else(|_| Err("QEMU with KVM did not answer within 3 s (it hangs)".into()));
    if let Err(e) = process::kill_group(child.pid(), &exit) {
        return Err(format!(
            "{} (and the probe QEMU could not be stopped: {e})",
            result.err().unwrap_or_default()
        ));
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_flags() {
        assert!(cpu_has_virtualization(
            "processor : 0\nflags\t\t: fpu vme vmx sse\n"
        ));
        assert!(cpu_has_virtualization("flags : fpu svm\n"));
        assert!(!cpu_has_virtualization("flags : fpu vmxnet sse\nvmx\n"));
    }

    #[test]
    fn choice_parses_with_a_clear_error() {
        let parse = |s| Accelerator::parse_named("accelerator", s);
        assert_eq!(parse("tcg"), Ok(Accelerator::Tcg));
        let e = parse("kvmm").expect_err("typo");
        assert_eq!(
            e,
            "unknown accelerator `kvmm`; expected `auto`, `kvm` or `tcg`"
        );
    }

    #[test]
    fn missing_device_names_itself() {
        let e = probe_device(Path::new("/nonexistent/kvm")).expect_err("no device");
        assert!(e.contains("/nonexistent/kvm"), "{e}");
    }

    /// On the machines this project is built on, KVM does not work (no vmx/svm): `auto` must
    /// fall back to TCG with a reason, and `kvm` must be refused with the same reason. Where
    /// KVM does work, both pick KVM. Either way, the two answers agree.
    #[tokio::test]
    async fn auto_and_demanded_kvm_agree_with_the_probe() {
        let Ok(qemu) = process::find_program("qemu-system-x86_64") else {
            panic!("qemu-system-x86_64 is needed for this test (apt install qemu-system-x86)");
        };
        let auto = decide(Accelerator::Auto, &qemu)
            .await
            .expect("auto never fails");
        let demanded = decide(Accelerator::Kvm, &qemu).await;
        match (&auto.accel, &auto.fallback_reason, demanded) {
            (Accel::Tcg, Some(reason), Err(AccelError::KvmUnusable { reason: r2 })) => {
                assert_eq!(reason, &r2);
                assert!(!reason.is_empty());
                eprintln!("KVM unusable here (expected on CI): {reason}");
            }
            (Accel::Kvm, None, Ok(d)) => assert_eq!(d.accel, Accel::Kvm),
            other => panic!("auto and kvm disagree: {other:?}"),
        }
        // TCG is never probed.
        let tcg = decide(Accelerator::Tcg, &qemu).await.expect("tcg");
        assert_eq!(tcg.accel, Accel::Tcg);
    }

    /// The last stage alone: it answers within its few seconds whatever KVM does here, and
    /// the probe QEMU is gone afterwards. (On our CI machines the CPU stage already refuses
    /// KVM; QEMU there runs firmware under KVM but hangs later in a Linux boot.)
    #[tokio::test]
    async fn qemu_stage_of_the_probe_answers_in_time_and_leaves_nothing() {
        let qemu =
            process::find_program("qemu-system-x86_64").expect("qemu-system-x86_64 is needed");
        let started = std::time::Instant::now();
        let result = probe_qemu(&qemu).await;
        eprintln!(
            "QEMU stage of the KVM probe: {result:?} after {:?}",
            started.elapsed()
        );
        if let Err(reason) = &result {
            assert!(reason.contains("KVM"), "{reason}");
        }
        let left = std::process::Command::new("pgrep")
            .args(["-f", "builder-kvm-"])
            .output()
            .expect("pgrep");
        assert!(
            left.stdout.is_empty(),
            "probe QEMU left running: {}",
            String::from_utf8_lossy(&left.stdout)
        );
    }
}
