//! The stages of one build, in order, and the undo list that releases what they created.
//! For now only the undo list lives here; the stages come with the build command.

pub mod plan;
pub mod undo;
