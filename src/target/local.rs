//! This machine as a step target.
