//! The package update check (`builder::packages::check`) against real signed apt
//! repositories on the loopback (tests/support/apt_repo.rs: .debs from dpkg-deb, indices from
//! apt-ftparchive, keys and signatures from gpg), verified with the real gpgv: no update, an
//! update, a security update, bad and untrusted signatures, unreachable and unknown
//! repositories, a mirror, a flat repository, `file://`, a deb822 source with its key inline,
//! Release + Release.gpg without InRelease.

#[path = "support/http.rs"]
mod http;

#[path = "support/apt_repo.rs"]
mod apt_repo;

use apt_repo::AptRepo;
use builder::packages::{CheckError, CheckOptions, Outdated, check};
use builder::store::config::Mirror;
use builder::store::manifest::{Package, PackageList, PackageSources, SourceFile};

fn installed(packages: &[(&str, &str)]) -> PackageList {
    PackageList {
        manager: "dpkg".into(),
        packages: packages
            .iter()
            .map(|(name, version)| Package {
                name: name.to_string(),
                version: version.to_string(),
                arch: "all".into(),
            })
            .collect(),
    }
}

async fn run(list: &PackageList, sources: &PackageSources) -> Result<Outdated, CheckError> {
    run_with(list, sources, &CheckOptions::default()).await
}

async fn run_with(
    list: &PackageList,
    sources: &PackageSources,
    options: &CheckOptions,
) -> Result<Outdated, CheckError> {
    check(list, sources, options).await
}

fn updates(outdated: &Outdated) -> Vec<String> {
    outdated.updates.iter().map(ToString::to_string).collect()
}

#[tokio::test]
async fn no_newer_version_means_no_updates() {
    let repo = AptRepo::new();
    repo.publish("hello", "1.0-1");
    repo.publish("world", "2.0-1");
    let list = installed(&[
        ("hello", "1.0-1"),
        ("world", "2.0-1"),
        ("local-only", "1.0"),
    ]);
    let outdated = run(&list, &repo.package_sources(&repo.url()))
        .await
        .expect("the check succeeds");
    assert_eq!(updates(&outdated), Vec::<String>::new());
    assert_eq!(outdated.packages_checked, 3);
    assert_eq!(outdated.repositories.len(), 1);
    let checked = &outdated.repositories[0];
    assert_eq!(checked.declared, format!("{}:1", AptRepo::SOURCES_PATH));
    assert_eq!(checked.uri, repo.url());
    assert_eq!(checked.codename.as_deref(), Some("bookworm"));
    assert_eq!(checked.label.as_deref(), Some("Builder test"));
    assert_eq!(checked.signed_by, [repo.fingerprint()]);
    assert!(!checked.security);
    assert_eq!(
        outdated.summary(),
        "no updates among 3 packages from 1 repository"
    );
    // The check read the signed InRelease and the xz index, nothing unsigned.
    let requests = repo.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.contains("/dists/bookworm/InRelease")),
        "{requests:#?}"
    );
    assert!(
        requests
            .iter()
            .any(|r| r.contains("/dists/bookworm/main/binary-amd64/Packages.xz")),
        "{requests:#?}"
    );
}

#[tokio::test]
async fn a_newer_version_is_an_update_from_its_repository() {
    let repo = AptRepo::new();
    repo.publish("hello", "1.0-1");
    repo.publish("world", "2.0-1");
    let list = installed(&[("hello", "1.0-1"), ("world", "2.0-1")]);
    let sources = repo.package_sources(&repo.url());
    assert!(
        run(&list, &sources)
            .await
            .expect("the check succeeds")
            .updates
            .is_empty()
    );

    repo.publish("hello", "1.1-1");
    let outdated = run(&list, &sources).await.expect("the check succeeds");
    assert_eq!(updates(&outdated), ["hello:all 1.0-1 → 1.1-1 (bookworm)"]);
    assert_eq!(
        outdated.summary(),
        "1 update among 2 packages from 1 repository: hello 1.0-1 → 1.1-1 (bookworm)"
    );
    // An older version published later is not an update; an epoch beats everything.
    repo.publish("world", "1.9-1");
    repo.publish("hello", "1:0.1-1");
    let outdated = run(&list, &sources).await.expect("the check succeeds");
    assert_eq!(updates(&outdated), ["hello:all 1.0-1 → 1:0.1-1 (bookworm)"]);
}

#[tokio::test]
async fn a_security_suite_marks_its_updates() {
    let repo = AptRepo::new();
    repo.publish("hello", "1.0-1");
    repo.publish("world", "2.0-1");
    repo.publish("world", "2.0-2");
    repo.publish_to("bookworm-security", "hello", "1.0-1+deb12u1");
    let list = installed(&[("hello", "1.0-1"), ("world", "2.0-1")]);
    let outdated = run(&list, &repo.package_sources(&repo.url()))
        .await
        .expect("the check succeeds");
    assert_eq!(
        updates(&outdated),
        [
            "hello:all 1.0-1 → 1.0-1+deb12u1 (bookworm-security) security",
            "world:all 2.0-1 → 2.0-2 (bookworm)",
        ]
    );
    assert_eq!(outdated.repositories.len(), 2);
    assert!(!outdated.repositories[0].security);
    assert!(outdated.repositories[1].security);
    assert!(
        outdated
            .summary()
            .starts_with("2 updates (1 security) among 2 packages from 2 repositories: "),
        "{}",
        outdated.summary()
    );
    let security = outdated.security_only();
    assert_eq!(
        updates(&security),
        ["hello:all 1.0-1 → 1.0-1+deb12u1 (bookworm-security) security"]
    );
}

#[tokio::test]
async fn a_signature_by_a_key_the_image_does_not_trust_fails() {
    let mut repo = AptRepo::new();
    repo.publish("hello", "1.0-1");
    let list = installed(&[("hello", "1.0-1")]);
    let sources = repo.package_sources(&repo.url());
    assert!(run(&list, &sources).await.is_ok());
    repo.publish("hello", "1.1-1");
    repo.resign_with_other_key();
    let e = run(&list, &sources).await.expect_err("the check fails");
    let message = e.to_string();
    let CheckError::Repositories(failures) = &e else {
        panic!("{e}")
    };
    assert_eq!(failures.len(), 1, "{message}");
    assert!(
        message.starts_with(&format!(
            "could not check updates: repository `{} bookworm` (declared at {}:1): {}/dists/bookworm/InRelease: signature by unknown key ",
            repo.url(),
            AptRepo::SOURCES_PATH,
            repo.url()
        )),
        "{message}"
    );
    assert!(message.contains(AptRepo::KEY_PATH), "{message}");
    assert!(
        e.hint()
            .is_some_and(|h| h.starts_with("the image must trust")),
        "{:?}",
        e.hint()
    );
}

#[tokio::test]
async fn a_changed_release_file_is_a_bad_signature() {
    let repo = AptRepo::new();
    repo.publish("hello", "1.0-1");
    repo.tamper();
    let e = run(
        &installed(&[("hello", "1.0-1")]),
        &repo.package_sources(&repo.url()),
    )
    .await
    .expect_err("the check fails");
    let message = e.to_string();
    assert!(
        message.contains("repository `http://127.0.0.1:"),
        "{message}"
    );
    assert!(message.contains("InRelease: bad signature"), "{message}");
    // Without InRelease, the detached Release.gpg no longer matches Release either.
    repo.remove_inrelease();
    let message = run(
        &installed(&[("hello", "1.0-1")]),
        &repo.package_sources(&repo.url()),
    )
    .await
    .expect_err("the check fails")
    .to_string();
    assert!(message.contains("Release.gpg: bad signature"), "{message}");
}

#[tokio::test]
async fn release_and_release_gpg_without_inrelease() {
    let repo = AptRepo::new();
    repo.publish("hello", "1.0-1");
    repo.publish("hello", "1.2-1");
    repo.remove_inrelease();
    let outdated = run(
        &installed(&[("hello", "1.0-1")]),
        &repo.package_sources(&repo.url()),
    )
    .await
    .expect("the check succeeds");
    assert_eq!(updates(&outdated), ["hello:all 1.0-1 → 1.2-1 (bookworm)"]);
    assert_eq!(outdated.repositories[0].signed_by, [repo.fingerprint()]);
}

#[tokio::test]
async fn unreachable_and_unknown_repositories_are_all_named() {
    let repo = AptRepo::new();
    repo.publish("hello", "1.0-1");
    // A port nothing listens on: bind one, then let it go.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address")
        .port();
    let text = format!(
        "{}deb [signed-by={key}] http://127.0.0.1:{closed}/debian bookworm main\ndeb [signed-by={key}] {} no-such-suite main\n",
        repo.sources_text(&repo.url()),
        repo.url(),
        key = AptRepo::KEY_PATH,
    );
    let sources = AptRepo::package_sources_with(
        vec![SourceFile {
            path: "/etc/apt/sources.list".into(),
            text,
        }],
        vec![repo.key_file()],
    );
    let e = run(&installed(&[("hello", "1.0-1")]), &sources)
        .await
        .expect_err("the check fails");
    let message = e.to_string();
    let CheckError::Repositories(failures) = &e else {
        panic!("{e}")
    };
    assert_eq!(failures.len(), 2, "{message}");
    assert!(
        message.starts_with(
            "could not check updates: 2 repositories failed\n- repository `http://127.0.0.1:"
        ),
        "{message}"
    );
    assert_eq!(failures[0].declared, "/etc/apt/sources.list:2");
    assert!(
        failures[0].to_string().contains("unreachable"),
        "{}",
        failures[0]
    );
    assert_eq!(
        e.hint().as_deref(),
        Some(
            "map the image's URI to one this host reaches with `packageUpdates.mirrors` in <store>/config.yml"
        )
    );
    assert_eq!(failures[1].declared, "/etc/apt/sources.list:3");
    assert!(
        failures[1]
            .to_string()
            .contains("no Release file: neither http://127.0.0.1:"),
        "{}",
        failures[1]
    );
}

#[tokio::test]
async fn a_mirror_maps_the_guest_address_to_the_host() {
    let repo = AptRepo::new();
    repo.publish("hello", "1.0-1");
    repo.publish("hello", "1.1-1");
    // The image's sources use the address a guest reaches the host by.
    let sources = repo.package_sources(&repo.guest_url());
    let options = CheckOptions {
        mirrors: vec![Mirror {
            from: repo.guest_url(),
            to: repo.url(),
        }],
    };
    let outdated = run_with(&installed(&[("hello", "1.0-1")]), &sources, &options)
        .await
        .expect("the check succeeds");
    assert_eq!(updates(&outdated), ["hello:all 1.0-1 → 1.1-1 (bookworm)"]);
    assert_eq!(outdated.repositories[0].uri, repo.guest_url());
    assert_eq!(outdated.repositories[0].fetched_from, repo.url());
}

#[tokio::test]
async fn a_flat_repository() {
    let repo = AptRepo::flat();
    repo.publish("hello", "1.0-1");
    repo.publish("hello", "1.0-2");
    let outdated = run(
        &installed(&[("hello", "1.0-1")]),
        &repo.package_sources(&repo.url()),
    )
    .await
    .expect("the check succeeds");
    assert_eq!(updates(&outdated), ["hello:all 1.0-1 → 1.0-2 (./)"]);
    assert_eq!(outdated.repositories[0].suite, "./");
    assert_eq!(outdated.repositories[0].signed_by, [repo.fingerprint()]);
    let requests = repo.requests();
    assert!(
        requests.iter().any(|r| r.starts_with("GET /InRelease ")),
        "{requests:#?}"
    );
    assert!(
        requests.iter().any(|r| r.starts_with("GET /Packages.gz ")),
        "{requests:#?}"
    );
}

#[tokio::test]
async fn a_file_repository() {
    let repo = AptRepo::new();
    repo.publish("hello", "1.0-1");
    repo.publish("hello", "1.0-1+b1");
    let outdated = run(
        &installed(&[("hello", "1.0-1")]),
        &repo.package_sources(&repo.file_url()),
    )
    .await
    .expect("the check succeeds");
    assert_eq!(
        updates(&outdated),
        ["hello:all 1.0-1 → 1.0-1+b1 (bookworm)"]
    );
    assert!(repo.requests().is_empty(), "{:#?}", repo.requests());
}

#[tokio::test]
async fn a_deb822_source_with_its_key_inline() {
    let repo = AptRepo::new();
    repo.publish("hello", "1.0-1");
    repo.publish("hello", "1.0-3");
    let key: String = repo
        .public_key_armored()
        .lines()
        .map(|l| {
            if l.is_empty() {
                " .\n".to_string()
            } else {
                format!(" {l}\n")
            }
        })
        .collect();
    let text = format!(
        "# the test repository\nTypes: deb\nURIs: {}\nSuites: bookworm\nComponents: main\nSigned-By:\n{key}\nTypes: deb\nURIs: http://disabled.invalid/\nSuites: x\nComponents: main\nEnabled: no\n",
        repo.url()
    );
    let sources = AptRepo::package_sources_with(
        vec![SourceFile {
            path: "/etc/apt/sources.list.d/test.sources".into(),
            text,
        }],
        vec![],
    );
    let outdated = run(&installed(&[("hello", "1.0-1")]), &sources)
        .await
        .expect("the check succeeds");
    assert_eq!(updates(&outdated), ["hello:all 1.0-1 → 1.0-3 (bookworm)"]);
    assert_eq!(
        outdated.repositories[0].declared,
        "/etc/apt/sources.list.d/test.sources:2"
    );
    assert_eq!(outdated.repositories[0].signed_by, [repo.fingerprint()]);
}

#[tokio::test]
async fn the_global_keyring_when_no_key_is_named() {
    let repo = AptRepo::new();
    repo.publish("hello", "1.0-1");
    repo.publish("hello", "1.1-1");
    let mut global = repo.key_file();
    global.path = "/etc/apt/trusted.gpg.d/test.gpg".into();
    // The same key elsewhere is not trusted: apt does not read /usr/share/keyrings by itself.
    let mut elsewhere = repo.key_file();
    elsewhere.path = "/usr/share/keyrings/test.gpg".into();
    let text = format!("deb {} bookworm main\n", repo.url());
    let source = |keys| {
        AptRepo::package_sources_with(
            vec![SourceFile {
                path: "/etc/apt/sources.list".into(),
                text: text.clone(),
            }],
            keys,
        )
    };
    let list = installed(&[("hello", "1.0-1")]);
    let outdated = run(&list, &source(vec![global]))
        .await
        .expect("the check succeeds");
    assert_eq!(updates(&outdated).len(), 1);
    let message = run(&list, &source(vec![elsewhere]))
        .await
        .expect_err("the check fails")
        .to_string();
    assert!(message.contains("names no key (no Signed-By)"), "{message}");
}

#[tokio::test]
async fn an_expired_release_file_fails_unless_the_source_says_otherwise() {
    let repo = AptRepo::new();
    repo.publish("hello", "1.0-1");
    repo.expire();
    let list = installed(&[("hello", "1.0-1")]);
    let message = run(&list, &repo.package_sources(&repo.url()))
        .await
        .expect_err("the check fails")
        .to_string();
    assert!(
        message.contains("dists/bookworm/InRelease expired at Sat, 1 Jan 2000 00:00:00 +0000"),
        "{message}"
    );
    let text = repo
        .sources_text(&repo.url())
        .replace("[signed-by=", "[check-valid-until=no signed-by=");
    let sources = AptRepo::package_sources_with(
        vec![SourceFile {
            path: AptRepo::SOURCES_PATH.into(),
            text,
        }],
        vec![repo.key_file()],
    );
    let outdated = run(&list, &sources).await.expect("the check succeeds");
    assert!(outdated.updates.is_empty());
}

/// The repository is one apt itself accepts (what the VM tests rely on): the host's apt-get,
/// with its state in a temporary directory, updates from it with the key at `signed-by` and
/// sees the candidate the check reports.
#[tokio::test]
async fn apt_itself_reads_the_test_repository_and_agrees() {
    let repo = AptRepo::new();
    repo.publish("hello", "1.0-1");
    repo.publish_to("bookworm-security", "hello", "1.0-1+deb12u1");
    let state = tempfile::tempdir().expect("apt state dir");
    let key = state.path().join("key.gpg");
    fs_err::write(&key, repo.public_key_bytes()).expect("key");
    let sources = state.path().join("sources.list");
    fs_err::write(
        &sources,
        repo.sources_text(&repo.url())
            .replace(AptRepo::KEY_PATH, &key.display().to_string()),
    )
    .expect("sources");
    for dir in ["lists/partial", "cache/archives/partial"] {
        fs_err::create_dir_all(state.path().join(dir)).expect("apt dirs");
    }
    let apt = |args: &[&str]| {
        let s = state.path().display().to_string();
        let out = std::process::Command::new("apt-get")
            .args([
                "-o",
                &format!("Dir::Etc::sourcelist={}", sources.display()),
                "-o",
                "Dir::Etc::sourceparts=-",
                "-o",
                &format!("Dir::State::lists={s}/lists"),
                "-o",
                &format!("Dir::Cache={s}/cache"),
                "-o",
                "Dir::State::status=/dev/null",
                "-o",
                "APT::Architecture=amd64",
                "-o",
                "Debug::NoLocking=1",
            ])
            .args(args)
            .output()
            .expect("apt-get (scripts/install-deps installs it)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "apt-get {args:?}: {text}");
        text
    };
    let update = apt(&["update"]);
    assert!(!update.contains("W:") && !update.contains("E:"), "{update}");
    let candidate = apt(&["install", "--simulate", "hello"]);
    assert!(
        candidate.contains("Inst hello (1.0-1+deb12u1 "),
        "{candidate}"
    );
    let outdated = run(
        &installed(&[("hello", "1.0-1")]),
        &repo.package_sources(&repo.url()),
    )
    .await
    .expect("the check succeeds");
    assert_eq!(
        updates(&outdated),
        ["hello:all 1.0-1 → 1.0-1+deb12u1 (bookworm-security) security"]
    );
}

fn sha256_of(path: &std::path::Path) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(fs_err::read(path).expect("index")))
}

#[tokio::test]
async fn a_by_hash_repository_is_read_by_hash() {
    let repo = AptRepo::with_by_hash();
    repo.publish("hello", "1.0-1");
    let dir = repo.index_dir(apt_repo::SUITE);
    let stale = fs_err::read(dir.join("Packages.xz")).expect("Packages.xz");
    repo.publish("hello", "1.2-1");
    let release =
        fs_err::read_to_string(repo.root().join("dists/bookworm/Release")).expect("Release");
    assert!(release.contains("Acquire-By-Hash: yes"), "{release}");
    let xz = sha256_of(&dir.join("Packages.xz"));
    assert!(dir.join("by-hash/SHA256").join(&xz).is_file());
    // A mirror caught between moving the by-hash files and the canonical names: the canonical
    // Packages.xz is the old one, by-hash has the one the Release file lists.
    fs_err::write(dir.join("Packages.xz"), stale).expect("stale Packages.xz");
    let outdated = run(
        &installed(&[("hello", "1.0-1")]),
        &repo.package_sources(&repo.url()),
    )
    .await
    .expect("the check succeeds");
    assert_eq!(updates(&outdated), ["hello:all 1.0-1 → 1.2-1 (bookworm)"]);
    let requests = repo.requests();
    let by_hash = format!("GET /dists/bookworm/main/binary-amd64/by-hash/SHA256/{xz} ");
    assert!(
        requests.iter().any(|r| r.starts_with(&by_hash)),
        "{requests:#?}"
    );
    assert!(
        !requests.iter().any(|r| r.contains("/Packages")),
        "only the by-hash index is fetched: {requests:#?}"
    );
}

#[tokio::test]
async fn a_stale_xz_index_falls_back_to_the_gz_one() {
    let repo = AptRepo::new();
    repo.publish("hello", "1.0-1");
    let dir = repo.index_dir(apt_repo::SUITE);
    let stale = fs_err::read(dir.join("Packages.xz")).expect("Packages.xz");
    repo.publish("hello", "1.2-1");
    fs_err::write(dir.join("Packages.xz"), stale).expect("stale Packages.xz");
    let outdated = run(
        &installed(&[("hello", "1.0-1")]),
        &repo.package_sources(&repo.url()),
    )
    .await
    .expect("the check succeeds with Packages.gz");
    assert_eq!(updates(&outdated), ["hello:all 1.0-1 → 1.2-1 (bookworm)"]);
    let indices: Vec<String> = repo
        .requests()
        .into_iter()
        .filter(|r| r.contains("/Packages"))
        .collect();
    assert_eq!(
        indices
            .iter()
            .map(|r| r.split(' ').nth(1).unwrap_or_default())
            .collect::<Vec<_>>(),
        [
            "/dists/bookworm/main/binary-amd64/Packages.xz",
            "/dists/bookworm/main/binary-amd64/Packages.gz"
        ],
        "{indices:#?}"
    );
}

#[tokio::test]
async fn every_listed_index_wrong_fails_naming_each_url_tried() {
    let repo = AptRepo::with_by_hash();
    repo.publish("hello", "1.0-1");
    let dir = repo.index_dir(apt_repo::SUITE);
    let stale_xz = fs_err::read(dir.join("Packages.xz")).expect("Packages.xz");
    let stale_gz = fs_err::read(dir.join("Packages.gz")).expect("Packages.gz");
    repo.publish("hello", "1.2-1");
    let size = |name: &str| fs_err::metadata(dir.join(name)).expect("index").len();
    let listed: Vec<(&str, String, u64)> = ["Packages.xz", "Packages.gz", "Packages"]
        .into_iter()
        .map(|name| (name, sha256_of(&dir.join(name)), size(name)))
        .collect();
    // The mirror has no by-hash files, stale xz and gz, and no plain Packages.
    fs_err::remove_dir_all(dir.join("by-hash")).expect("remove by-hash");
    fs_err::write(dir.join("Packages.xz"), &stale_xz).expect("stale xz");
    fs_err::write(dir.join("Packages.gz"), &stale_gz).expect("stale gz");
    fs_err::remove_file(dir.join("Packages")).expect("remove Packages");
    let got = [
        Some((sha256_of(&dir.join("Packages.xz")), stale_xz.len())),
        Some((sha256_of(&dir.join("Packages.gz")), stale_gz.len())),
        None,
    ];

    let e = run(
        &installed(&[("hello", "1.0-1")]),
        &repo.package_sources(&repo.url()),
    )
    .await
    .expect_err("no index matches its Release file");
    let message = e.to_string();
    let base = format!("{}/dists/bookworm/main/binary-amd64/", repo.url());
    let mut expected =
        "no `Packages` index of main/binary-amd64/ its Release file lists could be used; tried:"
            .to_string();
    for ((name, sha, size), got) in listed.iter().zip(&got) {
        expected.push_str(&format!(
            "\n  {base}by-hash/SHA256/{sha}: not found (404)\n  {base}{name}: "
        ));
        match got {
            Some((found, found_size)) => expected.push_str(&format!(
                "sha256 {found} ({found_size} bytes), its Release file says {sha} ({size} bytes)"
            )),
            None => expected.push_str("not found (404)"),
        }
    }
    assert!(
        message.starts_with("could not check updates: repository `http://127.0.0.1:"),
        "{message}"
    );
    assert!(message.ends_with(&expected), "{message}\n---\n{expected}");
    assert_eq!(
        e.hint().as_deref(),
        Some("the mirror may be in the middle of an update; check again later")
    );
}
