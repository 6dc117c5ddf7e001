//! Helpers for the local machine-conformance tests (`tests/agent_protocol.rs` against the
//! real guest agent, `tests/qga_target.rs` against a real qemu-guest-agent): both drive a
//! [`Machine`] whose "guest" is this machine, and check its effects on the local file system
//! and process table.

use std::path::Path;
use std::time::Duration;

use builder::machine::{Capture, ExecRequest, ExitStatus, FileKind, Machine};
use sha2::{Digest, Sha256};

/// Runs a command to its end: its status, stdout and stderr (lossy UTF-8).
pub async fn run(t: &dyn Machine, req: ExecRequest) -> (ExitStatus, String, String) {
    let cap = Capture::default();
    let out = t.exec(&req, &cap).await.expect("exec");
    (
        out.status,
        String::from_utf8_lossy(&cap.stdout()).into_owned(),
        String::from_utf8_lossy(&cap.stderr()).into_owned(),
    )
}

/// Waits until no live process has this pid (zombies count as gone: the container's init
/// may not reap them).
pub async fn assert_gone(pid: i32) {
    for _ in 0..100 {
        match fs_err::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return,
            Ok(s) => {
                let state = s
                    .rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().next());
                if state == Some("Z") {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("process {pid} is still running");
}

/// Waits (up to 10 s) for a pid file a command writes.
pub async fn read_pid(path: &Path) -> i32 {
    for _ in 0..400 {
        if let Ok(s) = fs_err::read_to_string(path)
            && let Ok(pid) = s.trim().parse()
        {
            return pid;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{} never got a pid", path.display());
}

/// The sha256 of a local file, hex.
pub fn sha256_file(p: &Path) -> String {
    builder::digest::sha256_file(p, None).expect("hash").hex()
}

/// Writes `size` deterministic pseudo-random bytes (sha256 in counter mode: fast).
pub fn random_file(path: &Path, size: usize) {
    let mut out = Vec::with_capacity(size);
    let mut counter: u64 = 0;
    while out.len() < size {
        out.extend_from_slice(&Sha256::digest(counter.to_le_bytes()));
        counter += 1;
    }
    out.truncate(size);
    fs_err::write(path, out).expect("write random file");
}

/// The transfer temp files (`…builder-tmp…`) left in a folder.
pub fn leftovers(dir: &Path) -> Vec<String> {
    fs_err::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("builder-tmp"))
        .collect()
}

/// Makes the folder `d` with a folder `a`, a 5-byte file `b` and a symlink `link` to `b`, and
/// checks what the machine says of it: no `zz`, and `list` names the three, sorted, with
/// their kinds and `b`'s size.
pub async fn check_stat_and_list(t: &dyn Machine, d: &Path, link: &str) {
    fs_err::create_dir(d).expect("mkdir");
    fs_err::write(d.join("b"), "12345").expect("write");
    fs_err::create_dir(d.join("a")).expect("mkdir");
    fs_err::os::unix::fs::symlink("b", d.join(link)).expect("symlink");
    assert_eq!(t.stat(&d.join("zz")).await.expect("stat"), None);
    let list = t.list(d).await.expect("list");
    let names: Vec<(&str, FileKind)> = list
        .iter()
        .map(|e| (e.name.as_str(), e.stat.kind))
        .collect();
    assert_eq!(
        names,
        [
            ("a", FileKind::Dir),
            ("b", FileKind::File),
            (link, FileKind::Symlink)
        ]
    );
    assert_eq!(list[1].stat.size, 5);
}
