//! The update check: which installed packages of an image its repositories offer a newer
//! version of, decided on the host as the image's apt would decide its candidate (apt's
//! default pin priorities: `NotAutomatic` repositories do not upgrade on their own), with
//! every repository fetched and verified, and every one that could not be named in the error.

use std::collections::HashSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::diagnostic::Diagnostics;
use crate::packages::apt::{self, Fetched, RepositoryProblem};
use crate::packages::fetch::Fetcher;
use crate::packages::version::{Scheme, compare};
use crate::store::config::Mirror;
use crate::store::manifest::{PackageList, PackageSources};

/// How many updates [`Outdated::summary`] names before "and N more".
const SUMMARY_NAMES: usize = 10;

/// What the host setup changes about the check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckOptions {
    /// The store configuration's `packageUpdates.mirrors`.
    pub mirrors: Vec<Mirror>,
}

/// The result of a check: what was compared and the updates found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Outdated {
    /// Installed packages compared.
    pub packages_checked: usize,
    pub repositories: Vec<RepositoryChecked>,
    /// Sorted by name, then architecture.
    pub updates: Vec<Update>,
}

/// A repository the check read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RepositoryChecked {
    /// Where the source is in the image: `/etc/apt/sources.list.d/x.sources:3`.
    pub declared: String,
    /// As the image writes it.
    pub uri: String,
    /// After the store's mirrors.
    pub fetched_from: String,
    /// As written.
    pub suite: String,
    /// From the Release file.
    pub codename: Option<String>,
    pub label: Option<String>,
    /// Fingerprints of the keys whose signature was good (empty: a `trusted=yes` source).
    pub signed_by: Vec<String>,
    pub security: bool,
}

/// An installed package its repositories offer a newer version of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Update {
    pub name: String,
    pub arch: String,
    pub installed: String,
    pub candidate: String,
    /// The Release file's Codename, else Suite, else the suite as written: `bookworm-security`.
    pub repository: String,
    /// Label contains "Security", or the suite/codename ends `-security`.
    pub security: bool,
}

impl std::fmt::Display for Update {
    /// `nginx:amd64 1.22.1-9+deb12u12 → 1.22.1-9+deb12u13 (bookworm-security) security`: one
    /// update, whole, for logs and tests (the CLI aligns its own columns).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{} {} → {} ({}){}",
            self.name,
            self.arch,
            self.installed,
            self.candidate,
            self.repository,
            if self.security { " security" } else { "" }
        )
    }
}

impl Outdated {
    /// Only the security updates.
    pub fn security_only(mut self) -> Outdated {
        self.updates.retain(|u| u.security);
        self
    }

    /// One line: `2 updates (1 security) among 412 packages from 3 repositories: hello 1.0-1 →
    /// 1.1-1 (bookworm-security), …`, or `no updates among …`.
    pub fn summary(&self) -> String {
        let among = format!(
            "among {} from {}",
            plural(self.packages_checked, "package", "packages"),
            plural(self.repositories.len(), "repository", "repositories")
        );
        if self.updates.is_empty() {
            return format!("no updates {among}");
        }
        let security = self.updates.iter().filter(|u| u.security).count();
        let security = if security > 0 {
            format!(" ({security} security)")
        } else {
            String::new()
        };
        let mut names: Vec<String> = self
            .updates
            .iter()
            .take(SUMMARY_NAMES)
            .map(|u| {
                format!(
                    "{} {} → {} ({})",
                    u.name, u.installed, u.candidate, u.repository
                )
            })
            .collect();
        if self.updates.len() > SUMMARY_NAMES {
            names.push(format!("and {} more", self.updates.len() - SUMMARY_NAMES));
        }
        format!(
            "{}{security} {among}: {}",
            plural(self.updates.len(), "update", "updates"),
            names.join(", ")
        )
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// A repository that could not be fetched or verified.
#[derive(Debug, Clone)]
pub struct RepositoryFailure {
    pub declared: String,
    pub uri: String,
    pub suite: String,
    pub fetched_from: String,
    pub problem: RepositoryProblem,
}

impl std::fmt::Display for RepositoryFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "repository `{} {}` (declared at {}",
            self.uri, self.suite, self.declared
        )?;
        if self.fetched_from.trim_end_matches('/') != self.uri.trim_end_matches('/') {
            write!(f, ", fetched from {}", self.fetched_from)?;
        }
        write!(f, "): {}", self.problem)
    }
}

/// Why there is no answer. Every message starts `could not check updates: `; how to fix it
/// is [`CheckError::hint`], apart (commands print it as `hint:`).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(
        "could not check updates: the image's packages come from {manager} repositories, which the check does not read yet (it reads apt's)"
    )]
    Unsupported { manager: String },
    #[error("could not check updates: the image's apt sources are not valid:\n{}", sources_text(.0))]
    Sources(Vec<Diagnostics>),
    #[error(
        "could not check updates: the image's sources ({files} files) enable no binary package repository"
    )]
    NoRepositories { files: usize },
    #[error("could not check updates: {}", failures_text(.0))]
    Repositories(Vec<RepositoryFailure>),
    #[error("could not check updates: could not make a temporary directory: {0}")]
    Scratch(std::io::Error),
}

impl CheckError {
    /// How to fix it, where something helps: for failed repositories, each distinct hint of
    /// theirs, joined with `; `.
    pub fn hint(&self) -> Option<String> {
        match self {
            CheckError::Unsupported { .. } => Some(
                "`packageUpdates` checks apt images only for now; rebuild dnf images on their schedule".into(),
            ),
            CheckError::NoRepositories { .. } => Some(
                "the image needs a `deb` line or a `Types: deb` entry that is not `Enabled: no`".into(),
            ),
            CheckError::Repositories(failures) => {
                let mut hints: Vec<&str> = Vec::new();
                for hint in failures.iter().filter_map(|f| f.problem.hint()) {
                    if !hints.contains(&hint) {
                        hints.push(hint);
                    }
                }
                (!hints.is_empty()).then(|| hints.join("; "))
            }
            CheckError::Sources(_) | CheckError::Scratch(_) => None,
        }
    }
}

fn sources_text(files: &[Diagnostics]) -> String {
    files
        .iter()
        .flat_map(Diagnostics::lines)
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn failures_text(failures: &[RepositoryFailure]) -> String {
    match failures {
        [one] => one.to_string(),
        many => {
            let mut text = format!("{} repositories failed", many.len());
            for failure in many {
                text.push_str("\n- ");
                text.push_str(&failure.to_string());
            }
            text
        }
    }
}

/// Compare the image's installed packages with what its repositories offer now.
pub async fn check(
    installed: &PackageList,
    sources: &PackageSources,
    options: &CheckOptions,
) -> Result<Outdated, CheckError> {
    if sources.manager != "apt" {
        return Err(CheckError::Unsupported {
            manager: sources.manager.clone(),
        });
    }
    let repositories = apt::sources::repositories(&sources.files).map_err(CheckError::Sources)?;
    if repositories.is_empty() {
        return Err(CheckError::NoRepositories {
            files: sources.files.len(),
        });
    }
    let wanted: HashSet<(String, String)> = installed
        .packages
        .iter()
        .map(|p| (p.name.clone(), p.arch.clone()))
        .collect();
    let mut architectures = sources.architectures.clone();
    if architectures.is_empty() {
        // A manifest that did not record them: the installed packages' own.
        for p in &installed.packages {
            if p.arch != "all" && !architectures.contains(&p.arch) {
                architectures.push(p.arch.clone());
            }
        }
    }
    let scratch = tempfile::Builder::new()
        .prefix("builder-packages-")
        .tempdir()
        .map_err(CheckError::Scratch)?;
    let cx = apt::Context {
        fetcher: Fetcher::new(&options.mirrors),
        architectures: architectures.into(),
        keys: sources.keys.clone().into(),
        wanted: Arc::new(wanted),
        scratch: scratch.path().to_path_buf(),
    };
    // Every repository at once: most of the time is waiting for servers.
    let mut tasks = tokio::task::JoinSet::new();
    for (number, repository) in repositories.iter().enumerate() {
        let (cx, repository) = (cx.clone(), repository.clone());
        tasks.spawn(async move { (number, apt::fetch(&cx, &repository, number).await) });
    }
    let mut results: Vec<Option<(String, Result<Fetched, RepositoryProblem>)>> =
        repositories.iter().map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((number, result)) => results[number] = Some(result),
            // A panic in a task is a bug: carry it on, as it would have gone without tasks.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => {}
        }
    }
    let mut fetched = Vec::new();
    let mut failures = Vec::new();
    for (repository, result) in repositories.iter().zip(results) {
        let (fetched_from, result) = result.unwrap_or_else(|| {
            (
                repository.uri.clone(),
                Err(RepositoryProblem::Host("its task was cancelled".into())),
            )
        });
        match result {
            Ok(f) => fetched.push((repository, f)),
            Err(problem) => failures.push(RepositoryFailure {
                declared: repository.declared.clone(),
                uri: repository.uri.clone(),
                suite: repository.suite.clone(),
                fetched_from,
                problem,
            }),
        }
    }
    if !failures.is_empty() {
        return Err(CheckError::Repositories(failures));
    }
    let checked: Vec<RepositoryChecked> = fetched
        .iter()
        .map(|(r, f)| RepositoryChecked {
            declared: r.declared.clone(),
            uri: r.uri.clone(),
            fetched_from: f.fetched_from.clone(),
            suite: r.suite.clone(),
            codename: f.release.codename.clone(),
            label: f.release.label.clone(),
            signed_by: f.signed_by.clone(),
            security: is_security(r, f),
        })
        .collect();
    let offers: Vec<Offer<'_>> = fetched
        .iter()
        .zip(&checked)
        .flat_map(|((r, f), c)| {
            f.offered.iter().map(move |o| Offer {
                name: &o.name,
                arch: &o.arch,
                version: &o.version,
                priority: f.priority,
                repository: repository_name(r, f),
                security: c.security,
            })
        })
        .collect();
    let mut updates = candidates(Scheme::Debian, installed, &offers);
    updates.sort_by(|a, b| (&a.name, &a.arch).cmp(&(&b.name, &b.arch)));
    Ok(Outdated {
        packages_checked: installed.packages.len(),
        repositories: checked,
        updates,
    })
}

fn is_security(repository: &apt::sources::Repository, fetched: &Fetched) -> bool {
    let release = &fetched.release;
    release
        .label
        .as_deref()
        .is_some_and(|l| l.contains("Security"))
        || [
            release.suite.as_deref(),
            release.codename.as_deref(),
            Some(repository.suite.as_str()),
        ]
        .into_iter()
        .flatten()
        .any(|s| s.trim_end_matches('/').ends_with("-security"))
}

fn repository_name(repository: &apt::sources::Repository, fetched: &Fetched) -> String {
    fetched
        .release
        .codename
        .clone()
        .or_else(|| fetched.release.suite.clone())
        .unwrap_or_else(|| repository.suite.clone())
}

/// One version one repository offers.
#[derive(Debug, Clone)]
struct Offer<'a> {
    name: &'a str,
    arch: &'a str,
    version: &'a str,
    priority: i32,
    repository: String,
    security: bool,
}

/// apt's candidate for each installed package, where it is not the installed version: the
/// versions newer than the installed one, the highest priority first, then the highest
/// version; it wins only if its priority is at least the installed version's (the highest of
/// the repositories that offer it, else 100).
fn candidates(scheme: Scheme, installed: &PackageList, offers: &[Offer<'_>]) -> Vec<Update> {
    let mut by_package: std::collections::HashMap<(&str, &str), Vec<&Offer<'_>>> =
        std::collections::HashMap::new();
    for offer in offers {
        by_package
            .entry((offer.name, offer.arch))
            .or_default()
            .push(offer);
    }
    let mut updates = Vec::new();
    for package in &installed.packages {
        let Some(offers) = by_package.get(&(package.name.as_str(), package.arch.as_str())) else {
            continue;
        };
        let installed_priority = offers
            .iter()
            .filter(|o| compare(scheme, o.version, &package.version).is_eq())
            .map(|o| o.priority)
            .max()
            .unwrap_or(apt::PRIORITY_INSTALLED);
        let best = offers
            .iter()
            .filter(|o| compare(scheme, o.version, &package.version).is_gt())
            .max_by(|a, b| {
                a.priority
                    .cmp(&b.priority)
                    .then_with(|| compare(scheme, a.version, b.version))
            });
        let Some(best) = best.filter(|b| b.priority >= installed_priority) else {
            continue;
        };
        // Of the repositories offering that very version (at that priority), name a security
        // one if there is one.
        let same: Vec<&&Offer<'_>> = offers
            .iter()
            .filter(|o| {
                o.priority == best.priority && compare(scheme, o.version, best.version).is_eq()
            })
            .collect();
        let named = same.iter().find(|o| o.security).unwrap_or(&same[0]);
        updates.push(Update {
            name: package.name.clone(),
            arch: package.arch.clone(),
            installed: package.version.clone(),
            candidate: best.version.to_string(),
            repository: named.repository.clone(),
            security: same.iter().any(|o| o.security),
        });
    }
    updates
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test that unwraps fails loudly, which is the point
mod tests {
    use super::*;
    use crate::store::manifest::Package;

    fn installed(packages: &[(&str, &str, &str)]) -> PackageList {
        PackageList {
            manager: "dpkg".into(),
            packages: packages
                .iter()
                .map(|(n, v, a)| Package {
                    name: n.to_string(),
                    version: v.to_string(),
                    arch: a.to_string(),
                })
                .collect(),
        }
    }

    fn offer<'a>(
        name: &'a str,
        version: &'a str,
        arch: &'a str,
        priority: i32,
        repository: &str,
        security: bool,
    ) -> Offer<'a> {
        Offer {
            name,
            arch,
            version,
            priority,
            repository: repository.into(),
            security,
        }
    }

    fn summary(updates: &[Update]) -> Vec<String> {
        updates.iter().map(Update::to_string).collect()
    }

    #[test]
    fn highest_version_across_repositories() {
        let list = installed(&[
            ("nginx", "1.22.1-9+deb12u12", "amd64"),
            ("libssl3", "3.0.17-1~deb12u2", "amd64"),
            ("tzdata", "2025b-0+deb12u1", "all"),
            ("current", "1.0", "amd64"),
            ("gone", "1.0", "amd64"),
        ]);
        let offers = [
            offer(
                "nginx",
                "1.22.1-9+deb12u12",
                "amd64",
                500,
                "bookworm",
                false,
            ),
            offer(
                "nginx",
                "1.22.1-9+deb12u13",
                "amd64",
                500,
                "bookworm-security",
                true,
            ),
            offer(
                "libssl3",
                "3.0.17-1~deb12u2",
                "amd64",
                500,
                "bookworm",
                false,
            ),
            offer(
                "libssl3",
                "3.0.18-1~deb12u1",
                "amd64",
                500,
                "bookworm-updates",
                false,
            ),
            offer(
                "libssl3",
                "3.0.18-1~deb12u1",
                "amd64",
                500,
                "bookworm-security",
                true,
            ),
            offer(
                "tzdata",
                "2025c-0+deb12u1",
                "all",
                500,
                "bookworm-updates",
                false,
            ),
            offer("tzdata", "2026a-0+deb12u1", "all", 500, "bookworm", false),
            offer("current", "1.0", "amd64", 500, "bookworm", false),
            // Another architecture's version is not this package's.
            offer("current", "2.0", "i386", 500, "bookworm", false),
        ];
        assert_eq!(
            summary(&candidates(Scheme::Debian, &list, &offers)),
            [
                "nginx:amd64 1.22.1-9+deb12u12 → 1.22.1-9+deb12u13 (bookworm-security) security",
                "libssl3:amd64 3.0.17-1~deb12u2 → 3.0.18-1~deb12u1 (bookworm-security) security",
                "tzdata:all 2025b-0+deb12u1 → 2026a-0+deb12u1 (bookworm)",
            ]
        );
    }

    #[test]
    fn not_automatic_repositories_do_not_upgrade_on_their_own() {
        let list = installed(&[
            ("a", "1.0", "amd64"),
            ("b", "2.0~bpo12+1", "amd64"),
            ("c", "1.0", "amd64"),
        ]);
        let offers = [
            // experimental: NotAutomatic.
            offer("a", "1.0", "amd64", 500, "bookworm", false),
            offer("a", "9.0", "amd64", 1, "experimental", false),
            // Installed from backports (NotAutomatic + ButAutomaticUpgrades): upgraded there.
            offer("b", "1.0", "amd64", 500, "bookworm", false),
            offer(
                "b",
                "2.0~bpo12+1",
                "amd64",
                100,
                "bookworm-backports",
                false,
            ),
            offer(
                "b",
                "2.1~bpo12+1",
                "amd64",
                100,
                "bookworm-backports",
                false,
            ),
            // Installed from the distribution: a backport is not an upgrade.
            offer("c", "1.0", "amd64", 500, "bookworm", false),
            offer(
                "c",
                "1.1~bpo12+1",
                "amd64",
                100,
                "bookworm-backports",
                false,
            ),
        ];
        assert_eq!(
            summary(&candidates(Scheme::Debian, &list, &offers)),
            ["b:amd64 2.0~bpo12+1 → 2.1~bpo12+1 (bookworm-backports)"]
        );
    }

    fn update(name: &str, security: bool) -> Update {
        Update {
            name: name.into(),
            arch: "amd64".into(),
            installed: "1.0-1".into(),
            candidate: "1.1-1".into(),
            repository: if security {
                "bookworm-security"
            } else {
                "bookworm"
            }
            .into(),
            security,
        }
    }

    fn repository(suite: &str) -> RepositoryChecked {
        RepositoryChecked {
            declared: "/etc/apt/sources.list:1".into(),
            uri: "http://a/".into(),
            fetched_from: "http://a/".into(),
            suite: suite.into(),
            codename: None,
            label: None,
            signed_by: vec![],
            security: false,
        }
    }

    #[test]
    fn summaries_and_security_only() {
        let outdated = Outdated {
            packages_checked: 412,
            repositories: vec![repository("a"), repository("b"), repository("c")],
            updates: vec![update("hello", true), update("world", false)],
        };
        assert_eq!(
            outdated.summary(),
            "2 updates (1 security) among 412 packages from 3 repositories: hello 1.0-1 → 1.1-1 (bookworm-security), world 1.0-1 → 1.1-1 (bookworm)"
        );
        let security = outdated.clone().security_only();
        assert_eq!(
            security.summary(),
            "1 update (1 security) among 412 packages from 3 repositories: hello 1.0-1 → 1.1-1 (bookworm-security)"
        );
        let none = Outdated {
            packages_checked: 1,
            repositories: vec![repository("a")],
            updates: vec![],
        };
        assert_eq!(
            none.summary(),
            "no updates among 1 package from 1 repository"
        );
        let many = Outdated {
            updates: (0..12)
                .map(|i| update(&format!("p{i:02}"), false))
                .collect(),
            ..none
        };
        assert!(
            many.summary()
                .ends_with("p09 1.0-1 → 1.1-1 (bookworm), and 2 more"),
            "{}",
            many.summary()
        );
        assert!(many.summary().starts_with("12 updates among"));
    }

    #[tokio::test]
    async fn dnf_is_not_supported_yet_and_bad_sources_are_named() {
        let list = installed(&[]);
        let sources = |manager: &str, path: &str, text: &str| PackageSources {
            manager: manager.into(),
            architectures: vec!["amd64".into()],
            files: vec![crate::store::manifest::SourceFile {
                path: path.into(),
                text: text.into(),
            }],
            keys: vec![],
        };
        let e = check(
            &list,
            &sources("dnf", "/etc/yum.repos.d/x.repo", ""),
            &CheckOptions::default(),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, CheckError::Unsupported { .. }));
        assert!(
            e.to_string().starts_with(
                "could not check updates: the image's packages come from dnf repositories"
            ),
            "{e}"
        );
        let e = check(
            &list,
            &sources("apt", "/etc/apt/sources.list", "deb http://a/\n"),
            &CheckOptions::default(),
        )
        .await
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "could not check updates: the image's apt sources are not valid:\n  /etc/apt/sources.list:1:5: error: no suite after `http://a/` (hint: write the suite (`bookworm`) or a flat repository's directory (`./`))"
        );
        let e = check(
            &list,
            &sources("apt", "/etc/apt/sources.list", "# nothing\n"),
            &CheckOptions::default(),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, CheckError::NoRepositories { files: 1 }), "{e}");
    }
}
