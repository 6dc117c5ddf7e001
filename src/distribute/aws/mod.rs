//! AWS: S3 multipart upload and EC2 AMI import. (Being written: see the team notes.)

#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    #[error("{0}")]
    Other(String),
}
