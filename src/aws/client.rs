//! One signed AWS request: SigV4 with `aws-sigv4` (the signer of AWS's own SDKs; no
//! hand-written crypto), sent with reqwest, its XML error decoded, retried with backoff when
//! the failure is transient. S3 (REST), EC2 and IAM (Query) all go through here. Requests
//! without credentials go unsigned (anonymous S3 reads).

use std::time::{Duration, SystemTime};

use aws_sigv4::http_request::{
    PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode, sign,
};
use aws_sigv4::sign::v4;
use sha2::{Digest, Sha256};

use super::credentials::AwsCredentials;
use super::xml::Element;

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("could not sign the request to {url}: {detail}")]
    Sign { url: String, detail: String },
    #[error("could not reach {service} at {endpoint}")]
    Transport {
        service: &'static str,
        endpoint: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{0}")]
    Service(Box<ServiceFailure>),
    /// `detail` names the endpoint.
    #[error("{service} answered something that is not an AWS response: {detail}")]
    BadResponse {
        service: &'static str,
        detail: String,
    },
}

/// What a service answered instead of success (boxed in [`RequestError`]: errors travel
/// through many `Result`s and should stay small).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceFailure {
    pub service: &'static str,
    pub status: u16,
    pub code: Option<String>,
    pub message: Option<String>,
    pub request_id: Option<String>,
    /// S3 names a bucket's region in this header when the request went to another.
    pub bucket_region: Option<String>,
}

impl std::fmt::Display for ServiceFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} answered HTTP {}", self.service, self.status)?;
        if let Some(code) = &self.code {
            write!(f, " {code}")?;
        }
        if let Some(message) = &self.message {
            write!(f, ": {message}")?;
        }
        if let Some(id) = &self.request_id {
            write!(f, " (request id {id})")?;
        }
        Ok(())
    }
}

impl RequestError {
    /// The AWS error code, if the service sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            RequestError::Service(f) => f.code.as_deref(),
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            RequestError::Service(f) => Some(f.status),
            _ => None,
        }
    }

    /// Worth another attempt: the network, a server error, throttling.
    pub fn is_transient(&self) -> bool {
        match self {
            RequestError::Transport { .. } => true,
            RequestError::Service(f) => {
                matches!(f.status, 500 | 502 | 503 | 504 | 429)
                    || matches!(
                        f.code.as_deref(),
                        Some(
                            "SlowDown"
                                | "RequestTimeout"
                                | "InternalError"
                                | "RequestLimitExceeded"
                                | "Throttling"
                                | "ThrottlingException"
                                | "ServiceUnavailable"
                                | "Unavailable"
                                | "RequestTimeTooSkewed"
                        )
                    )
            }
            RequestError::Sign { .. } | RequestError::BadResponse { .. } => false,
        }
    }

    /// The service refused who we are (wrong key, wrong secret, expired token).
    pub fn is_credentials(&self) -> bool {
        matches!(
            self.code(),
            Some(
                "InvalidAccessKeyId"
                    | "SignatureDoesNotMatch"
                    | "AuthFailure"
                    | "InvalidClientTokenId"
                    | "UnrecognizedClientException"
                    | "ExpiredToken"
                    | "ExpiredTokenException"
                    | "TokenRefreshRequired"
                    | "InvalidToken"
            )
        )
    }
}

/// Which AWS service a request is for: its SigV4 name and its signing rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    S3,
    Ec2,
    Iam,
}

impl Service {
    pub fn signing_name(self) -> &'static str {
        match self {
            Service::S3 => "s3",
            Service::Ec2 => "ec2",
            Service::Iam => "iam",
        }
    }

    pub fn display(self) -> &'static str {
        match self {
            Service::S3 => "S3",
            Service::Ec2 => "EC2",
            Service::Iam => "IAM",
        }
    }

    /// The service's AWS endpoint for `region` (IAM is global).
    pub fn aws_endpoint(self, region: &str) -> String {
        match self {
            Service::Iam => "https://iam.amazonaws.com".to_string(),
            _ => format!("https://{}.{region}.amazonaws.com", self.signing_name()),
        }
    }
}

/// How often to try a request, and how long to wait in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all (1 means no retry). Default 5.
    pub attempts: u32,
    /// Wait before the second attempt; doubled each time, at most `max_delay`. Default 1 s.
    pub base_delay: Duration,
    /// Default 20 s.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 5,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(20),
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt `attempt` (1-based): exponential, with ±25% jitter so
    /// parallel part uploads do not retry in lockstep.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)));
        let capped = exp.min(self.max_delay);
        let jitter = (uuid::Uuid::new_v4().as_u128() % 500) as f64 / 1000.0 + 0.75;
        capped.mul_f64(jitter)
    }
}

/// A request before signing.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: &'static str,
    /// Fully encoded (path segments and query values percent-encoded).
    pub url: String,
    /// Headers to sign and send (lowercase names).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// A service refused the credentials (wrong key or secret, expired token): one message for
/// every service.
#[derive(Debug, thiserror::Error)]
#[error(
    "{service} at {endpoint} refused the credentials ({who}): check the secret access key{}",
    if *has_token { " and the session token (it may have expired)" } else { "" }
)]
pub struct CredentialsRefused {
    /// `S3`, `EC2`.
    pub service: &'static str,
    pub endpoint: String,
    /// `access key AKIA… from <source>`.
    pub who: String,
    pub has_token: bool,
    #[source]
    pub source: RequestError,
}

/// `access key AKIA… from <where>`, for messages (the key id is not a secret).
pub(crate) fn describe(credentials: Option<&AwsCredentials>) -> String {
    match credentials {
        Some(c) => format!("access key {} from {}", c.access_key_id(), c.source),
        None => "no credentials: unsigned requests".to_string(),
    }
}

impl Request {
    /// A request without headers of its own or a body.
    pub fn bare(method: &'static str, url: String) -> Request {
        Request {
            method,
            url,
            headers: vec![],
            body: vec![],
        }
    }
}

/// A response with a success status (and, for S3, no `<Error>` hidden in a 200).
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    pub fn xml(&self, service: Service, endpoint: &str) -> Result<Element, RequestError> {
        let text = String::from_utf8_lossy(&self.body);
        Element::parse(&text).map_err(|e| RequestError::BadResponse {
            service: service.display(),
            detail: format!("{e} (from {endpoint})"),
        })
    }
}

/// Signs and sends requests for one service in one region.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    /// `None`: requests go unsigned.
    credentials: Option<AwsCredentials>,
    pub region: String,
    pub service: Service,
    /// A custom endpoint (an S3-compatible server, a fake) as requests use it (no trailing
    /// `/`); every region goes there. `None`: AWS's endpoint for the service and region.
    pub custom: Option<String>,
    /// Where requests go: the custom endpoint, else AWS's.
    pub endpoint: String,
    pub retry: RetryPolicy,
}

/// The HTTP client every AWS request uses: bounded connect time, and a read timeout long
/// enough for a slow part upload but short enough that a dead server is noticed.
#[expect(
    clippy::expect_used,
    reason = "the builder sets only timeouts; it fails only when the TLS backend cannot start, which no input causes"
)]
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(20))
        .read_timeout(Duration::from_secs(120))
        .user_agent(concat!("builder/", env!("CARGO_PKG_VERSION")))
        // A redirect would be sent unsigned for its new host; S3's redirects mean "wrong
        // region", which HeadBucket reports instead.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("a reqwest client with rustls and timeouts always builds")
}

impl Client {
    /// `endpoint`: a custom endpoint, `None` for AWS. `Err` with the endpoint as written when
    /// it is not an http:// or https:// URL with a host.
    pub fn new(
        http: reqwest::Client,
        credentials: Option<AwsCredentials>,
        region: &str,
        service: Service,
        endpoint: Option<&str>,
        retry: RetryPolicy,
    ) -> Result<Self, String> {
        let custom = match endpoint {
            Some(e) if !valid_endpoint(e) => return Err(e.to_string()),
            e => e.map(|e| e.trim_end_matches('/').to_string()),
        };
        Ok(Self {
            http,
            credentials,
            region: region.to_string(),
            service,
            endpoint: custom
                .clone()
                .unwrap_or_else(|| service.aws_endpoint(region)),
            custom,
            retry,
        })
    }

    /// `source` (a refusal of the credentials) as the error that names them.
    pub fn refused(&self, source: RequestError) -> Box<CredentialsRefused> {
        Box::new(CredentialsRefused {
            service: self.service.display(),
            endpoint: self.endpoint.clone(),
            who: describe(self.credentials.as_ref()),
            has_token: self
                .credentials
                .as_ref()
                .is_some_and(AwsCredentials::has_session_token),
            source,
        })
    }

    pub fn credentials(&self) -> Option<&AwsCredentials> {
        self.credentials.as_ref()
    }

    /// The same credentials and endpoint for another region (EC2 in each copy destination).
    pub fn for_region(&self, region: &str) -> Client {
        Client {
            region: region.to_string(),
            endpoint: self
                .custom
                .clone()
                .unwrap_or_else(|| self.service.aws_endpoint(region)),
            ..self.clone()
        }
    }

    fn transport(&self, source: reqwest::Error) -> RequestError {
        RequestError::Transport {
            service: self.service.display(),
            endpoint: self.endpoint.clone(),
            source,
        }
    }

    /// One attempt, up to the answer's headers: a success status gives the response to read
    /// (or stream) its body from; any other the service's error.
    pub async fn start(&self, request: &Request) -> Result<reqwest::Response, RequestError> {
        // Without credentials the request goes unsigned.
        let signed = match &self.credentials {
            Some(c) => sign_request(c, &self.region, self.service, request, SystemTime::now())?,
            None => Vec::new(),
        };
        #[expect(
            clippy::expect_used,
            reason = "every request method is a constant such as GET or PUT"
        )]
        let method = reqwest::Method::from_bytes(request.method.as_bytes())
            .expect("request methods are constants");
        let mut builder = self.http.request(method, &request.url);
        for (name, value) in request.headers.iter().chain(signed.iter()) {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let response = builder
            .body(request.body.clone())
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let response = self.read(response).await?;
        let root = Element::parse(&String::from_utf8_lossy(&response.body)).ok();
        Err(self.service_error(&response, root.as_ref()))
    }

    async fn read(&self, response: reqwest::Response) -> Result<Response, RequestError> {
        Ok(Response {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            body: response
                .bytes()
                .await
                .map_err(|e| self.transport(e))?
                .to_vec(),
        })
    }

    /// One attempt.
    pub async fn send_once(&self, request: &Request) -> Result<Response, RequestError> {
        let response = self.read(self.start(request).await?).await?;
        // S3 may answer 200 and put an <Error> in the body (CompleteMultipartUpload).
        if self.service == Service::S3
            && response.body.len() < 64 * 1024
            && let Ok(root) = Element::parse(&String::from_utf8_lossy(&response.body))
            && root.name == "Error"
        {
            return Err(self.service_error(&response, Some(&root)));
        }
        Ok(response)
    }

    fn service_error(&self, response: &Response, root: Option<&Element>) -> RequestError {
        // S3: <Error><Code>; EC2: <Response><Errors><Error><Code>; IAM: <ErrorResponse><Error>.
        let error = root.and_then(|r| {
            if r.name == "Error" {
                Some(r)
            } else {
                r.find("Error")
            }
        });
        let request_id = root
            .and_then(|r| {
                r.find("RequestId")
                    .or_else(|| r.find("RequestID"))
                    .map(|e| e.text.trim().to_string())
            })
            .or_else(|| response.header("x-amz-request-id"))
            .filter(|s| !s.is_empty());
        // HEAD answers have no body, hence no code: callers look at the status then.
        let code = error.and_then(|e| e.text_at(&["Code"]));
        RequestError::Service(Box::new(ServiceFailure {
            service: self.service.display(),
            status: response.status,
            code,
            message: error.and_then(|e| e.text_at(&["Message"])),
            request_id,
            bucket_region: response.header("x-amz-bucket-region"),
        }))
    }

    /// Attempts until success, a failure that is not transient, or the policy's last attempt.
    pub async fn send(&self, request: &Request) -> Result<Response, RequestError> {
        let mut attempt = 1;
        loop {
            match self.send_once(request).await {
                Ok(response) => return Ok(response),
                Err(e) if e.is_transient() && attempt < self.retry.attempts => {
                    tokio::time::sleep(self.retry.delay(attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// [`Self::send`], then read the XML answer.
    pub async fn send_xml(&self, request: &Request) -> Result<Element, RequestError> {
        self.send(request).await?.xml(self.service, &self.endpoint)
    }
}

/// SigV4 headers for `request` at `time`. Public to the crate so tests (and the EC2 fake)
/// sign exactly as requests are signed.
pub fn sign_request(
    credentials: &AwsCredentials,
    region: &str,
    service: Service,
    request: &Request,
    time: SystemTime,
) -> Result<Vec<(String, String)>, RequestError> {
    let identity = credentials.to_signing().into();
    let mut settings = SigningSettings::default();
    let body = if service == Service::S3 {
        // S3 signs the path as sent (no normalization, no double encoding) and wants the
        // payload hash in x-amz-content-sha256; servers check the body against it.
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        SignableBody::Precomputed(hex::encode(Sha256::digest(&request.body)))
    } else {
        SignableBody::Bytes(&request.body)
    };
    let err = |detail: String| RequestError::Sign {
        url: request.url.clone(),
        detail,
    };
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service.signing_name())
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| err(e.to_string()))?
        .into();
    let signable = SignableRequest::new(
        request.method,
        request.url.as_str(),
        request
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str())),
        body,
    )
    .map_err(|e| err(e.to_string()))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| err(e.to_string()))?
        .into_parts();
    Ok(instructions
        .headers()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// Percent-encode everything but RFC 3986's unreserved characters (what SigV4 expects in
/// query strings and form bodies).
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-encode an S3 key for a URL path: each segment encoded, `/` kept.
pub fn encode_path(key: &str) -> String {
    key.split('/').map(encode).collect::<Vec<_>>().join("/")
}

/// A form body's name or value (`application/x-www-form-urlencoded`): [`encode`], but a space
/// is `+`, as the form encoding and the AWS SDKs write it. The signature covers the body's
/// bytes, so either spelling is valid for AWS; servers that check the signature over their own
/// re-encoding of the form (moto does) accept only this one.
pub fn form_encode(text: &str) -> String {
    text.split(' ').map(encode).collect::<Vec<_>>().join("+")
}

/// A Query API call (EC2, IAM): a form-encoded POST to the endpoint's root.
pub fn query_request(
    endpoint: &str,
    action: &str,
    version: &str,
    params: &[(String, String)],
) -> Request {
    let mut body = format!(
        "Action={}&Version={}",
        form_encode(action),
        form_encode(version)
    );
    for (name, value) in params {
        body.push('&');
        body.push_str(&form_encode(name));
        body.push('=');
        body.push_str(&form_encode(value));
    }
    let base = endpoint.trim_end_matches('/');
    Request {
        method: "POST",
        url: format!("{base}/"),
        headers: vec![(
            "content-type".into(),
            "application/x-www-form-urlencoded; charset=utf-8".into(),
        )],
        body: body.into_bytes(),
    }
}

/// A user-given endpoint is an http(s) URL with a host.
pub fn valid_endpoint(endpoint: &str) -> bool {
    reqwest::Url::parse(endpoint)
        .map(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_keeps_only_unreserved_characters() {
        assert_eq!(
            encode("a b/c+d~e_f.g-h=é"),
            "a%20b%2Fc%2Bd~e_f.g-h%3D%C3%A9"
        );
        assert_eq!(
            encode_path("dir one/file+1.vmdk"),
            "dir%20one/file%2B1.vmdk"
        );
        assert_eq!(
            form_encode("web 1.2.0 (build 3)+x"),
            "web+1.2.0+%28build+3%29%2Bx"
        );
    }

    #[test]
    fn transient_failures_are_retried_and_others_not() {
        let service = |status, code: &str| {
            RequestError::Service(Box::new(ServiceFailure {
                service: "S3",
                status,
                code: Some(code.to_string()),
                message: None,
                request_id: None,
                bucket_region: None,
            }))
        };
        assert!(service(503, "SlowDown").is_transient());
        assert!(service(400, "RequestLimitExceeded").is_transient());
        assert!(!service(403, "SignatureDoesNotMatch").is_transient());
        assert!(service(403, "SignatureDoesNotMatch").is_credentials());
        assert!(!service(404, "NoSuchBucket").is_transient());
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let policy = RetryPolicy {
            attempts: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(300),
        };
        let first = policy.delay(1);
        assert!(first >= Duration::from_millis(75) && first <= Duration::from_millis(125));
        let second = policy.delay(2);
        assert!(second >= Duration::from_millis(150) && second <= Duration::from_millis(250));
        assert!(policy.delay(10) <= Duration::from_millis(375));
    }

    #[test]
    fn signatures_cover_the_session_token_and_payload() {
        let creds = AwsCredentials::new("AKID", "secret", Some("token".into()), "test");
        let request = Request {
            method: "PUT",
            url: "http://127.0.0.1:9000/bucket/key?partNumber=1&uploadId=u".into(),
            headers: vec![],
            body: b"hello".to_vec(),
        };
        let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let headers =
            sign_request(&creds, "eu-west-1", Service::S3, &request, time).expect("signs");
        let get = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        assert_eq!(
            get("x-amz-content-sha256"),
            hex::encode(Sha256::digest(b"hello"))
        );
        assert_eq!(get("x-amz-security-token"), "token");
        let auth = get("authorization");
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=AKID/20231114/eu-west-1/s3/aws4_request"),
            "{auth}"
        );
        assert!(auth.contains("x-amz-security-token"), "{auth}");
        // The same request at the same time signs the same; another body does not.
        let again = sign_request(&creds, "eu-west-1", Service::S3, &request, time).expect("signs");
        assert_eq!(headers, again);
        let other = Request {
            body: b"other".to_vec(),
            ..request
        };
        let other = sign_request(&creds, "eu-west-1", Service::S3, &other, time).expect("signs");
        assert_ne!(headers, other);
    }
}
