//! The build's disk chain: the cached parent ← an overlay ← one qcow2 layer per component.
//!
//! The build VM boots the chain's top file in place. After the guest is ready, and after each
//! component, [`DiskChain::commit`] flushes the guest's file systems (the agent's `sync`) and
//! takes an external snapshot over QMP (`blockdev-snapshot-sync`): the current top becomes
//! read-only and QEMU creates a new qcow2 on top of it that receives the next writes. So each
//! component's changes sit in their own file, keyed by the layer cache's key
//! (`build::cache::chain`), which a later build reuses when nothing changed: it then starts
//! from cached files ([`DiskChain::resume`], [`DiskChain::from_cache`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::vm::img;
use crate::vm::qmp::{self, Qmp};

/// The drive id of the VM's disk on QEMU's command line (`-drive id=disk0`, see `vm::argv`).
const DISK_DEVICE: &str = "disk0";

/// `blockdev-snapshot-sync`: a new qcow2 at `snapshot_file` backed by the device's current
/// image, which becomes read-only; the device writes to the new file from now on. Kept here,
/// next to its only user; it is typed like every other command of `vm::qmp`.
#[derive(Debug, Serialize)]
struct BlockdevSnapshotSync {
    device: String,
    #[serde(rename = "snapshot-file")]
    snapshot_file: String,
    format: &'static str,
}

impl qmp::Command for BlockdevSnapshotSync {
    const NAME: &'static str = "blockdev-snapshot-sync";
    type Returns = qmp::Empty;
}

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// qemu-img's error names the file.
    #[error("could not create the build's overlay")]
    Overlay(#[source] img::ImgError),
    /// qemu-img's error names the file.
    #[error("could not inspect the parent image")]
    Parent(#[source] img::ImgError),
    #[error("could not flush the guest's file systems before committing layer `{layer}`")]
    Sync {
        layer: String,
        #[source]
        source: crate::machine::MachineError,
    },
    #[error("could not commit layer `{layer}` (QMP blockdev-snapshot-sync to {file})")]
    Snapshot {
        layer: String,
        file: PathBuf,
        #[source]
        source: qmp::QmpError,
    },
}

/// One committed layer: what wrote it, its key and its file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Layer {
    /// `boot` (first boot and cloud-init) or the component's label.
    pub name: String,
    /// The layer cache's key (`build::cache::chain`).
    pub key: Option<String>,
    pub file: PathBuf,
}

/// The files of one build's disk, bottom to top. The last file is the one being written.
#[derive(Debug, Clone)]
pub struct DiskChain {
    /// The folder holding the overlay and the layers (not the parent).
    pub dir: PathBuf,
    pub parent: PathBuf,
    /// Committed layers, oldest first (the overlay, `boot`, is the first).
    pub layers: Vec<Layer>,
    /// The file receiving writes now (the overlay until the first commit).
    pub top: PathBuf,
}

impl DiskChain {
    /// Create `dir/0-boot.qcow2` on `parent` (read through its own format), grown to `size`
    /// bytes when given. It receives the first boot's writes (cloud-init).
    pub async fn create(
        dir: &Path,
        parent: &Path,
        size: Option<u64>,
    ) -> Result<DiskChain, LayerError> {
        let info = img::info(parent).await.map_err(LayerError::Parent)?;
        let format = info.disk_format().map_err(LayerError::Parent)?;
        let top = dir.join("0-boot.qcow2");
        img::create_overlay(parent, format, &top, size)
            .await
            .map_err(LayerError::Overlay)?;
        Ok(DiskChain {
            dir: dir.to_path_buf(),
            parent: parent.to_path_buf(),
            layers: Vec::new(),
            top,
        })
    }

    /// A chain that starts on layers taken from the layer cache (`cached`, bottom first,
    /// each file in the cache): a new top `dir/<n>-<next>.qcow2` on the last of them, where
    /// the build VM writes from now on. The cached files are only read.
    pub async fn resume(
        dir: &Path,
        parent: &Path,
        cached: Vec<Layer>,
        next: &str,
    ) -> Result<DiskChain, LayerError> {
        let Some(last) = cached.last() else {
            return Self::create(dir, parent, None).await;
        };
        let top = dir.join(format!("{}-{}.qcow2", cached.len() + 1, file_safe(next)));
        img::create_overlay(&last.file, crate::vm::DiskFormat::Qcow2, &top, None)
            .await
            .map_err(LayerError::Overlay)?;
        Ok(DiskChain {
            dir: dir.to_path_buf(),
            parent: parent.to_path_buf(),
            layers: cached,
            top,
        })
    }

    /// A finished chain made of cached layers only (the generalize layer on top): no VM
    /// writes to it; the test stage and export read it where it is.
    pub fn from_cache(dir: &Path, parent: &Path, mut cached: Vec<Layer>) -> Option<DiskChain> {
        let top = cached.pop()?.file;
        Some(DiskChain {
            dir: dir.to_path_buf(),
            parent: parent.to_path_buf(),
            layers: cached,
            top,
        })
    }

    /// Seal what was written since the last commit as layer `name` (with its cache `key`) and
    /// start a new top file named for what writes to it `next`. The guest's file systems are
    /// flushed first so the sealed file holds every write.
    pub async fn commit(
        &mut self,
        qmp: &Qmp,
        agent: &crate::machine::agent::AgentMachine,
        name: &str,
        key: Option<&str>,
        next: &str,
    ) -> Result<&Layer, LayerError> {
        agent.sync().await.map_err(|source| LayerError::Sync {
            layer: name.to_string(),
            source,
        })?;
        let next = self.dir.join(format!(
            "{}-{}.qcow2",
            self.layers.len() + 1,
            file_safe(next)
        ));
        qmp.execute_within(
            &BlockdevSnapshotSync {
                device: DISK_DEVICE.to_string(),
                snapshot_file: next.to_string_lossy().into_owned(),
                format: "qcow2",
            },
            Duration::from_secs(60),
        )
        .await
        .map_err(|source| LayerError::Snapshot {
            layer: name.to_string(),
            file: next.clone(),
            source,
        })?;
        let sealed = std::mem::replace(&mut self.top, next);
        self.layers.push(Layer {
            name: name.to_string(),
            key: key.map(str::to_string),
            file: sealed,
        });
        #[expect(clippy::expect_used, reason = "the layer pushed just above is there")]
        let layer = self.layers.last().expect("a layer was just pushed");
        Ok(layer)
    }

    /// Every file of the chain this build wrote (not the parent), bottom to top.
    pub fn files(&self) -> Vec<PathBuf> {
        self.layers
            .iter()
            .map(|l| l.file.clone())
            .chain(std::iter::once(self.top.clone()))
            .collect()
    }
}

/// A name usable in a file name: letters, digits, `-`, `_` and `.`; the rest becomes `-`.
pub fn file_safe(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(60)
        .collect();
    if cleaned.is_empty() || cleaned.starts_with('.') {
        format!("x{cleaned}")
    } else {
        cleaned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_command_is_what_qemu_expects() {
        let json = serde_json::to_value(BlockdevSnapshotSync {
            device: "disk0".into(),
            snapshot_file: "/b/1.qcow2".into(),
            format: "qcow2",
        })
        .expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({"device": "disk0", "snapshot-file": "/b/1.qcow2", "format": "qcow2"})
        );
    }

    #[test]
    fn file_names_are_safe() {
        assert_eq!(file_safe("install-nginx"), "install-nginx");
        assert_eq!(file_safe("a b/c"), "a-b-c");
        assert_eq!(file_safe(".hidden"), "x.hidden");
        assert_eq!(file_safe(""), "x");
    }
}
