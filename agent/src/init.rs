//! The agent as PID 1 of the appliance (issue #13): the host boots its own kernel with an
//! initramfs holding this binary as `/init` and a few modules (see src/vm/appliance.rs). Init
//! mounts /dev, /proc and /sys, loads the modules, finds the guest's root file system on its
//! disk, mounts it and the rest of its fstab at /sysroot, sets up /proc, /sys, /dev, /run and
//! /tmp inside it as a container runtime would, and starts the agent chrooted there. It stays
//! outside as PID 1: reaps orphans, restarts the agent if it dies, and powers off or reboots
//! (with every process stopped and every file system unmounted) when the agent exits with
//! [`EXIT_POWEROFF`] or [`EXIT_REBOOT`].
//!
//! It talks on the console only, in the shape the host parses: `builder-appliance: <progress>`
//! and, when it cannot go on, `builder-appliance: error: <what it found>` before powering off.
//! It never returns: PID 1 exiting is a kernel panic.

mod fstab;
mod net;
mod probe;
pub mod systemctl;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::sys;
use probe::{Content, Device, FsKind};

/// The agent's exit code asking init to power off (after its Ok reply went out).
pub const EXIT_POWEROFF: i32 = 100;
/// The agent's exit code asking init to reboot.
pub const EXIT_REBOOT: i32 = 101;

const SYSROOT: &str = "/sysroot";
const MODULE_LIST: &str = "/etc/builder-appliance/modules";
const DEVICE_WAIT: Duration = Duration::from_secs(10);
const MAX_RESTARTS: u32 = 5;
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Modules only one file system needs, loaded when a device holds it: btrfs's dependencies
/// benchmark their algorithms when they load (raid6, xor), which costs about a second under
/// TCG for a disk that has no btrfs at all.
const DEFERRED: &[(FsKind, &[&str])] = &[
    (
        FsKind::Btrfs,
        &["xor", "raid6_pq", "zstd_compress", "btrfs"],
    ),
    (FsKind::Xfs, &["xfs"]),
];

/// What the kernel command line asks of init.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cmdline {
    port: String,
    net: bool,
    hostname: Option<String>,
}

fn parse_cmdline(text: &str) -> Cmdline {
    let mut c = Cmdline {
        port: crate::protocol::DEFAULT_PORT_NAME.to_owned(),
        net: false,
        hostname: None,
    };
    for word in text.split_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        match key {
            "builder.port" if !value.is_empty() => c.port = value.to_owned(),
            "builder.net" => c.net = value == "user",
            "builder.hostname" if !value.is_empty() => c.hostname = Some(value.to_owned()),
            _ => {}
        }
    }
    c
}

fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "builder-appliance: {text}");
    let _ = out.flush();
}

/// Prints the error (each line prefixed) and powers off. Never returns.
fn fatal(text: &str) -> ! {
    for line in text.lines() {
        say(&format!("error: {line}"));
    }
    // The guest's disk as clean as a power-off leaves it (nothing to undo before its root
    // was mounted).
    release(Duration::ZERO);
    let e = sys::power(false);
    say(&format!("error: cannot power off: {e}"));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Init's main: never returns.
pub fn run() -> ! {
    let result = std::panic::catch_unwind(boot);
    match result {
        Ok(Ok(port)) => serve(&port),
        Ok(Err(e)) => fatal(&e),
        Err(p) => {
            let what = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            fatal(&format!("init failed: {what}"))
        }
    }
}

/// Everything up to a root ready to serve in; returns the port's device path.
fn boot() -> Result<String, String> {
    let started = Instant::now();
    early_mounts()?;
    console_stdio();
    let cmdline = parse_cmdline(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    if let Some(name) = &cmdline.hostname
        && let Err(e) = sys::set_hostname(name)
    {
        say(&format!("cannot set the host name to {name}: {e}"));
    }
    let mut modules = Modules::read();
    modules.load_eager();
    let port_dev = wait_for_devices(&cmdline)?;

    let (disks, devices) = probe::scan(Path::new("/sys/class/block"), Path::new("/dev"));
    disk_links(&devices);
    find_root(&disks, &devices, &mut modules)?;
    mount_fstab(&devices, &mut modules)?;
    container_mounts()?;
    install_systemctl();
    network(&cmdline);
    say(&format!(
        "ready in {:.1} s since the kernel started init ({:.1} s uptime)",
        started.elapsed().as_secs_f64(),
        uptime()
    ));
    Ok(port_dev)
}

fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

fn mount(source: &str, target: &str, fstype: &str, flags: u64, data: &str) -> Result<(), String> {
    sys::mount_fs(source, target, fstype, flags, data)
        .map_err(|e| format!("cannot mount {fstype} {source} at {target}: {e}"))
}

fn early_mounts() -> Result<(), String> {
    for (fstype, target) in [("devtmpfs", "/dev"), ("proc", "/proc"), ("sysfs", "/sys")] {
        let _ = std::fs::create_dir_all(target);
        match sys::mount_fs(fstype, target, fstype, 0, "") {
            Ok(()) => {}
            // Mounted already (a kernel with DEVTMPFS_MOUNT).
            Err(e) if e.raw_os_error() == Some(16) => {}
            Err(e) => return Err(format!("cannot mount {fstype} at {target}: {e}")),
        }
    }
    Ok(())
}

/// The kernel opens /dev/console as init's stdin, stdout and stderr when the initramfs has
/// that node. Without it they are closed, and the first files init opens would take their
/// numbers: open the console from devtmpfs instead (the lowest free numbers: 0, 1, 2).
fn console_stdio() {
    use std::os::fd::IntoRawFd;
    if Path::new("/proc/self/fd/1").exists() {
        return;
    }
    for _ in 0..3 {
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/console")
        {
            // Kept open for good: it is init's stdio from now on.
            Ok(f) => {
                let _ = f.into_raw_fd();
            }
            Err(_) => return,
        }
    }
}

/// The modules the initramfs lists, loaded in order; some wait until a file system needs them.
struct Modules {
    paths: Vec<String>,
    loaded: Vec<bool>,
}

impl Modules {
    fn read() -> Modules {
        let paths: Vec<String> = std::fs::read_to_string(MODULE_LIST)
            .unwrap_or_default()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect();
        let loaded = vec![false; paths.len()];
        Modules { paths, loaded }
    }

    /// `kernel/fs/xfs/xfs.ko.xz` → `xfs`.
    fn stem(path: &str) -> &str {
        let file = path.rsplit('/').next().unwrap_or(path);
        file.split(".ko").next().unwrap_or(file)
    }

    fn deferred(path: &str) -> bool {
        let stem = Self::stem(path).replace('-', "_");
        DEFERRED
            .iter()
            .any(|(_, names)| names.contains(&stem.as_str()))
    }

    fn load_eager(&mut self) {
        let started = Instant::now();
        let mut n = 0;
        for i in 0..self.paths.len() {
            if !Self::deferred(&self.paths[i]) {
                n += usize::from(self.load(i));
            }
        }
        say(&format!(
            "loaded {n} modules in {:.1} s",
            started.elapsed().as_secs_f64()
        ));
    }

    /// Loads what `kind` needs, if anything is deferred for it.
    fn load_for(&mut self, kind: FsKind) {
        let Some((_, names)) = DEFERRED.iter().find(|(k, _)| *k == kind) else {
            return;
        };
        for i in 0..self.paths.len() {
            let stem = Self::stem(&self.paths[i]).replace('-', "_");
            if names.contains(&stem.as_str()) {
                self.load(i);
            }
        }
    }

    fn load(&mut self, i: usize) -> bool {
        if self.loaded[i] {
            return false;
        }
        self.loaded[i] = true;
        let path = &self.paths[i];
        let compressed = [".xz", ".zst", ".gz"].iter().any(|s| path.ends_with(s));
        let result = std::fs::File::open(path).and_then(|f| sys::load_module(&f, compressed));
        match result {
            Ok(()) => true,
            Err(e) if e.raw_os_error() == Some(17) => false, // EEXIST: built in or loaded
            Err(e) => {
                say(&format!(
                    "cannot load module {path}: {e}; going on without it"
                ));
                false
            }
        }
    }
}

/// The device node of the virtio port named `name`, once the kernel made it.
fn port_device(name: &str) -> Option<String> {
    let entries = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    for e in entries.flatten() {
        let n = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if n.trim() == name {
            let dev = format!("/dev/{}", e.file_name().to_string_lossy());
            return Path::new(&dev).exists().then_some(dev);
        }
    }
    None
}

fn has_disk() -> bool {
    probe::block_names(Path::new("/sys/class/block"))
        .iter()
        .any(|n| Path::new("/dev").join(n).exists())
}

/// Waits (up to [`DEVICE_WAIT`]) for a disk, the agent's port and, with networking, a NIC.
fn wait_for_devices(cmdline: &Cmdline) -> Result<String, String> {
    let deadline = Instant::now() + DEVICE_WAIT;
    loop {
        let port = port_device(&cmdline.port);
        let disk = has_disk();
        let nic = !cmdline.net || net::first_nic(Path::new("/sys/class/net")).is_some();
        if let (Some(port), true, true) = (&port, disk, nic) {
            return Ok(port.clone());
        }
        if Instant::now() >= deadline {
            let mut missing = Vec::new();
            if port.is_none() {
                missing.push(format!(
                    "the virtio-serial port `{}` (is virtio_console loaded? ports seen: {})",
                    cmdline.port,
                    seen("/sys/class/virtio-ports")
                ));
            }
            if !disk {
                missing.push(format!(
                    "a disk (is virtio_blk loaded? block devices seen: {})",
                    seen("/sys/class/block")
                ));
            }
            if !nic {
                missing.push(
                    "a network interface for builder.net=user (is virtio_net loaded?)".into(),
                );
            }
            return Err(format!(
                "after {} s there is still no {}",
                DEVICE_WAIT.as_secs(),
                missing.join(", no ")
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The names in a directory, sorted; empty when it cannot be read.
fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn seen(dir: &str) -> String {
    let names = dir_names(Path::new(dir));
    if names.is_empty() {
        "none".into()
    } else {
        names.join(" ")
    }
}

/// The /dev/disk/by-* links udev would make (none runs here): tools in the guest look for
/// them, grub-mkconfig for one (it writes `root=UUID=…` only when /dev/disk/by-uuid has the
/// root's UUID, else `root=/dev/vda1`). In devtmpfs, so the guest's /dev has them too.
fn disk_links(devices: &[Device]) {
    for dev in devices {
        let mut links: Vec<(&str, String)> = Vec::new();
        if let Some(fs) = dev.fs() {
            if !fs.uuid.is_empty() {
                links.push(("by-uuid", fs.uuid.clone()));
            }
            if !fs.label.is_empty() {
                links.push(("by-label", fs.label.clone()));
            }
        }
        if let Some(u) = &dev.part_uuid {
            links.push(("by-partuuid", u.clone()));
        }
        if let Some(l) = &dev.part_label {
            links.push(("by-partlabel", l.clone()));
        }
        if let Some(serial) = &dev.serial {
            let id = match dev.partition {
                Some(n) => format!("virtio-{serial}-part{n}"),
                None => format!("virtio-{serial}"),
            };
            links.push(("by-id", id));
        }
        for (kind, name) in links {
            let dir = Path::new("/dev/disk").join(kind);
            let _ = std::fs::create_dir_all(&dir);
            let link = dir.join(fstab::escape_udev(&name));
            // The first device with a name keeps it, as a fixed order makes it with udev.
            let _ = std::os::unix::fs::symlink(format!("../../{}", dev.name), link);
        }
    }
}

fn os_release(root: &Path) -> Option<String> {
    let text = ["etc/os-release", "usr/lib/os-release"]
        .iter()
        .find_map(|p| std::fs::read_to_string(root.join(p)).ok())?;
    let pretty = text
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim().trim_matches('"').to_owned());
    Some(pretty.unwrap_or_else(|| "no PRETTY_NAME".into()))
}

/// Mounts the first device holding an OS (it has an os-release) read-only at /sysroot, then
/// read-write. The error lists what every device holds.
fn find_root(
    disks: &[probe::Disk],
    devices: &[Device],
    modules: &mut Modules,
) -> Result<(), String> {
    let _ = std::fs::create_dir_all(SYSROOT);
    let mut found = Vec::new();
    for dev in devices {
        if dev.partition.is_none()
            && let Some(disk) = disks.iter().find(|d| d.name == dev.name)
        {
            match &disk.table {
                Ok(probe::Table::None) => {}
                Ok(t) => {
                    found.push(format!(
                        "{}: {}, {} partition{}",
                        dev.name,
                        t.describe(),
                        disk.partitions,
                        if disk.partitions == 1 { "" } else { "s" }
                    ));
                    continue;
                }
                Err(e) => {
                    found.push(format!("{}: cannot read: {e}", dev.name));
                    continue;
                }
            }
        }
        let fs = match &dev.content {
            Ok(Content::Fs(fs)) => fs,
            Ok(other) => {
                found.push(format!("{}: {other}", dev.name));
                continue;
            }
            Err(e) => {
                found.push(format!("{}: cannot read: {e}", dev.name));
                continue;
            }
        };
        modules.load_for(fs.kind);
        let source = dev.path.to_string_lossy();
        if let Err(e) = sys::mount_fs(&source, SYSROOT, fs.kind.mount_type(), fstab::MS_RDONLY, "")
        {
            found.push(format!(
                "{}: {}, cannot mount: {e}",
                dev.name,
                fs.kind.name()
            ));
            continue;
        }
        let root = Path::new(SYSROOT);
        let mut os = os_release(root);
        let mut subvol = None;
        if os.is_none() && fs.kind == FsKind::Btrfs {
            // A distribution's btrfs root usually lives in a subvolume (`@`, `root`).
            subvol = btrfs_root_subvolume(root);
            if let Some(sv) = &subvol {
                let _ = sys::unmount(SYSROOT, false);
                let data = format!("subvol={sv}");
                if sys::mount_fs(&source, SYSROOT, "btrfs", fstab::MS_RDONLY, &data).is_ok() {
                    os = os_release(root);
                }
            }
        }
        let Some(os) = os else {
            let _ = sys::unmount(SYSROOT, false);
            found.push(format!(
                "{}: {} without /etc/os-release",
                dev.name,
                fs.kind.name()
            ));
            continue;
        };
        sys::mount_fs("", SYSROOT, "", fstab::MS_REMOUNT, "").map_err(|e| {
            format!(
                "root {} ({}): cannot remount read-write: {e}",
                dev.name,
                fs.kind.name()
            )
        })?;
        let sv = subvol
            .map(|s| format!(", subvolume {s}"))
            .unwrap_or_default();
        say(&format!("root {} ({}{sv}, {os})", dev.name, fs.kind.name()));
        return Ok(());
    }
    if found.is_empty() {
        found.push(format!(
            "no disks (block devices seen: {})",
            seen("/sys/class/block")
        ));
    }
    Err(format!("no root file system found: {}", found.join("; ")))
}

fn btrfs_root_subvolume(root: &Path) -> Option<String> {
    dir_names(root)
        .into_iter()
        .find(|n| os_release(&root.join(n)).is_some())
}

/// A path inside the guest, as seen from outside the chroot.
fn in_root(guest: &str) -> PathBuf {
    Path::new(SYSROOT).join(guest.trim_start_matches('/'))
}

fn mount_fstab(devices: &[Device], modules: &mut Modules) -> Result<(), String> {
    let text = match std::fs::read_to_string(in_root("/etc/fstab")) {
        Ok(t) => t,
        Err(_) => return Ok(()),
    };
    let mut errors = Vec::new();
    for e in fstab::parse(&text) {
        let outcome = match fstab::action(&e) {
            fstab::Action::Skip(why) => {
                if why != "the root, mounted already" {
                    say(&format!(
                        "fstab line {}: {} left alone ({why})",
                        e.line, e.target
                    ));
                }
                Ok(())
            }
            fstab::Action::Bind => bind_entry(&e),
            fstab::Action::Mount => mount_entry(&e, devices, modules),
        };
        if let Err(msg) = outcome {
            let msg = format!("fstab line {}: {} ({}): {msg}", e.line, e.target, e.spec);
            if e.nofail() {
                say(&format!("{msg}; nofail, going on"));
            } else {
                errors.push(msg);
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("\n"))
    }
}

fn mount_point(target: &str) -> Result<String, String> {
    let path = in_root(target);
    if !path.is_dir() {
        std::fs::create_dir_all(&path)
            .map_err(|e| format!("cannot create the mount point: {e}"))?;
    }
    Ok(path.to_string_lossy().into_owned())
}

fn mount_entry(e: &fstab::Entry, devices: &[Device], modules: &mut Modules) -> Result<(), String> {
    let spec = fstab::parse_spec(&e.spec).ok_or("names no disk")?;
    if let fstab::Spec::Mapper(_) = spec {
        return Err("device-mapper (LVM, LUKS) volumes are not supported by the appliance".into());
    }
    let dev = fstab::resolve(&spec, devices).ok_or_else(|| {
        let list: Vec<String> = devices
            .iter()
            .map(|d| match d.fs() {
                Some(fs) => format!(
                    "{} {} UUID={}{}",
                    d.name,
                    fs.kind.name(),
                    fs.uuid,
                    if fs.label.is_empty() {
                        String::new()
                    } else {
                        format!(" LABEL={}", fs.label)
                    }
                ),
                None => d.name.clone(),
            })
            .collect();
        format!("no such device (devices: {})", list.join(", "))
    })?;
    let kind = match e.fstype.as_str() {
        "auto" => dev.fs().map(|f| f.kind),
        t => FsKind::from_type(t),
    };
    let fstype = match kind {
        Some(k) => {
            modules.load_for(k);
            k.mount_type().to_owned()
        }
        None => e.fstype.clone(),
    };
    let opts = fstab::mount_options(&e.options);
    let target = mount_point(&e.target)?;
    sys::mount_fs(
        &dev.path.to_string_lossy(),
        &target,
        &fstype,
        opts.flags,
        &opts.data,
    )
    .map_err(|err| format!("cannot mount {} ({fstype}): {err}", dev.name))?;
    say(&format!("mounted {} ({}, {fstype})", e.target, dev.name));
    Ok(())
}

fn bind_entry(e: &fstab::Entry) -> Result<(), String> {
    let source = in_root(&e.spec).to_string_lossy().into_owned();
    let target = mount_point(&e.target)?;
    let opts = fstab::mount_options(&e.options);
    let rec = if e.has_option("rbind") {
        fstab::MS_REC
    } else {
        0
    };
    sys::mount_fs(&source, &target, "", fstab::MS_BIND | rec, "")
        .map_err(|err| format!("cannot bind-mount: {err}"))?;
    if opts.flags & fstab::MS_RDONLY != 0 {
        let _ = sys::mount_fs(
            "",
            &target,
            "",
            fstab::MS_REMOUNT | fstab::MS_BIND | fstab::MS_RDONLY,
            "",
        );
    }
    say(&format!("mounted {} (bind {})", e.target, e.spec));
    Ok(())
}

/// /proc, /sys, /dev, /dev/pts, /dev/shm, /run and /tmp inside the root, as a container
/// runtime sets them up.
fn container_mounts() -> Result<(), String> {
    use fstab::{MS_NODEV, MS_NOEXEC, MS_NOSUID};
    let table: [(&str, &str, &str, u64, &str); 7] = [
        (
            "proc",
            "/proc",
            "proc",
            MS_NOSUID | MS_NODEV | MS_NOEXEC,
            "",
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            MS_NOSUID | MS_NODEV | MS_NOEXEC,
            "",
        ),
        ("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MS_NOSUID | MS_NOEXEC,
            "newinstance,gid=5,mode=0620,ptmxmode=0666",
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            MS_NOSUID | MS_NODEV,
            "mode=1777",
        ),
        ("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
        ("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ];
    for (source, target, fstype, flags, data) in table {
        let t = mount_point(target)?;
        mount(source, &t, fstype, flags, data)?;
    }
    // What udev and systemd would add: /dev/fd and friends, and /run/lock.
    for (name, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(to, in_root(&format!("/dev/{name}")));
    }
    let lock = in_root("/run/lock");
    if std::fs::create_dir_all(&lock).is_ok() {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o1777));
    }
    Ok(())
}

/// The agent as `systemctl`, first on the steps' PATH (see init/systemctl.rs).
fn install_systemctl() {
    let dir = in_root(systemctl::BIN_DIR);
    let copy = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::copy("/proc/self/exe", dir.join("systemctl")))
        .and_then(|_| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                dir.join("systemctl"),
                std::fs::Permissions::from_mode(0o755),
            )
        });
    if let Err(e) = copy {
        say(&format!(
            "cannot install the systemctl that refuses `start` in {}: {e}",
            systemctl::BIN_DIR
        ));
    }
}

fn network(cmdline: &Cmdline) {
    if let Err(e) = net::loopback() {
        say(&format!("cannot bring up lo: {e}"));
    }
    adopt_leftover_resolv_conf();
    if !cmdline.net {
        return;
    }
    let Some(nic) = net::first_nic(Path::new("/sys/class/net")) else {
        say("no network interface for builder.net=user");
        return;
    };
    match net::user_network(&nic) {
        Ok(()) => say(&format!(
            "network {nic} 10.0.2.15/24, gateway 10.0.2.2, DNS {}",
            net::DNS
        )),
        Err(e) => say(&format!("cannot configure {nic}: {e}")),
    }
    if let Err(e) = resolv_conf() {
        say(&format!("DNS: {e}"));
    }
}

/// The guest resolves through 10.0.2.3 without its image changing: a file bind-mounted over
/// its resolv.conf, or, when that links into /run (systemd-resolved), the file it points to
/// written in our /run tmpfs. An image with none at all (it would get one from DHCP at boot)
/// gets one for the session, removed at shutdown.
fn resolv_conf() -> Result<(), String> {
    let Some(target) = net::resolv_conf_target(Path::new(SYSROOT)) else {
        return Err("/etc/resolv.conf is a symlink loop; name resolution is not set up".into());
    };
    let text = net::resolv_conf_text();
    let guest = target.to_string_lossy().into_owned();
    let host = in_root(&guest);
    if std::fs::read_to_string(&host).is_ok_and(|t| t == text) {
        // Ours, from an earlier session (see adopt_leftover_resolv_conf): already right.
        return Ok(());
    }
    if host.is_file() {
        let ours = Path::new("/run/builder-appliance/resolv.conf");
        let _ = std::fs::create_dir_all("/run/builder-appliance");
        std::fs::write(ours, text).map_err(|e| format!("cannot write {}: {e}", ours.display()))?;
        return mount(
            &ours.to_string_lossy(),
            &host.to_string_lossy(),
            "",
            fstab::MS_BIND,
            "",
        );
    }
    if target.starts_with("/run") {
        if let Some(parent) = host.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        return std::fs::write(&host, text).map_err(|e| format!("cannot write {guest}: {e}"));
    }
    std::fs::write(&host, &text).map_err(|e| format!("cannot write {guest}: {e}"))?;
    let _ = std::fs::create_dir_all("/run/builder-appliance");
    std::fs::write(CREATED, format!("{}\n", host.display()))
        .map_err(|e| format!("cannot write {CREATED}: {e}"))?;
    say(&format!(
        "DNS: the image has no {guest}; one is there until shutdown"
    ));
    Ok(())
}

/// A resolv.conf init wrote in an earlier session that never shut down (QEMU killed), or that
/// a build's layer caught mid-session (a layer is a snapshot of the running guest): it holds
/// exactly our text. It is ours, so it goes at shutdown like one written now; left alone it
/// would end up in the image.
fn adopt_leftover_resolv_conf() {
    let Some(target) = net::resolv_conf_target(Path::new(SYSROOT)) else {
        return;
    };
    let host = in_root(&target.to_string_lossy());
    if !std::fs::read_to_string(&host).is_ok_and(|t| t == net::resolv_conf_text()) {
        return;
    }
    let _ = std::fs::create_dir_all("/run/builder-appliance");
    let mut list = std::fs::read_to_string(CREATED).unwrap_or_default();
    list.push_str(&format!("{}\n", host.display()));
    match std::fs::write(CREATED, list) {
        Ok(()) => say(&format!(
            "DNS: {} is one an earlier session left; removed at shutdown",
            target.display()
        )),
        Err(e) => say(&format!("cannot write {CREATED}: {e}")),
    }
}

/// Files init created in the guest for the session (one host path a line), removed at
/// shutdown if they still hold what init wrote.
const CREATED: &str = "/run/builder-appliance/created";

fn remove_created() {
    let list = std::fs::read_to_string(CREATED).unwrap_or_default();
    let ours = net::resolv_conf_text();
    for path in list.lines().filter(|l| !l.is_empty()) {
        if std::fs::read_to_string(path).is_ok_and(|t| t == ours) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Runs the agent chrooted in the guest's root until it asks for a power-off or a reboot,
/// restarting it if it dies; reaps every orphan meanwhile.
fn serve(port_dev: &str) -> ! {
    let root = match sys::chroot_path(SYSROOT) {
        Ok(r) => r,
        Err(e) => fatal(&format!("{SYSROOT}: {e}")),
    };
    let mut restarts = 0;
    loop {
        let child = match spawn_agent(port_dev, &root) {
            Ok(pid) => pid,
            Err(e) => fatal(&format!("cannot start the agent: {e}")),
        };
        let how = loop {
            match sys::reap(true) {
                Ok(Some((pid, how))) if pid == child => break how,
                Ok(_) => {}
                Err(e) => fatal(&format!("lost the agent: {e}")),
            }
        };
        match how {
            sys::Exit::Code(EXIT_POWEROFF) => shut_down(false),
            sys::Exit::Code(EXIT_REBOOT) => shut_down(true),
            other => {
                restarts += 1;
                if restarts > MAX_RESTARTS {
                    fatal(&format!(
                        "the agent {other}, the {restarts}th time; giving up"
                    ));
                }
                say(&format!(
                    "the agent {other}; starting it again ({restarts} of {MAX_RESTARTS})"
                ));
            }
        }
    }
}

#[allow(unsafe_code)] // `pre_exec`, to chroot the child before it runs
fn spawn_agent(port_dev: &str, root: &std::ffi::CStr) -> std::io::Result<i32> {
    use std::os::unix::process::CommandExt;
    let root = root.to_owned();
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.args(["--port", port_dev, "--appliance"])
        .env_clear()
        .env("PATH", format!("{}:{PATH}", systemctl::BIN_DIR))
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8")
        .env("TERM", "linux");
    // SAFETY: chroot(2) and chdir(2) are async-signal-safe; the path was built before the fork.
    unsafe {
        cmd.pre_exec(move || {
            sys::change_root(&root)?;
            sys::change_dir(c"/")
        });
    }
    let child = cmd.spawn()?;
    // Reaped by serve's waitpid(-1), never through `child`.
    Ok(i32::try_from(child.id()).unwrap_or(-1))
}

/// Stops every process, unmounts the guest's file systems in reverse, then powers off or
/// reboots. Never returns.
fn shut_down(restart: bool) -> ! {
    say(if restart { "rebooting" } else { "powering off" });
    release(Duration::from_secs(3));
    let e = sys::power(restart);
    fatal(&format!(
        "cannot {}: {e}",
        if restart { "reboot" } else { "power off" }
    ))
}

/// Stops every process (SIGTERM, `grace` to end, then SIGKILL), removes what init created in
/// the guest, unmounts the guest's file systems in reverse and syncs.
fn release(grace: Duration) {
    sys::kill_all(sys::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        match sys::reap(false) {
            Ok(Some(_)) => {}
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => break, // no children left
        }
    }
    sys::kill_all(sys::SIGKILL);
    while let Ok(Some(_)) = sys::reap(true) {}
    remove_created();
    sys::sync_all();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for target in mounts_under(&mountinfo, SYSROOT).iter().rev() {
        if let Err(e) = sys::unmount(target, false) {
            let detached = sys::unmount(target, true);
            if detached.is_err() {
                say(&format!("cannot unmount {target}: {e}"));
            }
        }
    }
    sys::sync_all();
}

/// The mount points at or under `root` in /proc/self/mountinfo's order (mount order).
fn mounts_under(mountinfo: &str, root: &str) -> Vec<String> {
    let prefix = format!("{root}/");
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|m| m == root || m.starts_with(&prefix))
        .collect()
}

/// mountinfo escapes blanks and backslashes as octal (`\040`).
fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::new();
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let oct = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match oct {
            Some(b) => {
                out.push(char::from(b));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_keys() {
        let c = parse_cmdline(
            "console=ttyS0 panic=-1 quiet loglevel=4 builder.appliance=1 \
             builder.port=org.builder.agent.0 builder.net=user builder.hostname=web builder.future=x",
        );
        assert_eq!(
            c,
            Cmdline {
                port: "org.builder.agent.0".into(),
                net: true,
                hostname: Some("web".into())
            }
        );
        let c = parse_cmdline("console=ttyS0 builder.appliance=1\n");
        assert_eq!(c.port, crate::protocol::DEFAULT_PORT_NAME);
        assert!(!c.net);
    }

    #[test]
    fn unmount_order_comes_from_mountinfo() {
        let mi = "22 1 0:21 / / rw - rootfs rootfs rw\n\
            30 22 254:1 / /sysroot rw,relatime - ext4 /dev/vda1 rw\n\
            31 30 254:15 / /sysroot/boot/efi rw - vfat /dev/vda15 rw\n\
            32 30 0:5 / /sysroot/dev rw - devtmpfs devtmpfs rw\n\
            33 32 0:25 / /sysroot/dev/pts rw - devpts devpts rw\n\
            34 30 0:26 / /sysroot/my\\040dir rw - tmpfs tmpfs rw\n\
            35 22 0:5 / /sysrootx rw - tmpfs tmpfs rw\n";
        assert_eq!(
            mounts_under(mi, "/sysroot"),
            [
                "/sysroot",
                "/sysroot/boot/efi",
                "/sysroot/dev",
                "/sysroot/dev/pts",
                "/sysroot/my dir"
            ]
        );
    }

    #[test]
    fn deferred_modules_by_name() {
        assert!(Modules::deferred(
            "/lib/modules/6.1/kernel/fs/btrfs/btrfs.ko"
        ));
        assert!(Modules::deferred(
            "/lib/modules/6.1/kernel/lib/raid6/raid6_pq.ko.xz"
        ));
        assert!(!Modules::deferred(
            "/lib/modules/6.1/kernel/lib/libcrc32c.ko"
        ));
        assert_eq!(Modules::stem("/a/b/virtio_blk.ko.zst"), "virtio_blk");
    }
}
