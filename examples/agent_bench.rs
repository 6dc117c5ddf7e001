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
use builder::machine::{Capture, ExecRequest, FileSource, Machine, PutOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64()
}

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
    {
        let mut data = Vec::with_capacity(size as usize);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        while (data.len() as u64) < size {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.extend_from_slice(&x.to_le_bytes());
        }
        fs_err::write(&src, data)?;
    }
    let remote = dir.path().join("remote.bin");
    let back = dir.path().join("back.bin");
    for round in 1..=2 {
        let t0 = Instant::now();
        let put = target
            .put_file(
                &remote,
                FileSource::Path(src.clone()),
                &PutOptions::default(),
            )
            .await?;
        let put_t = t0.elapsed();
        let t0 = Instant::now();
        let get = target.get_file(&remote, &back).await?;
        let get_t = t0.elapsed();
        assert_eq!(put.sha256, get.sha256);
        println!(
            "round {round}: put {:8.1} MiB/s   get {:8.1} MiB/s   ({} MiB, sha256 {}…)",
            mib_s(put.size, put_t),
            mib_s(get.size, get_t),
            mib,
            &put.sha256[..12]
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
