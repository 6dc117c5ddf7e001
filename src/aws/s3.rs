//! S3: objects (get, put, list with a prefix), the bucket check before an upload, and a
//! multipart upload of a large file that can be resumed.
//!
//! Each part is sent with its SHA-256 twice: signed as `x-amz-content-sha256` (S3 and
//! S3-compatible servers such as s3s-fs reject a part whose body does not match it: this is
//! the check our tests exercise) and as `x-amz-checksum-sha256` (S3 stores it with the part,
//! verifies it, and lists it back, which resuming compares; the upload is created with
//! `x-amz-checksum-algorithm: SHA256` and completed with every part's checksum).
//!
//! Resume: a small JSON state file (in the caller's state folder, one per endpoint, bucket
//! and key) records the upload id and every finished part (size, sha256, ETag). A rerun with
//! the same file lists the upload's parts (ListParts) and sends only the ones that are
//! missing or differ. The upload is aborted (and its state removed) when the caller cancels
//! or S3 refuses something that another attempt cannot fix; after transient failures that
//! outlast the retries (network down, server errors) the state stays and the error says to
//! rerun. A file that changed since (another sha256) starts a new upload; the old one is
//! aborted. Uploads left by an interrupted run that is never rerun are removed by S3's
//! lifecycle rule for incomplete multipart uploads, if the bucket has one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::sync::CancellationToken;

use super::client::{
    self, Client, CredentialsRefused, Request, RequestError, RetryPolicy, Service, describe,
};
use super::credentials::AwsCredentials;
use super::xml;

/// S3's smallest part (except the last).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// S3's largest number of parts in one upload.
pub const MAX_PARTS: u64 = 10_000;
/// The default part size: 16 MiB (a 2 GiB disk is 128 parts).
pub const DEFAULT_PART_SIZE: u64 = 16 * 1024 * 1024;
/// The default number of parts in flight.
pub const DEFAULT_CONCURRENCY: usize = 4;

const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("the S3 endpoint `{endpoint}` is not an http:// or https:// URL")]
    BadEndpoint { endpoint: String },
    #[error(
        "the S3 bucket `{bucket}` does not exist at {endpoint}; create it (`aws s3 mb \
         s3://{bucket} --region {region}`) or name an existing one"
    )]
    NoSuchBucket {
        bucket: String,
        endpoint: String,
        region: String,
    },
    #[error(
        "the S3 bucket `{bucket}` is in region {actual}, not {expected}: VM Import reads only \
         from a bucket in the import's region; use region {actual} or a bucket in {expected}"
    )]
    WrongRegion {
        bucket: String,
        expected: String,
        actual: String,
    },
    #[error(transparent)]
    Credentials(Box<CredentialsRefused>),
    #[error(
        "access to the S3 bucket `{bucket}` was denied: the credentials need s3:ListBucket, \
         s3:PutObject and s3:AbortMultipartUpload on it (or the bucket belongs to another \
         account)"
    )]
    AccessDenied {
        bucket: String,
        #[source]
        source: RequestError,
    },
    #[error(
        "S3 answered 403 Forbidden for the bucket `{bucket}` without saying why: either the \
         credentials are wrong ({who}: check the secret access key) or they may not use the \
         bucket (they need s3:ListBucket, s3:PutObject and s3:AbortMultipartUpload on it)"
    )]
    Forbidden {
        bucket: String,
        who: String,
        #[source]
        source: RequestError,
    },
    #[error("{action} for s3://{bucket}/{key} failed")]
    Request {
        action: &'static str,
        bucket: String,
        key: String,
        #[source]
        source: RequestError,
    },
    #[error("the part size {part_size} is below S3's minimum of 5 MiB ({MIN_PART_SIZE} bytes)")]
    PartSize { part_size: u64 },
    #[error("{} is {size} bytes, more than one S3 object can hold (5 TiB)", path.display())]
    TooLarge { path: PathBuf, size: u64 },
    /// A file system call failed; fs-err's error names the path and what was being done.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Interrupted(Box<Interrupted>),
    #[error("the upload to s3://{bucket}/{key} was cancelled; its multipart upload was aborted")]
    Cancelled { bucket: String, key: String },
    #[error(
        "S3 holds {actual} bytes for s3://{bucket}/{key} after the upload, but {expected} were sent"
    )]
    SizeMismatch {
        bucket: String,
        key: String,
        expected: u64,
        actual: u64,
    },
    #[error("S3 answered {action} for s3://{bucket}/{key} without {missing}")]
    Incomplete {
        action: &'static str,
        bucket: String,
        key: String,
        missing: &'static str,
    },
    #[error("a part upload task stopped unexpectedly: {0}")]
    Task(String),
}

/// An upload stopped by failures that outlasted the retries; its state is kept.
#[derive(Debug, thiserror::Error)]
#[error(
    "the upload of {} to s3://{bucket}/{key} stopped after {done} of {total} parts; run the \
     same command again to resume it (state in {})",
    path.display(), state.display()
)]
pub struct Interrupted {
    pub path: PathBuf,
    pub bucket: String,
    pub key: String,
    pub done: usize,
    pub total: usize,
    pub state: PathBuf,
    #[source]
    pub source: RequestError,
}

/// Where S3 requests go: AWS itself (virtual-hosted buckets) or an S3-compatible endpoint,
/// addressed path-style (`<endpoint>/<bucket>/<key>`), as such servers expect.
#[derive(Debug, Clone)]
pub struct S3Client {
    client: Client,
}

/// A part S3 already has, from ListParts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedPart {
    pub number: u32,
    pub size: u64,
    pub etag: Option<String>,
    pub checksum_sha256: Option<String>,
}

impl S3Client {
    /// `endpoint`: an S3-compatible service (`http://127.0.0.1:9000`); `None` for AWS.
    /// Without credentials requests go unsigned.
    pub fn new(
        http: reqwest::Client,
        credentials: impl Into<Option<AwsCredentials>>,
        region: &str,
        endpoint: Option<&str>,
        retry: RetryPolicy,
    ) -> Result<S3Client, S3Error> {
        let client = Client::new(
            http,
            credentials.into(),
            region,
            Service::S3,
            endpoint,
            retry,
        )
        .map_err(|endpoint| S3Error::BadEndpoint { endpoint })?;
        Ok(S3Client { client })
    }

    pub fn endpoint(&self) -> &str {
        &self.client.endpoint
    }

    pub fn region(&self) -> &str {
        &self.client.region
    }

    fn bucket_url(&self, bucket: &str) -> String {
        match &self.client.custom {
            Some(base) => format!("{base}/{}", client::encode(bucket)),
            // Dotted names do not match S3's wildcard certificate: path-style for those.
            None if bucket.contains('.') => {
                format!("https://s3.{}.amazonaws.com/{bucket}", self.client.region)
            }
            None => format!("https://{bucket}.s3.{}.amazonaws.com", self.client.region),
        }
    }

    fn object_url(&self, bucket: &str, key: &str) -> String {
        format!("{}/{}", self.bucket_url(bucket), client::encode_path(key))
    }

    /// The object's URL for a call on the multipart upload `upload_id`; `query` (empty or
    /// ending in `&`) goes before `uploadId`, keeping the parameters in sorted order.
    fn upload_url(&self, bucket: &str, key: &str, query: &str, upload_id: &str) -> String {
        let object = self.object_url(bucket, key);
        format!("{object}?{query}uploadId={}", client::encode(upload_id))
    }

    fn request_error(
        &self,
        action: &'static str,
        bucket: &str,
        key: &str,
        e: RequestError,
    ) -> S3Error {
        if e.is_credentials() {
            return S3Error::Credentials(self.client.refused(e));
        }
        match e.code() {
            Some("NoSuchBucket") => S3Error::NoSuchBucket {
                bucket: bucket.to_string(),
                endpoint: self.client.endpoint.clone(),
                region: self.client.region.clone(),
            },
            Some("AccessDenied") => S3Error::AccessDenied {
                bucket: bucket.to_string(),
                source: e,
            },
            _ => S3Error::Request {
                action,
                bucket: bucket.to_string(),
                key: key.to_string(),
                source: e,
            },
        }
    }

    /// GetObject, up to the answer's headers: the body is the caller's to stream. One
    /// attempt: the caller retries (a broken stream needs a new request anyway).
    pub async fn get_object(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<reqwest::Response, RequestError> {
        let request = Request::bare("GET", self.object_url(bucket, key));
        self.client.start(&request).await
    }

    /// PutObject of `data` (in memory: [`upload_multipart`] is for large files).
    pub async fn put_object(
        &self,
        bucket: &str,
        key: &str,
        data: Vec<u8>,
    ) -> Result<(), RequestError> {
        let request = Request {
            method: "PUT",
            url: self.object_url(bucket, key),
            headers: vec![("content-type".into(), "application/octet-stream".into())],
            body: data,
        };
        self.client.send(&request).await.map(drop)
    }

    /// ListObjectsV2: the keys under `prefix`, at most `max_keys` of them (one page).
    pub async fn list_objects(
        &self,
        bucket: &str,
        prefix: &str,
        max_keys: usize,
    ) -> Result<Vec<String>, RequestError> {
        let url = format!(
            "{}/?list-type=2&max-keys={max_keys}&prefix={}",
            self.bucket_url(bucket),
            client::encode(prefix)
        );
        let root = self.client.send_xml(&Request::bare("GET", url)).await?;
        Ok(root
            .children_named("Contents")
            .filter_map(|c| c.text_at(&["Key"]))
            .collect())
    }

    /// HeadBucket: the bucket exists, these credentials may use it, and it is in our region.
    pub async fn head_bucket(&self, bucket: &str) -> Result<(), S3Error> {
        let request = Request::bare("HEAD", format!("{}/", self.bucket_url(bucket)));
        let result = self.client.send(&request).await;
        // AWS names the bucket's region, also on a refusal caused by signing for another one
        // (301 PermanentRedirect, 400 AuthorizationHeaderMalformed; no body on HEAD).
        let actual = match &result {
            Ok(response) => response.header("x-amz-bucket-region"),
            Err(RequestError::Service(f)) => f.bucket_region.clone(),
            Err(_) => None,
        };
        if let Some(actual) = actual
            && self.client.custom.is_none()
            && actual != self.client.region
        {
            return Err(S3Error::WrongRegion {
                bucket: bucket.to_string(),
                expected: self.client.region.clone(),
                actual,
            });
        }
        match result {
            Ok(_) => Ok(()),
            Err(e) if e.status() == Some(404) => Err(S3Error::NoSuchBucket {
                bucket: bucket.to_string(),
                endpoint: self.client.endpoint.clone(),
                region: self.client.region.clone(),
            }),
            Err(e) if e.status() == Some(403) && e.code().is_none() => Err(S3Error::Forbidden {
                bucket: bucket.to_string(),
                who: describe(self.client.credentials()),
                source: e,
            }),
            Err(e) => Err(self.request_error("HeadBucket", bucket, "", e)),
        }
    }

    /// HeadObject: the object's size, `None` when there is no such object.
    pub async fn head_object(&self, bucket: &str, key: &str) -> Result<Option<u64>, S3Error> {
        let request = Request::bare("HEAD", self.object_url(bucket, key));
        match self.client.send(&request).await {
            Ok(response) => Ok(response
                .header("content-length")
                .and_then(|v| v.parse().ok())),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(self.request_error("HeadObject", bucket, key, e)),
        }
    }

    /// CreateMultipartUpload (with SHA-256 part checksums); returns the upload id.
    pub async fn create_multipart_upload(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<String, S3Error> {
        let request = Request {
            method: "POST",
            // `uploads=` rather than `uploads`: some servers sign the bare form differently.
            url: format!("{}?uploads=", self.object_url(bucket, key)),
            headers: vec![
                ("x-amz-checksum-algorithm".into(), "SHA256".into()),
                ("content-type".into(), "application/octet-stream".into()),
            ],
            body: vec![],
        };
        let action = "CreateMultipartUpload";
        let failed = |e| self.request_error(action, bucket, key, e);
        let root = self.client.send_xml(&request).await.map_err(failed)?;
        root.text_at(&["UploadId"])
            .ok_or_else(|| incomplete(action, bucket, key, "an UploadId"))
    }

    /// UploadPart; returns the part's ETag as S3 sent it.
    pub async fn upload_part(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
        number: u32,
        data: Vec<u8>,
        sha256: &[u8],
    ) -> Result<String, S3Error> {
        let request = Request {
            method: "PUT",
            url: self.upload_url(bucket, key, &format!("partNumber={number}&"), upload_id),
            headers: vec![(
                "x-amz-checksum-sha256".into(),
                base64::engine::general_purpose::STANDARD.encode(sha256),
            )],
            body: data,
        };
        let action = "UploadPart";
        let failed = |e| self.request_error(action, bucket, key, e);
        let response = self.client.send(&request).await.map_err(failed)?;
        response
            .header("etag")
            .ok_or_else(|| incomplete(action, bucket, key, "an ETag"))
    }

    /// ListParts, every page. `Ok(None)` when the upload no longer exists.
    pub async fn list_parts(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
    ) -> Result<Option<Vec<ListedPart>>, S3Error> {
        let action = "ListParts";
        let mut parts = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let query = match &marker {
                Some(m) => format!("max-parts=1000&part-number-marker={}&", client::encode(m)),
                None => "max-parts=1000&".to_string(),
            };
            let request = Request::bare("GET", self.upload_url(bucket, key, &query, upload_id));
            let response = match self.client.send(&request).await {
                Ok(r) => r,
                Err(e) if e.code() == Some("NoSuchUpload") || e.status() == Some(404) => {
                    return Ok(None);
                }
                Err(e) => return Err(self.request_error(action, bucket, key, e)),
            };
            let root = response
                .xml(Service::S3, &self.client.endpoint)
                .map_err(|e| self.request_error(action, bucket, key, e))?;
            for part in root.children_named("Part") {
                let number = part.text_at(&["PartNumber"]).and_then(|n| n.parse().ok());
                let size = part.text_at(&["Size"]).and_then(|n| n.parse().ok());
                if let (Some(number), Some(size)) = (number, size) {
                    parts.push(ListedPart {
                        number,
                        size,
                        etag: part.text_at(&["ETag"]),
                        checksum_sha256: part.text_at(&["ChecksumSHA256"]),
                    });
                }
            }
            let truncated = root.text_at(&["IsTruncated"]).as_deref() == Some("true");
            let next = root.text_at(&["NextPartNumberMarker"]);
            match next {
                Some(next) if truncated && marker.as_ref() != Some(&next) => marker = Some(next),
                _ => break,
            }
        }
        parts.sort_by_key(|p| p.number);
        Ok(Some(parts))
    }

    /// CompleteMultipartUpload with every part in order; returns the object's ETag.
    pub async fn complete_multipart_upload(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
        parts: &BTreeMap<u32, PartRecord>,
    ) -> Result<String, S3Error> {
        let mut body = String::from("<CompleteMultipartUpload>");
        for (number, part) in parts {
            body.push_str(&format!(
                "<Part><PartNumber>{number}</PartNumber><ETag>{}</ETag><ChecksumSHA256>{}</ChecksumSHA256></Part>",
                xml::escape(&part.etag),
                base64::engine::general_purpose::STANDARD.encode(
                    hex::decode(&part.sha256).unwrap_or_default()
                ),
            ));
        }
        body.push_str("</CompleteMultipartUpload>");
        let request = Request {
            method: "POST",
            url: self.upload_url(bucket, key, "", upload_id),
            headers: vec![("content-type".into(), "application/xml".into())],
            body: body.into_bytes(),
        };
        let action = "CompleteMultipartUpload";
        let failed = |e| self.request_error(action, bucket, key, e);
        let root = self.client.send_xml(&request).await.map_err(failed)?;
        Ok(root.text_at(&["ETag"]).unwrap_or_default())
    }

    /// DeleteObject (a missing object is not an error).
    pub async fn delete_object(&self, bucket: &str, key: &str) -> Result<(), S3Error> {
        let request = Request::bare("DELETE", self.object_url(bucket, key));
        match self.client.send(&request).await {
            Ok(_) => Ok(()),
            Err(e) if e.status() == Some(404) => Ok(()),
            Err(e) => Err(self.request_error("DeleteObject", bucket, key, e)),
        }
    }

    /// AbortMultipartUpload (S3 then deletes the parts).
    pub async fn abort_multipart_upload(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
    ) -> Result<(), S3Error> {
        let request = Request::bare("DELETE", self.upload_url(bucket, key, "", upload_id));
        match self.client.send(&request).await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("NoSuchUpload") || e.status() == Some(404) => Ok(()),
            Err(e) => Err(self.request_error("AbortMultipartUpload", bucket, key, e)),
        }
    }
}

/// How [`upload_multipart`] works.
#[derive(Debug, Clone)]
pub struct UploadOptions {
    /// Bytes per part (at least 5 MiB); raised when the file would need more than 10,000
    /// parts. Default 16 MiB.
    pub part_size: u64,
    /// Parts in flight at once (1 to 8). Default 4.
    pub concurrency: usize,
    /// Where the resume state is kept (created when missing).
    pub state_dir: PathBuf,
    /// Cancel: the upload stops and is aborted.
    pub cancel: Option<CancellationToken>,
}

impl UploadOptions {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            part_size: DEFAULT_PART_SIZE,
            concurrency: DEFAULT_CONCURRENCY,
            state_dir: state_dir.into(),
            cancel: None,
        }
    }
}

/// A finished upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    pub bucket: String,
    pub key: String,
    pub size: u64,
    /// sha256 of the file, hex.
    pub sha256: String,
    /// The object's ETag as S3 reported it.
    pub etag: String,
    pub parts: u32,
    /// Parts an earlier, interrupted run had already uploaded (not sent again).
    pub parts_reused: u32,
}

/// A finished part, as the state file keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRecord {
    pub size: u64,
    /// hex.
    pub sha256: String,
    pub etag: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UploadState {
    version: u32,
    endpoint: String,
    bucket: String,
    key: String,
    upload_id: String,
    file_size: u64,
    file_sha256: String,
    part_size: u64,
    parts: BTreeMap<u32, PartRecord>,
}

/// The state file for one destination.
pub fn state_path(state_dir: &Path, endpoint: &str, bucket: &str, key: &str) -> PathBuf {
    let id = Sha256::digest(format!("{endpoint}\n{bucket}\n{key}").as_bytes());
    state_dir.join(format!("s3-upload-{}.json", &hex::encode(id)[..16]))
}

/// S3 answered `action` without a field it must hold.
fn incomplete(action: &'static str, bucket: &str, key: &str, missing: &'static str) -> S3Error {
    S3Error::Incomplete {
        action,
        bucket: bucket.to_string(),
        key: key.to_string(),
        missing,
    }
}

fn write_state(path: &Path, state: &UploadState) -> Result<(), S3Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs_err::create_dir_all(dir)?;
    #[expect(
        clippy::expect_used,
        reason = "plain data (structs, strings, numbers, string-keyed maps) always serialises with serde_json"
    )]
    let json = serde_json::to_vec_pretty(state).expect("the upload state always serializes");
    let tmp = path.with_extension("json.tmp");
    fs_err::write(&tmp, json)?;
    Ok(fs_err::rename(&tmp, path)?)
}

fn read_state(path: &Path) -> Option<UploadState> {
    let bytes = fs_err::read(path).ok()?;
    serde_json::from_slice::<UploadState>(&bytes)
        .ok()
        .filter(|s| s.version == STATE_VERSION)
}

fn remove_state(path: &Path) {
    let _ = fs_err::remove_file(path);
}

/// The part size for a file: the asked size, raised so the file fits in 10,000 parts
/// (rounded up to a whole MiB).
pub fn effective_part_size(asked: u64, file_size: u64) -> u64 {
    let needed = file_size.div_ceil(MAX_PARTS).div_ceil(1024 * 1024) * 1024 * 1024;
    asked.max(needed)
}

/// sha256 (hex) and size of a file, read in a blocking thread.
pub async fn hash_file(path: &Path) -> Result<(String, u64), S3Error> {
    let owned = path.to_path_buf();
    let d = tokio::task::spawn_blocking(move || crate::digest::sha256_file(&owned, None))
        .await
        .map_err(|e| S3Error::Task(e.to_string()))??;
    Ok((d.hex(), d.size))
}

async fn cancelled(token: &Option<CancellationToken>) {
    match token {
        Some(t) => t.cancelled().await,
        None => std::future::pending().await,
    }
}

/// Upload `path` to `s3://bucket/key` in parts; resume an earlier interrupted upload of the
/// same file to the same place (see the module docs). `progress(done, total)` is called with
/// the bytes in S3 as parts finish.
pub async fn upload_multipart(
    s3: &S3Client,
    path: &Path,
    bucket: &str,
    key: &str,
    options: &UploadOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Uploaded, S3Error> {
    if options.part_size < MIN_PART_SIZE {
        return Err(S3Error::PartSize {
            part_size: options.part_size,
        });
    }
    let (sha256, size) = hash_file(path).await?;
    if size > 5 * 1024 * 1024 * 1024 * 1024 {
        return Err(S3Error::TooLarge {
            path: path.to_path_buf(),
            size,
        });
    }
    let part_size = effective_part_size(options.part_size, size);
    let total_parts = size.div_ceil(part_size).max(1) as u32;
    let part_len = |n: u32| -> u64 {
        let start = u64::from(n - 1) * part_size;
        (size - start).min(part_size)
    };
    let state_file = state_path(&options.state_dir, s3.endpoint(), bucket, key);

    // Resume what an earlier run left, if it is the same file cut the same way.
    let mut state: Option<UploadState> = None;
    let mut reused: BTreeMap<u32, PartRecord> = BTreeMap::new();
    if let Some(old) = read_state(&state_file) {
        let same = old.endpoint == s3.endpoint()
            && old.bucket == bucket
            && old.key == key
            && old.file_sha256 == sha256
            && old.file_size == size
            && old.part_size == part_size;
        if !same {
            let _ = s3
                .abort_multipart_upload(&old.bucket, &old.key, &old.upload_id)
                .await;
            remove_state(&state_file);
        } else if let Some(listed) = s3.list_parts(bucket, key, &old.upload_id).await? {
            for part in listed {
                let Some(record) = old.parts.get(&part.number) else {
                    continue;
                };
                let checksum_ok = part.checksum_sha256.as_ref().is_none_or(|c| {
                    hex::decode(&record.sha256)
                        .map(|raw| base64::engine::general_purpose::STANDARD.encode(raw) == *c)
                        .unwrap_or(false)
                });
                let etag_ok = part
                    .etag
                    .as_ref()
                    .is_none_or(|e| e.trim_matches('"') == record.etag.trim_matches('"'));
                if part.size == record.size
                    && part.size == part_len(part.number)
                    && checksum_ok
                    && etag_ok
                {
                    reused.insert(part.number, record.clone());
                }
            }
            state = Some(UploadState {
                parts: reused.clone(),
                ..old
            });
        } else {
            // The upload expired or was aborted elsewhere: start again.
            remove_state(&state_file);
        }
    }
    let mut state = match state {
        Some(s) => s,
        None => {
            let upload_id = s3.create_multipart_upload(bucket, key).await?;
            UploadState {
                version: STATE_VERSION,
                endpoint: s3.endpoint().to_string(),
                bucket: bucket.to_string(),
                key: key.to_string(),
                upload_id,
                file_size: size,
                file_sha256: sha256.clone(),
                part_size,
                parts: BTreeMap::new(),
            }
        }
    };
    write_state(&state_file, &state)?;

    let mut done_bytes: u64 = state.parts.values().map(|p| p.size).sum();
    progress(done_bytes, size);
    let missing: Vec<u32> = (1..=total_parts)
        .filter(|n| !state.parts.contains_key(n))
        .collect();

    let shared = Arc::new((
        s3.clone(),
        path.to_path_buf(),
        bucket.to_string(),
        key.to_string(),
    ));
    let upload_id = state.upload_id.clone();
    let concurrency = options.concurrency.clamp(1, 8);
    let mut pending = missing.into_iter();
    let mut running = tokio::task::JoinSet::new();
    let spawn = |running: &mut tokio::task::JoinSet<Result<(u32, PartRecord), S3Error>>,
                 number: u32| {
        let shared = shared.clone();
        let upload_id = upload_id.clone();
        let len = part_len(number);
        running.spawn(async move {
            let (s3, path, bucket, key) = &*shared;
            let mut file = fs_err::tokio::File::open(path).await?;
            file.seek(std::io::SeekFrom::Start(u64::from(number - 1) * part_size))
                .await?;
            let mut data = vec![0u8; len as usize];
            file.read_exact(&mut data).await?;
            let digest = Sha256::digest(&data);
            let etag = s3
                .upload_part(bucket, key, &upload_id, number, data, &digest)
                .await?;
            Ok((
                number,
                PartRecord {
                    size: len,
                    sha256: hex::encode(digest),
                    etag,
                },
            ))
        });
    };
    for number in pending.by_ref().take(concurrency) {
        spawn(&mut running, number);
    }
    let mut failure: Option<S3Error> = None;
    loop {
        let next = tokio::select! {
            _ = cancelled(&options.cancel) => {
                running.abort_all();
                while running.join_next().await.is_some() {}
                let _ = s3.abort_multipart_upload(bucket, key, &state.upload_id).await;
                remove_state(&state_file);
                return Err(S3Error::Cancelled { bucket: bucket.to_string(), key: key.to_string() });
            }
            next = running.join_next() => next,
        };
        let Some(joined) = next else { break };
        match joined {
            Ok(Ok((number, record))) => {
                done_bytes += record.size;
                state.parts.insert(number, record);
                write_state(&state_file, &state)?;
                progress(done_bytes, size);
                if failure.is_none()
                    && let Some(next) = pending.next()
                {
                    spawn(&mut running, next);
                }
            }
            Ok(Err(e)) => {
                if failure.is_none() {
                    // Stop starting parts; the ones in flight may still finish and count.
                    failure = Some(e);
                }
            }
            Err(e) => {
                if failure.is_none() {
                    failure = Some(S3Error::Task(e.to_string()));
                }
            }
        }
    }
    if let Some(e) = failure {
        return Err(give_up(s3, &state, &state_file, path, total_parts, e).await);
    }

    let etag = match s3
        .complete_multipart_upload(bucket, key, &state.upload_id, &state.parts)
        .await
    {
        Ok(etag) => etag,
        Err(e) => return Err(give_up(s3, &state, &state_file, path, total_parts, e).await),
    };
    remove_state(&state_file);
    let stored = s3.head_object(bucket, key).await?;
    if let Some(actual) = stored
        && actual != size
    {
        return Err(S3Error::SizeMismatch {
            bucket: bucket.to_string(),
            key: key.to_string(),
            expected: size,
            actual,
        });
    }
    Ok(Uploaded {
        bucket: bucket.to_string(),
        key: key.to_string(),
        size,
        sha256,
        etag,
        parts: total_parts,
        parts_reused: reused.len() as u32,
    })
}

/// After a failure: keep the state for a rerun when the cause is transient, otherwise abort
/// the upload and forget it.
async fn give_up(
    s3: &S3Client,
    state: &UploadState,
    state_file: &Path,
    path: &Path,
    total_parts: u32,
    error: S3Error,
) -> S3Error {
    let transient = match &error {
        S3Error::Request { source, .. } => source.is_transient(),
        _ => false,
    };
    if transient {
        let source = match error {
            S3Error::Request { source, .. } => source,
            _ => unreachable!("checked above"),
        };
        return S3Error::Interrupted(Box::new(Interrupted {
            path: path.to_path_buf(),
            bucket: state.bucket.clone(),
            key: state.key.clone(),
            done: state.parts.len(),
            total: total_parts as usize,
            state: state_file.to_path_buf(),
            source,
        }));
    }
    let _ = s3
        .abort_multipart_upload(&state.bucket, &state.key, &state.upload_id)
        .await;
    remove_state(state_file);
    error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_size_grows_to_fit_ten_thousand_parts() {
        assert_eq!(
            effective_part_size(DEFAULT_PART_SIZE, 1 << 30),
            DEFAULT_PART_SIZE
        );
        let huge = 1u64 << 40; // 1 TiB
        let size = effective_part_size(DEFAULT_PART_SIZE, huge);
        assert!(huge.div_ceil(size) <= MAX_PARTS);
        assert_eq!(size % (1024 * 1024), 0);
    }

    #[test]
    fn addressing_is_path_style_for_custom_endpoints() {
        let creds = AwsCredentials::new("A", "B", None, "test");
        let http = client::http_client();
        let custom = S3Client::new(
            http.clone(),
            creds.clone(),
            "us-east-1",
            Some("http://127.0.0.1:9000/"),
            RetryPolicy::default(),
        )
        .expect("valid");
        assert_eq!(
            custom.object_url("b", "dir/x y.vmdk"),
            "http://127.0.0.1:9000/b/dir/x%20y.vmdk"
        );
        let aws = S3Client::new(
            http.clone(),
            creds.clone(),
            "eu-west-1",
            None,
            RetryPolicy::default(),
        )
        .expect("valid");
        assert_eq!(
            aws.object_url("b", "k"),
            "https://b.s3.eu-west-1.amazonaws.com/k"
        );
        assert_eq!(
            aws.object_url("a.b", "k"),
            "https://s3.eu-west-1.amazonaws.com/a.b/k"
        );
        assert!(S3Client::new(http, creds, "r", Some("ftp://x"), RetryPolicy::default()).is_err());
    }
}
