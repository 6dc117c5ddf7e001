//! AWS AMI import (`builder::distribute::aws`).
//!
//! S3 is real: `s3s-fs` (an S3-compatible server, installed by scripts/install-deps) on
//! loopback checks every signature and each part's signed SHA-256. EC2 and IAM are a
//! scripted fake (`support/fake_ec2.rs`) because nothing we can run implements VM Import;
//! the fake recomputes every request's SigV4 signature and records each action with its
//! parameters for the assertions below.
//!
//! The tests that need s3s-fs are ignored unless `BUILDER_S3_TESTS=1` (set by scripts/test,
//! so CI); with it, a missing s3s-fs fails them and says how to install it
//! (tests/support/s3s.rs).

#[path = "support/fake_ec2.rs"]
mod fake_ec2;
#[path = "support/s3s.rs"]
mod s3s;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use builder::distribute::Progress;
use builder::distribute::aws::client::http_client;
use builder::distribute::aws::ec2::{Ec2Client, Ec2Error};
use builder::distribute::aws::{
    AmiOptions, AwsCredentials, AwsError, ImportMethod, RetryPolicy, S3Client, S3Error,
    UploadOptions, Uploaded, import_ami, preflight, upload_multipart,
};
use builder::export::Format;
use builder::export::manifest::ImageId;
use builder::store::{StoredDisk, StoredImage};
use fake_ec2::{FakeEc2, Script};
use s3s::{KEY, S3Server, SECRET, free_port};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const BUCKET: &str = "imports";
const MIB: u64 = 1024 * 1024;

// ---- a proxy in front of s3s-fs that counts part uploads and can refuse them

/// Forwards HTTP/1.1 requests to the server one by one, counting `PUT …?partNumber=`
/// requests. With a budget set, the part upload past the budget has its connection cut
/// before any byte reaches the server (as if the server went away mid-upload).
struct PartProxy {
    port: u16,
    parts: Arc<AtomicUsize>,
    /// Part uploads still allowed; negative means unlimited.
    budget: Arc<AtomicI64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PartProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PartProxy {
    async fn start(upstream: u16) -> PartProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let parts = Arc::new(AtomicUsize::new(0));
        let budget = Arc::new(AtomicI64::new(-1));
        let (p, b) = (parts.clone(), budget.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (p, b) = (p.clone(), b.clone());
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let (client_read, mut client_write) = client.into_split();
                    let (mut server_read, server_write) = server.into_split();
                    tokio::select! {
                        _ = forward_requests(client_read, server_write, &p, &b) => {}
                        _ = tokio::io::copy(&mut server_read, &mut client_write) => {}
                    }
                });
            }
        });
        PartProxy {
            port,
            parts,
            budget,
            task,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

async fn forward_requests(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    parts: &AtomicUsize,
    budget: &AtomicI64,
) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let head_end = loop {
            if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos + 4;
            }
            let n = from.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let first = head.lines().next().unwrap_or_default().to_string();
        let length: usize = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        if first.starts_with("PUT ") && first.contains("partNumber=") {
            if budget.load(Ordering::SeqCst) == 0 {
                return Err(std::io::Error::other("part refused by the test"));
            }
            budget.fetch_sub(1, Ordering::SeqCst);
            parts.fetch_add(1, Ordering::SeqCst);
        }
        to.write_all(&buf[..head_end]).await?;
        buf.drain(..head_end);
        let mut remaining = length;
        while remaining > 0 {
            if buf.is_empty() {
                let n = from.read(&mut chunk).await?;
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let take = remaining.min(buf.len());
            to.write_all(&buf[..take]).await?;
            buf.drain(..take);
            remaining -= take;
        }
    }
}

// ---- helpers

/// Records what the code reports; optionally cancels once the first part is done.
#[derive(Default)]
struct Recorder {
    steps: Mutex<Vec<String>>,
    transfers: Mutex<Vec<(u64, Option<u64>)>>,
    cancel_after_first_part: Option<CancellationToken>,
    /// Cancel when a step starting with this text is reported.
    cancel_on_step: Option<(&'static str, CancellationToken)>,
}

impl Progress for Recorder {
    fn step(&self, target: &str, message: &str) {
        assert_eq!(target, "ami");
        self.steps.lock().expect("steps").push(message.to_string());
        if let Some((prefix, token)) = &self.cancel_on_step
            && message.starts_with(prefix)
        {
            token.cancel();
        }
    }
    fn transfer(&self, _target: &str, _what: &str, done: u64, total: Option<u64>) {
        self.transfers
            .lock()
            .expect("transfers")
            .push((done, total));
        if done > 0
            && let Some(token) = &self.cancel_after_first_part
        {
            token.cancel();
        }
    }
}

fn credentials(secret: &str) -> AwsCredentials {
    AwsCredentials::new(KEY, secret, None, "test")
}

fn quick_retries() -> RetryPolicy {
    RetryPolicy {
        attempts: 2,
        base_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(50),
    }
}

fn s3_client(endpoint: &str, secret: &str) -> S3Client {
    S3Client::new(
        http_client(),
        credentials(secret),
        "us-east-1",
        Some(endpoint),
        quick_retries(),
    )
    .expect("valid endpoint")
}

/// `size` bytes that differ from part to part (xorshift), written to `dir/name`.
fn random_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15 ^ size;
    let mut bytes = Vec::with_capacity(size as usize);
    while (bytes.len() as u64) < size {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(size as usize);
    let path = dir.join(name);
    std::fs::write(&path, &bytes).expect("write");
    path
}

fn upload_options(state_dir: &Path) -> UploadOptions {
    UploadOptions {
        part_size: 5 * MIB,
        concurrency: 2,
        state_dir: state_dir.to_path_buf(),
        cancel: None,
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A temp folder with a `size`-byte `disk.vmdk` to upload and the path of its state folder.
fn upload_work(size: u64) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let work = tempfile::tempdir().expect("temp dir");
    let file = random_file(work.path(), "disk.vmdk", size);
    let state = work.path().join("state");
    (work, file, state)
}

/// Upload `file` to `BUCKET/key` with the test's part size and concurrency.
async fn upload(
    s3: &S3Client,
    file: &Path,
    key: &str,
    state: &Path,
    progress: &Recorder,
) -> Result<Uploaded, S3Error> {
    upload_multipart(
        s3,
        file,
        BUCKET,
        key,
        &upload_options(state),
        progress,
        "ami",
    )
    .await
}

fn assert_no_state(state: &Path) {
    assert!(files_in(state).is_empty(), "left: {:?}", files_in(state));
}

/// Files (not folders) anywhere under `dir`, as paths relative to it.
fn files_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if let Ok(relative) = path.strip_prefix(dir) {
                found.push(relative.display().to_string());
            }
        }
    }
    found
}

// ---- S3 against s3s-fs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(s3_tier),
    ignore = "S3 tier: set BUILDER_S3_TESTS=1 after scripts/install-deps (scripts/test does)"
)]
async fn multipart_upload_of_a_file_larger_than_one_part() {
    let server = S3Server::start(BUCKET);
    let (_work, file, state) = upload_work(12 * MIB + 123);
    let s3 = s3_client(&server.endpoint(), SECRET);
    let progress = Recorder::default();

    let uploaded = upload(&s3, &file, "dir/disk one.vmdk", &state, &progress)
        .await
        .expect("uploads");

    let original = std::fs::read(&file).expect("read");
    assert_eq!(uploaded.parts, 3);
    assert_eq!(uploaded.parts_reused, 0);
    assert_eq!(uploaded.size, original.len() as u64);
    assert_eq!(uploaded.sha256, hex::encode(Sha256::digest(&original)));
    assert!(
        uploaded.etag.ends_with("-3\""),
        "a multipart ETag: {}",
        uploaded.etag
    );
    let stored = server.stored(BUCKET, "dir/disk one.vmdk").expect("stored");
    assert!(
        stored == original,
        "the stored object differs from the file"
    );
    assert_no_state(&state);
    assert!(server.pending_uploads().is_empty());
    let transfers = progress.transfers.lock().expect("transfers").clone();
    assert_eq!(transfers.first(), Some(&(0, Some(original.len() as u64))));
    assert_eq!(
        transfers.last(),
        Some(&(original.len() as u64, Some(original.len() as u64)))
    );
    assert_eq!(
        transfers.len(),
        4,
        "one report at the start and one per part"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(s3_tier),
    ignore = "S3 tier: set BUILDER_S3_TESTS=1 after scripts/install-deps (scripts/test does)"
)]
async fn an_interrupted_upload_resumes_with_only_the_missing_parts() {
    let server = S3Server::start(BUCKET);
    let proxy = PartProxy::start(server.port).await;
    let (_work, file, state) = upload_work(12 * MIB);
    let s3 = s3_client(&proxy.endpoint(), SECRET);

    // First run: the server takes one part, then part uploads fail (connections cut).
    proxy.budget.store(1, Ordering::SeqCst);
    let err = upload(&s3, &file, "disk.vmdk", &state, &Recorder::default())
        .await
        .expect_err("parts are refused");
    let text = err.to_string();
    assert!(
        matches!(&err, S3Error::Interrupted(i) if i.done == 1 && i.total == 3),
        "{text}"
    );
    assert!(
        text.contains("run the same command again to resume"),
        "{text}"
    );
    assert_eq!(files_in(&state).len(), 1, "the resume state is kept");
    assert_eq!(server.stored(BUCKET, "disk.vmdk"), None);
    assert_eq!(proxy.parts.load(Ordering::SeqCst), 1);

    // Second run: only the two missing parts are sent.
    proxy.budget.store(-1, Ordering::SeqCst);
    proxy.parts.store(0, Ordering::SeqCst);
    let uploaded = upload(&s3, &file, "disk.vmdk", &state, &Recorder::default())
        .await
        .expect("resumes");
    assert_eq!(uploaded.parts, 3);
    assert_eq!(uploaded.parts_reused, 1);
    assert_eq!(
        proxy.parts.load(Ordering::SeqCst),
        2,
        "only the missing parts were sent"
    );
    let original = std::fs::read(&file).expect("read");
    assert!(
        server.stored(BUCKET, "disk.vmdk").expect("stored") == original,
        "the resumed object differs from the file"
    );
    assert!(files_in(&state).is_empty());
    assert!(server.pending_uploads().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(s3_tier),
    ignore = "S3 tier: set BUILDER_S3_TESTS=1 after scripts/install-deps (scripts/test does)"
)]
async fn a_cancelled_upload_is_aborted() {
    let server = S3Server::start(BUCKET);
    let (_work, file, state) = upload_work(12 * MIB);
    let s3 = s3_client(&server.endpoint(), SECRET);
    let token = CancellationToken::new();
    let progress = Recorder {
        cancel_after_first_part: Some(token.clone()),
        ..Recorder::default()
    };
    let mut options = upload_options(&state);
    options.concurrency = 1;
    options.cancel = Some(token);
    let err = upload_multipart(&s3, &file, BUCKET, "disk.vmdk", &options, &progress, "ami")
        .await
        .expect_err("cancelled");
    assert!(matches!(err, S3Error::Cancelled { .. }), "{err}");
    assert!(
        files_in(&state).is_empty(),
        "no resume state after a cancel"
    );
    assert!(
        server.pending_uploads().is_empty(),
        "the multipart upload was aborted: {:?}",
        server.pending_uploads()
    );
    assert_eq!(server.stored(BUCKET, "disk.vmdk"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(s3_tier),
    ignore = "S3 tier: set BUILDER_S3_TESTS=1 after scripts/install-deps (scripts/test does)"
)]
async fn a_bad_credential_is_rejected_with_a_clear_error() {
    let server = S3Server::start(BUCKET);
    let (_work, file, state) = upload_work(6 * MIB);
    let s3 = s3_client(&server.endpoint(), "not-the-secret");
    let err = upload(&s3, &file, "disk.vmdk", &state, &Recorder::default())
        .await
        .expect_err("refused");
    let text = err.to_string();
    assert!(matches!(err, S3Error::Credentials { .. }), "{text}");
    assert!(
        text.contains("refused the credentials (access key builder-test-key from test)"),
        "{text}"
    );
    assert!(text.contains("check the secret access key"), "{text}");
    assert!(
        !text.contains("not-the-secret"),
        "the secret is never shown: {text}"
    );
    assert!(files_in(&state).is_empty());

    // HeadBucket (the preflight's bucket check) gets a 403 without a body: the message
    // names both possible causes.
    let err = s3.head_bucket(BUCKET).await.expect_err("refused");
    let text = err.to_string();
    assert!(matches!(err, S3Error::Forbidden { .. }), "{text}");
    assert!(
        text.contains("the credentials are wrong (access key builder-test-key from test"),
        "{text}"
    );
}

// ---- the AMI flow: s3s-fs + the EC2/IAM fake

/// A stored build with only a qcow2 (so the import converts it to a vmdk), UEFI firmware.
fn stored_image(dir: &Path) -> StoredImage {
    let image_dir = dir.join("store/images/web/1.2.0/3");
    std::fs::create_dir_all(&image_dir).expect("mkdir");
    let disk = image_dir.join("web.qcow2");
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("64M")
        .status()
        .expect("qemu-img runs (install qemu-utils)");
    assert!(status.success());
    let sha256 = builder::export::sha256_file(&disk).expect("hash");
    let mut manifest = builder::export::Manifest::new(
        ImageId {
            name: "web".into(),
            version: "1.2.0".into(),
            build: 3,
        },
        "build-1",
    );
    manifest.host.firmware = "uefi".into();
    StoredImage {
        name: "web".into(),
        version: "1.2.0".parse().expect("version"),
        build: 3,
        dir: image_dir,
        manifest,
        disk: Some(StoredDisk {
            path: disk,
            format: Format::Qcow2,
            sha256,
        }),
    }
}

/// A temp folder with a stored build (see `stored_image`) and the path of the state folder.
fn ami_work() -> (tempfile::TempDir, StoredImage, PathBuf) {
    let work = tempfile::tempdir().expect("temp dir");
    let image = stored_image(work.path());
    let state = work.path().join("state");
    (work, image, state)
}

/// A script whose import task never finishes.
fn endless_task() -> Script {
    Script {
        active_polls: usize::MAX,
        ..Script::default()
    }
}

fn ec2_client(fake: &FakeEc2, credentials: AwsCredentials) -> Ec2Client {
    Ec2Client::new(
        http_client(),
        credentials,
        "eu-west-1",
        Some(&fake.endpoint()),
        quick_retries(),
    )
    .expect("valid endpoint")
}

fn ami_options(server: &S3Server, fake: &FakeEc2, state: &Path) -> AmiOptions {
    let mut options = AmiOptions::new(BUCKET, "web 1.2.0 (build 3)");
    options.region = Some("us-east-1".into());
    options.s3_endpoint = Some(server.endpoint());
    options.ec2_endpoint = Some(fake.endpoint());
    options.credentials = Some(credentials(SECRET));
    options.part_size = 5 * MIB;
    options.poll_interval = Duration::from_millis(10);
    options.state_dir = Some(state.to_path_buf());
    options.retry = quick_retries();
    options
}

fn call_list(fake: &FakeEc2) -> Vec<String> {
    fake.calls()
        .iter()
        .map(|c| {
            format!(
                "{}{}@{}",
                c.action,
                if c.is_dry_run() { "(dry)" } else { "" },
                c.region
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(s3_tier),
    ignore = "S3 tier: set BUILDER_S3_TESTS=1 after scripts/install-deps (scripts/test does)"
)]
async fn import_ami_uploads_imports_registers_tags_copies_and_shares() {
    let server = S3Server::start(BUCKET);
    let fake = FakeEc2::start(KEY, SECRET, Script::default()).await;
    let (_work, image, state) = ami_work();
    let mut options = ami_options(&server, &fake, &state);
    options.tags = BTreeMap::from([("team".to_string(), "web".to_string())]);
    options.copy_to_regions = vec!["eu-central-1".into()];
    options.launch_permission_user_ids = vec!["123456789012".into()];
    options.launch_permission_groups = vec!["all".into()];
    options.keep_object = true;
    let progress = Recorder::default();

    let receipt = import_ami(&image, &options, &progress)
        .await
        .expect("imports");

    assert!(
        fake.rejected().is_empty(),
        "bad signatures: {:?}",
        fake.rejected()
    );
    assert_eq!(
        call_list(&fake),
        [
            "ImportSnapshot(dry)@us-east-1",
            "DescribeImages@us-east-1",
            "DescribeImages@eu-central-1",
            "GetRole@us-east-1",
            "ImportSnapshot@us-east-1",
            "DescribeImportSnapshotTasks@us-east-1",
            "DescribeImportSnapshotTasks@us-east-1",
            "RegisterImage@us-east-1",
            "DescribeImages@us-east-1",
            "CreateTags@us-east-1",
            "ModifyImageAttribute@us-east-1",
            "CopyImage@eu-central-1",
            "DescribeImages@eu-central-1",
            "CreateTags@eu-central-1",
            "ModifyImageAttribute@eu-central-1",
        ]
    );
    let calls = fake.calls();
    let find = |action: &str, region: &str| {
        calls
            .iter()
            .find(|c| c.action == action && c.region == region && !c.is_dry_run())
            .unwrap_or_else(|| panic!("no {action} in {region}"))
    };
    let key = "builder-imports/web/1.2.0/3/web.vmdk";
    let import = find("ImportSnapshot", "us-east-1");
    for (name, value) in [
        ("DiskContainer.Format", "VMDK"),
        ("DiskContainer.UserBucket.S3Bucket", BUCKET),
        ("DiskContainer.UserBucket.S3Key", key),
        ("RoleName", "vmimport"),
        ("TagSpecification.1.ResourceType", "import-snapshot-task"),
    ] {
        assert_eq!(import.param(name), Some(value), "ImportSnapshot {name}");
    }
    let register = find("RegisterImage", "us-east-1");
    for (name, value) in [
        ("Name", "web 1.2.0 (build 3)"),
        ("Architecture", "x86_64"),
        ("VirtualizationType", "hvm"),
        ("RootDeviceName", "/dev/xvda"),
        ("EnaSupport", "true"),
        ("BootMode", "uefi"),
        ("BlockDeviceMapping.1.DeviceName", "/dev/xvda"),
        ("BlockDeviceMapping.1.Ebs.SnapshotId", "snap-0fake"),
    ] {
        assert_eq!(register.param(name), Some(value), "RegisterImage {name}");
    }
    let tags = find("CreateTags", "us-east-1");
    assert_eq!(tags.param("ResourceId.1"), Some("ami-0fake"));
    assert_eq!(tags.param("ResourceId.2"), Some("snap-0fake"));
    let tag_map: BTreeMap<&str, &str> = (1..=3)
        .filter_map(|i| {
            Some((
                tags.param(&format!("Tag.{i}.Key"))?,
                tags.param(&format!("Tag.{i}.Value"))?,
            ))
        })
        .collect();
    assert_eq!(
        tag_map,
        BTreeMap::from([
            ("Name", "web 1.2.0 (build 3)"),
            ("builder:image", "web/1.2.0/3"),
            ("team", "web"),
        ])
    );
    let share = find("ModifyImageAttribute", "eu-central-1");
    assert_eq!(share.param("ImageId"), Some("ami-0copy-eu-central-1"));
    assert_eq!(
        share.param("LaunchPermission.Add.1.UserId"),
        Some("123456789012")
    );
    assert_eq!(share.param("LaunchPermission.Add.2.Group"), Some("all"));
    let copy = find("CopyImage", "eu-central-1");
    assert_eq!(copy.param("SourceRegion"), Some("us-east-1"));
    assert_eq!(copy.param("SourceImageId"), Some("ami-0fake"));

    // What S3 holds is the converted disk, and the receipt carries its digest.
    let stored = server.stored(BUCKET, key).expect("uploaded");
    assert_eq!(&stored[..4], b"KDMV", "a VMDK sparse extent");
    assert_eq!(receipt.kind, "ami");
    assert_eq!(receipt.location, "ami-0fake (us-east-1)");
    assert_eq!(
        receipt.digests.get("disk"),
        Some(&format!("sha256:{}", hex::encode(Sha256::digest(&stored))))
    );
    let ids: BTreeMap<&str, &str> = receipt
        .ids
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        ids,
        BTreeMap::from([
            ("ami:eu-central-1", "ami-0copy-eu-central-1"),
            ("ami:us-east-1", "ami-0fake"),
            ("importTask", "import-snap-0fake"),
            (
                "s3Object",
                "s3://imports/builder-imports/web/1.2.0/3/web.vmdk"
            ),
            ("snapshot:eu-central-1", "snap-0copy-eu-central-1"),
            ("snapshot:us-east-1", "snap-0fake"),
        ])
    );
    // The task's progress and status message were shown; nothing is left behind.
    let steps = progress.steps.lock().expect("steps").clone();
    assert!(
        steps
            .iter()
            .any(|s| s == "importing import-snap-0fake: 30% converting"),
        "{steps:#?}"
    );
    assert_no_state(&state);
    assert!(server.pending_uploads().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(s3_tier),
    ignore = "S3 tier: set BUILDER_S3_TESTS=1 after scripts/install-deps (scripts/test does)"
)]
async fn import_image_method_uses_import_image() {
    let server = S3Server::start(BUCKET);
    let fake = FakeEc2::start(KEY, SECRET, Script::default()).await;
    let (_work, image, state) = ami_work();
    let mut options = ami_options(&server, &fake, &state);
    options.import_method = ImportMethod::Image;
    options.boot_mode = Some("legacy-bios".into());

    let receipt = import_ami(&image, &options, &Recorder::default())
        .await
        .expect("imports");
    assert!(fake.rejected().is_empty(), "{:?}", fake.rejected());
    assert_eq!(
        call_list(&fake),
        [
            "ImportImage(dry)@us-east-1",
            "GetRole@us-east-1",
            "ImportImage@us-east-1",
            "DescribeImportImageTasks@us-east-1",
            "DescribeImportImageTasks@us-east-1",
            "DescribeImages@us-east-1",
            "CreateTags@us-east-1",
        ]
    );
    let import = fake
        .calls()
        .into_iter()
        .find(|c| c.action == "ImportImage" && !c.is_dry_run())
        .expect("ImportImage");
    assert_eq!(import.param("DiskContainer.1.Format"), Some("VMDK"));
    assert_eq!(import.param("BootMode"), Some("legacy-bios"));
    assert_eq!(receipt.location, "ami-0imported (us-east-1)");
    // Without keepObject the uploaded disk is deleted once imported.
    let left = files_under(&server.data().join(BUCKET));
    assert!(left.is_empty(), "the object was deleted: {left:?}");
    assert!(!receipt.ids.contains_key("s3Object"));
    assert_eq!(
        receipt.ids.get("snapshot:us-east-1").map(String::as_str),
        Some("snap-0imported")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(s3_tier),
    ignore = "S3 tier: set BUILDER_S3_TESTS=1 after scripts/install-deps (scripts/test does)"
)]
async fn preflight_stops_before_any_upload_when_the_bucket_is_missing() {
    let server = S3Server::start(BUCKET);
    let fake = FakeEc2::start(KEY, SECRET, Script::default()).await;
    let (_work, image, state) = ami_work();
    let mut options = ami_options(&server, &fake, &state);
    options.bucket = "missing-bucket".into();

    let err = preflight(&options).await.expect_err("no such bucket");
    let text = err.to_string();
    assert!(matches!(err, AwsError::Preflight { .. }), "{text}");
    assert!(
        text.contains("the S3 bucket `missing-bucket` does not exist"),
        "{text}"
    );
    assert!(text.contains("aws s3 mb s3://missing-bucket"), "{text}");
    assert!(text.contains("nothing was uploaded"), "{text}");

    let err = import_ami(&image, &options, &Recorder::default())
        .await
        .expect_err("no such bucket");
    assert!(matches!(err, AwsError::Preflight { .. }), "{err}");
    assert!(
        fake.actions().iter().all(|a| a != "ImportSnapshot"),
        "no import started: {:?}",
        fake.actions()
    );
    assert!(files_under(&server.data().join(BUCKET)).is_empty());
    assert!(server.pending_uploads().is_empty());
    assert!(files_in(&state).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(s3_tier),
    ignore = "S3 tier: set BUILDER_S3_TESTS=1 after scripts/install-deps (scripts/test does)"
)]
async fn preflight_reports_a_missing_role_and_a_taken_name_and_warns_without_iam() {
    let server = S3Server::start(BUCKET);
    let script = Script {
        role_exists: false,
        existing_names: BTreeMap::from([(
            "web 1.2.0 (build 3)".to_string(),
            "ami-0old".to_string(),
        )]),
        ..Script::default()
    };
    let fake = FakeEc2::start(KEY, SECRET, script).await;
    let work = tempfile::tempdir().expect("temp dir");
    let options = ami_options(&server, &fake, work.path());
    let err = preflight(&options).await.expect_err("two problems");
    let text = err.to_string();
    assert!(text.contains("found 2 problem(s)"), "{text}");
    assert!(
        text.contains("an AMI named `web 1.2.0 (build 3)` already exists in us-east-1 (ami-0old)"),
        "{text}"
    );
    assert!(
        text.contains("the VM Import service role `vmimport` does not exist"),
        "{text}"
    );

    // IAM that does not answer (custom endpoints often have none) is a warning.
    let fake = FakeEc2::start(KEY, SECRET, Script::default()).await;
    let mut options = ami_options(&server, &fake, work.path());
    let closed = free_port();
    options.iam_endpoint = Some(format!("http://127.0.0.1:{closed}"));
    let warnings = preflight(&options).await.expect("passes with a warning");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains(&format!(
            "could not check the VM Import role `vmimport`: IAM at http://127.0.0.1:{closed} did not answer"
        )),
        "{warnings:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fake_rejects_a_wrong_signature_and_ec2_says_so() {
    let fake = FakeEc2::start(KEY, SECRET, Script::default()).await;
    let ec2 = ec2_client(&fake, credentials("not-the-secret"));
    let err = ec2.images_named("x").await.expect_err("refused");
    assert!(matches!(err, Ec2Error::Credentials { .. }), "{err}");
    assert!(
        err.to_string().contains("check the secret access key"),
        "{err}"
    );
    let rejected = fake.rejected();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert!(
        rejected[0].starts_with("signature mismatch"),
        "{rejected:?}"
    );
    assert!(fake.calls().is_empty());

    // Temporary credentials: the session token is sent and covered by the signature.
    let ec2 = ec2_client(
        &fake,
        AwsCredentials::new(KEY, SECRET, Some("session-token".into()), "test"),
    );
    assert_eq!(
        ec2.images_named("x").await.expect("accepted"),
        Vec::<String>::new()
    );
    let calls = fake.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].region, "eu-west-1");
    assert_eq!(calls[0].param("Owner.1"), Some("self"));
    assert_eq!(calls[0].session_token.as_deref(), Some("session-token"));
    assert_eq!(fake.rejected().len(), 1, "no new rejection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(s3_tier),
    ignore = "S3 tier: set BUILDER_S3_TESTS=1 after scripts/install-deps (scripts/test does)"
)]
async fn a_failed_a_slow_and_a_cancelled_import_are_reported() {
    let server = S3Server::start(BUCKET);
    let (_work, image, state) = ami_work();

    // VM Import gives up: the task ends `deleted` with its reason.
    let fake = FakeEc2::start(
        KEY,
        SECRET,
        Script {
            fail_with: Some(
                "ClientError: Disk validation failed [Unsupported VMDK File Format]".into(),
            ),
            ..Script::default()
        },
    )
    .await;
    let options = ami_options(&server, &fake, &state);
    let err = import_ami(&image, &options, &Recorder::default())
        .await
        .expect_err("the import fails");
    assert_eq!(
        err.to_string(),
        "the import task import-snap-0fake in us-east-1 failed (deleted): ClientError: Disk \
         validation failed [Unsupported VMDK File Format]"
    );
    assert!(err.hint().is_some());
    assert!(!fake.actions().contains(&"RegisterImage".to_string()));

    // The task never finishes within the timeout.
    let fake = FakeEc2::start(KEY, SECRET, endless_task()).await;
    let mut options = ami_options(&server, &fake, &state);
    options.import_timeout = Duration::from_millis(100);
    let err = import_ami(&image, &options, &Recorder::default())
        .await
        .expect_err("times out");
    let text = err.to_string();
    assert!(matches!(err, AwsError::ImportTimeout { .. }), "{text}");
    assert!(
        text.contains("last seen: importing import-snap-0fake: ") && text.contains("% converting"),
        "{text}"
    );
    assert!(
        err.hint()
            .expect("hint")
            .contains("aws ec2 describe-import-snapshot-tasks --import-task-ids import-snap-0fake")
    );

    // The user cancels while the task runs: the task is cancelled too.
    let fake = FakeEc2::start(KEY, SECRET, endless_task()).await;
    let mut options = ami_options(&server, &fake, &state);
    let token = CancellationToken::new();
    options.cancel = Some(token.clone());
    let progress = Recorder {
        cancel_on_step: Some(("importing import-snap-0fake", token)),
        ..Recorder::default()
    };
    let err = import_ami(&image, &options, &progress)
        .await
        .expect_err("cancelled");
    assert!(matches!(err, AwsError::Cancelled { .. }), "{err}");
    let cancels: Vec<_> = fake
        .calls()
        .into_iter()
        .filter(|c| c.action == "CancelImportTask")
        .collect();
    assert_eq!(cancels.len(), 1);
    assert_eq!(cancels[0].param("ImportTaskId"), Some("import-snap-0fake"));
    assert_no_state(&state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(s3_tier),
    ignore = "S3 tier: set BUILDER_S3_TESTS=1 after scripts/install-deps (scripts/test does)"
)]
async fn an_interrupted_import_keeps_its_converted_disk_and_resumes() {
    let server = S3Server::start(BUCKET);
    let proxy = PartProxy::start(server.port).await;
    let fake = FakeEc2::start(KEY, SECRET, Script::default()).await;
    let (_work, image, state) = ami_work();
    let mut options = ami_options(&server, &fake, &state);
    options.s3_endpoint = Some(proxy.endpoint());

    proxy.budget.store(0, Ordering::SeqCst);
    let err = import_ami(&image, &options, &Recorder::default())
        .await
        .expect_err("no part gets through");
    assert!(
        err.to_string().contains("run the same command again"),
        "{err}"
    );
    assert!(err.hint().is_some());
    let mut kept = files_in(&state);
    kept.sort();
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert!(
        kept[0].starts_with("convert-") && kept[0].ends_with(".vmdk"),
        "{kept:?}"
    );
    assert!(kept[1].starts_with("s3-upload-"), "{kept:?}");

    proxy.budget.store(-1, Ordering::SeqCst);
    let progress = Recorder::default();
    let receipt = import_ami(&image, &options, &progress)
        .await
        .expect("resumes");
    let steps = progress.steps.lock().expect("steps").clone();
    assert!(
        steps
            .iter()
            .any(|s| s.starts_with("reusing ") && s.ends_with(" from an interrupted upload")),
        "{steps:#?}"
    );
    assert_eq!(receipt.location, "ami-0fake (us-east-1)");
    assert_no_state(&state);
    assert!(server.pending_uploads().is_empty());
    assert!(fake.rejected().is_empty(), "{:?}", fake.rejected());
}
