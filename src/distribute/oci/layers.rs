//! The layer cache shared through an OCI registry (`cache: {from, to}`, `--cache-from`,
//! `--cache-to`): each cached layer ([`crate::store::layers`]) is one artifact in a
//! repository, tagged with its key, so builds on other machines pull the longest prefix of
//! their chain instead of building it. Owns the artifact's shape and the rules for reusing
//! a layer from a registry; the registry session (credentials, plain-HTTP registries,
//! resumable uploads, retries, digest checks) is the one `push`/`pull_disk` use, and the
//! cache's own rules (verified lookup, insert, rebase onto this machine's parent image) stay
//! in the store.
//!
//! **A layer artifact** (`<repository>:<key>`): an OCI 1.1 image manifest with
//! `artifactType: application/vnd.builder.layer.v1` and one blob: the cached qcow2 file as
//! it is in the pushing machine's cache ([`LAYER_QCOW2`]). Its config ([`LAYER_CONFIG`], a
//! small JSON document) carries what the layer's record keeps besides the file: what went
//! into its key (so `builder plan` on the pulling machine explains a changed key too) and,
//! for a generalize layer, the image's package list (so a build that takes every layer from
//! the cache still lists the packages in its manifest). The manifest's annotations:
//!
//! | annotation | value |
//! | --- | --- |
//! | `org.builder.layer.key` | the layer key (the tag) |
//! | `org.builder.layer.parent` | the key of the layer below (absent for a first layer) |
//! | `org.builder.layer.parent-sha256` | the digest of the parent's blob in this repository |
//! | `org.builder.layer.component` | the component whose changes it holds |
//! | `org.builder.layer.build` | the build that made it (`name/x.y.z/n`) |
//!
//! **Pushing** walks the chain from its first layer while the local cache holds it. A key
//! the repository lacks is pushed (blob first, then the manifest, so a tag always names a
//! whole layer). A key it has is kept, never overwritten (the first push wins): when its
//! blob is not this machine's layer, the layers above were written on another copy and are
//! not pushed.
//!
//! **Pulling** walks the rest of the chain while the repository has each key; each layer's
//! annotations must continue the chain (its key, its parent's key, and the parent's blob
//! digest: what it was written on), its blob is downloaded into the cache's folder and
//! checked against its digest, then inserted into the cache, which rebases a first layer
//! onto this machine's parent image. The record names the repository (`source`).
//!
//! **Same layer**: a cached layer is the repository's copy of its key when its sha256 is the
//! blob's, or when it was pulled from that repository (a pulled first layer's file differs
//! from the blob in its header only: it names this machine's parent image).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use oci_client::RegistryOperation;
use serde::{Deserialize, Serialize};

use super::blob::BlobSource;
use super::registry::Registry;
use super::{
    ImageManifest, OCI_MANIFEST, OciDescriptor, OciError, OciOptions, descriptor, digest_hex,
    fetch_blob, fetch_small_blob, is_qcow2, sha256_of,
};
use crate::distribute::Progress;
use crate::recipe::OciReference;
use crate::store::layers::{
    CachedLayer, LayerCache, LayerCacheError, LayerInputs, LayerParent, Origin,
};
use crate::store::manifest::PackageList;
use crate::vm::DiskFormat;

/// `artifactType` of a layer artifact.
pub const LAYER_ARTIFACT_TYPE: &str = "application/vnd.builder.layer.v1";
/// Media type of a layer artifact's blob: a qcow2 file whose backing file is its parent.
pub const LAYER_QCOW2: &str = "application/vnd.builder.layer.qcow2";
/// Media type of a layer artifact's config ([`LayerConfig`]).
pub const LAYER_CONFIG: &str = "application/vnd.builder.layer.config.v1+json";
/// The largest config a pull reads (a package list is tens of KiB).
const MAX_CONFIG: u64 = 16 << 20;
/// Annotation: the layer's key.
pub const KEY: &str = "org.builder.layer.key";
/// Annotation: the parent layer's key.
pub const PARENT: &str = "org.builder.layer.parent";
/// Annotation: the digest (hex) of the parent layer's blob in the same repository.
pub const PARENT_SHA256: &str = "org.builder.layer.parent-sha256";
/// Annotation: the component's label.
pub const COMPONENT: &str = "org.builder.layer.component";
/// Annotation: the build that made the layer (`name/x.y.z/n`).
pub const BUILD: &str = "org.builder.layer.build";

#[derive(Debug, thiserror::Error)]
pub enum LayerShareError {
    #[error("could not open the shared layer cache {reference}")]
    Connect {
        reference: String,
        #[source]
        source: Box<OciError>,
    },
    #[error("could not {action} layer {key} ({reference})")]
    Transfer {
        /// `push`, `pull` or `look up`.
        action: &'static str,
        reference: String,
        key: String,
        #[source]
        source: Box<OciError>,
    },
    #[error("{reference}:{key} is not a builder layer: {reason}")]
    NotALayer {
        reference: String,
        key: String,
        reason: String,
    },
    #[error("{reference}:{key} does not continue this build's chain: {reason}")]
    WrongChain {
        reference: String,
        key: String,
        reason: String,
    },
    #[error("the local layer cache failed on layer {key} (shared through {reference})")]
    Cache {
        reference: String,
        key: String,
        #[source]
        source: Box<LayerCacheError>,
    },
}

/// What [`push_layers`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pushed {
    /// Keys pushed, first layer first.
    pub pushed: Vec<String>,
    /// Keys the repository had already (this machine's layer, or the one it was pulled as).
    pub present: Vec<String>,
    /// The first key whose tag holds another copy of the layer: it and the layers above were
    /// not pushed.
    pub conflict: Option<Conflict>,
    /// The first key of the chain the local cache does not hold (nothing above it pushed).
    pub not_cached: Option<String>,
}

/// A key the repository holds with another blob than this machine's layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub key: String,
    /// `sha256:<hex>` of the repository's blob.
    pub theirs: String,
    /// sha256 (hex) of the cached file here.
    pub ours: String,
}

/// What [`pull_layers`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pulled {
    /// How many layers of the chain the local cache holds now (a prefix).
    pub cached: usize,
    /// Keys pulled, first layer first.
    pub pulled: Vec<String>,
    /// Why it stopped before the chain's end, when it did: the key the repository lacks, or
    /// the local layer it cannot continue.
    pub stopped: Option<String>,
}

/// A layer artifact's config: the parts of the layer's record a pull keeps besides the file.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayerConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    inputs: Option<Box<LayerInputs>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    packages: Option<Box<PackageList>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    package_sources: Option<Box<crate::store::manifest::PackageSources>>,
}

/// `oci://host/repository`: how records, events and manifests name a shared cache.
pub fn location(reference: &OciReference) -> String {
    format!("oci://{}/{}", reference.registry, reference.repository)
}

/// A layer artifact in the repository.
struct RemoteLayer {
    /// Its one blob.
    blob: OciDescriptor,
    /// Its config, when it is a [`LAYER_CONFIG`] (layers pushed with the empty one carry no
    /// record).
    config: Option<OciDescriptor>,
    /// sha256 (hex) of the blob.
    sha256: String,
    annotations: BTreeMap<String, String>,
}

/// Whether the cached layer is the repository's copy of its key (see the module's docs).
fn same_layer(record: &crate::store::layers::LayerRecord, blob_sha256: &str, source: &str) -> bool {
    record.sha256.eq_ignore_ascii_case(blob_sha256) || record.source.as_deref() == Some(source)
}

/// The layer artifact tagged `key`, `None` when the repository has no such tag.
async fn remote_layer(
    registry: &Registry,
    source: &str,
    key: &str,
) -> Result<Option<RemoteLayer>, LayerShareError> {
    let bytes = match registry.get_manifest(key).await {
        Ok((bytes, _)) => bytes,
        Err(OciError::NotFound { .. }) => return Ok(None),
        Err(e) => {
            return Err(LayerShareError::Transfer {
                action: "look up",
                reference: source.to_string(),
                key: key.to_string(),
                source: Box::new(e),
            });
        }
    };
    let not_a_layer = |reason: String| LayerShareError::NotALayer {
        reference: source.to_string(),
        key: key.to_string(),
        reason,
    };
    let manifest: ImageManifest = serde_json::from_slice(&bytes)
        .map_err(|e| not_a_layer(format!("its manifest is not an OCI image manifest ({e})")))?;
    if manifest.artifact_type.as_deref() != Some(LAYER_ARTIFACT_TYPE) {
        return Err(not_a_layer(format!(
            "its artifact type is {}, expected {LAYER_ARTIFACT_TYPE}",
            manifest.artifact_type.as_deref().unwrap_or("none")
        )));
    }
    let [blob] = <[OciDescriptor; 1]>::try_from(manifest.layers)
        .map_err(|layers| not_a_layer(format!("it has {} blobs, expected one", layers.len())))?;
    if blob.media_type != LAYER_QCOW2 {
        return Err(not_a_layer(format!(
            "its blob is {}, expected {LAYER_QCOW2}",
            blob.media_type
        )));
    }
    let sha256 = digest_hex(&blob.digest)
        .ok_or_else(|| not_a_layer(format!("its blob digest `{}` is not sha256", blob.digest)))?;
    Ok(Some(RemoteLayer {
        blob,
        sha256,
        config: manifest.config.filter(|c| c.media_type == LAYER_CONFIG),
        annotations: manifest.annotations,
    }))
}

/// Push the layers of `chain` (keys, first layer first) that the local cache holds, from the
/// first on, to the repository `reference` names (its tag and digest, if any, are not used:
/// each layer's tag is its key). See the module's docs.
pub async fn push_layers(
    cache: &LayerCache,
    reference: &OciReference,
    chain: &[String],
    options: &OciOptions,
    progress: &dyn Progress,
) -> Result<Pushed, LayerShareError> {
    let source = location(reference);
    let mut report = Pushed::default();
    let Some(first) = chain.first() else {
        return Ok(report);
    };
    // Nothing cached, nothing to say to the registry.
    let Some(mut local) = get(cache, &source, first).await? else {
        report.not_cached = Some(first.clone());
        return Ok(report);
    };
    progress.step(&source, &format!("connecting to {}", reference.registry));
    let registry = Registry::connect(reference, options, RegistryOperation::Push)
        .await
        .map_err(|e| LayerShareError::Connect {
            reference: source.clone(),
            source: Box::new(e),
        })?;
    // The layer below: its key and its blob's digest in the repository.
    let mut below: Option<(String, String)> = None;
    for (i, key) in chain.iter().enumerate() {
        if i > 0 {
            match get(cache, &source, key).await? {
                Some(layer) => local = layer,
                None => {
                    report.not_cached = Some(key.clone());
                    break;
                }
            }
        }
        let record = &local.record;
        if record.parent.as_deref() != below.as_ref().map(|(k, _)| k.as_str()) {
            // The cache keys a layer by its whole chain: a record naming another parent is
            // not this chain's (lookup would discard it).
            report.not_cached = Some(key.clone());
            break;
        }
        if let Some(remote) = remote_layer(&registry, &source, key).await? {
            if same_layer(record, &remote.sha256, &source) {
                report.present.push(key.clone());
                below = Some((key.clone(), remote.sha256));
                continue;
            }
            report.conflict = Some(Conflict {
                key: key.clone(),
                theirs: remote.blob.digest,
                ours: record.sha256.clone(),
            });
            break;
        }
        let transfer = |e: OciError| LayerShareError::Transfer {
            action: "push",
            reference: source.clone(),
            key: key.clone(),
            source: Box::new(e),
        };
        let what = format!("layer {} ({})", short(key), record.component);
        progress.step(&source, &format!("uploading {what}"));
        let file = Arc::new(BlobSource::file(&local.path).map_err(|e| transfer(e.into()))?);
        // The upload hashes what it sends: a file that is not what its record says fails
        // here (DigestMismatch) and is never tagged.
        let known = format!("sha256:{}", record.sha256);
        let blob = registry
            .upload(file, Some(&known), &source, &what, progress)
            .await
            .map_err(transfer)?;
        let config = LayerConfig {
            inputs: record.inputs.clone(),
            packages: record.packages.clone(),
            package_sources: record.package_sources.clone(),
        };
        #[expect(
            clippy::expect_used,
            reason = "plain data (structs, strings, numbers, string-keyed maps) always serialises with serde_json"
        )]
        let config = serde_json::to_vec(&config).expect("plain data serializes");
        let known = sha256_of(&config);
        let config = registry
            .upload(
                Arc::new(BlobSource::bytes(config)),
                Some(&known),
                &source,
                "config",
                progress,
            )
            .await
            .map_err(transfer)?;
        let config = descriptor(LAYER_CONFIG, &config, None);
        let mut annotations = BTreeMap::from([
            (KEY.to_string(), key.clone()),
            (COMPONENT.to_string(), record.component.clone()),
            (BUILD.to_string(), record.build.clone()),
        ]);
        if let Some((parent, parent_sha256)) = &below {
            annotations.insert(PARENT.to_string(), parent.clone());
            annotations.insert(PARENT_SHA256.to_string(), parent_sha256.clone());
        }
        let manifest = ImageManifest {
            schema_version: 2,
            media_type: Some(OCI_MANIFEST.to_string()),
            artifact_type: Some(LAYER_ARTIFACT_TYPE.to_string()),
            config: Some(config),
            layers: vec![descriptor(
                LAYER_QCOW2,
                &blob,
                Some(&format!("{key}.qcow2")),
            )],
            manifests: None,
            annotations,
        };
        #[expect(
            clippy::expect_used,
            reason = "plain data (structs, strings, numbers, string-keyed maps) always serialises with serde_json"
        )]
        let body = serde_json::to_vec_pretty(&manifest).expect("plain data serializes");
        registry
            .put_manifest(key, &body, OCI_MANIFEST)
            .await
            .map_err(transfer)?;
        report.pushed.push(key.clone());
        below = Some((key.clone(), record.sha256.clone()));
    }
    Ok(report)
}

/// Pull the layers `chain[have..]` (keys, first layer first; the local cache holds the
/// first `have`, as its lookup found them) from the repository `reference` names into
/// `cache`, in order, until one is missing there. A first layer is rebased onto `base` (this
/// build's parent image, read as `base_format`). Layers pulled before an error stay cached.
/// See the module's docs.
#[expect(
    clippy::too_many_arguments,
    reason = "the chain's two ends (the parent image, what is cached) and the registry's three"
)]
pub async fn pull_layers(
    cache: &LayerCache,
    reference: &OciReference,
    base: &Path,
    base_format: DiskFormat,
    chain: &[String],
    have: usize,
    options: &OciOptions,
    progress: &dyn Progress,
) -> Result<Pulled, LayerShareError> {
    let source = location(reference);
    let mut report = Pulled {
        cached: have.min(chain.len()),
        ..Pulled::default()
    };
    if have >= chain.len() {
        return Ok(report);
    }
    progress.step(&source, &format!("connecting to {}", reference.registry));
    let registry = Registry::connect(reference, options, RegistryOperation::Pull)
        .await
        .map_err(|e| LayerShareError::Connect {
            reference: source.clone(),
            source: Box::new(e),
        })?;

    // The layer below the next one: held (so no prune removes it), with its blob's digest
    // in the repository (what the next one was written on).
    let mut below: Option<(CachedLayer, String)> = None;
    if have > 0 {
        let key = &chain[have - 1];
        let Some(local) = get(cache, &source, key).await? else {
            report.stopped = Some(format!("layer {key} is no longer in the local cache"));
            return Ok(report);
        };
        let Some(remote) = remote_layer(&registry, &source, key).await? else {
            report.stopped = Some(format!(
                "{source} does not hold layer {key}, which the next one is written on"
            ));
            return Ok(report);
        };
        if !same_layer(&local.record, &remote.sha256, &source) {
            report.stopped = Some(format!(
                "the local layer {key} is another copy than {source}'s (built here: sha256 {})",
                local.record.sha256
            ));
            return Ok(report);
        }
        below = Some((local, remote.sha256));
    }

    for key in &chain[have..] {
        let Some(remote) = remote_layer(&registry, &source, key).await? else {
            report.stopped = Some(format!("{source} does not hold layer {key}"));
            break;
        };
        check_chain(&remote, &source, key, below.as_ref())?;
        let component = remote
            .annotations
            .get(COMPONENT)
            .cloned()
            .unwrap_or_default();
        let build = remote.annotations.get(BUILD).cloned().unwrap_or_default();
        let what = format!("layer {} ({component})", short(key));
        let cache_error = |e: LayerCacheError| LayerShareError::Cache {
            reference: source.clone(),
            key: key.clone(),
            source: Box::new(e),
        };
        let transfer = |e: OciError| LayerShareError::Transfer {
            action: "pull",
            reference: source.clone(),
            key: key.clone(),
            source: Box::new(e),
        };
        progress.step(&source, &format!("downloading {what}"));
        let download = cache.scratch_file().map_err(cache_error)?;
        let mut file = fs_err::File::from_parts(
            download
                .as_file()
                .try_clone()
                .map_err(|e| transfer(e.into()))?,
            download.path(),
        );
        fetch_blob(
            &registry,
            &remote.blob,
            &remote.sha256,
            &mut file,
            &source,
            &what,
            progress,
        )
        .await
        .map_err(transfer)?;
        if !is_qcow2(download.path()).map_err(transfer)? {
            return Err(LayerShareError::NotALayer {
                reference: source.clone(),
                key: key.clone(),
                reason: "its blob is not a qcow2 image".into(),
            });
        }
        let parent = match &below {
            None => LayerParent::Base {
                path: base,
                format: base_format,
            },
            Some((layer, _)) => LayerParent::Layer {
                key: &layer.record.key,
                sha256: &layer.record.sha256,
            },
        };
        let config = match &remote.config {
            Some(blob) => {
                let bytes = fetch_small_blob(&registry, blob, "layer config", MAX_CONFIG)
                    .await
                    .map_err(transfer)?;
                serde_json::from_slice(&bytes).map_err(|e| LayerShareError::NotALayer {
                    reference: source.clone(),
                    key: key.clone(),
                    reason: format!("its config is not a layer record ({e})"),
                })?
            }
            None => LayerConfig::default(),
        };
        let origin = Origin {
            component: &component,
            build: &build,
            source: Some(&source),
            inputs: config.inputs.as_deref(),
            packages: config.packages.as_deref(),
            package_sources: config.package_sources.as_deref(),
        };
        let inserted = cache
            .insert(key, parent, download.path(), origin)
            .await
            .map_err(cache_error)?;
        drop(file);
        drop(download);
        // Another build cached the key meanwhile: its copy stays, and the next layer can
        // only go on it if it is this repository's.
        if !inserted.ours && !same_layer(&inserted.layer.record, &remote.sha256, &source) {
            report.stopped = Some(format!(
                "another build cached layer {key} meanwhile, from another copy"
            ));
            break;
        }
        report.pulled.push(key.clone());
        report.cached += 1;
        below = Some((inserted.layer, remote.sha256));
    }
    Ok(report)
}

/// The artifact's annotations continue the chain: its key, its parent's key, and the digest
/// of the blob it was written on.
fn check_chain(
    remote: &RemoteLayer,
    source: &str,
    key: &str,
    below: Option<&(CachedLayer, String)>,
) -> Result<(), LayerShareError> {
    let wrong = |reason: String| LayerShareError::WrongChain {
        reference: source.to_string(),
        key: key.to_string(),
        reason,
    };
    let annotation = |name: &str| remote.annotations.get(name).map(String::as_str);
    if annotation(KEY) != Some(key) {
        return Err(wrong(format!(
            "its {KEY} annotation is {:?}",
            annotation(KEY).unwrap_or("missing")
        )));
    }
    let expected_parent = below.map(|(layer, _)| layer.record.key.as_str());
    if annotation(PARENT) != expected_parent {
        return Err(wrong(format!(
            "its parent is {}, this chain's is {}",
            annotation(PARENT).unwrap_or("none (a first layer)"),
            expected_parent.unwrap_or("none (a first layer)")
        )));
    }
    let expected_sha = below.map(|(_, sha)| sha.as_str());
    let found_sha = annotation(PARENT_SHA256);
    let matches = match (found_sha, expected_sha) {
        (Some(found), Some(expected)) => found.eq_ignore_ascii_case(expected),
        (None, None) => true,
        _ => false,
    };
    if !matches {
        return Err(wrong(format!(
            "it was written on a parent with sha256 {}, and the parent's blob has {}",
            found_sha.unwrap_or("(none)"),
            expected_sha.unwrap_or("(none)")
        )));
    }
    Ok(())
}

/// The cached layer `key`, locked.
async fn get(
    cache: &LayerCache,
    source: &str,
    key: &str,
) -> Result<Option<CachedLayer>, LayerShareError> {
    cache.get(key).await.map_err(|e| LayerShareError::Cache {
        reference: source.to_string(),
        key: key.to_string(),
        source: Box::new(e),
    })
}

/// The first 12 digits of a key, as the build's output shows it.
fn short(key: &str) -> &str {
    &key[..key.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_cache_is_named_by_its_repository_only() {
        let r: OciReference = "127.0.0.1:5000/cache/web:ignored"
            .parse()
            .expect("reference");
        assert_eq!(location(&r), "oci://127.0.0.1:5000/cache/web");
    }
}
