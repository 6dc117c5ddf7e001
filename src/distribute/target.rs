//! Targets as the user names them, and the dispatcher. (Being written: see the team notes.)

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("{0}")]
    Other(String),
}
