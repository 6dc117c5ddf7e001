//! What each action module accepts under `inputs`: shape (map or list of maps) and, per key,
//! its type and whether it is required. One table, shared by validation (here) and by the
//! actions that deserialize the expanded inputs into typed structs (the executor), so the two
//! cannot disagree. From the reference, section 2.

use crate::component::document::Action;

/// How `inputs` is written for an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputShape {
    /// A single map (`inputs: {commands: [...]}`).
    Map,
    /// A list of maps, each one operation (`inputs: [{path: ...}, {path: ...}]`).
    List,
    /// `Assert`: exactly one comparison or logical operator directly under `inputs`.
    Expression,
}

/// The type of one input value, as it is stored in `Step::inputs` (JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputType {
    /// A string; YAML numbers and booleans are accepted and kept as their source text.
    /// May hold references.
    String,
    /// A string from a closed set (compared as written; checked only when it holds no
    /// reference).
    OneOf(&'static [&'static str]),
    /// A YAML boolean (`true`/`false`); stored as a JSON bool. No references.
    Bool,
    /// A YAML integer; stored as a JSON number. No references.
    Int,
    /// A list of strings (numbers kept as source text); items may hold references.
    StringList,
    /// A file mode: a string, or an unquoted number kept as its source text (`0644` stays
    /// `"0644"`, never the number 420 or 644).
    Mode,
    /// `ExecuteDocument` `parameters`: a list of `{name, value}` maps of strings.
    NameValueList,
    /// A map of string to string (`InstallMSI` `properties`).
    StringMap,
    /// `SetRegistry` `value`: a string, a number or a list of strings (kept as written).
    Scalar,
}

/// One key under `inputs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputSpec {
    pub key: &'static str,
    pub kind: InputType,
    pub required: bool,
}

const fn req(key: &'static str, kind: InputType) -> InputSpec {
    InputSpec {
        key,
        kind,
        required: true,
    }
}

const fn opt(key: &'static str, kind: InputType) -> InputSpec {
    InputSpec {
        key,
        kind,
        required: false,
    }
}

use InputType::{
    Bool, Int, Mode, NameValueList, OneOf, Scalar, String as Str, StringList, StringMap,
};

/// Encodings of the file modules (case-insensitive in AWSTOE; checked case-insensitively).
pub const ENCODINGS: &[&str] = &[
    "utf8",
    "utf-8",
    "utf16",
    "utf-16",
    "utf16-le",
    "utf-16-le",
    "utf16-be",
    "utf-16-be",
    "utf32",
    "utf-32",
    "utf32-le",
    "utf-32-le",
    "utf32-be",
    "utf-32-be",
];
pub const HASH_ALGORITHMS: &[&str] = &["MD5", "SHA1", "SHA256", "SHA512"];
pub const MSI_REBOOT: &[&str] = &["Allow", "Force", "Skip"];
pub const REGISTRY_TYPES: &[&str] = &["BINARY", "DWORD", "QWORD", "SZ", "EXPAND_SZ", "MULTI_SZ"];

const EXECUTE_BASH: &[InputSpec] = &[req("commands", StringList)];
const EXECUTE_BINARY: &[InputSpec] = &[req("path", Str), opt("arguments", StringList)];
/// Exactly one of the two is required; validation checks that separately.
const EXECUTE_POWERSHELL: &[InputSpec] = &[opt("commands", StringList), opt("file", Str)];
const EXECUTE_DOCUMENT: &[InputSpec] = &[
    req("document", Str),
    opt("document-s3-bucket-owner", Str),
    opt("phases", Str),
    opt("parameters", NameValueList),
];
const REBOOT: &[InputSpec] = &[opt("delaySeconds", Int)];
const UPDATE_OS: &[InputSpec] = &[opt("include", StringList), opt("exclude", StringList)];
const SET_REGISTRY: &[InputSpec] = &[
    req("path", Str),
    req("name", Str),
    req("value", Scalar),
    req("type", OneOf(REGISTRY_TYPES)),
];
const MSI: &[InputSpec] = &[
    req("path", Str),
    opt("reboot", OneOf(MSI_REBOOT)),
    opt("logOptions", Str),
    opt("logFile", Str),
    opt("properties", StringMap),
    opt("ignoreAuthenticodeSignatureErrors", Bool),
    opt("allowUnsignedInstaller", Bool),
];
const S3_DOWNLOAD: &[InputSpec] = &[
    req("source", Str),
    req("destination", Str),
    opt("expectedBucketOwner", Str),
    opt("overwrite", Bool),
];
const S3_UPLOAD: &[InputSpec] = &[
    req("source", Str),
    req("destination", Str),
    opt("recurse", Bool),
    opt("expectedBucketOwner", Str),
];
const WEB_DOWNLOAD: &[InputSpec] = &[
    req("source", Str),
    req("destination", Str),
    opt("overwrite", Bool),
    opt("checksum", Str),
    opt("algorithm", OneOf(HASH_ALGORITHMS)),
    opt("ignoreCertificateErrors", Bool),
];
const CREATE_FILE: &[InputSpec] = &[
    req("path", Str),
    opt("content", Str),
    opt("encoding", OneOf(ENCODINGS)),
    opt("owner", Str),
    opt("group", Str),
    opt("permissions", Mode),
    opt("overwrite", Bool),
];
const CREATE_FOLDER: &[InputSpec] = &[
    req("path", Str),
    opt("owner", Str),
    opt("group", Str),
    opt("permissions", Mode),
    opt("overwrite", Bool),
];
const CREATE_SYMLINK: &[InputSpec] = &[req("path", Str), req("target", Str), opt("force", Bool)];
const APPEND_FILE: &[InputSpec] = &[
    req("path", Str),
    opt("content", Str),
    opt("encoding", OneOf(ENCODINGS)),
];
const COPY_MOVE: &[InputSpec] = &[
    req("source", Str),
    req("destination", Str),
    opt("overwrite", Bool),
];
const DELETE_FILE: &[InputSpec] = &[req("path", Str)];
const DELETE_FOLDER: &[InputSpec] = &[req("path", Str), opt("force", Bool)];
const LIST_FILES: &[InputSpec] = &[
    req("path", Str),
    opt("fileNamePattern", Str),
    opt("recursive", Bool),
];
const READ_FILE: &[InputSpec] = &[
    req("path", Str),
    opt("encoding", OneOf(ENCODINGS)),
    opt("printFileContent", Bool),
];
const SET_FILE_ENCODING: &[InputSpec] = &[req("path", Str), opt("encoding", OneOf(ENCODINGS))];
const SET_FILE_OWNER: &[InputSpec] = &[req("path", Str), req("owner", Str), opt("group", Str)];
const SET_FOLDER_OWNER: &[InputSpec] = &[
    req("path", Str),
    req("owner", Str),
    opt("group", Str),
    opt("recursive", Bool),
];
const SET_FILE_PERMISSIONS: &[InputSpec] = &[req("path", Str), req("permissions", Mode)];
const SET_FOLDER_PERMISSIONS: &[InputSpec] = &[
    req("path", Str),
    req("permissions", Mode),
    opt("recursive", Bool),
];

/// The keys an action accepts under `inputs` (for each item, with list-shaped inputs).
/// Empty for `Assert`, whose inputs are an expression.
pub fn input_spec(action: Action) -> &'static [InputSpec] {
    match action {
        Action::ExecuteBash => EXECUTE_BASH,
        Action::ExecuteBinary => EXECUTE_BINARY,
        Action::ExecutePowerShell => EXECUTE_POWERSHELL,
        Action::ExecuteDocument => EXECUTE_DOCUMENT,
        Action::Assert => &[],
        Action::Reboot => REBOOT,
        Action::UpdateOS => UPDATE_OS,
        Action::SetRegistry => SET_REGISTRY,
        Action::InstallMSI | Action::UninstallMSI => MSI,
        Action::S3Download => S3_DOWNLOAD,
        Action::S3Upload => S3_UPLOAD,
        Action::WebDownload => WEB_DOWNLOAD,
        Action::CreateFile => CREATE_FILE,
        Action::CreateFolder => CREATE_FOLDER,
        Action::CreateSymlink => CREATE_SYMLINK,
        Action::AppendFile => APPEND_FILE,
        Action::CopyFile | Action::CopyFolder | Action::MoveFile | Action::MoveFolder => COPY_MOVE,
        Action::DeleteFile => DELETE_FILE,
        Action::DeleteFolder => DELETE_FOLDER,
        Action::ListFiles => LIST_FILES,
        Action::ReadFile => READ_FILE,
        Action::SetFileEncoding => SET_FILE_ENCODING,
        Action::SetFileOwner => SET_FILE_OWNER,
        Action::SetFolderOwner => SET_FOLDER_OWNER,
        Action::SetFilePermissions => SET_FILE_PERMISSIONS,
        Action::SetFolderPermissions => SET_FOLDER_PERMISSIONS,
    }
}

/// How `inputs` is written for `action`.
pub fn input_shape(action: Action) -> InputShape {
    match action {
        Action::ExecuteBash
        | Action::ExecuteBinary
        | Action::ExecutePowerShell
        | Action::ExecuteDocument
        | Action::Reboot
        | Action::UpdateOS
        | Action::InstallMSI
        | Action::UninstallMSI => InputShape::Map,
        Action::Assert => InputShape::Expression,
        Action::SetRegistry
        | Action::S3Download
        | Action::S3Upload
        | Action::WebDownload
        | Action::CreateFile
        | Action::CreateFolder
        | Action::CreateSymlink
        | Action::AppendFile
        | Action::CopyFile
        | Action::CopyFolder
        | Action::MoveFile
        | Action::MoveFolder
        | Action::DeleteFile
        | Action::DeleteFolder
        | Action::ListFiles
        | Action::ReadFile
        | Action::SetFileEncoding
        | Action::SetFileOwner
        | Action::SetFolderOwner
        | Action::SetFilePermissions
        | Action::SetFolderPermissions => InputShape::List,
    }
}

/// `Reboot` and `UpdateOS` are written without `inputs` in AWS-authored documents.
pub fn inputs_optional(action: Action) -> bool {
    matches!(action, Action::Reboot | Action::UpdateOS)
}

/// The output keys a step of `action` produces (`{{ phase.step.outputs.<key> }}`); `None`
/// when they depend on the step (`ExecuteDocument` returns the nested run's summary).
pub fn outputs_of(action: Action) -> Option<&'static [&'static str]> {
    Some(match action {
        Action::ExecuteBash | Action::ExecuteBinary | Action::ExecutePowerShell => &["stdout"],
        Action::ExecuteDocument => return None,
        Action::WebDownload => &["destination"],
        Action::ListFiles => &["files"],
        Action::ReadFile => &["content"],
        Action::InstallMSI | Action::UninstallMSI => &["logFile", "msiExitCode", "stdout"],
        _ => &[],
    })
}
