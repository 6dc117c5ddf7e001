//! Benchmark: our agent against what a guest offers without it, in the same conditions (same
//! image, same VM size, same accelerator: KVM when it really works, TCG otherwise). Prints a
//! table with ratios and whether each goal of issue 3 is met; it asserts nothing (exit 0 either
//! way, unless a VM cannot be booted at all).
//!
//! ```text
//! BUILDER_TEST_IMAGE=$(fixtures/base-image.sh) cargo run --release --example bench_vm -- \
//!     [--mib 256] [--rounds 2] [--execs 30] [--ssh 5] [--raw-boots 2] [--variant AGENT]...
//! ```
//!
//! What runs:
//! - raw boots: the image with a NoCloud seed but without our agent, whose `bootcmd` (cloud-init's
//!   first user hook) writes a marker on the serial console; timed from QEMU's start to the
//!   marker. One before and one after the agent VM (`--raw-boots`).
//! - the agent VM: the same seed plus our agent, a second virtio-serial port for bare copies,
//!   and user-mode networking with a port forward on 127.0.0.1 (in this benchmark only) for
//!   `ssh`/`scp` with a key injected through user data. Boot-to-agent is timed from QEMU's
//!   start to the agent's hello. After cloud-init finished, in alternating rounds: no-op exec
//!   over the agent vs `ssh … true`; upload and download over the agent (put/get, sha256
//!   verified on both ends) vs `scp` vs a bare byte copy through the second port (guest `dd`
//!   from/to `/dev/virtio-ports/…` in 1 MiB blocks, host reading/writing the chardev socket).
//! - `--variant AGENT` (any number): another agent build, uploaded into the same VM and served
//!   on the second port, measured with the same put/get, so agent changes compare in one boot.
//! - `--guest-run PROGRAM` (any number): a static program uploaded into the same VM and run
//!   there after the measurements, its output printed (e.g. a hashing micro-benchmark).
//!
//! Every VM runs in its own process group with a parent-death signal and is killed, and every
//! temporary file removed, on success, error, Ctrl-C and SIGTERM.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use builder::machine::agent::AgentMachine;
use builder::machine::{Capture, Discard, ExecRequest, FileSource, Machine, PutOptions};
use builder::recipe::Network;
use builder::vm::argv::{Accel, DiskFormat, FirmwareFiles, SerialPort, VmSpec};
use builder::vm::{img, process, seed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

#[path = "support/bench.rs"]
mod bench;
use bench::{loadavg, mib_s, random_bytes};

const BENCH_PORT: &str = "org.builder.bench.0";
const CPUS: u32 = 2;
const MEMORY_MIB: u64 = 1024;
/// Written by the guest's bootcmd on the serial console. The user data holds the arithmetic,
/// not the result, so only running the hook can print it.
const MARKER: &str = "BUILDER-BENCH-HOOK-42";
const MARKER_CMD: &str = r#"echo "BUILDER-BENCH-HOOK-$((40+2))" > /dev/ttyS0"#;
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

struct Args {
    image: PathBuf,
    mib: u64,
    rounds: usize,
    execs: usize,
    ssh: usize,
    raw_boots: usize,
    variants: Vec<PathBuf>,
    guest_runs: Vec<PathBuf>,
}

fn parse_args() -> anyhow::Result<Args> {
    let image = std::env::var_os("BUILDER_TEST_IMAGE")
        .map(PathBuf::from)
        .context(
            "set BUILDER_TEST_IMAGE to the fixture base image (fixtures/base-image.sh prints it)",
        )?;
    let mut a = Args {
        image,
        mib: 256,
        rounds: 2,
        execs: 30,
        ssh: 5,
        raw_boots: 2,
        variants: Vec::new(),
        guest_runs: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--mib" => a.mib = value()?.parse()?,
            "--rounds" => a.rounds = value()?.parse()?,
            "--execs" => a.execs = value()?.parse()?,
            "--ssh" => a.ssh = value()?.parse()?,
            "--raw-boots" => a.raw_boots = value()?.parse()?,
            "--variant" => a.variants.push(value()?.into()),
            "--guest-run" => a.guest_runs.push(value()?.into()),
            other => bail!(
                "unknown argument `{other}`; expected --mib, --rounds, --execs, --ssh, --raw-boots, --variant or --guest-run"
            ),
        }
    }
    if a.rounds == 0 || a.execs == 0 || a.ssh == 0 || a.mib == 0 {
        bail!("--mib, --rounds, --execs and --ssh must be at least 1");
    }
    Ok(a)
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench_vm: {e:#}");
            std::process::exit(2);
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler can be installed");
    // Dropping `run` (on a signal) drops its VM guards and temp dirs: QEMU is killed and every
    // file removed before the process exits.
    let code = tokio::select! {
        r = run(args) => match r {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("bench_vm: {e:#}");
                1
            }
        },
        _ = tokio::signal::ctrl_c() => { eprintln!("bench_vm: interrupted; cleaned up"); 130 }
        _ = term.recv() => { eprintln!("bench_vm: terminated; cleaned up"); 143 }
    };
    std::process::exit(code);
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

// ---------------------------------------------------------------------------------------------
// One VM, owned: killed (whole process group) and its folder removed when dropped.

struct Vm {
    child: process::Child,
    started: Instant,
    console: PathBuf,
    agent_socket: PathBuf,
    bench_socket: PathBuf,
    ssh_port: u16,
    /// Dropped after QEMU is killed (fields drop after `Drop::drop`).
    _dir: tempfile::TempDir,
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Err(e) = process::kill_group(self.child.pid(), &self.child.exit_watch()) {
            eprintln!("bench_vm: warning: {e}");
        }
    }
}

struct Common {
    qemu: PathBuf,
    accel: Accel,
    image: PathBuf,
    image_format: DiskFormat,
    public_key: String,
}

fn user_data(public_key: &str) -> String {
    format!(
        "#cloud-config\ndisable_root: false\nssh_pwauth: false\nusers:\n  - name: root\n    ssh_authorized_keys:\n      - {}\nbootcmd:\n  - [sh, -c, '{MARKER_CMD}']\n",
        public_key.trim()
    )
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

async fn launch(common: &Common, with_agent: bool) -> anyhow::Result<Vm> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("bench-vm-")
        .tempdir_in(base)?;
    let p = |n: &str| dir.path().join(n);
    img::create_overlay(&common.image, common.image_format, &p("disk.qcow2"), None).await?;
    let agent = if with_agent {
        Some(builder::agent::AGENT_BINARY.to_vec())
    } else {
        None
    };
    seed::write_seed(
        &p("seed.img"),
        &seed::SeedContent {
            instance_id: format!("bench-{}", uuid::Uuid::new_v4()),
            hostname: "bench".into(),
            agent,
            user_data: Some(user_data(&common.public_key)),
            network_disabled: false,
        },
    )?;
    let ssh_port = free_port()?;
    let mut ports = vec![SerialPort {
        name: BENCH_PORT.into(),
        socket: p("bench.sock"),
    }];
    if with_agent {
        ports.insert(
            0,
            SerialPort {
                name: seed::AGENT_PORT.into(),
                socket: p("agent.sock"),
            },
        );
    }
    let spec = VmSpec {
        name: "builder-bench".into(),
        accel: common.accel,
        cpus: CPUS,
        memory_mib: MEMORY_MIB,
        firmware: FirmwareFiles::Bios,
        direct_kernel: None,
        disk: p("disk.qcow2"),
        disk_format: DiskFormat::Qcow2,
        seed: Some(p("seed.img")),
        ports,
        network: Network::User,
        qmp_socket: p("qmp.sock"),
        console_log: p("console.log"),
        pidfile: p("qemu.pid"),
    };
    let mut argv = builder::vm::argv::qemu_argv(&spec);
    // The only port forward anywhere in builder: ssh for the comparison, on loopback.
    let nic = argv
        .iter()
        .position(|a| a == "-nic")
        .context("the argv has a -nic")?;
    argv[nic + 1] = format!("user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{ssh_port}-:22");
    // Named threads ("CPU 0/TCG"), to report whether TCG runs one thread per vCPU.
    if let Some(name) = argv.iter().position(|a| a == "-name") {
        argv[name + 1].push_str(",debug-threads=on");
    }
    let child = process::spawn(&common.qemu, &argv, &p("qemu.log"))?;
    let started = Instant::now();
    Ok(Vm {
        child,
        started,
        console: p("console.log"),
        agent_socket: p("agent.sock"),
        bench_socket: p("bench.sock"),
        ssh_port,
        _dir: dir,
    })
}

impl Vm {
    /// Connect to a chardev socket as soon as QEMU created it.
    async fn connect(&self, socket: &Path) -> anyhow::Result<UnixStream> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(exit) = self.child.exit() {
                bail!("QEMU exited ({exit:?}) before {} existed", socket.display());
            }
            match UnixStream::connect(socket).await {
                Ok(s) => return Ok(s),
                Err(e) if Instant::now() > deadline => {
                    return Err(e).with_context(|| format!("connect {}", socket.display()));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    /// Time from QEMU's start until the marker is on the console.
    async fn wait_marker(&self) -> anyhow::Result<Duration> {
        let mut seen = 0usize;
        loop {
            if let Some(exit) = self.child.exit() {
                bail!("QEMU exited ({exit:?}) before the bootcmd marker");
            }
            if let Ok(text) = fs_err::read(&self.console) {
                let from = seen.saturating_sub(MARKER.len());
                if text[from..]
                    .windows(MARKER.len())
                    .any(|w| w == MARKER.as_bytes())
                {
                    return Ok(self.started.elapsed());
                }
                seen = text.len();
            }
            if self.started.elapsed() > BOOT_TIMEOUT {
                bail!("no bootcmd marker within {} s", BOOT_TIMEOUT.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// QEMU's vCPU threads: "CPU 0/TCG", "CPU 1/TCG" with multi-threaded TCG, one
    /// "ALL CPUs/TCG" without.
    fn vcpu_threads(&self) -> Vec<String> {
        let Ok(tasks) = fs_err::read_dir(format!("/proc/{}/task", self.child.pid())) else {
            return Vec::new();
        };
        let mut names: Vec<String> = tasks
            .flatten()
            .filter_map(|t| fs_err::read_to_string(t.path().join("comm")).ok())
            .map(|c| c.trim().to_string())
            .filter(|c| c.contains("CPU"))
            .collect();
        names.sort();
        names
    }
}

// ---------------------------------------------------------------------------------------------

async fn run(args: Args) -> anyhow::Result<()> {
    let qemu = process::find_program("qemu-system-x86_64")?;
    let decision = builder::vm::accel::decide(builder::recipe::Accelerator::Auto, &qemu).await?;
    if let Some(why) = &decision.fallback_reason {
        eprintln!("bench_vm: KVM not usable ({why}); using TCG");
    }
    let info = img::info(&args.image).await?;
    let work = tempfile::Builder::new()
        .prefix("bench-vm-host-")
        .tempdir()?;
    let key = work.path().join("key");
    let status = tokio::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .await
        .context("ssh-keygen (openssh-client)")?;
    if !status.success() {
        bail!("ssh-keygen failed");
    }
    let common = Common {
        qemu,
        accel: decision.accel,
        image: args.image.clone(),
        image_format: info.disk_format()?,
        public_key: fs_err::read_to_string(key.with_extension("pub"))?,
    };
    let mut raw_boots = Vec::new();
    let mut raw_loads = Vec::new();

    // Raw boots around the agent VM: one before, the rest after.
    if args.raw_boots > 0 {
        let (t, l) = raw_boot(&common, 1).await?;
        raw_boots.push(t);
        raw_loads.push(l);
    }

    // The agent VM.
    let load_boot = loadavg();
    eprintln!("agent VM: booting (load {load_boot})");
    let vm = launch(&common, true).await?;
    let agent_stream = vm.connect(&vm.agent_socket).await?;
    let mut bench = Some(vm.connect(&vm.bench_socket).await?);
    let marker = async {
        // A marker missing in the agent VM is not worth failing for: it is a side figure.
        vm.wait_marker().await.ok()
    };
    let hello = async {
        let t = AgentMachine::connect(agent_stream, "bench VM".into(), BOOT_TIMEOUT).await;
        (t, vm.started.elapsed())
    };
    let ((agent, agent_up), marker_in_agent_vm) = tokio::join!(hello, marker);
    let agent = Arc::new(agent.context("the agent did not say hello")?);
    eprintln!(
        "agent VM: agent up after {:.1} s, bootcmd marker after {}",
        agent_up.as_secs_f64(),
        marker_in_agent_vm.map_or("(not seen)".into(), |m| format!("{:.1} s", m.as_secs_f64()))
    );
    let ready = agent.wait_ready(true, BOOT_TIMEOUT).await?;
    eprintln!(
        "agent VM: cloud-init {} after {:.1} s",
        ready.cloud_init.as_deref().unwrap_or("?"),
        vm.started.elapsed().as_secs_f64()
    );
    let vcpus = vm.vcpu_threads();
    // How long cloud-init's bootcmd module took in the agent VM: our agent's install runs
    // there before any user hook.
    let blame = Capture::default();
    let _ = agent
        .exec(
            &ExecRequest::bash("cloud-init analyze blame 2>/dev/null | grep -m1 bootcmd"),
            &blame,
        )
        .await;
    let bootcmd_blame =
        Some(String::from_utf8_lossy(&blame.stdout()).trim().to_string()).filter(|b| !b.is_empty());

    // Exec round trips, alternating with ssh.
    let ssh = Ssh {
        key: key.clone(),
        port: vm.ssh_port,
    };
    ssh.wait_up().await?;
    let load_exec = loadavg();
    let mut exec_ms = Vec::new();
    let mut ssh_ms = Vec::new();
    let per_ssh = args.execs.div_ceil(args.ssh);
    for _ in 0..2 {
        agent.exec(&ExecRequest::argv(["true"]), &Discard).await?;
    }
    for _ in 0..args.ssh {
        for _ in 0..per_ssh {
            let t0 = Instant::now();
            let out = agent.exec(&ExecRequest::argv(["true"]), &Discard).await?;
            exec_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
            if !out.status.success() {
                bail!("`true` over the agent: {}", out.status);
            }
        }
        let t0 = Instant::now();
        ssh.run(&["true"]).await?;
        ssh_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    // The channel's own round trip (a Ping), for scale: what an exec costs beyond it is the
    // guest starting a process.
    let mut ping_ms = Vec::new();
    for _ in 0..args.execs {
        let t0 = Instant::now();
        agent.ping().await?;
        ping_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    eprintln!(
        "exec: agent median {:.1} ms ({} runs), ssh median {:.0} ms ({} runs)",
        median(&exec_ms),
        exec_ms.len(),
        median(&ssh_ms),
        ssh_ms.len()
    );

    // Transfers.
    let size = args.mib << 20;
    let src = work.path().join("src.bin");
    let data = random_bytes(size as usize);
    fs_err::write(&src, &data)?;
    let back = work.path().join("back.bin");
    let remote = Path::new("/root/bench.bin");
    let mut t = Transfers::default();
    let load_xfer_start = loadavg();
    let cpu = CpuClock::new(vm.child.pid());
    for round in 1..=args.rounds {
        let stream = bench.as_mut().context("bench port connected")?;
        let c0 = cpu.sample();
        let up = bare_up(&agent, stream, &data, None).await?;
        let c1 = cpu.sample();
        let up_file = bare_up(&agent, stream, &data, Some("/root/bare.bin")).await?;
        let c2 = cpu.sample();
        let t0 = Instant::now();
        let put = agent
            .put_file(
                remote,
                FileSource::Path(src.clone()),
                &PutOptions::default(),
            )
            .await?;
        let put_t = t0.elapsed();
        let c3 = cpu.sample();
        let scp_up = ssh.scp_up(&src, "/root/scp.bin").await?;
        let c4 = cpu.sample();
        let down = bare_down(&agent, stream, size, None).await?;
        let c5 = cpu.sample();
        let down_file = bare_down(&agent, stream, size, Some("/root/bench.bin")).await?;
        let c6 = cpu.sample();
        let t0 = Instant::now();
        let get = agent.get_file(remote, &back).await?;
        let get_t = t0.elapsed();
        let c7 = cpu.sample();
        for (what, from, to) in [
            ("bare up", c0, c1),
            ("bare to file", c1, c2),
            ("agent put", c2, c3),
            ("bare down", c4, c5),
            ("bare from file", c5, c6),
            ("agent get", c6, c7),
        ] {
            let per_100 = 100.0 / args.mib as f64;
            t.cpu.push(format!(
                "{what}: QEMU {:.2} s, this process {:.2} s",
                (to.0 - from.0) * per_100,
                (to.1 - from.1) * per_100
            ));
        }
        if put.sha256 != get.sha256 || put.size != size {
            bail!("put and get disagree: {put:?} vs {get:?}");
        }
        let scp_down = ssh.scp_down("/root/scp.bin", &back).await?;
        let row = [
            mib_s(size, up),
            mib_s(size, put_t),
            mib_s(size, scp_up),
            mib_s(size, down),
            mib_s(size, get_t),
            mib_s(size, scp_down),
            mib_s(size, up_file),
            mib_s(size, down_file),
        ];
        eprintln!(
            "round {round} (load {}): up bare {:.1} bare-to-file {:.1} agent {:.1} scp {:.1}   down bare {:.1} bare-from-file {:.1} agent {:.1} scp {:.1} MiB/s",
            loadavg(),
            row[0],
            row[6],
            row[1],
            row[2],
            row[3],
            row[7],
            row[4],
            row[5]
        );
        t.bare_up.push(row[0]);
        t.put.push(row[1]);
        t.scp_up.push(row[2]);
        t.bare_down.push(row[3]);
        t.get.push(row[4]);
        t.bare_up_file.push(row[6]);
        t.bare_down_file.push(row[7]);
        t.scp_down.push(row[5]);
    }
    let load_xfer_end = loadavg();
    let _ = agent
        .exec(
            &ExecRequest::argv([
                "rm",
                "-f",
                "/root/bench.bin",
                "/root/scp.bin",
                "/root/bare.bin",
            ]),
            &Discard,
        )
        .await;

    // Other agent builds on the second port, same put/get.
    let mut variant_rows = Vec::new();
    for (k, path) in args.variants.iter().enumerate() {
        drop(bench.take());
        let (put, get) = variant(&vm, &agent, k, path, &src, &back, args.rounds).await?;
        variant_rows.push((path.clone(), put, get));
    }
    for (k, path) in args.guest_runs.iter().enumerate() {
        let remote = format!("/root/bench-run-{k}");
        agent
            .put_file(
                Path::new(&remote),
                FileSource::Path(path.clone()),
                &PutOptions {
                    mode: Some(0o755),
                    ..PutOptions::default()
                },
            )
            .await?;
        let out = Capture::default();
        let status = agent
            .exec(&ExecRequest::argv([remote.as_str()]), &out)
            .await?
            .status;
        eprintln!(
            "guest run {} ({status}, load {}):\n{}{}",
            path.display(),
            loadavg(),
            String::from_utf8_lossy(&out.stdout()),
            String::from_utf8_lossy(&out.stderr())
        );
        let _ = agent
            .exec(&ExecRequest::argv(["rm", "-f", remote.as_str()]), &Discard)
            .await;
    }
    drop(agent);
    drop(vm);

    for i in 1..args.raw_boots {
        let (t, l) = raw_boot(&common, i + 1).await?;
        raw_boots.push(t);
        raw_loads.push(l);
    }

    // The table.
    let accel = match decision.accel {
        Accel::Kvm => "KVM".to_string(),
        Accel::Tcg => format!(
            "TCG ({})",
            if vcpus.len() >= 2 {
                format!("multi-threaded: {}", vcpus.join(", "))
            } else {
                format!("vCPU threads: {vcpus:?}")
            }
        ),
    };
    println!();
    println!(
        "bench_vm: {} — {accel}, {CPUS} vCPUs, {MEMORY_MIB} MiB, user-net",
        args.image.display()
    );
    println!(
        "load average: raw boots {}; agent boot {load_boot}; exec {load_exec}; transfers {load_xfer_start} → {load_xfer_end}",
        raw_loads.join(" / ")
    );
    println!();
    println!(
        "{:<34} {:>12} {:>30} {:>14}  {:<28} met",
        "measure", "agent", "reference", "ratio", "goal"
    );
    let raw = median(
        &raw_boots
            .iter()
            .map(Duration::as_secs_f64)
            .collect::<Vec<_>>(),
    );
    let up_s = agent_up.as_secs_f64();
    let row = |what: &str, a: String, r: String, ratio: String, goal: &str, met: bool| {
        println!(
            "{what:<34} {a:>12} {r:>30} {ratio:>14}  {goal:<28} {}",
            if met { "yes" } else { "NO" }
        );
    };
    row(
        "boot to agent hello",
        format!("{up_s:.1} s"),
        format!(
            "{raw:.1} s raw bootcmd ({} boot{})",
            raw_boots.len(),
            if raw_boots.len() == 1 { "" } else { "s" }
        ),
        format!("{:.2}x", up_s / raw),
        "agent <= first user hook",
        up_s <= raw,
    );
    if let Some(m) = marker_in_agent_vm {
        println!(
            "{:<34} {:>12} {:>30}",
            "  (bootcmd marker, agent VM)",
            "",
            format!("{:.1} s", m.as_secs_f64())
        );
    }
    let (e, s) = (median(&exec_ms), median(&ssh_ms));
    row(
        "no-op exec round trip (median)",
        format!("{e:.1} ms"),
        format!("{s:.0} ms ssh true"),
        format!("{:.0}x faster", s / e),
        ">= 20x faster than ssh",
        s / e >= 20.0,
    );
    println!(
        "{:<34} {:>12}",
        "  (ping round trip, median)",
        format!("{:.1} ms", median(&ping_ms))
    );
    for (what, agent_v, bare_v, scp_v, file_v) in [
        (
            "upload MiB/s (median)",
            &t.put,
            &t.bare_up,
            &t.scp_up,
            &t.bare_up_file,
        ),
        (
            "download MiB/s (median)",
            &t.get,
            &t.bare_down,
            &t.scp_down,
            &t.bare_down_file,
        ),
    ] {
        let (a, b, c, f) = (
            median(agent_v),
            median(bare_v),
            median(scp_v),
            median(file_v),
        );
        row(
            what,
            format!("{a:.1}"),
            format!("bare {b:.1} / scp {c:.1}"),
            format!("{:.0}% / {:.1}x", a / b * 100.0, a / c),
            ">= 80% of bare (>= 5x scp)",
            a >= 0.8 * b,
        );
        println!(
            "{:<34} {:>12} {:>30} {:>14}",
            "  (bare copy with the guest file)",
            "",
            format!("{f:.1}"),
            format!("{:.0}%", a / f * 100.0)
        );
    }
    println!(
        "({} MiB, {} round(s) alternating bare/agent/scp; agent transfers verify sha256 on both ends)",
        args.mib, args.rounds
    );
    println!(
        "host CPU per 100 MiB (round by round): {}",
        t.cpu.join("; ")
    );
    if let Some(b) = &bootcmd_blame {
        println!("cloud-init's bootcmd module in the agent VM (ours, then the marker): {b}");
    }
    for (path, put, get) in variant_rows {
        println!(
            "variant {}: upload {:.1} MiB/s ({:.0}% of bare), download {:.1} MiB/s ({:.0}% of bare)",
            path.display(),
            median(&put),
            median(&put) / median(&t.bare_up) * 100.0,
            median(&get),
            median(&get) / median(&t.bare_down) * 100.0
        );
    }
    Ok(())
}

#[derive(Default)]
struct Transfers {
    bare_up: Vec<f64>,
    put: Vec<f64>,
    scp_up: Vec<f64>,
    bare_down: Vec<f64>,
    get: Vec<f64>,
    scp_down: Vec<f64>,
    /// CPU seconds per 100 MiB of QEMU (the guest, emulated) and of this process, per copy.
    cpu: Vec<String>,
    /// The bare copy into a file (with fsync) and out of one: the port plus the guest's disk.
    bare_up_file: Vec<f64>,
    bare_down_file: Vec<f64>,
}

/// CPU seconds (user + system) of QEMU and of this process, read from /proc.
struct CpuClock {
    qemu: u32,
    ticks: f64,
}

impl CpuClock {
    fn new(qemu: u32) -> Self {
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .filter(|t| *t > 0)
            .map_or(100.0, |t| t as f64);
        CpuClock { qemu, ticks }
    }

    fn seconds(&self, pid: &str) -> f64 {
        let Ok(stat) = fs_err::read_to_string(format!("/proc/{pid}/stat")) else {
            return 0.0;
        };
        // utime and stime: fields 14 and 15, counted after the command name's ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return 0.0;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        (field(11) + field(12)) / self.ticks
    }

    /// (QEMU, this process)
    fn sample(&self) -> (f64, f64) {
        (self.seconds(&self.qemu.to_string()), self.seconds("self"))
    }
}

async fn raw_boot(common: &Common, n: usize) -> anyhow::Result<(Duration, String)> {
    let l = loadavg();
    eprintln!("raw boot {n}: booting (load {l})");
    let vm = launch(common, false).await?;
    // Connected like the agent VM's ports, so the guest sees the same devices in the same state.
    let _bench = vm.connect(&vm.bench_socket).await?;
    let t = vm.wait_marker().await?;
    eprintln!(
        "raw boot {n}: bootcmd marker after {:.1} s",
        t.as_secs_f64()
    );
    Ok((t, l))
}

/// Host writes `data` into the bench port while the guest reads exactly that many bytes, into
/// `/dev/null`, or with `to_file` into that file (flushed with fsync, as a put does).
async fn bare_up(
    agent: &Arc<AgentMachine>,
    stream: &mut UnixStream,
    data: &[u8],
    to_file: Option<&str>,
) -> anyhow::Result<Duration> {
    // 1 MiB blocks, whole ones (`iflag=fullblock`): a port read returns at most one 4 KiB
    // virtio buffer, so dd gathers them as any reader would.
    let script = format!(
        "dd if=/dev/virtio-ports/{BENCH_PORT} of={} bs=1M count={} iflag=fullblock status=none{}",
        to_file.unwrap_or("/dev/null"),
        data.len() >> 20,
        if to_file.is_some() { " conv=fsync" } else { "" }
    );
    let reader = {
        let agent = agent.clone();
        tokio::spawn(async move { agent.exec(&ExecRequest::bash(script), &Discard).await })
    };
    let t0 = Instant::now();
    for chunk in data.chunks(1 << 20) {
        stream.write_all(chunk).await?;
    }
    let out = reader.await??;
    let took = t0.elapsed();
    if !out.status.success() {
        bail!("guest dd from the bench port: {}", out.status);
    }
    Ok(took)
}

/// The guest writes `size` bytes into the bench port while the host reads them: zeros, or with
/// `from_file` that file's content.
async fn bare_down(
    agent: &Arc<AgentMachine>,
    stream: &mut UnixStream,
    size: u64,
    from_file: Option<&str>,
) -> anyhow::Result<Duration> {
    // 1 MiB writes (the port takes up to 32 KiB per write call; dd writes the rest).
    let script = format!(
        "dd if={} of=/dev/virtio-ports/{BENCH_PORT} bs=1M count={} status=none",
        from_file.unwrap_or("/dev/zero"),
        size >> 20
    );
    let t0 = Instant::now();
    let writer = {
        let agent = agent.clone();
        tokio::spawn(async move { agent.exec(&ExecRequest::bash(script), &Discard).await })
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    while got < size {
        let n = tokio::time::timeout(Duration::from_secs(120), stream.read(&mut buf))
            .await
            .context("bench port stalled")??;
        if n == 0 {
            bail!("bench port closed after {got} bytes");
        }
        got += n as u64;
    }
    let took = t0.elapsed();
    let out = writer.await??;
    if !out.status.success() {
        bail!("guest dd into the bench port: {}", out.status);
    }
    Ok(took)
}

/// Another agent build served on the bench port; put/get as for ours.
async fn variant(
    vm: &Vm,
    agent: &Arc<AgentMachine>,
    k: usize,
    path: &Path,
    src: &Path,
    back: &Path,
    rounds: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let remote = format!("/root/bench-variant-{k}");
    agent
        .put_file(
            Path::new(&remote),
            FileSource::Path(path.to_path_buf()),
            &PutOptions {
                mode: Some(0o755),
                ..PutOptions::default()
            },
        )
        .await?;
    let stream = vm.connect(&vm.bench_socket).await?;
    let start = agent
        .exec(
            &ExecRequest::argv([remote.as_str(), "--port", BENCH_PORT, "--daemon"]),
            &Discard,
        )
        .await?;
    if !start.status.success() {
        bail!("variant {} did not start: {}", path.display(), start.status);
    }
    let target = AgentMachine::connect(stream, "variant".into(), Duration::from_secs(60)).await?;
    let pid = target.hello().map(|h| h.pid);
    let size = fs_err::metadata(src)?.len();
    let (mut put, mut get) = (Vec::new(), Vec::new());
    let dest = Path::new("/root/bench-variant.bin");
    for round in 1..=rounds {
        // A variant may be a measurement build that skips a step on purpose (no hashing, say)
        // and so fails verification at the end: the time until that answer still counts.
        let t0 = Instant::now();
        let r = target
            .put_file(
                dest,
                FileSource::Path(src.to_path_buf()),
                &PutOptions::default(),
            )
            .await;
        put.push(mib_s(size, t0.elapsed()));
        let put_note = r
            .err()
            .map(|e| format!(" (put failed: {e})"))
            .unwrap_or_default();
        let t0 = Instant::now();
        let r = target.get_file(dest, back).await;
        get.push(mib_s(size, t0.elapsed()));
        let get_note = r
            .err()
            .map(|e| format!(" (get failed: {e})"))
            .unwrap_or_default();
        eprintln!(
            "variant {} round {round} (load {}): put {:.1} get {:.1} MiB/s{put_note}{get_note}",
            path.display(),
            loadavg(),
            put[round - 1],
            get[round - 1]
        );
    }
    drop(target);
    let mut cleanup = format!("rm -f {remote} {}", dest.display());
    if let Some(pid) = pid {
        cleanup.push_str(&format!("; kill {pid}"));
    }
    let _ = agent
        .exec(&ExecRequest::bash(cleanup), &Capture::default())
        .await;
    Ok((put, get))
}

struct Ssh {
    key: PathBuf,
    port: u16,
}

impl Ssh {
    fn options(&self) -> Vec<String> {
        [
            "-F",
            "/dev/null",
            "-i",
            &self.key.to_string_lossy(),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=30",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    async fn status(cmd: &mut tokio::process::Command, what: &str) -> anyhow::Result<()> {
        let out = cmd
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .with_context(|| format!("{what} (openssh-client)"))?;
        if !out.status.success() {
            bail!(
                "{what}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    async fn run(&self, command: &[&str]) -> anyhow::Result<()> {
        let mut cmd = tokio::process::Command::new("ssh");
        cmd.args(self.options())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("root@127.0.0.1")
            .args(command);
        Self::status(&mut cmd, "ssh").await
    }

    async fn wait_up(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match self.run(&["true"]).await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    async fn scp(&self, from: &str, to: &str) -> anyhow::Result<Duration> {
        let mut cmd = tokio::process::Command::new("scp");
        cmd.args(self.options())
            .arg("-q")
            .arg("-P")
            .arg(self.port.to_string())
            .arg(from)
            .arg(to);
        let t0 = Instant::now();
        Self::status(&mut cmd, "scp").await?;
        Ok(t0.elapsed())
    }

    async fn scp_up(&self, local: &Path, remote: &str) -> anyhow::Result<Duration> {
        self.scp(
            &local.to_string_lossy(),
            &format!("root@127.0.0.1:{remote}"),
        )
        .await
    }

    async fn scp_down(&self, remote: &str, local: &Path) -> anyhow::Result<Duration> {
        self.scp(
            &format!("root@127.0.0.1:{remote}"),
            &local.to_string_lossy(),
        )
        .await
    }
}
