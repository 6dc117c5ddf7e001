//! The appliance: the host's Linux kernel booted directly (`-kernel`/`-initrd`/`-append`, no
//! firmware, no bootloader) with our agent as init, serving steps from a chroot of the guest's
//! root file system. This module finds the kernel and its modules, works out which modules
//! the appliance loads (dependencies first), writes the initramfs (uncompressed newc cpio:
//! TCG pays for every decompression) and caches it. It never looks at a guest's disk: the
//! agent as init (`agent/src/init.rs`) finds the root and mounts it.
//!
//! The initramfs, as the agent reads it:
//!
//! ```text
//! /init                                the agent (crate::agent::AGENT_BINARY), 0755
//! /dev/console                         char 5:1 (devtmpfs is not mounted yet at start)
//! /dev /proc /sys /sysroot /run /tmp /etc /lib/modules
//! /lib/modules/<release>/<path in modules.dep>   each module, as the host has it (.ko, .ko.xz…)
//! /etc/builder-appliance/modules       absolute paths of the modules, in load order
//! /etc/builder-appliance/kernel        the kernel release
//! ```
//!
//! The cache: `<cache dir>/<key>/initrd.cpio` ([`cache_dir`]), the key a sha256 of the kernel,
//! each module, the agent and [`FORMAT_VERSION`]; next to it `record.json` (what went in and
//! which optional modules this kernel lacks). Written under a temporary name and renamed,
//! under a lock on the key's folder, so concurrent builds neither race nor wait for long.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::OsString;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::recipe::Network;

/// The layout of the initramfs and the kernel command line: bump it when either changes, so
/// cached initramfs files and cached layers built by the old one are not reused.
pub const FORMAT_VERSION: u32 = 1;

/// Modules the appliance cannot work without (unless built into the kernel).
pub const REQUIRED_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "virtio_console", "ext4"];

/// Modules loaded when the kernel has them: other disks and file systems, the network, and
/// pvpanic (a kernel panic then pauses the VM and QEMU reports it).
pub const OPTIONAL_MODULES: &[&str] = &[
    "virtio_scsi",
    "virtio_net",
    "virtio_rng",
    "xfs",
    "btrfs",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "nls_utf8",
    "nls_iso8859_1",
    "dm_mod",
    "pvpanic_mmio",
];

/// Inside the initramfs: the module list the agent loads, in order.
pub const MODULES_FILE: &str = "/etc/builder-appliance/modules";
/// Inside the initramfs: the kernel release.
pub const KERNEL_FILE: &str = "/etc/builder-appliance/kernel";

/// The variable naming the kernel to boot (a vmlinuz; its modules in
/// `/lib/modules/<release>`).
pub const KERNEL_VAR: &str = "BUILDER_APPLIANCE_KERNEL";
/// The variable naming the cache folder ([`cache_dir`]).
pub const CACHE_VAR: &str = "BUILDER_APPLIANCE_CACHE";

/// What the console shows when the agent as init gives up (then it powers off).
pub const CONSOLE_ERROR_MARK: &str = "builder-appliance: error:";

/// Cache entries not used for this long are removed when a new one is built.
const CACHE_KEEP: Duration = Duration::from_secs(14 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum ApplianceError {
    #[error("no Linux kernel for the appliance boot: {looked}")]
    NoKernel { looked: String },
    #[error("the kernel {path} does not exist (named by {KERNEL_VAR})")]
    KernelMissing { path: String },
    #[error("cannot read the kernel {path}")]
    KernelUnreadable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot tell the release of the kernel {path}: it is not a bzImage with a version string and its name is not vmlinuz-<release>"
    )]
    KernelRelease { path: String },
    #[error("the modules of kernel {release} are not in {dir}")]
    ModulesMissing { release: String, dir: String },
    /// The io error (fs-err's) names the file.
    #[error("cannot read the module index of kernel {release}")]
    ModuleIndex {
        release: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the module {path}")]
    ModuleUnreadable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "kernel {release} has no module `{module}`, which the appliance needs (not in {dir}/modules.dep, not built in)"
    )]
    ModuleMissing {
        module: String,
        release: String,
        dir: String,
    },
    /// The io error (fs-err's or tempfile's) names the file.
    #[error("could not write the appliance's initramfs in {dir}")]
    Cache {
        dir: String,
        #[source]
        source: std::io::Error,
    },
}

impl ApplianceError {
    /// A hint for the user, where there is one.
    pub fn hint(&self) -> Option<String> {
        match self {
            ApplianceError::KernelMissing { .. } => Some(format!(
                "point {KERNEL_VAR} at an existing vmlinuz, or unset it to boot the newest /boot/vmlinuz-*"
            )),
            ApplianceError::NoKernel { .. } | ApplianceError::ModulesMissing { .. } => {
                Some(format!(
                    "install a kernel for it: `apt-get install linux-image-cloud-amd64` (Debian, Ubuntu: linux-image-kvm), or set {KERNEL_VAR} to a vmlinuz whose modules are in /lib/modules/<release>; or use `infrastructure.boot: full`"
                ))
            }
            ApplianceError::KernelUnreadable { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                Some(format!(
                    "the kernel is readable by root only (Ubuntu installs it so): `sudo chmod 0644 /boot/vmlinuz-*`, or set {KERNEL_VAR} to a readable copy"
                ))
            }
            ApplianceError::KernelRelease { .. } => Some(format!(
                "name the file vmlinuz-<release>, as /lib/modules/<release> is named ({KERNEL_VAR})"
            )),
            ApplianceError::ModuleMissing { .. } => Some(format!(
                "the appliance needs the virtio and ext4 drivers: use a kernel that has them (Debian's linux-image-cloud-amd64 does; {KERNEL_VAR} names another), or `infrastructure.boot: full`"
            )),
            _ => None,
        }
    }
}

/// The folder of the appliance cache: `$BUILDER_APPLIANCE_CACHE`, else
/// `$XDG_CACHE_HOME/builder/appliance`, else `~/.cache/builder/appliance` (the temp dir's
/// `builder-appliance` without a home). Each kernel and agent make one entry of ~10 MiB;
/// entries unused for two weeks are removed when a new one is built, and the folder can be
/// removed at any time.
pub fn cache_dir() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var(CACHE_VAR) {
        return PathBuf::from(dir);
    }
    if let Some(xdg) = var("XDG_CACHE_HOME") {
        return PathBuf::from(xdg).join("builder").join("appliance");
    }
    match var("HOME") {
        Some(home) => PathBuf::from(home)
            .join(".cache")
            .join("builder")
            .join("appliance"),
        None => std::env::temp_dir().join("builder-appliance"),
    }
}

/// A kernel to boot and where its modules are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    pub path: PathBuf,
    /// `6.1.0-57-cloud-amd64`.
    pub release: String,
    /// `/lib/modules/<release>`.
    pub modules: PathBuf,
}

/// The kernel `$BUILDER_APPLIANCE_KERNEL` names, else the newest `/boot/vmlinuz-*` that has
/// its `/lib/modules/<release>`.
pub fn find_kernel() -> Result<Kernel, ApplianceError> {
    find_kernel_in(
        std::env::var_os(KERNEL_VAR).filter(|v| !v.is_empty()),
        Path::new("/boot"),
        Path::new("/lib/modules"),
    )
}

fn find_kernel_in(
    named: Option<OsString>,
    boot: &Path,
    modules_root: &Path,
) -> Result<Kernel, ApplianceError> {
    if let Some(path) = named {
        let path = PathBuf::from(path);
        if !path.exists() {
            return Err(ApplianceError::KernelMissing {
                path: path.display().to_string(),
            });
        }
        let release = kernel_release(&path)?;
        let modules = modules_root.join(&release);
        if !modules.join("modules.dep").is_file() {
            return Err(ApplianceError::ModulesMissing {
                release,
                dir: modules.display().to_string(),
            });
        }
        return Ok(Kernel {
            path,
            release,
            modules,
        });
    }
    let mut found: Vec<(String, PathBuf)> = Vec::new();
    let mut without_modules = Vec::new();
    if let Ok(entries) = fs_err::read_dir(boot) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(release) = name.strip_prefix("vmlinuz-") else {
                continue;
            };
            if release.is_empty() {
                continue;
            }
            if modules_root.join(release).join("modules.dep").is_file() {
                found.push((release.to_string(), entry.path()));
            } else {
                without_modules.push(name);
            }
        }
    }
    found.sort_by(|a, b| compare_releases(&a.0, &b.0));
    let Some((release, path)) = found.pop() else {
        let looked = if without_modules.is_empty() {
            format!(
                "no {}/vmlinuz-* and {KERNEL_VAR} is not set",
                boot.display()
            )
        } else {
            without_modules.sort();
            format!(
                "{} in {} but no modules for {} in {}",
                without_modules.join(", "),
                boot.display(),
                if without_modules.len() == 1 {
                    "it"
                } else {
                    "them"
                },
                modules_root.display()
            )
        };
        return Err(ApplianceError::NoKernel { looked });
    };
    // Read now, so an unreadable kernel is said here and not as QEMU's error.
    fs_err::File::open(&path).map_err(|source| ApplianceError::KernelUnreadable {
        path: path.display().to_string(),
        source,
    })?;
    Ok(Kernel {
        modules: modules_root.join(&release),
        path,
        release,
    })
}

/// Orders kernel releases as versions: numbers by value, the rest as text
/// (`6.1.0-9` < `6.1.0-57` < `6.10.0-1`).
fn compare_releases(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            let (num, after) = rest.split_at(digits);
            let text_len = after.len()
                - after
                    .trim_start_matches(|c: char| !c.is_ascii_digit())
                    .len();
            let (text, after) = after.split_at(text_len);
            out.push((num.parse().unwrap_or(0), text.to_string()));
            rest = after;
        }
        out
    }
    parts(a).cmp(&parts(b))
}

/// The release of a kernel image: the version string of its bzImage header (what `file`
/// prints), else what follows `vmlinuz-` in its name.
pub fn kernel_release(path: &Path) -> Result<String, ApplianceError> {
    let unreadable = |source| ApplianceError::KernelUnreadable {
        path: path.display().to_string(),
        source,
    };
    let mut head = Vec::with_capacity(64 * 1024);
    fs_err::File::open(path)
        .map_err(unreadable)?
        .take(64 * 1024)
        .read_to_end(&mut head)
        .map_err(unreadable)?;
    if let Some(release) = bzimage_release(&head) {
        return Ok(release);
    }
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .filter(|r| !r.is_empty())
        .map(str::to_string)
        .ok_or_else(|| ApplianceError::KernelRelease {
            path: path.display().to_string(),
        })
}

/// The first word of a bzImage's version string (x86 boot protocol: `HdrS` at 0x202, the
/// string's offset minus 0x200 at 0x20e).
fn bzimage_release(head: &[u8]) -> Option<String> {
    if head.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let offset = u16::from_le_bytes([*head.get(0x20e)?, *head.get(0x20f)?]) as usize + 0x200;
    let rest = head.get(offset..)?;
    let end = rest.iter().position(|&b| b == 0 || b == b' ')?;
    let release = std::str::from_utf8(&rest[..end]).ok()?;
    (!release.is_empty() && release.is_ascii()).then(|| release.to_string())
}

/// A module's name as modprobe spells it: the file name without `.ko*`, `-` as `_`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.find(".ko").map_or(file, |i| &file[..i]);
    stem.replace('-', "_")
}

/// A kernel's `modules.dep` and `modules.builtin`.
#[derive(Debug, Default)]
pub struct ModuleIndex {
    /// Module name → (its path relative to the modules folder, the paths it depends on).
    deps: HashMap<String, (String, Vec<String>)>,
    builtin: HashSet<String>,
}

impl ModuleIndex {
    pub fn parse(modules_dep: &str, modules_builtin: &str) -> ModuleIndex {
        let mut deps = HashMap::new();
        for line in modules_dep.lines() {
            let Some((path, list)) = line.split_once(':') else {
                continue;
            };
            let path = path.trim();
            if path.is_empty() {
                continue;
            }
            let list = list.split_whitespace().map(str::to_string).collect();
            deps.insert(module_name(path), (path.to_string(), list));
        }
        let builtin = modules_builtin
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(module_name)
            .collect();
        ModuleIndex { deps, builtin }
    }

    fn read(kernel: &Kernel) -> Result<ModuleIndex, ApplianceError> {
        let read = |name: &str| {
            fs_err::read_to_string(kernel.modules.join(name)).map_err(|source| {
                ApplianceError::ModuleIndex {
                    release: kernel.release.clone(),
                    source,
                }
            })
        };
        let dep = read("modules.dep")?;
        // A kernel with everything built in may have no modules.builtin: nothing then.
        let builtin = if kernel.modules.join("modules.builtin").exists() {
            read("modules.builtin")?
        } else {
            String::new()
        };
        Ok(ModuleIndex::parse(&dep, &builtin))
    }
}

/// The modules to put in the appliance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closure {
    /// Paths relative to the modules folder, in load order (each after its dependencies).
    pub load_order: Vec<String>,
    /// Optional modules this kernel has neither as a module nor built in.
    pub skipped: Vec<String>,
}

/// The modules `required` and `optional` need, dependencies first; built-in ones left out.
/// A required module the kernel lacks is an error; an optional one is skipped.
pub fn closure(
    index: &ModuleIndex,
    required: &[&str],
    optional: &[&str],
    kernel: &Kernel,
) -> Result<Closure, ApplianceError> {
    let by_path: HashMap<&str, &str> = index
        .deps
        .iter()
        .map(|(name, (path, _))| (path.as_str(), name.as_str()))
        .collect();
    let mut order = Vec::new();
    let mut placed = HashSet::new();
    let mut skipped = Vec::new();
    // Depth first: a module's dependencies (each with its own) before it. modules.dep lists
    // a module's whole closure, in no order to rely on.
    fn place(
        name: &str,
        index: &ModuleIndex,
        by_path: &HashMap<&str, &str>,
        placed: &mut HashSet<String>,
        order: &mut Vec<String>,
    ) {
        if !placed.insert(name.to_string()) {
            return;
        }
        let Some((path, deps)) = index.deps.get(name) else {
            return;
        };
        for dep in deps {
            let dep_name = by_path
                .get(dep.as_str())
                .map_or_else(|| module_name(dep), |n| (*n).to_string());
            place(&dep_name, index, by_path, placed, order);
        }
        order.push(path.clone());
    }
    for (wanted, is_required) in required
        .iter()
        .map(|m| (*m, true))
        .chain(optional.iter().map(|m| (*m, false)))
    {
        if index.builtin.contains(wanted) {
            continue;
        }
        if !index.deps.contains_key(wanted) {
            if is_required {
                return Err(ApplianceError::ModuleMissing {
                    module: wanted.to_string(),
                    release: kernel.release.clone(),
                    dir: kernel.modules.display().to_string(),
                });
            }
            skipped.push(wanted.to_string());
            continue;
        }
        place(wanted, index, &by_path, &mut placed, &mut order);
    }
    Ok(Closure {
        load_order: order,
        skipped,
    })
}

/// The kernel command line of an appliance boot (the agent as init reads `builder.*`).
/// `no_timer_check`: the kernel's IO-APIC timer check fails under TCG on a loaded host
/// ("IO-APIC + timer doesn't work!", a panic); a VM's timer needs no check.
/// `cryptomgr.notests`: the crypto self-tests cost ~0.7 s of a ~3 s kernel boot under TCG.
pub fn cmdline(network: Network, hostname: &str) -> String {
    let mut line = format!(
        "console=ttyS0 panic=-1 quiet loglevel=4 no_timer_check cryptomgr.notests builder.appliance=1 builder.port={}",
        super::seed::AGENT_PORT
    );
    if network == Network::User {
        line.push_str(" builder.net=user");
    }
    line.push_str(" builder.hostname=");
    line.push_str(hostname);
    line
}

/// sha256 of what the appliance puts in the guest's way: the agent, the initramfs layout and
/// the command line's shape, the modules it asks for. Part of the layer cache's root key for
/// appliance builds (as [`super::seed::guest_digest`] is for full boots). The host's kernel
/// is not in it: a kernel update does not make new layers.
pub fn digest() -> &'static str {
    static DIGEST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DIGEST.get_or_init(|| {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        hasher.update(format!("builder appliance format {FORMAT_VERSION}\n"));
        hasher.update(crate::agent::AGENT_BINARY);
        for network in [Network::None, Network::User] {
            hasher.update(b"\n");
            hasher.update(cmdline(network, "builder"));
        }
        for module in REQUIRED_MODULES.iter().chain(OPTIONAL_MODULES) {
            hasher.update(b"\n");
            hasher.update(module);
        }
        hex::encode(hasher.finalize())
    })
}

/// The `builder-appliance: error:` lines of a console log (without the mark), in order.
pub fn console_errors(console: &str) -> Vec<String> {
    console
        .lines()
        .filter_map(|l| {
            let at = l.find(CONSOLE_ERROR_MARK)?;
            Some(l[at + CONSOLE_ERROR_MARK.len()..].trim().to_string())
        })
        .filter(|l| !l.is_empty())
        .collect()
}

/// The appliance ready to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appliance {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub release: String,
    /// Whether the initramfs came from the cache (else it was built now).
    pub cached: bool,
    /// Optional modules the kernel lacks.
    pub skipped: Vec<String>,
}

/// What a cache entry holds, written next to its initramfs (`record.json`).
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Record<'a> {
    format_version: u32,
    kernel: String,
    release: &'a str,
    agent_sha256: String,
    modules: &'a [String],
    skipped_optional_modules: &'a [String],
}

impl Appliance {
    /// Find the kernel ([`find_kernel`]) and get its initramfs from the cache in `cache_dir`,
    /// building it first when it is not there. `progress` gets one line:
    /// `appliance: kernel <release>, initramfs cached|built in N s`.
    pub fn prepare(
        cache_dir: &Path,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<Appliance, ApplianceError> {
        let kernel = find_kernel()?;
        Appliance::prepare_kernel(&kernel, cache_dir, progress)
    }

    /// [`Appliance::prepare`] with a kernel already found.
    pub fn prepare_kernel(
        kernel: &Kernel,
        cache_dir: &Path,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<Appliance, ApplianceError> {
        let t0 = Instant::now();
        let index = ModuleIndex::read(kernel)?;
        let closure = closure(&index, REQUIRED_MODULES, OPTIONAL_MODULES, kernel)?;
        let key = cache_key(kernel, &closure)?;
        let cache_err = |source| ApplianceError::Cache {
            dir: cache_dir.display().to_string(),
            source,
        };
        let entry = cache_dir.join(&key);
        let initrd = entry.join("initrd.cpio");
        let mut cached = initrd.is_file();
        if !cached {
            fs_err::create_dir_all(&entry).map_err(cache_err)?;
            // Another build may be writing this entry: wait for it rather than write it twice.
            let lock = fs_err::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(entry.join("lock"))
                .map_err(cache_err)?;
            lock.lock().map_err(cache_err)?;
            cached = initrd.is_file();
            if !cached {
                write_entry(kernel, &closure, &entry).map_err(cache_err)?;
                prune(cache_dir, &key);
            }
        }
        if cached {
            // The entry's last use, for the pruning of old entries; best effort.
            let _ = fs_err::File::options()
                .write(true)
                .open(&initrd)
                .and_then(|f| f.set_modified(SystemTime::now()));
        }
        progress(&format!(
            "appliance: kernel {}, initramfs {} in {:.1} s",
            kernel.release,
            if cached { "cached" } else { "built" },
            t0.elapsed().as_secs_f64()
        ));
        Ok(Appliance {
            kernel: kernel.path.clone(),
            initrd,
            release: kernel.release.clone(),
            cached,
            skipped: closure.skipped,
        })
    }
}

/// sha256 of everything the initramfs is made of and the kernel it goes with.
fn cache_key(kernel: &Kernel, closure: &Closure) -> Result<String, ApplianceError> {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(format!("builder appliance initramfs {FORMAT_VERSION}\n"));
    let kernel_digest = crate::digest::sha256_file(&kernel.path, None).map_err(|source| {
        ApplianceError::KernelUnreadable {
            path: kernel.path.display().to_string(),
            source,
        }
    })?;
    hasher.update(format!(
        "kernel {} {}\n",
        kernel.release,
        kernel_digest.hex()
    ));
    for module in &closure.load_order {
        let path = kernel.modules.join(module);
        let d = crate::digest::sha256_file(&path, None).map_err(|source| {
            ApplianceError::ModuleUnreadable {
                path: path.display().to_string(),
                source,
            }
        })?;
        hasher.update(format!("module {module} {}\n", d.hex()));
    }
    hasher.update(b"agent ");
    hasher.update(Sha256::digest(crate::agent::AGENT_BINARY));
    Ok(hex::encode(hasher.finalize()))
}

/// Write `initrd.cpio` and `record.json` into the entry's folder (the lock held).
fn write_entry(kernel: &Kernel, closure: &Closure, entry: &Path) -> std::io::Result<()> {
    use sha2::{Digest, Sha256};
    let record = Record {
        format_version: FORMAT_VERSION,
        kernel: kernel.path.display().to_string(),
        release: &kernel.release,
        agent_sha256: hex::encode(Sha256::digest(crate::agent::AGENT_BINARY)),
        modules: &closure.load_order,
        skipped_optional_modules: &closure.skipped,
    };
    // Under the lock, a temporary file is one a killed build left: remove it.
    for stale in fs_err::read_dir(entry)?.flatten() {
        if stale.file_name().to_string_lossy().starts_with(".tmp") {
            let _ = fs_err::remove_file(stale.path());
        }
    }
    crate::atomic::write_json(&entry.join("record.json"), &record)?;

    let tmp = tempfile::NamedTempFile::new_in(entry)?;
    let mut out = BufWriter::new(tmp);
    write_initramfs(
        &mut out,
        crate::agent::AGENT_BINARY,
        &kernel.release,
        &kernel.modules,
        &closure.load_order,
    )?;
    let tmp = out.into_inner().map_err(|e| e.into_error())?;
    tmp.as_file().sync_all()?;
    tmp.persist(entry.join("initrd.cpio"))
        .map_err(|e| e.error)?;
    Ok(())
}

/// Remove cache entries other than `keep` unused for [`CACHE_KEEP`] whose lock is free.
fn prune(cache_dir: &Path, keep: &str) {
    let Ok(entries) = fs_err::read_dir(cache_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_name() == keep || !path.is_dir() {
            continue;
        }
        let old = fs_err::metadata(path.join("initrd.cpio"))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > CACHE_KEEP);
        if !old {
            continue;
        }
        let Ok(lock) = fs_err::File::open(path.join("lock")) else {
            continue;
        };
        if lock.try_lock().is_ok() {
            let _ = fs_err::remove_dir_all(&path);
        }
    }
}

/// The newc cpio of the appliance (see the module's doc), written with the `cpio` crate.
/// Every entry is root's, dated 0, so the same inputs make the same bytes.
pub fn write_initramfs(
    out: &mut impl Write,
    agent: &[u8],
    release: &str,
    modules_dir: &Path,
    load_order: &[String],
) -> std::io::Result<()> {
    use cpio::newc::Builder;
    let mut ino = 0u32;
    let mut next = || {
        ino += 1;
        ino
    };
    let too_big = |name: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{name} is too big for a cpio archive (4 GiB)"),
        )
    };
    let mut file = |out: &mut dyn Write, name: &str, mode: u32, data: &mut dyn Read, size: u64| {
        let size32 = u32::try_from(size).map_err(|_| too_big(name))?;
        let mut w = Builder::new(name)
            .ino(next())
            .mode(0o100000 | mode)
            .write(out, size32);
        let copied = std::io::copy(data, &mut w)?;
        if copied != size {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{name}: {copied} bytes read, {size} expected (the file changed?)"),
            ));
        }
        w.finish()?;
        Ok::<_, std::io::Error>(())
    };

    let module_root = format!("lib/modules/{release}");
    let mut dirs: BTreeSet<String> = [
        "dev",
        "proc",
        "sys",
        "sysroot",
        "run",
        "etc",
        "etc/builder-appliance",
        "lib",
        "lib/modules",
    ]
    .into_iter()
    .map(str::to_string)
    .collect();
    dirs.insert(module_root.clone());
    for module in load_order {
        let mut path = Path::new(module).parent();
        while let Some(p) = path.filter(|p| !p.as_os_str().is_empty()) {
            dirs.insert(format!("{module_root}/{}", p.display()));
            path = p.parent();
        }
    }
    // Sorted: every parent before its children.
    let mut ino_dirs = 0u32;
    for dir in &dirs {
        ino_dirs += 1;
        Builder::new(dir)
            .ino(1_000_000 + ino_dirs)
            .mode(0o040755)
            .nlink(2)
            .write(&mut *out, 0)
            .finish()?;
    }
    Builder::new("tmp")
        .ino(1_000_000 + ino_dirs + 1)
        .mode(0o041777)
        .nlink(2)
        .write(&mut *out, 0)
        .finish()?;
    Builder::new("dev/console")
        .ino(1_000_000 + ino_dirs + 2)
        .mode(0o020600)
        .rdev_major(5)
        .rdev_minor(1)
        .write(&mut *out, 0)
        .finish()?;

    file(
        out,
        "init",
        0o755,
        &mut std::io::Cursor::new(agent),
        agent.len() as u64,
    )?;
    let kernel_file = format!("{release}\n");
    file(
        out,
        KERNEL_FILE.trim_start_matches('/'),
        0o644,
        &mut kernel_file.as_bytes(),
        kernel_file.len() as u64,
    )?;
    let list: String = load_order
        .iter()
        .map(|m| format!("/{module_root}/{m}\n"))
        .collect();
    file(
        out,
        MODULES_FILE.trim_start_matches('/'),
        0o644,
        &mut list.as_bytes(),
        list.len() as u64,
    )?;
    for module in load_order {
        let path = modules_dir.join(module);
        let mut f = fs_err::File::open(&path)?;
        let size = f.metadata()?.len();
        file(out, &format!("{module_root}/{module}"), 0o644, &mut f, size)?;
    }
    cpio::newc::trailer(&mut *out)?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/xfs/xfs.ko: kernel/lib/libcrc32c.ko
kernel/fs/btrfs/btrfs.ko: kernel/crypto/xor.ko kernel/lib/raid6/raid6_pq.ko kernel/lib/zstd/zstd_compress.ko kernel/lib/libcrc32c.ko
kernel/lib/libcrc32c.ko:
kernel/crypto/xor.ko:
kernel/lib/raid6/raid6_pq.ko:
kernel/lib/zstd/zstd_compress.ko:
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/md/dm-mod.ko:
kernel/fs/nls/nls_iso8859-1.ko:
";
    const BUILTIN: &str = "kernel/fs/ext4/ext4.ko\nkernel/crypto/crc32c_generic.ko\n";

    fn kernel() -> Kernel {
        Kernel {
            path: "/boot/vmlinuz-6.1.0-57-cloud-amd64".into(),
            release: "6.1.0-57-cloud-amd64".into(),
            modules: "/lib/modules/6.1.0-57-cloud-amd64".into(),
        }
    }

    #[test]
    fn the_closure_loads_dependencies_first_and_leaves_out_what_is_built_in() {
        let index = ModuleIndex::parse(DEP, BUILTIN);
        let c = closure(
            &index,
            REQUIRED_MODULES,
            &[
                "btrfs",
                "xfs",
                "virtio_rng",
                "dm_mod",
                "nls_iso8859_1",
                "vfat",
            ],
            &kernel(),
        )
        .expect("closure");
        assert_eq!(
            c.load_order,
            [
                "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
                "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/virtio/virtio_pci.ko",
                "kernel/drivers/block/virtio_blk.ko.xz",
                "kernel/drivers/char/virtio_console.ko",
                "kernel/crypto/xor.ko",
                "kernel/lib/raid6/raid6_pq.ko",
                "kernel/lib/zstd/zstd_compress.ko",
                "kernel/lib/libcrc32c.ko",
                "kernel/fs/btrfs/btrfs.ko",
                "kernel/fs/xfs/xfs.ko",
                "kernel/drivers/char/hw_random/virtio-rng.ko",
                "kernel/drivers/md/dm-mod.ko",
                "kernel/fs/nls/nls_iso8859-1.ko",
            ]
        );
        // ext4 is built in: not listed, not an error. vfat is not there: skipped.
        assert_eq!(c.skipped, ["vfat"]);
    }

    #[test]
    fn a_required_module_the_kernel_lacks_is_an_error_with_a_hint() {
        let index = ModuleIndex::parse(DEP, "");
        let e = closure(&index, REQUIRED_MODULES, &[], &kernel()).expect_err("no ext4");
        assert_eq!(
            e.to_string(),
            "kernel 6.1.0-57-cloud-amd64 has no module `ext4`, which the appliance needs (not in /lib/modules/6.1.0-57-cloud-amd64/modules.dep, not built in)"
        );
        assert!(e.hint().is_some_and(|h| h.contains("boot: full")));
    }

    #[test]
    fn module_names_as_modprobe_spells_them() {
        assert_eq!(module_name("kernel/drivers/md/dm-mod.ko"), "dm_mod");
        assert_eq!(module_name("kernel/fs/xfs/xfs.ko.zst"), "xfs");
        assert_eq!(module_name("virtio_blk.ko.xz"), "virtio_blk");
    }

    #[test]
    fn kernels_are_found_newest_first_and_only_with_their_modules() {
        let dir = tempfile::tempdir().expect("temp dir");
        let boot = dir.path().join("boot");
        let modules = dir.path().join("modules");
        fs_err::create_dir_all(&boot).expect("mkdir");
        for release in ["6.1.0-9-amd64", "6.1.0-57-amd64", "6.10.0-1-amd64"] {
            fs_err::write(boot.join(format!("vmlinuz-{release}")), b"not a bzImage").expect("w");
        }
        // The newest has no modules: the next newest is taken.
        for release in ["6.1.0-9-amd64", "6.1.0-57-amd64"] {
            fs_err::create_dir_all(modules.join(release)).expect("mkdir");
            fs_err::write(modules.join(release).join("modules.dep"), DEP).expect("w");
        }
        let k = find_kernel_in(None, &boot, &modules).expect("found");
        assert_eq!(k.release, "6.1.0-57-amd64");
        assert_eq!(k.path, boot.join("vmlinuz-6.1.0-57-amd64"));
        assert_eq!(k.modules, modules.join("6.1.0-57-amd64"));

        // The variable wins; its release from the file name when the header has none.
        let named = boot.join("vmlinuz-6.1.0-9-amd64");
        let k = find_kernel_in(Some(named.clone().into()), &boot, &modules).expect("named");
        assert_eq!(k.release, "6.1.0-9-amd64");
        let e = find_kernel_in(Some(boot.join("nope").into()), &boot, &modules).expect_err("x");
        assert!(matches!(e, ApplianceError::KernelMissing { .. }), "{e}");
        let odd = boot.join("bzImage");
        fs_err::write(&odd, b"x").expect("w");
        let e = find_kernel_in(Some(odd.into()), &boot, &modules).expect_err("no release");
        assert!(matches!(e, ApplianceError::KernelRelease { .. }), "{e}");

        // Nothing usable: the error says what was there, the hint which package.
        let e = find_kernel_in(None, &boot, &dir.path().join("none")).expect_err("no modules");
        assert!(
            e.to_string().contains(
                "vmlinuz-6.1.0-57-amd64, vmlinuz-6.1.0-9-amd64, vmlinuz-6.10.0-1-amd64 in"
            ),
            "{e}"
        );
        assert!(
            e.hint()
                .is_some_and(|h| h.contains("apt-get install linux-image-cloud-amd64"))
        );
        let e = find_kernel_in(None, &dir.path().join("noboot"), &modules).expect_err("none");
        assert!(
            e.to_string()
                .contains("BUILDER_APPLIANCE_KERNEL is not set"),
            "{e}"
        );
    }

    #[test]
    fn the_release_comes_from_the_bzimage_header() {
        let mut head = vec![0u8; 0x4000];
        head[0x202..0x206].copy_from_slice(b"HdrS");
        head[0x20e..0x210].copy_from_slice(&0x3000u16.to_le_bytes());
        let version = b"6.1.0-57-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP\0";
        head[0x3200..0x3200 + version.len()].copy_from_slice(version);
        assert_eq!(
            bzimage_release(&head).as_deref(),
            Some("6.1.0-57-cloud-amd64")
        );
        assert_eq!(bzimage_release(&head[..0x100]), None);
        head[0x202] = b'X';
        assert_eq!(bzimage_release(&head), None);
    }

    #[test]
    fn the_command_line_has_what_init_reads() {
        assert_eq!(
            cmdline(Network::None, "builder"),
            "console=ttyS0 panic=-1 quiet loglevel=4 no_timer_check cryptomgr.notests builder.appliance=1 builder.port=org.builder.agent.0 builder.hostname=builder"
        );
        assert!(cmdline(Network::User, "b").contains(" builder.net=user "));
        assert_eq!(digest().len(), 64);
    }

    #[test]
    fn console_errors_are_the_marked_lines() {
        let console = "[    1.0] Run /init as init process\r\n\
            builder-appliance: root not found yet\r\n\
            builder-appliance: error: no root file system found: vda: GPT, 3 partitions\r\n\
            builder-appliance: error: vda1: ext4 without /etc/os-release\r\n\
            [    2.0] reboot: Power down\r\n";
        assert_eq!(
            console_errors(console),
            [
                "no root file system found: vda: GPT, 3 partitions",
                "vda1: ext4 without /etc/os-release"
            ]
        );
        assert!(console_errors("builder-appliance: fine\n").is_empty());
    }

    #[test]
    fn the_initramfs_has_init_the_console_the_lists_and_the_modules() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mods = dir.path();
        for (m, body) in [
            ("kernel/lib/libcrc32c.ko", &b"crc"[..]),
            ("kernel/fs/xfs/xfs.ko.xz", &b"xfs module, compressed"[..]),
        ] {
            fs_err::create_dir_all(mods.join(m).parent().expect("parent")).expect("mkdir");
            fs_err::write(mods.join(m), body).expect("write");
        }
        let order = vec![
            "kernel/lib/libcrc32c.ko".to_string(),
            "kernel/fs/xfs/xfs.ko.xz".to_string(),
        ];
        let mut bytes = Vec::new();
        write_initramfs(&mut bytes, b"\x7fELF agent", "6.1.0-x", mods, &order).expect("write");
        let again = {
            let mut b = Vec::new();
            write_initramfs(&mut b, b"\x7fELF agent", "6.1.0-x", mods, &order).expect("write");
            b
        };
        assert_eq!(bytes, again, "the same inputs make the same bytes");

        let mut entries = Vec::new();
        let mut rest = std::io::Cursor::new(bytes);
        loop {
            let mut reader = cpio::NewcReader::new(rest).expect("entry");
            if reader.entry().is_trailer() {
                break;
            }
            let e = reader.entry();
            let (name, mode, rdev) = (
                e.name().to_string(),
                e.mode(),
                (e.rdev_major(), e.rdev_minor()),
            );
            let mut body = Vec::new();
            reader.read_to_end(&mut body).expect("read");
            entries.push((name, mode, rdev, body));
            rest = reader.finish().expect("next");
        }
        let find = |name: &str| {
            entries.iter().find(|e| e.0 == name).unwrap_or_else(|| {
                panic!(
                    "{name} in {:?}",
                    entries.iter().map(|e| &e.0).collect::<Vec<_>>()
                )
            })
        };
        assert_eq!(find("init").1, 0o100755);
        assert_eq!(find("init").3, b"\x7fELF agent");
        assert_eq!(find("dev/console").1, 0o020600);
        assert_eq!(find("dev/console").2, (5, 1));
        assert_eq!(find("tmp").1, 0o041777);
        for d in ["dev", "proc", "sys", "sysroot", "run", "etc", "lib/modules"] {
            assert_eq!(find(d).1, 0o040755, "{d}");
        }
        assert_eq!(find("etc/builder-appliance/kernel").3, b"6.1.0-x\n");
        assert_eq!(
            String::from_utf8_lossy(&find("etc/builder-appliance/modules").3),
            "/lib/modules/6.1.0-x/kernel/lib/libcrc32c.ko\n/lib/modules/6.1.0-x/kernel/fs/xfs/xfs.ko.xz\n"
        );
        assert_eq!(
            find("lib/modules/6.1.0-x/kernel/fs/xfs/xfs.ko.xz").3,
            b"xfs module, compressed"
        );
        // Each directory comes before what is in it.
        let pos = |n: &str| entries.iter().position(|e| e.0 == n).expect("there");
        assert!(pos("lib/modules/6.1.0-x/kernel/fs") < pos("lib/modules/6.1.0-x/kernel/fs/xfs"));
        assert!(
            pos("lib/modules/6.1.0-x/kernel/fs/xfs")
                < pos("lib/modules/6.1.0-x/kernel/fs/xfs/xfs.ko.xz")
        );
    }

    #[test]
    fn prepare_builds_once_then_reuses_the_cache() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mods = dir.path().join("modules/6.1.0-x");
        fs_err::create_dir_all(&mods).expect("mkdir");
        let mut dep = String::new();
        for m in ["virtio_pci", "virtio_blk", "virtio_console", "ext4", "xfs"] {
            let path = format!("kernel/{m}.ko");
            fs_err::create_dir_all(mods.join("kernel")).expect("mkdir");
            fs_err::write(mods.join(&path), m).expect("write");
            dep.push_str(&format!("{path}:\n"));
        }
        fs_err::write(mods.join("modules.dep"), dep).expect("write");
        let vmlinuz = dir.path().join("vmlinuz-6.1.0-x");
        fs_err::write(&vmlinuz, b"kernel").expect("write");
        let kernel = Kernel {
            path: vmlinuz,
            release: "6.1.0-x".into(),
            modules: mods,
        };
        let cache = dir.path().join("cache");
        let said = std::sync::Mutex::new(Vec::new());
        let progress = |m: &str| said.lock().expect("lock").push(m.to_string());
        // What a build killed while writing this entry left behind.
        let entry_dir = cache.join(
            cache_key(
                &kernel,
                &closure(
                    &ModuleIndex::read(&kernel).expect("index"),
                    REQUIRED_MODULES,
                    OPTIONAL_MODULES,
                    &kernel,
                )
                .expect("closure"),
            )
            .expect("key"),
        );
        fs_err::create_dir_all(&entry_dir).expect("mkdir");
        fs_err::write(entry_dir.join(".tmpKILLED"), b"half an initramfs").expect("write");
        let first = Appliance::prepare_kernel(&kernel, &cache, &progress).expect("built");
        assert!(
            !entry_dir.join(".tmpKILLED").exists(),
            "the killed build's file is gone"
        );
        assert!(!first.cached);
        assert!(first.initrd.starts_with(&cache) && first.initrd.is_file());
        assert!(first.skipped.contains(&"btrfs".to_string()));
        let second = Appliance::prepare_kernel(&kernel, &cache, &progress).expect("cached");
        assert!(second.cached);
        assert_eq!(second.initrd, first.initrd);
        let said = said.lock().expect("lock").clone();
        assert!(
            said[0].starts_with("appliance: kernel 6.1.0-x, initramfs built in "),
            "{said:?}"
        );
        assert!(
            said[1].starts_with("appliance: kernel 6.1.0-x, initramfs cached in "),
            "{said:?}"
        );
        let record =
            fs_err::read_to_string(first.initrd.with_file_name("record.json")).expect("record");
        assert!(record.contains("\"skippedOptionalModules\""), "{record}");
        // A changed module is a new entry.
        fs_err::write(kernel.modules.join("kernel/xfs.ko"), "xfs 2").expect("write");
        let third = Appliance::prepare_kernel(&kernel, &cache, &progress).expect("rebuilt");
        assert!(!third.cached);
        assert_ne!(third.initrd, first.initrd);
    }
}
