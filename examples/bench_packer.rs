//! Benchmark: the same work with builder (its build VM booting the guest's own OS, and in
//! the appliance: `infrastructure.boot: appliance`), with Packer's QEMU builder (Debian's
//! `packer` package: SSH communicator, file + shell provisioners, compressed qcow2) and with
//! libguestfs's `virt-customize` (no boot of the guest: its own appliance, then `qemu-img
//! convert -c`), on the same base image, the four interleaved in each run. Prints the wall
//! times, the ratios, where the time goes, the physical limit for the work, and builder's own
//! CPU time outside QEMU and its peak memory.
//!
//! ```text
//! cargo build --release --bin builder
//! BUILDER_TEST_IMAGE=$(fixtures/base-image.sh) cargo run --release --example bench_packer -- [RUNS]
//! ```
//!
//! The work: upload a 50 MiB file into the guest and run one shell step on it
//! (`sha256sum`), then a compressed qcow2 of the result. builder fetches the file on the host
//! (WebDownload from a loopback HTTP server this program runs) and puts it over virtio-serial;
//! Packer uploads it over SSH; virt-customize with `--upload`. builder also generalizes the
//! image (the others do not); its test stage is off, to match.
//!
//! The physical limit, from builder's own events: the guest's boot until the agent says
//! hello (in full mode, the first cloud-init hook) + the work (the component stage) + the
//! guest's shutdown + one `qemu-img convert` (the export stage).
//!
//! virt-customize runs on a qcow2 overlay of the base (as builder does), with
//! `LIBGUESTFS_BACKEND=direct` and `LIBGUESTFS_BACKEND_SETTINGS=force_tcg` (TCG, as the others
//! here), without a network (the others have none either). Its first run builds its own
//! appliance cache (supermin, in `/var/tmp`), as builder's first appliance run builds its
//! initramfs: the medians over several runs leave that out.
//!
//! builder's CPU time and peak memory are read from `/proc/<pid>` of the builder process
//! itself (not its children: QEMU and qemu-img are not builder's own work), sampled every
//! 50 ms until it exits.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "support/bench.rs"]
mod bench;
use bench::loadavg;

#[path = "../tests/support/http.rs"]
mod http;

const BLOB_MIB: usize = 50;

/// The median of `v`, if any.
fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

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
    let virt_customize = which("virt-customize");
    let work = tempfile::Builder::new()
        .prefix("bench-packer-")
        .tempdir()
        .expect("temp dir");
    let dir = work.path();

    // The 50 MiB file (random, so compression cannot cheat) and the loopback server.
    let blob = dir.join("blob");
    let data = bench::random_bytes(BLOB_MIB << 20);
    fs_err::write(&blob, &data).expect("write the blob");
    let server = http::HostHttp::start([("/blob", data)]);

    let load_before = loadavg();
    let mut packer_times = Vec::new();
    let mut full_runs = Vec::new();
    let mut appliance_runs = Vec::new();
    let mut vc_runs = Vec::new();
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
        for (boot, runs) in [("full", &mut full_runs), ("appliance", &mut appliance_runs)] {
            match builder_run(&builder, &image, server.port, dir, run, boot) {
                Ok(r) => {
                    eprintln!(
                        "run {run}: builder ({boot}) {:.1} s (limit {:.1} s, cpu {:.2} s, peak {:.1} MiB)",
                        r.wall.as_secs_f64(),
                        r.limit.as_secs_f64(),
                        r.cpu.as_secs_f64(),
                        r.peak_kib as f64 / 1024.0
                    );
                    eprintln!("run {run}: builder ({boot}) stages: {}", r.stages);
                    runs.push(r);
                }
                Err(e) => eprintln!("run {run}: builder ({boot}) failed: {e}"),
            }
        }
        match &virt_customize {
            Some(v) => match virt_customize_run(v, &image, &blob, dir, run) {
                Ok(r) => {
                    eprintln!(
                        "run {run}: virt-customize {:.1} s (launch and inspection {:.1} s, work {:.1} s, finish {:.1} s, export {:.1} s)",
                        r.wall.as_secs_f64(),
                        r.launch,
                        r.work,
                        r.finish,
                        r.export
                    );
                    vc_runs.push(r);
                }
                Err(e) => eprintln!("run {run}: virt-customize failed: {e}"),
            },
            None => eprintln!(
                "run {run}: virt-customize is not installed (apt install libguestfs-tools)"
            ),
        }
    }

    println!(
        "same work ({BLOB_MIB} MiB upload + a shell step + compressed qcow2), {runs} run(s) each, interleaved"
    );
    println!(
        "  load average (1, 5, 15 min): {} before, {} after",
        load_before,
        loadavg()
    );
    let p = median(packer_times.iter().map(Duration::as_secs_f64).collect());
    let v = median(vc_runs.iter().map(|r| r.wall.as_secs_f64()).collect());
    let show = |name: &str, t: Option<f64>| match t {
        Some(t) => println!("  {name:<19} {t:>7.1} s (median wall)"),
        None => println!("  {name:<19} (no successful run)"),
    };
    show("packer", p);
    let full = Summary::of(&full_runs);
    let appliance = Summary::of(&appliance_runs);
    show("builder (full boot)", full.as_ref().map(|s| s.wall));
    show("builder (appliance)", appliance.as_ref().map(|s| s.wall));
    show("virt-customize", v);
    if let Some(f) = &full {
        println!("  builder (full boot):");
        f.print(p, None, "<= 0.6");
    }
    if let Some(a) = &appliance {
        println!("  builder (appliance):");
        if let Some(up) = a.agent_up {
            println!("    agent hello {up:.1} s after QEMU started (goal <= 8 s)");
        }
        a.print(p, v, "<= 0.35");
    }
    if let Some(v) = median(vc_runs.iter().map(|r| r.launch).collect()) {
        let part = |f: fn(&VcRun) -> f64| median(vc_runs.iter().map(f).collect()).unwrap_or(0.0);
        println!(
            "  virt-customize: launch and inspection {v:.1} s, work {:.1} s, finish {:.1} s, export {:.1} s",
            part(|r| r.work),
            part(|r| r.finish),
            part(|r| r.export)
        );
    }
}

/// The medians of one kind of builder run.
struct Summary {
    wall: f64,
    limit: f64,
    cpu: f64,
    peak_kib: u64,
    agent_up: Option<f64>,
    /// Each stage's median (seconds), in the order of the first run.
    stages: Vec<(String, f64)>,
}

impl Summary {
    fn of(runs: &[BuilderRun]) -> Option<Summary> {
        let first = runs.first()?;
        let m = |f: &dyn Fn(&BuilderRun) -> f64| median(runs.iter().map(f).collect());
        Some(Summary {
            wall: m(&|r| r.wall.as_secs_f64())?,
            limit: m(&|r| r.limit.as_secs_f64())?,
            cpu: m(&|r| r.cpu.as_secs_f64())?,
            peak_kib: runs.iter().map(|r| r.peak_kib).max()?,
            agent_up: median(runs.iter().filter_map(|r| r.agent_up).collect()),
            stages: first
                .durations
                .iter()
                .map(|(stage, _)| {
                    let each = runs
                        .iter()
                        .filter_map(|r| r.durations.iter().find(|(s, _)| s == stage))
                        .map(|(_, d)| *d)
                        .collect();
                    (stage.clone(), median(each).unwrap_or(0.0))
                })
                .collect(),
        })
    }

    fn print(&self, packer: Option<f64>, virt_customize: Option<f64>, packer_goal: &str) {
        let b = self.wall;
        let staged: f64 = self.stages.iter().map(|(_, d)| d).sum();
        let stages: Vec<String> = self
            .stages
            .iter()
            .map(|(s, d)| format!("{s} {d:.1} s"))
            .collect();
        println!(
            "    where the time goes: {}, outside the stages {:.1} s",
            stages.join(", "),
            (b - staged).max(0.0)
        );
        if let Some(p) = packer {
            println!("    builder / packer = {:.2} (goal {packer_goal})", b / p);
        }
        if let Some(v) = virt_customize {
            println!("    builder / virt-customize = {:.2} (goal < 1)", b / v);
        }
        println!(
            "    limit {:.1} s (boot to the agent's hello + work + shutdown + one convert); builder / limit = {:.2} (goal <= 1.15)",
            self.limit,
            b / self.limit
        );
        println!(
            "    builder CPU outside QEMU: {:.2} s = {:.2} % of the build (goal <= 2 %); peak memory {:.1} MiB (goal <= 50 MiB)",
            self.cpu,
            self.cpu / b * 100.0,
            self.peak_kib as f64 / 1024.0
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
    /// Seconds from QEMU's start until the agent said hello (the build VM's boot).
    agent_up: Option<f64>,
    /// Each stage that took time, in order, in seconds.
    durations: Vec<(String, f64)>,
    /// Where builder's time went: agent up, cloud-init done, and each stage's duration.
    stages: String,
}

/// One `builder build` of the work, its build VM booting `boot` (`full` or `appliance`).
fn builder_run(
    builder: &Path,
    image: &Path,
    port: u16,
    dir: &Path,
    run: usize,
    boot: &str,
) -> Result<BuilderRun, String> {
    let at = dir.join(format!("builder-{boot}-{run}"));
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
            "name: bench\nversion: 1.0.0\nparentImage: {}\ncomponents:\n  - path: upload.yml\ninfrastructure:\n  cpus: 2\n  memory: 1GiB\n  accelerator: tcg\n{}tests:\n  enabled: false\noutputs:\n  formats: [qcow2]\n  compression: zlib\n",
            image.display(),
            // `full` is the default: its recipe reads as the one before the appliance existed.
            if boot == "full" {
                String::new()
            } else {
                format!("  boot: {boot}\n")
            }
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
    let mut agent_up = None;
    let mut stages = Vec::new();
    let mut durations = Vec::new();
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
            durations.push((stage.to_string(), ms / 1000.0));
        }
        if e["event"] == "progress"
            && stage == "boot"
            && let Some(s) = e["message"]
                .as_str()
                .and_then(|m| m.strip_prefix("agent up after "))
                .and_then(|m| m.trim_end_matches(" s").parse::<f64>().ok())
        {
            limit += s;
            agent_up.get_or_insert(s);
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
        agent_up,
        durations,
        stages: stages.join(", "),
    })
}

/// One virt-customize run: seconds in each part, from its own progress lines (`[  52.9]
/// Setting a random seed`) and the export's clock.
struct VcRun {
    wall: Duration,
    /// Until its first line after `Examining the guest ...`: the appliance's launch and the
    /// guest's inspection.
    launch: f64,
    /// From `Uploading` to `Finishing off`.
    work: f64,
    /// The rest of virt-customize (before the upload, and finishing off).
    finish: f64,
    /// `qemu-img convert -c -O qcow2`.
    export: f64,
}

/// The same work with virt-customize on a qcow2 overlay of the base, then the same compressed
/// qcow2 export as the others.
fn virt_customize_run(
    virt_customize: &Path,
    image: &Path,
    blob: &Path,
    dir: &Path,
    run: usize,
) -> Result<VcRun, String> {
    let at = dir.join(format!("virt-customize-{run}"));
    fs_err::create_dir_all(&at).map_err(|e| e.to_string())?;
    let overlay = at.join("overlay.qcow2");
    let t0 = Instant::now();
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(image)
        .arg(&overlay)
        .output()
        .map_err(|e| format!("qemu-img: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img create: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let out = Command::new(virt_customize)
        .arg("-a")
        .arg(&overlay)
        .arg("--no-network")
        .arg("--upload")
        .arg(format!("{}:/root/blob", blob.display()))
        .args(["--run-command", "sha256sum /root/blob"])
        .env("LIBGUESTFS_BACKEND", "direct")
        .env("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("virt-customize: {e}"))?;
    let customized = t0.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "exit {:?}:\n{text}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // `[  53.5] Uploading: …`: seconds since virt-customize started, then what it does.
    let marks: Vec<(f64, &str)> = text
        .lines()
        .filter_map(|l| {
            let (at, what) = l.strip_prefix('[')?.split_once(']')?;
            Some((at.trim().parse().ok()?, what.trim()))
        })
        .collect();
    let when = |prefix: &str| {
        marks
            .iter()
            .find(|(_, w)| w.starts_with(prefix))
            .map(|m| m.0)
    };
    let launch = marks
        .iter()
        .skip_while(|(_, w)| !w.starts_with("Examining the guest"))
        .nth(1)
        .map_or(0.0, |m| m.0);
    let work = match (when("Uploading"), when("Finishing off")) {
        (Some(a), Some(b)) => b - a,
        _ => 0.0,
    };
    let t1 = Instant::now();
    let out = Command::new("qemu-img")
        .args(["convert", "-c", "-O", "qcow2"])
        .arg(&overlay)
        .arg(at.join("image.qcow2"))
        .output()
        .map_err(|e| format!("qemu-img: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img convert: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let export = t1.elapsed().as_secs_f64();
    let wall = t0.elapsed();
    let _ = fs_err::remove_dir_all(&at);
    Ok(VcRun {
        wall,
        launch,
        work,
        finish: (customized - launch - work).max(0.0),
        export,
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
