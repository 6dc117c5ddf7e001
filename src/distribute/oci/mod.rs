//! OCI registries: push a stored image as an OCI artifact or a KubeVirt containerDisk, pull a
//! pushed disk back. (Being written: see the team notes.)

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("{0}")]
    Other(String),
}
