//! Reading a component document: YAML with spans ([`crate::yaml`]) validated into the
//! [`Document`] model. Every problem of a document is collected and reported at once, each
//! at its `file:line:col` with a hint; invalid input never panics. Pure: [`parse_str`] reads
//! nothing but its arguments; [`load`] reads the one file.

mod expr;
mod inputs;
mod refs;
mod spec;
mod structure;

use std::path::{Path, PathBuf};

pub use spec::{
    ENCODINGS, HASH_ALGORITHMS, InputShape, InputSpec, InputType, input_shape, input_spec,
    inputs_optional, outputs_of,
};

use crate::component::document::Document;
use crate::diagnostic::{Diagnostics, Problem, Span};
use crate::yaml::reader::Reader;

/// The noun used in diagnostics headings.
pub const NOUN: &str = "component document";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The document cannot be read; the io error names the file.
    #[error("could not read the component document")]
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
    let checked = load_checked(path)?;
    match checked.document {
        Some(document) => Ok(document),
        None => Err(LoadError::Invalid(checked.diagnostics)),
    }
}

/// Read and validate the document at `path`, keeping its warnings (see [`check`]); only an
/// unreadable file is an `Err`.
pub fn load_checked(path: &Path) -> Result<Checked, LoadError> {
    let text = fs_err::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(check(path, &text))
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
    let yaml_failed = root.is_none() && !problems.is_empty();
    diagnostics.extend(
        problems
            .into_iter()
            .map(|p| explain_unquoted_template(text, p)),
    );
    let mut cx = DocumentReader {
        reader: Reader::awstoe(text),
        current: None,
        texts: Vec::new(),
        declared_elsewhere: Vec::new(),
    };
    let document = match &root {
        Some(root) => structure::document(&mut cx, root, path),
        None if yaml_failed => None,
        None => {
            cx.error(
                Span::from_offsets(text, 0, 0),
                "the file holds no YAML document",
                Some(
                    "a component document needs at least `schemaVersion: 1.0` and `phases`".into(),
                ),
            );
            None
        }
    };
    diagnostics.extend(cx.reader.problems);
    diagnostics.sort();
    let document = document.filter(|_| !diagnostics.has_errors());
    Checked {
        document,
        diagnostics,
    }
}

/// A YAML syntax error on a line where a value starts with an unquoted `{{` is almost always
/// the AWSTOE trap (`- {{ Dir }}/bin` is a flow mapping followed by text): say so.
fn explain_unquoted_template(source: &str, problem: Problem) -> Problem {
    if !problem.message.starts_with("YAML syntax error") {
        return problem;
    }
    let Some(line) = source.lines().nth(problem.span.line.saturating_sub(1)) else {
        return problem;
    };
    let trimmed = line.trim_start().trim_start_matches("- ");
    let value = match trimmed.split_once(": ") {
        Some((_, v)) if v.trim_start().starts_with("{{") => v.trim(),
        _ if trimmed.starts_with("{{") => trimmed.trim(),
        _ => return problem,
    };
    Problem {
        hint: Some(format!(
            "a value that starts with `{{{{` must be quoted, or YAML reads it as a mapping: `\"{}\"`",
            value.replace('"', "\\\"")
        )),
        ..problem
    }
}

/// What validation carries along: the shared [`Reader`] (the source, for the `{{ }}` shape
/// check and for locating references inside scalars, and the problems found so far) and what
/// only component documents need.
struct DocumentReader<'s> {
    reader: Reader<'s>,
    /// The step being read, for strings that may hold references.
    current: Option<refs::StepCtx>,
    /// Strings with `{{`, checked once every phase and step is known.
    texts: Vec<refs::Text>,
    /// Variable names from malformed declarations (already reported).
    declared_elsewhere: Vec<String>,
}

impl<'s> std::ops::Deref for DocumentReader<'s> {
    type Target = Reader<'s>;
    fn deref(&self) -> &Self::Target {
        &self.reader
    }
}

impl std::ops::DerefMut for DocumentReader<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.reader
    }
}
