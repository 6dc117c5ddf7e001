//! apt repositories: the image's sources ([`sources`]), a repository's `Release` file
//! ([`release`]) and `Packages` indices ([`index`]), and getting them: `InRelease` (else
//! `Release` + `Release.gpg`) verified with the keys the image trusts for that source, then
//! each index the Release file lists for the source's components and architectures, its
//! sha256 checked against the Release file before it is read. As apt: `by-hash/SHA256/<sha256>`
//! first when the Release file says `Acquire-By-Hash: yes`, then the canonical name; a file
//! that is missing or whose sha256 differs (a mirror caught mid-update, or stale) makes the
//! next compression the Release file lists tried; an index whose sha256 differs is never read.

pub mod index;
pub mod release;
pub mod sources;

use std::collections::HashSet;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use self::index::{BadIndex, Offered};
use self::release::Release;
use self::sources::Repository;
use crate::packages::fetch::{FetchProblem, Fetcher};
use crate::packages::gpg::{self, KeyProblem, SignatureProblem};
use crate::store::manifest::KeyFile;

/// apt's default pin priorities: what a `NotAutomatic` repository gets (1, or 100 with
/// `ButAutomaticUpgrades`), what the others get (500), and what the installed version gets
/// when no repository offers it (100).
pub const PRIORITY_DEFAULT: i32 = 500;
pub const PRIORITY_INSTALLED: i32 = 100;
pub const PRIORITY_NOT_AUTOMATIC: i32 = 1;

/// What one repository offers of the wanted packages, and who it is.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// Where it was fetched from, after mirrors (`http://127.0.0.1:8080/debian`).
    pub fetched_from: String,
    pub release: Release,
    /// Fingerprints of the keys whose signature was good; empty for `trusted=yes`.
    pub signed_by: Vec<String>,
    /// apt's pin priority of its versions.
    pub priority: i32,
    pub offered: Vec<Offered>,
}

/// What went wrong with one repository.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RepositoryProblem {
    #[error(transparent)]
    Fetch(#[from] FetchProblem),
    #[error("no Release file: neither {dist}InRelease nor {dist}Release exists")]
    NoRelease { dist: String },
    #[error("{file}: {problem}")]
    Signature {
        file: String,
        problem: SignatureProblem,
    },
    #[error("its keys: {0}")]
    Keys(#[from] KeyProblem),
    #[error("{file} is not a Release file: {message}")]
    BadRelease { file: String, message: String },
    #[error(
        "no `Packages` index of {} its Release file lists could be used; tried:{}",
        if .dir.is_empty() { "the flat repository" } else { .dir.as_str() },
        attempts_text(.attempts)
    )]
    Index {
        /// `main/binary-amd64/`, `""` when flat.
        dir: String,
        /// Every URL tried, in order, and what it gave.
        attempts: Vec<IndexAttempt>,
    },
    #[error("{url}: {problem}")]
    BadIndex { url: String, problem: BadIndex },
    #[error("could not decompress {url}: {message}")]
    Decompress { url: String, message: String },
    #[error("{file} expired at {valid_until} (its Valid-Until): apt in the image refuses it too")]
    Expired { file: String, valid_until: String },
    #[error("its Release file lists no Packages index for {what}")]
    NoIndex { what: String },
    #[error("{0}")]
    Host(String),
}

impl RepositoryProblem {
    /// How to fix it, where something helps.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            RepositoryProblem::Fetch(
                FetchProblem::Unreachable { .. } | FetchProblem::Status { .. },
            )
            | RepositoryProblem::NoRelease { .. } => Some(
                "map the image's URI to one this host reaches with `packageUpdates.mirrors` in <store>/config.yml",
            ),
            RepositoryProblem::Signature {
                problem: SignatureProblem::UnknownKey { .. } | SignatureProblem::NotAllowed { .. },
                ..
            }
            | RepositoryProblem::Keys(_) => Some(
                "the image must trust the repository's key (Signed-By, or a key in /etc/apt/trusted.gpg.d/); rebuild the image with it",
            ),
            RepositoryProblem::Signature {
                problem: SignatureProblem::Bad { .. } | SignatureProblem::Missing,
                ..
            } => Some(
                "the repository (or a mirror or proxy in between) serves files its key did not sign; nothing from it was used",
            ),
            RepositoryProblem::Expired { .. } => Some(
                "the mirror (or what serves it) is out of date: update it; a source may turn the check off with check-valid-until=no",
            ),
            RepositoryProblem::Index { attempts, .. } => Some(
                if attempts
                    .iter()
                    .any(|a| matches!(a.outcome, IndexOutcome::Mismatch { .. }))
                {
                    "the mirror may be in the middle of an update; check again later"
                } else {
                    "map the image's URI to one this host reaches with `packageUpdates.mirrors` in <store>/config.yml"
                },
            ),
            _ => None,
        }
    }
}

/// One URL tried for an index and what it gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexAttempt {
    pub url: String,
    pub outcome: IndexOutcome,
}

/// Why an index URL was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexOutcome {
    /// Not there (HTTP 404 or 410, or no such file).
    #[error("not found (404)")]
    NotFound,
    /// Another HTTP status that is not success.
    #[error("answered {0}")]
    Status(String),
    #[error(
        "sha256 {found} ({found_size} bytes), its Release file says {expected} ({expected_size} bytes)"
    )]
    Mismatch {
        found: String,
        found_size: u64,
        expected: String,
        expected_size: u64,
    },
}

fn attempts_text(attempts: &[IndexAttempt]) -> String {
    attempts
        .iter()
        .map(|a| format!("\n  {}: {}", a.url, a.outcome))
        .collect()
}

/// One place an index may be fetched from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct IndexSource {
    url: String,
    /// The canonical name (`main/binary-amd64/Packages.xz`): its extension says how the
    /// bytes are compressed, whatever the URL (a by-hash URL has none).
    name: String,
    sha256: String,
    size: u64,
}

/// Where apt looks for an index, in order: for each compression the Release file lists
/// (`listed`, as [`Release::packages_indices`] orders them), the by-hash name in the index's
/// directory when `by_hash`, then the canonical name.
fn index_sources(dist: &str, listed: &[(&str, &str, u64)], by_hash: bool) -> Vec<IndexSource> {
    let mut sources = Vec::new();
    for &(path, sha256, size) in listed {
        let source = |url: String| IndexSource {
            url,
            name: path.to_string(),
            sha256: sha256.to_string(),
            size,
        };
        if by_hash {
            let dir = path.rsplit_once('/').map_or("", |(dir, _)| dir);
            let dir = if dir.is_empty() {
                String::new()
            } else {
                format!("{dir}/")
            };
            sources.push(source(format!("{dist}{dir}by-hash/SHA256/{sha256}")));
        }
        sources.push(source(format!("{dist}{path}")));
    }
    sources
}

/// The first of `sources` that is there with the sha256 the Release file gives; else every
/// URL tried and what it gave. An unreachable host fails at once (the next URL is on it too).
async fn fetch_index(
    fetcher: &Fetcher,
    dir: &str,
    sources: Vec<IndexSource>,
) -> Result<(IndexSource, Vec<u8>), RepositoryProblem> {
    let mut attempts = Vec::new();
    for source in sources {
        let outcome = match fetcher.get(&source.url).await {
            Ok(Some(bytes)) => {
                let found = hex::encode(Sha256::digest(&bytes));
                if found == source.sha256 {
                    return Ok((source, bytes));
                }
                IndexOutcome::Mismatch {
                    found,
                    found_size: bytes.len() as u64,
                    expected: source.sha256.clone(),
                    expected_size: source.size,
                }
            }
            Ok(None) => IndexOutcome::NotFound,
            Err(FetchProblem::Status { status, .. }) => IndexOutcome::Status(status),
            Err(problem) => return Err(problem.into()),
        };
        attempts.push(IndexAttempt {
            url: source.url,
            outcome,
        });
    }
    Err(RepositoryProblem::Index {
        dir: dir.to_string(),
        attempts,
    })
}

/// Priority of a repository's versions, as apt's default policy gives it.
pub fn priority(release: &Release) -> i32 {
    match (release.not_automatic, release.but_automatic_upgrades) {
        (false, _) => PRIORITY_DEFAULT,
        (true, true) => PRIORITY_INSTALLED,
        (true, false) => PRIORITY_NOT_AUTOMATIC,
    }
}

/// Everything a repository fetch needs that is the same for every repository.
/// Cheap to clone (shared parts), so each repository is fetched in its own task.
#[derive(Clone)]
pub struct Context {
    pub fetcher: Fetcher,
    /// The image's architectures (a source's `arch=` overrides them).
    pub architectures: Arc<[String]>,
    pub keys: Arc<[KeyFile]>,
    pub wanted: Arc<HashSet<(String, String)>>,
    /// A private temporary directory (keys, downloads, gpgv's home).
    pub scratch: PathBuf,
}

/// The base URL after mirrors, and what the repository offers or what went wrong.
pub async fn fetch(
    cx: &Context,
    repository: &Repository,
    number: usize,
) -> (String, Result<Fetched, RepositoryProblem>) {
    let base = cx.fetcher.rewrite(&repository.uri);
    let base = base.trim_end_matches('/').to_string();
    let result = fetch_from(cx, repository, number, &base).await;
    (base, result)
}

async fn fetch_from(
    cx: &Context,
    repository: &Repository,
    number: usize,
    base: &str,
) -> Result<Fetched, RepositoryProblem> {
    let dist = if repository.is_flat() {
        match repository.suite.trim_start_matches("./") {
            "" | "/" => format!("{base}/"),
            sub => format!("{base}/{sub}"),
        }
    } else {
        format!("{base}/dists/{}/", repository.suite)
    };
    let dir = cx.scratch.join(format!("repository-{number}"));
    let home = dir.join("gnupg");
    let host = |e: std::io::Error| RepositoryProblem::Host(e.to_string());
    fs_err::create_dir_all(&home).map_err(host)?;
    let keyring = if repository.trusted {
        None
    } else {
        Some(gpg::keyring(&repository.signed_by, &cx.keys, &dir)?)
    };

    let mut signed_by = Vec::new();
    let mut release_file = format!("{dist}InRelease");
    let release_text = match cx.fetcher.get(&release_file).await? {
        Some(bytes) => {
            let file = format!("{dist}InRelease");
            match &keyring {
                Some(keyring) => {
                    let signed = write(&dir, "InRelease", &bytes)?;
                    let output = dir.join("InRelease.text");
                    signed_by = gpg::verify(keyring, &signed, None, Some(&output), &home)
                        .await
                        .map_err(|problem| RepositoryProblem::Signature {
                            file: file.clone(),
                            problem,
                        })?;
                    Some(fs_err::read_to_string(&output).map_err(host)?)
                }
                None => Some(cleartext(&String::from_utf8_lossy(&bytes))),
            }
        }
        None => match cx.fetcher.get(&format!("{dist}Release")).await? {
            Some(bytes) => {
                release_file = format!("{dist}Release");
                if let Some(keyring) = &keyring {
                    let file = format!("{dist}Release.gpg");
                    let Some(signature) = cx.fetcher.get(&file).await? else {
                        return Err(RepositoryProblem::Signature {
                            file,
                            problem: SignatureProblem::Missing,
                        });
                    };
                    let data = write(&dir, "Release", &bytes)?;
                    let signature = write(&dir, "Release.gpg", &signature)?;
                    signed_by = gpg::verify(keyring, &signature, Some(&data), None, &home)
                        .await
                        .map_err(|problem| RepositoryProblem::Signature { file, problem })?;
                }
                Some(String::from_utf8_lossy(&bytes).into_owned())
            }
            // apt reads a trusted flat repository without a Release file.
            None if repository.trusted && repository.is_flat() => None,
            None => return Err(RepositoryProblem::NoRelease { dist }),
        },
    };

    let mut offered = Vec::new();
    let release = match release_text {
        Some(text) => {
            let release =
                Release::parse(&text).map_err(|message| RepositoryProblem::BadRelease {
                    file: release_file.clone(),
                    message,
                })?;
            if repository.check_valid_until
                && let Some(valid_until) = &release.valid_until
                && *valid_until < chrono::Utc::now()
            {
                return Err(RepositoryProblem::Expired {
                    file: release_file.clone(),
                    valid_until: valid_until.to_rfc2822(),
                });
            }
            let dirs = index_dirs(repository, &cx.architectures, &release);
            let mut found = 0;
            for index_dir in &dirs {
                let listed = release.packages_indices(index_dir);
                if listed.is_empty() {
                    continue;
                }
                found += 1;
                // A partial mirror may keep only one kind; a stale one may keep a kind whose
                // hash no longer matches: the next kind may still be right.
                let sources = index_sources(&dist, &listed, release.acquire_by_hash);
                let (source, bytes) = fetch_index(&cx.fetcher, index_dir, sources).await?;
                offered.extend(
                    read_index(
                        source.url,
                        source.name,
                        bytes,
                        cx.wanted.clone(),
                        dir.join("index"),
                    )
                    .await?,
                );
            }
            if found == 0 {
                return Err(RepositoryProblem::NoIndex {
                    what: if repository.is_flat() {
                        "the flat repository".into()
                    } else {
                        format!(
                            "components {} and architectures {}",
                            repository.components.join(", "),
                            architectures(repository, &cx.architectures).join(", ")
                        )
                    },
                });
            }
            release
        }
        None => {
            let mut got = None;
            for name in ["Packages.xz", "Packages.gz", "Packages"] {
                let url = format!("{dist}{name}");
                if let Some(bytes) = cx.fetcher.get(&url).await? {
                    got = Some((url, bytes));
                    break;
                }
            }
            let Some((url, bytes)) = got else {
                return Err(RepositoryProblem::NoRelease { dist });
            };
            let name = url.clone();
            offered
                .extend(read_index(url, name, bytes, cx.wanted.clone(), dir.join("index")).await?);
            Release::default()
        }
    };
    Ok(Fetched {
        fetched_from: base.to_string(),
        priority: priority(&release),
        release,
        signed_by,
        offered,
    })
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf, RepositoryProblem> {
    let path = dir.join(name);
    fs_err::write(&path, bytes).map_err(|e| RepositoryProblem::Host(e.to_string()))?;
    Ok(path)
}

/// The source's architectures, else the image's.
fn architectures<'a>(repository: &'a Repository, image: &'a [String]) -> &'a [String] {
    if repository.architectures.is_empty() {
        image
    } else {
        &repository.architectures
    }
}

/// The directories (relative to the Release file) whose `Packages` apt reads for this source:
/// `<component>/binary-<arch>/` for each, `binary-all/` too when the Release file's
/// `Architectures` has `all` and it does not say those are in the architectures' indices
/// (as apt decides); `""` when flat.
fn index_dirs(repository: &Repository, image: &[String], release: &Release) -> Vec<String> {
    if repository.is_flat() {
        return vec![String::new()];
    }
    let mut dirs = Vec::new();
    for component in &repository.components {
        for arch in architectures(repository, image) {
            dirs.push(format!("{component}/binary-{arch}/"));
        }
        let all = format!("{component}/binary-all/");
        if release.separate_all_index && !dirs.contains(&all) {
            dirs.push(all);
        }
    }
    dirs
}

/// Decompress (by the extension of `name`, its canonical name) and read an index fetched from
/// `url` off the async threads: xz is decoded to a file first (`spill`), gzip streamed.
async fn read_index(
    url: String,
    name: String,
    bytes: Vec<u8>,
    wanted: Arc<HashSet<(String, String)>>,
    spill: PathBuf,
) -> Result<Vec<Offered>, RepositoryProblem> {
    tokio::task::spawn_blocking(move || {
        let decompress = |message: String| RepositoryProblem::Decompress {
            url: url.clone(),
            message,
        };
        let result = if name.ends_with(".xz") {
            let file =
                fs_err::File::create(&spill).map_err(|e| RepositoryProblem::Host(e.to_string()))?;
            let mut writer = std::io::BufWriter::new(file);
            lzma_rs::xz_decompress(&mut bytes.as_slice(), &mut writer)
                .map_err(|e| decompress(e.to_string()))?;
            drop(writer);
            let file =
                fs_err::File::open(&spill).map_err(|e| RepositoryProblem::Host(e.to_string()))?;
            let result = index::offered(BufReader::new(file), &wanted);
            let _ = fs_err::remove_file(&spill);
            result
        } else if name.ends_with(".gz") {
            let mut decoder = BufReader::new(flate2::read::GzDecoder::new(bytes.as_slice()));
            // A gzip error surfaces as a read error of the first paragraph it breaks.
            index::offered(&mut decoder, &wanted)
        } else {
            index::offered(bytes.as_slice(), &wanted)
        };
        result.map_err(|problem| {
            if problem.message.starts_with("could not read") {
                decompress(problem.message)
            } else {
                RepositoryProblem::BadIndex {
                    url: url.clone(),
                    problem,
                }
            }
        })
    })
    .await
    .map_err(|e| RepositoryProblem::Host(format!("reading an index stopped: {e}")))?
}

/// The text of a clearsigned file, without checking it: only for `trusted=yes` sources, where
/// apt does not check either.
fn cleartext(text: &str) -> String {
    let Some((_, rest)) = text.split_once("-----BEGIN PGP SIGNED MESSAGE-----") else {
        return text.to_string();
    };
    // Armor headers (`Hash: SHA512`) up to the first empty line.
    let body = rest.split_once("\n\n").map_or(rest, |(_, b)| b);
    let body = body
        .split_once("\n-----BEGIN PGP SIGNATURE-----")
        .map_or(body, |(b, _)| b);
    body.lines()
        .map(|l| l.strip_prefix("- ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is the point
mod tests {
    use super::*;

    fn repository(suite: &str, components: &[&str], arch: &[&str]) -> Repository {
        Repository {
            declared: "/etc/apt/sources.list:1".into(),
            uri: "http://a/debian".into(),
            suite: suite.into(),
            components: components.iter().map(|s| s.to_string()).collect(),
            architectures: arch.iter().map(|s| s.to_string()).collect(),
            signed_by: vec![],
            trusted: false,
            check_valid_until: true,
        }
    }

    #[test]
    fn index_directories() {
        let image = ["amd64".to_string(), "i386".to_string()];
        let mut release = Release::default();
        assert_eq!(
            index_dirs(
                &repository("bookworm", &["main", "contrib"], &[]),
                &image,
                &release
            ),
            [
                "main/binary-amd64/",
                "main/binary-i386/",
                "contrib/binary-amd64/",
                "contrib/binary-i386/"
            ]
        );
        assert_eq!(
            index_dirs(
                &repository("bookworm", &["main"], &["arm64"]),
                &image,
                &release
            ),
            ["main/binary-arm64/"]
        );
        release.separate_all_index = true;
        assert_eq!(
            index_dirs(&repository("x", &["main"], &["amd64"]), &image, &release),
            ["main/binary-amd64/", "main/binary-all/"]
        );
        release.separate_all_index = false;
        assert_eq!(
            index_dirs(&repository("x", &["main"], &["amd64"]), &image, &release),
            ["main/binary-amd64/"]
        );
        assert_eq!(
            index_dirs(&repository("./", &[], &[]), &image, &release),
            [""]
        );
    }

    #[test]
    fn by_hash_first_then_the_canonical_name_for_each_listed_compression() {
        let (xz, gz) = ("a".repeat(64), "b".repeat(64));
        let listed = [
            ("main/binary-all/Packages.xz", xz.as_str(), 20),
            ("main/binary-all/Packages.gz", gz.as_str(), 30),
        ];
        let urls = |by_hash| -> Vec<String> {
            index_sources("http://m/dists/x/", &listed, by_hash)
                .into_iter()
                .map(|s| s.url)
                .collect()
        };
        assert_eq!(
            urls(true),
            [
                format!("http://m/dists/x/main/binary-all/by-hash/SHA256/{xz}"),
                "http://m/dists/x/main/binary-all/Packages.xz".to_string(),
                format!("http://m/dists/x/main/binary-all/by-hash/SHA256/{gz}"),
                "http://m/dists/x/main/binary-all/Packages.gz".to_string(),
            ]
        );
        assert_eq!(
            urls(false),
            [
                "http://m/dists/x/main/binary-all/Packages.xz",
                "http://m/dists/x/main/binary-all/Packages.gz"
            ]
        );
        // The by-hash URL is read as what its canonical name says it is.
        let first = &index_sources("http://m/dists/x/", &listed, true)[0];
        assert_eq!(
            (first.name.as_str(), first.sha256.as_str(), first.size),
            ("main/binary-all/Packages.xz", xz.as_str(), 20)
        );
        // Flat: by-hash/ next to the Release file.
        let flat = index_sources("http://m/repo/", &[("Packages.gz", gz.as_str(), 30)], true);
        assert_eq!(flat[0].url, format!("http://m/repo/by-hash/SHA256/{gz}"));
        assert_eq!(flat[1].url, "http://m/repo/Packages.gz");
    }

    #[test]
    fn every_index_tried_is_named_with_what_it_gave() {
        let problem = RepositoryProblem::Index {
            dir: "main/binary-all/".into(),
            attempts: vec![
                IndexAttempt {
                    url: "http://m/d/main/binary-all/by-hash/SHA256/514f".into(),
                    outcome: IndexOutcome::NotFound,
                },
                IndexAttempt {
                    url: "http://m/d/main/binary-all/Packages.xz".into(),
                    outcome: IndexOutcome::Mismatch {
                        found: "9c1e".into(),
                        found_size: 130640,
                        expected: "514f".into(),
                        expected_size: 138560,
                    },
                },
                IndexAttempt {
                    url: "http://m/d/main/binary-all/Packages".into(),
                    outcome: IndexOutcome::Status("403 Forbidden".into()),
                },
            ],
        };
        assert_eq!(
            problem.to_string(),
            "no `Packages` index of main/binary-all/ its Release file lists could be used; tried:\n  \
             http://m/d/main/binary-all/by-hash/SHA256/514f: not found (404)\n  \
             http://m/d/main/binary-all/Packages.xz: sha256 9c1e (130640 bytes), its Release file says 514f (138560 bytes)\n  \
             http://m/d/main/binary-all/Packages: answered 403 Forbidden"
        );
        assert_eq!(
            problem.hint(),
            Some("the mirror may be in the middle of an update; check again later")
        );
        let missing = RepositoryProblem::Index {
            dir: String::new(),
            attempts: vec![IndexAttempt {
                url: "http://m/repo/Packages.gz".into(),
                outcome: IndexOutcome::NotFound,
            }],
        };
        assert!(
            missing
                .to_string()
                .starts_with("no `Packages` index of the flat repository"),
            "{missing}"
        );
        assert!(missing.hint().unwrap().contains("packageUpdates.mirrors"));
    }

    #[test]
    fn priorities_as_apt_gives_them() {
        let mut r = Release::default();
        assert_eq!(priority(&r), 500);
        r.not_automatic = true;
        assert_eq!(priority(&r), 1);
        r.but_automatic_upgrades = true;
        assert_eq!(priority(&r), 100);
    }

    #[test]
    fn cleartext_of_a_clearsigned_release() {
        let text = "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\nSuite: x\n- -dash\n-----BEGIN PGP SIGNATURE-----\n\nabc\n-----END PGP SIGNATURE-----\n";
        assert_eq!(cleartext(text), "Suite: x\n-dash");
    }
}
