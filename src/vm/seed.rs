//! The cloud-init NoCloud seed: a small vfat volume labelled `CIDATA`, written in-process
//! with `fatfs` (no mkisofs, xorriso or cloud-localds needed), carrying `meta-data`,
//! `user-data`, optionally `network-config`, and our guest agent binary.
//!
//! How the agent starts: cloud-init's `bootcmd` is the earliest hook it offers (its network
//! stage, about 30-35 s into a TCG boot). Our bootcmd copies the agent from the seed to the
//! disk and installs a systemd unit that starts it at once; on later boots (a Reboot step)
//! systemd starts the unit early in `sysinit`, well before cloud-init, and the bootcmd sees it
//! running and does nothing. Without systemd, the bootcmd starts the agent detached on every
//! boot. The generalize stage removes [`AGENT_INSTALLED_PATHS`].
//!
//! A build VM needs less of cloud-init than the image's real first boot ([`CloudInitScope`]):
//! without user data, its config and final stages have nothing to do for the build (their
//! state is wiped by generalization anyway) but cost 20-40 s under TCG, mostly Python
//! starting twice; the bootcmd cancels their queued start jobs on every boot, so the guest is
//! ready for steps once the boot is over and the init stages have ended
//! ([`crate::vm::session`] waits for exactly that).
//! The init stage also skips growpart/resizefs when the disk was not grown and makes only an
//! ed25519 SSH host key (generalization deletes them all).
//!
//! Nothing secret ever goes on the seed: secrets travel over the agent channel.

use std::io::Write;
use std::path::Path;

/// File name of the agent on the seed volume.
pub const AGENT_FILE: &str = "builder-agent";
/// The virtio-serial port name our agent opens (`/dev/virtio-ports/<name>`).
pub const AGENT_PORT: &str = "org.builder.agent.0";
/// The port name qemu-guest-agent opens.
pub const QGA_PORT: &str = "org.qemu.guest_agent.0";
/// What the bootcmd installs in the guest; generalization removes these.
pub const AGENT_INSTALLED_PATHS: &[&str] = &[
    "/usr/local/lib/builder-agent",
    "/etc/systemd/system/builder-agent.service",
    "/etc/systemd/system/sysinit.target.wants/builder-agent.service",
];

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// The user's own user data is not something we can combine with ours.
    #[error(
        "user data must start with `#cloud-config`, `#!` (a script) or `#cloud-boothook`; it starts with {first_line:?}"
    )]
    UnsupportedUserData { first_line: String },
    #[error("could not write the seed volume {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// How much of cloud-init a boot with this seed runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CloudInitScope {
    /// What the image's cloud-init does on a first boot (the test VM, `builder vm`).
    #[default]
    Full,
    /// A throwaway build VM. Without user data: the init stage only (growpart and resizefs
    /// only when `grow_root`, an ed25519 host key only), the config and final stages
    /// cancelled. With user data: everything, as [`CloudInitScope::Full`], since the user's
    /// data may need any stage.
    Build { grow_root: bool },
}

impl CloudInitScope {
    /// Whether cloud-init's config and final stages are cancelled for a seed with (or
    /// without) user data: readiness is then the end of the init stage.
    pub fn cancels_later_stages(self, has_user_data: bool) -> bool {
        matches!(self, CloudInitScope::Build { .. }) && !has_user_data
    }
}

/// What goes on the seed.
#[derive(Debug, Clone)]
pub struct SeedContent {
    /// cloud-init's instance id; the same id across reboots of one VM.
    pub instance_id: String,
    pub hostname: String,
    /// The agent executable to carry; `None` for a seed without our agent.
    pub agent: Option<Vec<u8>>,
    /// The user's own user data, combined with ours.
    pub user_data: Option<String>,
    /// Write a `network-config` that turns cloud-init's networking off (no network card).
    pub network_disabled: bool,
}

/// The bootcmd script, run by `sh -c` on every boot; [`our_cloud_config`] sets `cancel` in
/// front of it (`yes` to cancel cloud-init's config and final stages).
const BOOTCMD: &str = r#"set -u
unit=builder-agent.service
bin=/usr/local/lib/builder-agent/builder-agent
systemd=false; [ -d /run/systemd/system ] && systemd=true
if [ "$cancel" = yes ] && $systemd; then
  # Replaces their queued start jobs with stop jobs: they never run this boot.
  systemctl stop --no-block cloud-config.service cloud-final.service || true
fi
# A later boot: systemd knows the unit (it started the agent early in sysinit and restarts
# it), or an agent runs anyway. A second agent would fight the first for the port, so any
# sign of one is enough (systemctl can time out on a loaded TCG guest).
if $systemd && [ "$(systemctl show -p LoadState --value "$unit" 2>/dev/null)" = loaded ]; then
  exit 0
fi
for comm in /proc/[0-9]*/comm; do
  [ "$(cat "$comm" 2>/dev/null)" = builder-agent ] && exit 0
done
mnt=$(mktemp -d)
dev=$(blkid -L CIDATA 2>/dev/null || echo /dev/disk/by-label/CIDATA)
if ! mount -o ro "$dev" "$mnt"; then
  rmdir "$mnt"; echo "builder: cannot mount the CIDATA seed ($dev)" >&2; exit 1
fi
mkdir -p /usr/local/lib/builder-agent
cp "$mnt/builder-agent" "$bin.new" && chmod 0755 "$bin.new" && mv -f "$bin.new" "$bin"
umount "$mnt"; rmdir "$mnt"
if $systemd; then
  # This boot: a transient unit starts the agent at once (a daemon-reload first would cost
  # seconds under TCG). Later boots (a Reboot step): the unit file below, enabled by hand,
  # starts it early in sysinit.
  if ! systemd-run --quiet --unit=builder-agent-first-boot -p DefaultDependencies=no \
      -p Conflicts=shutdown.target -p Before=shutdown.target -p Restart=always -p RestartSec=1 \
      "$bin"; then
    fallback=yes
  fi
  cat > /etc/systemd/system/$unit <<'UNIT'
[Unit]
Description=builder guest agent (removed when the image is generalized)
DefaultDependencies=no
Conflicts=shutdown.target
Before=shutdown.target
StartLimitIntervalSec=0

[Service]
ExecStart=/usr/local/lib/builder-agent/builder-agent
Restart=always
RestartSec=1

[Install]
WantedBy=sysinit.target
UNIT
  mkdir -p /etc/systemd/system/sysinit.target.wants
  ln -sf ../$unit /etc/systemd/system/sysinit.target.wants/$unit
  if [ "${fallback:-no}" = yes ]; then
    systemctl daemon-reload
    systemctl start --no-block "$unit"
  fi
else
  setsid "$bin" </dev/null >/dev/null 2>&1 &
fi
"#;

/// Our own `#cloud-config` document. `minimal`: a build VM without user data (see
/// [`CloudInitScope::Build`]).
fn our_cloud_config(with_agent: bool, scope: CloudInitScope, has_user_data: bool) -> String {
    let mut doc = String::from(
        "#cloud-config\n\
         # Written by builder for a throwaway build VM.\n\
         manage_etc_hosts: true\n",
    );
    let cancel = scope.cancels_later_stages(has_user_data);
    if let (true, CloudInitScope::Build { grow_root }) = (cancel, scope) {
        // Set only without user data: our part wins a merge (`no_replace`), and these must
        // never override what a user asked for.
        doc.push_str("ssh_genkeytypes: [ed25519]\nssh_quiet_keygen: true\n");
        if !grow_root {
            doc.push_str("growpart:\n  mode: \"off\"\nresize_rootfs: false\n");
        }
    }
    if with_agent {
        doc.push_str("bootcmd:\n  - - sh\n    - -c\n    - |\n");
        doc.push_str(if cancel {
            "      cancel=yes\n"
        } else {
            "      cancel=no\n"
        });
        for line in BOOTCMD.lines() {
            if line.is_empty() {
                doc.push('\n');
            } else {
                doc.push_str("      ");
                doc.push_str(line);
                doc.push('\n');
            }
        }
    }
    doc
}

/// The MIME type cloud-init knows a user-data part by, from its first line.
fn part_type(user_data: &str) -> Result<&'static str, SeedError> {
    let first = user_data.lines().next().unwrap_or("").trim_end();
    if first == "#cloud-config" {
        Ok("text/cloud-config")
    } else if first == "#cloud-boothook" {
        Ok("text/cloud-boothook")
    } else if first.starts_with("#!") {
        Ok("text/x-shellscript")
    } else {
        Err(SeedError::UnsupportedUserData {
            first_line: first.chars().take(60).collect(),
        })
    }
}

/// The `user-data` file: ours alone, or a MIME multipart with ours first and the user's
/// second. The user's cloud-config part is merged with `list(append)` and
/// `dict(no_replace,recurse_list)`, so its `bootcmd`, `runcmd` and `packages` are appended to
/// ours instead of replacing our agent's bootcmd.
pub fn user_data(content: &SeedContent, scope: CloudInitScope) -> Result<String, SeedError> {
    let ours = our_cloud_config(content.agent.is_some(), scope, content.user_data.is_some());
    let Some(theirs) = &content.user_data else {
        return Ok(ours);
    };
    let kind = part_type(theirs)?;
    // A boundary that occurs in neither document.
    let mut boundary = format!("==builder-{}==", uuid::Uuid::new_v4().simple());
    while theirs.contains(&boundary) {
        boundary = format!("==builder-{}==", uuid::Uuid::new_v4().simple());
    }
    let mut out =
        format!("Content-Type: multipart/mixed; boundary=\"{boundary}\"\nMIME-Version: 1.0\n\n");
    out.push_str(&format!(
        "--{boundary}\nContent-Type: text/cloud-config; charset=\"utf-8\"\nMIME-Version: 1.0\nContent-Transfer-Encoding: 8bit\nContent-Disposition: attachment; filename=\"builder.cfg\"\n\n{ours}\n"
    ));
    out.push_str(&format!(
        "--{boundary}\nContent-Type: {kind}; charset=\"utf-8\"\nMIME-Version: 1.0\nContent-Transfer-Encoding: 8bit\nContent-Disposition: attachment; filename=\"user-data\"\n"
    ));
    if kind == "text/cloud-config" {
        out.push_str("Merge-Type: list(append)+dict(no_replace,recurse_list)+str()\n");
    }
    out.push('\n');
    out.push_str(theirs);
    if !theirs.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(&format!("--{boundary}--\n"));
    Ok(out)
}

/// sha256 of what builder puts in a build VM's guest before the first component runs: the
/// agent executable and our cloud-config (the bootcmd that installs and starts the agent,
/// the readiness steps), in every scope a build uses. Part of the layer cache's root key: a
/// new agent or new readiness steps make new layers.
pub fn guest_digest() -> &'static str {
    static DIGEST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DIGEST.get_or_init(guest_digest_uncached)
}

fn guest_digest_uncached() -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(crate::agent::AGENT_BINARY);
    for grow_root in [false, true] {
        for has_user_data in [false, true] {
            hasher.update(b"\n");
            hasher.update(our_cloud_config(
                true,
                CloudInitScope::Build { grow_root },
                has_user_data,
            ));
        }
    }
    hasher.update(NETWORK_DISABLED);
    hex::encode(hasher.finalize())
}

fn meta_data(content: &SeedContent) -> String {
    // Both values are ours (a uuid and a fixed name), never user text, so plain lines are
    // valid YAML.
    format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        content.instance_id, content.hostname
    )
}

const NETWORK_DISABLED: &str = "network:\n  config: disabled\n";

/// Write the seed volume to `path` (under a temporary name, renamed when complete), for a
/// full cloud-init first boot.
pub fn write_seed(path: &Path, content: &SeedContent) -> Result<(), SeedError> {
    write_seed_scoped(path, content, CloudInitScope::Full)
}

/// [`write_seed`] with cloud-init limited to `scope`.
pub fn write_seed_scoped(
    path: &Path,
    content: &SeedContent,
    scope: CloudInitScope,
) -> Result<(), SeedError> {
    let user_data = user_data(content, scope)?;
    let err = |source| SeedError::Write {
        path: path.display().to_string(),
        source,
    };
    let meta = meta_data(content);
    let mut files: Vec<(&str, &[u8])> = vec![
        ("meta-data", meta.as_bytes()),
        ("user-data", user_data.as_bytes()),
    ];
    if content.network_disabled {
        files.push(("network-config", NETWORK_DISABLED.as_bytes()));
    }
    if let Some(agent) = &content.agent {
        files.push((AGENT_FILE, agent));
    }
    let payload: u64 = files.iter().map(|(_, d)| d.len() as u64).sum();
    // Room for the FAT structures and cluster slack; whole MiB.
    let size = (payload + (2 << 20)).div_ceil(1 << 20) * (1 << 20);

    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".seed-")
        .tempfile_in(dir)
        .map_err(err)?;
    {
        let file = tmp.as_file().try_clone().map_err(err)?;
        file.set_len(size).map_err(err)?;
        let mut buf = fscommon::BufStream::new(file);
        fatfs::format_volume(
            &mut buf,
            fatfs::FormatVolumeOptions::new().volume_label(*b"CIDATA     "),
        )
        .map_err(err)?;
        let fs = fatfs::FileSystem::new(buf, fatfs::FsOptions::new()).map_err(err)?;
        {
            let root = fs.root_dir();
            for (name, data) in &files {
                let mut f = root.create_file(name).map_err(err)?;
                f.truncate().map_err(err)?;
                f.write_all(data).map_err(err)?;
                f.flush().map_err(err)?;
            }
        }
        fs.unmount().map_err(err)?;
    }
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn content() -> SeedContent {
        SeedContent {
            instance_id: "builder-test".into(),
            hostname: "builder".into(),
            agent: Some(b"\x7fELF pretend agent".repeat(1000)),
            user_data: None,
            network_disabled: true,
        }
    }

    fn tool(name: &str) -> bool {
        Command::new(name).arg("--help").output().is_ok()
            || Path::new("/usr/sbin").join(name).exists()
    }

    #[test]
    fn seed_is_a_clean_cidata_vfat_with_long_names() {
        let dir = tempfile::tempdir().expect("temp dir");
        let seed = dir.path().join("seed.img");
        let c = content();
        write_seed(&seed, &c).expect("seed written");

        // fsck.vfat (dosfstools) is the oracle; the test fails if it is missing rather than
        // pass without checking.
        assert!(
            tool("fsck.vfat"),
            "fsck.vfat (dosfstools) is needed for this test"
        );
        let fsck = Command::new("fsck.vfat")
            .arg("-n")
            .arg(&seed)
            .output()
            .expect("run fsck.vfat");
        assert!(
            fsck.status.success(),
            "fsck.vfat -n: {}{}",
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        );

        // Read it back with fatfs: label and every file under its long name.
        let f = fs_err::File::open(&seed).expect("open");
        let fs = fatfs::FileSystem::new(fscommon::BufStream::new(f), fatfs::FsOptions::new())
            .expect("mount");
        assert_eq!(fs.volume_label(), "CIDATA");
        let mut names: Vec<String> = fs
            .root_dir()
            .iter()
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec!["builder-agent", "meta-data", "network-config", "user-data"]
        );
        let read = |name: &str| {
            let mut v = Vec::new();
            std::io::Read::read_to_end(
                &mut fs.root_dir().open_file(name).expect("file exists"),
                &mut v,
            )
            .expect("read");
            v
        };
        assert_eq!(read("builder-agent"), c.agent.clone().expect("set"));
        assert_eq!(
            String::from_utf8(read("meta-data")).expect("utf-8"),
            "instance-id: builder-test\nlocal-hostname: builder\n"
        );
        let ud = String::from_utf8(read("user-data")).expect("utf-8");
        assert!(ud.starts_with("#cloud-config\n"));
        assert!(ud.contains("manage_etc_hosts: true"));
        assert!(ud.contains("mount -o ro"));
        // No temporary file left next to the seed.
        assert_eq!(fs_err::read_dir(dir.path()).expect("ls").count(), 1);
    }

    #[test]
    fn user_cloud_config_is_a_second_part_appended_to_ours() {
        let mut c = content();
        c.user_data =
            Some("#cloud-config\nruncmd:\n  - [touch, /root/hello]\npackages: [jq]\n".into());
        let ud = user_data(&c, CloudInitScope::Build { grow_root: false }).expect("combined");
        assert!(ud.starts_with("Content-Type: multipart/mixed; boundary=\""));
        let parts: Vec<&str> = ud.split("\n--==builder-").collect();
        assert_eq!(parts.len(), 4, "preamble, two parts, closing: {ud}");
        assert!(
            parts[1].contains("Content-Type: text/cloud-config") && parts[1].contains("bootcmd:")
        );
        assert!(parts[2].contains("Merge-Type: list(append)+dict(no_replace,recurse_list)+str()"));
        assert!(parts[2].contains("runcmd:\n  - [touch, /root/hello]"));
        assert!(parts[3].ends_with("--\n"));
    }

    #[test]
    fn user_scripts_are_shell_parts_and_other_data_is_refused() {
        let mut c = content();
        c.user_data = Some("#!/bin/sh\necho hi\n".into());
        assert!(
            user_data(&c, CloudInitScope::Full)
                .expect("script")
                .contains("Content-Type: text/x-shellscript")
        );
        c.user_data = Some("hello: world\n".into());
        let e = user_data(&c, CloudInitScope::Full).expect_err("refused");
        assert!(e.to_string().contains("\"hello: world\""), "{e}");
    }

    fn scalars(doc: &str) -> Vec<String> {
        let parser = saphyr_parser::Parser::new_from_str(doc);
        let mut scalars = Vec::new();
        for event in parser {
            let (ev, _) = event.unwrap_or_else(|e| panic!("not YAML ({e}):\n{doc}"));
            if let saphyr_parser::Event::Scalar(s, ..) = ev {
                scalars.push(s.to_string());
            }
        }
        scalars
    }

    #[test]
    fn our_cloud_config_is_valid_yaml_with_the_script_intact() {
        for (scope, with_user_data, cancel) in [
            (CloudInitScope::Full, false, "no"),
            (CloudInitScope::Build { grow_root: true }, false, "yes"),
            (CloudInitScope::Build { grow_root: false }, false, "yes"),
            (CloudInitScope::Build { grow_root: false }, true, "no"),
        ] {
            let doc = our_cloud_config(true, scope, with_user_data);
            // Parse with the project's YAML reader: the bootcmd is a list whose item is
            // [sh, -c, script] and the script survives the block scalar unchanged.
            let scalars = scalars(&doc);
            let i = scalars.iter().position(|s| s == "-c").expect("-c present");
            assert_eq!(scalars[i - 1], "sh");
            assert_eq!(scalars[i + 1], format!("cancel={cancel}\n{BOOTCMD}"));
        }
    }

    /// The build VM's trimmed cloud-init only without user data (ours wins a merge, so it must
    /// never override the user's), and growpart stays on when the disk was grown.
    #[test]
    fn build_scope_trims_cloud_init_only_without_user_data() {
        let keys = |doc: &str| {
            let s = scalars(doc);
            let has = |k: &str| s.iter().any(|x| x == k);
            (
                has("ssh_genkeytypes"),
                has("growpart"),
                has("resize_rootfs"),
            )
        };
        let full = our_cloud_config(true, CloudInitScope::Full, false);
        assert_eq!(keys(&full), (false, false, false));
        let small = our_cloud_config(true, CloudInitScope::Build { grow_root: false }, false);
        assert_eq!(keys(&small), (true, true, true));
        let s = scalars(&small);
        let mode = s.iter().position(|x| x == "mode").expect("growpart mode");
        assert_eq!(s[mode + 1], "off", "a string, not YAML 1.1's boolean");
        let grown = our_cloud_config(true, CloudInitScope::Build { grow_root: true }, false);
        assert_eq!(keys(&grown), (true, false, false));
        let theirs = our_cloud_config(true, CloudInitScope::Build { grow_root: false }, true);
        assert_eq!(keys(&theirs), (false, false, false));
        assert!(CloudInitScope::Build { grow_root: true }.cancels_later_stages(false));
        assert!(!CloudInitScope::Build { grow_root: true }.cancels_later_stages(true));
        assert!(!CloudInitScope::Full.cancels_later_stages(false));
    }

    /// The bootcmd as the guest's `sh` runs it: it parses, and with `cancel=yes` its first
    /// command cancels the config and final stages (checked with a `systemctl` stand-in).
    #[test]
    fn bootcmd_parses_in_sh_and_cancels_the_later_stages() {
        let doc = our_cloud_config(true, CloudInitScope::Build { grow_root: false }, false);
        let s = scalars(&doc);
        let script = &s[s.iter().position(|x| x == "-c").expect("-c") + 1];
        let status = Command::new("sh")
            .args(["-n", "-c", script])
            .status()
            .expect("sh runs");
        assert!(status.success(), "sh -n rejected:\n{script}");
        let cancel = script
            .lines()
            .find(|l| l.contains("systemctl stop"))
            .expect("a stop line");
        assert!(
            cancel.contains("cloud-config.service cloud-final.service"),
            "{cancel}"
        );
    }
}
