//! `builder cache list|prune`: the layer cache (`<store>/cache/layers/`, see
//! `builder::store::layers`): what is cached and how much room it takes, and pruning it, to
//! the cap of the store's `config.yml` or as the options say. Also the prune every
//! successful build ends with. stdout carries data (the table, `--json`); messages go to
//! stderr.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anstream::eprintln;
use clap::{Args, Subcommand};
use serde::Serialize;

use super::images::store_failure;
use super::{CliResult, EXIT_INPUT, Failure};
use builder::pipeline::parse::{DURATION_HINT, parse_duration};
use builder::recipe::ByteSize;
use builder::store::layers::{LayerPruneReport, LayerRecord, PruneOptions};
use builder::store::{ConfigError, LayerCacheError, Store, human_size};

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// List the cached layers, most recently used first: KEY COMPONENT SIZE CREATED LAST-USED
    /// BUILD PARENT; their count, total size and the cache's cap on stderr.
    List(ListArgs),
    /// Remove cached layers, least recently used first (a layer goes before the layer it is
    /// built on), never one a running build uses, and the leftovers of interrupted inserts.
    /// Without an option: until the cache fits its cap (`layerCache.maxSize` in the store's
    /// config.yml, 20GiB when unset).
    Prune(PruneArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print a JSON object on stdout instead of a table: the layers (full keys), count, bytes,
    /// the cap.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Remove least recently used layers until the cache holds at most SIZE (`20GiB`,
    /// `500MiB`, bytes), instead of the cap.
    #[arg(long, value_name = "SIZE", value_parser = parse_max_size)]
    max_size: Option<ByteSize>,
    /// Remove layers not used for DURATION (`30d`, `12h`, `2w`, `90m`).
    #[arg(long, value_name = "DURATION", value_parser = parse_older_than)]
    older_than: Option<Duration>,
    /// Remove every layer no running build uses.
    #[arg(long)]
    all: bool,
    /// Print what was removed as a JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// `--max-size`: what is wrong and how to write it.
fn parse_max_size(text: &str) -> Result<ByteSize, String> {
    text.parse::<ByteSize>().map_err(|e| {
        let hint = e.hint().map(|h| format!("; {h}")).unwrap_or_default();
        format!("{e}{hint} (for example `--max-size 20GiB`)")
    })
}

/// `--older-than`: the pipelines' durations (`lifecycle.maxAge`).
fn parse_older_than(text: &str) -> Result<Duration, String> {
    parse_duration(text).ok_or_else(|| {
        format!("`{text}` is not a duration; {DURATION_HINT} (for example `--older-than 30d`)")
    })
}

pub async fn main(command: CacheCommand) -> CliResult {
    let (store, _abandoned) = super::open_store(None)?;
    match command {
        CacheCommand::List(args) => list(&store, &args),
        CacheCommand::Prune(args) => prune(&store, &args),
    }
}

/// A layer cache error as the commands that ask for it fail: an invalid `config.yml` is
/// rendered (exit 2), anything else is the host's (exit 3: a disk, a permission).
pub(super) fn failure(e: LayerCacheError) -> Failure {
    match e {
        LayerCacheError::Config(ConfigError::Invalid(d)) => {
            super::recipe::show(&[d.with_consequence("nothing was pruned")]);
            Failure::already_printed(EXIT_INPUT)
        }
        LayerCacheError::Store(e) => store_failure(e),
        e => Failure::host(e),
    }
}

/// `builder cache list --json`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListJson<'a> {
    dir: &'a Path,
    /// Most recently used first.
    layers: &'a [LayerRecord],
    count: usize,
    /// Bytes the layers hold.
    bytes: u64,
    /// The cap in bytes; `null`: unlimited. Absent when the store's config.yml is invalid.
    #[serde(skip_serializing_if = "Option::is_none")]
    max_size: Option<Option<u64>>,
}

fn list(store: &Store, args: &ListArgs) -> CliResult {
    let cache = store.layers().map_err(store_failure)?;
    let layers = cache.list().map_err(failure)?;
    let cap = match store.config() {
        Ok(config) => Some(config.layer_cache.max_size),
        // The listing goes on: it does not need the cap.
        Err(e) => {
            eprintln!(
                "warning: the cache's cap is unknown: {}",
                builder::diagnostic::error_chain(&e)
            );
            None
        }
    };
    let bytes: u64 = layers.iter().map(|l| l.size).sum();
    if args.json {
        super::print_json(&ListJson {
            dir: cache.dir(),
            layers: &layers,
            count: layers.len(),
            bytes,
            max_size: cap.map(|c| c.map(ByteSize::bytes)),
        });
        return Ok(0);
    }
    let cap = match cap {
        Some(Some(max)) => format!("cap {max}"),
        Some(None) => "no cap (unlimited)".to_string(),
        None => "cap unknown (config.yml is invalid)".to_string(),
    };
    if layers.is_empty() {
        eprintln!("no cached layers in {}; {cap}", cache.dir().display());
        return Ok(0);
    }
    let when = |t: &chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M").to_string();
    let rows: Vec<[String; 7]> = layers
        .iter()
        .map(|l| {
            [
                short(&l.key).to_string(),
                l.component.clone(),
                human_size(l.size),
                when(&l.created),
                when(&l.last_used),
                l.build.clone(),
                l.parent.as_deref().map_or("-", short).to_string(),
            ]
        })
        .collect();
    let header = [
        "KEY",
        "COMPONENT",
        "SIZE",
        "CREATED",
        "LAST-USED",
        "BUILD",
        "PARENT",
    ];
    let _ = write!(
        std::io::stdout().lock(),
        "{}",
        super::table("", header, &rows)
    );
    eprintln!(
        "{} {}, {}; {cap}",
        layers.len(),
        if layers.len() == 1 { "layer" } else { "layers" },
        human_size(bytes)
    );
    Ok(0)
}

/// A key as text output shows it (the build's output too): its first 12 hex digits.
fn short(key: &str) -> &str {
    key.get(..12).unwrap_or(key)
}

/// `builder cache prune --json`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PruneJson<'a> {
    /// Layers removed, in the order they were.
    removed: &'a [LayerRecord],
    freed_bytes: u64,
    /// Keys of the layers a running build uses (kept, with the layers below them).
    in_use: &'a [String],
    /// Leftovers removed: temporary files, files without a record and the reverse, layers
    /// whose parent was gone.
    leftovers: &'a [std::path::PathBuf],
    /// The cap pruned to, in bytes (`null`: none: other options, or `unlimited`).
    max_size: Option<u64>,
}

fn prune(store: &Store, args: &PruneArgs) -> CliResult {
    let cache = store.layers().map_err(store_failure)?;
    let (report, max_size) = if args.max_size.is_none() && args.older_than.is_none() && !args.all {
        let pruned = store.prune_layers_to_cap().map_err(failure)?;
        (pruned.report, pruned.max_size)
    } else {
        let options = PruneOptions {
            max_size: args.max_size.map(ByteSize::bytes),
            older_than: args.older_than,
            all: args.all,
        };
        (cache.prune(&options).map_err(failure)?, args.max_size)
    };
    if args.json {
        super::print_json(&PruneJson {
            removed: &report.removed,
            freed_bytes: report.freed_bytes,
            in_use: &report.in_use,
            leftovers: &report.leftovers,
            max_size: max_size.map(ByteSize::bytes),
        });
    } else {
        print_pruned(&report);
    }
    let left = cache.list().map_err(failure)?;
    let bytes: u64 = left.iter().map(|l| l.size).sum();
    let cap = max_size.map(|m| format!("; cap {m}")).unwrap_or_default();
    eprintln!(
        "freed {}; the cache holds {} {} ({}){cap}",
        human_size(report.freed_bytes),
        left.len(),
        if left.len() == 1 { "layer" } else { "layers" },
        human_size(bytes),
    );
    Ok(0)
}

/// What a prune removed and kept, one line each, on stderr.
pub(super) fn print_pruned(report: &LayerPruneReport) {
    for l in &report.removed {
        eprintln!(
            "removed cached layer {} ({}, {}, last used {}, made by {})",
            short(&l.key),
            l.component,
            human_size(l.size),
            l.last_used.format("%Y-%m-%d %H:%M"),
            l.build
        );
    }
    for key in &report.in_use {
        eprintln!(
            "kept cached layer {} and the layers below it: a running build uses it",
            short(key)
        );
    }
    for path in &report.leftovers {
        eprintln!("removed leftover {}", path.display());
    }
}

/// After a successful build: prune the layer cache to its cap, one line when that removed
/// something; a warning when it could not (the build itself stands).
pub(super) fn prune_after_build(store: &Store) {
    match store.prune_layers_to_cap() {
        Ok(pruned) => {
            if let Some(line) = pruned.summary() {
                eprintln!("{line}");
            }
        }
        Err(e) => eprintln!(
            "warning: the layer cache was not pruned to its cap: {}",
            builder::diagnostic::error_chain(&e)
        ),
    }
}
