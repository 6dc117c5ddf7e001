//! Parent images: downloaded into the cache by digest (streamed, resumed with HTTP Range,
//! retried with backoff, verified before they get their final name), or local files hashed
//! in place. A local file's digest is remembered by (path, size, mtime, inode) in
//! `cache/hashes.json`, so a 1 GiB base is hashed once, not at every build; a file that
//! changes gets a new mtime or size and is hashed again.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Store, StoreError};
use crate::diagnostic::error_chain;

/// A parent image ready to use, and its verified digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseImage {
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
}

/// How hard [`Store::fetch_base`] tries.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Attempts in all, the first included. Default 5.
    pub attempts: u32,
    /// Wait before the second attempt; doubled each time. Default 1 s.
    pub first_backoff: Duration,
    /// Longest wait between attempts. Default 30 s.
    pub max_backoff: Duration,
    /// Give up on a connection that sends nothing for this long. Default 60 s.
    pub read_timeout: Duration,
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self {
            attempts: 5,
            first_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
        }
    }
}

/// Progress of a download, for a bar. Every method has an empty default.
pub trait DownloadProgress: Send + Sync {
    /// An attempt starts: `total` bytes if the server said, resuming at `offset`.
    fn started(&self, _total: Option<u64>, _offset: u64) {}
    /// `done` bytes are on disk.
    fn advanced(&self, _done: u64) {}
    /// An attempt failed; the next starts after `wait`.
    fn retrying(&self, _attempt: u32, _error: &str, _wait: Duration) {}
    /// The download is complete; its digest is being checked.
    fn verifying(&self) {}
}

/// Reports nothing.
pub struct NoDownloadProgress;
impl DownloadProgress for NoDownloadProgress {}

/// Why one attempt failed, and whether another may help.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("{0}")]
    Retry(String),
    #[error("{0}")]
    Fatal(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<std::io::Error> for AttemptError {
    fn from(e: std::io::Error) -> Self {
        AttemptError::Store(e.into())
    }
}

pub(super) fn check_digest(sha256: &str) -> Result<String, StoreError> {
    if sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(sha256.to_ascii_lowercase())
    } else {
        Err(StoreError::BadDigest {
            sha256: sha256.to_string(),
        })
    }
}

/// What a file in `cache/base/` is, by its name. Every name the cache uses is here, so
/// pruning knows each of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheFile {
    /// `<sha256>.qcow2`: a parent image, named by its digest.
    Disk(String),
    /// `<sha256>.part`, `layer-<sha256>.part`: a download in progress (it holds a flock on
    /// the file), or one cut short, resumed by the next.
    Part,
    /// `manifest-<sha256>.sha256`, `layer-<sha256>.sha256`: which disk an OCI manifest or a
    /// containerDisk layer held, remembered after a pull (see [`oci_manifest_memo`]).
    Memo,
}

impl CacheFile {
    pub fn parse(name: &str) -> Option<CacheFile> {
        let is_digest = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
        if let Some(sha) = name.strip_suffix(".qcow2") {
            return is_digest(sha).then(|| CacheFile::Disk(sha.to_ascii_lowercase()));
        }
        if name.ends_with(".part") {
            return Some(CacheFile::Part);
        }
        let memo = name.strip_suffix(".sha256").and_then(|n| {
            n.strip_prefix("manifest-")
                .or_else(|| n.strip_prefix("layer-"))
        });
        memo.is_some_and(is_digest).then_some(CacheFile::Memo)
    }
}

/// `<cache_dir>/manifest-<hex>.sha256`: the digest of the disk the OCI manifest with this
/// digest held, written after a pull. A manifest digest names its content for ever, so a
/// build pinned to it finds its parent in the cache without asking the registry, and pruning
/// keeps the disk a stored build's manifest digest stands for. `manifest_digest` may carry
/// the `sha256:` prefix.
pub fn oci_manifest_memo(cache_dir: &Path, manifest_digest: &str) -> PathBuf {
    let hex = manifest_digest
        .strip_prefix("sha256:")
        .unwrap_or(manifest_digest);
    cache_dir.join(format!("manifest-{hex}.sha256"))
}

/// `<cache_dir>/layer-<hex>.sha256`: the digest of the disk a containerDisk layer held.
pub fn oci_layer_memo(cache_dir: &Path, layer_hex: &str) -> PathBuf {
    cache_dir.join(format!("layer-{layer_hex}.sha256"))
}

/// The disk digest a memo names, if it is readable and a digest.
pub fn read_memo(path: &Path) -> Option<String> {
    let text = fs_err::read_to_string(path).ok()?;
    check_digest(text.trim()).ok()
}

/// Remember `sha256` in the memo at `path`. Best effort: losing it costs a download.
pub fn write_memo(path: &Path, sha256: &str) {
    let _ = super::write_atomic(path, format!("{sha256}\n").as_bytes());
}

/// The backing file a qcow2 image names in its header, if it names one (read from the header
/// itself: no process, no lock on the image).
pub fn qcow2_backing_file(path: &Path) -> Option<String> {
    let mut f = fs_err::File::open(path).ok()?;
    let mut header = [0u8; 20];
    f.read_exact(&mut header).ok()?;
    if header[..4] != *b"QFI\xfb" {
        return None;
    }
    let offset = u64::from_be_bytes(header[8..16].try_into().ok()?);
    let size = u32::from_be_bytes(header[16..20].try_into().ok()?);
    // qcow2 limits the name to 1023 bytes.
    if offset == 0 || size == 0 || size > 1023 {
        return None;
    }
    f.seek(SeekFrom::Start(offset)).ok()?;
    let mut name = vec![0u8; size as usize];
    f.read_exact(&mut name).ok()?;
    String::from_utf8(name).ok()
}

impl Store {
    /// `cache/base/`: parent images by digest (downloads and OCI pulls land here).
    pub fn base_dir(&self) -> PathBuf {
        self.root.join("cache").join("base")
    }

    /// The cached parent image with this digest, if it is in the cache.
    pub fn cached_base(&self, sha256: &str) -> Option<PathBuf> {
        let sha = check_digest(sha256).ok()?;
        let path = self.base_dir().join(format!("{sha}.qcow2"));
        path.is_file().then_some(path)
    }

    /// Download `url` into the cache as `cache/base/<sha256>.qcow2`, unless it is there
    /// already. The body streams into `<sha256>.part` (resumed with an HTTP Range request
    /// after a broken connection, here or in an earlier run); the digest is checked before
    /// the rename. A body with the wrong digest is deleted and fetched again from the start
    /// while attempts remain. Two builders fetching the same digest wait for each other.
    pub async fn fetch_base(
        &self,
        url: &str,
        sha256: &str,
        options: &FetchOptions,
        progress: &dyn DownloadProgress,
    ) -> Result<BaseImage, StoreError> {
        let sha = check_digest(sha256)?;
        let parsed =
            reqwest::Url::parse(url).map_err(|_| StoreError::BadUrl { url: url.into() })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(StoreError::BadUrl { url: url.into() });
        }
        let dest = self.base_dir().join(format!("{sha}.qcow2"));
        let part_path = self.base_dir().join(format!("{sha}.part"));
        if let Some(done) = existing(&dest, &sha)? {
            return Ok(done);
        }
        let part = fs_err::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&part_path)?;
        // One download per digest: another builder holding it finishes first.
        let part = blocking(move || part.lock().map(|()| part)).await??;
        if let Some(done) = existing(&dest, &sha)? {
            // Another builder finished it while we waited. If we opened the `.part` after
            // its rename, we created an empty one: remove it.
            if part.metadata().is_ok_and(|m| m.len() == 0) {
                let _ = fs_err::remove_file(&part_path);
            }
            return Ok(done);
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(options.read_timeout)
            .build()
            .map_err(|e| StoreError::Download {
                url: url.into(),
                attempts: 0,
                source: Box::new(e),
            })?;
        let attempts = options.attempts.max(1);
        let mut part = part;
        let mut last = None;
        for attempt in 1..=attempts {
            match download_once(&client, url, &mut part, progress).await {
                Ok(actual) if actual == sha => {
                    part.sync_all()?;
                    fs_err::rename(&part_path, &dest)?;
                    let size = fs_err::metadata(&dest)?.len();
                    return Ok(BaseImage {
                        path: dest,
                        sha256: sha,
                        size,
                    });
                }
                Ok(actual) => {
                    // The wrong bytes: resuming would keep them, so start over.
                    part.set_len(0)?;
                    last = Some(AttemptError::Store(StoreError::DigestMismatch {
                        what: url.to_string(),
                        expected: sha.clone(),
                        actual,
                    }));
                }
                Err(AttemptError::Retry(e)) => last = Some(AttemptError::Retry(e)),
                Err(e) => {
                    last = Some(e);
                    break;
                }
            }
            if attempt < attempts {
                let wait = options
                    .first_backoff
                    .saturating_mul(1 << (attempt - 1).min(16))
                    .min(options.max_backoff);
                let message = last.as_ref().map(ToString::to_string).unwrap_or_default();
                progress.retrying(attempt, &message, wait);
                tokio::time::sleep(wait).await;
            }
        }
        // A body with the wrong digest is worthless; a broken transfer is kept to resume.
        #[expect(
            clippy::expect_used,
            reason = "the attempt loop runs at least once and each failed attempt stores its error"
        )]
        let last = last.expect("at least one attempt ran");
        if matches!(last, AttemptError::Store(StoreError::DigestMismatch { .. })) {
            drop(part);
            let _ = fs_err::remove_file(&part_path);
        }
        Err(match last {
            AttemptError::Store(e @ StoreError::DigestMismatch { .. }) => e,
            other => StoreError::Download {
                url: url.into(),
                attempts,
                source: other.to_string().into(),
            },
        })
    }

    /// A parent image given as a local file: used in place (a build never writes to its
    /// parent; the overlay does), hashed once per (path, size, mtime, inode), and checked
    /// against `expected` when given.
    pub async fn import_base(
        &self,
        path: &Path,
        expected: Option<&str>,
    ) -> Result<BaseImage, StoreError> {
        let expected = expected.map(check_digest).transpose()?;
        let path = fs_err::canonicalize(path)?;
        let meta = fs_err::metadata(&path)?;
        if !meta.is_file() {
            return Err(StoreError::NotAFile {
                path,
                source: std::io::Error::other("not a file"),
            });
        }
        let key = hash_key(&path, &meta);
        let sha256 = match self.indexed_digest(&key)? {
            Some(s) => s,
            None => {
                // Hashed without the lock: other builders need not wait for a 1 GiB read.
                let p = path.clone();
                let s = blocking(move || hash_file(&p)).await??;
                self.index_digest(key.clone(), &s)?;
                s
            }
        };
        if let Some(expected) = expected
            && expected != sha256
        {
            return Err(StoreError::DigestMismatch {
                what: path.display().to_string(),
                expected,
                actual: sha256,
            });
        }
        Ok(BaseImage {
            path,
            sha256,
            size: key.size,
        })
    }

    /// The recorded digest of the local file at `path`, if the index has one for the file as
    /// it is now (same size, mtime and inode). Never hashes; `None` on any doubt.
    pub fn known_digest(&self, path: &Path) -> Option<String> {
        let path = fs_err::canonicalize(path).ok()?;
        let meta = fs_err::metadata(&path).ok()?;
        self.indexed_digest(&hash_key(&path, &meta)).ok().flatten()
    }

    /// Record a digest computed elsewhere (e.g. while planning) for the local file at `path`.
    /// Best effort: the index is only a cache.
    pub fn remember_digest(&self, path: &Path, sha256: &str) {
        let Ok(path) = fs_err::canonicalize(path) else {
            return;
        };
        let Ok(meta) = fs_err::metadata(&path) else {
            return;
        };
        let _ = self.index_digest(hash_key(&path, &meta), sha256);
    }

    fn indexed_digest(&self, key: &HashKey) -> Result<Option<String>, StoreError> {
        let _lock = self.lock()?;
        Ok(read_index(&self.hash_index_path())
            .entries
            .into_iter()
            .find(|e| e.key == *key)
            .map(|e| e.sha256))
    }

    fn index_digest(&self, key: HashKey, sha256: &str) -> Result<(), StoreError> {
        let index_path = self.hash_index_path();
        let _lock = self.lock()?;
        let mut index = read_index(&index_path);
        index.entries.retain(|e| e.key.path != key.path);
        index.entries.push(HashEntry {
            key,
            sha256: sha256.to_string(),
        });
        Ok(super::write_json(&index_path, &index)?)
    }

    /// Drop the digests of local files that are gone or changed since they were hashed
    /// (under the store lock, held by the caller). Best effort: the index is only a cache.
    pub(super) fn prune_hash_index_locked(&self) {
        let index_path = self.hash_index_path();
        let mut index = read_index(&index_path);
        let before = index.entries.len();
        index.entries.retain(|e| {
            let path = Path::new(&e.key.path);
            fs_err::metadata(path).is_ok_and(|meta| hash_key(path, &meta) == e.key)
        });
        if index.entries.len() != before {
            let _ = super::write_json(&index_path, &index);
        }
    }

    fn hash_index_path(&self) -> PathBuf {
        self.root.join("cache").join("hashes.json")
    }
}

/// The key the hash index keeps a local file under: it changes when the file does.
fn hash_key(path: &Path, meta: &std::fs::Metadata) -> HashKey {
    HashKey {
        path: path.to_string_lossy().into_owned(),
        size: meta.len(),
        mtime_ns: meta
            .mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(meta.mtime_nsec()),
        inode: meta.ino(),
    }
}

/// The cached file, if present. Its name is its digest, checked when it was stored.
fn existing(dest: &Path, sha: &str) -> Result<Option<BaseImage>, StoreError> {
    match fs_err::metadata(dest) {
        Ok(m) => Ok(Some(BaseImage {
            path: dest.to_path_buf(),
            sha256: sha.to_string(),
            size: m.len(),
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// One GET: resume after what `part` holds if the server allows it, append the body, and
/// return the digest of the whole file.
async fn download_once(
    client: &reqwest::Client,
    url: &str,
    part: &mut fs_err::File,
    progress: &dyn DownloadProgress,
) -> Result<String, AttemptError> {
    let mut offset = part.metadata()?.len();
    let mut request = client.get(url);
    if offset > 0 {
        request = request.header(reqwest::header::RANGE, format!("bytes={offset}-"));
    }
    let response = request
        .send()
        .await
        .map_err(|e| AttemptError::Retry(error_chain(&e)))?;
    let status = response.status();
    let total = match status.as_u16() {
        206 => {
            let range = response
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_content_range);
            match range {
                Some((start, total)) if start == offset => total,
                _ => {
                    // A range we did not ask for: start over rather than guess.
                    part.set_len(0)?;
                    return Err(AttemptError::Retry(
                        "the server answered a different range than asked".into(),
                    ));
                }
            }
        }
        200 => {
            // No resume from this server: the body is the whole file.
            offset = 0;
            part.set_len(0)?;
            response.content_length()
        }
        416 if offset > 0 => {
            // What we have is already the whole file (or more): let the digest decide.
            return hash_prefix(part, offset).await.map_err(Into::into);
        }
        408 | 429 | 500..=599 => {
            return Err(AttemptError::Retry(format!("the server answered {status}")));
        }
        _ => return Err(AttemptError::Fatal(format!("the server answered {status}"))),
    };
    progress.started(total, offset);
    let mut hasher = if offset > 0 {
        let mut h = Sha256::new();
        feed_prefix(part, offset, &mut h)?;
        h
    } else {
        Sha256::new()
    };
    part.seek(SeekFrom::Start(offset))?;
    let mut done = offset;
    let mut response = response;
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| AttemptError::Retry(error_chain(&e)))?
    {
        // Small synchronous writes: the page cache absorbs them; a blocking task per chunk
        // would cost more than it saves.
        part.write_all(&chunk)?;
        hasher.update(&chunk);
        done += chunk.len() as u64;
        progress.advanced(done);
    }
    if let Some(total) = total
        && done != total
    {
        return Err(AttemptError::Retry(format!(
            "the connection ended after {done} of {total} bytes"
        )));
    }
    progress.verifying();
    Ok(hex::encode(hasher.finalize()))
}

/// `bytes 100-199/200` → (100, Some(200)); `bytes 100-199/*` → (100, None).
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let total = if total == "*" {
        None
    } else {
        Some(total.parse().ok()?)
    };
    Some((start.parse().ok()?, total))
}

fn feed_prefix(part: &mut fs_err::File, len: u64, hasher: &mut Sha256) -> Result<(), StoreError> {
    part.seek(SeekFrom::Start(0))?;
    let mut reader = (&mut *part).take(len);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        hasher.update(&buf[..n]);
    }
}

async fn hash_prefix(part: &mut fs_err::File, len: u64) -> Result<String, StoreError> {
    let mut h = Sha256::new();
    feed_prefix(part, len, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

fn hash_file(path: &Path) -> Result<String, StoreError> {
    Ok(crate::digest::sha256_file(path, None)?.hex())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Task(e.to_string()))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HashKey {
    path: String,
    size: u64,
    mtime_ns: i64,
    inode: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct HashEntry {
    key: HashKey,
    sha256: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct HashIndex {
    entries: Vec<HashEntry>,
}

/// The index, or an empty one if it is missing or unreadable (it is only a cache).
fn read_index(path: &Path) -> HashIndex {
    fs_err::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges_parse() {
        assert_eq!(
            parse_content_range("bytes 100-199/200"),
            Some((100, Some(200)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }

    #[test]
    fn digests_are_checked_and_lowercased() {
        assert_eq!(check_digest(&"AB".repeat(32)).expect("ok"), "ab".repeat(32));
        assert!(check_digest("abc").is_err());
        assert!(check_digest(&"zz".repeat(32)).is_err());
    }
}
