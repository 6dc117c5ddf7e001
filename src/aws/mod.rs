//! AWS requests, for any module that talks to AWS or an S3-compatible server: the AMI import
//! (`distribute::aws`: S3, EC2, IAM) and the component actions `S3Download`/`S3Upload`. It
//! knows nothing of images, builds or components.
//!
//! No AWS SDK: requests are signed with `aws-sigv4` (AWS's own signer) and sent with
//! reqwest; answers are XML read with quick-xml. The SDK crates cost minutes of build and
//! GiBs of `target/` on our 2-core machines, and we need a dozen calls. One signer serves
//! every service (S3's REST calls and EC2's and IAM's Query calls), so S3 has one client too.
//!
//! - [`credentials`]: keys and region from the environment and `~/.aws` files, as the CLI.
//! - [`client`]: one signed request, its XML error, retries with backoff.
//! - [`s3`]: objects (get, put, list), HeadBucket, and a resumable multipart upload with
//!   per-part SHA-256.
//! - [`xml`]: the small XML tree the answers are read into.

pub mod client;
pub mod credentials;
pub mod s3;
pub mod xml;

pub use client::RetryPolicy;
pub use credentials::{AwsConfig, AwsCredentials, CredentialsError};
pub use s3::{S3Client, S3Error, UploadOptions, Uploaded};
