//! AWS: a stored image becomes an AMI. The disk (the build's vmdk, else its qcow2 converted
//! to a streamOptimized vmdk) is uploaded to S3 in parts, imported with EC2 ImportSnapshot
//! and registered with RegisterImage (or imported whole with ImportImage when asked), then
//! tagged, copied to other regions and shared.
//!
//! Requests, credentials and the S3 client (HeadBucket, the resumable multipart upload) are
//! [`crate::aws`]'s; this module holds what only an import needs:
//!
//! - [`ec2`]: the EC2 Query calls of an import; [`iam`]: does the `vmimport` role exist?
//! - [`ami`]: [`preflight`] and [`import_ami`], the flow above.
//!
//! Tests: S3 runs against a real S3-compatible server (s3s-fs). No server we can run
//! implements VM Import, so EC2 and IAM are tested against a scripted fake that checks
//! every request's signature, action and parameters (`tests/distribute_aws.rs`).

pub mod ami;
pub mod ec2;
pub mod iam;

use std::path::{Path, PathBuf};

pub use crate::aws::{
    AwsConfig, AwsCredentials, CredentialsError, RetryPolicy, S3Client, S3Error, UploadOptions,
    Uploaded, client,
};
pub use ami::{AmiOptions, import_ami, preflight};
pub use ec2::Ec2Error;
pub use iam::IamError;

/// [`crate::aws::s3::upload_multipart`], its progress reported as `target`'s transfer of `key`.
pub async fn upload_multipart(
    s3: &S3Client,
    path: &Path,
    bucket: &str,
    key: &str,
    options: &UploadOptions,
    progress: &dyn crate::distribute::Progress,
    target: &str,
) -> Result<Uploaded, S3Error> {
    let report = |done, total| progress.transfer(target, key, done, Some(total));
    crate::aws::s3::upload_multipart(s3, path, bucket, key, options, &report).await
}

/// Why an AMI import (or its preflight) failed.
#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    #[error("the AMI options are not valid: {}", problems.join("; "))]
    Invalid { problems: Vec<String> },
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    #[error(
        "no AWS region given: pass --region, set AWS_REGION, or set `region` for the profile \
         `{profile}` in ~/.aws/config"
    )]
    NoRegion { profile: String },
    #[error(
        "the AWS preflight found {} problem(s); nothing was uploaded:\n{}",
        problems.len(),
        problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n")
    )]
    Preflight { problems: Vec<String> },
    // Boxed: S3 and EC2 errors carry the service's answer, and `AwsError` travels inside
    // `DistributeError` through every target's `Result`.
    #[error(transparent)]
    S3(Box<S3Error>),
    #[error(transparent)]
    Ec2(Box<Ec2Error>),
    #[error(transparent)]
    Iam(Box<IamError>),
    #[error("{image} has no disk to upload (no vmdk, qcow2 or raw output, or its file is gone)")]
    NoDisk { image: String },
    #[error("converting {} to a streamOptimized vmdk failed", path.display())]
    Convert {
        path: PathBuf,
        #[source]
        source: crate::vm::img::ImgError,
    },
    #[error("the import task {task} in {region} failed ({status}): {message}")]
    ImportFailed {
        task: String,
        region: String,
        status: String,
        message: String,
    },
    #[error(
        "the import task {task} in {region} did not finish within {seconds} s (last seen: \
         {last}); it may still be running in AWS"
    )]
    ImportTimeout {
        task: String,
        region: String,
        seconds: u64,
        last: String,
    },
    #[error("the image {image_id} in {region} is `{state}`{}", reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default())]
    ImageFailed {
        image_id: String,
        region: String,
        state: String,
        reason: Option<String>,
    },
    #[error("the image {image_id} in {region} was not available within {seconds} s")]
    ImageTimeout {
        image_id: String,
        region: String,
        seconds: u64,
    },
    #[error("the AMI import was cancelled {during}")]
    Cancelled { during: String },
    /// A file system call failed; fs-err's error names the path and what was being done.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl From<S3Error> for AwsError {
    fn from(e: S3Error) -> Self {
        AwsError::S3(Box::new(e))
    }
}

impl From<Ec2Error> for AwsError {
    fn from(e: Ec2Error) -> Self {
        AwsError::Ec2(Box::new(e))
    }
}

impl From<IamError> for AwsError {
    fn from(e: IamError) -> Self {
        AwsError::Iam(Box::new(e))
    }
}

impl AwsError {
    /// The user's input is wrong (options, credentials, names), not the service or the host:
    /// the CLI exits 2 for these.
    pub fn is_input(&self) -> bool {
        match self {
            AwsError::Invalid { .. }
            | AwsError::Credentials(_)
            | AwsError::NoRegion { .. }
            | AwsError::Preflight { .. } => true,
            AwsError::Ec2(e) => matches!(
                **e,
                Ec2Error::DuplicateName { .. } | Ec2Error::BadEndpoint { .. }
            ),
            AwsError::S3(e) => {
                matches!(**e, S3Error::BadEndpoint { .. } | S3Error::PartSize { .. })
            }
            _ => false,
        }
    }

    /// What the user can do next, where the message alone does not say it.
    pub fn hint(&self) -> Option<String> {
        match self {
            AwsError::S3(e) if matches!(**e, S3Error::Interrupted(_)) => {
                Some("rerun the same command: parts already in S3 are not sent again".to_string())
            }
            AwsError::ImportTimeout { task, .. } => Some(format!(
                "follow it with `aws ec2 describe-import-snapshot-tasks --import-task-ids {task}` \
                 (or describe-import-image-tasks), or raise the import timeout"
            )),
            AwsError::ImportFailed { .. } => Some(
                "VM Import reports disk or OS problems in the status message; check that the \
                 image boots under QEMU and that the `vmimport` role can read the bucket"
                    .to_string(),
            ),
            _ => None,
        }
    }
}
