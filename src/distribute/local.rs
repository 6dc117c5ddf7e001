//! Local targets: a directory, a Vagrant box, the store. (Being written: see the team notes.)

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("{0}")]
    Other(String),
}
