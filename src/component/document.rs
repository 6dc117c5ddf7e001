//! The validated AWSTOE component document: what the parser produces and the executor runs.
//!
//! A value of these types is always valid: every check is done while building it (in
//! `parse`). Strings that may hold `{{ … }}` references stay as written; the executor
//! expands them at run time with [`super::template`].

use std::path::PathBuf;

use serde::Serialize;

/// A byte range in the source file, for messages after parsing (e.g. at run time). One type
/// for every input file, so it lives with the diagnostics.
pub use crate::diagnostic::Span;

#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub name: Option<String>,
    pub description: Option<String>,
    pub parameters: Vec<Parameter>,
    pub constants: Vec<Constant>,
    pub phases: Vec<Phase>,
    /// Where it was read from and the sha256 of its bytes (used to pin it in plans).
    pub source: SourceInfo,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceInfo {
    pub path: PathBuf,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Parameter {
    pub name: String,
    /// Declared type; `string` in every real document.
    pub kind: ParameterType,
    /// `None` means required: a run without a value for it fails before anything runs.
    pub default: Option<String>,
    pub description: Option<String>,
    /// Empty when not given. When given, a value outside it is rejected before the run.
    pub allowed_values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ParameterType {
    String,
    Integer,
    Boolean,
    StringList,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Constant {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    pub name: String,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub name: String,
    pub action: Action,
    /// The inputs as written, as JSON values. Strings are unexpanded templates. Map-style
    /// inputs are an object; list-style inputs an array of objects. `Null` when absent
    /// (allowed only for `Reboot` and `UpdateOS`). Integer-looking `permissions` values are
    /// kept as their source text (`0777` stays `"0777"`).
    pub inputs: serde_json::Value,
    pub on_failure: OnFailure,
    /// Total attempts (1 = no retry).
    pub max_attempts: u32,
    /// `None` = no timeout (`-1`). Default 7200 s.
    pub timeout_secs: Option<u64>,
    pub looping: Option<Loop>,
    pub condition: Option<Condition>,
    pub span: Span,
}

pub const DEFAULT_TIMEOUT_SECS: u64 = 7200;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum OnFailure {
    Abort,
    Continue,
    Ignore,
}

/// Every action module AWSTOE knows. Windows-only ones validate but do not run on Linux.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Action {
    ExecuteBash,
    ExecuteBinary,
    ExecutePowerShell,
    ExecuteDocument,
    Assert,
    Reboot,
    UpdateOS,
    SetRegistry,
    InstallMSI,
    UninstallMSI,
    S3Download,
    S3Upload,
    WebDownload,
    CreateFile,
    CreateFolder,
    CreateSymlink,
    AppendFile,
    CopyFile,
    CopyFolder,
    MoveFile,
    MoveFolder,
    DeleteFile,
    DeleteFolder,
    ListFiles,
    ReadFile,
    SetFileEncoding,
    SetFileOwner,
    SetFolderOwner,
    SetFilePermissions,
    SetFolderPermissions,
}

impl Action {
    pub const ALL: [Action; 30] = [
        Action::ExecuteBash,
        Action::ExecuteBinary,
        Action::ExecutePowerShell,
        Action::ExecuteDocument,
        Action::Assert,
        Action::Reboot,
        Action::UpdateOS,
        Action::SetRegistry,
        Action::InstallMSI,
        Action::UninstallMSI,
        Action::S3Download,
        Action::S3Upload,
        Action::WebDownload,
        Action::CreateFile,
        Action::CreateFolder,
        Action::CreateSymlink,
        Action::AppendFile,
        Action::CopyFile,
        Action::CopyFolder,
        Action::MoveFile,
        Action::MoveFolder,
        Action::DeleteFile,
        Action::DeleteFolder,
        Action::ListFiles,
        Action::ReadFile,
        Action::SetFileEncoding,
        Action::SetFileOwner,
        Action::SetFolderOwner,
        Action::SetFilePermissions,
        Action::SetFolderPermissions,
    ];

    /// The name as written in documents (`ExecuteBash`).
    pub fn name(self) -> &'static str {
        match self {
            Action::ExecuteBash => "ExecuteBash",
            Action::ExecuteBinary => "ExecuteBinary",
            Action::ExecutePowerShell => "ExecutePowerShell",
            Action::ExecuteDocument => "ExecuteDocument",
            Action::Assert => "Assert",
            Action::Reboot => "Reboot",
            Action::UpdateOS => "UpdateOS",
            Action::SetRegistry => "SetRegistry",
            Action::InstallMSI => "InstallMSI",
            Action::UninstallMSI => "UninstallMSI",
            Action::S3Download => "S3Download",
            Action::S3Upload => "S3Upload",
            Action::WebDownload => "WebDownload",
            Action::CreateFile => "CreateFile",
            Action::CreateFolder => "CreateFolder",
            Action::CreateSymlink => "CreateSymlink",
            Action::AppendFile => "AppendFile",
            Action::CopyFile => "CopyFile",
            Action::CopyFolder => "CopyFolder",
            Action::MoveFile => "MoveFile",
            Action::MoveFolder => "MoveFolder",
            Action::DeleteFile => "DeleteFile",
            Action::DeleteFolder => "DeleteFolder",
            Action::ListFiles => "ListFiles",
            Action::ReadFile => "ReadFile",
            Action::SetFileEncoding => "SetFileEncoding",
            Action::SetFileOwner => "SetFileOwner",
            Action::SetFolderOwner => "SetFolderOwner",
            Action::SetFilePermissions => "SetFilePermissions",
            Action::SetFolderPermissions => "SetFolderPermissions",
        }
    }

    pub fn from_name(name: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.name() == name)
    }

    /// Windows-only modules: they validate, but `run` on Linux refuses them.
    pub fn windows_only(self) -> bool {
        matches!(
            self,
            Action::ExecutePowerShell
                | Action::InstallMSI
                | Action::UninstallMSI
                | Action::SetRegistry
                | Action::SetFileEncoding
        )
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Loop {
    pub name: Option<String>,
    pub kind: LoopKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum LoopKind {
    /// Inclusive range; validated to terminate (`update_by` != 0 and pointing towards `end`).
    For {
        start: i64,
        end: i64,
        update_by: i64,
    },
    /// Items may hold references.
    ForEach(Vec<String>),
    /// `list` (may hold references) split on `delimiter`.
    ForEachDelimited { list: String, delimiter: char },
}

/// A step's `if`.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub expr: Expr,
    /// What to do when `expr` is true; `Execute` when not written.
    pub then: Branch,
    /// What to do when `expr` is false; `Skip` when not written.
    pub otherwise: Branch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Branch {
    Abort,
    Execute,
    Skip,
}

/// A comparison or logical expression, used by `if` and by `Assert`. Operands are strings as
/// written (numbers keep their source text) and may hold references.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// `value <op> baseline`.
    Compare {
        op: CompareOp,
        baseline: String,
        value: String,
    },
    /// `stringIsEmpty` / `stringIsWhitespace`: one operand.
    StringTest {
        op: StringTest,
        value: String,
    },
    /// `binaryExists`, `fileExists`, `folderExists`.
    Exists {
        op: ExistsOp,
        path: String,
    },
    /// `fileSHA256Equals: <digest>` with `path: <file>`.
    FileHash {
        algorithm: HashAlgorithm,
        digest: String,
        path: String,
    },
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Not(Box<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum CompareOp {
    StringEquals,
    StringLessThan,
    StringLessThanEquals,
    StringGreaterThan,
    StringGreaterThanEquals,
    PatternMatches,
    NumberEquals,
    NumberLessThan,
    NumberLessThanEquals,
    NumberGreaterThan,
    NumberGreaterThanEquals,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum StringTest {
    IsEmpty,
    IsWhitespace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ExistsOp {
    Binary,
    File,
    Folder,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum HashAlgorithm {
    Md5,
    Sha1,
    Sha256,
    Sha512,
}

/// Each operator as documents spell it (reference 1.9/1.10).
pub const COMPARISONS: &[(&str, CompareOp)] = &[
    ("stringEquals", CompareOp::StringEquals),
    ("stringLessThan", CompareOp::StringLessThan),
    ("stringLessThanEquals", CompareOp::StringLessThanEquals),
    ("stringGreaterThan", CompareOp::StringGreaterThan),
    (
        "stringGreaterThanEquals",
        CompareOp::StringGreaterThanEquals,
    ),
    ("patternMatches", CompareOp::PatternMatches),
    ("numberEquals", CompareOp::NumberEquals),
    ("numberLessThan", CompareOp::NumberLessThan),
    ("numberLessThanEquals", CompareOp::NumberLessThanEquals),
    ("numberGreaterThan", CompareOp::NumberGreaterThan),
    (
        "numberGreaterThanEquals",
        CompareOp::NumberGreaterThanEquals,
    ),
];
pub const STRING_TESTS: &[(&str, StringTest)] = &[
    ("stringIsEmpty", StringTest::IsEmpty),
    ("stringIsWhitespace", StringTest::IsWhitespace),
];
pub const EXISTS: &[(&str, ExistsOp)] = &[
    ("binaryExists", ExistsOp::Binary),
    ("fileExists", ExistsOp::File),
    ("folderExists", ExistsOp::Folder),
];
pub const HASHES: &[(&str, HashAlgorithm)] = &[
    ("fileMD5Equals", HashAlgorithm::Md5),
    ("fileSHA1Equals", HashAlgorithm::Sha1),
    ("fileSHA256Equals", HashAlgorithm::Sha256),
    ("fileSHA512Equals", HashAlgorithm::Sha512),
];

/// The operator `name` of one of the tables above.
pub fn operator<T: Copy>(table: &[(&str, T)], name: &str) -> Option<T> {
    table.iter().find(|(n, _)| *n == name).map(|(_, op)| *op)
}
