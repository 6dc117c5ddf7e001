//! The store's configuration: `<store>/config.yml`, the one file in the store the user
//! writes (everything else there is builder's). Optional: without it every setting has its
//! default. Read with the project's YAML reader, so a mistake is reported at
//! `file:line:col`, unknown keys with a did-you-mean, as in a recipe. Owns reading the file;
//! it does not act on the settings (the layer cache's cap is applied by
//! [`Store::prune_layers_to_cap`]).
//!
//! ```yaml
//! layerCache:
//!   maxSize: 20GiB    # the default; a size (`500MiB`, `1TiB`, bytes), `unlimited`,
//!                     # or 0: keep no layer once the build that made it is done
//! packageUpdates:
//!   mirrors:          # what the host fetches instead of the URIs the images' sources use
//!     - from: http://deb.example.org/debian    # a URI prefix the images' sources use
//!       to: http://mirror.internal/debian       # http, https or file
//! ```

use std::path::{Path, PathBuf};

use super::Store;
use crate::diagnostic::{Diagnostics, did_you_mean_hint};
use crate::recipe::ByteSize;
use crate::yaml::Node;
use crate::yaml::reader::Reader;

/// The file's name in the store's folder.
pub const CONFIG_FILE: &str = "config.yml";

/// The noun used in diagnostics headings.
pub const NOUN: &str = "store configuration";

/// `layerCache.maxSize` when the file does not set it.
pub const DEFAULT_LAYER_CACHE_MAX_SIZE: ByteSize = ByteSize::gib(20);

/// `layerCache.maxSize: unlimited`.
pub const UNLIMITED: &str = "unlimited";

const TOP_KEYS: &[&str] = &["layerCache", "packageUpdates"];
const LAYER_CACHE_KEYS: &[&str] = &["maxSize"];
const PACKAGE_UPDATES_KEYS: &[&str] = &["mirrors"];
const MIRROR_KEYS: &[&str] = &["from", "to"];

/// The URI schemes the update check fetches from (a mirror's `to`; `from` may be anything the
/// images' sources write).
const MIRROR_SCHEMES: &[&str] = &["http", "https", "file"];

/// What `config.yml` says, defaults filled.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoreConfig {
    pub layer_cache: LayerCacheConfig,
    pub package_updates: PackageUpdatesConfig,
}

/// `packageUpdates:`: how the host checks an image's repositories for updates.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PackageUpdatesConfig {
    /// `mirrors`: URI prefixes of the images' sources rewritten before the host fetches
    /// (air-gapped sites, a local mirror, a guest-only address). In the file's order; the
    /// longest matching `from` wins. Default: none, the images' URIs as written.
    pub mirrors: Vec<Mirror>,
}

/// One `packageUpdates.mirrors` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    /// A URI prefix the images' sources use (`http://deb.debian.org/debian`), without a
    /// trailing `/`; it matches whole path segments only.
    pub from: String,
    /// What the host fetches instead (`http`, `https` or `file`), without a trailing `/`.
    pub to: String,
}

/// `layerCache:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerCacheConfig {
    /// `maxSize`: the cap the layer cache is pruned to (least recently used layers first)
    /// after every successful build and by `builder cache prune`. `None`: `unlimited`, never
    /// pruned by size. 0 keeps no layer once the build that made it is done. Default 20 GiB.
    pub max_size: Option<ByteSize>,
}

impl Default for LayerCacheConfig {
    fn default() -> Self {
        LayerCacheConfig {
            max_size: Some(DEFAULT_LAYER_CACHE_MAX_SIZE),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but could not be read; fs-err's error names it.
    #[error(transparent)]
    Io(std::io::Error),
    /// Every problem of the file. Shown as one line per problem (`path:line:col: error: …`,
    /// for logs and warnings); commands render the diagnostics themselves.
    #[error("{}", .0.lines().join("\n"))]
    Invalid(Diagnostics),
}

impl Store {
    /// `<store>/config.yml`.
    pub fn config_path(&self) -> PathBuf {
        self.root.join(CONFIG_FILE)
    }

    /// The store's configuration: the defaults when `config.yml` does not exist.
    pub fn config(&self) -> Result<StoreConfig, ConfigError> {
        let path = self.config_path();
        match fs_err::read_to_string(&path) {
            Ok(text) => parse(&path, &text).map_err(ConfigError::Invalid),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StoreConfig::default()),
            Err(e) => Err(ConfigError::Io(e)),
        }
    }
}

/// Read `text` as the configuration file at `path` (pure): every problem, or the settings.
/// An empty file (or one holding only comments) is the defaults.
pub fn parse(path: &Path, text: &str) -> Result<StoreConfig, Diagnostics> {
    let mut diagnostics = Diagnostics::new(path, text, NOUN);
    let (root, problems) = crate::yaml::parse(text);
    diagnostics.extend(problems);
    let mut cx = Reader::new(text, &[]);
    let mut config = StoreConfig::default();
    if let Some(root) = root.filter(|r| !r.is_null())
        && let Some(entries) = cx.mapping(&root, "the store configuration", TOP_KEYS)
    {
        for (key, value) in entries {
            match key.as_str() {
                Some("layerCache") => layer_cache(&mut cx, value, &mut config.layer_cache),
                Some("packageUpdates") => {
                    package_updates(&mut cx, value, &mut config.package_updates);
                }
                _ => {}
            }
        }
    }
    diagnostics.extend(cx.problems);
    if diagnostics.has_errors() {
        diagnostics.sort();
        return Err(diagnostics);
    }
    Ok(config)
}

fn layer_cache(cx: &mut Reader<'_>, node: &Node, out: &mut LayerCacheConfig) {
    if node.is_null() {
        return;
    }
    let Some(entries) = cx.mapping(node, "`layerCache`", LAYER_CACHE_KEYS) else {
        return;
    };
    for (key, value) in entries {
        if key.as_str() == Some("maxSize")
            && let Some(max) = max_size(cx, value)
        {
            out.max_size = max;
        }
    }
}

fn package_updates(cx: &mut Reader<'_>, node: &Node, out: &mut PackageUpdatesConfig) {
    if node.is_null() {
        return;
    }
    let Some(entries) = cx.mapping(node, "`packageUpdates`", PACKAGE_UPDATES_KEYS) else {
        return;
    };
    for (key, value) in entries {
        if key.as_str() != Some("mirrors") || value.is_null() {
            continue;
        }
        let Some(items) = value.as_sequence() else {
            cx.not_a(value, "`packageUpdates.mirrors`", "a list");
            continue;
        };
        for item in items {
            if let Some(m) = mirror(cx, item) {
                out.mirrors.push(m);
            }
        }
    }
}

/// One `{from, to}` entry: both present, URIs with a scheme (`to` one the host fetches).
fn mirror(cx: &mut Reader<'_>, node: &Node) -> Option<Mirror> {
    const WHAT: &str = "a `packageUpdates.mirrors` entry";
    let entries = cx.mapping(node, WHAT, MIRROR_KEYS)?;
    let (mut from, mut to) = (None, None);
    for (key, value) in entries {
        match key.as_str() {
            Some("from") => from = mirror_uri(cx, value, "from", None),
            Some("to") => to = mirror_uri(cx, value, "to", Some(MIRROR_SCHEMES)),
            _ => {}
        }
    }
    for (name, found) in [("from", from.is_some()), ("to", to.is_some())] {
        if !found && node.get(name).is_none() {
            cx.error(
                cx.start_of(node),
                format!("{WHAT} has no `{name}`"),
                Some("write both: `{from: http://deb.example.org/debian, to: http://mirror.internal/debian}`".into()),
            );
        }
    }
    Some(Mirror {
        from: from?,
        to: to?,
    })
}

/// A URI `scheme://…` (the scheme in `schemes` when given), its trailing `/` dropped.
fn mirror_uri(
    cx: &mut Reader<'_>,
    node: &Node,
    key: &str,
    schemes: Option<&[&str]>,
) -> Option<String> {
    let what = format!("`packageUpdates.mirrors[].{key}`");
    let text = cx.string(node, &what)?;
    let scheme = text.split_once("://").map(|(s, _)| s).filter(|s| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    });
    let Some(scheme) = scheme else {
        cx.error(
            node.span,
            format!("{what} must be a URI such as `http://mirror.internal/debian`; found `{text}`"),
            None,
        );
        return None;
    };
    if let Some(schemes) = schemes
        && !schemes.contains(&scheme)
    {
        cx.error(
            node.span,
            format!(
                "{what}: the host cannot fetch `{scheme}` URIs; expected {}",
                crate::diagnostic::one_of(schemes)
            ),
            did_you_mean_hint(scheme, schemes.iter().copied()),
        );
        return None;
    }
    Some(text.trim_end_matches('/').to_string())
}

/// `maxSize`: a size or `unlimited` (`Some(None)`).
fn max_size(cx: &mut Reader<'_>, node: &Node) -> Option<Option<ByteSize>> {
    const WHAT: &str = "`layerCache.maxSize`";
    let text = node.as_str().unwrap_or_default();
    if text == UNLIMITED {
        return Some(None);
    }
    // A word, not a size: the size parser's "not a number" would not say `unlimited`.
    if !node.is_null() && node.as_scalar().is_some() && !text.bytes().any(|b| b.is_ascii_digit()) {
        cx.error(
            node.span,
            format!("{WHAT} must be a size such as `20GiB` or `500MiB`, or `{UNLIMITED}`; found `{text}`"),
            did_you_mean_hint(text, [UNLIMITED]),
        );
        return None;
    }
    ByteSize::read(cx, node, WHAT).map(Some)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is the point
mod tests {
    use super::*;

    fn read(text: &str) -> Result<StoreConfig, Diagnostics> {
        parse(Path::new("/s/config.yml"), text)
    }

    fn max(text: &str) -> Option<ByteSize> {
        read(text).unwrap().layer_cache.max_size
    }

    #[test]
    fn sizes_unlimited_and_defaults() {
        assert_eq!(max("layerCache: {maxSize: 5GiB}"), Some(ByteSize::gib(5)));
        assert_eq!(max("layerCache:\n  maxSize: 0\n"), Some(ByteSize::b(0)));
        assert_eq!(
            max("layerCache: {maxSize: 1048576}"),
            Some(ByteSize::mib(1))
        );
        assert_eq!(max("layerCache: {maxSize: unlimited}"), None);
        for empty in ["", "# nothing yet\n", "layerCache:\n", "layerCache: {}\n"] {
            assert_eq!(max(empty), Some(DEFAULT_LAYER_CACHE_MAX_SIZE), "{empty:?}");
        }
    }

    #[test]
    fn every_mistake_is_reported_where_it_is() {
        let d = read("layerCach: {}\nlayerCache:\n  maxSize: 20GB\n  maxSise: 1G\n").unwrap_err();
        let lines = d.lines();
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert_eq!(
            lines[0],
            "/s/config.yml:1:1: error: unknown key `layerCach` in the store configuration \
             (hint: did you mean `layerCache`?)"
        );
        assert!(lines[1].starts_with("/s/config.yml:3:12: error: `layerCache.maxSize`: unit `GB`"));
        assert!(
            lines[2].contains("4:3: error: unknown key `maxSise`"),
            "{}",
            lines[2]
        );

        let d = read("layerCache: {maxSize: unlimted}").unwrap_err();
        assert_eq!(
            d.problems()[0].hint.as_deref(),
            Some("did you mean `unlimited`?")
        );
        let d = read("layerCache: {maxSize: [1]}").unwrap_err();
        assert!(d.problems()[0].message.contains("found a list"), "{d}");
        let d = read("layerCache: 20GiB").unwrap_err();
        assert!(d.problems()[0].message.contains("must be a mapping"), "{d}");
        let d = read("layerCache: {maxSize: 1.5GiB}").unwrap_err();
        assert!(
            d.problems()[0].hint.as_deref().unwrap().contains("1536MiB"),
            "{d}"
        );
        assert!(read("layerCache: [").is_err());
    }

    #[test]
    fn mirrors_in_order_without_trailing_slashes() {
        let config = read(
            "packageUpdates:\n  mirrors:\n    - from: http://deb.example.org/debian/\n      to: file:///srv/mirror/debian\n    - {from: 'http://10.0.2.2:8080', to: 'http://127.0.0.1:8080'}\n",
        )
        .unwrap();
        assert_eq!(
            config.package_updates.mirrors,
            [
                Mirror {
                    from: "http://deb.example.org/debian".into(),
                    to: "file:///srv/mirror/debian".into()
                },
                Mirror {
                    from: "http://10.0.2.2:8080".into(),
                    to: "http://127.0.0.1:8080".into()
                }
            ]
        );
        for empty in ["", "packageUpdates:\n", "packageUpdates: {mirrors: []}\n"] {
            assert_eq!(
                read(empty).unwrap().package_updates.mirrors,
                [],
                "{empty:?}"
            );
        }
    }

    #[test]
    fn mirror_mistakes_are_reported_where_they_are() {
        let d = read(
            "packageUpdates:\n  mirrors:\n    - from: deb.example.org\n      to: ftp://m/debian\n    - {form: 'http://a', to: 'http://b'}\n  mirror: []\n",
        )
        .unwrap_err();
        let lines = d.lines();
        assert_eq!(lines.len(), 5, "{lines:#?}");
        assert_eq!(
            lines[0],
            "/s/config.yml:3:13: error: `packageUpdates.mirrors[].from` must be a URI such as \
             `http://mirror.internal/debian`; found `deb.example.org`"
        );
        assert!(
            lines[1].starts_with(
                "/s/config.yml:4:11: error: `packageUpdates.mirrors[].to`: the host cannot fetch `ftp` URIs"
            ),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].starts_with(
                "/s/config.yml:5:7: error: a `packageUpdates.mirrors` entry has no `from`"
            ),
            "{}",
            lines[2]
        );
        assert!(
            lines[3].starts_with("/s/config.yml:5:8: error: unknown key `form`"),
            "{}",
            lines[3]
        );
        assert!(
            lines[4]
                .starts_with("/s/config.yml:6:3: error: unknown key `mirror` in `packageUpdates`"),
            "{}",
            lines[4]
        );
        let d = read("packageUpdates: {mirrors: http://a}").unwrap_err();
        assert!(d.problems()[0].message.contains("must be a list"), "{d}");
    }
}
