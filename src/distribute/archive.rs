//! Container images as single files, for `docker load`, `podman load` and `buildah pull`:
//!
//! - `oci-archive`: a tar of an OCI image layout (`oci-layout`, `index.json` naming the image
//!   with `org.opencontainers.image.ref.name`, `blobs/sha256/…`), the blobs as stored, so the
//!   image keeps its manifest digest.
//! - `docker-archive`: `docker save`'s format: `manifest.json` (`Config`, `RepoTags`,
//!   `Layers`), the config as `<hex>.json` and each layer uncompressed as `<diff id>.tar`
//!   (the digests the config's `rootfs.diff_ids` list, checked while writing).
//!
//! Written with the `tar` crate under a temporary name beside the destination, synced, and
//! renamed when whole: a reader never sees half an archive, and a failure leaves nothing.

use std::io::{Read, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::export::HashingWriter;
use crate::recipe::model::ArchiveFormat;
use crate::store::layout::{
    Descriptor, INDEX_FILE, Index, LAYOUT_FILE, LAYOUT_VERSION, Layout, LayoutError, LayoutImage,
    REF_NAME, digest_hex, media,
};

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// A file system call failed; fs-err's error names the path and what was being done.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Layout(Box<LayoutError>),
    #[error("layer {digest} is a `{media_type}`, which a docker-archive cannot take uncompressed")]
    Compression { digest: String, media_type: String },
    #[error(
        "layer {digest} uncompressed has digest {actual}, but the image config lists {expected}"
    )]
    DiffId {
        digest: String,
        expected: String,
        actual: String,
    },
    #[error("the image config lists {diff_ids} layer digests for {layers} layers")]
    LayerCount { diff_ids: usize, layers: usize },
    #[error("writing the archive was stopped")]
    Cancelled,
}

impl From<LayoutError> for ArchiveError {
    fn from(e: LayoutError) -> Self {
        match e {
            LayoutError::Io(e) => ArchiveError::Io(e),
            other => ArchiveError::Layout(Box::new(other)),
        }
    }
}

/// Called with the bytes written so far; [`ControlFlow::Break`] stops the writing
/// ([`ArchiveError::Cancelled`], nothing left behind).
pub type Tick<'a> = &'a mut dyn FnMut(u64) -> ControlFlow<()>;

/// An archive written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub path: PathBuf,
    /// sha256 of the file, hex.
    pub sha256: String,
    pub size: u64,
}

/// The file name suffix of each format: `<stem>.oci-archive.tar`, `<stem>.docker-archive.tar`.
pub fn file_name(stem: &str, format: ArchiveFormat) -> String {
    format!("{stem}.{}.tar", format.name())
}

/// Write the only image of `layout` to `dest` as `format`, named `name` (`web:1.0.0`: the
/// docker-archive's `RepoTags`, the oci-archive's ref name). Blocking.
pub fn write(
    format: ArchiveFormat,
    layout: &Layout,
    dest: &Path,
    name: &str,
    tick: Tick<'_>,
) -> Result<Written, ArchiveError> {
    let image = layout.image(None)?;
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = tempfile::Builder::new()
        .prefix(&format!(".{file_name}.partial-"))
        .tempfile_in(dir)?;
    let (file, temp_path) = temp.into_parts();
    let file = fs_err::File::from_parts(file, &*temp_path);
    let writer = Counting {
        inner: HashingWriter {
            inner: std::io::BufWriter::with_capacity(1 << 20, file),
            hasher: Sha256::new(),
        },
        done: 0,
        reported: 0,
        stopped: false,
        tick,
    };
    let mut tar = tar::Builder::new(writer);
    let written = match format {
        ArchiveFormat::OciArchive => oci_archive(&mut tar, layout, &image, name),
        ArchiveFormat::DockerArchive => docker_archive(&mut tar, layout, &image, name),
    };
    if let Err(e) = written {
        // The temporary file goes with `temp_path`.
        return Err(if tar.get_ref().stopped {
            ArchiveError::Cancelled
        } else {
            e
        });
    }
    let counting = tar.into_inner()?;
    let size = counting.done;
    let HashingWriter { inner, hasher } = counting.inner;
    let file = inner.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    fs_err::rename(&temp_path, dest)?;
    // Renamed: nothing is left under the temporary name to remove.
    let _ = temp_path.keep();
    Ok(Written {
        path: dest.to_path_buf(),
        sha256: hex::encode(hasher.finalize()),
        size,
    })
}

/// A regular file's header: mode 0644, owned by root, a fixed time (the same image gives the
/// same archive).
fn file_header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_cksum();
    h
}

fn dir_header() -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_size(0);
    h.set_mode(0o755);
    h.set_mtime(0);
    h.set_cksum();
    h
}

fn append_bytes<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    bytes: &[u8],
) -> Result<(), ArchiveError> {
    Ok(tar.append_data(&mut file_header(bytes.len() as u64), path, bytes)?)
}

fn append_file<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    file: &Path,
) -> Result<(), ArchiveError> {
    let src = fs_err::File::open(file)?;
    let size = src.metadata()?.len();
    Ok(tar.append_data(&mut file_header(size), path, src)?)
}

fn oci_archive<W: Write>(
    tar: &mut tar::Builder<W>,
    layout: &Layout,
    image: &LayoutImage,
    name: &str,
) -> Result<(), ArchiveError> {
    append_bytes(tar, LAYOUT_FILE, LAYOUT_VERSION.as_bytes())?;
    let mut descriptor: Descriptor = image.descriptor.clone();
    descriptor
        .annotations
        .insert(REF_NAME.to_string(), name.to_string());
    #[expect(
        clippy::expect_used,
        reason = "plain data (structs, strings, numbers, string-keyed maps) always serialises with serde_json"
    )]
    let index = serde_json::to_vec(&Index::of(vec![descriptor])).expect("plain data serializes");
    append_bytes(tar, INDEX_FILE, &index)?;
    for dir in ["blobs/", "blobs/sha256/"] {
        tar.append_data(&mut dir_header(), dir, std::io::empty())?;
    }
    let mut seen = std::collections::BTreeSet::new();
    for blob in image.blobs() {
        if !seen.insert(blob.digest.clone()) {
            continue;
        }
        let path = layout.blob_path(&blob.digest)?;
        let hex = digest_hex(&blob.digest).unwrap_or_default();
        append_file(tar, &format!("blobs/sha256/{hex}"), &path)?;
    }
    Ok(())
}

fn docker_archive<W: Write>(
    tar: &mut tar::Builder<W>,
    layout: &Layout,
    image: &LayoutImage,
    name: &str,
) -> Result<(), ArchiveError> {
    let layers = &image.manifest.layers;
    let diff_ids = &image.config.rootfs.diff_ids;
    if diff_ids.len() != layers.len() {
        return Err(ArchiveError::LayerCount {
            diff_ids: diff_ids.len(),
            layers: layers.len(),
        });
    }
    let config_hex = digest_hex(&image.config_descriptor.digest).unwrap_or_default();
    let config_name = format!("{config_hex}.json");
    append_file(
        tar,
        &config_name,
        &layout.blob_path(&image.config_descriptor.digest)?,
    )?;
    let mut names = Vec::new();
    for (layer, diff_id) in layers.iter().zip(diff_ids) {
        let path = layout.blob_path(&layer.digest)?;
        let gzip =
            [media::OCI_LAYER_GZIP, media::DOCKER_LAYER_GZIP].contains(&layer.media_type.as_str());
        let plain =
            [media::OCI_LAYER_TAR, media::DOCKER_LAYER_TAR].contains(&layer.media_type.as_str());
        if !gzip && !plain {
            return Err(ArchiveError::Compression {
                digest: layer.digest.clone(),
                media_type: layer.media_type.clone(),
            });
        }
        let open = || -> Result<Box<dyn Read>, ArchiveError> {
            let file = fs_err::File::open(&path)?;
            Ok(if gzip {
                Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)))
            } else {
                Box::new(file)
            })
        };
        // The tar header needs the size first: one pass to measure and check the digest
        // the config lists, one to write.
        let mut measure = open()?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = measure.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if &actual != diff_id {
            return Err(ArchiveError::DiffId {
                digest: layer.digest.clone(),
                expected: diff_id.clone(),
                actual,
            });
        }
        let entry = format!("{}.tar", digest_hex(diff_id).unwrap_or_default());
        if !names.contains(&entry) {
            tar.append_data(&mut file_header(size), &entry, open()?)?;
        }
        names.push(entry);
    }
    let manifest = serde_json::json!([{
        "Config": config_name,
        "RepoTags": [name],
        "Layers": names,
    }]);
    append_bytes(tar, "manifest.json", manifest.to_string().as_bytes())
}

/// Counts what goes through, tells the tick every 16 MiB, and stops when it says so.
struct Counting<'t, W> {
    inner: W,
    done: u64,
    reported: u64,
    /// The tick said stop: the error that follows is [`ArchiveError::Cancelled`].
    stopped: bool,
    tick: Tick<'t>,
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.done == 0 || self.done - self.reported >= 16 << 20 {
            self.reported = self.done;
            self.stopped |= (self.tick)(self.done).is_break();
        }
        if self.stopped {
            return Err(std::io::Error::other("writing the archive was stopped"));
        }
        let n = self.inner.write(buf)?;
        self.done += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layout whose one layer is a real gzip'd tar holding `hello.txt`.
    fn layout_with_a_file(dir: &Path) -> Layout {
        let mut plain = tar::Builder::new(Vec::new());
        append_bytes(&mut plain, "hello.txt", b"hello\n").expect("entry");
        let plain = plain.into_inner().expect("tar");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&plain).expect("gzip");
        let gz = gz.finish().expect("gzip");
        let diff_id = crate::store::layout::digest_of(&plain);
        crate::store::layout::tests::layout_with_layer(dir, &gz, media::OCI_LAYER_GZIP, &diff_id).0
    }

    fn entries(path: &Path) -> Vec<(String, Vec<u8>)> {
        let mut archive = tar::Archive::new(fs_err::File::open(path).expect("open"));
        archive
            .entries()
            .expect("entries")
            .map(|e| {
                let mut e = e.expect("entry");
                let name = e.path().expect("path").display().to_string();
                let mut bytes = Vec::new();
                e.read_to_end(&mut bytes).expect("read");
                (name, bytes)
            })
            .collect()
    }

    #[test]
    fn both_archives_hold_the_image_and_nothing_is_left_under_a_temporary_name() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let layout = layout_with_a_file(&tmp.path().join("oci"));
        let image = layout.image(None).expect("image");
        let out = tmp.path().join("out");
        fs_err::create_dir(&out).expect("out");

        let oci = write(
            ArchiveFormat::OciArchive,
            &layout,
            &out.join(file_name("web", ArchiveFormat::OciArchive)),
            "web:1.0.0",
            &mut |_| ControlFlow::Continue(()),
        )
        .expect("oci-archive");
        assert_eq!(
            oci.sha256,
            crate::digest::sha256_file(&oci.path, None)
                .expect("hash")
                .hex()
        );
        let got = entries(&oci.path);
        let index: Index =
            serde_json::from_slice(&got.iter().find(|(n, _)| n == INDEX_FILE).expect("index").1)
                .expect("json");
        assert_eq!(index.manifests[0].digest, image.descriptor.digest);
        assert_eq!(
            index.manifests[0]
                .annotations
                .get(REF_NAME)
                .map(String::as_str),
            Some("web:1.0.0")
        );
        for blob in image.blobs() {
            let name = format!("blobs/sha256/{}", digest_hex(&blob.digest).expect("hex"));
            assert!(got.iter().any(|(n, _)| *n == name), "{name} in {got:?}");
        }

        let docker = write(
            ArchiveFormat::DockerArchive,
            &layout,
            &out.join(file_name("web", ArchiveFormat::DockerArchive)),
            "web:1.0.0",
            &mut |_| ControlFlow::Continue(()),
        )
        .expect("docker-archive");
        let got = entries(&docker.path);
        let manifest: serde_json::Value = serde_json::from_slice(
            &got.iter()
                .find(|(n, _)| n == "manifest.json")
                .expect("manifest")
                .1,
        )
        .expect("json");
        assert_eq!(manifest[0]["RepoTags"][0], "web:1.0.0");
        let layer_name = manifest[0]["Layers"][0].as_str().expect("layer");
        let layer = &got.iter().find(|(n, _)| n == layer_name).expect("layer").1;
        // Uncompressed: the layer is the tar holding the file.
        let mut inner = tar::Archive::new(layer.as_slice());
        let names: Vec<String> = inner
            .entries()
            .expect("entries")
            .map(|e| {
                e.expect("entry")
                    .path()
                    .expect("path")
                    .display()
                    .to_string()
            })
            .collect();
        assert_eq!(names, ["hello.txt"]);

        // Stopped half way: no file, no temporary one.
        let e = write(
            ArchiveFormat::DockerArchive,
            &layout,
            &out.join("stopped.tar"),
            "web:1.0.0",
            &mut |_| ControlFlow::Break(()),
        )
        .expect_err("stopped");
        assert!(matches!(e, ArchiveError::Cancelled), "{e}");
        let mut names: Vec<String> = fs_err::read_dir(&out)
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["web.docker-archive.tar", "web.oci-archive.tar"]);
    }
}
