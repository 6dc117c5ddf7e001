//! `WebDownload`, `S3Download`, `S3Upload`. The host does the network part (the guest may run
//! without a network): downloads land in a host temporary file and are then put on the target
//! with `put_file`; uploads are fetched from the target with `get_file` first.
//!
//! S3 means an S3-compatible endpoint from configuration ([`s3_client`]), spoken to with the
//! crate's one S3 client ([`crate::aws::s3`], the AMI import's too). Without an endpoint the
//! S3 actions fail with a message saying how to configure one.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use reqwest::Url;
use serde_json::{Map, Value};
use tokio::io::AsyncWriteExt;

use super::{ActionContext, ActionError, Outputs, each_item};
use crate::aws::AwsCredentials;
use crate::aws::client::{RequestError, RetryPolicy, http_client};
use crate::aws::s3::{self, S3Client, UploadOptions};
use crate::component::condition::file_digest;
use crate::component::document::HashAlgorithm;
use crate::diagnostic::error_chain;
use crate::machine::{FileKind, FileSource, OutputStream, PutOptions};

/// Attempts per download, independent of the step's `maxAttempts` (reference 2.2).
const DOWNLOAD_ATTEMPTS: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// S3Download's prefix form copies at most this many objects (as AWSTOE does).
const MAX_PREFIX_OBJECTS: usize = 1000;

/// Environment variable naming the S3-compatible endpoint, e.g. `http://127.0.0.1:9000`.
pub const S3_ENDPOINT_ENV: &str = "BUILDER_S3_ENDPOINT";

/// The client for `s3://` URLs: `endpoint`, with credentials and region from the standard
/// AWS variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
/// `AWS_REGION`, `AWS_DEFAULT_REGION`, else `us-east-1`); without keys requests go unsigned.
pub fn s3_client(endpoint: &str) -> Result<S3Client, crate::aws::S3Error> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let credentials = match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
        (Some(key), Some(secret)) => Some(AwsCredentials::new(
            key,
            secret,
            var("AWS_SESSION_TOKEN"),
            "environment variables",
        )),
        _ => None,
    };
    let region = var("AWS_REGION")
        .or_else(|| var("AWS_DEFAULT_REGION"))
        .unwrap_or_else(|| "us-east-1".into());
    let retry = RetryPolicy::default();
    S3Client::new(http_client(), credentials, &region, Some(endpoint), retry)
}

/// Network clients and configuration shared by the transfer actions of one run.
pub struct Transfer {
    s3: Option<S3Client>,
    client: OnceLock<reqwest::Client>,
    insecure_client: OnceLock<reqwest::Client>,
}

impl Transfer {
    pub fn new(s3: Option<S3Client>) -> Self {
        Self {
            s3,
            client: OnceLock::new(),
            insecure_client: OnceLock::new(),
        }
    }

    /// Built on first use: most runs never download anything.
    fn client(&self, ignore_certificate_errors: bool) -> Result<&reqwest::Client, ActionError> {
        let cell = if ignore_certificate_errors {
            &self.insecure_client
        } else {
            &self.client
        };
        if let Some(c) = cell.get() {
            return Ok(c);
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(120))
            .danger_accept_invalid_certs(ignore_certificate_errors)
            .build()
            .map_err(|source| ActionError::Http {
                what: "could not set up the HTTP client".into(),
                source,
            })?;
        Ok(cell.get_or_init(|| client))
    }

    fn s3(&self, action: &str) -> Result<&S3Client, ActionError> {
        self.s3.as_ref().ok_or_else(|| ActionError::NoS3Endpoint {
            action: action.to_owned(),
            env: S3_ENDPOINT_ENV,
        })
    }
}

fn host_err(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> ActionError {
    let what = what.to_string();
    move |source| ActionError::Host { what, source }
}

enum FetchError {
    /// Worth another attempt (connection trouble, 5xx, 429).
    Transient(ActionError),
    Permanent(ActionError),
}

/// Why an answer is not a success, for a message: the status plus, from an S3 error body,
/// its `<Code>` and `<Message>` (e.g. `403 Forbidden (SignatureDoesNotMatch: …)`).
fn answer(status: u16, code: Option<&str>, message: Option<&str>) -> String {
    let status = reqwest::StatusCode::from_u16(status)
        .map_or_else(|_| status.to_string(), |s| s.to_string());
    match (code, message) {
        (Some(code), Some(message)) => format!("{status} ({code}: {message})"),
        (Some(code), None) => format!("{status} ({code})"),
        _ => status,
    }
}

/// [`answer`] for a response (its body read for an S3-style error document).
async fn refusal(response: reqwest::Response) -> String {
    let status = response.status().as_u16();
    // S3 error documents are small; a large body is some other page, not worth reading.
    let body = if response.content_length().is_some_and(|n| n <= 64 * 1024) {
        response.text().await.unwrap_or_default()
    } else {
        String::new()
    };
    let element = |name: &str| {
        let open = format!("<{name}>");
        let start = body.find(&open)? + open.len();
        let end = body[start..].find(&format!("</{name}>"))? + start;
        Some(body[start..end].trim().to_string()).filter(|t| !t.is_empty())
    };
    answer(
        status,
        element("Code").as_deref(),
        element("Message").as_deref(),
    )
}

/// A hint for S3 refusals that usually mean wrong credentials.
fn credentials_hint(status: u16) -> &'static str {
    if status == 403 {
        "; check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and that the key may use this bucket)"
    } else {
        ""
    }
}

/// A failed S3 request as the step reports it: S3's answer with its code and message (and a
/// hint for a refusal), or the transport error. Its URL is left out: requests are named as
/// `s3://bucket/key`.
fn s3_failure(what: String, e: RequestError) -> ActionError {
    match e {
        RequestError::Service(f) => ActionError::Answered {
            what,
            answer: answer(f.status, f.code.as_deref(), f.message.as_deref()),
            hint: credentials_hint(f.status),
        },
        RequestError::Transport { source, .. } => ActionError::Http {
            what,
            source: source.without_url(),
        },
        e => ActionError::S3 {
            what,
            source: Box::new(e),
        },
    }
}

/// What a download GETs: a URL, or an S3 object.
#[derive(Clone, Copy)]
enum Source<'a> {
    Web(&'a reqwest::Client, &'a Url),
    S3 {
        s3: &'a S3Client,
        bucket: &'a str,
        key: &'a str,
    },
}

/// GET `source` into `file` once. Messages name the request as `shown`.
async fn fetch_once(source: Source<'_>, shown: &str, file: &Path) -> Result<(), FetchError> {
    let mut response = match source {
        Source::Web(client, url) => {
            let response = client.get(url.clone()).send().await.map_err(|e| {
                FetchError::Transient(ActionError::Http {
                    what: format!("could not fetch {shown}"),
                    source: e.without_url(),
                })
            })?;
            let status = response.status();
            if status != reqwest::StatusCode::OK {
                let message = ActionError::NotOk {
                    shown: shown.to_owned(),
                    answer: refusal(response).await,
                    hint: "",
                };
                return Err(if status.is_server_error() || status.as_u16() == 429 {
                    FetchError::Transient(message)
                } else {
                    FetchError::Permanent(message)
                });
            }
            response
        }
        Source::S3 { s3, bucket, key } => s3.get_object(bucket, key).await.map_err(|e| {
            let transient = e.is_transient();
            let message = match e {
                RequestError::Service(f) => ActionError::NotOk {
                    shown: shown.to_owned(),
                    answer: answer(f.status, f.code.as_deref(), f.message.as_deref()),
                    hint: credentials_hint(f.status),
                },
                e => s3_failure(format!("could not fetch {shown}"), e),
            };
            if transient {
                FetchError::Transient(message)
            } else {
                FetchError::Permanent(message)
            }
        })?,
    };
    let host = |e| FetchError::Permanent(ActionError::HostFile(e));
    let mut out = fs_err::tokio::File::create(file).await.map_err(host)?;
    loop {
        match response.chunk().await {
            Ok(Some(bytes)) => out.write_all(&bytes).await.map_err(host)?,
            Ok(None) => break,
            Err(e) => {
                return Err(FetchError::Transient(ActionError::Http {
                    what: format!("the download of {shown} broke off"),
                    source: e.without_url(),
                }));
            }
        }
    }
    out.flush().await.map_err(host)?;
    Ok(())
}

/// GET `source` into `file` on the host, with up to [`DOWNLOAD_ATTEMPTS`] attempts and
/// doubling back-off for failures that may pass.
async fn fetch(source: Source<'_>, file: &Path, cx: &ActionContext<'_>) -> Result<(), ActionError> {
    let shown = &match source {
        Source::Web(_, url) => url.to_string(),
        Source::S3 { bucket, key, .. } => format!("s3://{bucket}/{key}"),
    };
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 1;
    loop {
        match fetch_once(source, shown, file).await {
            Ok(()) => return Ok(()),
            Err(FetchError::Permanent(e)) => return Err(e),
            Err(FetchError::Transient(e)) if attempt < DOWNLOAD_ATTEMPTS => {
                let note = format!(
                    "{}; trying again in {} ms (attempt {} of {DOWNLOAD_ATTEMPTS})\n",
                    error_chain(&e),
                    backoff.as_millis(),
                    attempt + 1
                );
                cx.sink.output(OutputStream::Stderr, note.as_bytes());
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                attempt += 1;
            }
            Err(FetchError::Transient(e)) => {
                return Err(ActionError::GaveUp {
                    attempts: DOWNLOAD_ATTEMPTS,
                    source: Box::new(e),
                });
            }
        }
    }
}

fn algorithm(name: &str) -> Result<HashAlgorithm, ActionError> {
    Ok(match name.to_ascii_uppercase().as_str() {
        "MD5" => HashAlgorithm::Md5,
        "SHA1" => HashAlgorithm::Sha1,
        "SHA256" => HashAlgorithm::Sha256,
        "SHA512" => HashAlgorithm::Sha512,
        _ => {
            return Err(ActionError::Input(format!(
                "`algorithm: {name}` is not supported; use MD5, SHA1, SHA256 or SHA512"
            )));
        }
    })
}

fn temp_beside(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(
        ".{name}.builder-download-{}",
        uuid::Uuid::new_v4().simple()
    ))
}

/// Put a host file on the target at `dest`, checking its digest there first when asked: the
/// file only appears at `dest` once it is verified.
async fn deliver(
    cx: &ActionContext<'_>,
    host_file: &Path,
    dest: &Path,
    verify: Option<(HashAlgorithm, &str)>,
    create_parents: bool,
) -> Result<(), ActionError> {
    let options = PutOptions {
        create_parents,
        ..PutOptions::default()
    };
    let Some((algorithm, expected)) = verify else {
        cx.target
            .put_file(dest, FileSource::Path(host_file.to_path_buf()), &options)
            .await
            .map_err(ActionError::target(format!(
                "could not write {}",
                dest.display()
            )))?;
        return Ok(());
    };
    let staged = temp_beside(dest);
    cx.target
        .put_file(&staged, FileSource::Path(host_file.to_path_buf()), &options)
        .await
        .map_err(ActionError::target(format!(
            "could not write {}",
            dest.display()
        )))?;
    let actual = file_digest(cx.target, algorithm, &staged).await;
    let matches = matches!(&actual, Ok(Some(a)) if a.eq_ignore_ascii_case(expected.trim()));
    if !matches {
        let _ = cx
            .run_quiet(&[
                "rm".into(),
                "-f".into(),
                "--".into(),
                staged.to_string_lossy().into_owned(),
            ])
            .await;
        let actual = match actual {
            Ok(Some(a)) => a,
            Ok(None) => "(could not be computed)".into(),
            Err(e) => format!("(could not be computed: {e})"),
        };
        return Err(ActionError::ChecksumMismatch {
            algorithm: format!("{algorithm:?}"),
            expected: expected.trim().to_ascii_lowercase(),
            actual,
            dest: dest.to_path_buf(),
        });
    }
    cx.run_quiet(&[
        "mv".into(),
        "-fT".into(),
        "--".into(),
        staged.to_string_lossy().into_owned(),
        dest.to_string_lossy().into_owned(),
    ])
    .await
}

pub async fn web_download(inputs: &Value, cx: &ActionContext<'_>) -> Result<Outputs, ActionError> {
    each_item(inputs, |i| async move {
        let source = i.required("source")?;
        let destination = i.required("destination")?;
        let overwrite = i.bool("overwrite", true)?;
        let insecure = i.bool("ignoreCertificateErrors", false)?;
        let verify = match (i.string("checksum")?, i.string("algorithm")?) {
            (Some(sum), Some(alg)) => Some((algorithm(&alg)?, sum)),
            (None, None) => None,
            _ => {
                return Err(ActionError::Input(
                    "`checksum` and `algorithm` go together: give both to verify the download"
                        .into(),
                ));
            }
        };
        let url = Url::parse(&source)
            .map_err(|e| ActionError::Input(format!("`source: {source}` is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ActionError::Input(format!(
                "`source: {source}` must be an http:// or https:// URL"
            )));
        }
        let dest = if destination.ends_with('/') {
            let name = url
                .path_segments()
                .and_then(|mut s| s.next_back())
                .filter(|n| !n.is_empty())
                .ok_or_else(|| {
                    ActionError::Input(format!(
                        "`{source}` has no file name to keep; give `destination` as a file path"
                    ))
                })?;
            cx.path(&destination).join(name)
        } else {
            cx.path(&destination)
        };
        let existing = cx
            .target
            .stat(&dest)
            .await
            .map_err(ActionError::target(format!("could not look at {}", dest.display())))?;
        match existing {
            Some(s) if s.kind == FileKind::Dir => {
                return Err(ActionError::IsAFolder {
                    path: dest,
                    hint: "; end `destination` with `/` to download into it",
                });
            }
            Some(_) if !overwrite => {
                return Err(ActionError::Exists(dest));
            }
            Some(_) => {
                if let Some((alg, sum)) = &verify
                    && let Ok(Some(actual)) = file_digest(cx.target, *alg, &dest).await
                    && actual.eq_ignore_ascii_case(sum.trim())
                {
                    let note = format!(
                        "{} is already there with the expected checksum; not downloading it again\n",
                        dest.display()
                    );
                    cx.sink.output(OutputStream::Stdout, note.as_bytes());
                    return Ok(Some(destination_output(&dest)));
                }
            }
            None => {}
        }
        let client = cx.transfer.client(insecure)?;
        let host_dir = tempfile::tempdir().map_err(host_err("could not create a temporary folder"))?;
        let host_file = host_dir.path().join("download");
        fetch(Source::Web(client, &url), &host_file, cx).await?;
        deliver(
            cx,
            &host_file,
            &dest,
            verify.as_ref().map(|(a, s)| (*a, s.as_str())),
            true,
        )
        .await?;
        Ok(Some(destination_output(&dest)))
    })
    .await
}

fn destination_output(dest: &Path) -> Map<String, Value> {
    let mut out = Map::new();
    out.insert(
        "destination".into(),
        Value::String(dest.to_string_lossy().into_owned()),
    );
    out
}

/// `s3://bucket/key` → (bucket, key).
pub fn parse_s3_url(url: &str) -> Result<(String, String), ActionError> {
    let rest = url.strip_prefix("s3://").ok_or_else(|| {
        ActionError::Input(format!("`{url}` is not an s3:// URL (s3://bucket/key)"))
    })?;
    match rest.split_once('/') {
        Some((bucket, key)) if !bucket.is_empty() => Ok((bucket.to_string(), key.to_string())),
        _ => Err(ActionError::Input(format!(
            "`{url}` names no object; write s3://bucket/key"
        ))),
    }
}

pub async fn s3_download(inputs: &Value, cx: &ActionContext<'_>) -> Result<Outputs, ActionError> {
    each_item(inputs, |i| async move {
        let source = i.required("source")?;
        let destination = i.required("destination")?;
        let overwrite = i.bool("overwrite", true)?;
        let s3 = cx.transfer.s3("S3Download")?;
        let (bucket, key) = parse_s3_url(&source)?;
        let host_dir =
            tempfile::tempdir().map_err(host_err("could not create a temporary folder"))?;
        let host_file = host_dir.path().join("object");
        let check_dest = |dest: PathBuf| async move {
            match cx.target.stat(&dest).await {
                Ok(Some(_)) if !overwrite => Err(ActionError::Exists(dest)),
                Ok(_) => Ok(dest),
                Err(e) => Err(ActionError::Target {
                    what: format!("could not look at {}", dest.display()),
                    source: e,
                }),
            }
        };
        if let Some(prefix) = key.strip_suffix('*') {
            let keys = s3
                .list_objects(&bucket, prefix, MAX_PREFIX_OBJECTS)
                .await
                .map_err(|e| match e {
                    RequestError::BadResponse { .. } => ActionError::NotS3Xml {
                        what: source.to_string(),
                        source: Box::new(e),
                    },
                    e => s3_failure(format!("could not list {source}"), e),
                })?;
            let root = cx.path(destination.trim_end_matches('/'));
            for object in keys {
                let Some(relative) = object.strip_prefix(prefix) else {
                    continue;
                };
                if relative.is_empty() || relative.ends_with('/') {
                    continue;
                }
                let dest = check_dest(root.join(relative)).await?;
                let (bucket, key) = (&bucket, &object);
                fetch(Source::S3 { s3, bucket, key }, &host_file, cx).await?;
                deliver(cx, &host_file, &dest, None, true).await?;
            }
        } else {
            let dest = if destination.ends_with('/') {
                let name = key.rsplit('/').next().unwrap_or(&key);
                cx.path(&destination).join(name)
            } else {
                cx.path(&destination)
            };
            // The destination folder must exist (reference 2.2).
            if let Some(parent) = dest.parent()
                && !matches!(
                    cx.target.stat(parent).await,
                    Ok(Some(s)) if s.kind == FileKind::Dir
                )
            {
                return Err(ActionError::NoDestinationFolder(parent.to_path_buf()));
            }
            let dest = check_dest(dest).await?;
            let (bucket, key) = (&bucket, &key);
            fetch(Source::S3 { s3, bucket, key }, &host_file, cx).await?;
            deliver(cx, &host_file, &dest, None, false).await?;
        }
        Ok(None)
    })
    .await
}

/// Every file under `dir` on the target, with its path relative to `dir`.
async fn walk(cx: &ActionContext<'_>, dir: &Path) -> Result<Vec<(PathBuf, String)>, ActionError> {
    let mut files = Vec::new();
    let mut pending = vec![(dir.to_path_buf(), String::new())];
    while let Some((folder, relative)) = pending.pop() {
        let entries = cx
            .target
            .list(&folder)
            .await
            .map_err(ActionError::target(format!(
                "could not list {}",
                folder.display()
            )))?;
        for entry in entries {
            let rel = if relative.is_empty() {
                entry.name.clone()
            } else {
                format!("{relative}/{}", entry.name)
            };
            let full = folder.join(&entry.name);
            match entry.stat.kind {
                FileKind::Dir => pending.push((full, rel)),
                FileKind::File => files.push((full, rel)),
                _ => {}
            }
        }
    }
    Ok(files)
}

pub async fn s3_upload(inputs: &Value, cx: &ActionContext<'_>) -> Result<Outputs, ActionError> {
    each_item(inputs, |i| async move {
        let source = i.required("source")?;
        let destination = i.required("destination")?;
        let recurse = i.bool("recurse", false)?;
        let s3 = cx.transfer.s3("S3Upload")?;
        let (bucket, key) = parse_s3_url(&destination)?;
        let full = cx.path(&source);
        let name = full
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // (path on the target, object key)
        let mut uploads: Vec<(PathBuf, String)> = Vec::new();
        let into_prefix = key.is_empty() || key.ends_with('/');
        let matches: Vec<(PathBuf, FileKind, String)> = if name.contains('*') {
            let parent = full.parent().unwrap_or(Path::new("/")).to_path_buf();
            let entries = cx
                .target
                .list(&parent)
                .await
                .map_err(ActionError::target(format!("could not list {}", parent.display())))?;
            entries
                .into_iter()
                .filter(|e| super::files::wildcard_match(&name, &e.name))
                .map(|e| (parent.join(&e.name), e.stat.kind, e.name))
                .collect()
        } else {
            match cx
                .target
                .stat(&full)
                .await
                .map_err(ActionError::target(format!("could not look at {}", full.display())))?
            {
                Some(s) => vec![(full.clone(), s.kind, name.clone())],
                None => {
                    return Err(ActionError::NotFound(full));
                }
            }
        };
        if matches.is_empty() {
            return Err(ActionError::NoMatch {
                pattern: full,
                kind: "file or folder",
            });
        }
        if matches.len() > 1 && !into_prefix {
            return Err(ActionError::Input(format!(
                "`{source}` matches {} entries; end `destination` with `/` to upload them under a prefix",
                matches.len()
            )));
        }
        let mut folders = Vec::new();
        for (path, kind, file_name) in matches {
            match kind {
                FileKind::Dir if recurse => folders.push((path, file_name)),
                FileKind::Dir => {
                    return Err(ActionError::IsAFolder {
                        path,
                        hint: "; set `recurse: true` to upload its content",
                    });
                }
                FileKind::File => {
                    let object = if into_prefix {
                        format!("{key}{file_name}")
                    } else {
                        key.clone()
                    };
                    uploads.push((path, object));
                }
                _ => {}
            }
        }
        for (folder, _) in folders {
            let prefix = if into_prefix {
                key.clone()
            } else {
                format!("{key}/")
            };
            for (path, relative) in walk(cx, &folder).await? {
                uploads.push((path, format!("{prefix}{relative}")));
            }
        }
        let host_dir = tempfile::tempdir().map_err(host_err("could not create a temporary folder"))?;
        let host_file = host_dir.path().join("upload");
        for (path, object) in uploads {
            cx.target
                .get_file(&path, &host_file)
                .await
                .map_err(ActionError::target(format!("could not read {}", path.display())))?;
            let what = || {
                format!(
                    "could not upload {} to s3://{bucket}/{object}",
                    path.display()
                )
            };
            let len = fs_err::metadata(&host_file)
                .map_err(ActionError::HostFile)?
                .len();
            // Large files go in parts (a part in memory at a time), as the AMI import does.
            if len <= s3::DEFAULT_PART_SIZE {
                let data = fs_err::tokio::read(&host_file)
                    .await
                    .map_err(ActionError::HostFile)?;
                s3.put_object(&bucket, &object, data)
                    .await
                    .map_err(|e| s3_failure(what(), e))?;
            } else {
                let options = UploadOptions::new(host_dir.path().join("state"));
                s3::upload_multipart(s3, &host_file, &bucket, &object, &options, &|_, _| {})
                    .await
                    .map_err(|e| ActionError::S3 {
                        what: what(),
                        source: Box::new(e),
                    })?;
            }
        }
        Ok(None)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls() {
        assert_eq!(
            parse_s3_url("s3://b/k/x.txt").expect("valid"),
            ("b".to_string(), "k/x.txt".to_string())
        );
        assert!(parse_s3_url("https://b/k").is_err());
        assert!(parse_s3_url("s3://b").is_err());
    }
}
