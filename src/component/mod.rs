//! AWSTOE-compatible component documents: the model ([`document`]), reading and validating
//! ([`parse`]), the `{{ }}` language ([`template`]) and the executor that runs phases on a
//! [`crate::machine::Machine`].
//!
//! `document`, `parse` and `template` are pure: they read their input and nothing else.

pub mod actions;
pub mod condition;
pub mod document;
pub mod executor;
pub mod parse;
pub mod report;
pub mod template;
