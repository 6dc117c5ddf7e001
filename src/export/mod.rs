//! Export: a finished disk (a qcow2, possibly with a backing chain) converted to the formats
//! people use, each checked and hashed, plus `SHA256SUMS`.
//! Owns output files and their digests; it does not know how the disk was built, and it never
//! boots anything. qemu-img is driven only through [`crate::vm::img`].
//!
//! Every output is written as `.<file>.partial-<random>` in the output folder, verified
//! (`qemu-img check` where the format has one, `qemu-img info` format and size, the VHD footer,
//! the OVA's member order), hashed, and only then renamed to its final name. If any format
//! fails, the outputs this call already finished are removed too: an export is all or
//! nothing, and a failed or cancelled one leaves no file behind.
//!
//! | format | how |
//! | --- | --- |
//! | qcow2 | `convert -c -O qcow2 -o compression_type=zstd -W` (zlib when zstd is missing) |
//! | raw | `convert -O raw -W` (sparse) |
//! | vmdk | `convert -O vmdk -o subformat=streamOptimized` (what VMware imports) |
//! | vhdx | `convert -O vhdx` |
//! | vhd | `convert -O vpc -o subformat=fixed,force_size=on` (what clouds import) |
//! | ova | USTAR tar: `.ovf` (OVF 1.0), `.mf` (SHA256 lines), streamOptimized `.vmdk` |
//!
//! qcow2 is converted first (it is what a later build and the store use), then the others
//! one after another from the same source. `-W` (out-of-order writes) is used only where the
//! output allows it: a streamOptimized vmdk must be written in order.

mod ova;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::recipe::{Compression, Firmware, Format};
use crate::store::Artifact;
use crate::vm::img::{self, ConvertOptions, ImgError};

/// The file listing every output's digest, as `sha256sum` writes it.
pub const SUMS_FILE: &str = "SHA256SUMS";

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// No formats were asked for.
    #[error("no output formats were requested")]
    NoFormats,
    #[error("`{stem}` cannot be used as an output file name: {reason}")]
    BadName { stem: String, reason: &'static str },
    #[error("{path} already exists; remove it or export to another folder")]
    Exists { path: PathBuf },
    #[error("cannot export {path}")]
    Source {
        path: PathBuf,
        #[source]
        source: ImgError,
    },
    #[error("converting to {format} failed")]
    Convert {
        format: Format,
        #[source]
        source: ImgError,
    },
    #[error("the exported {format} file {file} failed verification: {detail}")]
    Verify {
        format: Format,
        file: String,
        detail: String,
    },
    /// A file system call failed; fs-err's error names the path and what was being done.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("could not use the output folder {path}")]
    NotAFolder {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Sums { path: PathBuf, detail: String },
    #[error("an export task stopped unexpectedly: {0}")]
    Task(String),
}

/// The disk controller an OVA's virtual machine attaches its disk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiskController {
    /// LSI Logic parallel SCSI: what every OVF importer knows. The default.
    #[default]
    Scsi,
    /// AHCI SATA.
    Sata,
}

/// The virtual machine described in an OVA (from the build's infrastructure).
#[derive(Debug, Clone)]
pub struct MachineSpec {
    /// The VM's name in the importing hypervisor.
    pub name: String,
    pub description: Option<String>,
    pub cpus: u32,
    pub memory_mib: u64,
    pub firmware: Firmware,
    pub controller: DiskController,
}

/// What to export, where.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    /// The finished disk; its backing chain is flattened into every output.
    pub source: PathBuf,
    /// An existing folder; each output is written under a temporary name inside it and
    /// renamed there, so the rename is atomic.
    pub out_dir: PathBuf,
    /// File name without extension: `<stem>.qcow2`, `<stem>.ova`, …
    pub stem: String,
    pub formats: Vec<Format>,
    /// qcow2 only. `None` (the default): zstd where this QEMU writes it (5.1 or later), zlib
    /// otherwise.
    pub compression: Option<Compression>,
    /// For OVA.
    pub machine: MachineSpec,
    /// Replace outputs that already exist (default: refuse).
    pub overwrite: bool,
}

impl ExportRequest {
    /// A request with the defaults: zstd-or-zlib qcow2, a 2-CPU 1 GiB BIOS VM on SCSI for OVA.
    pub fn new(
        source: impl Into<PathBuf>,
        out_dir: impl Into<PathBuf>,
        stem: impl Into<String>,
        formats: &[Format],
    ) -> Self {
        let stem = stem.into();
        Self {
            source: source.into(),
            out_dir: out_dir.into(),
            machine: MachineSpec {
                name: stem.clone(),
                description: None,
                cpus: 2,
                memory_mib: 1024,
                firmware: Firmware::Bios,
                controller: DiskController::Scsi,
            },
            stem,
            formats: formats.to_vec(),
            compression: None,
            overwrite: false,
        }
    }
}

/// What [`export`] produced.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// In export order (qcow2 first).
    pub artifacts: Vec<Artifact>,
    /// `<out_dir>/SHA256SUMS`.
    pub sums_file: PathBuf,
    /// The qcow2 compression actually used.
    pub compression: Compression,
    /// Wall time of each format, from the start of its conversion to its digest (the
    /// digest of one format is computed while the next converts, so these overlap).
    pub durations: Vec<(Format, Duration)>,
}

/// Progress of an export, for bars and `--json` events. Every method has an empty default.
pub trait ExportProgress: Send + Sync {
    /// A format starts; `file` is its final file name.
    fn started(&self, _format: Format, _file: &str) {}
    /// qemu-img's conversion percentage (0 to 100).
    fn converting(&self, _format: Format, _percent: f32) {}
    /// Conversion done; checking and hashing.
    fn verifying(&self, _format: Format) {}
    fn finished(&self, _artifact: &Artifact, _took: Duration) {}
}

/// Reports nothing.
pub struct NoProgress;
impl ExportProgress for NoProgress {}

/// A file being written under a temporary name: removed on drop unless renamed into place.
struct Partial {
    path: PathBuf,
    armed: bool,
}

impl Partial {
    fn new(dir: &Path, file: &str) -> Self {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        Self {
            path: dir.join(format!(".{file}.partial-{}", &tag[..8])),
            armed: true,
        }
    }

    fn persist(mut self, dest: &Path) -> Result<(), ExportError> {
        fs_err::rename(&self.path, dest)?;
        self.armed = false;
        Ok(())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs_err::remove_file(&self.path);
        }
    }
}

/// Final outputs of this export: removed on drop unless the whole export succeeded.
#[derive(Default)]
struct Done {
    paths: Vec<PathBuf>,
    artifacts: Vec<Artifact>,
    durations: Vec<(Format, Duration)>,
    keep: bool,
}

impl Drop for Done {
    fn drop(&mut self) {
        if !self.keep {
            for p in &self.paths {
                let _ = fs_err::remove_file(p);
            }
        }
    }
}

/// Export `req.source` to every requested format in `req.out_dir`, then write
/// `SHA256SUMS` there. All or nothing: on error (or if the future is dropped) no output of
/// this call is left, finished or not.
pub async fn export(
    req: &ExportRequest,
    progress: &dyn ExportProgress,
) -> Result<ExportReport, ExportError> {
    // Each format once, in export order.
    let formats: Vec<Format> = Format::ALL
        .iter()
        .copied()
        .filter(|f| req.formats.contains(f))
        .collect();
    if formats.is_empty() {
        return Err(ExportError::NoFormats);
    }
    check_stem(&req.stem)?;
    if !req.out_dir.is_dir() {
        return Err(ExportError::NotAFolder {
            path: req.out_dir.clone(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a folder"),
        });
    }
    let sums_file = req.out_dir.join(SUMS_FILE);
    if !req.overwrite {
        let finals = formats
            .iter()
            .map(|f| req.out_dir.join(file_name(&req.stem, *f)))
            .chain(std::iter::once(sums_file.clone()));
        for path in finals {
            if path.exists() {
                return Err(ExportError::Exists { path });
            }
        }
    }
    let source_info = img::info(&req.source)
        .await
        .map_err(|source| ExportError::Source {
            path: req.source.clone(),
            source,
        })?;
    let virtual_size = source_info.virtual_size;
    let compression = match req.compression {
        Some(c) => c,
        None => match img::supports_zstd().await {
            Ok(true) => Compression::Zstd,
            Ok(false) => Compression::Zlib,
            Err(source) => {
                return Err(ExportError::Convert {
                    format: Format::Qcow2,
                    source,
                });
            }
        },
    };

    let mut done = Done::default();
    // Hashing and syncing a converted file runs on a blocking thread while the next format
    // converts: with several formats, the digests cost little extra wall time.
    let mut hashing: Vec<Hashing> = Vec::new();
    for format in formats {
        let t0 = Instant::now();
        let file = file_name(&req.stem, format);
        progress.started(format, &file);
        let partial = Partial::new(&req.out_dir, &file);
        if format == Format::Ova {
            // The OVA reuses the exported vmdk and its digest: let those finish first.
            for h in hashing.drain(..) {
                h.finish(&req.out_dir, &mut done, progress).await?;
            }
            let t0 = Instant::now();
            let vmdk = done.artifacts.iter().find(|a| a.format == Format::Vmdk);
            let (sha256, _) = write_ova(req, vmdk, virtual_size, &partial, progress).await?;
            let path = partial.path.clone();
            let size = blocking(move || sync_and_size(&path)).await??;
            let h = Hashing {
                task: tokio::task::spawn_blocking(move || Ok((sha256, size, Instant::now()))),
                partial,
                file,
                format,
                virtual_size,
                t0,
            };
            h.finish(&req.out_dir, &mut done, progress).await?;
            continue;
        }
        convert_one(
            &req.source,
            format,
            compression,
            &partial.path,
            &file,
            virtual_size,
            progress,
        )
        .await?;
        let path = partial.path.clone();
        let task = tokio::task::spawn_blocking(move || {
            let sha = sha256_hex(&path)?;
            Ok((sha, sync_and_size(&path)?, Instant::now()))
        });
        hashing.push(Hashing {
            task,
            partial,
            file,
            format,
            virtual_size,
            t0,
        });
    }
    for h in hashing.drain(..) {
        h.finish(&req.out_dir, &mut done, progress).await?;
    }
    write_sums(&sums_file, &done.artifacts)?;
    done.keep = true;
    Ok(ExportReport {
        artifacts: std::mem::take(&mut done.artifacts),
        sums_file,
        compression,
        durations: std::mem::take(&mut done.durations),
    })
}

/// A converted, verified output whose digest is being computed.
struct Hashing {
    /// Digest, size, and when they were known.
    task: tokio::task::JoinHandle<Result<(String, u64, Instant), ExportError>>,
    /// Removed if the export fails before this output is renamed.
    partial: Partial,
    file: String,
    format: Format,
    virtual_size: u64,
    t0: Instant,
}

impl Hashing {
    /// Wait for the digest, then give the output its final name.
    async fn finish(
        self,
        out_dir: &Path,
        done: &mut Done,
        progress: &dyn ExportProgress,
    ) -> Result<(), ExportError> {
        let (sha256, size, hashed) = self
            .task
            .await
            .map_err(|e| ExportError::Task(e.to_string()))??;
        let dest = out_dir.join(&self.file);
        self.partial.persist(&dest)?;
        done.paths.push(dest);
        let artifact = Artifact {
            file: self.file,
            format: self.format,
            size,
            virtual_size: self.virtual_size,
            sha256,
        };
        // From the start of its conversion to its digest; not the wait for earlier formats.
        let took = hashed.duration_since(self.t0);
        progress.finished(&artifact, took);
        done.durations.push((self.format, took));
        done.artifacts.push(artifact);
        Ok(())
    }
}

/// Flush a file to disk and return its size. An output is on disk before it gets its name:
/// after a crash, a final name never points at blocks qemu-img had only in the page cache.
fn sync_and_size(path: &Path) -> std::io::Result<u64> {
    let f = fs_err::File::open(path)?;
    f.sync_all()?;
    Ok(f.metadata()?.len())
}

fn file_name(stem: &str, format: Format) -> String {
    format!("{stem}.{}", format.extension())
}

fn check_stem(stem: &str) -> Result<(), ExportError> {
    let bad = |reason| {
        Err(ExportError::BadName {
            stem: stem.to_string(),
            reason,
        })
    };
    if stem.is_empty() {
        return bad("it is empty");
    }
    if stem.starts_with('.') {
        return bad("it starts with a dot");
    }
    if stem.len() > 200 {
        return bad("it is longer than 200 bytes");
    }
    if stem
        .chars()
        .any(|c| c == '/' || c == '\\' || c.is_control() || c.is_whitespace())
    {
        return bad("it contains a slash, a space or a control character");
    }
    Ok(())
}

/// Run blocking file work (hashing, tar writing) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ExportError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ExportError::Task(e.to_string()))
}

/// The qemu-img options for one format, and whether it may be written out of order (`-W`).
pub fn convert_options(format: Format, compression: Compression) -> (ConvertOptions, bool) {
    let opts = |fmt: &str, compress: bool, options: &[&str]| ConvertOptions {
        format: fmt.to_string(),
        compress,
        options: options.iter().map(|s| s.to_string()).collect(),
    };
    match format {
        Format::Qcow2 => match compression {
            Compression::Zstd => (opts("qcow2", true, &["compression_type=zstd"]), true),
            Compression::Zlib => (opts("qcow2", true, &["compression_type=zlib"]), true),
            Compression::None => (opts("qcow2", false, &[]), true),
        },
        Format::Raw => (opts("raw", false, &[]), true),
        // A stream-optimized vmdk is written front to back: no `-W`.
        Format::Vmdk | Format::Ova => (opts("vmdk", false, &["subformat=streamOptimized"]), false),
        Format::Vhdx => (opts("vhdx", false, &[]), false),
        Format::Vhd => (
            opts("vpc", false, &["subformat=fixed", "force_size=on"]),
            true,
        ),
    }
}

/// Convert `src` to `format` at `dest` (a temporary name) and verify the result.
async fn convert_one(
    src: &Path,
    format: Format,
    compression: Compression,
    dest: &Path,
    file: &str,
    virtual_size: u64,
    progress: &dyn ExportProgress,
) -> Result<(), ExportError> {
    let (options, out_of_order) = convert_options(format, compression);
    img::convert_with_progress(src, dest, &options, out_of_order, &mut |p| {
        progress.converting(format, p)
    })
    .await
    .map_err(|source| ExportError::Convert { format, source })?;
    progress.verifying(format);
    verify(format, compression, dest, file, virtual_size).await
}

/// Check an output before it gets its final name.
async fn verify(
    format: Format,
    compression: Compression,
    path: &Path,
    file: &str,
    virtual_size: u64,
) -> Result<(), ExportError> {
    let fail = |detail: String| ExportError::Verify {
        format,
        file: file.to_string(),
        detail,
    };
    if format == Format::Vhd {
        // A fixed VHD is raw data plus a 512-byte footer at the end; qemu-img cannot probe it
        // (it reports "raw"), so read the footer ourselves.
        let p = path.to_path_buf();
        let footer = blocking(move || read_vhd_footer(&p)).await?.map_err(fail)?;
        if footer.current_size != virtual_size {
            return Err(fail(format!(
                "the footer says {} bytes, the disk has {virtual_size}",
                footer.current_size
            )));
        }
        return Ok(());
    }
    if matches!(
        format,
        Format::Qcow2 | Format::Vmdk | Format::Vhdx | Format::Ova
    ) {
        img::check(path)
            .await
            .map_err(|e| fail(format!("`qemu-img check` found problems: {e}")))?;
    }
    let info = img::info(path)
        .await
        .map_err(|e| fail(format!("`qemu-img info` failed: {e}")))?;
    let expected = match format {
        Format::Ova => "vmdk",
        f => f.name(),
    };
    if info.format != expected {
        return Err(fail(format!(
            "qemu-img reads it as {}, not {expected}",
            info.format
        )));
    }
    if info.virtual_size != virtual_size {
        return Err(fail(format!(
            "its virtual size is {} bytes, the source's is {virtual_size}",
            info.virtual_size
        )));
    }
    if info.backing_filename.is_some() {
        return Err(fail("it still has a backing file".into()));
    }
    let data = info.format_specific.as_ref().map(|f| &f.data);
    let field = |key: &str| {
        data.and_then(|d| d.get(key))
            .and_then(serde_json::Value::as_str)
            .map(str::to_string)
    };
    let create_type = field("create-type");
    match format {
        Format::Qcow2
            if compression == Compression::Zstd
                && field("compression-type").as_deref() != Some("zstd") =>
        {
            Err(fail("it is not zstd-compressed".into()))
        }
        Format::Vmdk | Format::Ova if create_type.as_deref() != Some("streamOptimized") => {
            Err(fail(format!(
                "its subformat is {}, not streamOptimized",
                create_type.unwrap_or_else(|| "unknown".into())
            )))
        }
        _ => Ok(()),
    }
}

/// The fields of a VHD footer that export checks.
struct VhdFooter {
    current_size: u64,
}

/// Read and check the footer of a fixed VHD: cookie, disk type, checksum.
fn read_vhd_footer(path: &Path) -> Result<VhdFooter, String> {
    use std::io::{Seek, SeekFrom};
    let mut f = fs_err::File::open(path).map_err(|e| format!("cannot open it: {e}"))?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    if len < 512 || len % 512 != 0 {
        return Err(format!(
            "its size ({len} bytes) is not a whole number of sectors"
        ));
    }
    let mut footer = [0u8; 512];
    f.seek(SeekFrom::End(-512))
        .and_then(|_| f.read_exact(&mut footer))
        .map_err(|e| format!("cannot read its footer: {e}"))?;
    if &footer[0..8] != b"conectix" {
        return Err("it has no VHD footer (cookie `conectix`)".into());
    }
    #[expect(
        clippy::expect_used,
        reason = "the footer is 512 bytes and every offset read is a constant below 504"
    )]
    let be32 = |at: usize| u32::from_be_bytes(footer[at..at + 4].try_into().expect("4 bytes"));
    #[expect(
        clippy::expect_used,
        reason = "the footer is 512 bytes and every offset read is a constant below 504"
    )]
    let be64 = |at: usize| u64::from_be_bytes(footer[at..at + 8].try_into().expect("8 bytes"));
    let disk_type = be32(60);
    if disk_type != 2 {
        return Err(format!("its disk type is {disk_type}, not 2 (fixed)"));
    }
    let stored = be32(64);
    let sum: u32 = footer
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .map(|(_, b)| u32::from(*b))
        .sum();
    if !sum != stored {
        return Err("its footer checksum is wrong".into());
    }
    let current_size = be64(48);
    if current_size + 512 != len {
        return Err(format!(
            "its footer says {current_size} bytes of data, the file holds {}",
            len - 512
        ));
    }
    Ok(VhdFooter { current_size })
}

/// Write the OVA for `req` to `partial`: reuse the exported vmdk if there is one, else
/// convert a temporary one. Returns the OVA's sha256 (computed while writing) and the disk's
/// virtual size.
async fn write_ova(
    req: &ExportRequest,
    vmdk: Option<&Artifact>,
    virtual_size: u64,
    partial: &Partial,
    progress: &dyn ExportProgress,
) -> Result<(String, u64), ExportError> {
    let disk_name = format!("{}.vmdk", req.stem);
    // Kept alive until the tar is written; removed when dropped.
    let mut own_vmdk = None;
    let (vmdk_path, vmdk_sha) = match vmdk {
        Some(a) => (a.path(&req.out_dir), Some(a.sha256.clone())),
        None => {
            let tmp = Partial::new(&req.out_dir, &disk_name);
            convert_one(
                &req.source,
                Format::Ova,
                Compression::None,
                &tmp.path,
                &disk_name,
                virtual_size,
                progress,
            )
            .await?;
            let path = tmp.path.clone();
            own_vmdk = Some(tmp);
            (path, None)
        }
    };
    progress.verifying(Format::Ova);
    let out = fs_err::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&partial.path)?;
    let layout = ova::OvaLayout {
        stem: req.stem.clone(),
        disk_name,
        vmdk: vmdk_path,
        vmdk_sha256: vmdk_sha,
        virtual_size,
        machine: req.machine.clone(),
    };
    let ova_path = partial.path.clone();
    let sha = blocking(move || ova::write(out, &ova_path, &layout)).await??;
    let p = partial.path.clone();
    blocking(move || ova::check_layout(&p))
        .await?
        .map_err(|detail| ExportError::Verify {
            format: Format::Ova,
            file: file_name(&req.stem, Format::Ova),
            detail,
        })?;
    drop(own_vmdk);
    Ok((sha, virtual_size))
}

/// A writer that hashes what goes through it.
pub(crate) struct HashingWriter<W> {
    pub inner: W,
    pub hasher: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// sha256 (hex) of a file ([`crate::digest::sha256_file`]), blocking.
fn sha256_hex(path: &Path) -> std::io::Result<String> {
    Ok(crate::digest::sha256_file(path, None)?.hex())
}

/// Write `SHA256SUMS` (GNU coreutils format: `<hex>  <file>`, checkable with
/// `sha256sum -c`) atomically.
fn write_sums(path: &Path, artifacts: &[Artifact]) -> std::io::Result<()> {
    let mut text = String::new();
    for a in artifacts {
        text.push_str(&format!("{}  {}\n", a.sha256, a.file));
    }
    crate::store::write_atomic(path, text.as_bytes())
}

/// Read a `SHA256SUMS` file into (file name, sha256) pairs.
pub fn read_sums(path: &Path) -> Result<Vec<(String, String)>, ExportError> {
    let text = fs_err::read_to_string(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        // `<hex>  <name>` (text mode) or `<hex> *<name>` (binary mode).
        let parsed = line.split_once(' ').and_then(|(hash, rest)| {
            let name = rest.strip_prefix(' ').or_else(|| rest.strip_prefix('*'))?;
            (hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()) && !name.is_empty())
                .then(|| (name.to_string(), hash.to_ascii_lowercase()))
        });
        match parsed {
            Some(pair) => out.push(pair),
            None => {
                return Err(ExportError::Sums {
                    path: path.to_path_buf(),
                    detail: format!("line {}: expected `<sha256>  <file name>`", i + 1),
                });
            }
        }
    }
    Ok(out)
}

/// Recompute the digest of every file listed in `dir/SHA256SUMS` (blocking); the files
/// whose digest differs or that are missing are returned as errors.
pub fn verify_sums(dir: &Path) -> Result<(), ExportError> {
    let sums = dir.join(SUMS_FILE);
    for (name, expected) in read_sums(&sums)? {
        let actual = sha256_hex(&dir.join(&name))?;
        if actual != expected {
            return Err(ExportError::Sums {
                path: sums,
                detail: format!("{name}: sha256 is {actual}, expected {expected}"),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems_that_are_not_file_names_are_refused() {
        for bad in ["", ".hidden", "a/b", "a b", "x\n"] {
            assert!(check_stem(bad).is_err(), "{bad:?}");
        }
        check_stem("web-1.2.0-3").expect("fine");
    }

    #[test]
    fn sums_round_trip_and_bad_lines_are_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        fs_err::write(dir.path().join("a.raw"), b"hello").expect("write");
        let a = Artifact {
            file: "a.raw".into(),
            format: Format::Raw,
            size: 5,
            virtual_size: 5,
            sha256: sha256_hex(&dir.path().join("a.raw")).expect("hash"),
        };
        write_sums(&dir.path().join(SUMS_FILE), std::slice::from_ref(&a)).expect("sums");
        let read = read_sums(&dir.path().join(SUMS_FILE)).expect("read");
        assert_eq!(read, vec![("a.raw".to_string(), a.sha256.clone())]);
        verify_sums(dir.path()).expect("matches");
        fs_err::write(dir.path().join("a.raw"), b"hellO").expect("write");
        let e = verify_sums(dir.path()).expect_err("changed");
        assert!(e.to_string().contains("a.raw: sha256 is"), "{e}");
        fs_err::write(dir.path().join(SUMS_FILE), "zz  a.raw\n").expect("write");
        let e = read_sums(&dir.path().join(SUMS_FILE)).expect_err("bad");
        assert!(e.to_string().contains("line 1"), "{e}");
    }

    #[test]
    fn vhd_footer_is_checked() {
        let dir = tempfile::tempdir().expect("temp dir");
        let p = dir.path().join("x.vhd");
        fs_err::write(&p, vec![0u8; 1024]).expect("write");
        let e = read_vhd_footer(&p).err().expect("no footer");
        assert!(e.contains("conectix"), "{e}");
    }
}
