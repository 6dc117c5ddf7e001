//! AWS: a stored image becomes an AMI. The disk (the build's vmdk, else its qcow2 converted
//! to a streamOptimized vmdk) is uploaded to S3 in parts, imported with EC2 ImportSnapshot
//! and registered with RegisterImage (or imported whole with ImportImage when asked), then
//! tagged, copied to other regions and shared.
//!
//! No AWS SDK: requests are signed with `aws-sigv4` (AWS's own signer) and sent with
//! reqwest; answers are XML read with quick-xml. The SDK crates cost minutes of build and
//! GiBs of `target/` on our 2-core machines, and we need a dozen calls.
//!
//! - [`credentials`]: keys and region from the environment and `~/.aws` files, as the CLI.
//! - [`client`]: one signed request, its XML error, retries with backoff.
//! - [`s3`]: HeadBucket and a resumable multipart upload with per-part SHA-256.
//! - [`ec2`]: the EC2 Query calls of an import; [`iam`]: does the `vmimport` role exist?
//! - [`ami`]: [`preflight`] and [`import_ami`], the flow above.
//!
//! Tests: S3 runs against a real S3-compatible server (s3s-fs). No server we can run
//! implements VM Import, so EC2 and IAM are tested against a scripted fake that checks
//! every request's signature, action and parameters (`tests/distribute_aws.rs`).

pub mod ami;
pub mod client;
pub mod credentials;
pub mod ec2;
pub mod iam;
pub mod s3;
mod xml;

use std::path::PathBuf;

pub use ami::{AmiOptions, import_ami, preflight};
pub use client::RetryPolicy;
pub use credentials::{AwsConfig, AwsCredentials, CredentialsError};
pub use ec2::Ec2Error;
pub use iam::IamError;
pub use s3::{S3Client, S3Error, UploadOptions, Uploaded, upload_multipart};

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
