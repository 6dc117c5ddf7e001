//! The AMI import flow: [`preflight`] (credentials, bucket, EC2 permissions, free name,
//! the `vmimport` role) before anything is uploaded, then [`import_ami`]: disk → S3 →
//! ImportSnapshot + RegisterImage (or ImportImage) → tags → copies → launch permissions →
//! a [`Receipt`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::ec2::{DiskSource, Ec2Client, Ec2Error, ImportTask, RegisterImage};
use super::iam::{IamClient, RoleCheck};
use super::{AwsError, upload_multipart};
use crate::aws::client::{self, RetryPolicy};
use crate::aws::credentials::{self, AwsConfig, AwsCredentials};
use crate::aws::s3::{self, S3Client, S3Error, UploadOptions};
use crate::diagnostic::error_chain;
use crate::distribute::{Progress, Receipt, StoredImage};
use crate::export;
use crate::recipe::{Compression, Format, ImportMethod};
use crate::vm::img;

/// The target name in progress events.
const TARGET: &str = "ami";
/// The root device of the registered image.
const ROOT_DEVICE: &str = "/dev/xvda";

/// Everything an AMI import needs. [`AmiOptions::new`] fills the defaults.
#[derive(Debug, Clone)]
pub struct AmiOptions {
    /// Default: `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's region; `us-east-1` when
    /// both S3 and EC2 endpoints are custom and nothing names one.
    pub region: Option<String>,
    /// The S3 bucket the disk is uploaded to; it must be in `region` (VM Import's rule).
    pub bucket: String,
    /// Key prefix in the bucket. Default `builder-imports/`.
    pub prefix: Option<String>,
    /// The AMI name (already expanded from its template).
    pub name: String,
    pub description: Option<String>,
    /// Tags for the AMI and its snapshot (in every region). `Name` (= `name`) and
    /// `builder:image` (= `name/x.y.z/n`) are added unless given.
    pub tags: BTreeMap<String, String>,
    /// Regions the AMI is copied to (then waited for, tagged and shared like the first).
    pub copy_to_regions: Vec<String>,
    /// 12-digit account ids given launch permission.
    pub launch_permission_user_ids: Vec<String>,
    /// Groups given launch permission (`all` makes the AMI public).
    pub launch_permission_groups: Vec<String>,
    /// `legacy-bios`, `uefi`, or `uefi-preferred` (RegisterImage only: UEFI where the
    /// instance type supports it). Default: from the build's firmware (bios → legacy-bios).
    pub boot_mode: Option<String>,
    pub import_method: ImportMethod,
    /// An S3-compatible endpoint (path-style addressing). Default: AWS.
    pub s3_endpoint: Option<String>,
    /// An EC2-compatible endpoint (used for every region). Default: AWS.
    pub ec2_endpoint: Option<String>,
    /// The IAM endpoint for the role check. Default: AWS's, or `ec2_endpoint` when that is
    /// set (on-prem services rarely have IAM: then the check is only a warning).
    pub iam_endpoint: Option<String>,
    /// The AWS profile. Default: `AWS_PROFILE`, else `default` (environment keys first).
    pub profile: Option<String>,
    /// Keep the uploaded disk in the bucket after a successful import. Default: it is
    /// deleted (VM Import no longer needs it; it would cost storage). A failed import keeps
    /// it either way, for inspection.
    pub keep_object: bool,
    /// Credentials to use instead of looking in the environment and the AWS files (the
    /// region then comes from `region`, `AWS_REGION` or `AWS_DEFAULT_REGION`).
    pub credentials: Option<AwsCredentials>,
    /// The VM Import service role. Default `vmimport`.
    pub role_name: Option<String>,
    /// S3 part size in bytes (at least 5 MiB). Default 16 MiB.
    pub part_size: u64,
    /// Parts in flight. Default 4.
    pub concurrency: usize,
    /// Between two looks at an import task or image. Default 15 s.
    pub poll_interval: Duration,
    /// How long an import may take. Default 4 h.
    pub import_timeout: Duration,
    /// How long a registered or copied image may stay `pending`. Default 2 h.
    pub image_timeout: Duration,
    /// Where resumable upload state (and a converted vmdk awaiting upload) is kept.
    /// Default: `<store>/uploads` for a stored image, else the temp folder.
    pub state_dir: Option<PathBuf>,
    pub retry: RetryPolicy,
    /// Cancel: an upload in progress is aborted, an import task in progress is cancelled.
    pub cancel: Option<CancellationToken>,
}

impl AmiOptions {
    pub fn new(bucket: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            region: None,
            bucket: bucket.into(),
            prefix: None,
            name: name.into(),
            description: None,
            tags: BTreeMap::new(),
            copy_to_regions: Vec::new(),
            launch_permission_user_ids: Vec::new(),
            launch_permission_groups: Vec::new(),
            boot_mode: None,
            import_method: ImportMethod::Snapshot,
            s3_endpoint: None,
            ec2_endpoint: None,
            iam_endpoint: None,
            profile: None,
            keep_object: false,
            credentials: None,
            role_name: None,
            part_size: s3::DEFAULT_PART_SIZE,
            concurrency: s3::DEFAULT_CONCURRENCY,
            poll_interval: Duration::from_secs(15),
            import_timeout: Duration::from_secs(4 * 3600),
            image_timeout: Duration::from_secs(2 * 3600),
            state_dir: None,
            retry: RetryPolicy::default(),
            cancel: None,
        }
    }

    fn role(&self) -> &str {
        self.role_name.as_deref().unwrap_or("vmimport")
    }

    /// Problems a user can fix in the options, all at once.
    pub fn validate(&self) -> Result<(), AwsError> {
        let mut problems = Vec::new();
        if self.bucket.trim().is_empty() {
            problems.push("no S3 bucket given (--bucket)".to_string());
        } else if !valid_bucket(&self.bucket) {
            problems.push(format!(
                "`{}` is not a valid S3 bucket name (3-63 lowercase letters, digits, `.` and `-`)",
                self.bucket
            ));
        }
        if let Err(reason) = check_ami_name(&self.name) {
            problems.push(format!("the AMI name `{}` {reason}", self.name));
        }
        match (self.boot_mode.as_deref(), self.import_method) {
            (None | Some("legacy-bios" | "uefi"), _) => {}
            (Some("uefi-preferred"), ImportMethod::Snapshot) => {}
            (Some("uefi-preferred"), ImportMethod::Image) => problems.push(
                "ImportImage does not accept the boot mode `uefi-preferred`; use `uefi` or \
                 `legacy-bios`, or the snapshot import method"
                    .to_string(),
            ),
            (Some(mode), _) => problems.push(format!(
                "unknown boot mode `{mode}`; expected `legacy-bios`, `uefi` or `uefi-preferred`"
            )),
        }
        for id in &self.launch_permission_user_ids {
            if id.len() != 12 || !id.bytes().all(|b| b.is_ascii_digit()) {
                problems.push(format!(
                    "`{id}` is not an AWS account id (12 digits) for a launch permission"
                ));
            }
        }
        for group in &self.launch_permission_groups {
            if group != "all" {
                problems.push(format!(
                    "unknown launch permission group `{group}`; the only group is `all` (public)"
                ));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for region in &self.copy_to_regions {
            if !valid_region(region) {
                problems.push(format!(
                    "`{region}` is not an AWS region name (like eu-west-1)"
                ));
            } else if Some(region) == self.region.as_ref() {
                problems.push(format!(
                    "the AMI is imported in {region}; it cannot also be copied there"
                ));
            } else if !seen.insert(region) {
                problems.push(format!("{region} is named twice in the copy regions"));
            }
        }
        if let Some(region) = &self.region
            && !valid_region(region)
        {
            problems.push(format!(
                "`{region}` is not an AWS region name (like eu-west-1)"
            ));
        }
        if self.part_size < s3::MIN_PART_SIZE {
            problems.push(format!(
                "the part size {} is below S3's minimum of 5 MiB",
                self.part_size
            ));
        }
        for (label, endpoint) in [
            ("S3", &self.s3_endpoint),
            ("EC2", &self.ec2_endpoint),
            ("IAM", &self.iam_endpoint),
        ] {
            if let Some(e) = endpoint
                && !client::valid_endpoint(e)
            {
                problems.push(format!("the {label} endpoint `{e}` is not an http(s) URL"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(AwsError::Invalid { problems })
        }
    }
}

fn valid_bucket(name: &str) -> bool {
    (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn valid_region(name: &str) -> bool {
    !name.is_empty()
        && name.contains('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// EC2's rule for AMI names.
pub fn check_ami_name(name: &str) -> Result<(), String> {
    if !(3..=128).contains(&name.chars().count()) {
        return Err(format!(
            "is {} characters long; AMI names have 3 to 128",
            name.chars().count()
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "()[] ./-'@_".contains(*c)))
    {
        return Err(format!(
            "contains `{bad}`; AMI names may hold letters, digits and ( ) [ ] space . / - ' @ _"
        ));
    }
    Ok(())
}

/// The clients of one import, built from the options and the resolved credentials.
struct ImportClients {
    config: AwsConfig,
    region: String,
    s3: S3Client,
    ec2: Ec2Client,
    iam: IamClient,
    iam_custom: bool,
}

impl ImportClients {
    fn new(options: &AmiOptions) -> Result<ImportClients, AwsError> {
        options.validate()?;
        let config = match &options.credentials {
            Some(given) => {
                let (region, region_source) = match &options.region {
                    Some(r) => (Some(r.clone()), Some("option".to_string())),
                    None => ["AWS_REGION", "AWS_DEFAULT_REGION"]
                        .into_iter()
                        .find_map(|v| {
                            std::env::var(v)
                                .ok()
                                .filter(|r| !r.is_empty())
                                .map(|r| (Some(r), Some(v.to_string())))
                        })
                        .unwrap_or((None, None)),
                };
                AwsConfig {
                    credentials: given.clone(),
                    region,
                    region_source,
                    profile: options.profile.clone().unwrap_or_else(|| "default".into()),
                }
            }
            None => credentials::load(options.profile.as_deref(), options.region.as_deref())?,
        };
        let region = match (&config.region, &options.s3_endpoint, &options.ec2_endpoint) {
            (Some(r), _, _) => r.clone(),
            // On-prem S3/EC2 services mostly ignore the region; AWS's SDKs default to this.
            (None, Some(_), Some(_)) => "us-east-1".to_string(),
            (None, _, _) => {
                return Err(AwsError::NoRegion {
                    profile: config.profile.clone(),
                });
            }
        };
        if options.copy_to_regions.contains(&region) {
            return Err(AwsError::Invalid {
                problems: vec![format!(
                    "the AMI is imported in {region}; it cannot also be copied there"
                )],
            });
        }
        let http = client::http_client();
        let creds = config.credentials.clone();
        let s3 = S3Client::new(
            http.clone(),
            creds.clone(),
            &region,
            options.s3_endpoint.as_deref(),
            options.retry,
        )?;
        let ec2 = Ec2Client::new(
            http.clone(),
            creds.clone(),
            &region,
            options.ec2_endpoint.as_deref(),
            options.retry,
        )?;
        let iam_endpoint = options
            .iam_endpoint
            .as_deref()
            .or(options.ec2_endpoint.as_deref());
        let iam = IamClient::new(http, creds, iam_endpoint, options.retry)?;
        Ok(ImportClients {
            config,
            region,
            s3,
            ec2,
            iam,
            iam_custom: iam_endpoint.is_some(),
        })
    }
}

fn is_credentials_problem(e: &AwsError) -> bool {
    match e {
        AwsError::S3(e) => matches!(**e, S3Error::Credentials { .. }),
        AwsError::Ec2(e) => matches!(**e, Ec2Error::Credentials { .. }),
        _ => false,
    }
}

/// Check everything that can be checked before uploading: the options, credentials and
/// region, the bucket (exists, reachable, in the region), EC2 permission to import (a
/// DryRun), that no AMI already has the name (in every target region), and the VM Import
/// role. Every problem is reported at once; returns warnings (things that could not be
/// checked).
pub async fn preflight(options: &AmiOptions) -> Result<Vec<String>, AwsError> {
    let clients = ImportClients::new(options)?;
    preflight_session(&clients, options).await
}

async fn preflight_session(
    clients: &ImportClients,
    options: &AmiOptions,
) -> Result<Vec<String>, AwsError> {
    let mut problems: Vec<String> = Vec::new();
    let mut warnings: Vec<String> = Vec::new();

    if let Err(e) = clients.s3.head_bucket(&options.bucket).await {
        let e = AwsError::from(e);
        let stop = is_credentials_problem(&e);
        problems.push(error_chain(&e));
        if stop {
            return Err(AwsError::Preflight { problems });
        }
    }

    let disk = DiskSource {
        format: "VMDK".into(),
        bucket: options.bucket.clone(),
        key: "builder-preflight.vmdk".into(),
    };
    let dry_run = match options.import_method {
        ImportMethod::Snapshot => {
            clients
                .ec2
                .import_snapshot(
                    &disk,
                    "builder preflight",
                    options.role(),
                    &BTreeMap::new(),
                    true,
                )
                .await
        }
        ImportMethod::Image => {
            clients
                .ec2
                .import_image(
                    &disk,
                    "builder preflight",
                    options.role(),
                    options.boot_mode.as_deref().unwrap_or("legacy-bios"),
                    &BTreeMap::new(),
                    true,
                )
                .await
        }
    };
    if let Err(e) = dry_run {
        let e = AwsError::from(e);
        let stop = is_credentials_problem(&e);
        problems.push(error_chain(&e));
        if stop {
            return Err(AwsError::Preflight { problems });
        }
    }

    if options.import_method == ImportMethod::Snapshot {
        let regions =
            std::iter::once(clients.region.clone()).chain(options.copy_to_regions.iter().cloned());
        for region in regions {
            let ec2 = clients.ec2.in_region(&region);
            match ec2.images_named(&options.name).await {
                Ok(ids) if !ids.is_empty() => problems.push(
                    Ec2Error::DuplicateName {
                        name: options.name.clone(),
                        region: region.clone(),
                        image_id: ids.join(", "),
                    }
                    .to_string(),
                ),
                Ok(_) => {}
                Err(e) => problems.push(error_chain(&e)),
            }
        }
    }

    match clients.iam.get_role(options.role()).await {
        Ok(RoleCheck::Exists(_)) => {}
        Ok(RoleCheck::Missing) => problems.push(format!(
            "the VM Import service role `{}` does not exist; create it (trusted by \
             vmie.amazonaws.com, allowed to read s3://{} and to create snapshots) as AWS's \
             VM Import/Export guide describes, or name your role with roleName",
            options.role(),
            options.bucket
        )),
        Ok(RoleCheck::NotAllowed) => warnings.push(format!(
            "could not check that the VM Import role `{}` exists: the credentials may not \
             call iam:GetRole",
            options.role()
        )),
        Err(e) if clients.iam_custom => warnings.push(format!(
            "could not check the VM Import role `{}`: IAM at {} did not answer GetRole ({}); \
             custom endpoints often have no IAM",
            options.role(),
            clients.iam.endpoint(),
            error_chain(&e)
        )),
        Err(e) => warnings.push(format!(
            "could not check the VM Import role `{}`: {}",
            options.role(),
            error_chain(&e)
        )),
    }

    if problems.is_empty() {
        Ok(warnings)
    } else {
        Err(AwsError::Preflight { problems })
    }
}

/// The folder for upload state: `<store>/uploads` when the image lives in a store
/// (`<store>/images/<name>/<version>/<n>`), else the temp folder.
fn default_state_dir(image: &StoredImage) -> PathBuf {
    let mut ancestors = image.dir.ancestors();
    let images = ancestors.nth(3);
    if let Some(images) = images
        && images.file_name().is_some_and(|n| n == "images")
        && let Some(root) = images.parent()
    {
        return root.join("uploads");
    }
    std::env::temp_dir().join("builder-uploads")
}

/// A vmdk converted for the upload; removed on drop unless the upload can be resumed.
struct Converted {
    path: PathBuf,
    keep: bool,
}

impl Drop for Converted {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs_err::remove_file(&self.path);
        }
    }
}

/// The file to upload and its VM Import format.
async fn disk_to_upload(
    image: &StoredImage,
    state_dir: &Path,
    progress: &dyn Progress,
) -> Result<(PathBuf, String, Option<Converted>), AwsError> {
    if let Some(vmdk) = image.manifest.output(Format::Vmdk) {
        let path = vmdk.path(&image.dir);
        if path.is_file() {
            return Ok((path, vmdk.file.clone(), None));
        }
    }
    let Some(disk) = image.disk.as_ref().filter(|d| d.path.is_file()) else {
        return Err(AwsError::NoDisk {
            image: image.reference(),
        });
    };
    fs_err::create_dir_all(state_dir)?;
    // Named by the source's digest: an interrupted upload's rerun finds the same bytes (a
    // new conversion would differ: vmdk headers carry a random id).
    let short = disk.sha256.get(..16).unwrap_or(&disk.sha256);
    let dest = state_dir.join(format!("convert-{short}.vmdk"));
    let file_name = format!("{}.vmdk", image.name);
    let converted = Converted {
        path: dest.clone(),
        keep: false,
    };
    if dest.is_file() {
        progress.step(
            TARGET,
            &format!("reusing {} from an interrupted upload", dest.display()),
        );
        return Ok((dest, file_name, Some(converted)));
    }
    progress.step(
        TARGET,
        &format!(
            "converting {} to a streamOptimized vmdk",
            disk.path.display()
        ),
    );
    let (options, _) = export::convert_options(Format::Vmdk, Compression::None);
    img::convert(&disk.path, &dest, &options)
        .await
        .map_err(|source| AwsError::Convert {
            path: disk.path.clone(),
            source,
        })?;
    Ok((dest, file_name, Some(converted)))
}

async fn sleep_or_cancel(duration: Duration, cancel: &Option<CancellationToken>) -> bool {
    match cancel {
        Some(token) => {
            tokio::select! {
                _ = token.cancelled() => true,
                _ = tokio::time::sleep(duration) => false,
            }
        }
        None => {
            tokio::time::sleep(duration).await;
            false
        }
    }
}

/// Poll an import task until it completes, showing its progress and status message.
async fn wait_for_import(
    ec2: &Ec2Client,
    task_id: &str,
    options: &AmiOptions,
    progress: &dyn Progress,
) -> Result<ImportTask, AwsError> {
    let deadline = Instant::now() + options.import_timeout;
    let mut last_shown = String::new();
    loop {
        let task = match options.import_method {
            ImportMethod::Snapshot => ec2.describe_import_snapshot_task(task_id).await?,
            ImportMethod::Image => ec2.describe_import_image_task(task_id).await?,
        };
        let message = task.status_message.clone().unwrap_or_default();
        match task.status.as_str() {
            "completed" => return Ok(task),
            "deleting" | "deleted" | "cancelled" | "failed" => {
                return Err(AwsError::ImportFailed {
                    task: task_id.to_string(),
                    region: ec2.region().to_string(),
                    status: task.status.clone(),
                    message: if message.is_empty() {
                        "no reason given".into()
                    } else {
                        message
                    },
                });
            }
            _ => {}
        }
        let shown = format!(
            "importing {task_id}: {}{}{}",
            task.progress
                .map(|p| format!("{p}%"))
                .unwrap_or_else(|| "…".into()),
            if message.is_empty() { "" } else { " " },
            message
        );
        if shown != last_shown {
            progress.step(TARGET, &shown);
            last_shown = shown;
        }
        if Instant::now() >= deadline {
            return Err(AwsError::ImportTimeout {
                task: task_id.to_string(),
                region: ec2.region().to_string(),
                seconds: options.import_timeout.as_secs(),
                last: last_shown,
            });
        }
        if sleep_or_cancel(options.poll_interval, &options.cancel).await {
            let _ = ec2.cancel_import_task(task_id).await;
            return Err(AwsError::Cancelled {
                during: format!("while {task_id} was running (the task was cancelled)"),
            });
        }
    }
}

/// Wait until an image is `available`; returns its root snapshot id.
async fn wait_for_image(
    ec2: &Ec2Client,
    image_id: &str,
    options: &AmiOptions,
    progress: &dyn Progress,
) -> Result<Option<String>, AwsError> {
    let deadline = Instant::now() + options.image_timeout;
    let mut announced = false;
    loop {
        if let Some(state) = ec2.describe_image(image_id).await? {
            match state.state.as_str() {
                "available" => return Ok(state.snapshot_id),
                "failed" | "error" | "invalid" | "deregistered" => {
                    return Err(AwsError::ImageFailed {
                        image_id: image_id.to_string(),
                        region: ec2.region().to_string(),
                        state: state.state,
                        reason: state.reason,
                    });
                }
                _ => {}
            }
        }
        if !announced {
            progress.step(
                TARGET,
                &format!("waiting for {image_id} in {} to be available", ec2.region()),
            );
            announced = true;
        }
        if Instant::now() >= deadline {
            return Err(AwsError::ImageTimeout {
                image_id: image_id.to_string(),
                region: ec2.region().to_string(),
                seconds: options.image_timeout.as_secs(),
            });
        }
        if sleep_or_cancel(options.poll_interval, &options.cancel).await {
            return Err(AwsError::Cancelled {
                during: format!("while waiting for {image_id}"),
            });
        }
    }
}

/// The S3 key: `<prefix><name>/<version>/<build>/<file>`.
fn object_key(options: &AmiOptions, image: &StoredImage, file_name: &str) -> String {
    let mut prefix = options
        .prefix
        .clone()
        .unwrap_or_else(|| "builder-imports/".to_string());
    if !prefix.is_empty() && !prefix.ends_with('/') {
        prefix.push('/');
    }
    format!(
        "{prefix}{}/{}/{}/{file_name}",
        image.name, image.version, image.build
    )
}

/// Import `image` as an AMI (see the module docs). Runs [`preflight`] first: nothing is
/// uploaded when it finds a problem.
pub async fn import_ami(
    image: &StoredImage,
    options: &AmiOptions,
    progress: &dyn Progress,
) -> Result<Receipt, AwsError> {
    let started = Instant::now();
    progress.step(
        TARGET,
        "checking credentials, bucket, permissions and the vmimport role",
    );
    let clients = ImportClients::new(options)?;
    for warning in preflight_session(&clients, options).await? {
        progress.step(TARGET, &format!("warning: {warning}"));
    }
    let region = clients.region.clone();

    // The disk, in S3.
    let state_dir = options
        .state_dir
        .clone()
        .unwrap_or_else(|| default_state_dir(image));
    let (path, file_name, mut converted) = disk_to_upload(image, &state_dir, progress).await?;
    let key = object_key(options, image, &file_name);
    progress.step(
        TARGET,
        &format!(
            "uploading {} to s3://{}/{key}",
            path.display(),
            options.bucket
        ),
    );
    let upload_options = UploadOptions {
        part_size: options.part_size,
        concurrency: options.concurrency,
        state_dir: state_dir.clone(),
        cancel: options.cancel.clone(),
    };
    let uploaded = match upload_multipart(
        &clients.s3,
        &path,
        &options.bucket,
        &key,
        &upload_options,
        progress,
        TARGET,
    )
    .await
    {
        Ok(u) => u,
        Err(e) => {
            if let (Some(c), S3Error::Interrupted(_)) = (converted.as_mut(), &e) {
                // A rerun resumes with these exact bytes.
                c.keep = true;
            }
            return Err(e.into());
        }
    };
    drop(converted);

    // The import.
    let mut tags = options.tags.clone();
    tags.entry("Name".into())
        .or_insert_with(|| options.name.clone());
    tags.entry("builder:image".into())
        .or_insert_with(|| image.reference());
    let boot_mode = options.boot_mode.clone().unwrap_or_else(|| {
        if image.manifest.host.firmware.starts_with("uefi") {
            "uefi".into()
        } else {
            "legacy-bios".into()
        }
    });
    let description = options
        .description
        .clone()
        .unwrap_or_else(|| format!("{} built by builder", image.reference()));
    let disk = DiskSource {
        format: "VMDK".into(),
        bucket: options.bucket.clone(),
        key: key.clone(),
    };
    let ec2 = &clients.ec2;
    let task_id = match options.import_method {
        ImportMethod::Snapshot => {
            ec2.import_snapshot(&disk, &description, options.role(), &tags, false)
                .await?
        }
        ImportMethod::Image => {
            let role = options.role();
            ec2.import_image(&disk, &description, role, &boot_mode, &tags, false)
                .await?
        }
    };
    progress.step(TARGET, &format!("import task {task_id} started"));
    let task = wait_for_import(ec2, &task_id, options, progress).await?;
    let (image_id, snapshot_id) = match options.import_method {
        ImportMethod::Snapshot => {
            let snapshot_id = task.snapshot_id.ok_or(Ec2Error::Incomplete {
                action: "DescribeImportSnapshotTasks",
                region: region.clone(),
                missing: "the snapshot id of a completed task",
            })?;
            progress.step(
                TARGET,
                &format!("registering {} from {snapshot_id}", options.name),
            );
            let image_id = ec2
                .register_image(&RegisterImage {
                    name: options.name.clone(),
                    description: Some(description.clone()),
                    snapshot_id: snapshot_id.clone(),
                    boot_mode: boot_mode.clone(),
                    architecture: "x86_64".into(),
                    root_device: ROOT_DEVICE.into(),
                })
                .await?;
            (image_id, Some(snapshot_id))
        }
        ImportMethod::Image => {
            let image_id = task.image_id.ok_or(Ec2Error::Incomplete {
                action: "DescribeImportImageTasks",
                region: region.clone(),
                missing: "the image id of a completed task",
            })?;
            (image_id, task.snapshot_id)
        }
    };
    let listed_snapshot = wait_for_image(ec2, &image_id, options, progress).await?;
    let snapshot_id = snapshot_id.or(listed_snapshot);

    let mut ids = BTreeMap::new();
    ids.insert("importTask".to_string(), task_id);
    ids.insert(format!("ami:{region}"), image_id.clone());
    if let Some(s) = &snapshot_id {
        ids.insert(format!("snapshot:{region}"), s.clone());
    }
    let finish = async |ec2: &Ec2Client,
                        image_id: &str,
                        snapshot: Option<&String>|
           -> Result<(), AwsError> {
        progress.step(TARGET, &format!("tagging {image_id} in {}", ec2.region()));
        let mut resources = vec![image_id.to_string()];
        resources.extend(snapshot.cloned());
        ec2.create_tags(&resources, &tags).await?;
        if !options.launch_permission_user_ids.is_empty()
            || !options.launch_permission_groups.is_empty()
        {
            progress.step(TARGET, &format!("sharing {image_id} in {}", ec2.region()));
            ec2.add_launch_permissions(
                image_id,
                &options.launch_permission_user_ids,
                &options.launch_permission_groups,
            )
            .await?;
        }
        Ok(())
    };
    finish(ec2, &image_id, snapshot_id.as_ref()).await?;

    // Copies: start them all, then wait for each (they run in parallel in AWS).
    let mut copies = Vec::new();
    for destination in &options.copy_to_regions {
        progress.step(TARGET, &format!("copying {image_id} to {destination}"));
        let target_ec2 = ec2.in_region(destination);
        let copy_id = target_ec2
            .copy_image(&region, &image_id, &options.name, Some(&description))
            .await?;
        copies.push((target_ec2, copy_id));
    }
    for (target_ec2, copy_id) in &copies {
        let snapshot = wait_for_image(target_ec2, copy_id, options, progress).await?;
        finish(target_ec2, copy_id, snapshot.as_ref()).await?;
        ids.insert(format!("ami:{}", target_ec2.region()), copy_id.clone());
        if let Some(s) = snapshot {
            ids.insert(format!("snapshot:{}", target_ec2.region()), s);
        }
    }

    // VM Import has copied the disk into EBS: the object is no longer needed.
    let object = format!("s3://{}/{key}", options.bucket);
    if options.keep_object {
        ids.insert("s3Object".to_string(), object);
    } else {
        progress.step(TARGET, &format!("deleting {object}"));
        if let Err(e) = clients.s3.delete_object(&options.bucket, &key).await {
            progress.step(
                TARGET,
                &format!(
                    "warning: could not delete {object} ({}); delete it yourself",
                    error_chain(&e)
                ),
            );
            ids.insert("s3Object".to_string(), object);
        }
    }

    let mut digests = BTreeMap::new();
    digests.insert("disk".to_string(), format!("sha256:{}", uploaded.sha256));
    if !uploaded.etag.is_empty() {
        digests.insert(
            "s3ETag".to_string(),
            uploaded.etag.trim_matches('"').to_string(),
        );
    }
    let _ = &clients.config;
    Ok(Receipt {
        kind: "ami".into(),
        location: format!("{image_id} ({region})"),
        digests,
        ids,
        finished: Utc::now(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_report_every_problem() {
        let mut options = AmiOptions::new("Bad_Bucket", "x");
        options.boot_mode = Some("efi".into());
        options.launch_permission_user_ids = vec!["123".into()];
        options.launch_permission_groups = vec!["everyone".into()];
        options.copy_to_regions = vec!["eu-west-1".into(), "eu-west-1".into()];
        options.part_size = 1024;
        options.s3_endpoint = Some("localhost:9000".into());
        let Err(AwsError::Invalid { problems }) = options.validate() else {
            panic!("invalid options pass");
        };
        let text = problems.join("\n");
        for expected in [
            "`Bad_Bucket` is not a valid S3 bucket name",
            "the AMI name `x` is 1 characters long",
            "unknown boot mode `efi`",
            "`123` is not an AWS account id",
            "unknown launch permission group `everyone`",
            "eu-west-1 is named twice",
            "below S3's minimum",
            "the S3 endpoint `localhost:9000` is not an http(s) URL",
        ] {
            assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
        }
        let mut ok = AmiOptions::new("my-bucket", "web 1.0 (2026-11-21)");
        ok.boot_mode = Some("uefi-preferred".into());
        assert!(ok.validate().is_ok());
        ok.import_method = ImportMethod::Image;
        let Err(AwsError::Invalid { problems }) = ok.validate() else {
            panic!("ImportImage takes no uefi-preferred");
        };
        assert!(problems[0].contains("does not accept the boot mode `uefi-preferred`"));
    }

    #[test]
    fn ami_names_follow_ec2_rules() {
        assert!(check_ami_name("debian-12/web_1.0 [x] (y) 'z' @1").is_ok());
        assert!(check_ami_name("no:colons").is_err());
        assert!(check_ami_name(&"a".repeat(129)).is_err());
    }

    #[test]
    fn state_lives_in_the_store() {
        let image_dir = PathBuf::from("/data/store/images/web/1.0.0/3");
        let manifest = crate::store::Manifest::new(
            crate::store::manifest::ImageId {
                name: "web".into(),
                version: "1.0.0".into(),
                build: 3,
            },
            "id",
        );
        let image = StoredImage {
            name: "web".into(),
            version: "1.0.0".parse().expect("version"),
            build: 3,
            dir: image_dir,
            manifest,
            disk: None,
        };
        assert_eq!(
            default_state_dir(&image),
            PathBuf::from("/data/store/uploads")
        );
        let mut options = AmiOptions::new("b", "name");
        assert_eq!(
            object_key(&options, &image, "web.vmdk"),
            "builder-imports/web/1.0.0/3/web.vmdk"
        );
        options.prefix = Some("imports".into());
        assert_eq!(
            object_key(&options, &image, "d.vmdk"),
            "imports/web/1.0.0/3/d.vmdk"
        );

        // Callers spawn the import on a multi-threaded runtime: its future must be Send.
        fn assert_send<T: Send>(_: &T) {}
        let future = import_ami(&image, &options, &crate::distribute::NoProgress);
        assert_send(&future);
        let future = preflight(&options);
        assert_send(&future);
    }
}
