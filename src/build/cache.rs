//! The build's side of the layer cache ([`crate::store::layers`]): which layers of its chain
//! a build reuses and which it runs, and what it puts in the cache as it goes.
//!
//! The **chain** ([`chain`]) is one key per layer, bottom to top:
//!
//! ```text
//! boot          Plan::root_layer_key: the parent's digest and the settings that shape the
//!               disk before the first component (disk size, user data, working directory,
//!               network); for `boot: appliance` also the boot mode and what the appliance
//!               puts in the guest's way (`vm::appliance::digest`)
//! component i   plan.components[i].layer_key: the previous key, the component's document,
//!               its parameters and every document it reaches through ExecuteDocument
//! generalize    [`generalize_key`]: the last key and what generalizing does
//! ```
//!
//! A change anywhere changes that key and every key above it. Before the build VM boots,
//! [`decide`] picks the longest cached prefix the build may use (`--no-cache` uses none; a
//! component with `cache: false` and everything after it always runs) and the build boots
//! on its last layer (`DiskChain::resume`), or does not boot at all when even the generalize
//! layer is cached. After each commit the new layer is inserted under its key, written on
//! the layer before it; once an insert is refused (another build won the race for a key
//! with other bytes), later layers are not inserted. With `--no-cache` an existing layer is
//! evicted first, so the cache is refreshed.
//!
//! **Shared caches** (the recipe's `cache`, `--cache-from`, `--cache-to`;
//! [`crate::distribute::oci::layers`]): before the lookup, [`pull_shared`] pulls the layers
//! of the usable prefix the local cache lacks from each `from` repository in turn, so the
//! lookup finds (and verifies) them like layers built here. Once the image is stored,
//! [`push_shared`] pushes the chain's cached layers to `to`: after the build rather than
//! after each insert, so an upload never holds the build VM up and only layers of a build
//! that passed its tests are shared. Neither ever fails a build: what goes wrong is a warning.

use std::path::Path;

use sha2::{Digest, Sha256};

use super::generalize;
use super::plan::Plan;
use crate::diagnostic::error_chain;
use crate::distribute::Progress;
use crate::distribute::oci::OciOptions;
use crate::distribute::oci::layers::{location, pull_layers, push_layers};
use crate::store::layers::{CachedLayer, LayerCache, LayerParent, Lookup, Peeked};

/// The chain's names for the two layers that are not a component's.
pub const BOOT: &str = "boot";
pub const GENERALIZE: &str = "generalize";

/// One layer of the build's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLayer {
    /// `boot`, the component's label, or `generalize`.
    pub name: String,
    pub key: String,
    /// The component's index in the plan; `None` for the boot and generalize layers.
    pub component: Option<usize>,
}

/// The build's layer chain: boot, each component, generalize.
pub fn chain(plan: &Plan) -> Vec<ChainLayer> {
    let mut chain = vec![ChainLayer {
        name: BOOT.into(),
        key: plan.root_layer_key(),
        component: None,
    }];
    for (index, component) in plan.components.iter().enumerate() {
        chain.push(ChainLayer {
            name: component.label().to_string(),
            // Set by planning; a plan made by hand without keys gets them the same way.
            key: component
                .layer_key
                .clone()
                .unwrap_or_else(|| super::plan::layer_key(&chain[index].key, component)),
            component: Some(index),
        });
    }
    #[expect(clippy::expect_used, reason = "the chain starts with the boot layer")]
    let last = chain.last().expect("the boot layer").key.clone();
    chain.push(ChainLayer {
        name: GENERALIZE.into(),
        key: generalize_key(&last, plan.generalize),
        component: None,
    });
    chain
}

/// The generalize layer's key: the last component's key, whether the recipe seals the image
/// (`generalize`), and the script, package queries and package sources listing builder runs
/// (what the layer's record keeps for a build that takes it from the cache).
pub fn generalize_key(previous: &str, seal: bool) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"generalize\n");
    hasher.update(previous.as_bytes());
    hasher.update(b"\n");
    hasher.update(generalize::script(seal).as_bytes());
    hasher.update(b"\n");
    hasher.update(generalize::DPKG_QUERY.as_bytes());
    hasher.update(b"\n");
    hasher.update(generalize::RPM_QUERY.as_bytes());
    hasher.update(b"\n");
    hasher.update(generalize::SOURCES_SCRIPT.as_bytes());
    hex::encode(hasher.finalize())
}

/// Why a layer runs instead of coming from the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunReason {
    /// `--no-cache`.
    NoCache,
    /// The component's entry says `cache: false`.
    CacheOff,
    /// A layer below runs, so this one is written on new bytes.
    Earlier(String),
    /// The cache has no sound layer under this key.
    NotCached,
}

impl std::fmt::Display for RunReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunReason::NoCache => f.write_str("--no-cache"),
            RunReason::CacheOff => f.write_str("its recipe entry says `cache: false`"),
            RunReason::Earlier(name) => write!(f, "an earlier layer runs ({name})"),
            RunReason::NotCached => f.write_str("not in the cache (first build of this key)"),
        }
    }
}

/// How many layers of `chain` the build may take from the cache at most: none with
/// `--no-cache`, and never the layer of a component with `cache: false` or anything above it.
pub fn usable_prefix(plan: &Plan, chain: &[ChainLayer], no_cache: bool) -> usize {
    if no_cache {
        return 0;
    }
    chain
        .iter()
        .position(|l| {
            l.component
                .and_then(|i| plan.components.get(i))
                .is_some_and(|c| !c.cache)
        })
        .unwrap_or(chain.len())
}

/// Why each layer at or above `cached` runs: the first for its own reason, the rest because
/// of an earlier one.
pub fn run_reasons(
    plan: &Plan,
    chain: &[ChainLayer],
    cached: usize,
    no_cache: bool,
) -> Vec<RunReason> {
    let mut reasons = Vec::new();
    for (i, layer) in chain.iter().enumerate().skip(cached) {
        let reason = if no_cache {
            RunReason::NoCache
        } else if i > cached {
            RunReason::Earlier(chain[cached].name.clone())
        } else if layer
            .component
            .and_then(|c| plan.components.get(c))
            .is_some_and(|c| !c.cache)
        {
            RunReason::CacheOff
        } else {
            RunReason::NotCached
        };
        reasons.push(reason);
    }
    reasons
}

/// The cached prefix the build starts from: [`LayerCache::lookup`] on the usable part of the
/// chain. `base` is the parent image the plan verified.
pub async fn lookup(
    cache: &LayerCache,
    base: &Path,
    chain: &[ChainLayer],
    usable: usize,
) -> Result<Lookup, crate::store::LayerCacheError> {
    if usable == 0 {
        return Ok(Lookup::default());
    }
    let keys: Vec<String> = chain[..usable].iter().map(|l| l.key.clone()).collect();
    cache.lookup(base, &keys).await
}

/// Pull from the plan's shared caches (`cache.from`, in order) the layers of
/// `chain[..usable]` the local cache lacks, each repository going on from where the local
/// cache (and the repositories before it) left off. `base` is the parent image the plan
/// verified, read as `base_format`. Returns a warning for each repository that failed; what
/// was pulled before a failure stays cached.
pub async fn pull_shared(
    plan: &Plan,
    cache: &LayerCache,
    base: &Path,
    base_format: crate::vm::DiskFormat,
    chain: &[ChainLayer],
    usable: usize,
    progress: &dyn Progress,
) -> Vec<String> {
    let mut warnings = Vec::new();
    let keys: Vec<String> = chain[..usable.min(chain.len())]
        .iter()
        .map(|l| l.key.clone())
        .collect();
    if keys.is_empty() {
        return warnings;
    }
    let options = OciOptions::from_env();
    for reference in &plan.shared_cache.from {
        let have = cached_prefix(cache, base, &keys);
        if have == keys.len() {
            break;
        }
        let source = location(reference);
        let pulled = pull_layers(
            cache,
            reference,
            base,
            base_format,
            &keys,
            have,
            &options,
            progress,
        )
        .await;
        match pulled {
            Ok(pulled) => {
                let said = format!("pulled {} layer(s)", pulled.pulled.len());
                match pulled.stopped {
                    Some(why) if pulled.cached < keys.len() => {
                        progress.step(&source, &format!("{said}; {why}"));
                    }
                    _ => progress.step(&source, &said),
                }
            }
            Err(e) => warnings.push(format!(
                "could not pull cached layers from {source}: {}",
                error_chain(&e)
            )),
        }
    }
    warnings
}

/// How many layers at the start of `keys` the local cache holds, by their records and sizes
/// (the lookup then verifies them).
fn cached_prefix(cache: &LayerCache, base: &Path, keys: &[String]) -> usize {
    cache.peek(Some(base), keys).map_or(0, |seen| {
        seen.iter()
            .take_while(|p| matches!(p, Peeked::Cached(_)))
            .count()
    })
}

/// Push the chain's cached layers to the plan's shared cache (`cache.to`), if it names one.
/// Returns a warning when the push failed.
pub async fn push_shared(
    plan: &Plan,
    cache: &LayerCache,
    chain: &[ChainLayer],
    progress: &dyn Progress,
) -> Option<String> {
    let to = plan.shared_cache.to.as_ref()?;
    let source = location(to);
    let keys: Vec<String> = chain.iter().map(|l| l.key.clone()).collect();
    match push_layers(cache, to, &keys, &OciOptions::from_env(), progress).await {
        Ok(pushed) => {
            let mut said = format!(
                "pushed {} layer(s), {} already there",
                pushed.pushed.len(),
                pushed.present.len()
            );
            if let Some(conflict) = &pushed.conflict {
                said.push_str(&format!(
                    "; layer {} is there as another copy (sha256 {}, the first push wins): it \
                     and the layers above it stay unshared",
                    conflict.key, conflict.theirs
                ));
            }
            progress.step(&source, &said);
            None
        }
        Err(e) => Some(format!(
            "could not push the layer cache to {source}: {}",
            error_chain(&e)
        )),
    }
}

/// What a build needs to go on inserting: the cache, the layer the next one is written on,
/// and the guards of every layer it used or inserted (held until the build ends, so no
/// prune removes them).
#[derive(Debug)]
pub struct Inserting {
    pub cache: LayerCache,
    /// The parent image and its format, for the first layer.
    pub base: std::path::PathBuf,
    pub base_format: crate::vm::DiskFormat,
    /// The previous layer as the build wrote on it: its key and the sha256 of that file.
    /// `None` before the boot layer.
    pub parent: Option<(String, String)>,
    /// Refresh (`--no-cache`): evict a cached layer of the same key before inserting.
    pub refresh: bool,
    /// False once an insert was refused: later layers were written on a layer the cache
    /// does not hold.
    pub on: bool,
    /// The chain index of the next layer the build finishes.
    pub next: usize,
    /// Layers at this chain index and above are never cached (`cache: false`).
    pub limit: usize,
    pub guards: Vec<CachedLayer>,
}

impl Inserting {
    /// The parent a new layer is inserted on.
    pub fn parent(&self) -> LayerParent<'_> {
        match &self.parent {
            None => LayerParent::Base {
                path: &self.base,
                format: self.base_format,
            },
            Some((key, sha256)) => LayerParent::Layer { key, sha256 },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generalize_key_follows_its_inputs() {
        let a = "a".repeat(64);
        let b = "b".repeat(64);
        assert_ne!(generalize_key(&a, true), generalize_key(&b, true));
        assert_ne!(generalize_key(&a, true), generalize_key(&a, false));
        assert_eq!(generalize_key(&a, true), generalize_key(&a, true));
        assert_eq!(generalize_key(&a, true).len(), 64);
    }
}
