//! Benchmark: the same work with builder and with Packer's QEMU builder (Debian's `packer`
//! package: SSH communicator, file + shell provisioners, compressed qcow2), on the same base
//! image, alternating runs. Prints both wall times, the ratio, the physical limit for the
//! work, and builder's own CPU time outside QEMU and its peak memory.
//!
//! ```text
//! cargo build --release --bin builder
//! BUILDER_TEST_IMAGE=$(fixtures/base-image.sh) cargo run --release --example bench_packer -- [RUNS]
//! ```
//!
//! The work: upload a 50 MiB file into the guest and run one shell step on it
//! (`sha256sum`), then a compressed qcow2 of the result. builder fetches the file on the host
//! (WebDownload from a loopback HTTP server this program runs) and puts it over virtio-serial;
//! Packer uploads it over SSH. builder also generalizes the image (Packer does not); its test
//! stage is off, to match.
//!
//! The physical limit, from builder's own events: the guest's boot until its first
//! cloud-init hook runs (the agent says hello) + the work (the component stage) + the guest's
//! shutdown + one `qemu-img convert` (the export stage).
//!
//! builder's CPU time and peak memory are read from `/proc/<pid>` of the builder process
//! itself (not its children: QEMU and qemu-img are not builder's own work), sampled every
//! 50 ms until it exits.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "support/bench.rs"]
mod bench;
use bench::loadavg;

const BLOB_MIB: usize = 50;

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1);
    let Some(image) = std::env::var_os("BUILDER_TEST_IMAGE").map(PathBuf::from) else {
        eprintln!(
            "bench_packer: set BUILDER_TEST_IMAGE to the fixture base image (fixtures/base-image.sh prints it)"
        );
        std::process::exit(2);
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let builder = root.join("target/release/builder");
    if !builder.is_file() {
        eprintln!("bench_packer: build builder first: cargo build --release --bin builder");
        std::process::exit(2);
    }
    let packer = which("packer");
    let work = tempfile::Builder::new()
        .prefix("bench-packer-")
        .tempdir()
        .expect("temp dir");
    let dir = work.path();

    // The 50 MiB file (random, so compression cannot cheat) and the loopback server.
    let blob = dir.join("blob");
    let mut data = vec![0u8; BLOB_MIB << 20];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in data.chunks_mut(8) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        chunk.copy_from_slice(&seed.to_le_bytes()[..chunk.len()]);
    }
    fs_err::write(&blob, &data).expect("write the blob");
    let port = serve(data);

    let load_before = loadavg();
    let mut packer_times = Vec::new();
    let mut builder_runs = Vec::new();
    for run in 1..=runs {
        match &packer {
            Some(p) => match packer_run(p, &image, &blob, dir, run) {
                Ok(t) => {
                    eprintln!("run {run}: packer  {:.1} s", t.as_secs_f64());
                    packer_times.push(t);
                }
                Err(e) => eprintln!("run {run}: packer failed: {e}"),
            },
            None => eprintln!("run {run}: packer is not installed (apt install packer)"),
        }
        match builder_run(&builder, &image, port, dir, run) {
            Ok(r) => {
                eprintln!(
                    "run {run}: builder {:.1} s (limit {:.1} s, cpu {:.2} s, peak {:.1} MiB)",
                    r.wall.as_secs_f64(),
                    r.limit.as_secs_f64(),
                    r.cpu.as_secs_f64(),
                    r.peak_kib as f64 / 1024.0
                );
                eprintln!("run {run}: builder stages: {}", r.stages);
                builder_runs.push(r);
            }
            Err(e) => eprintln!("run {run}: builder failed: {e}"),
        }
    }

    println!(
        "same work ({BLOB_MIB} MiB upload + a shell step + compressed qcow2), {runs} run(s) each, alternating"
    );
    println!(
        "  load average (1, 5, 15 min): {} before, {} after",
        load_before,
        loadavg()
    );
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    let p = median(packer_times.iter().map(Duration::as_secs_f64).collect());
    let b = median(builder_runs.iter().map(|r| r.wall.as_secs_f64()).collect());
    let l = median(builder_runs.iter().map(|r| r.limit.as_secs_f64()).collect());
    let cpu = median(builder_runs.iter().map(|r| r.cpu.as_secs_f64()).collect());
    let peak = builder_runs.iter().map(|r| r.peak_kib).max();
    if let Some(p) = p {
        println!("  packer   {p:>7.1} s (median wall)");
    } else {
        println!("  packer   (no successful run)");
    }
    if let Some(b) = b {
        println!("  builder  {b:>7.1} s (median wall)");
    }
    if let Some(l) = l {
        println!(
            "  limit    {l:>7.1} s (boot to first cloud-init hook + work + shutdown + one convert)"
        );
    }
    if let (Some(p), Some(b)) = (p, b) {
        println!("  builder / packer = {:.2} (goal <= 0.6)", b / p);
    }
    if let (Some(b), Some(l)) = (b, l) {
        println!("  builder / limit  = {:.2} (goal <= 1.15)", b / l);
    }
    if let (Some(c), Some(b)) = (cpu, b) {
        println!(
            "  builder CPU outside QEMU: {c:.2} s = {:.2} % of the build (goal <= 2 %)",
            c / b * 100.0
        );
    }
    if let Some(k) = peak {
        println!(
            "  builder peak memory: {:.1} MiB (goal <= 50 MiB)",
            k as f64 / 1024.0
        );
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

/// Serve `data` to every GET on a loopback port, in a thread; returns the port.
fn serve(data: Vec<u8>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let port = listener.local_addr().expect("address").port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
            let mut line = String::new();
            // Read the request head.
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                data.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&data);
        }
    });
    port
}

fn packer_run(
    packer: &Path,
    image: &Path,
    blob: &Path,
    dir: &Path,
    run: usize,
) -> Result<Duration, String> {
    let at = dir.join(format!("packer-{run}"));
    fs_err::create_dir_all(at.join("seed")).map_err(|e| e.to_string())?;
    let key = at.join("key");
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .map_err(|e| format!("ssh-keygen: {e}"))?;
    if !status.success() {
        return Err("ssh-keygen failed".into());
    }
    let public = fs_err::read_to_string(key.with_extension("pub")).map_err(|e| e.to_string())?;
    fs_err::write(
        at.join("seed/user-data"),
        format!(
            "#cloud-config\ndisable_root: false\nssh_pwauth: false\nusers:\n  - name: root\n    ssh_authorized_keys:\n      - {}\n",
            public.trim()
        ),
    )
    .map_err(|e| e.to_string())?;
    fs_err::write(
        at.join("seed/meta-data"),
        format!("instance-id: packer-{run}\nlocal-hostname: packer\n"),
    )
    .map_err(|e| e.to_string())?;
    let template = serde_json::json!({
        "builders": [{
            "type": "qemu",
            "iso_url": image,
            "iso_checksum": "none",
            "disk_image": true,
            "skip_resize_disk": true,
            "output_directory": at.join("out"),
            "vm_name": "image.qcow2",
            "format": "qcow2",
            "disk_compression": true,
            "accelerator": "tcg",
            "cpus": 2,
            "memory": 1024,
            "headless": true,
            "net_device": "virtio-net",
            "disk_interface": "virtio",
            "communicator": "ssh",
            "ssh_username": "root",
            "ssh_private_key_file": key,
            "ssh_timeout": "30m",
            "shutdown_command": "poweroff",
            "cd_files": [at.join("seed/user-data"), at.join("seed/meta-data")],
            "cd_label": "cidata",
            "boot_wait": "0s",
        }],
        "provisioners": [
            {"type": "file", "source": blob, "destination": "/root/blob"},
            {"type": "shell", "inline": ["sha256sum /root/blob"]},
        ],
    });
    let file = at.join("template.json");
    fs_err::write(&file, template.to_string()).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let out = Command::new(packer)
        .arg("build")
        .arg(&file)
        .current_dir(&at)
        .env("PACKER_LOG", "0")
        .env("CHECKPOINT_DISABLE", "1")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("packer: {e}"))?;
    let took = t0.elapsed();
    let _ = fs_err::write(at.join("packer.log"), &out.stdout);
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stdout);
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!(
            "exit {:?}:\n{}",
            out.status.code(),
            tail.join("\n")
        ));
    }
    let _ = fs_err::remove_dir_all(&at);
    Ok(took)
}

struct BuilderRun {
    wall: Duration,
    limit: Duration,
    cpu: Duration,
    peak_kib: u64,
    /// Where builder's time went: agent up, cloud-init done, and each stage's duration.
    stages: String,
}

fn builder_run(
    builder: &Path,
    image: &Path,
    port: u16,
    dir: &Path,
    run: usize,
) -> Result<BuilderRun, String> {
    let at = dir.join(format!("builder-{run}"));
    fs_err::create_dir_all(&at).map_err(|e| e.to_string())?;
    fs_err::write(
        at.join("upload.yml"),
        format!(
            "name: upload-and-hash\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n      - name: Upload\n        action: WebDownload\n        inputs:\n          - source: http://127.0.0.1:{port}/blob\n            destination: /root/blob\n      - name: Hash\n        action: ExecuteBash\n        inputs:\n          commands:\n            - sha256sum /root/blob\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    fs_err::write(
        at.join("recipe.yml"),
        format!(
            "name: bench\nversion: 1.0.0\nparentImage: {}\ncomponents:\n  - path: upload.yml\ninfrastructure:\n  cpus: 2\n  memory: 1GiB\n  accelerator: tcg\ntests:\n  enabled: false\noutputs:\n  formats: [qcow2]\n  compression: zlib\n",
            image.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let mut child = Command::new(builder)
        .arg("build")
        .arg(at.join("recipe.yml"))
        .arg("--json")
        .arg("--store")
        .arg(at.join("store"))
        .env("XDG_RUNTIME_DIR", &at)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("builder: {e}"))?;
    let pid = child.id();
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let ticks = clock_ticks();
    let (mut cpu_ticks, mut peak_kib) = (0u64, 0u64);
    let status = loop {
        if let Some((t, k)) = sample(pid) {
            cpu_ticks = cpu_ticks.max(t);
            peak_kib = peak_kib.max(k);
        }
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(e.to_string()),
        }
    };
    let wall = t0.elapsed();
    let events = reader.join().unwrap_or_default();
    if !status.success() {
        return Err(format!(
            "exit {:?}; logs in {}",
            status.code(),
            at.display()
        ));
    }
    let mut limit = 0.0;
    let mut stages = Vec::new();
    for line in events.lines() {
        let Ok(e) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let stage = e["stage"].as_str().unwrap_or_default();
        if e["event"] == "progress"
            && stage == "boot"
            && let Some(m) = e["message"].as_str()
            && (m.starts_with("agent up") || m.starts_with("cloud-init"))
        {
            stages.push(m.to_string());
        }
        if e["event"] == "stageFinished"
            && let Some(ms) = e["durationMs"].as_f64()
            && ms > 0.0
        {
            stages.push(format!("{stage} {:.1} s", ms / 1000.0));
        }
        if e["event"] == "progress"
            && stage == "boot"
            && let Some(s) = e["message"]
                .as_str()
                .and_then(|m| m.strip_prefix("agent up after "))
                .and_then(|m| m.trim_end_matches(" s").parse::<f64>().ok())
        {
            limit += s;
        }
        if e["event"] == "stageFinished" && matches!(stage, "component" | "shutdown" | "export") {
            limit += e["durationMs"].as_f64().unwrap_or(0.0) / 1000.0;
        }
    }
    let _ = fs_err::remove_dir_all(&at);
    Ok(BuilderRun {
        wall,
        limit: Duration::from_secs_f64(limit),
        cpu: Duration::from_secs_f64(cpu_ticks as f64 / ticks),
        peak_kib,
        stages: stages.join(", "),
    })
}

/// The process's own user+system ticks and its peak resident memory (KiB).
fn sample(pid: u32) -> Option<(u64, u64)> {
    let stat = fs_err::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = fs_err::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let peak = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    Some((ticks, peak))
}

fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)
        .map_or(100.0, |t| t as f64)
}
