//! Generalizing (sealing) the image before it is shut down for good: everything that must
//! differ between machines made from it, or that only the build needed, is removed.
//!
//! First the package inventory is read (it needs the package manager's state, which the
//! clean-up does not touch but which is cheapest to read while the guest is up). Then one
//! script runs in the guest: cloud-init's instance state, logs and seed removed (what
//! `cloud-init clean --logs --seed` does), an empty `/etc/machine-id`, no D-Bus machine id,
//! no SSH host keys, emptied logs and shell history, package caches cleaned, the agent and its
//! unit removed, `fstrim`, `sync`; then, in the same exec, the result is checked and reported;
//! a check that fails fails the build (an image that would boot with the build VM's identity
//! is not a golden image). Each command's time goes to the build log: under TCG every
//! process start costs, so the script avoids Python and systemd reloads.

use std::time::Duration;

use crate::machine::{Capture, ExecRequest, Machine, MachineError, OutputSink, OutputStream};
use base64::Engine as _;
use sha2::{Digest as _, Sha256};

use crate::store::manifest::{KeyFile, Package, PackageList, PackageSources, SourceFile};
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
        source: MachineError,
    },
    #[error("the package list could not be read")]
    Packages(#[source] PackageLineError),
    #[error("the package sources could not be read")]
    Sources(#[source] SourcesLineError),
    #[error("`{command}` {status} in the guest{}", tail(.stderr))]
    Command {
        command: &'static str,
        status: crate::machine::ExitStatus,
        stderr: String,
    },
    #[error("the image is not generalized: {}", .0.join("; "))]
    Unsealed(Vec<String>),
}

/// A line of the package manager's list that is not `name<TAB>version<TAB>arch`.
#[derive(Debug, thiserror::Error)]
#[error(
    "`{manager}` package list, line {line}: expected `name<TAB>version<TAB>arch`, got `{text}`"
)]
pub struct PackageLineError {
    pub manager: String,
    pub line: usize,
    pub text: String,
}

/// A line of [`SOURCES_SCRIPT`]'s listing that [`parse_sources`] cannot read.
#[derive(Debug, thiserror::Error)]
#[error("package sources listing, line {line}: {problem} in `{text}`")]
pub struct SourcesLineError {
    pub line: usize,
    pub problem: &'static str,
    pub text: String,
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
/// has neither. One exec: the first line of output names the manager, the rest is its list.
pub async fn packages(target: &dyn Machine) -> Result<Option<PackageList>, GeneralizeError> {
    let out = Capture::default();
    let script = format!(
        "if command -v dpkg-query >/dev/null 2>&1; then echo dpkg; {DPKG_QUERY}; \
         elif command -v rpm >/dev/null 2>&1; then echo rpm; {RPM_QUERY}; fi"
    );
    let outcome = target
        .exec(
            &ExecRequest::bash(script).with_timeout(Some(QUERY_TIMEOUT)),
            &out,
        )
        .await
        .map_err(|source| GeneralizeError::Target {
            what: "list the installed packages",
            source,
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout()).into_owned();
    let (manager, list) = stdout.split_once('\n').unwrap_or((stdout.as_str(), ""));
    let command = match manager.trim() {
        "dpkg" => "dpkg-query -W",
        "rpm" => "rpm -qa",
        _ => return Ok(None),
    };
    if !outcome.status.success() {
        return Err(GeneralizeError::Command {
            command,
            status: outcome.status,
            stderr: String::from_utf8_lossy(&out.stderr()).into_owned(),
        });
    }
    parse_packages(manager.trim(), list)
        .map(Some)
        .map_err(GeneralizeError::Packages)
}

/// The image's package sources as [`package_sources`] read them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadSources {
    pub sources: PackageSources,
    /// Files that are there but could not be read (paths): not in `sources`.
    pub unreadable: Vec<String>,
}

/// The image's package sources and the key files it trusts (`apt` when the guest has `dpkg`,
/// `dnf` when it has `/etc/yum.repos.d`); `None` when it has neither. One exec: the files
/// travel base64-encoded in [`SOURCES_SCRIPT`]'s listing, so a guest with a dozen keyrings
/// costs no more round trips than one with none.
pub async fn package_sources(target: &dyn Machine) -> Result<Option<ReadSources>, GeneralizeError> {
    let out = Capture::default();
    let outcome = target
        .exec(
            &ExecRequest::bash(SOURCES_SCRIPT).with_timeout(Some(QUERY_TIMEOUT)),
            &out,
        )
        .await
        .map_err(|source| GeneralizeError::Target {
            what: "read the package sources",
            source,
        })?;
    if !outcome.status.success() {
        return Err(GeneralizeError::Command {
            command: "list the package sources",
            status: outcome.status,
            stderr: String::from_utf8_lossy(&out.stderr()).into_owned(),
        });
    }
    parse_sources(&String::from_utf8_lossy(&out.stdout())).map_err(GeneralizeError::Sources)
}

/// The guest script whose listing [`parse_sources`] reads, one line per fact: `manager M`,
/// `arch A` (in order: apt's native architecture first), `source PATH DATA` and
/// `key PATH DATA` (path and bytes in base64, so any name or content fits on a line), and
/// `unreadable PATH` for a file that is there but could not be read. Where keys live is
/// INTERFACES' list; which of them a repository trusts is decided at check time.
pub const SOURCES_SCRIPT: &str = r#"shopt -s nullglob
emit() {
  local path data
  path=$(printf '%s' "$2" | base64 -w0)
  if data=$(base64 -w0 -- "$2" 2>/dev/null); then
    printf '%s %s %s\n' "$1" "$path" "$data"
  else
    printf 'unreadable %s\n' "$path"
  fi
}
# The files travel in base64: without it (coreutils) there is nothing to send them with.
need_base64() {
  command -v base64 >/dev/null 2>&1 || { echo 'base64 (coreutils) is not in the image' >&2; exit 3; }
}
each() {
  local kind=$1 f
  shift
  for f in "$@"; do
    if [ -f "$f" ]; then emit "$kind" "$f"; fi
  done
}
if command -v dpkg >/dev/null 2>&1; then
  need_base64
  echo manager apt
  echo "arch $(dpkg --print-architecture)"
  for a in $(dpkg --print-foreign-architectures); do echo "arch $a"; done
  each source /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
    /etc/apt/sources.list.d/*.sources
  each key /etc/apt/trusted.gpg /etc/apt/trusted.gpg.d/* /etc/apt/keyrings/* \
    /usr/share/keyrings/*
elif [ -d /etc/yum.repos.d ]; then
  need_base64
  echo manager dnf
  echo "arch $(uname -m)"
  each source /etc/yum.repos.d/*.repo
  each key /etc/pki/rpm-gpg/*
fi
"#;

/// Read [`SOURCES_SCRIPT`]'s listing: `None` when it names no manager (the guest has
/// neither apt nor dnf). Files and keys are sorted by path; a key's sha256 is computed here,
/// from the bytes received.
pub fn parse_sources(listing: &str) -> Result<Option<ReadSources>, SourcesLineError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut manager = None;
    let mut architectures = Vec::new();
    let (mut files, mut keys, mut unreadable) = (Vec::new(), Vec::new(), Vec::new());
    for (i, line) in listing.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |problem| SourcesLineError {
            line: i + 1,
            problem,
            text: line.chars().take(120).collect(),
        };
        let decode = |field: &str, what| b64.decode(field).map_err(|_| bad(what));
        let mut fields = line.split(' ');
        let kind = fields.next().unwrap_or_default();
        let rest: Vec<&str> = fields.collect();
        match (kind, rest.as_slice()) {
            ("manager", [m @ ("apt" | "dnf")]) => manager = Some(m.to_string()),
            ("manager", _) => return Err(bad("not `apt` or `dnf`")),
            ("arch", [a]) if !a.is_empty() => architectures.push(a.to_string()),
            ("arch", _) => return Err(bad("expected one architecture")),
            ("source" | "key", [path, data]) => {
                let path =
                    String::from_utf8_lossy(&decode(path, "the path is not base64")?).into_owned();
                let bytes = decode(data, "the data is not base64")?;
                if kind == "source" {
                    files.push(SourceFile {
                        path,
                        text: String::from_utf8_lossy(&bytes).into_owned(),
                    });
                } else {
                    keys.push(KeyFile {
                        path,
                        sha256: hex::encode(Sha256::digest(&bytes)),
                        data: data.to_string(),
                    });
                }
            }
            ("unreadable", [path]) => unreadable.push(
                String::from_utf8_lossy(&decode(path, "the path is not base64")?).into_owned(),
            ),
            ("source" | "key" | "unreadable", _) => {
                return Err(bad("expected a base64 path and data"));
            }
            _ => return Err(bad("unknown kind of line")),
        }
    }
    let Some(manager) = manager else {
        return Ok(None);
    };
    files.sort_by(|a, b| a.path.cmp(&b.path));
    keys.sort_by(|a, b| a.path.cmp(&b.path));
    unreadable.sort();
    Ok(Some(ReadSources {
        sources: PackageSources {
            manager,
            architectures,
            files,
            keys,
        },
        unreadable,
    }))
}

/// The guest command whose output [`parse_packages`] reads for `dpkg`: every package dpkg
/// knows, with its status first (`ii `, `rc `, `hi `, …), because `-W` also lists packages that
/// were removed but not purged (`rc`: only their configuration files are left).
pub const DPKG_QUERY: &str =
    r"dpkg-query -W -f '${db:Status-Abbrev}\t${Package}\t${Version}\t${Architecture}\n'";
/// The guest command whose output [`parse_packages`] reads for `rpm` (it lists only
/// installed packages). The version is rpm's EVR, `EPOCH:VERSION-RELEASE`, the epoch and its
/// `:` only when the package has one (`%|EPOCH?{…}:{}|`): without it `1:2.0-1` would record
/// as `2.0-1` and compare below a repository's `1:1.0-1`.
pub const RPM_QUERY: &str =
    r"rpm -qa --qf '%{NAME}\t%|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE}\t%{ARCH}\n'";

/// Read the output of [`DPKG_QUERY`] (`status\tname\tversion\tarch` per line) or
/// [`RPM_QUERY`] (`name\t[epoch:]version-release\tarch`) into a list sorted by name. For dpkg, only the
/// packages whose status is *installed* count: `ii`, and `hi` for one on hold; removed ones
/// (`rc`), half-installed or only unpacked ones are not in the image as packages. `manager`
/// is recorded as given (`dpkg` or `rpm`).
pub fn parse_packages(manager: &str, output: &str) -> Result<PackageList, PackageLineError> {
    let mut packages = Vec::new();
    for (i, line) in output.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = || PackageLineError {
            manager: manager.to_string(),
            line: i + 1,
            text: line.chars().take(120).collect(),
        };
        let mut fields = line.split('\t');
        if manager == "dpkg" {
            // `db:Status-Abbrev`: three letters, the desired action (`uihrp`), the status
            // (`ncHUFWti`) and the error flag (a space or `R`).
            let status: Vec<char> = fields.next().ok_or_else(bad)?.chars().collect();
            let [wanted, state, flag] = status[..] else {
                return Err(bad());
            };
            if !"uihrp".contains(wanted) || !"ncHUFWti".contains(state) || !" R".contains(flag) {
                return Err(bad());
            }
            if state != 'i' {
                continue;
            }
        }
        let (Some(name), Some(version), Some(arch), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(bad());
        };
        if name.is_empty() {
            return Err(bad());
        }
        packages.push(Package {
            name: name.to_string(),
            version: version.to_string(),
            arch: arch.to_string(),
        });
    }
    packages.sort();
    Ok(PackageList {
        manager: manager.to_string(),
        packages,
    })
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
now() {{ date +%s%N 2>/dev/null || echo 0; }}
run() {{
  echo "+ $*"; t0=$(now)
  "$@" || echo "warning: \`$*\` failed with status $?" >&2
  echo "  ($(( ($(now) - t0) / 1000000 )) ms)"
}}
has() {{ command -v "$1" >/dev/null 2>&1; }}
{seal_part}# The agent and its unit (enabled by a hand-made link, removed with it): it keeps running
# from memory until the power-off. No `systemctl disable` or daemon-reload: the guest powers
# off next, and each reload costs seconds under TCG.
run rm -rf {agent_paths}
# Free blocks back to the disk (the VM runs with discard=unmap), so the export is small.
if has fstrim; then run fstrim -av; fi
run sync
"#
    )
}

/// The sealing part of [`script`].
const SEAL: &str = r#"# cloud-init: forget this instance, its logs and the seed it came from, so the next boot is a
# first boot that reads the next machine's seed. With the default paths and no clean.d hooks
# (executables; Debian ships a README there)
# this is what `cloud-init clean --logs --seed` does, without starting Python (10 s under a
# loaded TCG); otherwise cloud-init's own command, which knows its configuration. (Logs
# elsewhere under /var/log are emptied below anyway.)
if has cloud-init; then
  dirs=$(grep -hs '^[[:space:]]*cloud_dir:' /etc/cloud/cloud.cfg /etc/cloud/cloud.cfg.d/*.cfg \
    | awk '{print $2}' | tr -d "'\"" | sed 's:/*$::' | sort -u)
  hooks=$(find /etc/cloud/clean.d -maxdepth 1 -type f -perm /111 2>/dev/null)
  if [ -z "$hooks" ] && [ -z "${dirs#/var/lib/cloud}" ]; then
    run sh -c 'rm -rf /var/lib/cloud/* /var/log/cloud-init.log /var/log/cloud-init-output.log'
  else
    run cloud-init clean --logs --seed
  fi
fi
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

/// The checks, as `check<TAB>name<TAB>ok|fail<TAB>detail` lines; without `seal`, only the
/// agent's. Run at the end of [`script`], in the same exec.
fn verify_script(seal: bool) -> String {
    let agent_paths = AGENT_INSTALLED_PATHS.join(" ");
    format!(
        r#"set -u
check() {{ if eval "$2"; then printf 'check\t%s\tok\t%s\n' "$1" "$3"; else printf 'check\t%s\tfail\t%s\n' "$1" "$4"; fi; }}
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

/// Forwards output to the build log and keeps stdout for the check lines.
struct Tee<'a> {
    log: &'a dyn OutputSink,
    stdout: Capture,
}

impl OutputSink for Tee<'_> {
    fn output(&self, stream: OutputStream, data: &[u8]) {
        self.log.output(stream, data);
        if stream == OutputStream::Stdout {
            self.stdout.output(stream, data);
        }
    }
}

/// Run the clean-up script and then the checks, in one exec (its output to `sink`), and
/// report the checks. `seal`: the recipe's `generalize`.
pub async fn generalize(
    target: &dyn Machine,
    sink: &dyn OutputSink,
    seal: bool,
) -> Result<Generalized, GeneralizeError> {
    let tee = Tee {
        log: sink,
        stdout: Capture::default(),
    };
    let body = format!("{}\n{}", script(seal), verify_script(seal));
    let outcome = target
        .exec(
            &ExecRequest::bash(body).with_timeout(Some(SCRIPT_TIMEOUT)),
            &tee,
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
    let checks = parse_checks(&String::from_utf8_lossy(&tee.stdout.stdout()));
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
            let mut parts = line.strip_prefix("check\t")?.splitn(3, '\t');
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
            "check\tmachine-id\tok\tempty\ncheck\tssh-host-keys\tfail\tstill there: /etc/ssh/ssh_host_rsa_key \nnoise\nname\tok\tnot a check line\n",
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

    /// What `DPKG_QUERY` prints, run by the real `dpkg-query` on a status database with one
    /// package in each state a guest can have: installed, removed with its configuration kept
    /// (`rc`), held, half-installed with reinstall required, purged, only unpacked.
    const DPKG_STATUS: &str = "Package: bash\nEssential: yes\nStatus: install ok installed\nPriority: required\nSection: shells\nMaintainer: Matthias Klose <doko@debian.org>\nArchitecture: amd64\nMulti-Arch: foreign\nVersion: 5.2.15-2+b7\nDescription: GNU Bourne Again SHell\n\nPackage: nginx\nStatus: deinstall ok config-files\nPriority: optional\nSection: httpd\nMaintainer: Debian Nginx Maintainers <pkg-nginx-maintainers@alioth-lists.debian.net>\nArchitecture: amd64\nVersion: 1.22.1-9\nConffiles:\n /etc/nginx/nginx.conf 0a1ef1d8e2f1d3f6f3d5f1d1e0e1d1f1\nDescription: small, powerful, scalable web/proxy server\n\nPackage: libc6\nStatus: hold ok installed\nPriority: optional\nSection: libs\nMaintainer: GNU Libc Maintainers <debian-glibc@lists.debian.org>\nArchitecture: i386\nMulti-Arch: same\nVersion: 2.36-9+deb12u7\nDescription: GNU C Library: Shared libraries\n\nPackage: broken\nStatus: install reinstreq half-installed\nPriority: optional\nSection: misc\nMaintainer: Someone <a@example.org>\nArchitecture: all\nVersion: 1.0\nDescription: half\n\nPackage: gone\nStatus: purge ok not-installed\nPriority: optional\nSection: misc\nArchitecture: all\nDescription: purged\n\nPackage: unpacked\nStatus: install ok unpacked\nPriority: optional\nSection: misc\nMaintainer: Someone <a@example.org>\nArchitecture: amd64\nVersion: 2.0\nDescription: unpacked only\n";

    /// The output of `DPKG_QUERY` on [`DPKG_STATUS`] (dpkg-query 1.21.22, Debian 12).
    const DPKG_OUTPUT: &str = "ii \tbash\t5.2.15-2+b7\tamd64\niHR\tbroken\t1.0\tall\nhi \tlibc6\t2.36-9+deb12u7\ti386\nrc \tnginx\t1.22.1-9\tamd64\niU \tunpacked\t2.0\tamd64\n";

    #[test]
    fn dpkg_counts_only_installed_packages() {
        let list = parse_packages("dpkg", DPKG_OUTPUT).expect("parses");
        assert_eq!(list.manager, "dpkg");
        let names: Vec<(&str, &str, &str)> = list
            .packages
            .iter()
            .map(|p| (p.name.as_str(), p.version.as_str(), p.arch.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("bash", "5.2.15-2+b7", "amd64"),
                ("libc6", "2.36-9+deb12u7", "i386")
            ]
        );
        let e = parse_packages("dpkg", "bash\t5.2\tamd64\n").expect_err("no status");
        assert!(e.to_string().contains("line 1"), "{e}");
    }

    /// The real `dpkg-query` (dpkg is essential on Debian, where builder runs) prints what
    /// [`DPKG_OUTPUT`] holds, so the parser is tested against the real shape.
    #[test]
    fn dpkg_query_prints_the_shape_the_parser_reads() {
        let dir = tempfile::tempdir().expect("temp dir");
        fs_err::write(dir.path().join("status"), DPKG_STATUS).expect("status");
        fs_err::write(dir.path().join("available"), "").expect("available");
        fs_err::create_dir(dir.path().join("updates")).expect("updates");
        let format = DPKG_QUERY
            .split_once("-f '")
            .and_then(|(_, f)| f.strip_suffix('\''))
            .expect("DPKG_QUERY has a -f '…' format");
        let out = std::process::Command::new("dpkg-query")
            .arg(format!("--admindir={}", dir.path().display()))
            .args(["-W", "-f", format])
            .output()
            .expect("dpkg-query runs (install dpkg)");
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).expect("UTF-8");
        assert_eq!(text, DPKG_OUTPUT);
    }

    #[test]
    fn rpm_output_parses_and_bad_lines_name_their_line() {
        let out = "gpg-pubkey\t5a6340b3-6229229e\t(none)\nbash\t5.1.8-9.el9\tx86_64\n\
                   openssl-libs\t1:3.0.7-27.el9\tx86_64\n";
        let list = parse_packages("rpm", out).expect("parses");
        assert_eq!(list.packages[0].arch, "x86_64");
        assert_eq!(list.packages[1].arch, "(none)");
        // The epoch is kept: it is what the check compares first.
        assert_eq!(list.packages[2].name, "openssl-libs");
        assert_eq!(list.packages[2].version, "1:3.0.7-27.el9");
        assert_eq!(list.packages[0].version, "5.1.8-9.el9");

        let e = parse_packages("rpm", "bash\t5.1\tx86_64\nbroken line\n").expect_err("bad");
        assert!(e.to_string().contains("line 2"), "{e}");
        let e = parse_packages("dpkg", "a\tb\tc\td\n").expect_err("four fields");
        assert!(e.to_string().contains("line 1"), "{e}");
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn sources_listing_parses_sorted_with_key_digests() {
        let deb822 = "Types: deb\nURIs: http://deb.example.org/debian\nSuites: bookworm\n\
                      Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n";
        let key: &[u8] = b"\x99\x02\x0d\x04binary key";
        let listing = format!(
            "manager apt\narch amd64\narch i386\n\
             source {} {}\nsource {} {}\nkey {} {}\nkey {} \nunreadable {}\n",
            b64(b"/etc/apt/sources.list.d/debian.sources"),
            b64(deb822.as_bytes()),
            b64(b"/etc/apt/sources.list"),
            b64(b""),
            b64(b"/usr/share/keyrings/debian-archive-keyring.gpg"),
            b64(key),
            b64(b"/etc/apt/keyrings/a key with spaces.asc"),
            b64(b"/etc/apt/trusted.gpg.d/secret.gpg"),
        );
        let read = parse_sources(&listing).expect("parses").expect("apt");
        let s = &read.sources;
        assert_eq!(s.manager, "apt");
        assert_eq!(s.architectures, ["amd64", "i386"]);
        let paths: Vec<&str> = s.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/etc/apt/sources.list",
                "/etc/apt/sources.list.d/debian.sources"
            ]
        );
        assert_eq!(s.files[0].text, "");
        assert_eq!(s.files[1].text, deb822);
        let keys: Vec<(&str, &str)> = s
            .keys
            .iter()
            .map(|k| (k.path.as_str(), k.sha256.as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                (
                    "/etc/apt/keyrings/a key with spaces.asc",
                    // sha256 of nothing: the file is empty.
                    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
                ),
                (
                    "/usr/share/keyrings/debian-archive-keyring.gpg",
                    hex::encode(Sha256::digest(key)).as_str()
                ),
            ]
        );
        assert_eq!(s.keys[1].data, b64(key));
        assert_eq!(read.unreadable, ["/etc/apt/trusted.gpg.d/secret.gpg"]);
    }

    #[test]
    fn sources_listing_without_a_manager_is_none_and_bad_lines_name_their_line() {
        assert_eq!(parse_sources("").expect("empty"), None);
        let bad = [
            ("manager apt\nsource !!! AAAA\n", 2, "not base64"),
            ("manager zypper\n", 1, "not `apt` or `dnf`"),
            ("manager dnf\narch \n", 2, "one architecture"),
            ("manager apt\nkey QUJD\n", 2, "a base64 path and data"),
            ("manager apt\n\nfile QUJD QUJD\n", 3, "unknown kind"),
        ];
        for (listing, line, problem) in bad {
            let e = parse_sources(listing).expect_err(listing);
            let text = e.to_string();
            assert!(text.contains(&format!("line {line}:")), "{text}");
            assert!(text.contains(problem), "{text}");
        }
    }

    /// Without dpkg (nor `/etc/yum.repos.d`, which a Debian host lacks) the script says
    /// nothing: no sources, no error. With dpkg but no base64 it fails saying why.
    #[test]
    fn sources_script_without_a_manager_or_without_base64() {
        let bin = tempfile::tempdir().expect("temp dir");
        let run = || {
            std::process::Command::new("/bin/bash")
                .args(["-c", SOURCES_SCRIPT])
                .env("PATH", bin.path())
                .output()
                .expect("bash runs")
        };
        let out = run();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            parse_sources(&String::from_utf8_lossy(&out.stdout)).expect("parses"),
            None
        );
        fs_err::os::unix::fs::symlink("/usr/bin/dpkg", bin.path().join("dpkg")).expect("link");
        let out = run();
        assert_eq!(out.status.code(), Some(3), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("base64 (coreutils) is not in the image"),
            "{out:?}"
        );
    }

    /// The real script, run by bash on this Debian host (builder runs on Debian: dpkg is
    /// there), lists the host's own apt sources and keys: what it sends is what the files
    /// hold, byte for byte, and the native architecture comes first.
    #[test]
    fn sources_script_sends_the_files_as_they_are() {
        let out = std::process::Command::new("bash")
            .args(["-c", SOURCES_SCRIPT])
            .output()
            .expect("bash runs");
        assert!(out.status.success(), "{out:?}");
        let read = parse_sources(&String::from_utf8_lossy(&out.stdout))
            .expect("parses")
            .expect("this host has dpkg");
        let native = std::process::Command::new("dpkg")
            .arg("--print-architecture")
            .output()
            .expect("dpkg runs");
        assert_eq!(
            read.sources.architectures.first().map(String::as_str),
            Some(String::from_utf8_lossy(&native.stdout).trim())
        );
        assert!(!read.sources.files.is_empty(), "apt has sources here");
        for f in &read.sources.files {
            let text = fs_err::read_to_string(&f.path).expect("readable");
            assert_eq!(f.text, text, "{}", f.path);
        }
        for k in &read.sources.keys {
            let bytes = fs_err::read(&k.path).expect("readable");
            assert_eq!(k.data, b64(&bytes), "{}", k.path);
            assert_eq!(k.sha256, hex::encode(Sha256::digest(&bytes)));
        }
        assert!(read.unreadable.is_empty(), "{:?}", read.unreadable);
    }
}
