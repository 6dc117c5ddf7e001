//! `qemu-img` wrappers: inspect an image (typed `info --output=json`), create a qcow2
//! overlay on a backing file, rewrite its backing reference, resize, convert, check. Each
//! call is one `qemu-img` process; failures carry its stderr.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::argv::DiskFormat;

#[derive(Debug, thiserror::Error)]
pub enum ImgError {
    #[error("`qemu-img` was not found on PATH (install qemu-utils)")]
    NotFound,
    #[error("could not run `qemu-img {subcommand}`")]
    Run {
        subcommand: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("`qemu-img {subcommand}` on {path} failed: {stderr}")]
    Failed {
        subcommand: &'static str,
        path: String,
        stderr: String,
    },
    #[error("could not read `qemu-img info` output for {path}: {detail}")]
    Decode { path: String, detail: String },
    #[error("{path} is a {format} image; builder boots qcow2 or raw images")]
    UnsupportedFormat { path: String, format: String },
    #[error("{path} is marked corrupt by qemu-img; repair it with `qemu-img check -r all`")]
    Corrupt { path: String },
    #[error("{path} does not exist")]
    Missing { path: String },
}

/// What `qemu-img info --output=json` says about an image (the fields builder uses).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    pub filename: String,
    pub format: String,
    pub virtual_size: u64,
    #[serde(default)]
    pub actual_size: Option<u64>,
    #[serde(default)]
    pub backing_filename: Option<String>,
    #[serde(default)]
    pub full_backing_filename: Option<String>,
    #[serde(default)]
    pub backing_filename_format: Option<String>,
    #[serde(default)]
    pub dirty_flag: Option<bool>,
    #[serde(default)]
    pub format_specific: Option<FormatSpecific>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct FormatSpecific {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl ImageInfo {
    /// The format as one QEMU can boot from.
    pub fn disk_format(&self) -> Result<DiskFormat, ImgError> {
        match self.format.as_str() {
            "qcow2" => Ok(DiskFormat::Qcow2),
            "raw" => Ok(DiskFormat::Raw),
            other => Err(ImgError::UnsupportedFormat {
                path: self.filename.clone(),
                format: other.to_string(),
            }),
        }
    }

    /// `format-specific.data.corrupt` for qcow2.
    pub fn corrupt(&self) -> bool {
        self.format_specific
            .as_ref()
            .and_then(|f| f.data.get("corrupt"))
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false)
    }
}

fn qemu_img() -> Result<PathBuf, ImgError> {
    super::process::find_program("qemu-img").map_err(|_| ImgError::NotFound)
}

async fn run(
    subcommand: &'static str,
    path: &Path,
    args: &[&std::ffi::OsStr],
) -> Result<Vec<u8>, ImgError> {
    let out = tokio::process::Command::new(qemu_img()?)
        .arg(subcommand)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| ImgError::Run { subcommand, source })?;
    if !out.status.success() {
        return Err(ImgError::Failed {
            subcommand,
            path: path.display().to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

/// `qemu-img info --output=json`. `-U` (force share): reading the header of an image a
/// running VM has open is safe and must not fail on its lock.
pub async fn info(path: &Path) -> Result<ImageInfo, ImgError> {
    if !path.exists() {
        return Err(ImgError::Missing {
            path: path.display().to_string(),
        });
    }
    let out = run(
        "info",
        path,
        &["--output=json".as_ref(), "-U".as_ref(), path.as_os_str()],
    )
    .await?;
    serde_json::from_slice(&out).map_err(|e| ImgError::Decode {
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

/// Create a qcow2 overlay at `overlay` whose backing file is `base` (absolute path, format
/// given explicitly with `-F` as current QEMU requires). `size`: grow the virtual disk to this
/// many bytes (never smaller than the base).
pub async fn create_overlay(
    base: &Path,
    base_format: DiskFormat,
    overlay: &Path,
    size: Option<u64>,
) -> Result<(), ImgError> {
    let base = std::path::absolute(base).map_err(|source| ImgError::Run {
        subcommand: "create",
        source,
    })?;
    let size = size.map(|s| s.to_string());
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-b".as_ref(),
        base.as_os_str(),
        "-F".as_ref(),
        base_format.as_str().as_ref(),
        overlay.as_os_str(),
    ];
    if let Some(size) = &size {
        args.push(size.as_ref());
    }
    run("create", overlay, &args).await.map(drop)
}

/// `qemu-img rebase -u`: rewrite the backing-file reference in `path`'s header to `backing`
/// (format `backing_format`) without reading either chain ("unsafe" mode: the caller knows
/// the new backing file has the same contents as the old one). A relative `backing` is
/// resolved from `path`'s folder, as QEMU does when it opens the chain.
pub async fn rebase_unsafe(
    path: &Path,
    backing: &str,
    backing_format: DiskFormat,
) -> Result<(), ImgError> {
    run(
        "rebase",
        path,
        &[
            "-q".as_ref(),
            "-u".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            backing_format.as_str().as_ref(),
            "-b".as_ref(),
            backing.as_ref(),
            path.as_os_str(),
        ],
    )
    .await
    .map(drop)
}

/// Grow (or with `shrink`, shrink) an image to `size` bytes.
pub async fn resize(path: &Path, size: u64, shrink: bool) -> Result<(), ImgError> {
    let size = size.to_string();
    let mut args: Vec<&std::ffi::OsStr> = vec!["-q".as_ref()];
    if shrink {
        args.push("--shrink".as_ref());
    }
    args.push(path.as_os_str());
    args.push(size.as_ref());
    run("resize", path, &args).await.map(drop)
}

/// Options for [`convert`].
#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    /// Output format as qemu-img names it (`qcow2`, `raw`, `vmdk`, `vhdx`, `vpc`).
    pub format: String,
    /// `-c`: compress (qcow2, vmdk).
    pub compress: bool,
    /// `-o` options, e.g. `compression_type=zstd`.
    pub options: Vec<String>,
}

/// `qemu-img convert` from `src` to `dest` (written under a temporary name next to it and
/// renamed when complete).
pub async fn convert(src: &Path, dest: &Path, options: &ConvertOptions) -> Result<(), ImgError> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".convert-")
        .tempfile_in(dir)
        .map_err(|source| ImgError::Run {
            subcommand: "convert",
            source,
        })?
        .into_temp_path();
    let opts = options.options.join(",");
    let mut args: Vec<&std::ffi::OsStr> = vec!["-O".as_ref(), options.format.as_ref()];
    if options.compress {
        args.push("-c".as_ref());
    }
    if !opts.is_empty() {
        args.push("-o".as_ref());
        args.push(opts.as_ref());
    }
    args.push(src.as_os_str());
    args.push(tmp.as_os_str());
    run("convert", src, &args).await?;
    tmp.persist(dest).map_err(|e| ImgError::Run {
        subcommand: "convert",
        source: e.error,
    })
}

/// `qemu-img check`: `Ok` when the image has no errors (leaks are not errors).
pub async fn check(path: &Path) -> Result<(), ImgError> {
    run("check", path, &["-q".as_ref(), path.as_os_str()])
        .await
        .map(drop)
}

/// `qemu-img convert -p` from `src` straight to `dest` (the caller owns temporary naming and
/// verification: export checks an output before giving it its final name), calling
/// `on_percent` with each percentage qemu-img prints. `out_of_order` adds `-W` (parallel,
/// out-of-order writes: compressed qcow2 in about 2/3 of the time). Cancelling the future
/// kills qemu-img.
pub async fn convert_with_progress(
    src: &Path,
    dest: &Path,
    options: &ConvertOptions,
    out_of_order: bool,
    on_percent: &mut (dyn FnMut(f32) + Send),
) -> Result<(), ImgError> {
    use tokio::io::AsyncReadExt;
    let subcommand = "convert";
    let mut cmd = tokio::process::Command::new(qemu_img()?);
    cmd.args(["convert", "-p", "-O", &options.format]);
    if options.compress {
        cmd.arg("-c");
    }
    if out_of_order {
        cmd.arg("-W");
    }
    if !options.options.is_empty() {
        cmd.arg("-o").arg(options.options.join(","));
    }
    let mut child = cmd
        .arg(src)
        .arg(dest)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ImgError::Run { subcommand, source })?;
    #[expect(clippy::expect_used, reason = "qemu-img was spawned with stdout piped")]
    let mut stdout = child.stdout.take().expect("stdout was piped");
    #[expect(clippy::expect_used, reason = "qemu-img was spawned with stderr piped")]
    let mut stderr = child.stderr.take().expect("stderr was piped");
    let stderr_task = tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf).await;
        buf
    });
    // qemu-img rewrites one line with `\r`: "    (12.50/100%)\r".
    let mut pending = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        let n = stdout
            .read(&mut chunk)
            .await
            .map_err(|source| ImgError::Run { subcommand, source })?;
        if n == 0 {
            break;
        }
        pending.extend_from_slice(&chunk[..n]);
        while let Some(end) = pending.iter().position(|b| *b == b'\r' || *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            if let Some(p) = parse_progress(&String::from_utf8_lossy(&line)) {
                on_percent(p);
            }
        }
    }
    let status = child
        .wait()
        .await
        .map_err(|source| ImgError::Run { subcommand, source })?;
    let stderr = stderr_task.await.unwrap_or_default();
    if !status.success() {
        return Err(ImgError::Failed {
            subcommand,
            path: src.display().to_string(),
            stderr: String::from_utf8_lossy(&stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Whether this qemu-img writes zstd-compressed qcow2 (QEMU 5.1 or later, built with zstd):
/// it creates a 1 MiB image with `compression_type=zstd` in a temporary folder.
pub async fn supports_zstd() -> Result<bool, ImgError> {
    let dir = tempfile::tempdir().map_err(|source| ImgError::Run {
        subcommand: "create",
        source,
    })?;
    let probe = dir.path().join("zstd-probe.qcow2");
    match run(
        "create",
        &probe,
        &[
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-o".as_ref(),
            "compression_type=zstd".as_ref(),
            probe.as_os_str(),
            "1M".as_ref(),
        ],
    )
    .await
    {
        Ok(_) => Ok(true),
        Err(ImgError::Failed { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The percentage in one line of `qemu-img -p` output: `    (12.50/100%)`.
fn parse_progress(line: &str) -> Option<f32> {
    let inner = line.trim().strip_prefix('(')?.strip_suffix("/100%)")?;
    inner.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_json_decodes() {
        let json = r#"{
            "children": [],
            "virtual-size": 3221225472,
            "filename": "/tmp/o.qcow2",
            "cluster-size": 65536,
            "format": "qcow2",
            "actual-size": 200704,
            "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "compression-type": "zlib", "lazy-refcounts": false, "refcount-bits": 16, "corrupt": false, "extended-l2": false}},
            "full-backing-filename": "/cache/base.qcow2",
            "backing-filename": "/cache/base.qcow2",
            "backing-filename-format": "qcow2",
            "dirty-flag": false
        }"#;
        let info: ImageInfo = serde_json::from_str(json).expect("decodes");
        assert_eq!(info.virtual_size, 3 << 30);
        assert_eq!(info.backing_filename_format.as_deref(), Some("qcow2"));
        assert_eq!(info.disk_format().expect("qcow2"), DiskFormat::Qcow2);
        assert!(!info.corrupt());
    }

    #[test]
    fn progress_lines_parse() {
        assert_eq!(parse_progress("    (12.50/100%)\r"), Some(12.5));
        assert_eq!(parse_progress("(100.00/100%)"), Some(100.0));
        assert_eq!(parse_progress("qemu-img: error"), None);
    }

    /// Real qemu-img: overlay on a base, the base untouched, resize, convert, check.
    #[tokio::test]
    async fn overlay_resize_convert_check_with_real_qemu_img() {
        qemu_img().expect("qemu-img is needed for this test (apt install qemu-utils)");
        let dir = tempfile::tempdir().expect("temp dir");
        let base = dir.path().join("base.qcow2");
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&base)
            .arg("64M")
            .output()
            .expect("qemu-img create");
        assert!(out.status.success());
        let before = fs_err::read(&base).expect("read base");

        let overlay = dir.path().join("overlay.qcow2");
        create_overlay(&base, DiskFormat::Qcow2, &overlay, Some(128 << 20))
            .await
            .expect("overlay");
        let info = info(&overlay).await.expect("info");
        assert_eq!(info.virtual_size, 128 << 20);
        assert_eq!(
            info.backing_filename.as_deref(),
            Some(base.to_str().expect("utf-8 path"))
        );
        resize(&overlay, 256 << 20, false).await.expect("grow");
        assert_eq!(
            super::info(&overlay).await.expect("info").virtual_size,
            256 << 20
        );
        check(&overlay).await.expect("clean");

        let raw = dir.path().join("flat.raw");
        convert(
            &overlay,
            &raw,
            &ConvertOptions {
                format: "raw".into(),
                ..Default::default()
            },
        )
        .await
        .expect("convert");
        assert_eq!(super::info(&raw).await.expect("info").format, "raw");
        assert_eq!(
            fs_err::read(&base).expect("read base"),
            before,
            "base changed"
        );

        let e = super::info(&dir.path().join("nope.qcow2"))
            .await
            .expect_err("missing");
        assert!(e.to_string().contains("nope.qcow2 does not exist"));
        fs_err::write(dir.path().join("junk.qcow2"), b"QFI\xfbjunk").expect("write");
        let e = super::info(&dir.path().join("junk.qcow2"))
            .await
            .expect_err("bad image");
        assert!(e.to_string().contains("junk.qcow2"), "{e}");
    }
}
