//! What a build of a plan would take from the layer cache and what it would run, and why:
//! `builder plan`'s view of the cache. Reads the cache ([`LayerCache::peek`]: records and
//! file sizes) and changes nothing; the build's own lookup verifies every layer it uses.
//!
//! A layer runs because of `--no-cache`, because its component's entry says `cache: false`,
//! because a layer below it runs, or because its key is not cached. For the last, a cached
//! layer of the same component built on the same parent key (the same place in the chain)
//! says what changed: the two layers' recorded inputs are compared
//! ([`LayerInputs::changes`]).

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use super::plan::{self, Plan, PlannedParent};
use crate::store::layers::{
    Damage, InputChange, LayerCache, LayerCacheError, LayerInputs, LayerRecord, Peeked,
};
use crate::store::{Store, base};

/// The chain's names for the two layers that are not a component's.
pub const BOOT: &str = "boot";
pub const GENERALIZE: &str = "generalize";

/// One layer of a plan's chain, with what went into its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// `boot`, the component's label, or `generalize`.
    pub name: String,
    pub key: String,
    /// The component's index in the plan; `None` for the boot and generalize layers.
    pub component: Option<usize>,
    pub inputs: LayerInputs,
}

/// The plan's layer chain: boot, each component, generalize.
pub fn chain(plan: &Plan) -> Vec<Layer> {
    let mut chain = vec![Layer {
        name: BOOT.into(),
        key: plan.root_layer_key(),
        component: None,
        inputs: plan.root_layer_inputs(),
    }];
    for (index, component) in plan.components.iter().enumerate() {
        let previous = chain[index].key.clone();
        chain.push(Layer {
            name: component.label().to_string(),
            key: component
                .layer_key
                .clone()
                .unwrap_or_else(|| plan::layer_key(&previous, component)),
            component: Some(index),
            inputs: plan::layer_inputs(&previous, component),
        });
    }
    let last = chain[chain.len() - 1].key.clone();
    chain.push(Layer {
        name: GENERALIZE.into(),
        key: generalize_key(&last, plan.generalize),
        component: None,
        inputs: LayerInputs {
            layer: GENERALIZE.into(),
            settings: [("generalize".to_string(), plan.generalize.to_string())].into(),
            previous: Some(last),
            ..LayerInputs::default()
        },
    });
    chain
}

/// The generalize layer's key: the last component's key and whether the recipe seals the
/// image.
fn generalize_key(previous: &str, seal: bool) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"generalize\n");
    hasher.update(previous.as_bytes());
    hasher.update(if seal { b"\nseal" } else { b"\nkeep" });
    hex::encode(hasher.finalize())
}

/// What a build would do with one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preview {
    /// `boot`, the component's label, or `generalize`.
    pub name: String,
    pub key: String,
    pub status: Status,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Taken from the cache (the build verifies its sha256 first).
    Cached(Box<LayerRecord>),
    Run(Why),
}

/// Why a layer runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// `--no-cache`.
    NoCache,
    /// The component's entry says `cache: false`.
    CacheOff,
    /// A layer below runs (named), so this one is written on new bytes.
    Earlier(String),
    /// No layer is cached at this place in the chain.
    NothingCached,
    /// A layer of the same component on the same parent key is cached, made by `build`,
    /// from other inputs: what changed (empty when that layer's record keeps no inputs).
    Changed {
        build: String,
        changes: Vec<InputChange>,
    },
    /// The cached layer is unusable: the build discards it and runs this one.
    Damaged(Damage),
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Why::NoCache => f.write_str("--no-cache"),
            Why::CacheOff => f.write_str("`cache: false` on this entry"),
            Why::Earlier(name) => write!(f, "an earlier layer runs ({name})"),
            Why::NothingCached => f.write_str("nothing cached for this chain yet"),
            Why::Changed { build, changes } if changes.is_empty() => write!(
                f,
                "the layer cached here (made by {build}) was built from other inputs"
            ),
            Why::Changed { build, changes } => {
                let changes: Vec<String> = changes.iter().map(ToString::to_string).collect();
                write!(f, "{} (since {build})", changes.join("; "))
            }
            Why::Damaged(damage) => write!(f, "the cached layer is damaged: {damage}"),
        }
    }
}

/// For each layer of `plan`'s chain, whether a build would take it from `cache` or run it,
/// and why. `no_cache`: `--no-cache` (nothing is read then).
pub fn preview(
    plan: &Plan,
    cache: &LayerCache,
    no_cache: bool,
) -> Result<Vec<Preview>, LayerCacheError> {
    let chain = chain(plan);
    let peeked = if no_cache {
        vec![Peeked::Missing; chain.len()]
    } else {
        let keys: Vec<String> = chain.iter().map(|l| l.key.clone()).collect();
        cache.peek(parent_image(plan, cache.store()).as_deref(), &keys)?
    };
    let mut out: Vec<Preview> = Vec::with_capacity(chain.len());
    let mut runs_from: Option<&str> = None;
    for (i, (layer, peeked)) in chain.iter().zip(peeked).enumerate() {
        let cache_off = layer
            .component
            .and_then(|c| plan.components.get(c))
            .is_some_and(|c| !c.cache);
        let why = if no_cache {
            Why::NoCache
        } else if let Some(earlier) = runs_from {
            Why::Earlier(earlier.to_string())
        } else if cache_off {
            Why::CacheOff
        } else {
            match peeked {
                Peeked::Cached(record) => {
                    out.push(Preview {
                        name: layer.name.clone(),
                        key: layer.key.clone(),
                        status: Status::Cached(Box::new(record)),
                    });
                    continue;
                }
                Peeked::Damaged(damage) => Why::Damaged(damage),
                Peeked::Missing => missing(plan, cache, &chain, i)?,
            }
        };
        runs_from.get_or_insert(&layer.name);
        out.push(Preview {
            name: layer.name.clone(),
            key: layer.key.clone(),
            status: Status::Run(why),
        });
    }
    Ok(out)
}

/// Why layer `i` is not cached: what differs from a cached layer at its place in the chain
/// (the same parent key; the same component; for the boot layer, one of this recipe's).
fn missing(
    plan: &Plan,
    cache: &LayerCache,
    chain: &[Layer],
    i: usize,
) -> Result<Why, LayerCacheError> {
    let layer = &chain[i];
    let parent = i.checked_sub(1).map(|p| chain[p].key.as_str());
    let ours = format!("{}/", plan.recipe.name);
    let sibling = cache
        .built_on(parent)?
        .into_iter()
        .find(|r| r.component == layer.name && (parent.is_some() || r.build.starts_with(&ours)));
    Ok(match sibling {
        None => Why::NothingCached,
        Some(record) => Why::Changed {
            changes: record
                .inputs
                .as_deref()
                .map(|before| layer.inputs.changes(before))
                .unwrap_or_default(),
            build: record.build,
        },
    })
}

/// The parent image file a build of `plan` would back its first layer with, when it is on
/// this machine already (a URL or OCI parent not downloaded yet: `None`).
fn parent_image(plan: &Plan, store: &Store) -> Option<PathBuf> {
    match &plan.parent {
        PlannedParent::File { local_path, .. } | PlannedParent::Store { local_path, .. } => {
            Some(local_path.clone())
        }
        PlannedParent::Url { sha256, .. } => store.cached_base(sha256.as_str()),
        PlannedParent::Oci {
            manifest_digest, ..
        } => {
            let memo = base::oci_manifest_memo(&store.base_dir(), manifest_digest.as_str());
            base::read_memo(&memo).and_then(|disk| store.cached_base(&disk))
        }
    }
}

/// `2026-12-07 01:02 UTC`.
pub fn when(time: DateTime<Utc>) -> String {
    time.format("%Y-%m-%d %H:%M UTC").to_string()
}
