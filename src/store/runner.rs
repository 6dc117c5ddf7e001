//! The process doing something in the store: a build, or a pipeline execution. Named by pid,
//! host and the process's start time, so a later builder tells a dead one from a live one
//! without mistaking a recycled pid for it. Build locks (`staging/<id>/build.json`) and the
//! pipeline history record it the same way.

use serde::{Deserialize, Serialize};

/// The process running a build or an execution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Runner {
    pub pid: u32,
    pub host: String,
    /// The process's start time in clock ticks since boot (`/proc/<pid>/stat` field 22), so a
    /// recycled pid is not mistaken for the runner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_ticks: Option<u64>,
}

impl Runner {
    /// This process.
    pub fn current() -> Runner {
        let pid = std::process::id();
        Runner {
            pid,
            host: host_name(),
            start_ticks: process_start_ticks(pid),
        }
    }

    /// Whether the runner still runs. `None` when it ran on another host (only that host
    /// can tell; it may share the store over a network file system).
    pub fn is_alive(&self) -> Option<bool> {
        if self.host != host_name() {
            return None;
        }
        let alive = match (process_start_ticks(self.pid), self.start_ticks) {
            (None, _) => false,
            (Some(now), Some(then)) => now == then,
            // No start time recorded: the pid existing is the best we know.
            (Some(_), None) => true,
        };
        Some(alive)
    }
}

impl std::fmt::Display for Runner {
    /// `pid 4242 on host web-1`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} on host {}", self.pid, self.host)
    }
}

/// A live process found by [`processes_mentioning`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundProcess {
    pub pid: u32,
    /// Its arguments joined by spaces.
    pub command_line: String,
}

/// Live (not zombie) processes of this host, other than this one, whose command line
/// contains `needle`: how builder and its tests find a QEMU, which renames itself
/// (`-name …,process=builder-vm-…`) so that its process name tells nothing, by a path only
/// it has in its arguments (its disk, its sockets).
pub fn processes_mentioning(needle: &str) -> Vec<FoundProcess> {
    let me = std::process::id();
    let Ok(entries) = fs_err::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found: Vec<FoundProcess> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && process_start_ticks(pid).is_some())
        .filter_map(|pid| {
            let raw = fs_err::read(format!("/proc/{pid}/cmdline")).ok()?;
            let command_line = String::from_utf8_lossy(&raw)
                .trim_end_matches('\0')
                .replace('\0', " ");
            command_line
                .contains(needle)
                .then_some(FoundProcess { pid, command_line })
        })
        .collect();
    found.sort_by_key(|p| p.pid);
    found
}

fn host_name() -> String {
    fs_err::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// Field 22 of `/proc/<pid>/stat`; `None` if the process does not exist (or is a zombie:
/// a process that has exited but not been reaped runs nothing any more).
fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = fs_err::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces and ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    // Field 3 is the state.
    if matches!(fields.next(), Some("Z" | "X")) {
        return None;
    }
    // Fields 4.. follow; field 22 is the 19th of them.
    fields.nth(18)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_runner_is_told_from_a_live_one() {
        let me = Runner::current();
        assert!(me.start_ticks.is_some());
        assert_eq!(me.is_alive(), Some(true));
        let recycled = Runner {
            start_ticks: me.start_ticks.map(|t| t + 1),
            ..me.clone()
        };
        assert_eq!(recycled.is_alive(), Some(false), "same pid, other process");
        let elsewhere = Runner {
            host: format!("{}-other", me.host),
            ..me.clone()
        };
        assert_eq!(elsewhere.is_alive(), None);
    }

    /// QEMU renames itself (`-name …,process=`): its process name says nothing, its
    /// command line does. A check by name (`pgrep '^qemu-system'`) misses it; this one not.
    #[test]
    fn a_renamed_qemu_is_found_by_its_command_line() {
        let dir = tempfile::tempdir().expect("temp dir");
        let pidfile = dir.path().join("qemu.pid");
        // No guest: a machine with nothing in it, stopped before it starts.
        let mut qemu = std::process::Command::new("qemu-system-x86_64")
            .args(["-name", "leftover-check,process=builder-vm-leftover-check"])
            .args(["-machine", "none", "-nodefaults", "-display", "none", "-S"])
            .arg("-pidfile")
            .arg(&pidfile)
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 is needed for this test (scripts/install-deps)");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        // QEMU writes its pid file once it has renamed itself and set up.
        while !pidfile.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "QEMU did not start: {:?}",
                qemu.try_wait()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let found = processes_mentioning(&dir.path().to_string_lossy());
        let name = fs_err::read_to_string(format!("/proc/{}/comm", qemu.id())).unwrap_or_default();
        qemu.kill().expect("kill QEMU");
        qemu.wait().expect("reap QEMU");
        // The kernel keeps 15 bytes of it.
        assert_eq!(name.trim(), "builder-vm-left", "renamed itself");
        assert!(
            !name.starts_with("qemu-system"),
            "a check by name misses it"
        );
        assert_eq!(
            found.iter().map(|p| p.pid).collect::<Vec<_>>(),
            [qemu.id()],
            "{found:?}"
        );
        assert!(found[0].command_line.contains("qemu-system-x86_64 -name"));
        assert!(processes_mentioning(&dir.path().to_string_lossy()).is_empty());
    }

    #[test]
    fn an_exited_process_is_dead_even_before_it_is_reaped() {
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("start true");
        let pid = child.id();
        // Not reaped yet: a zombie until wait().
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while fs_err::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        }) {
            assert!(std::time::Instant::now() < deadline, "true never exited");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let runner = Runner {
            pid,
            ..Runner::current()
        };
        assert_eq!(runner.is_alive(), Some(false));
        child.wait().expect("reap");
    }
}
