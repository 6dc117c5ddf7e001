//! Container images between OCI image layouts and registries: [`pull_layout`] fetches a
//! digest-pinned image (for linux/amd64 when the digest names an index) into a layout, and
//! [`push_layout`] sends a layout's image under a tag with its digests unchanged (the blobs
//! and the manifest's bytes as they are in the layout). Same registry session, credentials and
//! retry policy as the disk artifacts.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use oci_client::RegistryOperation;

use super::blob::BlobSource;
use super::registry::Registry;
use super::{OciError, OciOptions, fetch_blob, fetch_small_blob, locked_part};
use crate::distribute::{Progress, Receipt};
use crate::recipe::OciReference;
use crate::store::layout::{
    Descriptor, ImageManifest, Index, Layout, LayoutError, LayoutImage, REF_NAME, digest_hex, media,
};
use crate::store::{ContainerImage, StoredImage};

/// The platform a pulled index is resolved to: the one builder builds and runs.
const OS: &str = "linux";
const ARCHITECTURE: &str = "amd64";
/// Largest manifest or config taken into memory.
const MAX_SMALL_BLOB: u64 = 16 << 20;

/// A container image pulled into a layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledLayout {
    /// The layout's folder (the `dest` given).
    pub dir: PathBuf,
    /// The image's facts; `layout` is `dir`, as given.
    pub image: ContainerImage,
    /// The layout was already there (a manifest digest names its content for ever): the
    /// registry was not asked.
    pub from_cache: bool,
}

fn layout_error(e: LayoutError) -> OciError {
    match e {
        LayoutError::Io(e) => OciError::Io(e),
        other => OciError::Layout(Box::new(other)),
    }
}

/// Pull the image `src` (digest-pinned) into an OCI image layout at `dest`: its manifest (the
/// linux/amd64 one when `src` names an index), config and layers, each checked against its
/// digest. Written in a temporary sibling folder renamed to `dest` when whole; a `dest`
/// already there is the image (the caller names it by the digest) and is used as it is.
pub async fn pull_layout(
    src: &OciReference,
    dest: &Path,
    options: &OciOptions,
    progress: &dyn Progress,
) -> Result<PulledLayout, OciError> {
    let target = format!("oci://{src}");
    let Some(digest) = src.digest.clone() else {
        return Err(OciError::NotPinned {
            reference: src.to_string(),
            current: super::current_digest(src, options).await.ok(),
        });
    };
    let facts = |layout: &Layout| -> Result<ContainerImage, OciError> {
        let image = layout.image(None).map_err(layout_error)?;
        Ok(image.facts(&dest.display().to_string()))
    };
    if let Ok(layout) = Layout::open(dest) {
        progress.step(&target, &format!("already pulled into {}", dest.display()));
        return Ok(PulledLayout {
            dir: dest.to_path_buf(),
            image: facts(&layout)?,
            from_cache: true,
        });
    }
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs_err::create_dir_all(parent)?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = tempfile::Builder::new()
        .prefix(&format!(".{name}.partial-"))
        .tempdir_in(parent)?;
    let layout = Layout::create(temp.path()).map_err(layout_error)?;

    progress.step(&target, &format!("connecting to {}", src.registry));
    let registry = Registry::connect(src, options, RegistryOperation::Pull).await?;
    let no_image = |reason: String| OciError::NoImage {
        reference: src.to_string(),
        reason,
    };
    let (mut bytes, _) = registry.get_manifest(&digest).await?;
    let mut manifest: ImageManifest = serde_json::from_slice(&bytes)
        .map_err(|e| no_image(format!("its manifest is not an OCI manifest ({e})")))?;
    let mut descriptor_digest = digest.clone();
    if manifest.is_index() {
        let index: Index = serde_json::from_slice(&bytes)
            .map_err(|e| no_image(format!("its index is not valid ({e})")))?;
        let Some(child) = index.for_platform(OS, ARCHITECTURE) else {
            return Err(no_image(format!(
                "its index has no {OS}/{ARCHITECTURE} image (it lists {})",
                platforms(&index)
            )));
        };
        progress.step(
            &target,
            &format!("{OS}/{ARCHITECTURE} is {} in the index", child.digest),
        );
        descriptor_digest = child.digest.clone();
        (bytes, _) = registry.get_manifest(&child.digest).await?;
        manifest = serde_json::from_slice(&bytes)
            .map_err(|e| no_image(format!("its manifest is not an OCI manifest ({e})")))?;
        if manifest.is_index() {
            return Err(no_image("its index lists another index".into()));
        }
    }
    let media_type = manifest
        .media_type
        .clone()
        .unwrap_or_else(|| media::OCI_MANIFEST.to_string());
    if !media::is_image_manifest(&media_type) {
        return Err(no_image(format!("its manifest is a `{media_type}`")));
    }
    let Some(config) = manifest.config.clone() else {
        return Err(no_image("its manifest has no config".into()));
    };
    let config_bytes = fetch_small_blob(&registry, &config, "config", MAX_SMALL_BLOB).await?;
    layout.write_blob(&config_bytes).map_err(layout_error)?;
    let count = manifest.layers.len();
    for (i, layer) in manifest.layers.iter().enumerate() {
        let what = format!("layer {} of {count}", i + 1);
        let hex = digest_hex(&layer.digest).ok_or_else(|| {
            no_image(format!("its layer digest `{}` is not sha256", layer.digest))
        })?;
        let path = layout.blob_path(&layer.digest).map_err(layout_error)?;
        let part_path = path.with_extension("part");
        progress.step(&target, &format!("downloading {what}"));
        let mut part = locked_part(&part_path).await?;
        fetch_blob(&registry, layer, &hex, &mut part, &target, &what, progress).await?;
        part.sync_all()?;
        drop(part);
        fs_err::rename(&part_path, &path)?;
    }
    // The manifest's bytes as the registry sent them: its digest is the image's identity.
    let written = layout.write_blob(&bytes).map_err(layout_error)?;
    debug_assert_eq!(written, descriptor_digest);
    let mut descriptor = Descriptor::new(&media_type, &written, bytes.len() as u64);
    if let Some(tag) = &src.tag {
        descriptor
            .annotations
            .insert(REF_NAME.to_string(), tag.clone());
    }
    layout
        .write_index(&Index::of(vec![descriptor]))
        .map_err(layout_error)?;
    fs_err::File::open(temp.path()).and_then(|d| d.sync_all())?;
    match fs_err::rename(temp.path(), dest) {
        Ok(()) => {
            // Renamed: nothing is left under the temporary name.
            let _ = temp.keep();
        }
        // Another builder pulled the same image meanwhile: use its copy, drop ours.
        Err(_) if Layout::open(dest).is_ok() => {}
        Err(e) => return Err(e.into()),
    }
    let layout = Layout::open(dest).map_err(layout_error)?;
    progress.step(&target, &format!("pulled into {}", dest.display()));
    Ok(PulledLayout {
        dir: dest.to_path_buf(),
        image: facts(&layout)?,
        from_cache: false,
    })
}

fn platforms(index: &Index) -> String {
    let listed: Vec<String> = index
        .manifests
        .iter()
        .filter_map(|d| d.platform.as_ref())
        .map(|p| format!("{}/{}", p.os, p.architecture))
        .collect();
    if listed.is_empty() {
        "no platforms".into()
    } else {
        listed.join(", ")
    }
}

/// What [`push_layout`] sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedImage {
    /// `sha256:<hex>` of the manifest: the layout's, unchanged.
    pub manifest_digest: String,
    pub config_digest: String,
    /// The tag written.
    pub tag: String,
}

/// Push the image of `layout` (its only one) to `dest`, which must name a tag: the config
/// and layers first (each skipped when the registry has it, else uploaded and checked), the
/// manifest's bytes last, unchanged, so the registry holds the image under the digest the
/// layout gives it. A failed push never moves the tag.
pub async fn push_layout(
    layout: &Layout,
    dest: &OciReference,
    options: &OciOptions,
    progress: &dyn Progress,
) -> Result<PushedImage, OciError> {
    let tag = match (&dest.tag, &dest.digest) {
        (Some(t), None) => t.clone(),
        _ => {
            return Err(OciError::NoTag {
                reference: format!("{}/{}", dest.registry, dest.repository),
            });
        }
    };
    let target = format!("oci://{dest}");
    let image: LayoutImage = {
        let layout = layout.clone();
        tokio::task::spawn_blocking(move || layout.image(None))
            .await
            .map_err(|e| OciError::Task(e.to_string()))?
            .map_err(layout_error)?
    };
    progress.step(&target, &format!("connecting to {}", dest.registry));
    let registry = Registry::connect(dest, options, RegistryOperation::Push).await?;
    let count = image.manifest.layers.len();
    let blobs = std::iter::once(("config".to_string(), &image.config_descriptor)).chain(
        image
            .manifest
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| (format!("layer {} of {count}", i + 1), l)),
    );
    for (what, blob) in blobs {
        let path = layout.blob_path(&blob.digest).map_err(layout_error)?;
        progress.step(&target, &format!("uploading {what}"));
        let source = Arc::new(BlobSource::file(&path)?);
        if source.len() != blob.size {
            return Err(layout_error(LayoutError::SizeMismatch {
                digest: blob.digest.clone(),
                what,
                expected: blob.size,
                actual: source.len(),
            }));
        }
        registry
            .upload(source, Some(&blob.digest), &target, &what, progress)
            .await?;
    }
    progress.step(&target, &format!("tagging {tag}"));
    let digest = registry
        .put_manifest(&tag, &image.manifest_bytes, &image.descriptor.media_type)
        .await?;
    if digest != image.descriptor.digest {
        return Err(OciError::DigestMismatch {
            what: "the pushed manifest".into(),
            expected: image.descriptor.digest.clone(),
            actual: digest,
        });
    }
    Ok(PushedImage {
        manifest_digest: digest,
        config_digest: image.config_descriptor.digest.clone(),
        tag,
    })
}

/// Push a stored container build's image to `dest` (a tag); the receipt names it by digest.
pub async fn push_container(
    image: &StoredImage,
    dest: &OciReference,
    options: &OciOptions,
    progress: &dyn Progress,
) -> Result<Receipt, OciError> {
    let started = Instant::now();
    let layout = image.layout().map_err(|e| OciError::Store(Box::new(e)))?;
    let pushed = push_layout(&layout, dest, options, progress).await?;
    let mut receipt = Receipt {
        kind: "oci".into(),
        location: format!(
            "oci://{}/{}:{}@{}",
            dest.registry, dest.repository, pushed.tag, pushed.manifest_digest
        ),
        digests: Default::default(),
        ids: Default::default(),
        finished: chrono::Utc::now(),
        seconds: started.elapsed().as_secs_f64(),
    };
    receipt
        .digests
        .insert("manifest".into(), pushed.manifest_digest);
    receipt
        .digests
        .insert("config".into(), pushed.config_digest);
    Ok(receipt)
}
