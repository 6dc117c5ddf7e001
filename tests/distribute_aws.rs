//! AWS AMI import (`builder::distribute::aws`), against servers no one here wrote.
//!
//! - The S3 upload tests run against `s3s-fs` (an S3-compatible server) on loopback, which
//!   checks every signature and each part's signed SHA-256.
//! - The AMI flow (`import_ami`, `preflight`, the EC2 client) runs end to end against moto
//!   (`support/moto.rs`): the upload goes to moto's S3, GetRole to its IAM, RegisterImage,
//!   DescribeImages, CreateTags, CopyImage and ModifyImageAttribute to its EC2, and moto
//!   checks every signature with botocore's SigV4 code. moto has no VM Import, so a minimal
//!   shim in front of it (`support/moto_vmimport.py`) answers only ImportSnapshot,
//!   DescribeImportSnapshotTasks, ImportImage, DescribeImportImageTasks and CancelImportTask,
//!   working on moto's state (it reads the disk from moto's S3 and makes the snapshot in
//!   moto's EC2), and records every EC2/IAM call for the assertions on what builder sent.
//!   The results are then read back from moto with boto3, not with builder's client.
//!
//! All of them need s3s-fs or moto: they are ignored unless `BUILDER_S3_TESTS=1` (set by
//! scripts/test, so CI, after scripts/install-deps installed both); with it, a missing server
//! fails them and says how to install it.

#[path = "support/moto.rs"]
mod moto;
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
    AmiOptions, AwsCredentials, AwsError, RetryPolicy, S3Client, S3Error, UploadOptions, Uploaded,
    import_ami, preflight, upload_multipart,
};
use builder::recipe::Format;
use builder::recipe::ImportMethod;
use builder::store::manifest::{Artifact, ImageId};
use builder::store::{StoredDisk, StoredImage};
use moto::Moto;
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
    fs_err::write(&path, &bytes).expect("write");
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
    fs_err::read_dir(dir)
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

/// No multipart upload is left open in moto's `BUCKET`.
fn assert_no_multipart_upload(moto: &Moto) {
    let uploads = moto.boto3(&format!(
        "out = len(s3().list_multipart_uploads(Bucket={BUCKET:?}).get('Uploads', []))"
    ));
    assert_eq!(uploads, 0);
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

    let original = fs_err::read(&file).expect("read");
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
    let original = fs_err::read(&file).expect("read");
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

// ---- the AMI flow: moto (S3, IAM, EC2 images) + its VM Import shim

/// A stored build with only a qcow2 (so the import converts it to a vmdk), UEFI firmware.
fn stored_image(dir: &Path) -> StoredImage {
    let image_dir = dir.join("store/images/web/1.2.0/3");
    fs_err::create_dir_all(&image_dir).expect("mkdir");
    let disk = image_dir.join("web.qcow2");
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("64M")
        .status()
        .expect("qemu-img runs (install qemu-utils)");
    assert!(status.success());
    let sha256 = builder::digest::sha256_file(&disk, None)
        .expect("hash")
        .hex();
    let mut manifest = builder::store::Manifest::new(
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

/// moto with the test bucket (and the `vmimport` role).
fn moto() -> Moto {
    Moto::start(&moto::Setup {
        buckets: vec![BUCKET.into()],
        ..moto::Setup::default()
    })
}

fn moto_credentials(moto: &Moto) -> AwsCredentials {
    AwsCredentials::new(&moto.key, &moto.secret, None, "test")
}

/// Everything at moto: S3, EC2 and (through the EC2 endpoint) IAM.
fn ami_options(moto: &Moto, state: &Path) -> AmiOptions {
    let mut options = AmiOptions::new(BUCKET, "web 1.2.0 (build 3)");
    options.region = Some("us-east-1".into());
    options.s3_endpoint = Some(moto.endpoint());
    options.ec2_endpoint = Some(moto.endpoint());
    options.credentials = Some(moto_credentials(moto));
    options.part_size = 5 * MIB;
    options.poll_interval = Duration::from_millis(10);
    options.state_dir = Some(state.to_path_buf());
    options.retry = quick_retries();
    options
}

/// The EC2/IAM calls moto accepted (or answered a dry run), as `Action(dry)@region`.
async fn call_list(moto: &Moto) -> Vec<String> {
    let calls = moto.calls().await;
    let refused: Vec<_> = calls
        .iter()
        .filter(|c| !matches!(c.status, 200 | 412))
        .collect();
    assert!(
        refused.is_empty(),
        "moto refused: {refused:#?}\n{}",
        moto.log()
    );
    calls
        .iter()
        .map(|c| {
            format!(
                "{}{}@{}",
                c.action,
                if c.dry_run { "(dry)" } else { "" },
                c.region
            )
        })
        .collect()
}

/// The last call of `action` (not a dry run) in `region`.
fn find<'a>(calls: &'a [moto::Call], action: &str, region: &str) -> &'a moto::Call {
    calls
        .iter()
        .rev()
        .find(|c| c.action == action && c.region == region && !c.dry_run)
        .unwrap_or_else(|| panic!("no {action} in {region}: {calls:#?}"))
}

fn tag_map(value: &serde_json::Value) -> BTreeMap<String, String> {
    value
        .as_object()
        .expect("tags")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().expect("tag value").to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(s3_tier),
    ignore = "S3 tier: set BUILDER_S3_TESTS=1 after scripts/install-deps (scripts/test does)"
)]
async fn import_ami_uploads_imports_registers_tags_copies_and_shares() {
    let moto = moto();
    let (_work, image, state) = ami_work();
    let mut options = ami_options(&moto, &state);
    options.tags = BTreeMap::from([("team".to_string(), "web".to_string())]);
    options.copy_to_regions = vec!["eu-central-1".into()];
    options.launch_permission_user_ids = vec!["123456789012".into()];
    options.launch_permission_groups = vec!["all".into()];
    options.keep_object = true;
    let progress = Recorder::default();

    let receipt = import_ami(&image, &options, &progress)
        .await
        .expect("imports");

    // What builder asked, in order (moto and the shim accepted every signature).
    assert_eq!(
        call_list(&moto).await,
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
    let calls = moto.calls().await;
    let key = "builder-imports/web/1.2.0/3/web.vmdk";
    let import = find(&calls, "ImportSnapshot", "us-east-1");
    for (name, value) in [
        ("DiskContainer.Format", "VMDK"),
        ("DiskContainer.UserBucket.S3Bucket", BUCKET),
        ("DiskContainer.UserBucket.S3Key", key),
        ("RoleName", "vmimport"),
        ("TagSpecification.1.ResourceType", "import-snapshot-task"),
    ] {
        assert_eq!(import.param(name), Some(value), "ImportSnapshot {name}");
    }
    let task = import.task.clone().expect("the shim started a task");
    let ami = receipt.ids.get("ami:us-east-1").expect("ami id").clone();
    let copy = receipt
        .ids
        .get("ami:eu-central-1")
        .expect("copy id")
        .clone();

    // moto's own view, through boto3 (botocore's client, not builder's).
    let seen = moto.boto3(&format!(
        "img = ec2('us-east-1').describe_images(ImageIds=[{ami:?}])['Images'][0]\n\
         cp = ec2('eu-central-1').describe_images(ImageIds=[{copy:?}])['Images'][0]\n\
         perms = ec2('eu-central-1').describe_image_attribute(ImageId={copy:?}, Attribute='launchPermission')['LaunchPermissions']\n\
         snaps = ec2('us-east-1').describe_snapshots(OwnerIds=['self'])['Snapshots']\n\
         obj = s3().get_object(Bucket={BUCKET:?}, Key={key:?})['Body'].read()\n\
         out = dict(name=img['Name'], state=img['State'], tags={{t['Key']: t['Value'] for t in img.get('Tags', [])}},\n\
             copy_name=cp['Name'], copy_tags={{t['Key']: t['Value'] for t in cp.get('Tags', [])}},\n\
             copy_root=cp['BlockDeviceMappings'][0]['Ebs']['SnapshotId'],\n\
             perms=sorted(p.get('UserId') or 'group:' + p.get('Group') for p in perms),\n\
             imported=[s['SnapshotId'] for s in snaps if s.get('Description') == 'Created by AWS-VMImport service for {task}'],\n\
             imported_tags=[{{t['Key']: t['Value'] for t in s.get('Tags', [])}} for s in snaps if s.get('Description') == 'Created by AWS-VMImport service for {task}'],\n\
             head=obj[:4].hex(), sha=hashlib.sha256(obj).hexdigest())"
    ));
    let expected_tags = BTreeMap::from([
        ("Name".to_string(), "web 1.2.0 (build 3)".to_string()),
        ("builder:image".to_string(), "web/1.2.0/3".to_string()),
        ("team".to_string(), "web".to_string()),
    ]);
    assert_eq!(seen["name"], "web 1.2.0 (build 3)", "{seen}");
    assert_eq!(seen["state"], "available", "{seen}");
    assert_eq!(tag_map(&seen["tags"]), expected_tags, "{seen}");
    assert_eq!(seen["copy_name"], "web 1.2.0 (build 3)", "{seen}");
    assert_eq!(tag_map(&seen["copy_tags"]), expected_tags, "{seen}");
    assert_eq!(
        seen["perms"],
        serde_json::json!(["123456789012", "group:all"]),
        "{seen}"
    );
    // The image was registered on the snapshot the import made, and that snapshot is tagged
    // too. (moto's RegisterImage keeps only the name and description and gives the image a
    // root snapshot of its own: the mapping builder sent is checked on the call.)
    let imported = seen["imported"].as_array().expect("snapshots");
    assert_eq!(imported.len(), 1, "{seen}");
    let imported = imported[0].as_str().expect("id");
    assert_eq!(tag_map(&seen["imported_tags"][0]), expected_tags, "{seen}");
    let register = find(&calls, "RegisterImage", "us-east-1");
    for (name, value) in [
        ("Name", "web 1.2.0 (build 3)"),
        ("Architecture", "x86_64"),
        ("VirtualizationType", "hvm"),
        ("RootDeviceName", "/dev/xvda"),
        ("EnaSupport", "true"),
        ("BootMode", "uefi"),
        ("BlockDeviceMapping.1.DeviceName", "/dev/xvda"),
        ("BlockDeviceMapping.1.Ebs.SnapshotId", imported),
    ] {
        assert_eq!(register.param(name), Some(value), "RegisterImage {name}");
    }
    let tags = find(&calls, "CreateTags", "us-east-1");
    assert_eq!(tags.param("ResourceId.1"), Some(ami.as_str()));
    assert_eq!(tags.param("ResourceId.2"), Some(imported));
    let copy_call = find(&calls, "CopyImage", "eu-central-1");
    assert_eq!(copy_call.param("SourceRegion"), Some("us-east-1"));
    assert_eq!(copy_call.param("SourceImageId"), Some(ami.as_str()));

    // What S3 holds is the converted disk, and the receipt carries its digest.
    assert_eq!(seen["head"], hex::encode(b"KDMV"), "a VMDK sparse extent");
    assert_eq!(receipt.kind, "ami");
    assert_eq!(receipt.location, format!("{ami} (us-east-1)"));
    assert_eq!(
        receipt.digests.get("disk"),
        Some(&format!("sha256:{}", seen["sha"].as_str().expect("sha")))
    );
    let ids: BTreeMap<&str, &str> = receipt
        .ids
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        ids,
        BTreeMap::from([
            ("ami:eu-central-1", copy.as_str()),
            ("ami:us-east-1", ami.as_str()),
            ("importTask", task.as_str()),
            (
                "s3Object",
                "s3://imports/builder-imports/web/1.2.0/3/web.vmdk"
            ),
            (
                "snapshot:eu-central-1",
                seen["copy_root"].as_str().expect("id")
            ),
            ("snapshot:us-east-1", imported),
        ])
    );
    // The task's progress and status message were shown; nothing is left behind.
    let steps = progress.steps.lock().expect("steps").clone();
    assert!(
        steps
            .iter()
            .any(|s| *s == format!("importing {task}: 30% converting")),
        "{steps:#?}"
    );
    assert_no_state(&state);
    assert_no_multipart_upload(&moto);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(s3_tier),
    ignore = "S3 tier: set BUILDER_S3_TESTS=1 after scripts/install-deps (scripts/test does)"
)]
async fn import_image_method_uses_import_image() {
    let moto = moto();
    let (_work, image, state) = ami_work();
    let mut options = ami_options(&moto, &state);
    options.import_method = ImportMethod::Image;
    options.boot_mode = Some("legacy-bios".into());

    let receipt = import_ami(&image, &options, &Recorder::default())
        .await
        .expect("imports");
    assert_eq!(
        call_list(&moto).await,
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
    let calls = moto.calls().await;
    let import = find(&calls, "ImportImage", "us-east-1");
    assert_eq!(import.param("DiskContainer.1.Format"), Some("VMDK"));
    assert_eq!(import.param("BootMode"), Some("legacy-bios"));
    let ami = receipt.ids.get("ami:us-east-1").expect("ami id").clone();
    assert_eq!(receipt.location, format!("{ami} (us-east-1)"));
    // In moto: the image with its tags; without keepObject the uploaded disk was deleted.
    let seen = moto.boto3(&format!(
        "img = ec2('us-east-1').describe_images(ImageIds=[{ami:?}])['Images'][0]\n\
         objects = s3().list_objects_v2(Bucket={BUCKET:?}).get('Contents', [])\n\
         out = dict(tags={{t['Key']: t['Value'] for t in img.get('Tags', [])}},\n\
             root=img['BlockDeviceMappings'][0]['Ebs']['SnapshotId'], objects=[o['Key'] for o in objects])"
    ));
    assert_eq!(seen["objects"], serde_json::json!([]), "{seen}");
    assert_eq!(
        tag_map(&seen["tags"])
            .get("builder:image")
            .map(String::as_str),
        Some("web/1.2.0/3"),
        "{seen}"
    );
    assert!(!receipt.ids.contains_key("s3Object"));
    assert_eq!(
        receipt.ids.get("snapshot:us-east-1").map(String::as_str),
        seen["root"].as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(s3_tier),
    ignore = "S3 tier: set BUILDER_S3_TESTS=1 after scripts/install-deps (scripts/test does)"
)]
async fn preflight_stops_before_any_upload_when_the_bucket_is_missing() {
    let moto = moto();
    let (_work, image, state) = ami_work();
    let mut options = ami_options(&moto, &state);
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
    let calls = moto.calls().await;
    assert!(
        calls
            .iter()
            .all(|c| c.action != "ImportSnapshot" || c.dry_run),
        "no import started: {calls:#?}"
    );
    let seen = moto.boto3(
        "out = [b['Name'] for b in s3().list_buckets()['Buckets']] + \
         [o['Key'] for o in s3().list_objects_v2(Bucket='imports').get('Contents', [])] + \
         [u['Key'] for u in s3().list_multipart_uploads(Bucket='imports').get('Uploads', [])]",
    );
    assert_eq!(seen, serde_json::json!([BUCKET]), "nothing uploaded");
    assert!(files_in(&state).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(s3_tier),
    ignore = "S3 tier: set BUILDER_S3_TESTS=1 after scripts/install-deps (scripts/test does)"
)]
async fn preflight_reports_a_missing_role_and_a_taken_name_and_warns_without_iam() {
    let moto = Moto::start(&moto::Setup {
        buckets: vec![BUCKET.into()],
        role: false,
        images_named: vec!["web 1.2.0 (build 3)".into()],
    });
    let old = moto
        .boto3("out = ec2('us-east-1').describe_images(Owners=['self'])['Images'][0]['ImageId']");
    let work = tempfile::tempdir().expect("temp dir");
    let options = ami_options(&moto, work.path());
    let err = preflight(&options).await.expect_err("two problems");
    let text = err.to_string();
    assert!(text.contains("found 2 problem(s)"), "{text}");
    assert!(
        text.contains(&format!(
            "an AMI named `web 1.2.0 (build 3)` already exists in us-east-1 ({})",
            old.as_str().expect("id")
        )),
        "{text}"
    );
    assert!(
        text.contains("the VM Import service role `vmimport` does not exist"),
        "{text}"
    );

    // IAM that does not answer (custom endpoints often have none) is a warning.
    let moto = self::moto();
    let mut options = ami_options(&moto, work.path());
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
#[cfg_attr(
    not(s3_tier),
    ignore = "S3 tier: set BUILDER_S3_TESTS=1 after scripts/install-deps (scripts/test does)"
)]
async fn moto_refuses_a_wrong_secret_and_ec2_says_so() {
    let moto = moto();
    let ec2 = |credentials| {
        Ec2Client::new(
            http_client(),
            credentials,
            "eu-west-1",
            Some(&moto.endpoint()),
            quick_retries(),
        )
        .expect("valid endpoint")
    };
    let err = ec2(AwsCredentials::new(
        &moto.key,
        "not-the-secret",
        None,
        "test",
    ))
    .images_named("x")
    .await
    .expect_err("refused");
    assert!(matches!(err, Ec2Error::Credentials { .. }), "{err}");
    assert!(
        err.to_string().contains("check the secret access key"),
        "{err}"
    );
    let calls = moto.calls().await;
    assert_eq!(calls.len(), 1, "{calls:#?}");
    assert_eq!(calls[0].status, 401, "moto refused the signature");

    // Temporary credentials (from moto's STS): the session token is sent and covered by the
    // signature, which moto checks together with the token.
    let temporary = moto.boto3(
        "user = iam().get_user(UserName='builder-tests')['User']['Arn']\n\
         iam().create_role(RoleName='builder-temporary', AssumeRolePolicyDocument=json.dumps({'Version': '2012-10-17', \
             'Statement': [{'Effect': 'Allow', 'Principal': {'AWS': user}, 'Action': 'sts:AssumeRole'}]}))\n\
         iam().put_role_policy(RoleName='builder-temporary', PolicyName='everything', PolicyDocument=json.dumps({'Version': '2012-10-17', \
             'Statement': [{'Effect': 'Allow', 'Action': '*', 'Resource': '*'}]}))\n\
         c = boto3.client('sts', region_name='us-east-1', **kw).assume_role(RoleArn=f'arn:aws:iam::{user.split(\":\")[4]}:role/builder-temporary', \
             RoleSessionName='builder-tests')['Credentials']\n\
         out = [c['AccessKeyId'], c['SecretAccessKey'], c['SessionToken']]",
    );
    let field = |i: usize| temporary[i].as_str().expect("a credential").to_string();
    let before = moto.calls().await.len();
    assert_eq!(
        ec2(AwsCredentials::new(
            field(0),
            field(1),
            Some(field(2)),
            "test"
        ))
        .images_named("x")
        .await
        .expect("accepted"),
        Vec::<String>::new()
    );
    // A wrong token is refused.
    let err = ec2(AwsCredentials::new(
        field(0),
        field(1),
        Some("not-the-token".into()),
        "test",
    ))
    .images_named("x")
    .await
    .expect_err("refused");
    assert!(matches!(err, Ec2Error::Credentials { .. }), "{err}");
    let calls = moto.calls().await;
    let ec2_calls: Vec<_> = calls[before..]
        .iter()
        .filter(|c| c.service == "ec2")
        .collect();
    assert_eq!(ec2_calls.len(), 2, "{calls:#?}");
    assert_eq!(ec2_calls[0].status, 200);
    assert_eq!(ec2_calls[0].region, "eu-west-1");
    assert_eq!(ec2_calls[0].param("Owner.1"), Some("self"));
    assert_eq!(
        ec2_calls[0].session_token.as_deref(),
        Some(field(2).as_str())
    );
    assert_eq!(ec2_calls[1].status, 401);
}

/// The shim's last import task.
async fn last_task(moto: &Moto) -> String {
    let calls = moto.calls().await;
    calls
        .iter()
        .rev()
        .find_map(|c| c.task.clone())
        .unwrap_or_else(|| panic!("no import task started: {calls:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(s3_tier),
    ignore = "S3 tier: set BUILDER_S3_TESTS=1 after scripts/install-deps (scripts/test does)"
)]
async fn a_failed_a_slow_and_a_cancelled_import_are_reported() {
    let moto = moto();
    let (_work, image, state) = ami_work();

    // VM Import gives up: the task ends `deleted` with its reason.
    moto.script(
        1,
        Some("ClientError: Disk validation failed [Unsupported VMDK File Format]"),
    )
    .await;
    let options = ami_options(&moto, &state);
    let err = import_ami(&image, &options, &Recorder::default())
        .await
        .expect_err("the import fails");
    let task = last_task(&moto).await;
    assert_eq!(
        err.to_string(),
        format!(
            "the import task {task} in us-east-1 failed (deleted): ClientError: Disk \
             validation failed [Unsupported VMDK File Format]"
        )
    );
    assert!(err.hint().is_some());
    assert!(
        moto.calls()
            .await
            .iter()
            .all(|c| c.action != "RegisterImage")
    );

    // The task never finishes within the timeout.
    moto.script(u64::MAX, None).await;
    let mut options = ami_options(&moto, &state);
    options.import_timeout = Duration::from_millis(100);
    let err = import_ami(&image, &options, &Recorder::default())
        .await
        .expect_err("times out");
    let task = last_task(&moto).await;
    let text = err.to_string();
    assert!(matches!(err, AwsError::ImportTimeout { .. }), "{text}");
    assert!(
        text.contains(&format!("last seen: importing {task}: ")) && text.contains("% converting"),
        "{text}"
    );
    assert!(err.hint().expect("hint").contains(&format!(
        "aws ec2 describe-import-snapshot-tasks --import-task-ids {task}"
    )));

    // The user cancels while the task runs: the task is cancelled too.
    let mut options = ami_options(&moto, &state);
    let token = CancellationToken::new();
    options.cancel = Some(token.clone());
    let progress = Recorder {
        cancel_on_step: Some(("importing import-snap-", token)),
        ..Recorder::default()
    };
    let err = import_ami(&image, &options, &progress)
        .await
        .expect_err("cancelled");
    assert!(matches!(err, AwsError::Cancelled { .. }), "{err}");
    let task = last_task(&moto).await;
    let cancels: Vec<_> = moto
        .calls()
        .await
        .into_iter()
        .filter(|c| c.action == "CancelImportTask")
        .collect();
    assert_eq!(cancels.len(), 1);
    assert_eq!(cancels[0].param("ImportTaskId"), Some(task.as_str()));
    assert_no_state(&state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(s3_tier),
    ignore = "S3 tier: set BUILDER_S3_TESTS=1 after scripts/install-deps (scripts/test does)"
)]
async fn an_interrupted_import_keeps_its_converted_disk_and_resumes() {
    let moto = moto();
    let proxy = PartProxy::start(moto.port).await;
    let (_work, image, state) = ami_work();
    let mut options = ami_options(&moto, &state);
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
    let ami = receipt.ids.get("ami:us-east-1").expect("ami id");
    assert_eq!(receipt.location, format!("{ami} (us-east-1)"));
    assert_no_state(&state);
    call_list(&moto).await;
    assert_no_multipart_upload(&moto);
}

/// `builder distribute NAME --to ami` as a user runs it: a build in a real store, the
/// credentials from the environment, one `--endpoint` for S3 and EC2 (moto), and the AMI
/// checked in moto with boto3; the store records where the build was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(s3_tier),
    ignore = "S3 tier: set BUILDER_S3_TESTS=1 after scripts/install-deps (scripts/test does)"
)]
async fn builder_distribute_to_ami_runs_end_to_end_against_moto() {
    use builder::recipe::Version;
    use builder::store::Store;

    let moto = moto();
    // The task completes at the first look (the CLI polls every 15 s).
    moto.script(0, None).await;
    let tmp = tempfile::tempdir().expect("temp dir");
    let store = Store::open(tmp.path().join("store")).expect("store");
    let slot = store
        .allocate_build("web", &Version::new(1, 0, 0))
        .expect("allocate");
    let file = "web-1.0.0-1.qcow2";
    let disk = slot.dir().join(file);
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("64M")
        .status()
        .expect("qemu-img runs (install qemu-utils)");
    assert!(status.success());
    let mut manifest = builder::store::Manifest::new(slot.id().clone(), slot.build_id());
    manifest.host.firmware = "bios".into();
    let sha256 = builder::digest::sha256_file(&disk, None)
        .expect("hash")
        .hex();
    manifest.outputs.push(Artifact {
        file: file.into(),
        format: Format::Qcow2,
        size: fs_err::metadata(&disk).expect("size").len(),
        virtual_size: 64 * MIB,
        sha256: sha256.clone(),
    });
    fs_err::write(slot.dir().join("SHA256SUMS"), format!("{sha256}  {file}\n")).expect("sums");
    manifest.write(slot.dir()).expect("manifest");
    slot.commit().expect("commit");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_builder"))
        .args(["distribute", "web", "--to", "ami", "--region", "us-east-1"])
        .args(["--bucket", BUCKET, "--endpoint", &moto.endpoint()])
        .args(["--tag", "team=web"])
        .env("BUILDER_STORE", tmp.path().join("store"))
        .env("AWS_ACCESS_KEY_ID", &moto.key)
        .env("AWS_SECRET_ACCESS_KEY", &moto.secret)
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env("AWS_CONFIG_FILE", tmp.path().join("no-aws-config"))
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            tmp.path().join("no-aws-credentials"),
        )
        .env("NO_COLOR", "1")
        .output()
        .expect("run builder");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}\n{}", moto.log());
    call_list(&moto).await;

    let seen = moto.boto3(
        "imgs = ec2('us-east-1').describe_images(Owners=['self'])['Images']\n\
         out = [dict(id=i['ImageId'], name=i['Name'], tags={t['Key']: t['Value'] for t in i.get('Tags', [])}) for i in imgs]",
    );
    let images = seen.as_array().expect("images");
    assert_eq!(images.len(), 1, "{seen}");
    let ami = images[0]["id"].as_str().expect("id");
    let tags = tag_map(&images[0]["tags"]);
    assert_eq!(
        tags.get("builder:image").map(String::as_str),
        Some("web/1.0.0/1"),
        "{seen}"
    );
    assert_eq!(tags.get("team").map(String::as_str), Some("web"), "{seen}");
    assert!(
        format!("{stdout}{stderr}").contains(ami),
        "builder names the AMI: {stdout}\n{stderr}"
    );
    let calls = moto.calls().await;
    let register = find(&calls, "RegisterImage", "us-east-1");
    assert_eq!(register.param("BootMode"), Some("legacy-bios"));
}
