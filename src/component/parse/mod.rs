//! Reading a component document: YAML with spans ([`crate::yaml`]) validated into the
//! [`Document`] model. Every problem of a document is collected and reported at once, each
//! at its `file:line:col` with a hint; invalid input never panics. Pure: [`parse_str`] reads
//! nothing but its arguments; [`load`] reads the one file.

mod spec;

use std::path::{Path, PathBuf};

pub use spec::{
    ENCODINGS, HASH_ALGORITHMS, InputShape, InputSpec, InputType, input_shape, input_spec,
    inputs_optional,
};

use crate::component::document::Document;
use crate::diagnostic::Diagnostics;

/// The noun used in diagnostics headings.
pub const NOUN: &str = "component document";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// could not read `{path}`
    #[error("could not read `{path}`")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The document was read but is not valid; render the diagnostics to show why.
    #[error("{0}")]
    Invalid(Diagnostics),
}

/// Read and validate the document at `path`.
pub fn load(path: &Path) -> Result<Document, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_str(path, &text).map_err(LoadError::Invalid)
}

/// Validate `text` as the document at `path` (used for messages and [`Document::source`]).
/// Warnings do not make it fail; use [`check`] to see them too.
pub fn parse_str(path: &Path, text: &str) -> Result<Document, Diagnostics> {
    let checked = check(path, text);
    match checked.document {
        Some(document) if !checked.diagnostics.has_errors() => Ok(document),
        _ => Err(checked.diagnostics),
    }
}

/// The outcome of validating one document: the document when it has no errors, and every
/// problem found (errors and warnings).
#[derive(Debug)]
pub struct Checked {
    pub document: Option<Document>,
    pub diagnostics: Diagnostics,
}

/// Validate `text`, keeping warnings even when the document is valid.
pub fn check(path: &Path, text: &str) -> Checked {
    let mut diagnostics = Diagnostics::new(path, text, NOUN);
    let (root, problems) = crate::yaml::parse(text);
    diagnostics.extend(problems);
    let _ = root;
    diagnostics.push(crate::diagnostic::Problem::error(
        crate::diagnostic::Span::default(),
        "validation is being written (H1)",
    ));
    Checked {
        document: None,
        diagnostics,
    }
}
