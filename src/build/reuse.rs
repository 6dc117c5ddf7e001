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

use super::cache::{self, ChainLayer, RunReason};
use super::plan::{self, Plan, PlannedParent};
use crate::store::layers::{
    Damage, InputChange, LayerCache, LayerCacheError, LayerInputs, LayerRecord, Peeked,
};
use crate::store::{Store, base};

/// What went into the key of layer `index` of `plan`'s chain ([`cache::chain`]), for its
/// record and for comparing with a cached layer's: the boot layer's settings, a
/// component's document, parameters and reached documents, whether generalize seals.
pub fn inputs(plan: &Plan, chain: &[ChainLayer], index: usize) -> LayerInputs {
    let previous = index.checked_sub(1).map(|p| chain[p].key.clone());
    match (chain[index].component, &previous) {
        (Some(c), Some(previous)) => plan::layer_inputs(previous, &plan.components[c]),
        _ if index == 0 => plan.root_layer_inputs(),
        _ => LayerInputs {
            layer: chain[index].name.clone(),
            settings: [("generalize".to_string(), plan.generalize.to_string())].into(),
            previous,
            ..LayerInputs::default()
        },
    }
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
    /// Runs, for the reason the build gives ([`cache::run_reasons`]); a layer that is not
    /// cached says more ([`Missing`]).
    Run {
        reason: RunReason,
        missing: Option<Missing>,
    },
}

/// Why a layer the build may take from the cache is not there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
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

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Missing::NothingCached => f.write_str("nothing cached for this chain yet"),
            Missing::Changed { build, changes } if changes.is_empty() => write!(
                f,
                "the layer cached here (made by {build}) was built from other inputs"
            ),
            Missing::Changed { build, changes } => {
                let changes: Vec<String> = changes.iter().map(ToString::to_string).collect();
                write!(f, "{} (since {build})", changes.join("; "))
            }
            Missing::Damaged(damage) => write!(f, "the cached layer is damaged: {damage}"),
        }
    }
}

impl Status {
    /// Why it runs, in words; `None` when it is cached.
    pub fn why(&self) -> Option<String> {
        match self {
            Status::Cached(_) => None,
            Status::Run {
                missing: Some(missing),
                ..
            } => Some(missing.to_string()),
            Status::Run { reason, .. } => Some(reason.to_string()),
        }
    }
}

/// For each layer of `plan`'s chain, whether a build would take it from `cache` or run it,
/// and why: the build's own rules ([`cache::usable_prefix`], [`cache::run_reasons`]) on
/// what [`LayerCache::peek`] sees. `no_cache`: `--no-cache` (nothing is read then).
pub fn preview(
    plan: &Plan,
    cache: &LayerCache,
    no_cache: bool,
) -> Result<Vec<Preview>, LayerCacheError> {
    let chain = cache::chain(plan);
    let usable = cache::usable_prefix(plan, &chain, no_cache);
    let keys: Vec<String> = chain[..usable].iter().map(|l| l.key.clone()).collect();
    let peeked = cache.peek(parent_image(plan, cache.store()).as_deref(), &keys)?;
    let cached = peeked
        .iter()
        .position(|p| !matches!(p, Peeked::Cached(_)))
        .unwrap_or(peeked.len());
    let mut reasons = cache::run_reasons(plan, &chain, cached, no_cache).into_iter();
    let mut peeked = peeked.into_iter();
    let mut out = Vec::with_capacity(chain.len());
    for (i, layer) in chain.iter().enumerate() {
        let status = match peeked.next() {
            Some(Peeked::Cached(record)) if i < cached => Status::Cached(Box::new(record)),
            seen => {
                let reason = reasons.next().unwrap_or(RunReason::NotCached);
                let missing = match (&reason, seen) {
                    (RunReason::NotCached, Some(Peeked::Damaged(damage))) => {
                        Some(Missing::Damaged(damage))
                    }
                    (RunReason::NotCached, _) => Some(missing(plan, cache, &chain, i)?),
                    _ => None,
                };
                Status::Run { reason, missing }
            }
        };
        out.push(Preview {
            name: layer.name.clone(),
            key: layer.key.clone(),
            status,
        });
    }
    Ok(out)
}

/// Why layer `i` is not cached: what differs from a cached layer at its place in the chain
/// (the same parent key; the same component; for the boot layer, one of this recipe's).
fn missing(
    plan: &Plan,
    cache: &LayerCache,
    chain: &[ChainLayer],
    i: usize,
) -> Result<Missing, LayerCacheError> {
    let layer = &chain[i];
    let parent = i.checked_sub(1).map(|p| chain[p].key.as_str());
    let ours = format!("{}/", plan.recipe.name);
    let sibling = cache
        .built_on(parent)?
        .into_iter()
        .find(|r| r.component == layer.name && (parent.is_some() || r.build.starts_with(&ours)));
    Ok(match sibling {
        None => Missing::NothingCached,
        Some(record) => Missing::Changed {
            changes: record
                .inputs
                .as_deref()
                .map(|before| inputs(plan, chain, i).changes(before))
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
        // Container images have no layer chain of builder's.
        PlannedParent::Archive { .. } | PlannedParent::StoredContainer { .. } => None,
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
