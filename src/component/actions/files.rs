//! The file-system actions (reference 2.3), each built from target primitives: `put_file`,
//! `get_file`, `stat`, `list` and argv commands (`mkdir -p`, `cp`, `mv`, `rm`, `ln -s`,
//! `chmod`, `chown`), so they behave the same on this machine and in a guest.
//! Relative paths are taken from the run's working directory.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::encoding::Encoding;
use super::{ActionContext, ActionError, Inputs, Outputs, each_item};
use crate::machine::{DirEntry, FileKind, FileSource, FileStat, OutputStream, PutOptions};

fn text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// Run `words` followed by `paths`.
async fn run(
    cx: &ActionContext<'_>,
    words: &[&str],
    paths: &[impl AsRef<Path>],
) -> Result<(), ActionError> {
    let argv: Vec<String> = (words.iter().map(|w| w.to_string()))
        .chain(paths.iter().map(|p| text(p.as_ref())))
        .collect();
    cx.run_quiet(&argv).await
}

async fn stat(cx: &ActionContext<'_>, path: &Path) -> Result<Option<FileStat>, ActionError> {
    cx.target
        .stat(path)
        .await
        .map_err(ActionError::target(format!(
            "could not look at {}",
            path.display()
        )))
}

async fn list(cx: &ActionContext<'_>, path: &Path) -> Result<Vec<DirEntry>, ActionError> {
    cx.target
        .list(path)
        .await
        .map_err(ActionError::target(format!(
            "could not list {}",
            path.display()
        )))
}

/// Write `bytes` to `path`; `doing` names the change for the error ("create", "append to").
async fn put(
    cx: &ActionContext<'_>,
    path: &Path,
    bytes: Vec<u8>,
    options: &PutOptions,
    doing: &str,
) -> Result<Option<Map<String, Value>>, ActionError> {
    cx.target
        .put_file(path, FileSource::Bytes(bytes), options)
        .await
        .map_err(ActionError::target(format!(
            "could not {doing} {}",
            path.display()
        )))?;
    Ok(None)
}

/// `content` in the step's `encoding`.
fn content(inputs: &Inputs<'_>) -> Result<Vec<u8>, ActionError> {
    let content = inputs.string("content")?.unwrap_or_default();
    Ok(encoding(inputs)?.encode(&content))
}

async fn mkdir_parents(cx: &ActionContext<'_>, path: &Path) -> Result<(), ActionError> {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => {
            run(cx, &["mkdir", "-p", "--"], &[parent]).await
        }
        _ => Ok(()),
    }
}

fn encoding(inputs: &Inputs<'_>) -> Result<Encoding, ActionError> {
    match inputs.string("encoding")? {
        None => Ok(Encoding::Utf8),
        Some(name) => Encoding::from_name(&name).ok_or_else(|| {
            ActionError::Input(format!(
                "`encoding: {name}` is not supported; use utf8, utf16, utf16-BE, utf32 or utf32-BE"
            ))
        }),
    }
}

/// `*` in a name matches any run of characters (the only wildcard AWSTOE documents).
pub fn wildcard_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let [first, middle @ .., last] = parts.as_slice() else {
        return pattern == name;
    };
    if parts.len() == 1 {
        return pattern == name;
    }
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

fn kind_name(folder: bool) -> &'static str {
    if folder { "folder" } else { "file" }
}

fn is_kind(stat: &FileStat, folder: bool) -> bool {
    if folder {
        stat.kind == FileKind::Dir
    } else {
        matches!(
            stat.kind,
            FileKind::File | FileKind::Symlink | FileKind::Other
        )
    }
}

/// The paths `source` names: itself, or the matches of a `*` in its last element.
async fn sources(
    cx: &ActionContext<'_>,
    source: &str,
    folder: bool,
) -> Result<Vec<PathBuf>, ActionError> {
    let full = cx.path(source);
    let name = full
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.contains('*') {
        let parent = full.parent().unwrap_or(Path::new("/")).to_path_buf();
        if parent.to_string_lossy().contains('*') {
            return Err(ActionError::Input(format!(
                "`{source}`: `*` is allowed only in the last part of the path"
            )));
        }
        let found: Vec<PathBuf> = (list(cx, &parent).await?.into_iter())
            .filter(|e| wildcard_match(&name, &e.name) && is_kind(&e.stat, folder))
            .map(|e| parent.join(e.name))
            .collect();
        if found.is_empty() {
            return Err(ActionError::NoMatch {
                pattern: full,
                kind: kind_name(folder),
            });
        }
        return Ok(found);
    }
    existing(cx, &full, folder).await?;
    Ok(vec![full])
}

/// `Ok` when `path` is a folder (`folder`) or a file.
async fn existing(cx: &ActionContext<'_>, path: &Path, folder: bool) -> Result<(), ActionError> {
    match stat(cx, path).await? {
        None => Err(ActionError::NotFound(path.to_path_buf())),
        Some(s) if !is_kind(&s, folder) => Err(ActionError::NotA {
            path: path.to_path_buf(),
            kind: kind_name(folder),
        }),
        Some(_) => Ok(()),
    }
}

/// `owner`, `owner:group` or `:group` for chown; `None` when neither is given.
fn owner_spec(owner: Option<&str>, group: Option<&str>) -> Option<String> {
    match (owner, group) {
        (None, None) => None,
        (Some(o), None) => Some(o.to_string()),
        (Some(o), Some(g)) => Some(format!("{o}:{g}")),
        (None, Some(g)) => Some(format!(":{g}")),
    }
}

pub async fn create_file(inputs: &Value, cx: &ActionContext<'_>) -> Result<Outputs, ActionError> {
    each_item(inputs, |i| async move {
        let path = cx.path(&i.required("path")?);
        let bytes = content(&i)?;
        let overwrite = i.bool("overwrite", true)?;
        match stat(cx, &path).await? {
            Some(s) if s.kind == FileKind::Dir => {
                return Err(ActionError::IsAFolder { path, hint: "" });
            }
            Some(_) if !overwrite => return Err(ActionError::Exists(path)),
            _ => {}
        }
        let options = PutOptions {
            mode: i.mode("permissions")?,
            owner: i.string("owner")?,
            group: i.string("group")?,
            create_parents: true,
            append: false,
        };
        put(cx, &path, bytes, &options, "create").await
    })
    .await
}

pub async fn append_file(inputs: &Value, cx: &ActionContext<'_>) -> Result<Outputs, ActionError> {
    each_item(inputs, |i| async move {
        let path = cx.path(&i.required("path")?);
        let bytes = content(&i)?;
        match stat(cx, &path).await? {
            None => return Err(ActionError::AppendToMissing(path)),
            Some(s) if s.kind == FileKind::Dir => {
                return Err(ActionError::IsAFolder { path, hint: "" });
            }
            Some(_) => {}
        }
        let options = PutOptions {
            append: true,
            ..PutOptions::default()
        };
        put(cx, &path, bytes, &options, "append to").await
    })
    .await
}

pub async fn create_folder(inputs: &Value, cx: &ActionContext<'_>) -> Result<Outputs, ActionError> {
    each_item(inputs, |i| async move {
        let path = cx.path(&i.required("path")?);
        let overwrite = i.bool("overwrite", true)?;
        let mode = i.mode("permissions")?;
        let owner = owner_spec(i.string("owner")?.as_deref(), i.string("group")?.as_deref());
        match stat(cx, &path).await? {
            Some(s) if s.kind != FileKind::Dir => {
                return Err(ActionError::ExistsAsOther {
                    path,
                    kind: "folder",
                });
            }
            Some(_) if !overwrite => return Err(ActionError::Exists(path)),
            _ => {}
        }
        run(cx, &["mkdir", "-p", "--"], &[&path]).await?;
        if let Some(mode) = mode {
            run(cx, &["chmod", &format!("{mode:o}"), "--"], &[&path]).await?;
        }
        if let Some(spec) = owner {
            run(cx, &["chown", &spec, "--"], &[&path]).await?;
        }
        Ok(None)
    })
    .await
}

pub async fn create_symlink(
    inputs: &Value,
    cx: &ActionContext<'_>,
) -> Result<Outputs, ActionError> {
    each_item(inputs, |i| async move {
        let path = cx.path(&i.required("path")?);
        let target = i.required("target")?;
        let force = i.bool("force", false)?;
        // A relative target is relative to the link's folder, as the kernel reads it.
        // `..` is taken lexically: the link's folder may not exist yet.
        let target_full = lexical(&path.parent().unwrap_or(cx.working_directory).join(&target));
        if stat(cx, &target_full).await?.is_none() {
            return Err(ActionError::LinkTargetMissing(target_full));
        }
        match stat(cx, &path).await? {
            Some(s) if s.kind != FileKind::Symlink => {
                return Err(ActionError::ExistsAsOther {
                    path,
                    kind: "symbolic link",
                });
            }
            Some(_) if !force => return Err(ActionError::LinkExists(path)),
            _ => {}
        }
        mkdir_parents(cx, &path).await?;
        let flags = if force { "-sfn" } else { "-s" };
        run(cx, &["ln", flags, "--", &target], &[&path]).await?;
        Ok(None)
    })
    .await
}

/// `path` with `.` and `..` removed without asking the file system.
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transfer {
    CopyFile,
    CopyFolder,
    MoveFile,
    MoveFolder,
}

pub async fn copy_or_move(
    inputs: &Value,
    cx: &ActionContext<'_>,
    kind: Transfer,
) -> Result<Outputs, ActionError> {
    let folder = matches!(kind, Transfer::CopyFolder | Transfer::MoveFolder);
    each_item(inputs, |i| async move {
        let source = i.required("source")?;
        let destination = i.required("destination")?;
        let overwrite = i.bool("overwrite", true)?;
        let found = sources(cx, &source, folder).await?;
        let into_folder = destination.ends_with('/') || destination.ends_with('\\');
        if found.len() > 1 && !into_folder {
            return Err(ActionError::Input(format!(
                "`{source}` matches {} {}s; end `destination` with `/` to put them in a folder",
                found.len(),
                kind_name(folder)
            )));
        }
        let destination = cx.path(destination.trim_end_matches(['/', '\\']));
        for src in found {
            let dst = if into_folder {
                destination.join(src.file_name().unwrap_or_default())
            } else {
                destination.clone()
            };
            if dst == src {
                return Err(ActionError::SameFile(src));
            }
            let existing = stat(cx, &dst).await?;
            if existing.is_some() && !overwrite {
                return Err(ActionError::Exists(dst));
            }
            mkdir_parents(cx, &dst).await?;
            // `-T`: the destination is exactly `dst`, never "inside dst if it is a folder".
            let words: &[&str] = match kind {
                Transfer::CopyFile => &["cp", "-pT", "--"],
                Transfer::MoveFile => &["mv", "-fT", "--"],
                // `mv` cannot replace a non-empty folder: merge the content, then remove the
                // source.
                Transfer::MoveFolder if existing.is_none() => &["mv", "-T", "--"],
                Transfer::CopyFolder | Transfer::MoveFolder => &["cp", "-aT", "--"],
            };
            run(cx, words, &[&src, &dst]).await?;
            if kind == Transfer::MoveFolder && existing.is_some() {
                run(cx, &["rm", "-rf", "--"], &[&src]).await?;
            }
        }
        Ok(None)
    })
    .await
}

pub async fn delete_file(inputs: &Value, cx: &ActionContext<'_>) -> Result<Outputs, ActionError> {
    each_item(inputs, |i| async move {
        let path = i.required("path")?;
        let has_pattern = cx
            .path(&path)
            .file_name()
            .is_some_and(|n| n.to_string_lossy().contains('*'));
        let found = match sources(cx, &path, false).await {
            // A pattern that matches nothing leaves nothing to delete.
            Err(
                ActionError::NoMatch { .. } | ActionError::NotFound(_) | ActionError::NotA { .. },
            ) if has_pattern => Vec::new(),
            other => other?,
        };
        if found.is_empty() {
            return Ok(None);
        }
        run(cx, &["rm", "-f", "--"], &found).await?;
        Ok(None)
    })
    .await
}

pub async fn delete_folder(inputs: &Value, cx: &ActionContext<'_>) -> Result<Outputs, ActionError> {
    each_item(inputs, |i| async move {
        let path = cx.path(&i.required("path")?);
        let force = i.bool("force", false)?;
        existing(cx, &path, true).await?;
        if force {
            run(cx, &["rm", "-rf", "--"], &[&path]).await?;
        } else {
            let entries = list(cx, &path).await?;
            if !entries.is_empty() {
                return Err(ActionError::NotEmpty {
                    path,
                    entries: entries.len(),
                });
            }
            run(cx, &["rmdir", "--"], &[&path]).await?;
        }
        Ok(None)
    })
    .await
}

pub async fn list_files(inputs: &Value, cx: &ActionContext<'_>) -> Result<Outputs, ActionError> {
    each_item(inputs, |i| async move {
        let root = cx.path(&i.required("path")?);
        let pattern = i.string("fileNamePattern")?.unwrap_or_else(|| "*".into());
        let recursive = i.bool("recursive", false)?;
        existing(cx, &root, true).await?;
        let mut files = Vec::new();
        let mut pending = vec![root];
        while let Some(dir) = pending.pop() {
            let mut subdirs = Vec::new();
            for entry in list(cx, &dir).await? {
                let full = dir.join(&entry.name);
                if entry.stat.kind == FileKind::Dir {
                    if recursive {
                        subdirs.push(full);
                    }
                } else if wildcard_match(&pattern, &entry.name) {
                    files.push(text(&full));
                }
            }
            // Depth-first in name order: push in reverse so the first folder comes out first.
            pending.extend(subdirs.into_iter().rev());
        }
        let mut out = Map::new();
        out.insert("files".into(), Value::String(files.join(",")));
        Ok(Some(out))
    })
    .await
}

pub async fn read_file(inputs: &Value, cx: &ActionContext<'_>) -> Result<Outputs, ActionError> {
    each_item(inputs, |i| async move {
        let path = cx.path(&i.required("path")?);
        let encoding = encoding(&i)?;
        let print = i.bool("printFileContent", false)?;
        let host_dir = tempfile::tempdir().map_err(|e| ActionError::Host {
            what: "could not create a temporary folder".into(),
            source: e,
        })?;
        let local = host_dir.path().join("content");
        cx.target
            .get_file(&path, &local)
            .await
            .map_err(ActionError::target(format!(
                "could not read {}",
                path.display()
            )))?;
        let bytes = fs_err::tokio::read(&local)
            .await
            .map_err(ActionError::HostFile)?;
        let content = encoding
            .decode(&bytes)
            .ok_or_else(|| ActionError::NotText {
                path: path.clone(),
                encoding: format!("{encoding:?}"),
            })?;
        if print {
            cx.sink.output(OutputStream::Stdout, content.as_bytes());
            if !content.ends_with('\n') {
                cx.sink.output(OutputStream::Stdout, b"\n");
            }
        }
        let mut out = Map::new();
        out.insert("content".into(), Value::String(content));
        Ok(Some(out))
    })
    .await
}

pub async fn set_owner(
    inputs: &Value,
    cx: &ActionContext<'_>,
    folder: bool,
) -> Result<Outputs, ActionError> {
    change(inputs, cx, folder, "chown", |i| {
        let owner = i.required("owner")?;
        // `owner:` (empty group) means the owner's login group.
        Ok(match i.string("group")? {
            Some(g) if !g.is_empty() => format!("{owner}:{g}"),
            _ => format!("{owner}:"),
        })
    })
    .await
}

pub async fn set_permissions(
    inputs: &Value,
    cx: &ActionContext<'_>,
    folder: bool,
) -> Result<Outputs, ActionError> {
    change(inputs, cx, folder, "chmod", |i| {
        match i.mode("permissions")? {
            Some(mode) => Ok(format!("{mode:o}")),
            None => Err(ActionError::Input("`permissions` is required".into())),
        }
    })
    .await
}

/// `chown`/`chmod` (`program`) with the `spec` the inputs give on each item's `path`; `-R`
/// for a folder unless `recursive: false`.
async fn change(
    inputs: &Value,
    cx: &ActionContext<'_>,
    folder: bool,
    program: &str,
    spec: impl Fn(&Inputs<'_>) -> Result<String, ActionError>,
) -> Result<Outputs, ActionError> {
    let spec = &spec;
    each_item(inputs, |i| async move {
        let path = cx.path(&i.required("path")?);
        let spec = spec(&i)?;
        let words: &[&str] = if folder && i.bool("recursive", true)? {
            &[program, "-R", &spec, "--"]
        } else {
            &[program, &spec, "--"]
        };
        run(cx, words, &[path]).await?;
        Ok(None)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::wildcard_match;

    #[test]
    fn star_matches_any_run() {
        assert!(wildcard_match("*", "anything"));
        assert!(wildcard_match("*.log", "a.log"));
        assert!(!wildcard_match("*.log", "a.log.1"));
        assert!(wildcard_match("a*b*c", "aXbYc"));
        assert!(!wildcard_match("a*b*c", "aXcYb"));
        assert!(wildcard_match("ab*", "ab"));
        assert!(!wildcard_match("ab*ba", "aba"));
        assert!(wildcard_match("plain", "plain"));
        assert!(!wildcard_match("plain", "plain2"));
    }
}
