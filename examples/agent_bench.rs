//! Prints local figures for the agent protocol: the real static agent on this machine over a
//! unix socket, against a bare byte copy through a unix socket of the same kind.
//!
//!     cargo run --release --example agent_bench -- [MiB]
//!
//! A benchmark, not a test: it asserts nothing about time.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use builder::machine::agent::AgentMachine;
use builder::machine::{Capture, ExecRequest, Machine};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

#[path = "support/bench.rs"]
mod bench;
use bench::{RoundTrip, mib_s, random_bytes};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mib: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(256);
    let size = mib * 1024 * 1024;
    let dir = tempfile::tempdir()?;
    let exe = dir.path().join("builder-agent");
    fs_err::write(&exe, builder::agent::AGENT_BINARY)?;
    fs_err::set_permissions(&exe, std::fs::Permissions::from_mode(0o755))?;
    println!(
        "agent binary: {} bytes (static, stripped)",
        builder::agent::AGENT_BINARY.len()
    );

    // Bare copy through a unix socket: the ceiling for anything over one.
    let bare_sock = dir.path().join("bare.sock");
    let listener = UnixListener::bind(&bare_sock)?;
    let reader = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return Ok::<u64, std::io::Error>(total);
            }
            total += n as u64;
        }
    });
    let mut w = UnixStream::connect(&bare_sock).await?;
    let chunk = vec![7u8; 1 << 20];
    let t0 = Instant::now();
    for _ in 0..mib {
        w.write_all(&chunk).await?;
    }
    drop(w);
    let got = reader.await??;
    let bare = t0.elapsed();
    println!(
        "bare unix-socket copy:   {:8.1} MiB/s ({got} bytes)",
        mib_s(got, bare)
    );

    let sock = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&sock)?;
    let mut child = std::process::Command::new(&exe)
        .arg("--connect-unix")
        .arg(&sock)
        .spawn()?;
    let (stream, _) = listener.accept().await?;
    let target =
        AgentMachine::connect(stream, "local agent".into(), Duration::from_secs(10)).await?;

    let src = dir.path().join("src.bin");
    fs_err::write(&src, random_bytes(size as usize))?;
    let remote = dir.path().join("remote.bin");
    let back = dir.path().join("back.bin");
    for round in 1..=2 {
        let trip = RoundTrip::run(&target, &src, &remote, &back).await?;
        assert_eq!(trip.put.sha256, trip.get.sha256);
        let (put, get) = trip.speeds();
        println!(
            "round {round}: put {put:8.1} MiB/s   get {get:8.1} MiB/s   ({mib} MiB, sha256 {}…)",
            &trip.put.sha256[..12]
        );
    }

    let n = 200;
    let t0 = Instant::now();
    for _ in 0..n {
        target
            .exec(&ExecRequest::argv(["true"]), &Capture::default())
            .await?;
    }
    println!(
        "exec `true` round trip: {:8.2} ms",
        t0.elapsed().as_secs_f64() * 1000.0 / n as f64
    );
    let t0 = Instant::now();
    for _ in 0..n {
        target.stat(Path::new("/")).await?;
    }
    println!(
        "stat round trip:        {:8.3} ms",
        t0.elapsed().as_secs_f64() * 1000.0 / n as f64
    );
    drop(target);
    let _ = child.kill();
    let _ = child.wait();
    Ok(())
}
