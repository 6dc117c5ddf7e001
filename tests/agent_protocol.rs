//! Local tier: the real static guest agent (the binary `builder` embeds) run on this machine
//! against a unix socket standing in for the virtio-serial port, driven by `AgentMachine`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use builder::agent::protocol::{self, Message};
use builder::machine::agent::AgentMachine;
use builder::machine::{
    Capture, ExecRequest, ExitStatus, FileKind, FileSource, Machine, MachineError, OutputSink,
    OutputStream, PutOptions,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

#[path = "support/machine_checks.rs"]
mod machine_checks;
use machine_checks::{assert_gone, leftovers, random_file, read_pid, run, sha256_file};

/// The agent process; killed (and checked gone) when dropped.
struct Agent {
    child: std::process::Child,
    listener: UnixListener,
    dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start a freshly written executable. Another test thread may `fork` while this one still
/// holds the file open for writing; the child keeps that descriptor until its `exec`, and our
/// `exec` of the file then fails with ETXTBSY. That window is short: retry.
fn spawn_fresh(cmd: &mut std::process::Command) -> std::process::Child {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other.expect("start agent"),
        }
    }
}

impl Agent {
    async fn start() -> Agent {
        Agent::start_with(&[]).await
    }

    /// The agent with `extra` arguments before `--connect-unix`.
    async fn start_with(extra: &[&str]) -> Agent {
        let dir = tempfile::tempdir().expect("temp dir");
        let exe = dir.path().join("builder-agent");
        fs_err::write(&exe, builder::agent::AGENT_BINARY).expect("write agent");
        fs_err::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let sock = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&sock).expect("bind");
        let child = spawn_fresh(
            std::process::Command::new(&exe)
                .args(extra)
                .arg("--connect-unix")
                .arg(&sock),
        );
        Agent {
            child,
            listener,
            dir,
        }
    }

    async fn accept(&self) -> UnixStream {
        let (s, _) = tokio::time::timeout(Duration::from_secs(20), self.listener.accept())
            .await
            .expect("the agent connects within 20 s")
            .expect("accept");
        s
    }

    async fn target(&self) -> AgentMachine {
        let stream = self.accept().await;
        AgentMachine::connect(stream, "local agent".into(), Duration::from_secs(20))
            .await
            .expect("hello")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Records output chunks in arrival order, and reports each on a channel.
#[derive(Default)]
struct Recorder {
    chunks: Mutex<Vec<(OutputStream, Vec<u8>)>>,
    notify: Mutex<Option<tokio::sync::mpsc::UnboundedSender<Vec<u8>>>>,
}

impl OutputSink for Recorder {
    fn output(&self, stream: OutputStream, data: &[u8]) {
        if let Ok(mut c) = self.chunks.lock() {
            c.push((stream, data.to_vec()));
        }
        if let Ok(n) = self.notify.lock()
            && let Some(tx) = n.as_ref()
        {
            let _ = tx.send(data.to_vec());
        }
    }
}

impl Recorder {
    fn text(&self, stream: OutputStream) -> String {
        let c = self.chunks.lock().expect("lock");
        let bytes: Vec<u8> = c
            .iter()
            .filter(|(s, _)| *s == stream)
            .flat_map(|(_, d)| d.clone())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[tokio::test]
async fn hello_reports_this_machine() {
    let agent = Agent::start().await;
    let t = agent.target().await;
    let hello = t.hello().expect("hello received");
    assert_eq!(hello.protocol, protocol::PROTOCOL_VERSION);
    assert_eq!(hello.pid, agent.child.id());
    let info = t.info().await.expect("info");
    let boot_id = fs_err::read_to_string("/proc/sys/kernel/random/boot_id").expect("boot id");
    assert_eq!(info.boot_id, boot_id.trim());
    assert_eq!(info.arch, std::env::consts::ARCH);
    let os = fs_err::read_to_string("/etc/os-release").expect("os-release");
    assert!(os.contains(&format!("ID={}", info.os_id)), "{info:?}");
    assert!(!info.os_pretty.is_empty());
    t.ping().await.expect("ping");
}

#[tokio::test]
async fn exec_streams_output_in_order_before_the_command_ends() {
    let agent = Agent::start().await;
    let t = agent.target().await;
    let go = agent.path("go");
    let rec = Arc::new(Recorder::default());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    *rec.notify.lock().expect("lock") = Some(tx);
    let script = format!(
        "echo one; sleep 0.2; echo two >&2; sleep 0.2; echo three\n\
         while [ ! -e '{}' ]; do sleep 0.05; done; echo four",
        go.display()
    );
    let req = ExecRequest::bash(script);
    let exec = t.exec(&req, rec.as_ref());
    tokio::pin!(exec);
    // The command waits for a file we only create once "three" arrived: without streaming
    // this never finishes.
    let mut seen = String::new();
    loop {
        tokio::select! {
            chunk = rx.recv() => {
                seen.push_str(&String::from_utf8_lossy(&chunk.expect("output")));
                if seen.contains("three") {
                    fs_err::write(&go, "").expect("go");
                }
            }
            done = &mut exec => {
                assert!(seen.contains("three"), "ended before it was allowed to: {seen:?}");
                assert_eq!(done.expect("exec").status, ExitStatus::Exited(0));
                break;
            }
            _ = tokio::time::sleep(Duration::from_secs(30)) => panic!("no streamed output: {seen:?}"),
        }
    }
    assert_eq!(rec.text(OutputStream::Stdout), "one\nthree\nfour\n");
    assert_eq!(rec.text(OutputStream::Stderr), "two\n");
    let order: Vec<String> = rec
        .chunks
        .lock()
        .expect("lock")
        .iter()
        .map(|(_, d)| String::from_utf8_lossy(d).trim().to_owned())
        .collect();
    assert_eq!(order, ["one", "two", "three", "four"]);
}

#[tokio::test]
async fn exit_codes_signals_and_spawn_failures() {
    let agent = Agent::start().await;
    let t = agent.target().await;
    let (status, _, _) = run(&t, ExecRequest::bash("exit 3")).await;
    assert_eq!(status, ExitStatus::Exited(3));
    let (status, _, _) = run(&t, ExecRequest::bash("kill -TERM $$")).await;
    assert_eq!(status, ExitStatus::Signaled(15));
    let (status, out, _) = run(&t, ExecRequest::argv(["printf", "%s|", "a b", "c"])).await;
    assert_eq!((status, out.as_str()), (ExitStatus::Exited(0), "a b|c|"));
    let err = t
        .exec(
            &ExecRequest::argv(["/no/such/program"]),
            &Capture::default(),
        )
        .await
        .expect_err("cannot start");
    assert!(
        matches!(&err, MachineError::Refused { message } if message.contains("/no/such/program")),
        "{err}"
    );
    // A script is removed after it ran.
    let (_, out, _) = run(&t, ExecRequest::bash("echo \"$0\"")).await;
    assert!(out.contains(".builder-script-"), "{out}");
    assert!(!Path::new(out.trim()).exists(), "{out}");
    let mut req = ExecRequest::argv(["true"]);
    req.cwd = Some("/no/such/dir".into());
    let err = t
        .exec(&req, &Capture::default())
        .await
        .expect_err("bad cwd");
    assert!(err.to_string().contains("/no/such/dir"), "{err}");
}

#[tokio::test]
async fn env_cwd_and_user() {
    let agent = Agent::start().await;
    let t = agent.target().await;
    let mut req = ExecRequest::bash("echo \"$GREETING $SECRET $(pwd)\"");
    req.env = vec![("GREETING".into(), "hello".into())];
    req.cwd = Some(agent.dir.path().to_path_buf());
    let cap = Capture::default();
    let out = t
        .exec_with_secrets(&req, &[("SECRET".into(), "s3cr3t".into())], &cap)
        .await
        .expect("exec");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&cap.stdout()),
        format!("hello s3cr3t {}\n", agent.dir.path().display())
    );
    let mut req = ExecRequest::argv(["sh", "-c", "id -un; echo $HOME"]);
    req.user = Some("nobody".into());
    let (status, out, err) = run(&t, req).await;
    assert!(status.success(), "{err}");
    let passwd = fs_err::read_to_string("/etc/passwd").expect("passwd");
    let home = passwd
        .lines()
        .find(|l| l.starts_with("nobody:"))
        .and_then(|l| l.split(':').nth(5))
        .expect("nobody in passwd");
    assert_eq!(out, format!("nobody\n{home}\n"));
    let mut req = ExecRequest::argv(["true"]);
    req.user = Some("no-such-user-here".into());
    let err = t
        .exec(&req, &Capture::default())
        .await
        .expect_err("unknown user");
    assert!(err.to_string().contains("no-such-user-here"), "{err}");
}

#[tokio::test]
async fn timeout_kills_the_whole_process_tree() {
    let agent = Agent::start().await;
    let t = agent.target().await;
    let pidfile = agent.path("bg.pid");
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
async fn dropping_an_exec_kills_its_process_tree() {
    let agent = Agent::start().await;
    let t = agent.target().await;
    let pidfile = agent.path("bg.pid");
    let rec = Recorder::default();
    let req = ExecRequest::bash(format!(
        "sleep 1000 & echo $! > '{}'; echo started; wait",
        pidfile.display()
    ));
    let exec = t.exec(&req, &rec);
    tokio::select! {
        _ = exec => panic!("the command ended by itself"),
        // Leaving the select drops the exec future: that cancels it.
        _ = read_pid(&pidfile) => {}
    }
    assert_gone(read_pid(&pidfile).await).await;
    // The target is still usable afterwards.
    let (status, out, _) = run(&t, ExecRequest::argv(["echo", "after"])).await;
    assert_eq!((status, out.as_str()), (ExitStatus::Exited(0), "after\n"));
}

#[tokio::test]
async fn many_requests_in_flight_at_once() {
    let agent = Agent::start().await;
    let t = agent.target().await;
    let jobs = (0..6).map(|i| {
        let t = &t;
        async move {
            let (status, out, _) =
                run(t, ExecRequest::bash(format!("sleep 0.3; echo job{i}"))).await;
            assert_eq!(status, ExitStatus::Exited(0));
            assert_eq!(out, format!("job{i}\n"));
        }
    });
    let stats = async {
        for _ in 0..20 {
            assert!(t.stat(Path::new("/")).await.expect("stat").is_some());
        }
    };
    tokio::join!(futures_join_all(jobs), stats);
}

async fn futures_join_all<F: std::future::Future<Output = ()>>(futs: impl Iterator<Item = F>) {
    let mut set = Vec::new();
    for f in futs {
        set.push(Box::pin(f));
    }
    for f in set {
        f.await;
    }
}

#[tokio::test]
async fn put_and_get_100_mib_with_matching_sha256() {
    let agent = Agent::start().await;
    let t = agent.target().await;
    let src = agent.path("big.src");
    random_file(&src, 100 * 1024 * 1024 + 12345);
    let want = sha256_file(&src);
    let remote = agent.path("guest/sub/big");
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
    assert_eq!(put.sha256, want);
    assert_eq!(put.size, 100 * 1024 * 1024 + 12345);
    assert_eq!(sha256_file(&remote), want);
    let st = t.stat(&remote).await.expect("stat").expect("exists");
    assert_eq!(
        (st.kind, st.size, st.mode),
        (FileKind::File, put.size, 0o640)
    );
    assert!(leftovers(&agent.path("guest/sub")).is_empty());

    let back = agent.path("back/big");
    fs_err::create_dir_all(agent.path("back")).expect("mkdir");
    let got = t.get_file(&remote, &back).await.expect("get");
    assert_eq!(got.sha256, want);
    assert_eq!(sha256_file(&back), want);
    assert!(leftovers(&agent.path("back")).is_empty());
}

#[tokio::test]
async fn put_bytes_append_and_keep_mode() {
    let agent = Agent::start().await;
    let t = agent.target().await;
    let remote = agent.path("f.txt");
    t.put_file(
        &remote,
        FileSource::Bytes(b"one\n".to_vec()),
        &PutOptions::default(),
    )
    .await
    .expect("put");
    fs_err::set_permissions(&remote, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let info = t
        .put_file(
            &remote,
            FileSource::Bytes(b"two\n".to_vec()),
            &PutOptions {
                append: true,
                ..PutOptions::default()
            },
        )
        .await
        .expect("append");
    assert_eq!(info.size, 4);
    assert_eq!(fs_err::read(&remote).expect("read"), b"one\ntwo\n");
    // Replacing keeps the mode of the file it replaces.
    t.put_file(
        &remote,
        FileSource::Bytes(Vec::new()),
        &PutOptions::default(),
    )
    .await
    .expect("empty put");
    let st = t.stat(&remote).await.expect("stat").expect("exists");
    assert_eq!((st.size, st.mode), (0, 0o600));
    let err = t
        .put_file(
            &agent.path("missing/dir/f"),
            FileSource::Bytes(b"x".to_vec()),
            &PutOptions::default(),
        )
        .await
        .expect_err("no parent");
    assert!(err.to_string().contains("missing/dir"), "{err}");
    assert!(leftovers(agent.dir.path()).is_empty());
    let err = t
        .get_file(&agent.path("nope"), &agent.path("nope.local"))
        .await
        .expect_err("missing");
    assert!(err.to_string().contains("nope"), "{err}");
    assert!(!agent.path("nope.local").exists());
    assert!(leftovers(agent.dir.path()).is_empty());
}

#[tokio::test]
async fn stat_and_list() {
    let agent = Agent::start().await;
    let t = agent.target().await;
    let d = agent.path("tree");
    machine_checks::check_stat_and_list(&t, &d, "c").await;
    let link = t.stat(&d.join("c")).await.expect("stat").expect("exists");
    assert_eq!(link.kind, FileKind::Symlink);
    let err = t.list(&d.join("b")).await.expect_err("not a dir");
    assert!(err.to_string().contains("cannot list"), "{err}");
    let err = t.stat(Path::new("relative")).await.expect_err("relative");
    assert!(err.to_string().contains("absolute"), "{err}");
}

#[tokio::test]
async fn host_reconnecting_gets_a_new_hello_and_old_execs_die() {
    let agent = Agent::start().await;
    let t = agent.target().await;
    let pidfile = agent.path("bg.pid");
    let req = ExecRequest::bash(format!(
        "sleep 1000 & echo $! > '{}'; wait",
        pidfile.display()
    ));
    let first_pid = t.hello().expect("hello").pid;
    {
        let cap = Capture::default();
        let exec = t.exec(&req, &cap);
        tokio::select! {
            _ = exec => panic!("ended by itself"),
            _ = read_pid(&pidfile) => {}
        }
    }
    // Cut the connection without a goodbye while a command runs.
    drop(t);
    let t = agent.target().await;
    assert_eq!(
        t.hello().expect("hello").pid,
        first_pid,
        "same agent process"
    );
    assert_gone(read_pid(&pidfile).await).await;
    let (status, out, _) = run(&t, ExecRequest::argv(["echo", "again"])).await;
    assert_eq!((status, out.as_str()), (ExitStatus::Exited(0), "again\n"));
}

#[tokio::test]
async fn interactive_command_on_a_pty() {
    let agent = Agent::start().await;
    let t = agent.target().await;
    let req = ExecRequest::argv(["sh", "-c", "tty; stty size; read line; echo \"got $line\""]);
    let mut session = t
        .start_interactive(&req, Some((33, 101)))
        .await
        .expect("start");
    let mut out = String::new();
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(20), session.next())
            .await
            .expect("pty output")
            .expect("event")
        {
            builder::machine::agent::InteractiveEvent::Output(_, d) => {
                out.push_str(&String::from_utf8_lossy(&d));
                if out.contains("33 101") && !out.contains("sent") {
                    session.write_stdin(b"hello\n").expect("stdin");
                    out.push_str("[sent]");
                }
            }
            builder::machine::agent::InteractiveEvent::Exited(s) => break s,
        }
    };
    assert_eq!(status, ExitStatus::Exited(0), "{out}");
    assert!(out.contains("/dev/pts/"), "{out}");
    assert!(out.contains("got hello"), "{out}");
}

// ---------------------------------------------------------------------------------------------
// Raw protocol against the agent: garbage and a forged checksum.

/// `--container`: one connection; Reboot refused; Poweroff ends the agent with 0, a host that
/// goes away without it with 1 (the container build's step fails).
#[tokio::test]
async fn in_a_container_poweroff_exits_0_a_lost_host_1_and_reboot_is_refused() {
    let mut agent = Agent::start_with(&["--container", "--key", "sha256:abc"]).await;
    let mut s = agent.accept().await;
    let mut buf = Vec::new();
    let Message::Hello(hello) = read_frame(&mut s, &mut buf).await.msg else {
        panic!("the agent says hello first");
    };
    assert_eq!(hello.cloud_init, "absent");
    send(&mut s, 1, &Message::Reboot).await;
    match read_frame(&mut s, &mut buf).await.msg {
        Message::Error { code, message } => {
            assert_eq!(code, protocol::code::UNSUPPORTED);
            assert!(
                message.starts_with("a container cannot reboot"),
                "{message}"
            );
        }
        other => panic!("Reboot is refused, got {}", other.name()),
    }
    send(&mut s, 2, &Message::Poweroff).await;
    assert!(matches!(
        read_frame(&mut s, &mut buf).await.msg,
        Message::Ok
    ));
    let status = agent.child.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "Poweroff ends the run: {status}");

    let mut agent = Agent::start_with(&["--container"]).await;
    let s = agent.accept().await;
    drop(s);
    let status = agent.child.wait().expect("wait");
    assert_eq!(
        status.code(),
        Some(1),
        "a lost host fails the step: {status}"
    );
}

async fn read_frame(s: &mut UnixStream, buf: &mut Vec<u8>) -> protocol::Frame {
    loop {
        if let Some((frame, used)) = protocol::decode_frame(buf).expect("agent frames decode") {
            buf.drain(..used);
            return frame;
        }
        let mut chunk = [0u8; 65536];
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut chunk))
            .await
            .expect("agent answers")
            .expect("read");
        assert!(n > 0, "agent closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn send(s: &mut UnixStream, id: u32, msg: &Message) {
    s.write_all(&protocol::encode(id, msg).expect("encode"))
        .await
        .expect("write");
}

#[tokio::test]
async fn agent_survives_garbage_and_refuses_a_bad_checksum() {
    let agent = Agent::start().await;
    let mut s = agent.accept().await;
    let mut buf = Vec::new();
    assert!(matches!(
        read_frame(&mut s, &mut buf).await.msg,
        Message::Hello(_)
    ));

    // Garbage, then a valid header with an undecodable body, then a ping.
    s.write_all(b"\x00\xffgarbage that is not a frame BA")
        .await
        .expect("write");
    let mut bad_body = protocol::encode(5, &Message::Credit(1)).expect("encode");
    bad_body[3] = 0x41; // claims to be Output, whose body this is not
    s.write_all(&bad_body).await.expect("write");
    send(&mut s, 6, &Message::Ping).await;
    let mut saw_header_error = false;
    let mut saw_body_error = false;
    loop {
        let f = read_frame(&mut s, &mut buf).await;
        match (f.id, f.msg) {
            (0, Message::Error { .. }) => saw_header_error = true,
            (5, Message::Error { code, .. }) => {
                assert_eq!(code, protocol::code::BAD_REQUEST);
                saw_body_error = true;
            }
            (6, Message::Ok) => break,
            (id, m) => panic!("unexpected frame {id} {m:?}"),
        }
    }
    assert!(saw_header_error && saw_body_error);

    // A put whose End carries the wrong sha256 is refused and leaves nothing behind.
    let target = agent.path("forged");
    send(
        &mut s,
        7,
        &Message::PutFile(protocol::PutSpec {
            path: target.display().to_string(),
            ..Default::default()
        }),
    )
    .await;
    assert!(matches!(
        read_frame(&mut s, &mut buf).await.msg,
        Message::Credit(protocol::WINDOW_CHUNKS)
    ));
    send(&mut s, 7, &Message::Data(b"content".to_vec())).await;
    send(
        &mut s,
        7,
        &Message::End {
            size: 7,
            sha256: [0; 32],
        },
    )
    .await;
    loop {
        match read_frame(&mut s, &mut buf).await.msg {
            Message::Credit(_) => {}
            Message::Error { code, message } => {
                assert_eq!(code, protocol::code::CHECKSUM, "{message}");
                break;
            }
            m => panic!("unexpected {m:?}"),
        }
    }
    assert!(!target.exists());
    assert!(leftovers(agent.dir.path()).is_empty());
}

mod decoder {
    use builder::agent::protocol::{self, HEADER_LEN};
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = protocol::decode_frame(&bytes);
        }

        #[test]
        fn random_bodies_behind_valid_headers_never_panic(
            ty in any::<u8>(),
            body in proptest::collection::vec(any::<u8>(), 0..2048),
        ) {
            let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
            frame.extend_from_slice(&protocol::MAGIC);
            frame.push(protocol::FRAME_VERSION);
            frame.push(ty);
            frame.extend_from_slice(&1u32.to_le_bytes());
            frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
            frame.extend_from_slice(&body);
            if let Ok(Some((f, used))) = protocol::decode_frame(&frame) {
                prop_assert_eq!(used, frame.len());
                // Whatever decoded must encode back to the same bytes.
                prop_assert_eq!(protocol::encode(f.id, &f.msg).expect("re-encode"), frame);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A relay that keeps the host's stream open while agents come and go, as QEMU's chardev socket
// does when the agent in the guest dies and systemd starts a new one.

struct Relay {
    host_end: Option<tokio::io::DuplexStream>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn relay(listener: UnixListener) -> Relay {
    let (host_end, relay_end) = tokio::io::duplex(1 << 20);
    let task = tokio::spawn(async move {
        let (mut from_host, mut to_host) = tokio::io::split(relay_end);
        loop {
            let Ok((agent, _)) = listener.accept().await else {
                return;
            };
            let (mut from_agent, mut to_agent) = agent.into_split();
            let up = tokio::io::copy(&mut from_agent, &mut to_host);
            let down = tokio::io::copy(&mut from_host, &mut to_agent);
            // When the agent goes, whatever the host sent meanwhile is lost, as in a guest.
            tokio::select! {
                _ = up => {}
                _ = down => return,
            }
        }
    });
    Relay {
        host_end: Some(host_end),
        task,
    }
}

#[tokio::test]
async fn a_restarted_agent_or_a_closed_port_fails_requests_in_flight() {
    let dir = tempfile::tempdir().expect("temp dir");
    let exe = dir.path().join("builder-agent");
    fs_err::write(&exe, builder::agent::AGENT_BINARY).expect("write agent");
    fs_err::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let sock = dir.path().join("agent.sock");
    let mut relay = relay(UnixListener::bind(&sock).expect("bind"));
    // The agents of this test keep their scripts in a temp dir of their own: an agent that
    // another test starts meanwhile removes a dead agent's scripts from the shared one.
    let tmp = dir.path().join("tmp");
    fs_err::create_dir(&tmp).expect("mkdir tmp");
    let start = || {
        spawn_fresh(
            std::process::Command::new(&exe)
                .env("TMPDIR", &tmp)
                .arg("--connect-unix")
                .arg(&sock),
        )
    };
    let mut first = start();
    let t = AgentMachine::connect(
        relay.host_end.take().expect("host end"),
        "relayed agent".into(),
        Duration::from_secs(20),
    )
    .await
    .expect("hello");
    let cap = Capture::default();
    let pidfile = dir.path().join("orphan.pid");
    // The killed agent cannot clean up after itself (in a guest, systemd kills its cgroup):
    // the test does, through this pid file.
    let orphan = ExecRequest::bash(format!(
        "echo $$ > '{}'; exec sleep 1000",
        pidfile.display()
    ));
    let exec = t.exec(&orphan, &cap);
    tokio::pin!(exec);
    // Give the exec time to reach the agent, then kill that agent; a new one takes over.
    tokio::select! {
        _ = &mut exec => panic!("ended by itself"),
        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
    }
    let _ = first.kill();
    let _ = first.wait();
    let orphan_pid = read_pid(&pidfile).await;
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &orphan_pid.to_string()])
        .status();
    assert_gone(orphan_pid).await;
    let first_scripts = || {
        let prefix = format!(".builder-script-{}-", first.id());
        fs_err::read_dir(&tmp)
            .expect("temp dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .count()
    };
    assert_eq!(first_scripts(), 1, "the killed agent left its script");
    let mut second = start();
    let err = tokio::time::timeout(Duration::from_secs(20), &mut exec)
        .await
        .expect("the exec fails instead of waiting forever")
        .expect_err("lost");
    assert!(err.to_string().contains("restarted"), "{err}");
    // The new agent removed what the killed one left behind.
    assert_eq!(first_scripts(), 0);
    let (status, out, _) = run(&t, ExecRequest::argv(["echo", "second"])).await;
    assert_eq!((status, out.as_str()), (ExitStatus::Exited(0), "second\n"));

    // The host hears (from QMP) that the guest closed its port: in-flight requests fail.
    let second_pid;
    let err = {
        let pidfile = dir.path().join("second.pid");
        let sleep = ExecRequest::bash(format!(
            "echo $$ > '{}'; exec sleep 1000",
            pidfile.display()
        ));
        let exec = t.exec(&sleep, &cap);
        tokio::pin!(exec);
        tokio::select! {
            _ = &mut exec => panic!("ended by itself"),
            pid = read_pid(&pidfile) => second_pid = pid,
        }
        tokio::pin!(exec);
        tokio::select! {
            _ = &mut exec => panic!("ended by itself"),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        t.guest_port_closed();
        tokio::time::timeout(Duration::from_secs(5), &mut exec)
            .await
            .expect("fails at once")
            .expect_err("port closed")
    };
    assert!(err.to_string().contains("closed the agent's port"), "{err}");
    // The failed request's Kill reached the live agent: its command is gone too.
    assert_gone(second_pid).await;
    let _ = second.kill();
    let _ = second.wait();
}

#[tokio::test]
async fn readiness_on_a_machine_without_cloud_init() {
    let agent = Agent::start().await;
    let t = agent.target().await;
    let ready = t
        .wait_ready(false, Duration::from_secs(30))
        .await
        .expect("agent up");
    assert_eq!(ready.cloud_init, None);
    assert_eq!(ready.hello.pid, agent.child.id());
    let installed = ["/usr/bin/cloud-init", "/usr/local/bin/cloud-init"]
        .iter()
        .any(|p| Path::new(p).exists());
    let ready = t
        .wait_ready(true, Duration::from_secs(120))
        .await
        .expect("ready");
    if installed {
        assert_eq!(ready.cloud_init.as_deref(), Some("done"));
    } else {
        assert_eq!(ready.hello.cloud_init, "absent");
        assert_eq!(ready.cloud_init.as_deref(), Some("absent"));
    }
}

#[tokio::test]
async fn a_script_bigger_than_a_frame_still_runs() {
    let agent = Agent::start().await;
    let t = agent.target().await;
    // 2 MiB of comments, then the command: too big for one frame.
    let body = format!("{}\necho \"ran $0\"\n", "# padding\n".repeat(200_000));
    let (status, out, err) = run(&t, ExecRequest::bash(body)).await;
    assert_eq!(status, ExitStatus::Exited(0), "{err}");
    let path = out.trim().strip_prefix("ran ").expect("script path");
    assert!(path.contains(".builder-script-"), "{out}");
    assert!(!Path::new(path).exists(), "left behind: {path}");
}
