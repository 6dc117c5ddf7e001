//! Generalizing (sealing) the image before it is shut down for good: everything that must
//! differ between machines made from it, or that only the build needed, is removed.
//!
//! First the package inventory is read (it needs the package manager's state, which the
//! clean-up does not touch but which is cheapest to read while the guest is up). Then one
//! script runs in the guest: `cloud-init clean --logs --seed`, an empty `/etc/machine-id`,
//! no D-Bus machine id, no SSH host keys, emptied logs and shell history, package caches
//! cleaned, the agent and its unit removed, `fstrim`, `sync`. Then the result is checked from
//! the guest and reported; a check that fails fails the build (an image that would boot with
//! the build VM's identity is not a golden image).

use std::time::Duration;

use crate::export::manifest::{DPKG_QUERY, PackageList, RPM_QUERY, parse_packages};
use crate::target::{Capture, ExecRequest, OutputSink, StepTarget, TargetError};
use crate::vm::seed::AGENT_INSTALLED_PATHS;

/// Generalizing may trim a few GiB under TCG.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(1200);
const QUERY_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum GeneralizeError {
    #[error("could not {what} in the guest")]
    Target {
        what: &'static str,
        #[source]
        source: TargetError,
    },
    #[error("the package list could not be read")]
    Packages(#[source] crate::export::ExportError),
    #[error("`{command}` {status} in the guest{}", tail(.stderr))]
    Command {
        command: &'static str,
        status: crate::target::ExitStatus,
        stderr: String,
    },
    #[error("the image is not generalized: {}", .0.join("; "))]
    Unsealed(Vec<String>),
}

fn tail(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.trim_end().lines().collect();
    if lines.is_empty() {
        return String::new();
    }
    let from = lines.len().saturating_sub(5);
    format!(": {}", lines[from..].join(" / "))
}

/// One verified property of the sealed image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// What generalizing did and found.
#[derive(Debug, Clone)]
pub struct Generalized {
    pub checks: Vec<Check>,
}

/// The packages installed in the guest (`dpkg-query`, else `rpm -qa`); `None` when the guest
/// has neither.
pub async fn packages(target: &dyn StepTarget) -> Result<Option<PackageList>, GeneralizeError> {
    let which = Capture::default();
    let probe = ExecRequest::bash(
        "if command -v dpkg-query >/dev/null 2>&1; then echo dpkg; \
         elif command -v rpm >/dev/null 2>&1; then echo rpm; fi",
    )
    .with_timeout(Some(QUERY_TIMEOUT));
    target
        .exec(&probe, &which)
        .await
        .map_err(|source| GeneralizeError::Target {
            what: "find the package manager",
            source,
        })?;
    let manager = String::from_utf8_lossy(&which.stdout()).trim().to_string();
    let (command, query) = match manager.as_str() {
        "dpkg" => ("dpkg-query -W", DPKG_QUERY),
        "rpm" => ("rpm -qa", RPM_QUERY),
        _ => return Ok(None),
    };
    let out = Capture::default();
    let outcome = target
        .exec(
            &ExecRequest::bash(query).with_timeout(Some(QUERY_TIMEOUT)),
            &out,
        )
        .await
        .map_err(|source| GeneralizeError::Target {
            what: "list the installed packages",
            source,
        })?;
    if !outcome.status.success() {
        return Err(GeneralizeError::Command {
            command,
            status: outcome.status,
            stderr: String::from_utf8_lossy(&out.stderr()).into_owned(),
        });
    }
    parse_packages(&manager, &String::from_utf8_lossy(&out.stdout()))
        .map(Some)
        .map_err(GeneralizeError::Packages)
}

/// The clean-up script. Every command says what it does (its output goes to the build log);
/// a command that is missing on this distribution is skipped, one that fails is reported and
/// the rest still run: the checks afterwards decide. With `seal` false (the recipe's
/// `generalize: false`) only builder's own traces go: the agent and its unit.
pub fn script(seal: bool) -> String {
    let agent_paths = AGENT_INSTALLED_PATHS.join(" ");
    let seal_part = if seal { SEAL } else { "" };
    format!(
        r#"set -u
run() {{ echo "+ $*"; "$@" || echo "warning: \`$*\` failed with status $?" >&2; }}
has() {{ command -v "$1" >/dev/null 2>&1; }}
{seal_part}# The agent and its unit: it keeps running from memory until the power-off.
if [ -d /run/systemd/system ]; then
  systemctl disable builder-agent.service >/dev/null 2>&1 || true
fi
run rm -rf {agent_paths}
if [ -d /run/systemd/system ]; then run systemctl daemon-reload; fi
# Free blocks back to the disk (the VM runs with discard=unmap), so the export is small.
if has fstrim; then run fstrim -av; fi
run sync
"#
    )
}

/// The sealing part of [`script`].
const SEAL: &str = r#"# cloud-init: forget this instance, its logs and the seed it came from, so the next boot is a
# first boot that reads the next machine's seed.
if has cloud-init; then run cloud-init clean --logs --seed; fi
# Machine identity: systemd makes a new machine id on the next boot.
if [ -e /etc/machine-id ]; then run truncate -s 0 /etc/machine-id; fi
run rm -f /var/lib/dbus/machine-id
run sh -c 'rm -f /etc/ssh/ssh_host_*'
# Package caches.
if has apt-get; then run apt-get clean; fi
if has dnf; then run dnf clean all; elif has yum; then run yum clean all; fi
# Logs and shell history (the journal through journalctl, the rest emptied in place so
# services that hold them open keep working).
if has journalctl; then
  journalctl --rotate >/dev/null 2>&1 || true
  run journalctl --vacuum-time=1s --quiet
fi
run find /var/log -path /var/log/journal -prune -o -type f -exec truncate -s 0 {} +
run rm -f /root/.bash_history /root/.lesshst /root/.viminfo
run sh -c 'rm -f /home/*/.bash_history'
"#;

/// The checks, as `name<TAB>ok|fail<TAB>detail` lines; without `seal`, only the agent's.
fn verify_script(seal: bool) -> String {
    let agent_paths = AGENT_INSTALLED_PATHS.join(" ");
    format!(
        r#"set -u
check() {{ if eval "$2"; then printf '%s\tok\t%s\n' "$1" "$3"; else printf '%s\tfail\t%s\n' "$1" "$4"; fi; }}
left=""
for p in {agent_paths}; do [ -e "$p" ] && left="$left $p"; done
check agent-removed '[ -z "$left" ]' 'no file of the agent or its unit' "left:$left"
[ {seal} = true ] || exit 0
check machine-id '[ ! -s /etc/machine-id ]' 'empty' "holds $(cat /etc/machine-id 2>/dev/null)"
check dbus-machine-id '[ ! -e /var/lib/dbus/machine-id ]' 'absent' 'still there'
keys=$(ls /etc/ssh/ssh_host_* 2>/dev/null | tr '\n' ' ')
check ssh-host-keys '[ -z "$keys" ]' 'none' "still there: $keys"
check cloud-init-clean '[ ! -e /var/lib/cloud/instance ] && [ ! -e /var/lib/cloud/seed ]' 'no instance state, no seed copy' "$(ls -d /var/lib/cloud/instance /var/lib/cloud/seed 2>/dev/null | tr '\n' ' ')"
check shell-history '[ ! -e /root/.bash_history ]' 'none' '/root/.bash_history is there'
exit 0
"#
    )
}

/// Run the clean-up script (its output to `sink`), then check the result. `seal`: the
/// recipe's `generalize`.
pub async fn generalize(
    target: &dyn StepTarget,
    sink: &dyn OutputSink,
    seal: bool,
) -> Result<Generalized, GeneralizeError> {
    let outcome = target
        .exec(
            &ExecRequest::bash(script(seal)).with_timeout(Some(SCRIPT_TIMEOUT)),
            sink,
        )
        .await
        .map_err(|source| GeneralizeError::Target {
            what: "run the generalize script",
            source,
        })?;
    if !outcome.status.success() {
        return Err(GeneralizeError::Command {
            command: "generalize script",
            status: outcome.status,
            stderr: String::new(),
        });
    }
    let out = Capture::default();
    let verified = target
        .exec(
            &ExecRequest::bash(verify_script(seal)).with_timeout(Some(QUERY_TIMEOUT)),
            &out,
        )
        .await
        .map_err(|source| GeneralizeError::Target {
            what: "check the generalized image",
            source,
        })?;
    if !verified.status.success() {
        return Err(GeneralizeError::Command {
            command: "generalize checks",
            status: verified.status,
            stderr: String::from_utf8_lossy(&out.stderr()).into_owned(),
        });
    }
    let checks = parse_checks(&String::from_utf8_lossy(&out.stdout()));
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| format!("{}: {}", c.name, c.detail))
        .collect();
    if !failed.is_empty() {
        return Err(GeneralizeError::Unsealed(failed));
    }
    if checks.is_empty() {
        return Err(GeneralizeError::Unsealed(vec![
            "the checks printed nothing".to_string(),
        ]));
    }
    Ok(Generalized { checks })
}

fn parse_checks(output: &str) -> Vec<Check> {
    output
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, '\t');
            let (name, verdict, detail) = (parts.next()?, parts.next()?, parts.next()?);
            Some(Check {
                name: name.to_string(),
                ok: verdict == "ok",
                detail: detail.trim().to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_parse_and_failures_keep_their_detail() {
        let checks = parse_checks(
            "machine-id\tok\tempty\nssh-host-keys\tfail\tstill there: /etc/ssh/ssh_host_rsa_key \nnoise\n",
        );
        assert_eq!(checks.len(), 2);
        assert!(checks[0].ok);
        assert!(!checks[1].ok);
        assert_eq!(checks[1].detail, "still there: /etc/ssh/ssh_host_rsa_key");
    }

    #[test]
    fn scripts_name_every_agent_path_and_parse_in_bash() {
        for script in [script(true), verify_script(true), script(false)] {
            for path in AGENT_INSTALLED_PATHS {
                assert!(script.contains(path), "{path} missing");
            }
            let status = std::process::Command::new("bash")
                .args(["-n", "-c", &script])
                .status()
                .expect("bash runs");
            assert!(status.success(), "bash -n rejected:\n{script}");
        }
    }

    /// The verification script, run on this machine against a fake root would need root;
    /// instead check that it reports failures for what this (not generalized) machine has.
    #[test]
    fn verify_script_reports_one_line_per_check() {
        let out = std::process::Command::new("bash")
            .args(["-c", &verify_script(true)])
            .output()
            .expect("bash runs");
        let checks = parse_checks(&String::from_utf8_lossy(&out.stdout));
        let names: Vec<&str> = checks.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "agent-removed",
                "machine-id",
                "dbus-machine-id",
                "ssh-host-keys",
                "cloud-init-clean",
                "shell-history"
            ]
        );
        let out = std::process::Command::new("bash")
            .args(["-c", &verify_script(false)])
            .output()
            .expect("bash runs");
        let checks = parse_checks(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(checks.len(), 1, "only the agent's check without sealing");
    }
}
