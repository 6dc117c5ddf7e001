//! Signatures of repository indices, checked with `gpgv` against ONLY the keys the image
//! trusts for that repository (as apt does): the keyring files a source's `Signed-By` names,
//! the key written inline in it, or apt's global keyrings when it names none. Keys come from
//! the image's recorded key files (the manifest's `packageSources.keys`), written to a
//! temporary directory; armored keys are dearmored first (gpgv reads binary keyrings only).
//! `gpgv` is GnuPG's verify-only tool: no keyring of the host is read, nothing is imported.

use std::path::{Path, PathBuf};

use base64::Engine as _;

use crate::packages::apt::sources::KeySpec;
use crate::store::manifest::{KeyFile, PackageSources};

/// apt's global keyrings: used when a source names no key.
const GLOBAL_KEYRING: &str = "/etc/apt/trusted.gpg";
const GLOBAL_KEYRING_DIR: &str = "/etc/apt/trusted.gpg.d/";

/// The keys one repository is checked with, as files gpgv reads.
#[derive(Debug, Clone)]
pub struct Keyring {
    pub files: Vec<PathBuf>,
    /// Signed-By fingerprints: a signature counts only from one of these. Empty: any key of
    /// `files`.
    pub allowed: Vec<String>,
    /// Where the keys come from, for messages (`/usr/share/keyrings/x.gpg`, `an inline key`).
    pub origin: Vec<String>,
}

/// Why a repository's keys could not be assembled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyProblem {
    /// the key file `{0}` its `Signed-By` names was not recorded from the image (apt in the
    /// image cannot verify it either)
    #[error("the key file `{0}` its Signed-By names is not among the image's recorded keys")]
    NotRecorded(String),
    /// no key: no Signed-By and no global keyring
    #[error(
        "it names no key (no Signed-By) and the image has no key in /etc/apt/trusted.gpg or /etc/apt/trusted.gpg.d/"
    )]
    NoKeys,
    /// a key that is not OpenPGP data
    #[error("the key {origin} is not usable: {message}")]
    Unreadable { origin: String, message: String },
    #[error("could not write the key {origin} to a temporary file: {message}")]
    Write { origin: String, message: String },
}

/// What was wrong with a signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureProblem {
    #[error("no signature")]
    Missing,
    #[error(
        "bad signature (made by key {key}, but the signed text was changed or the signature was not made by that key)"
    )]
    Bad { key: String },
    #[error(
        "signature by unknown key {key}, not one the image trusts for this repository (it trusts {trusted})"
    )]
    UnknownKey { key: String, trusted: String },
    #[error("signed by key {key}, which has expired")]
    ExpiredKey { key: String },
    #[error("signed by key {key}, which is revoked")]
    RevokedKey { key: String },
    #[error("signed by {found}, but its Signed-By allows only {allowed}")]
    NotAllowed { found: String, allowed: String },
    #[error("could not run gpgv: {0}")]
    Gpgv(String),
}

/// The keys `signed_by` names (apt's global ones when it names none), written under `dir`.
pub fn keyring(signed_by: &[KeySpec], keys: &[KeyFile], dir: &Path) -> Result<Keyring, KeyProblem> {
    let mut out = Keyring {
        files: Vec::new(),
        allowed: Vec::new(),
        origin: Vec::new(),
    };
    let mut sources: Vec<(String, Vec<u8>)> = Vec::new();
    let recorded = |path: &str| keys.iter().find(|k| k.path == path);
    let decode = |key: &KeyFile| {
        base64::engine::general_purpose::STANDARD
            .decode(key.data.trim())
            .map_err(|e| KeyProblem::Unreadable {
                origin: format!("`{}`", key.path),
                message: format!("its recorded bytes are not base64: {e}"),
            })
    };
    let mut global = signed_by.is_empty();
    for spec in signed_by {
        match spec {
            KeySpec::File(path) => {
                let key = recorded(path).ok_or_else(|| KeyProblem::NotRecorded(path.clone()))?;
                sources.push((format!("`{path}`"), decode(key)?));
            }
            KeySpec::Inline(text) => sources.push((
                "written in the sources file".into(),
                text.as_bytes().to_vec(),
            )),
            KeySpec::Fingerprint(fpr) => {
                out.allowed.push(fpr.clone());
                global = true;
            }
        }
    }
    if global {
        for key in keys.iter().filter(|k| is_global(&k.path)) {
            sources.push((format!("`{}`", key.path), decode(key)?));
        }
    }
    if sources.is_empty() {
        return Err(KeyProblem::NoKeys);
    }
    for (i, (origin, bytes)) in sources.into_iter().enumerate() {
        let bytes = if is_armored(&bytes) {
            dearmor(&bytes).map_err(|message| KeyProblem::Unreadable {
                origin: origin.clone(),
                message,
            })?
        } else {
            bytes
        };
        let path = dir.join(format!("key-{i}.gpg"));
        fs_err::write(&path, &bytes).map_err(|e| KeyProblem::Write {
            origin: origin.clone(),
            message: e.to_string(),
        })?;
        out.files.push(path);
        out.origin.push(origin);
    }
    Ok(out)
}

/// Whether apt trusts the key file at `path` for every source that names no key file
/// (`/etc/apt/trusted.gpg`, `/etc/apt/trusted.gpg.d/*.gpg|*.asc`).
pub fn is_global(path: &str) -> bool {
    path == GLOBAL_KEYRING
        || (path.starts_with(GLOBAL_KEYRING_DIR)
            && (path.ends_with(".gpg") || path.ends_with(".asc")))
}

/// The recorded key files some repository of `sources` may be verified with: those a
/// `Signed-By` names, and apt's global ones when an entry names none (or names
/// fingerprints). What a build keeps in the manifest: a Debian image has some 20 key files in
/// the places keys live, most for other releases or removed keys. Sources that are not apt's,
/// or that do not parse (the check reports them), keep every key.
pub fn keys_in_use(sources: &PackageSources) -> Vec<KeyFile> {
    if sources.manager != "apt" {
        return sources.keys.clone();
    }
    let Ok(repositories) = crate::packages::apt::sources::repositories(&sources.files) else {
        return sources.keys.clone();
    };
    let mut named: Vec<&str> = Vec::new();
    let mut global = false;
    for repository in &repositories {
        global |= repository.signed_by.is_empty();
        for spec in &repository.signed_by {
            match spec {
                KeySpec::File(path) => named.push(path),
                KeySpec::Fingerprint(_) => global = true,
                KeySpec::Inline(_) => {}
            }
        }
    }
    sources
        .keys
        .iter()
        .filter(|k| named.contains(&k.path.as_str()) || (global && is_global(&k.path)))
        .cloned()
        .collect()
}

fn is_armored(bytes: &[u8]) -> bool {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(0);
    bytes[start..].starts_with(b"-----BEGIN PGP")
}

/// The binary packets of every ASCII-armored block in `armored` (RFC 4880 §6.2: a
/// `-----BEGIN PGP …-----` line, header lines up to an empty line, base64 lines, an optional
/// `=` checksum line, `-----END PGP …-----`).
pub fn dearmor(armored: &[u8]) -> Result<Vec<u8>, String> {
    let text = String::from_utf8_lossy(armored);
    let mut out = Vec::new();
    let mut lines = text.lines().map(str::trim);
    let mut blocks = 0;
    while let Some(line) = lines.next() {
        if !line.starts_with("-----BEGIN PGP") {
            continue;
        }
        blocks += 1;
        let mut body = String::new();
        let mut in_headers = true;
        let mut ended = false;
        for line in lines.by_ref() {
            if line.starts_with("-----END PGP") {
                ended = true;
                break;
            }
            if in_headers {
                if line.is_empty() {
                    in_headers = false;
                    continue;
                }
                if line.contains(": ") {
                    continue;
                }
                in_headers = false;
            }
            if line.starts_with('=') && line.len() == 5 {
                continue; // the CRC-24 checksum; the packets carry their own integrity
            }
            body.push_str(line);
        }
        if !ended {
            return Err("an armored block has no `-----END PGP` line".into());
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(body.as_bytes())
            .map_err(|e| format!("an armored block is not base64: {e}"))?;
        out.extend(bytes);
    }
    if blocks == 0 {
        return Err("no `-----BEGIN PGP` block".into());
    }
    Ok(out)
}

/// Verify `signed` (a clearsigned file when `data` is `None`, else the detached signature of
/// `data`) with `keyring`. Writes the signed text to `output` when given (the text gpgv
/// checked, never the file's unsigned parts). The fingerprints (primary keys') of the good
/// signatures.
pub async fn verify(
    keyring: &Keyring,
    signed: &Path,
    data: Option<&Path>,
    output: Option<&Path>,
    home: &Path,
) -> Result<Vec<String>, SignatureProblem> {
    let mut command = tokio::process::Command::new("gpgv");
    command
        .env("GNUPGHOME", home)
        .env("LC_ALL", "C")
        .arg("--homedir")
        .arg(home)
        .args(["--status-fd", "1"]);
    for file in &keyring.files {
        command.arg("--keyring").arg(file);
    }
    if let Some(output) = output {
        command.arg("--output").arg(output);
    }
    command.arg(signed);
    if let Some(data) = data {
        command.arg(data);
    }
    command
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let result = command.output().await.map_err(|e| {
        SignatureProblem::Gpgv(if e.kind() == std::io::ErrorKind::NotFound {
            "`gpgv` is not installed on this host (Debian package `gpgv`)".into()
        } else {
            e.to_string()
        })
    })?;
    let status = String::from_utf8_lossy(&result.stdout);
    judge(&status, keyring).map_err(|problem| match problem {
        SignatureProblem::Gpgv(message) if message.is_empty() => SignatureProblem::Gpgv(format!(
            "{}: {}",
            result.status,
            String::from_utf8_lossy(&result.stderr).trim()
        )),
        other => other,
    })
}

/// Decide from gpgv's status lines, as apt does: any bad signature fails; otherwise at least
/// one good signature (by an allowed key) is needed.
fn judge(status: &str, keyring: &Keyring) -> Result<Vec<String>, SignatureProblem> {
    let mut good = Vec::new();
    let mut problem = None;
    let mut any = false;
    for line in status.lines() {
        let Some(rest) = line.strip_prefix("[GNUPG:] ") else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        let key = words.get(1).map_or_else(String::new, |k| k.to_string());
        match words.first().copied() {
            Some("NEWSIG") => any = true,
            Some("BADSIG") => return Err(SignatureProblem::Bad { key }),
            Some("VALIDSIG") => {
                let signing = key;
                let primary = words.last().map_or(signing.clone(), |p| p.to_string());
                good.push((signing, primary));
            }
            Some("ERRSIG") | Some("NO_PUBKEY") => {
                any = true;
                problem.get_or_insert(SignatureProblem::UnknownKey {
                    key,
                    trusted: keyring.origin.join(", "),
                });
            }
            Some("EXPKEYSIG") => {
                problem = Some(SignatureProblem::ExpiredKey { key });
            }
            Some("REVKEYSIG") => {
                problem = Some(SignatureProblem::RevokedKey { key });
            }
            _ => {}
        }
    }
    // An expired or revoked key's signature is reported by gpgv with VALIDSIG as well: it
    // does not count, as for apt.
    if let Some(p @ (SignatureProblem::ExpiredKey { .. } | SignatureProblem::RevokedKey { .. })) =
        problem
    {
        return Err(p);
    }
    let matches = |fpr: &str, allowed: &str| {
        fpr.eq_ignore_ascii_case(allowed)
            || (allowed.len() < fpr.len()
                && fpr
                    .to_ascii_uppercase()
                    .ends_with(&allowed.to_ascii_uppercase()))
    };
    let allowed: Vec<String> = good
        .iter()
        .filter(|(signing, primary)| {
            keyring.allowed.is_empty()
                || keyring
                    .allowed
                    .iter()
                    .any(|a| matches(signing, a) || matches(primary, a))
        })
        .map(|(_, primary)| primary.clone())
        .collect();
    if !allowed.is_empty() {
        return Ok(allowed);
    }
    if !good.is_empty() {
        return Err(SignatureProblem::NotAllowed {
            found: good
                .iter()
                .map(|(_, p)| p.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            allowed: keyring.allowed.join(", "),
        });
    }
    if let Some(problem) = problem {
        return Err(problem);
    }
    if !any || status.contains("[GNUPG:] NODATA") {
        return Err(SignatureProblem::Missing);
    }
    // gpgv failed without saying why in its status lines: `verify` adds its stderr.
    Err(SignatureProblem::Gpgv(String::new()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is the point
mod tests {
    use super::*;

    fn allowing(allowed: &[&str]) -> Keyring {
        Keyring {
            files: vec![],
            allowed: allowed.iter().map(|s| s.to_string()).collect(),
            origin: vec!["`/usr/share/keyrings/x.gpg`".into()],
        }
    }

    const FPR: &str = "0123456789ABCDEF0123456789ABCDEF01234567";

    fn validsig() -> String {
        format!(
            "[GNUPG:] NEWSIG\n[GNUPG:] GOODSIG 89ABCDEF01234567 t\n[GNUPG:] VALIDSIG {FPR} 2026-12-07 1 0 4 0 1 10 01 {FPR}\n"
        )
    }

    #[test]
    fn good_bad_unknown_missing() {
        assert_eq!(judge(&validsig(), &allowing(&[])).unwrap(), [FPR]);
        assert_eq!(
            judge(&validsig(), &allowing(&["89ABCDEF01234567"])).unwrap(),
            [FPR]
        );
        assert!(matches!(
            judge(&validsig(), &allowing(&["FFFF"])),
            Err(SignatureProblem::NotAllowed { .. })
        ));
        let bad = "[GNUPG:] NEWSIG\n[GNUPG:] BADSIG 89ABCDEF01234567 t\n";
        assert!(matches!(
            judge(bad, &allowing(&[])),
            Err(SignatureProblem::Bad { .. })
        ));
        let unknown = "[GNUPG:] NEWSIG\n[GNUPG:] ERRSIG 89ABCDEF01234567 1 10 01 1 9 -\n[GNUPG:] NO_PUBKEY 89ABCDEF01234567\n";
        let e = judge(unknown, &allowing(&[])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "signature by unknown key 89ABCDEF01234567, not one the image trusts for this repository (it trusts `/usr/share/keyrings/x.gpg`)"
        );
        assert_eq!(
            judge("[GNUPG:] NODATA 1\n", &allowing(&[])),
            Err(SignatureProblem::Missing)
        );
        let expired = format!(
            "[GNUPG:] NEWSIG\n[GNUPG:] EXPKEYSIG 89ABCDEF01234567 t\n{}",
            validsig().lines().last().unwrap()
        );
        assert!(matches!(
            judge(&expired, &allowing(&[])),
            Err(SignatureProblem::ExpiredKey { .. })
        ));
    }

    #[test]
    fn dearmor_blocks() {
        let armored = "-----BEGIN PGP PUBLIC KEY BLOCK-----\nComment: x\n\naGVsbG8g\nd29ybGQ=\n=abcd\n-----END PGP PUBLIC KEY BLOCK-----\n-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nIQ==\n-----END PGP PUBLIC KEY BLOCK-----\n";
        assert_eq!(dearmor(armored.as_bytes()).unwrap(), b"hello world!");
        assert!(dearmor(b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\naGVs\n").is_err());
        assert!(dearmor(b"nothing").is_err());
    }

    #[test]
    fn keys_the_source_names_else_the_global_ones() {
        let dir = tempfile::tempdir().unwrap();
        let key = |path: &str, data: &[u8]| KeyFile {
            path: path.into(),
            sha256: String::new(),
            data: base64::engine::general_purpose::STANDARD.encode(data),
        };
        let keys = [
            key("/etc/apt/trusted.gpg.d/debian.gpg", b"\x99global"),
            key("/etc/apt/trusted.gpg.d/README", b"not a key"),
            key("/usr/share/keyrings/x.asc", b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\naGVsbG8=\n-----END PGP PUBLIC KEY BLOCK-----\n"),
        ];
        let named = keyring(
            &[KeySpec::File("/usr/share/keyrings/x.asc".into())],
            &keys,
            dir.path(),
        )
        .unwrap();
        assert_eq!(named.files.len(), 1);
        assert_eq!(fs_err::read(&named.files[0]).unwrap(), b"hello");
        let global = keyring(&[], &keys, dir.path()).unwrap();
        assert_eq!(global.origin, ["`/etc/apt/trusted.gpg.d/debian.gpg`"]);
        assert_eq!(
            keyring(&[KeySpec::File("/nope.gpg".into())], &keys, dir.path()).unwrap_err(),
            KeyProblem::NotRecorded("/nope.gpg".into())
        );
        assert_eq!(
            keyring(&[], &keys[1..], dir.path()).unwrap_err(),
            KeyProblem::NoKeys
        );
    }

    fn key(path: &str) -> KeyFile {
        KeyFile {
            path: path.into(),
            sha256: "0".repeat(64),
            data: String::new(),
        }
    }

    fn sources(files: &[(&str, &str)]) -> PackageSources {
        PackageSources {
            manager: "apt".into(),
            architectures: vec!["amd64".into()],
            files: files
                .iter()
                .map(|(path, text)| crate::store::manifest::SourceFile {
                    path: (*path).into(),
                    text: (*text).into(),
                })
                .collect(),
            keys: [
                "/etc/apt/trusted.gpg.d/debian-archive-bookworm-automatic.asc",
                "/etc/apt/trusted.gpg.d/notes.txt",
                "/usr/share/keyrings/debian-archive-keyring.gpg",
                "/usr/share/keyrings/debian-archive-removed-keys.gpg",
                "/etc/apt/keyrings/vendor.gpg",
            ]
            .into_iter()
            .map(key)
            .collect(),
        }
    }

    fn kept(s: &PackageSources) -> Vec<String> {
        keys_in_use(s).into_iter().map(|k| k.path).collect()
    }

    #[test]
    fn only_the_keys_a_repository_may_use_are_kept() {
        let signed = sources(&[(
            "/etc/apt/sources.list.d/debian.sources",
            "Types: deb\nURIs: http://deb.example.org/debian\nSuites: bookworm\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
        )]);
        assert_eq!(
            kept(&signed),
            ["/usr/share/keyrings/debian-archive-keyring.gpg"]
        );
        let global = sources(&[
            (
                "/etc/apt/sources.list",
                "deb http://deb.example.org/debian bookworm main\n",
            ),
            (
                "/etc/apt/sources.list.d/vendor.list",
                "deb [signed-by=/etc/apt/keyrings/vendor.gpg] http://vendor.example.org/apt stable main\n",
            ),
        ]);
        assert_eq!(
            kept(&global),
            [
                "/etc/apt/trusted.gpg.d/debian-archive-bookworm-automatic.asc",
                "/etc/apt/keyrings/vendor.gpg"
            ]
        );
        // Sources the check cannot read keep everything: it reports them itself.
        let broken = sources(&[("/etc/apt/sources.list", "deb\n")]);
        assert_eq!(kept(&broken).len(), 5);
    }
}
