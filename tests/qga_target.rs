//! Local tier: `QgaMachine` against a real qemu-guest-agent (`qemu-ga`, Debian package
//! qemu-guest-agent) listening on a unix socket on this machine, with guest-shutdown
//! disabled so nothing here can reboot the host. Fails, naming the package, when qemu-ga is
//! missing.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use builder::machine::qga::QgaMachine;
use builder::machine::{
    Capture, ExecRequest, ExitStatus, FileKind, FileSource, Machine, PutOptions,
};
use tokio::net::UnixStream;

#[path = "support/machine_checks.rs"]
mod machine_checks;
use machine_checks::{assert_gone, leftovers, random_file, read_pid, run, sha256_file};

struct Qga {
    child: std::process::Child,
    sock: PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for Qga {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qemu_ga() -> PathBuf {
    for p in ["/usr/sbin/qemu-ga", "/usr/bin/qemu-ga"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("qemu-ga is not installed: `apt-get install qemu-guest-agent` (these tests need it)");
}

impl Qga {
    async fn start() -> Qga {
        let dir = tempfile::tempdir().expect("temp dir");
        fs_err::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let sock = dir.path().join("qga.sock");
        let child = std::process::Command::new(qemu_ga())
            .args(["-m", "unix-listen", "-p"])
            .arg(&sock)
            .arg("-f")
            .arg(dir.path().join("qga.pid"))
            .arg("-t")
            .arg(dir.path())
            .args([
                "-b",
                "guest-shutdown,guest-suspend-disk,guest-suspend-ram,guest-suspend-hybrid,guest-set-time,guest-fsfreeze-freeze,guest-fsfreeze-freeze-list,guest-set-user-password,guest-set-vcpus,guest-set-memory-blocks",
            ])
            .spawn()
            .expect("start qemu-ga");
        for _ in 0..200 {
            if sock.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Qga { child, sock, dir }
    }

    async fn target(&self) -> QgaMachine {
        let stream = UnixStream::connect(&self.sock).await.expect("connect");
        QgaMachine::connect(stream, "local qemu-ga".into(), Duration::from_secs(20))
            .await
            .expect("guest-sync")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

#[tokio::test]
async fn info_reports_this_machine() {
    let qga = Qga::start().await;
    let t = qga.target().await;
    let info = t.info().await.expect("info");
    let boot_id = fs_err::read_to_string("/proc/sys/kernel/random/boot_id").expect("boot id");
    assert_eq!(info.boot_id, boot_id.trim());
    assert_eq!(info.arch, std::env::consts::ARCH);
    let os = fs_err::read_to_string("/etc/os-release").expect("os-release");
    assert!(os.contains(&format!("ID={}", info.os_id)), "{info:?}");
}

#[tokio::test]
async fn exec_output_exit_codes_env_cwd_user() {
    let qga = Qga::start().await;
    let t = qga.target().await;
    let (status, out, err) = run(&t, ExecRequest::bash("echo one; echo two >&2; exit 3")).await;
    assert_eq!(
        (status, out.as_str(), err.as_str()),
        (ExitStatus::Exited(3), "one\n", "two\n")
    );
    let (status, _, _) = run(&t, ExecRequest::bash("kill -TERM $$")).await;
    assert_eq!(status, ExitStatus::Signaled(15));
    let (status, out, _) = run(&t, ExecRequest::argv(["printf", "%s|", "a b", "c"])).await;
    assert_eq!((status, out.as_str()), (ExitStatus::Exited(0), "a b|c|"));
    let (status, _, err) = run(&t, ExecRequest::argv(["/no/such/program"])).await;
    assert!(!status.success());
    assert!(err.contains("/no/such/program"), "{err}");

    let mut req = ExecRequest::bash("echo \"$GREETING $(pwd)\"");
    req.env = vec![("GREETING".into(), "hello".into())];
    req.cwd = Some(qga.dir.path().to_path_buf());
    let (status, out, _) = run(&t, req).await;
    assert!(status.success());
    assert_eq!(out, format!("hello {}\n", qga.dir.path().display()));

    let mut req = ExecRequest::argv(["id", "-un"]);
    req.user = Some("nobody".into());
    let (status, out, err) = run(&t, req).await;
    assert!(status.success(), "{err}");
    assert_eq!(out, "nobody\n");
    let mut req = ExecRequest::bash("id -un; test -r \"$0\" && echo readable");
    req.user = Some("nobody".into());
    let (status, out, err) = run(&t, req).await;
    assert!(status.success(), "{err}");
    assert_eq!(out, "nobody\nreadable\n");
    // A script is removed after it ran.
    let (_, out, _) = run(&t, ExecRequest::bash("echo \"$0\"")).await;
    assert!(out.contains(".builder-script-"), "{out}");
    assert!(!Path::new(out.trim()).exists(), "{out}");
}

#[tokio::test]
async fn timeout_kills_the_whole_process_tree() {
    let qga = Qga::start().await;
    let t = qga.target().await;
    let pidfile = qga.path("bg.pid");
    let req = ExecRequest::bash(format!(
        "sleep 1000 & echo $! > '{}'; sleep 1000",
        pidfile.display()
    ))
    .with_timeout(Some(Duration::from_secs(1)));
    let (status, _, _) = run(&t, req).await;
    assert_eq!(status, ExitStatus::TimedOut);
    assert_gone(read_pid(&pidfile).await).await;
}

#[tokio::test]
async fn dropping_an_exec_kills_its_process_tree_and_the_stream_resyncs() {
    let qga = Qga::start().await;
    let t = qga.target().await;
    let pidfile = qga.path("bg.pid");
    let req = ExecRequest::bash(format!(
        "sleep 1000 & echo $! > '{}'; wait",
        pidfile.display()
    ));
    let cap = Capture::default();
    tokio::select! {
        _ = t.exec(&req, &cap) => panic!("the command ended by itself"),
        _ = read_pid(&pidfile) => {}
    }
    assert_gone(read_pid(&pidfile).await).await;
    let (status, out, _) = run(&t, ExecRequest::argv(["echo", "after"])).await;
    assert_eq!((status, out.as_str()), (ExitStatus::Exited(0), "after\n"));
}

#[tokio::test]
async fn put_and_get_with_matching_sha256_and_no_temp_files() {
    let qga = Qga::start().await;
    let t = qga.target().await;
    let src = qga.path("big.src");
    let size = 20 * 1024 * 1024 + 777;
    random_file(&src, size);
    let want = sha256_file(&src);
    let remote = qga.path("guest/sub/big");
    let put = t
        .put_file(
            &remote,
            FileSource::Path(src.clone()),
            &PutOptions {
                mode: Some(0o640),
                create_parents: true,
                ..PutOptions::default()
            },
        )
        .await
        .expect("put");
    assert_eq!(
        (put.size, put.sha256.as_str()),
        (size as u64, want.as_str())
    );
    assert_eq!(sha256_file(&remote), want);
    let st = t.stat(&remote).await.expect("stat").expect("exists");
    assert_eq!((st.kind, st.mode), (FileKind::File, 0o640));
    assert!(leftovers(&qga.path("guest/sub")).is_empty());
    let back = qga.path("back");
    let got = t.get_file(&remote, &back).await.expect("get");
    assert_eq!(got.sha256, want);
    assert_eq!(sha256_file(&back), want);
    assert!(leftovers(qga.dir.path()).is_empty());

    // Append and mode keeping, as with the agent.
    let f = qga.path("f.txt");
    t.put_file(
        &f,
        FileSource::Bytes(b"one\n".to_vec()),
        &PutOptions::default(),
    )
    .await
    .expect("put");
    fs_err::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    t.put_file(
        &f,
        FileSource::Bytes(b"two\n".to_vec()),
        &PutOptions {
            append: true,
            ..PutOptions::default()
        },
    )
    .await
    .expect("append");
    assert_eq!(fs_err::read(&f).expect("read"), b"one\ntwo\n");
    t.put_file(
        &f,
        FileSource::Bytes(b"three\n".to_vec()),
        &PutOptions::default(),
    )
    .await
    .expect("replace");
    let st = t.stat(&f).await.expect("stat").expect("exists");
    assert_eq!((st.size, st.mode), (6, 0o600));
    let err = t
        .get_file(&qga.path("nope"), &qga.path("nope.local"))
        .await
        .expect_err("missing");
    assert!(err.to_string().contains("nope"), "{err}");
    assert!(leftovers(qga.dir.path()).is_empty());
}

#[tokio::test]
async fn stat_list_reconnect_and_refused_reboot() {
    let qga = Qga::start().await;
    let t = qga.target().await;
    let d = qga.path("tree");
    machine_checks::check_stat_and_list(&t, &d, "c d").await;
    assert!(t.list(&d.join("b")).await.is_err());

    // guest-shutdown is disabled in this qemu-ga: the refusal comes back as an error.
    let err = t.reboot().await.expect_err("refused");
    assert!(err.to_string().contains("refused to reboot"), "{err}");

    drop(t);
    let t = qga.target().await;
    let (status, out, _) = run(&t, ExecRequest::argv(["echo", "again"])).await;
    assert_eq!((status, out.as_str()), (ExitStatus::Exited(0), "again\n"));
}
