//! Local targets: a directory, a Vagrant box (libvirt provider), the store itself.
//!
//! Everything is written under a temporary name next to its destination and renamed into
//! place only when complete and verified, so a reader never sees half of it and a failure
//! (or Ctrl-C) leaves nothing behind:
//!
//! - directory: `<path>/.<name>.partial-<random>/` receives the outputs, `manifest.json` and
//!   `SHA256SUMS`; each copied file is read back and its sha256 compared with the manifest;
//!   then one rename makes it `<path>/<name>/`.
//! - Vagrant box: `.<box>.partial-<random>` is written as a gzip'd tar (`metadata.json`,
//!   `Vagrantfile`, `box.img`), synced, then renamed; `<box>.json` (catalog metadata that
//!   `vagrant box add` also reads) is written next to it.
//!
//! File work runs on a blocking thread; it reports progress through a channel and stops at
//! the next chunk when the caller's future is dropped. A format the build did not export
//! (an OVA, say) is converted from the stored disk with [`crate::export`].

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use chrono::Utc;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::{Progress, Receipt, StoredImage};
use crate::export::{self, ExportError, SUMS_FILE};
use crate::recipe::Format;
use crate::recipe::model::ArchiveFormat;
use crate::store::Artifact;
use crate::store::manifest::MANIFEST_FILE;

/// Bytes per read/write while copying; progress is reported every [`REPORT_EVERY`].
const CHUNK: usize = 1 << 20;
const REPORT_EVERY: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// A file system call failed; fs-err's error names the path and what was being done.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("could not use the folder {path}")]
    NotAFolder {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} already exists; pass --overwrite (or `overwrite: true`) to replace it")]
    Exists { path: PathBuf },
    #[error(
        "{path} was copied, but the copy has sha256 {actual} where the manifest says {expected}"
    )]
    Corrupt {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{image} has no {format} output and none can be made: it has no qcow2 or raw disk")]
    NoDisk { image: String, format: Format },
    #[error("the output {file} of {image} is missing from its folder")]
    Missing { image: String, file: PathBuf },
    #[error("converting {image} to {format} failed")]
    Convert {
        image: String,
        format: Format,
        #[source]
        source: ExportError,
    },
    #[error("`{name}` cannot be used as a file name: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("the copy was stopped")]
    Cancelled,
    #[error("writing the {format} of {image} failed")]
    Archive {
        image: String,
        format: ArchiveFormat,
        #[source]
        source: super::archive::ArchiveError,
    },
    #[error("the container image of {image} cannot be read")]
    Store {
        image: String,
        #[source]
        source: Box<crate::store::StoreError>,
    },
    #[error("a copy task stopped unexpectedly: {0}")]
    Task(String),
}

/// A rendered name used as one path component.
pub fn check_file_name(name: &str) -> Result<(), DirectoryError> {
    let bad = |reason| {
        Err(DirectoryError::BadName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.starts_with('.') {
        return bad("it starts with a dot");
    }
    if name.len() > 200 {
        return bad("it is longer than 200 bytes");
    }
    if name.contains(['/', '\\']) || name.chars().any(char::is_control) {
        return bad("it holds a slash or a control character");
    }
    Ok(())
}

// ─── progress from a blocking thread ───────────────────────────────────────────────────

enum Message {
    Step(String),
    Transfer(String, u64, Option<u64>),
}

/// What a blocking task uses to report and to learn that it should stop.
struct Reporter {
    tx: mpsc::UnboundedSender<Message>,
    cancelled: Arc<AtomicBool>,
}

impl Reporter {
    fn step(&self, message: impl Into<String>) {
        let _ = self.tx.send(Message::Step(message.into()));
    }
    fn transfer(&self, what: &str, done: u64, total: Option<u64>) {
        let _ = self
            .tx
            .send(Message::Transfer(what.to_string(), done, total));
    }
    fn check(&self) -> Result<(), DirectoryError> {
        if self.cancelled.load(Ordering::Relaxed) {
            Err(DirectoryError::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// Sets the flag when dropped: a dropped future stops its blocking task.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Run `work` on a blocking thread, forwarding its progress to `progress` as `target`.
async fn run_blocking<T: Send + 'static>(
    target: &str,
    progress: &dyn Progress,
    work: impl FnOnce(&Reporter) -> Result<T, DirectoryError> + Send + 'static,
) -> Result<T, DirectoryError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let cancelled = Arc::new(AtomicBool::new(false));
    let _cancel = CancelOnDrop(cancelled.clone());
    let reporter = Reporter { tx, cancelled };
    let task = tokio::task::spawn_blocking(move || work(&reporter));
    while let Some(message) = rx.recv().await {
        match message {
            Message::Step(m) => progress.step(target, &m),
            Message::Transfer(what, done, total) => progress.transfer(target, &what, done, total),
        }
    }
    task.await
        .map_err(|e| DirectoryError::Task(e.to_string()))?
}

// ─── temporary names ───────────────────────────────────────────────────────────────────

fn partial_name(dir: &Path, name: &str) -> PathBuf {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    dir.join(format!(".{name}.partial-{}", &tag[..8]))
}

/// A file or folder under a temporary name: removed on drop unless renamed into place.
struct Partial {
    path: PathBuf,
    armed: bool,
}

impl Partial {
    fn new(path: PathBuf) -> Self {
        Self { path, armed: true }
    }

    /// Rename into place. With `overwrite`, an existing destination is first moved aside and
    /// removed after the rename, so the destination name is never missing for long and never
    /// half-written.
    fn persist(mut self, dest: &Path, overwrite: bool) -> Result<(), DirectoryError> {
        let mut aside = None;
        if dest.symlink_metadata().is_ok() {
            if !overwrite {
                return Err(DirectoryError::Exists {
                    path: dest.to_path_buf(),
                });
            }
            let parent = dest.parent().unwrap_or(Path::new("."));
            let name = dest
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let old = partial_name(parent, &format!("{name}.old"));
            fs_err::rename(dest, &old)?;
            aside = Some(old);
        }
        fs_err::rename(&self.path, dest)?;
        self.armed = false;
        if let Some(old) = aside {
            let _ = remove_any(&old);
        }
        Ok(())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if self.armed {
            let _ = remove_any(&self.path);
        }
    }
}

fn remove_any(path: &Path) -> std::io::Result<()> {
    if path.is_dir() {
        fs_err::remove_dir_all(path)
    } else {
        fs_err::remove_file(path)
    }
}

/// Copy `from` to `to` in chunks with progress, sync it, read it back and compare its sha256
/// with `expected`. Blocking.
fn copy_verified(
    from: &Path,
    to: &Path,
    expected: &str,
    what: &str,
    r: &Reporter,
) -> Result<u64, DirectoryError> {
    let mut src = fs_err::File::open(from)?;
    let total = src.metadata()?.len();
    let mut dst = fs_err::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)?;
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    let mut last = 0u64;
    r.transfer(what, 0, Some(total));
    loop {
        r.check()?;
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        dst.write_all(&buf[..n])?;
        done += n as u64;
        if done - last >= REPORT_EVERY {
            last = done;
            r.transfer(what, done, Some(total));
        }
    }
    dst.sync_all()?;
    drop(dst);
    r.transfer(what, done, Some(total));
    r.step(format!("{what}: verifying sha256"));
    let actual = hash_file(to, r)?;
    if actual != expected {
        return Err(DirectoryError::Corrupt {
            path: to.to_path_buf(),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(done)
}

fn hash_file(path: &Path, r: &Reporter) -> Result<String, DirectoryError> {
    let mut each_block = |_: crate::digest::Hashed<'_>| {
        if r.check().is_err() {
            std::ops::ControlFlow::Break(())
        } else {
            std::ops::ControlFlow::Continue(())
        }
    };
    match crate::digest::sha256_file(path, Some(&mut each_block)) {
        Ok(d) => Ok(d.hex()),
        // Stopped because the copy was cancelled: say that.
        Err(e) => r.check().and(Err(DirectoryError::Io(e))),
    }
}

/// The OVA machine description from what the manifest recorded about the build VM.
fn machine(image: &StoredImage) -> export::MachineSpec {
    let host = &image.manifest.host;
    export::MachineSpec {
        name: format!("{}-{}", image.name, image.version),
        description: None,
        cpus: if host.cpus == 0 { 2 } else { host.cpus },
        memory_mib: if host.memory_mib == 0 {
            1024
        } else {
            host.memory_mib
        },
        firmware: if host.firmware.starts_with("uefi") {
            crate::recipe::Firmware::Uefi
        } else {
            crate::recipe::Firmware::Bios
        },
        controller: export::DiskController::Scsi,
    }
}

/// Forwards an export's progress as a distribution target's.
struct ExportBridge<'a> {
    target: &'a str,
    progress: &'a dyn Progress,
}

impl export::ExportProgress for ExportBridge<'_> {
    fn started(&self, format: Format, file: &str) {
        self.progress.step(
            self.target,
            &format!("{format}: converting from the stored disk to {file}"),
        );
    }
    fn converting(&self, format: Format, percent: f32) {
        self.progress
            .converting(self.target, format.name(), percent as u64);
    }
    fn verifying(&self, format: Format) {
        self.progress
            .step(self.target, &format!("{format}: checking and hashing"));
    }
}

/// Convert the stored disk to `format` in `dir` (a folder of ours): the new artifact.
async fn convert(
    image: &StoredImage,
    format: Format,
    dir: &Path,
    stem: &str,
    target: &str,
    progress: &dyn Progress,
) -> Result<Artifact, DirectoryError> {
    let disk = image
        .disk
        .as_ref()
        .filter(|d| d.path.is_file())
        .ok_or_else(|| DirectoryError::NoDisk {
            image: image.reference(),
            format,
        })?;
    let mut request = export::ExportRequest::new(&disk.path, dir, stem, &[format]);
    request.machine = machine(image);
    let bridge = ExportBridge { target, progress };
    let report =
        export::export(&request, &bridge)
            .await
            .map_err(|source| DirectoryError::Convert {
                image: image.reference(),
                format,
                source,
            })?;
    report
        .artifacts
        .into_iter()
        .next()
        .ok_or_else(|| DirectoryError::Task("the export produced nothing".into()))
}

// ─── directory ─────────────────────────────────────────────────────────────────────────

/// Where and how to copy an image into a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryOptions {
    /// The folder that receives the image's folder (created if missing).
    pub path: PathBuf,
    /// The image's folder name (a rendered name template).
    pub name: String,
    /// Which outputs; empty: every output of the build.
    pub formats: Vec<Format>,
    /// A container build's archive files; empty: an `oci-archive`.
    pub archives: Vec<ArchiveFormat>,
    pub overwrite: bool,
}

impl DirectoryOptions {
    /// `<path>/<name>`.
    pub fn destination(&self) -> PathBuf {
        self.path.join(&self.name)
    }
}

/// What can be checked before anything is written: the name, and the destination is free.
pub fn preflight_directory(options: &DirectoryOptions) -> Result<(), DirectoryError> {
    check_file_name(&options.name)?;
    let dest = options.destination();
    if !options.overwrite && dest.symlink_metadata().is_ok() {
        return Err(DirectoryError::Exists { path: dest });
    }
    if options.path.exists() && !options.path.is_dir() {
        return Err(DirectoryError::NotAFolder {
            path: options.path.clone(),
            source: std::io::Error::other("it is not a folder"),
        });
    }
    Ok(())
}

/// Copy the image's outputs, `manifest.json` and `SHA256SUMS` into `<path>/<name>/`.
pub async fn to_directory(
    image: &StoredImage,
    options: &DirectoryOptions,
    progress: &dyn Progress,
) -> Result<Receipt, DirectoryError> {
    const TARGET: &str = "directory";
    let started = Instant::now();
    preflight_directory(options)?;
    fs_err::create_dir_all(&options.path)?;
    let dest = options.destination();
    let temp = Partial::new(partial_name(&options.path, &options.name));
    fs_err::create_dir(&temp.path)?;
    if image.manifest.container.is_some() {
        return container_to_directory(image, options, temp, started, progress).await;
    }

    let wanted: Vec<Format> = if options.formats.is_empty() {
        image.manifest.outputs.iter().map(|a| a.format).collect()
    } else {
        options.formats.clone()
    };
    let stem = image
        .manifest
        .outputs
        .first()
        .and_then(|a| a.file.rsplit_once('.').map(|(s, _)| s.to_string()))
        .unwrap_or_else(|| format!("{}-{}-{}", image.name, image.version, image.build));
    let mut delivered: Vec<Artifact> = Vec::new();
    for format in wanted {
        if let Some(a) = image.manifest.output(format) {
            let from = a.path(&image.dir);
            if !from.is_file() {
                return Err(DirectoryError::Missing {
                    image: image.reference(),
                    file: from,
                });
            }
            let to = temp.path.join(&a.file);
            let what = a.file.clone();
            let expected = a.sha256.clone();
            progress.step(TARGET, &format!("copying {what}"));
            run_blocking(TARGET, progress, move |r| {
                copy_verified(&from, &to, &expected, &what, r)
            })
            .await?;
            delivered.push(a.clone());
        } else {
            // Not exported by the build: convert it into a scratch folder inside ours, then
            // move it up (same file system, one rename).
            let scratch = temp.path.join(".convert");
            fs_err::create_dir(&scratch)?;
            let a = convert(image, format, &scratch, &stem, TARGET, progress).await?;
            let to = temp.path.join(&a.file);
            fs_err::rename(a.path(&scratch), &to)?;
            fs_err::remove_dir_all(&scratch)?;
            delivered.push(a);
        }
    }
    // The manifest says what the build made; SHA256SUMS lists what this folder holds.
    let manifest_from = image.dir.join(MANIFEST_FILE);
    let manifest_to = temp.path.join(MANIFEST_FILE);
    fs_err::copy(&manifest_from, &manifest_to)?;
    let mut sums = String::new();
    for a in &delivered {
        sums.push_str(&format!("{}  {}\n", a.sha256, a.file));
    }
    let sums_path = temp.path.join(SUMS_FILE);
    fs_err::write(&sums_path, sums)?;
    fs_err::File::open(&temp.path).and_then(|d| d.sync_all())?;
    temp.persist(&dest, options.overwrite)?;
    progress.step(TARGET, &format!("stored in {}", dest.display()));

    let mut receipt = Receipt {
        kind: TARGET.into(),
        location: absolute(&dest).display().to_string(),
        digests: Default::default(),
        ids: Default::default(),
        finished: Utc::now(),
        seconds: started.elapsed().as_secs_f64(),
    };
    for a in &delivered {
        receipt.digests.insert(a.file.clone(), a.sha256.clone());
    }
    Ok(receipt)
}

/// [`to_directory`] for a container build: its image as archive files (`oci-archive` unless
/// `options.archives` says otherwise), `manifest.json` and `SHA256SUMS`, in `temp`, which is
/// renamed into place when whole.
async fn container_to_directory(
    image: &StoredImage,
    options: &DirectoryOptions,
    temp: Partial,
    started: Instant,
    progress: &dyn Progress,
) -> Result<Receipt, DirectoryError> {
    const TARGET: &str = "directory";
    let layout = image.layout().map_err(|e| DirectoryError::Store {
        image: image.reference(),
        source: Box::new(e),
    })?;
    let formats = if options.archives.is_empty() {
        vec![ArchiveFormat::OciArchive]
    } else {
        options.archives.clone()
    };
    let stem = format!("{}-{}-{}", image.name, image.version, image.build);
    // Repository names are lower case in Docker's references.
    let tag = format!("{}:{}", image.name.to_ascii_lowercase(), image.version);
    let mut written = Vec::new();
    for format in formats {
        let file = super::archive::file_name(&stem, format);
        let to = temp.path.join(&file);
        let (layout, tag, reference) = (layout.clone(), tag.clone(), image.reference());
        progress.step(TARGET, &format!("writing {file} ({format})"));
        let what = file.clone();
        let w = run_blocking(TARGET, progress, move |r| {
            let mut tick = |done: u64| {
                r.transfer(&what, done, None);
                if r.check().is_err() {
                    std::ops::ControlFlow::Break(())
                } else {
                    std::ops::ControlFlow::Continue(())
                }
            };
            super::archive::write(format, &layout, &to, &tag, &mut tick).map_err(|source| {
                match source {
                    super::archive::ArchiveError::Cancelled => DirectoryError::Cancelled,
                    source => DirectoryError::Archive {
                        image: reference,
                        format,
                        source,
                    },
                }
            })
        })
        .await?;
        written.push((file, w.sha256));
    }
    fs_err::copy(image.dir.join(MANIFEST_FILE), temp.path.join(MANIFEST_FILE))?;
    let sums: String = written
        .iter()
        .map(|(file, sha)| format!("{sha}  {file}\n"))
        .collect();
    fs_err::write(temp.path.join(SUMS_FILE), sums)?;
    fs_err::File::open(&temp.path).and_then(|d| d.sync_all())?;
    let dest = options.destination();
    temp.persist(&dest, options.overwrite)?;
    progress.step(TARGET, &format!("stored in {}", dest.display()));
    let mut receipt = Receipt {
        kind: TARGET.into(),
        location: absolute(&dest).display().to_string(),
        digests: written.into_iter().collect(),
        ids: Default::default(),
        finished: Utc::now(),
        seconds: started.elapsed().as_secs_f64(),
    };
    if let Some(c) = &image.manifest.container {
        receipt
            .digests
            .insert("manifest".into(), c.manifest_digest.clone());
    }
    Ok(receipt)
}

// ─── Vagrant box ───────────────────────────────────────────────────────────────────────

/// Where to write a Vagrant box.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VagrantOptions {
    /// The box file.
    pub path: PathBuf,
    pub overwrite: bool,
}

pub fn preflight_vagrant(options: &VagrantOptions) -> Result<(), DirectoryError> {
    let name = options
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    check_file_name(&name)?;
    if !options.overwrite && options.path.symlink_metadata().is_ok() {
        return Err(DirectoryError::Exists {
            path: options.path.clone(),
        });
    }
    Ok(())
}

/// `metadata.json` of a libvirt box: the provider, the disk format and its size in GB
/// (rounded up), as vagrant-libvirt reads it.
pub fn box_metadata(virtual_size: u64) -> String {
    let gb = virtual_size.div_ceil(1 << 30).max(1);
    format!("{{\"provider\": \"libvirt\", \"format\": \"qcow2\", \"virtual_size\": {gb}}}\n")
}

/// The box's `Vagrantfile`: libvirt defaults from the build VM (KVM, virtio disk, the CPUs
/// and memory the image was built with). A user's Vagrantfile overrides any of it.
pub fn box_vagrantfile(image: &StoredImage) -> String {
    let host = &image.manifest.host;
    let cpus = if host.cpus == 0 { 2 } else { host.cpus };
    let memory = if host.memory_mib == 0 {
        1024
    } else {
        host.memory_mib
    };
    let uefi = if host.firmware.starts_with("uefi") {
        "    # Built with UEFI firmware: point `libvirt.loader` at an OVMF image, e.g.\n    # libvirt.loader = \"/usr/share/OVMF/OVMF_CODE.fd\"\n"
    } else {
        ""
    };
    format!(
        "# {reference}, made by builder. Defaults for the libvirt provider (vagrant-libvirt).\n\
         Vagrant.configure(\"2\") do |config|\n  \
           config.vm.provider :libvirt do |libvirt|\n    \
             libvirt.driver = \"kvm\"\n    \
             libvirt.cpus = {cpus}\n    \
             libvirt.memory = {memory}\n    \
             libvirt.disk_bus = \"virtio\"\n{uefi}  \
           end\n\
         end\n",
        reference = image.reference(),
    )
}

/// Write the image as a Vagrant box for the libvirt provider.
pub async fn to_vagrant(
    image: &StoredImage,
    options: &VagrantOptions,
    progress: &dyn Progress,
) -> Result<Receipt, DirectoryError> {
    const TARGET: &str = "vagrant";
    let started = Instant::now();
    preflight_vagrant(options)?;
    let dir = options
        .path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    fs_err::create_dir_all(&dir)?;
    let file_name = options
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();

    // The box holds a qcow2: the stored one, or one converted from a raw output.
    let mut scratch = None;
    let qcow2: Artifact = match image.manifest.output(Format::Qcow2) {
        Some(a) => a.clone(),
        None => {
            let s = Partial::new(partial_name(&dir, &format!("{file_name}.qcow2")));
            fs_err::create_dir(&s.path)?;
            let a = convert(image, Format::Qcow2, &s.path, "box", TARGET, progress).await?;
            scratch = Some(s);
            a
        }
    };
    let disk_path = match &scratch {
        Some(s) => qcow2.path(&s.path),
        None => qcow2.path(&image.dir),
    };
    if !disk_path.is_file() {
        return Err(DirectoryError::Missing {
            image: image.reference(),
            file: disk_path,
        });
    }
    let metadata = box_metadata(qcow2.virtual_size);
    let vagrantfile = box_vagrantfile(image);
    let partial = Partial::new(partial_name(&dir, &file_name));
    let box_tmp = partial.path.clone();
    progress.step(TARGET, &format!("writing {file_name} (libvirt provider)"));
    let box_sha = run_blocking(TARGET, progress, move |r| {
        write_box(&box_tmp, &metadata, &vagrantfile, &disk_path, r)
    })
    .await?;
    partial.persist(&options.path, options.overwrite)?;
    drop(scratch);

    let location = absolute(&options.path);
    let catalog = catalog_path(&location);
    let catalog_json = serde_json::json!({
        "name": image.name,
        "description": format!("{} built by builder", image.reference()),
        "versions": [{
            "version": image.version.to_string(),
            "providers": [{
                "name": "libvirt",
                "url": format!("file://{}", location.display()),
                "checksum_type": "sha256",
                "checksum": box_sha,
            }],
        }],
    });
    crate::store::write_json(&catalog, &catalog_json)?;
    progress.step(
        TARGET,
        &format!("box {} (sha256 {box_sha})", location.display()),
    );

    let mut receipt = Receipt {
        kind: TARGET.into(),
        location: location.display().to_string(),
        digests: Default::default(),
        ids: Default::default(),
        finished: Utc::now(),
        seconds: started.elapsed().as_secs_f64(),
    };
    receipt.digests.insert("box".into(), box_sha);
    receipt.digests.insert("disk".into(), qcow2.sha256.clone());
    receipt
        .ids
        .insert("catalog".into(), catalog.display().to_string());
    Ok(receipt)
}

/// `web.box` → `web.json`, next to it.
pub fn catalog_path(box_path: &Path) -> PathBuf {
    box_path.with_extension("json")
}

/// Write the box (tar.gz) to `path` and return its sha256. Blocking.
fn write_box(
    path: &Path,
    metadata: &str,
    vagrantfile: &str,
    disk: &Path,
    r: &Reporter,
) -> Result<String, DirectoryError> {
    let file = fs_err::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    let hashing = export::HashingWriter {
        inner: std::io::BufWriter::with_capacity(CHUNK, file),
        hasher: Sha256::new(),
    };
    // The qcow2 is already compressed: the fastest level costs little and saves little.
    let gz = flate2::write::GzEncoder::new(hashing, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let now = Utc::now().timestamp().max(0) as u64;
    let add = |tar: &mut tar::Builder<_>, name: &str, bytes: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(now);
        header.set_cksum();
        tar.append_data(&mut header, name, bytes)
    };
    add(&mut tar, "metadata.json", metadata.as_bytes())?;
    add(&mut tar, "Vagrantfile", vagrantfile.as_bytes())?;
    let src = fs_err::File::open(disk)?;
    let total = src.metadata()?.len();
    let mut header = tar::Header::new_gnu();
    header.set_size(total);
    header.set_mode(0o644);
    header.set_mtime(now);
    header.set_cksum();
    let reader = ProgressReader {
        inner: src,
        done: 0,
        last: 0,
        total,
        r,
        cancelled: false,
    };
    tar.append_data(&mut header, "box.img", reader)
        .map_err(|e| {
            if r.check().is_err() {
                DirectoryError::Cancelled
            } else {
                DirectoryError::Io(e)
            }
        })?;
    r.transfer("box.img", total, Some(total));
    let gz = tar.into_inner()?;
    let hashing = gz.finish()?;
    let export::HashingWriter { inner, hasher } = hashing;
    let file = inner.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(hex::encode(hasher.finalize()))
}

/// Reports bytes read and stops (with an error) when the copy is cancelled.
struct ProgressReader<'r> {
    inner: fs_err::File,
    done: u64,
    last: u64,
    total: u64,
    r: &'r Reporter,
    cancelled: bool,
}

impl Read for ProgressReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.cancelled || self.r.check().is_err() {
            self.cancelled = true;
            return Err(std::io::Error::other("cancelled"));
        }
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        if self.done - self.last >= REPORT_EVERY {
            self.last = self.done;
            self.r.transfer("box.img", self.done, Some(self.total));
        }
        Ok(n)
    }
}

// ─── the store ─────────────────────────────────────────────────────────────────────────

/// The store target: the image is already there; the receipt says so.
pub fn to_store(image: &StoredImage) -> Receipt {
    let mut receipt = Receipt {
        kind: "store".into(),
        location: image.reference(),
        digests: Default::default(),
        ids: Default::default(),
        finished: Utc::now(),
        seconds: 0.0,
    };
    receipt
        .ids
        .insert("folder".into(), image.dir.display().to_string());
    if let Some(d) = &image.disk {
        receipt.digests.insert("disk".into(), d.sha256.clone());
    }
    if let Some(c) = &image.manifest.container {
        receipt
            .digests
            .insert("manifest".into(), c.manifest_digest.clone());
    }
    receipt
}

/// `path` made absolute against the current directory, without `.` parts (for receipts
/// people reuse). `..` is kept: it may cross a symlink.
pub fn absolute(path: &Path) -> PathBuf {
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    };
    joined
        .components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect()
}
