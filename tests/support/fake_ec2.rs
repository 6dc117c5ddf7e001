//! A scripted fake of EC2's and IAM's Query APIs, for the AMI import tests.
//!
//! It is a fake because nothing we can run implements VM Import (no S3-compatible server
//! or AWS emulator has ImportSnapshot). What it does check is real: every request's SigV4
//! signature is recomputed with `aws-sigv4` from the known test credentials and compared
//! with the `Authorization` header as received (so the body, the URL and the signed headers
//! must arrive exactly as signed, for the right service and region); the scope's service
//! must match the action (IAM's GetRole is signed for `iam` in us-east-1, the rest for
//! `ec2`); and every call with its form parameters is recorded for the test to assert on.
//! Answers are the XML EC2 and IAM send, trimmed to the fields builder reads.
//!
//! HTTP/1.1 by hand on a tokio listener: one request per connection (`Connection: close`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request the fake answered.
#[derive(Debug, Clone)]
pub struct Call {
    /// `ec2` or `iam`, from the signature's scope.
    pub service: String,
    /// The signature's region.
    pub region: String,
    pub action: String,
    pub params: BTreeMap<String, String>,
    /// `x-amz-security-token`, when temporary credentials signed the request.
    pub session_token: Option<String>,
}

impl Call {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    pub fn is_dry_run(&self) -> bool {
        self.param("DryRun") == Some("true")
    }
}

/// What the fake answers.
#[derive(Debug, Clone)]
pub struct Script {
    /// GetRole finds the role.
    pub role_exists: bool,
    /// DescribeImages by name finds these (name → image id).
    pub existing_names: BTreeMap<String, String>,
    /// DescribeImportSnapshotTasks answers `active` this many times (30%, then 70%)
    /// before `completed`.
    pub active_polls: usize,
    /// After the active polls the snapshot task ends `deleted` with this status message
    /// (how VM Import reports a failure) instead of `completed`.
    pub fail_with: Option<String>,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            role_exists: true,
            existing_names: BTreeMap::new(),
            active_polls: 1,
            fail_with: None,
        }
    }
}

#[derive(Default)]
struct State {
    calls: Vec<Call>,
    /// Requests whose signature did not verify, with why.
    rejected: Vec<String>,
    snapshot_polls: usize,
    image_polls: usize,
}

pub struct FakeEc2 {
    pub port: u16,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeEc2 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeEc2 {
    /// Listen on 127.0.0.1 (a free port), verifying signatures made with `key`/`secret`.
    pub async fn start(key: &str, secret: &str, script: Script) -> FakeEc2 {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let key = key.to_string();
        let secret = secret.to_string();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let state = shared.clone();
                let (key, secret, script) = (key.clone(), secret.clone(), script.clone());
                tokio::spawn(async move {
                    let _ = serve(stream, &key, &secret, &script, &state).await;
                });
            }
        });
        FakeEc2 { port, state, task }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().expect("state").calls.clone()
    }

    /// Calls that were not dry runs, by action, in order.
    pub fn actions(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| !c.is_dry_run())
            .map(|c| c.action)
            .collect()
    }

    pub fn rejected(&self) -> Vec<String> {
        self.state.lock().expect("state").rejected.clone()
    }
}

struct HttpRequest {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

async fn read_request(stream: &mut TcpStream) -> std::io::Result<HttpRequest> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::other(
                "connection closed in the request head",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let first = lines.next().unwrap_or_default();
    let mut parts = first.split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok(HttpRequest {
        method,
        target,
        headers,
        body,
    })
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => out.push(b),
                    Err(_) => out.extend_from_slice(&bytes[i..i + 3]),
                }
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Recompute the request's signature from the known credentials; `Err` says why it fails.
fn verify_signature(
    request: &HttpRequest,
    key: &str,
    secret: &str,
) -> Result<(String, String), String> {
    use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
    use aws_sigv4::sign::v4;

    let auth = request
        .header("authorization")
        .ok_or("no Authorization header")?;
    let rest = auth
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or("not an AWS4-HMAC-SHA256 signature")?;
    let field = |name: &str| {
        rest.split(',')
            .map(str::trim)
            .find_map(|p| p.strip_prefix(name))
            .map(str::to_string)
    };
    let credential = field("Credential=").ok_or("no Credential")?;
    let signed_headers = field("SignedHeaders=").ok_or("no SignedHeaders")?;
    let scope: Vec<&str> = credential.split('/').collect();
    let [access_key, _date, region, service, "aws4_request"] = scope[..] else {
        return Err(format!("malformed credential scope `{credential}`"));
    };
    if access_key != key {
        return Err(format!("unknown access key `{access_key}`"));
    }
    let amz_date = request.header("x-amz-date").ok_or("no x-amz-date")?;
    let time: SystemTime = chrono::NaiveDateTime::parse_from_str(amz_date, "%Y%m%dT%H%M%SZ")
        .map_err(|e| format!("bad x-amz-date `{amz_date}`: {e}"))?
        .and_utc()
        .into();
    let token = request.header("x-amz-security-token").map(str::to_string);
    let host = request.header("host").ok_or("no Host header")?;
    let url = format!("http://{host}{}", request.target);
    // The signer adds host, x-amz-date and the token itself; give it the other signed ones.
    let headers: Vec<(&str, &str)> = signed_headers
        .split(';')
        .filter(|h| !matches!(*h, "host" | "x-amz-date" | "x-amz-security-token"))
        .map(|h| (h, request.header(h).unwrap_or("")))
        .collect();
    let identity = aws_credential_types::Credentials::new(key, secret, token, None, "fake").into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| e.to_string())?
        .into();
    let signable = SignableRequest::new(
        &request.method,
        url.as_str(),
        headers.into_iter(),
        SignableBody::Bytes(&request.body),
    )
    .map_err(|e| e.to_string())?;
    let (instructions, _) = sign(signable, &params)
        .map_err(|e| e.to_string())?
        .into_parts();
    let expected = instructions
        .headers()
        .find(|(k, _)| *k == "authorization")
        .map(|(_, v)| v.to_string())
        .ok_or("the signer made no Authorization header")?;
    if expected != auth {
        return Err(format!(
            "signature mismatch for {} {}: got `{auth}`, expected `{expected}`",
            request.method, request.target
        ));
    }
    Ok((service.to_string(), region.to_string()))
}

fn ec2_error(status: u16, code: &str, message: &str) -> (u16, String) {
    (
        status,
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>fake-request</RequestID></Response>"
        ),
    )
}

fn ec2_ok(action: &str, inner: &str) -> (u16, String) {
    (
        200,
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<{action}Response xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>fake-request</requestId>{inner}</{action}Response>"
        ),
    )
}

/// The snapshot behind an image id the fake handed out.
fn snapshot_of(image_id: &str) -> String {
    image_id.replace("ami-", "snap-")
}

fn answer(call: &Call, script: &Script, state: &Mutex<State>) -> (u16, String) {
    let action = call.action.as_str();
    if call.service == "iam" {
        return match action {
            "GetRole" if script.role_exists => (
                200,
                format!(
                    "<GetRoleResponse xmlns=\"https://iam.amazonaws.com/doc/2010-05-08/\"><GetRoleResult><Role><RoleName>{0}</RoleName><Arn>arn:aws:iam::111122223333:role/{0}</Arn></Role></GetRoleResult><ResponseMetadata><RequestId>fake</RequestId></ResponseMetadata></GetRoleResponse>",
                    call.param("RoleName").unwrap_or_default()
                ),
            ),
            "GetRole" => (
                404,
                format!(
                    "<ErrorResponse xmlns=\"https://iam.amazonaws.com/doc/2010-05-08/\"><Error><Type>Sender</Type><Code>NoSuchEntity</Code><Message>The role with name {} cannot be found.</Message></Error><RequestId>fake</RequestId></ErrorResponse>",
                    call.param("RoleName").unwrap_or_default()
                ),
            ),
            other => (
                400,
                format!(
                    "<ErrorResponse><Error><Code>InvalidAction</Code><Message>{other}</Message></Error></ErrorResponse>"
                ),
            ),
        };
    }
    if call.is_dry_run() {
        return ec2_error(
            412,
            "DryRunOperation",
            "Request would have succeeded, but DryRun flag is set.",
        );
    }
    match action {
        "ImportSnapshot" => ec2_ok(
            action,
            "<importTaskId>import-snap-0fake</importTaskId><snapshotTaskDetail><status>active</status><progress>0</progress></snapshotTaskDetail>",
        ),
        "ImportImage" => ec2_ok(
            action,
            "<importTaskId>import-ami-0fake</importTaskId><status>active</status>",
        ),
        "DescribeImportSnapshotTasks" => {
            let mut s = state.lock().expect("state");
            s.snapshot_polls += 1;
            let detail = if s.snapshot_polls <= script.active_polls {
                let progress = if s.snapshot_polls == 1 { 30 } else { 70 };
                format!(
                    "<status>active</status><progress>{progress}</progress><statusMessage>converting</statusMessage>"
                )
            } else if let Some(message) = &script.fail_with {
                format!("<status>deleted</status><statusMessage>{message}</statusMessage>")
            } else {
                "<status>completed</status><snapshotId>snap-0fake</snapshotId><diskImageSize>1.0</diskImageSize><format>VMDK</format>".to_string()
            };
            ec2_ok(
                action,
                &format!(
                    "<importSnapshotTaskSet><item><importTaskId>{}</importTaskId><snapshotTaskDetail>{detail}</snapshotTaskDetail></item></importSnapshotTaskSet>",
                    call.param("ImportTaskId.1").unwrap_or_default()
                ),
            )
        }
        "DescribeImportImageTasks" => {
            let mut s = state.lock().expect("state");
            s.image_polls += 1;
            let body = if s.image_polls <= script.active_polls {
                "<status>active</status><progress>30</progress><statusMessage>converting</statusMessage>".to_string()
            } else {
                "<status>completed</status><imageId>ami-0imported</imageId><snapshotDetailSet><item><snapshotId>snap-0imported</snapshotId></item></snapshotDetailSet>".to_string()
            };
            ec2_ok(
                action,
                &format!(
                    "<importImageTaskSet><item><importTaskId>{}</importTaskId>{body}</item></importImageTaskSet>",
                    call.param("ImportTaskId.1").unwrap_or_default()
                ),
            )
        }
        "RegisterImage" => ec2_ok(action, "<imageId>ami-0fake</imageId>"),
        "CopyImage" => ec2_ok(
            action,
            &format!("<imageId>ami-0copy-{}</imageId>", call.region),
        ),
        "DescribeImages" => {
            if let Some(name) = call.param("Filter.1.Value.1") {
                let items = script
                    .existing_names
                    .get(name)
                    .map(|id| format!("<item><imageId>{id}</imageId><name>{name}</name><imageState>available</imageState></item>"))
                    .unwrap_or_default();
                return ec2_ok(action, &format!("<imagesSet>{items}</imagesSet>"));
            }
            let id = call.param("ImageId.1").unwrap_or_default();
            ec2_ok(
                action,
                &format!(
                    "<imagesSet><item><imageId>{id}</imageId><imageState>available</imageState><blockDeviceMapping><item><deviceName>/dev/xvda</deviceName><ebs><snapshotId>{}</snapshotId></ebs></item></blockDeviceMapping></item></imagesSet>",
                    snapshot_of(id)
                ),
            )
        }
        "CreateTags" | "ModifyImageAttribute" | "CancelImportTask" => {
            ec2_ok(action, "<return>true</return>")
        }
        other => ec2_error(
            400,
            "InvalidAction",
            &format!("The action {other} is not valid for this web service."),
        ),
    }
}

async fn serve(
    mut stream: TcpStream,
    key: &str,
    secret: &str,
    script: &Script,
    state: &Mutex<State>,
) -> std::io::Result<()> {
    let request = read_request(&mut stream).await?;
    let (status, body) = match verify_signature(&request, key, secret) {
        Err(why) => {
            state.lock().expect("state").rejected.push(why.clone());
            let code = if why.starts_with("unknown access key") {
                "AuthFailure"
            } else {
                "SignatureDoesNotMatch"
            };
            ec2_error(401, code, &why.replace('<', "&lt;"))
        }
        Ok((service, region)) => {
            let form = String::from_utf8_lossy(&request.body).into_owned();
            let mut params: BTreeMap<String, String> = form
                .split('&')
                .filter(|p| !p.is_empty())
                .filter_map(|p| p.split_once('='))
                .map(|(k, v)| (decode(k), decode(v)))
                .collect();
            let action = params.remove("Action").unwrap_or_default();
            let version = params.remove("Version").unwrap_or_default();
            let expected_service = if action == "GetRole" { "iam" } else { "ec2" };
            let expected_version = if action == "GetRole" {
                "2010-05-08"
            } else {
                "2016-11-15"
            };
            if service != expected_service || version != expected_version {
                let why = format!(
                    "{action} was signed for `{service}` with Version `{version}`; expected `{expected_service}` and `{expected_version}`"
                );
                state.lock().expect("state").rejected.push(why.clone());
                ec2_error(400, "InvalidRequest", &why)
            } else {
                let call = Call {
                    service,
                    region,
                    action,
                    params,
                    session_token: request.header("x-amz-security-token").map(str::to_string),
                };
                let answer = answer(&call, script, state);
                state.lock().expect("state").calls.push(call);
                answer
            }
        }
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        412 => "Precondition Failed",
        _ => "Error",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/xml;charset=UTF-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
