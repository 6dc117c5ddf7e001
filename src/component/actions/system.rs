//! `Reboot` and `UpdateOS`.
//!
//! `Reboot` only waits `delaySeconds` and asks the executor to reboot the target: the executor
//! owns the reboot (it counts reboots and knows where to resume). `UpdateOS` detects the
//! package manager on the target (apt, dnf, yum, zypper, apk) and runs it as one script whose
//! output is streamed like any step's.

use serde_json::Value;

use super::{ActionContext, ActionError, Completed, Inputs, Next};
use crate::machine::{Capture, ExecRequest, ExitStatus, Program};

pub async fn reboot(inputs: &Value) -> Result<Completed, ActionError> {
    let delay = match inputs {
        Value::Null => 0,
        other => Inputs::of(other)?.int("delaySeconds", 0)?,
    };
    let delay = u64::try_from(delay).map_err(|_| {
        ActionError::Input(format!("`delaySeconds` must not be negative, not {delay}"))
    })?;
    if delay > 0 {
        tokio::time::sleep(std::time::Duration::from_secs(delay)).await;
    }
    Ok(Completed {
        outputs: Vec::new(),
        next: Next::RebootThenContinue,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackageManager {
    Apt,
    Dnf,
    Yum,
    Zypper,
    Apk,
}

impl PackageManager {
    const PROBE_ORDER: [(PackageManager, &'static str); 5] = [
        (PackageManager::Apt, "apt-get"),
        (PackageManager::Dnf, "dnf"),
        (PackageManager::Yum, "yum"),
        (PackageManager::Zypper, "zypper"),
        (PackageManager::Apk, "apk"),
    ];
}

/// Single-quote a word for bash.
fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

fn words(list: &[String]) -> String {
    list.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" ")
}

/// The script that updates packages with `manager`: everything, or only `include`, never
/// `exclude`. Pure, so each manager's command is tested without running it.
pub fn update_script(
    manager: PackageManager,
    include: &[String],
    exclude: &[String],
) -> Result<String, String> {
    let inc = words(include);
    let exc = words(exclude);
    let mut script = String::from("set -e\n");
    match manager {
        PackageManager::Apt => {
            script.push_str("export DEBIAN_FRONTEND=noninteractive\napt-get update\n");
            if !exclude.is_empty() {
                // Held packages are left alone by upgrade; release them whatever happens.
                script.push_str(&format!(
                    "apt-mark hold {exc}\ntrap 'apt-mark unhold {exc} >/dev/null' EXIT\n"
                ));
            }
            if include.is_empty() {
                script.push_str("apt-get -y -o Dpkg::Options::=--force-confold upgrade\n");
            } else {
                script.push_str(&format!(
                    "apt-get -y -o Dpkg::Options::=--force-confold install --only-upgrade {inc}\n"
                ));
            }
        }
        PackageManager::Dnf | PackageManager::Yum => {
            let tool = if manager == PackageManager::Dnf {
                "dnf"
            } else {
                "yum"
            };
            let excludes: String = exclude
                .iter()
                .map(|e| format!(" --exclude={}", quote(e)))
                .collect();
            script.push_str(&format!("{tool} -y upgrade{excludes} {inc}\n"));
        }
        PackageManager::Zypper => {
            if !exclude.is_empty() {
                script.push_str(&format!(
                    "zypper --non-interactive addlock {exc}\ntrap 'zypper --non-interactive removelock {exc} >/dev/null' EXIT\n"
                ));
            }
            script.push_str("zypper --non-interactive refresh\n");
            script.push_str(&format!("zypper --non-interactive update {inc}\n"));
        }
        PackageManager::Apk => {
            if !exclude.is_empty() {
                return Err(
                    "`exclude` is not supported with apk (Alpine has no package holds for upgrade); list the packages to update in `include` instead"
                        .into(),
                );
            }
            script.push_str(&format!("apk update\napk upgrade {inc}\n"));
        }
    }
    Ok(script)
}

async fn detect(cx: &ActionContext<'_>) -> Result<PackageManager, ActionError> {
    let mut probe = String::new();
    for (_, binary) in PackageManager::PROBE_ORDER {
        probe.push_str(&format!(
            "if command -v {binary} >/dev/null 2>&1; then echo {binary}; exit 0; fi\n"
        ));
    }
    probe.push_str("exit 1\n");
    let capture = Capture::default();
    let outcome = cx
        .target
        .exec(&ExecRequest::bash(probe), &capture)
        .await
        .map_err(ActionError::target("could not look for a package manager"))?;
    let found = String::from_utf8_lossy(&capture.stdout())
        .trim()
        .to_string();
    if outcome.status.success()
        && let Some((manager, _)) = PackageManager::PROBE_ORDER
            .iter()
            .find(|(_, binary)| *binary == found)
    {
        return Ok(*manager);
    }
    Err(ActionError::NoPackageManager)
}

pub async fn update_os(inputs: &Value, cx: &ActionContext<'_>) -> Result<(), ActionError> {
    let (include, exclude) = match inputs {
        Value::Null => (Vec::new(), Vec::new()),
        other => {
            let i = Inputs::of(other)?;
            (i.list("include")?, i.list("exclude")?)
        }
    };
    // Both given: include minus exclude (reference 2.1).
    let include: Vec<String> = include
        .into_iter()
        .filter(|p| !exclude.contains(p))
        .collect();
    let manager = detect(cx).await?;
    let script = update_script(manager, &include, &exclude).map_err(ActionError::Input)?;
    let request = ExecRequest {
        program: Program::Script {
            interpreter: "bash".into(),
            body: script,
        },
        env: cx.env.to_vec(),
        cwd: Some(cx.working_directory.to_path_buf()),
        user: None,
        timeout: cx.remaining(),
    };
    let outcome = cx
        .target
        .exec(&request, cx.sink)
        .await
        .map_err(ActionError::target("could not run the update"))?;
    match outcome.status {
        ExitStatus::Exited(0) => Ok(()),
        status => Err(ActionError::Command {
            what: format!("the {manager:?} update"),
            status,
            outputs: Vec::new(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn apt_upgrades_all_or_only_included_and_holds_excluded() {
        let all = update_script(PackageManager::Apt, &[], &[]).expect("script");
        assert!(all.contains("apt-get update\n"));
        assert!(all.contains(" upgrade\n"));
        let some = update_script(PackageManager::Apt, &s(&["curl"]), &s(&["linux-image"]))
            .expect("script");
        assert!(some.contains("install --only-upgrade 'curl'"));
        assert!(some.contains("apt-mark hold 'linux-image'"));
        assert!(some.contains("apt-mark unhold 'linux-image'"));
    }

    #[test]
    fn other_managers() {
        let dnf = update_script(PackageManager::Dnf, &[], &s(&["kernel*"])).expect("script");
        assert!(dnf.contains("dnf -y upgrade --exclude='kernel*'"));
        let yum = update_script(PackageManager::Yum, &s(&["a"]), &[]).expect("script");
        assert!(yum.contains("yum -y upgrade 'a'"));
        let zypper = update_script(PackageManager::Zypper, &[], &s(&["x"])).expect("script");
        assert!(zypper.contains("addlock 'x'"));
        assert!(update_script(PackageManager::Apk, &[], &s(&["x"])).is_err());
        let apk = update_script(PackageManager::Apk, &s(&["b"]), &[]).expect("script");
        assert!(apk.contains("apk upgrade 'b'"));
    }
}
