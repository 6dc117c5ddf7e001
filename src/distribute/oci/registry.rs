//! One registry session: authentication through `oci-client` (it knows the bearer-token dance
//! real registries want), manifests through `oci-client`, and blobs through our own requests
//! on the same reqwest/rustls stack, because `oci-client` cannot resume an upload session or
//! report a blob's size: chunked uploads here ask the registry where it stopped (`GET` on the
//! upload URL gives `Range: 0-<end>`) and carry on from there.

use std::sync::Arc;
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Reference, RegistryOperation};
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, LOCATION, RANGE};
use sha2::{Digest, Sha256};

use super::auth::Credentials;
use super::blob::BlobSource;
use super::{OciError, OciOptions};
use crate::diagnostic::error_chain;
use crate::distribute::Progress;
use crate::recipe::OciReference;

/// A blob in the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Descriptor {
    /// `sha256:<hex>`.
    pub digest: String,
    pub size: u64,
}

/// What one request attempt came to: retry (the network or the registry hiccupped) or stop.
/// Every retried request of this module and its caller (blob downloads) returns it to
/// [`Registry::retrying`].
pub(super) enum Failure {
    Transient(String),
    Fatal(OciError),
}

impl From<OciError> for Failure {
    fn from(e: OciError) -> Self {
        Failure::Fatal(e)
    }
}

pub(super) struct Registry {
    http: reqwest::Client,
    oci: oci_client::Client,
    /// `http://host:port` or `https://host`.
    base: String,
    host: String,
    repository: String,
    authorization: Option<HeaderValue>,
    credentials: Credentials,
    options: OciOptions,
}

impl Registry {
    /// Look up the credential, authenticate for `operation` and check that the registry
    /// accepts it (`GET /v2/`), so a wrong password is reported before any upload.
    pub async fn connect(
        reference: &OciReference,
        options: &OciOptions,
        operation: RegistryOperation,
    ) -> Result<Self, OciError> {
        let host = reference.registry.clone();
        let credentials = {
            let host = host.clone();
            tokio::task::spawn_blocking(move || super::auth::lookup(&host))
                .await
                .map_err(|e| OciError::Task(e.to_string()))??
        };
        let plain = options.is_plain_http(&host);
        let scheme = if plain { "http" } else { "https" };
        let oci = oci_client::Client::new(ClientConfig {
            protocol: if plain {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            connect_timeout: Some(options.connect_timeout),
            read_timeout: Some(options.read_timeout),
            user_agent: concat!("builder/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        });
        let http = reqwest::Client::builder()
            .connect_timeout(options.connect_timeout)
            .read_timeout(options.read_timeout)
            .user_agent(concat!("builder/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| OciError::Unreachable {
                registry: host.clone(),
                cause: error_chain(&e),
            })?;
        let oref = Reference::with_tag(
            host.clone(),
            reference.repository.clone(),
            "latest".to_string(),
        );
        let token = oci
            .auth(&oref, &credentials.auth, operation)
            .await
            .map_err(|e| map_client_error(&host, plain, &credentials, e))?;
        let authorization = match (token, &credentials.auth) {
            (Some(token), _) => Some(format!("Bearer {token}")),
            (None, RegistryAuth::Basic(user, password)) => {
                use base64::Engine as _;
                let raw = format!("{user}:{password}");
                Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(raw)
                ))
            }
            (None, RegistryAuth::Bearer(token)) => Some(format!("Bearer {token}")),
            (None, RegistryAuth::Anonymous) => None,
        }
        .map(|v| {
            let mut v = HeaderValue::from_str(&v).map_err(|_| OciError::Credentials {
                file: Default::default(),
                registry: host.clone(),
                message: "the credential has characters an HTTP header cannot carry".into(),
            })?;
            v.set_sensitive(true);
            Ok::<_, OciError>(v)
        })
        .transpose()?;
        let registry = Self {
            http,
            oci,
            base: format!("{scheme}://{host}"),
            host,
            repository: reference.repository.clone(),
            authorization,
            credentials,
            options: options.clone(),
        };
        let url = format!("{}/v2/", registry.base);
        let response = registry
            .send(registry.http.get(&url))
            .await
            .map_err(|e| registry.connect_error(e))?;
        match response.status() {
            s if s.is_success() => Ok(registry),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(registry.auth_failed()),
            s => Err(OciError::Registry {
                registry: registry.host.clone(),
                action: "answer the API version check (GET /v2/)".into(),
                status: s.as_u16(),
                message: body_text(response).await,
            }),
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    fn auth_failed(&self) -> OciError {
        OciError::AuthFailed {
            registry: self.host.clone(),
            origin: self.credentials.origin.clone(),
        }
    }

    fn connect_error(&self, e: reqwest::Error) -> OciError {
        classify_connect(&self.host, self.base.starts_with("http:"), &e)
    }

    /// Add the credential when the request goes to the registry itself (an upload location
    /// may point elsewhere, e.g. a storage service; credentials never follow it there).
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let request = request.build()?;
        let same_host = request
            .url()
            .as_str()
            .starts_with(&format!("{}/", self.base));
        let mut request = request;
        if same_host && let Some(auth) = &self.authorization {
            request.headers_mut().insert(AUTHORIZATION, auth.clone());
        }
        self.http.execute(request).await
    }

    fn blob_url(&self, digest: &str) -> String {
        format!("{}/v2/{}/blobs/{digest}", self.base, self.repository)
    }

    /// An absolute URL for a `Location` header (registries may answer with a path).
    fn absolute(&self, location: &str) -> String {
        if location.starts_with('/') {
            format!("{}{location}", self.base)
        } else {
            location.to_string()
        }
    }

    /// The blob's size if the registry has it (HEAD), checking the digest it reports.
    pub async fn blob_size(&self, digest: &str) -> Result<Option<u64>, OciError> {
        self.retrying(&format!("check blob {digest}"), || async {
            self.try_blob_size(digest).await
        })
        .await
    }

    async fn try_blob_size(&self, digest: &str) -> Result<Option<u64>, Failure> {
        let response = self
            .send(self.http.head(self.blob_url(digest)))
            .await
            .map_err(|e| transient(&e))?;
        match response.status() {
            StatusCode::OK => {
                if let Some(reported) = header(&response, "docker-content-digest")
                    && reported != digest
                {
                    return Err(Failure::Fatal(OciError::DigestMismatch {
                        what: format!("blob {digest} in {}", self.host),
                        expected: digest.to_string(),
                        actual: reported,
                    }));
                }
                // From the header: reqwest's `content_length()` is the (empty) body's for HEAD.
                Ok(header(&response, CONTENT_LENGTH.as_str()).and_then(|v| v.parse().ok()))
            }
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(self
                .status_failure(s, &format!("check blob {digest}"), response)
                .await),
        }
    }

    /// Upload `source` as a blob unless the registry has `known` already, then check (HEAD)
    /// that the registry holds it with the right digest and size. Chunks of
    /// `options.chunk_size`; after a transient failure the same upload session resumes where
    /// the registry says it stopped (or a new one starts from zero if it forgot the session).
    pub async fn upload(
        &self,
        source: Arc<BlobSource>,
        known: Option<&str>,
        target: &str,
        what: &str,
        progress: &dyn Progress,
    ) -> Result<Descriptor, OciError> {
        let len = source.len();
        if let Some(digest) = known
            && self.blob_size(digest).await? == Some(len)
        {
            progress.transfer(target, what, len, Some(len));
            return Ok(Descriptor {
                digest: digest.to_string(),
                size: len,
            });
        }
        let mut state = UploadState {
            session: None,
            offset: 0,
            hasher: Sha256::new(),
        };
        let digest = self
            .retrying_noisy(
                &format!("upload {what}"),
                |cause, wait| {
                    progress.step(
                        target,
                        &format!(
                            "uploading {what} failed ({cause}); retrying in {} s",
                            wait.as_secs_f32()
                        ),
                    )
                },
                async || {
                    self.try_upload(&source, &mut state, target, what, progress)
                        .await
                },
            )
            .await?;
        if let Some(known) = known
            && known != digest
        {
            return Err(OciError::DigestMismatch {
                what: what.to_string(),
                expected: known.to_string(),
                actual: digest,
            });
        }
        match self.blob_size(&digest).await? {
            Some(size) if size == len => Ok(Descriptor { digest, size }),
            found => Err(OciError::NotVerified {
                registry: self.host.clone(),
                what: what.to_string(),
                digest,
                expected: len,
                found,
            }),
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        self.options
            .first_backoff
            .saturating_mul(1 << (attempt - 1).min(16))
            .min(self.options.max_backoff)
    }

    /// One go at an upload: open (or resume) the session, send the rest in chunks, close it
    /// with the digest. Returns `sha256:<hex>`.
    async fn try_upload(
        &self,
        source: &Arc<BlobSource>,
        state: &mut UploadState,
        target: &str,
        what: &str,
        progress: &dyn Progress,
    ) -> Result<String, Failure> {
        let len = source.len();
        // The session is kept until the registry says it forgot it: a status request that
        // fails (registry still down) must not lose it.
        let (mut location, offset) = match state.session.clone() {
            Some(location) => match self.upload_status(&location).await? {
                Some((location, offset)) if offset <= len => (location, offset),
                _ => (self.start_upload().await?, 0),
            },
            None => (self.start_upload().await?, 0),
        };
        state.session = Some(location.clone());
        if offset != state.offset {
            // The registry kept a different amount than we sent before: hash its prefix again.
            let src = source.clone();
            state.hasher = blocking(move || src.hash_prefix(offset)).await??;
            state.offset = offset;
        }
        progress.transfer(target, what, state.offset, Some(len));
        let chunk = self.options.chunk_size.max(1);
        let read = |from: u64, hasher: Sha256| {
            let src = source.clone();
            tokio::task::spawn_blocking(move || {
                let data = src.read_at(from, chunk)?;
                let mut hasher = hasher;
                hasher.update(&data);
                Ok::<_, std::io::Error>((data, hasher))
            })
        };
        // Read (and hash) the next chunk while the current one is on the wire.
        let mut next = (state.offset < len).then(|| read(state.offset, state.hasher.clone()));
        while let Some(pending) = next.take() {
            let (data, hashed) = pending
                .await
                .map_err(|e| Failure::Fatal(OciError::Task(e.to_string())))?
                .map_err(|e| Failure::Fatal(OciError::from(e)))?;
            let n = data.len() as u64;
            if n == 0 {
                return Err(Failure::Fatal(OciError::Shrunk { path: what.into() }));
            }
            let end = state.offset + n;
            if end < len {
                next = Some(read(end, hashed.clone()));
            }
            let response = self
                .send(
                    self.http
                        .patch(&location)
                        .header(CONTENT_TYPE, "application/octet-stream")
                        .header(CONTENT_LENGTH, n)
                        .header("content-range", format!("{}-{}", state.offset, end - 1))
                        .body(data),
                )
                .await
                .map_err(|e| transient(&e))?;
            match response.status() {
                StatusCode::ACCEPTED => {}
                StatusCode::RANGE_NOT_SATISFIABLE | StatusCode::NOT_FOUND => {
                    // The session is gone or out of step: start a new one.
                    state.session = None;
                    state.offset = 0;
                    state.hasher = Sha256::new();
                    return Err(Failure::Transient(format!(
                        "the registry dropped the upload session ({})",
                        response.status()
                    )));
                }
                s => {
                    return Err(self
                        .status_failure(s, &format!("accept a chunk of {what}"), response)
                        .await);
                }
            }
            if let Some(l) = header(&response, LOCATION.as_str()) {
                location = self.absolute(&l);
                state.session = Some(location.clone());
            }
            state.offset = end;
            state.hasher = hashed;
            progress.transfer(target, what, end, Some(len));
        }
        let digest = format!("sha256:{}", hex::encode(state.hasher.clone().finalize()));
        let mut url = reqwest::Url::parse(&location).map_err(|_| {
            Failure::Fatal(OciError::Registry {
                registry: self.host.clone(),
                action: format!("give a usable upload location for {what}"),
                status: 0,
                message: location.clone(),
            })
        })?;
        url.query_pairs_mut().append_pair("digest", &digest);
        let response = self
            .send(self.http.put(url).header(CONTENT_LENGTH, 0))
            .await
            .map_err(|e| transient(&e))?;
        match response.status() {
            StatusCode::CREATED => Ok(digest),
            s => Err(self
                .status_failure(s, &format!("complete the upload of {what}"), response)
                .await),
        }
    }

    /// `POST /v2/<repo>/blobs/uploads/`: a new session's location.
    async fn start_upload(&self) -> Result<String, Failure> {
        let url = format!("{}/v2/{}/blobs/uploads/", self.base, self.repository);
        let response = self
            .send(self.http.post(&url).header(CONTENT_LENGTH, 0))
            .await
            .map_err(|e| transient(&e))?;
        match response.status() {
            StatusCode::ACCEPTED => match header(&response, LOCATION.as_str()) {
                Some(l) => Ok(self.absolute(&l)),
                None => Err(Failure::Fatal(OciError::Registry {
                    registry: self.host.clone(),
                    action: "start an upload".into(),
                    status: 202,
                    message: "no Location header".into(),
                })),
            },
            s => Err(self.status_failure(s, "start an upload", response).await),
        }
    }

    /// Where an upload session stands: its (maybe new) location and how many bytes it holds;
    /// `None` if the registry no longer knows it.
    async fn upload_status(&self, location: &str) -> Result<Option<(String, u64)>, Failure> {
        let response = self
            .send(self.http.get(location))
            .await
            .map_err(|e| transient(&e))?;
        match response.status() {
            StatusCode::NO_CONTENT | StatusCode::OK => {
                let location = header(&response, LOCATION.as_str())
                    .map(|l| self.absolute(&l))
                    .unwrap_or_else(|| location.to_string());
                // `Range: 0-<last byte>`; "0-0" is ambiguous (nothing or one byte), and
                // starting over costs one chunk at most.
                let offset = header(&response, RANGE.as_str())
                    .and_then(|r| r.split_once('-').and_then(|(_, e)| e.parse::<u64>().ok()))
                    .map(|end| if end == 0 { 0 } else { end + 1 })
                    .unwrap_or(0);
                Ok(Some((location, offset)))
            }
            s if s.is_client_error()
                && s != StatusCode::UNAUTHORIZED
                && s != StatusCode::FORBIDDEN =>
            {
                Ok(None)
            }
            s => Err(self
                .status_failure(s, "report an upload's progress", response)
                .await),
        }
    }

    /// Store a manifest under `tag` (or its digest); returns the digest the registry reports,
    /// checked against the bytes sent.
    pub async fn put_manifest(
        &self,
        reference: &str,
        body: &[u8],
        media_type: &str,
    ) -> Result<String, OciError> {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(body)));
        let oref = self.reference(reference);
        #[expect(
            clippy::expect_used,
            reason = "media types are this crate's ASCII constants"
        )]
        let content_type = HeaderValue::from_str(media_type).expect("media types are ASCII");
        self.retrying("store the manifest", || async {
            match self
                .oci
                .push_manifest_raw(&oref, body.to_vec(), content_type.clone())
                .await
            {
                Ok(_) => Ok(()),
                Err(e) => Err(self.client_failure(e)),
            }
        })
        .await?;
        Ok(digest)
    }

    /// The manifest `reference` (a tag or digest) names: its bytes and digest (the digest of
    /// the bytes, checked against a digest reference).
    pub async fn get_manifest(&self, reference: &str) -> Result<(Vec<u8>, String), OciError> {
        let oref = self.reference(reference);
        let (bytes, _) = self
            .retrying("send the manifest", || async {
                self.oci
                    .pull_manifest_raw(&oref, &self.credentials.auth, MANIFEST_TYPES)
                    .await
                    .map_err(|e| self.client_failure(e))
            })
            .await?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        if reference.starts_with("sha256:") && reference != digest {
            return Err(OciError::DigestMismatch {
                what: format!("the manifest {reference} from {}", self.host),
                expected: reference.to_string(),
                actual: digest,
            });
        }
        Ok((bytes.to_vec(), digest))
    }

    /// The digest a tag points to now, if the registry says.
    pub async fn resolve_tag(&self, tag: &str) -> Result<String, OciError> {
        let oref = self.reference(tag);
        self.retrying("resolve the tag", || async {
            self.oci
                .fetch_manifest_digest(&oref, &self.credentials.auth)
                .await
                .map_err(|e| self.client_failure(e))
        })
        .await
    }

    /// `GET` a blob, from `offset` on (a `Range` request when `offset > 0`). Returns the
    /// response and whether it starts at `offset` (206) or at zero (200).
    pub async fn get_blob(
        &self,
        digest: &str,
        offset: u64,
    ) -> Result<(reqwest::Response, u64), Failure> {
        let mut request = self.http.get(self.blob_url(digest));
        if offset > 0 {
            request = request.header(RANGE, format!("bytes={offset}-"));
        }
        let response = self
            .send(request)
            .await
            .map_err(|e| Failure::Transient(error_chain(&e)))?;
        match response.status() {
            StatusCode::OK => Ok((response, 0)),
            StatusCode::PARTIAL_CONTENT if offset > 0 => Ok((response, offset)),
            s if is_transient(s) => Err(Failure::Transient(format!("the registry answered {s}"))),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                Err(Failure::Fatal(self.auth_failed()))
            }
            s => Err(Failure::Fatal(OciError::Registry {
                registry: self.host.clone(),
                action: format!("send blob {digest}"),
                status: s.as_u16(),
                message: body_text(response).await,
            })),
        }
    }

    pub fn attempts(&self) -> u32 {
        self.options.attempts.max(1)
    }

    fn reference(&self, reference: &str) -> Reference {
        if reference.starts_with("sha256:") {
            Reference::with_digest(
                self.host.clone(),
                self.repository.clone(),
                reference.to_string(),
            )
        } else {
            Reference::with_tag(
                self.host.clone(),
                self.repository.clone(),
                reference.to_string(),
            )
        }
    }

    /// Run `op` until it succeeds, fails for good, or attempts run out: the one retry policy
    /// (attempts, exponential backoff) of every registry request. [`Registry::retrying_noisy`]
    /// also says each retry.
    pub(super) async fn retrying<T>(
        &self,
        action: &str,
        op: impl AsyncFnMut() -> Result<T, Failure>,
    ) -> Result<T, OciError> {
        self.retrying_noisy(action, |_, _| {}, op).await
    }

    /// [`Registry::retrying`], calling `notice(cause, wait)` before each retry.
    pub(super) async fn retrying_noisy<T>(
        &self,
        action: &str,
        notice: impl Fn(&str, Duration),
        mut op: impl AsyncFnMut() -> Result<T, Failure>,
    ) -> Result<T, OciError> {
        let mut attempt = 1;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Transient(cause)) if attempt >= self.attempts() => {
                    return Err(OciError::GaveUp {
                        registry: self.host.clone(),
                        action: action.to_string(),
                        attempts: attempt,
                        cause,
                    });
                }
                Err(Failure::Transient(cause)) => {
                    let wait = self.backoff(attempt);
                    notice(&cause, wait);
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
            }
        }
    }

    async fn status_failure(
        &self,
        status: StatusCode,
        action: &str,
        response: reqwest::Response,
    ) -> Failure {
        if is_transient(status) {
            return Failure::Transient(format!("the registry answered {status}"));
        }
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            return Failure::Fatal(self.auth_failed());
        }
        Failure::Fatal(OciError::Registry {
            registry: self.host.clone(),
            action: action.to_string(),
            status: status.as_u16(),
            message: body_text(response).await,
        })
    }

    fn client_failure(&self, e: OciDistributionError) -> Failure {
        match e {
            OciDistributionError::RequestError(e) => transient(&e),
            OciDistributionError::ServerError { code, message, .. }
                if is_transient(StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY)) =>
            {
                Failure::Transient(format!("the registry answered {code}: {message}"))
            }
            OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_) => Failure::Fatal(self.auth_failed()),
            OciDistributionError::ImageManifestNotFoundError(_) => {
                Failure::Fatal(OciError::NotFound {
                    reference: format!("{}/{}", self.host, self.repository),
                })
            }
            OciDistributionError::RegistryError { envelope, .. }
                if envelope.errors.iter().any(|e| {
                    matches!(
                        e.code,
                        oci_client::errors::OciErrorCode::ManifestUnknown
                            | oci_client::errors::OciErrorCode::NameUnknown
                            | oci_client::errors::OciErrorCode::NotFound
                    )
                }) =>
            {
                Failure::Fatal(OciError::NotFound {
                    reference: format!("{}/{}", self.host, self.repository),
                })
            }
            other => Failure::Fatal(OciError::Registry {
                registry: self.host.clone(),
                action: "answer".into(),
                status: 0,
                message: other.to_string(),
            }),
        }
    }
}

struct UploadState {
    /// The upload session's current location, once started.
    session: Option<String>,
    /// Bytes the registry holds (as far as we know) and `hasher` has seen.
    offset: u64,
    hasher: Sha256,
}

const MANIFEST_TYPES: &[&str] = &[
    crate::store::layout::media::OCI_MANIFEST,
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

fn is_transient(s: StatusCode) -> bool {
    matches!(s.as_u16(), 408 | 429 | 500..=599)
}

fn transient(e: &reqwest::Error) -> Failure {
    Failure::Transient(error_chain(e))
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

async fn body_text(response: reqwest::Response) -> String {
    let text = response.text().await.unwrap_or_default();
    let text = text.trim();
    if text.len() > 300 {
        format!("{}…", &text[..text.floor_char_boundary(300)])
    } else {
        text.to_string()
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Failure> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Failure::Fatal(OciError::Task(e.to_string())))
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Fatal(e.into())
    }
}

/// A failure to reach the registry at all: unreachable, or HTTPS spoken to a plain-HTTP one.
fn classify_connect(host: &str, plain: bool, e: &(dyn std::error::Error + 'static)) -> OciError {
    let cause = error_chain(e);
    let looks_plain = [
        "InvalidContentType",
        "corrupt message",
        "wrong version number",
    ]
    .iter()
    .any(|s| cause.contains(s));
    if !plain && looks_plain {
        OciError::PlainHttpRegistry {
            registry: host.to_string(),
            cause,
        }
    } else {
        OciError::Unreachable {
            registry: host.to_string(),
            cause,
        }
    }
}

fn map_client_error(
    host: &str,
    plain: bool,
    credentials: &Credentials,
    e: OciDistributionError,
) -> OciError {
    match e {
        OciDistributionError::RequestError(e) => classify_connect(host, plain, &e),
        OciDistributionError::AuthenticationFailure(_)
        | OciDistributionError::UnauthorizedError { .. } => OciError::AuthFailed {
            registry: host.to_string(),
            origin: credentials.origin.clone(),
        },
        other => OciError::Registry {
            registry: host.to_string(),
            action: "authenticate".into(),
            status: 0,
            message: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(attempts: u32) -> Registry {
        Registry {
            http: reqwest::Client::new(),
            oci: oci_client::Client::new(ClientConfig::default()),
            base: "http://registry.invalid".into(),
            host: "registry.invalid".into(),
            repository: "r".into(),
            authorization: None,
            credentials: Credentials {
                auth: RegistryAuth::Anonymous,
                origin: String::new(),
            },
            options: OciOptions {
                attempts,
                first_backoff: Duration::from_millis(1),
                max_backoff: Duration::from_millis(2),
                ..OciOptions::default()
            },
        }
    }

    /// The one retry policy: transient failures are retried (each said, with its wait) until
    /// an attempt succeeds; a fatal one ends at once; the last transient one gives up naming
    /// the action, the attempts and the cause. The operation keeps its state across attempts
    /// (an `AsyncFnMut`, as a resumed download's file).
    #[tokio::test]
    async fn transient_failures_are_retried_and_give_up_after_the_last_attempt() {
        let r = registry(3);
        let mut calls = 0;
        let said = std::sync::Mutex::new(Vec::new());
        let got = r
            .retrying_noisy(
                "download it",
                |cause, wait| said.lock().expect("lock").push((cause.to_string(), wait)),
                async || {
                    calls += 1;
                    if calls < 3 {
                        Err(Failure::Transient(format!("hiccup {calls}")))
                    } else {
                        Ok(calls)
                    }
                },
            )
            .await;
        assert!(matches!(got, Ok(3)), "{got:?}");
        let said = said.into_inner().expect("lock");
        assert_eq!(
            said,
            [
                ("hiccup 1".to_string(), Duration::from_millis(1)),
                ("hiccup 2".to_string(), Duration::from_millis(2)),
            ]
        );

        let mut calls = 0;
        let got: Result<(), OciError> = r
            .retrying("download it", async || {
                calls += 1;
                Err(Failure::Transient(format!("hiccup {calls}")))
            })
            .await;
        match got {
            Err(OciError::GaveUp {
                action,
                attempts,
                cause,
                ..
            }) => {
                assert_eq!(
                    (action.as_str(), attempts, cause.as_str()),
                    ("download it", 3, "hiccup 3")
                );
            }
            other => panic!("{other:?}"),
        }

        let mut calls = 0;
        let got: Result<(), OciError> = r
            .retrying("download it", async || {
                calls += 1;
                Err(Failure::Fatal(OciError::Task("broken".into())))
            })
            .await;
        assert!(matches!(got, Err(OciError::Task(_))), "{got:?}");
        assert_eq!(calls, 1);
    }
}
