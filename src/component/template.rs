//! The AWSTOE `{{ … }}` reference language: parsing a string into text and references, and
//! expanding it against a [`Scope`]. Pure: no I/O.
//!
//! Forms (see the reference, 1.5): `Name` (parameter or constant), `loop.index`/`loop.value`,
//! `<loopName>.index`/`.value`, `<phase>.<step>.inputs.<key>` / `.inputs[<i>].<key>`,
//! `<phase>.<step>.outputs.<key>` / `.outputs[<i>].<key>`, `aws:ssm:…`.

/// One parsed reference inside `{{ }}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    /// A parameter or constant.
    Variable(String),
    /// `loop.value` (name `None`) or `<name>.value`.
    Loop {
        name: Option<String>,
        field: LoopField,
    },
    /// `<phase>.<step>.inputs…` or `<phase>.<step>.outputs…`.
    Chain {
        phase: String,
        step: String,
        kind: ChainKind,
        index: Option<usize>,
        key: String,
    },
    /// `aws:ssm:<name>` or `aws:ssm:resolve(<ref>)`: not available offline.
    Ssm(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoopField {
    Index,
    Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChainKind {
    Inputs,
    Outputs,
}

/// A piece of a template string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    /// A reference and the byte range of the whole `{{ … }}` in the source string.
    Ref {
        reference: Reference,
        range: std::ops::Range<usize>,
        source: String,
    },
}

/// Why a string could not be parsed as a template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TemplateError {
    pub message: String,
    /// Byte range in the string the error is about.
    pub range: std::ops::Range<usize>,
}

/// What a reference resolves to at run time.
pub trait Scope {
    /// `Ok(None)` means "leave the reference in the text unchanged" (e.g. a loop reference in a
    /// step without a loop, as AWSTOE does). `Err` is a run-time error with a message.
    fn resolve(&self, reference: &Reference) -> Result<Option<String>, String>;
}
