//! Each file in `tests/cases/component/` holds one mistake (named for it); its rendered
//! diagnostics are snapshot-tested. Every document in `fixtures/components/` must validate,
//! and so must every real document in `tests/cases/component/corpus/` (where each came from:
//! its first lines and `SOURCES.md` there).

use std::path::{Path, PathBuf};

use builder::component::parse;

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<PathBuf> = fs_err::read_dir(root.join(dir))
        .expect("the directory is part of the repository")
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml"))
        .map(|p| {
            p.strip_prefix(root)
                .expect("listed under the root")
                .to_path_buf()
        })
        .collect();
    files.sort();
    files
}

fn read(path: &Path) -> String {
    fs_err::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .expect("test file is readable")
}

#[test]
fn each_mistake_renders_its_diagnostics() {
    let cases = yaml_files("tests/cases/component");
    assert!(cases.len() >= 20, "only {} cases", cases.len());
    for path in cases {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("case files have UTF-8 names")
            .to_string();
        let checked = parse::check(&path, &read(&path));
        let rendered = checked.diagnostics.render(false);
        if name.starts_with("warn-") {
            // Warning cases are valid documents with something worth saying.
            assert!(
                checked.document.is_some(),
                "{name} should be valid:\n{rendered}"
            );
            assert!(!checked.diagnostics.is_empty(), "{name} should warn");
        } else {
            assert!(checked.document.is_none(), "{name} should be invalid");
            assert!(checked.diagnostics.has_errors(), "{name} has no error");
        }
        insta::assert_snapshot!(name, rendered);
    }
}

#[test]
fn fixture_documents_are_valid() {
    let fixtures = yaml_files("fixtures/components");
    assert!(fixtures.len() >= 5);
    for path in fixtures {
        if let Err(diagnostics) = parse::parse_str(&path, &read(&path)) {
            panic!("{}", diagnostics.render(false));
        }
    }
}

/// Documents AWS publishes and runs (and others found in public repositories) are valid:
/// what AWSTOE accepts, builder accepts. Warnings are allowed (and printed, for the record).
#[test]
fn real_documents_in_the_corpus_are_valid() {
    let corpus = yaml_files("tests/cases/component/corpus");
    assert!(corpus.len() >= 15, "only {} corpus documents", corpus.len());
    let sources = read(Path::new("tests/cases/component/corpus/SOURCES.md"));
    let mut invalid = Vec::new();
    for path in &corpus {
        let text = read(path);
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        assert!(
            text.starts_with("# Source: ") && sources.contains(name),
            "{name}: say where it came from (a `# Source:` first line and a row in SOURCES.md)"
        );
        let checked = parse::check(path, &text);
        let rendered = checked.diagnostics.render(false);
        if checked.document.is_none() {
            invalid.push(rendered);
        } else if !rendered.is_empty() {
            println!("{rendered}");
        }
    }
    assert!(invalid.is_empty(), "{}", invalid.join("\n"));
}

#[test]
fn load_reports_unreadable_files_as_io_errors() {
    let missing = Path::new("/nonexistent/component.yml");
    match parse::load(missing) {
        Err(parse::LoadError::Io { path, .. }) => assert_eq!(path, missing),
        other => panic!("expected an Io error, got {other:?}"),
    }
}

#[test]
fn the_model_keeps_what_was_written() {
    use builder::component::document::{Action, Branch, Expr, LoopKind, OnFailure};
    use serde_json::json;

    let path = Path::new("fixtures/components/hardening.yml");
    let doc = parse::parse_str(path, &read(path)).expect("fixture is valid");
    assert_eq!(doc.name.as_deref(), Some("LinuxHardening"));
    assert_eq!(doc.parameters[0].allowed_values, ["server", "workstation"]);
    assert_eq!(doc.parameters[0].default.as_deref(), Some("server"));
    assert_eq!(doc.constants[0].value, "/etc/sysctl.d/99-hardening.conf");
    assert_eq!(doc.source.sha256.len(), 64);
    let build = &doc.phases[0];
    let write = &build.steps[0];
    assert_eq!(write.timeout_secs, Some(7200));
    assert_eq!(write.max_attempts, 1);
    assert_eq!(write.on_failure, OnFailure::Abort);
    let looping = write.looping.as_ref().expect("WriteSysctl loops");
    assert_eq!(looping.name.as_deref(), Some("setting"));
    assert!(matches!(&looping.kind, LoopKind::ForEach(items) if items.len() == 4));
    let remove = &build.steps[1];
    assert_eq!(remove.on_failure, OnFailure::Continue);
    assert_eq!(
        remove.looping.as_ref().map(|l| &l.kind),
        Some(&LoopKind::ForEachDelimited {
            list: "telnet.socket,rsh.socket,tftp.socket".into(),
            delimiter: ','
        })
    );
    // Unquoted modes stay as written: `600` is not turned into a number, `0700` not into 448.
    let perms = &build.steps[2];
    assert_eq!(perms.action, Action::SetFilePermissions);
    assert_eq!(perms.inputs[1]["permissions"], json!("600"));
    assert_eq!(build.steps[3].inputs[0]["permissions"], json!("0700"));
    assert_eq!(build.steps[3].inputs[0]["recursive"], json!(true));
    let usb = build.steps[4].condition.as_ref().expect("has an if");
    assert_eq!((usb.then, usb.otherwise), (Branch::Execute, Branch::Skip));
    let Expr::And(items) = &usb.expr else {
        panic!("expected and: {:?}", usb.expr)
    };
    assert_eq!(items.len(), 3);
    assert!(matches!(&items[2], Expr::Not(_)));
    assert_eq!(
        build.steps[5].looping.as_ref().map(|l| &l.kind),
        Some(&LoopKind::For {
            start: 1,
            end: 3,
            update_by: 1
        })
    );
    // Assert inputs stay JSON with operands as text (numbers as written).
    let enough = doc.phases[1]
        .steps
        .iter()
        .find(|s| s.name == "EnoughRules")
        .expect("step exists");
    assert_eq!(
        enough.inputs["or"][0]["numberGreaterThanEquals"],
        json!("4")
    );

    let path = Path::new("fixtures/components/every-linux-action.yml");
    let doc = parse::parse_str(path, &read(path)).expect("fixture is valid");
    let steps = &doc.phases[0].steps;
    assert_eq!(
        steps[0].inputs,
        serde_json::Value::Null,
        "UpdateOS without inputs"
    );
    let nested = steps
        .iter()
        .find(|s| s.action == Action::ExecuteDocument)
        .expect("present");
    assert_eq!((nested.timeout_secs, nested.max_attempts), (None, 1));
    let binary = steps
        .iter()
        .find(|s| s.action == Action::ExecuteBinary)
        .expect("present");
    assert_eq!(binary.inputs["arguments"], json!(["hello", "42"]));
}

#[test]
fn schema_versions_in_the_wild_are_accepted() {
    for version in ["1.0", "\"1.0\"", "1", "'1.0'"] {
        let text = format!(
            "schemaVersion: {version}\nphases:\n  - name: build\n    steps:\n      - name: A\n        action: ExecuteBash\n        inputs:\n          commands: [true]\n"
        );
        let result = parse::parse_str(Path::new("v.yml"), &text);
        assert!(
            result.is_ok(),
            "{version}: {}",
            result.err().map(|d| d.render(false)).unwrap_or_default()
        );
    }
    let text = "schemaVersion: 1.1\nphases: []\n";
    let err = parse::parse_str(Path::new("v.yml"), text).expect_err("1.1 is not a schema version");
    assert_eq!(err.error_count(), 2);
}

mod cli {
    use assert_cmd::Command;
    use predicates::prelude::*;

    fn builder() -> Command {
        let mut cmd = Command::cargo_bin("builder").expect("the binary is built for tests");
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("NO_COLOR", "1");
        cmd
    }

    #[test]
    fn valid_documents_print_ok_and_exit_0() {
        builder()
            .args([
                "component",
                "validate",
                "fixtures/components/install-nginx.yml",
            ])
            .assert()
            .code(0)
            .stderr(predicate::str::contains(
                "ok: fixtures/components/install-nginx.yml (3 phases, 7 steps)",
            ));
    }

    #[test]
    fn an_invalid_document_among_valid_ones_exits_2_with_its_diagnostics() {
        builder()
            .args([
                "component",
                "validate",
                "fixtures/components/install-nginx.yml",
                "tests/cases/component/unknown-action.yml",
            ])
            .assert()
            .code(2)
            .stderr(predicate::str::contains(
                "ok: fixtures/components/install-nginx.yml",
            ))
            .stderr(predicate::str::contains(
                "--> tests/cases/component/unknown-action.yml:6:17",
            ))
            .stderr(predicate::str::contains("did you mean `ExecuteBash`?"))
            .stderr(predicate::str::contains("\u{1b}[").not());
    }

    #[test]
    fn warnings_are_printed_and_exit_0() {
        builder()
            .args([
                "component",
                "validate",
                "tests/cases/component/warn-unknown-input-key.yml",
            ])
            .assert()
            .code(0)
            .stderr(predicate::str::contains(
                "--> tests/cases/component/warn-unknown-input-key.yml:10:13",
            ))
            .stderr(predicate::str::contains(
                "warning: unknown key `overwite` in the inputs of `WebDownload` is ignored",
            ))
            .stderr(predicate::str::contains("did you mean `overwrite`?"))
            .stderr(predicate::str::contains(
                "ok: tests/cases/component/warn-unknown-input-key.yml",
            ));
    }

    #[test]
    fn json_says_which_problems_are_warnings() {
        let out = builder()
            .args([
                "component",
                "validate",
                "--json",
                "tests/cases/component/warn-unknown-input-key.yml",
                "tests/cases/component/unknown-input-key.yml",
            ])
            .assert()
            .code(2)
            .get_output()
            .stdout
            .clone();
        let json: serde_json::Value = serde_json::from_slice(&out).expect("stdout is JSON");
        assert_eq!(json[0]["valid"], true);
        let warning = &json[0]["problems"][0];
        assert_eq!(warning["severity"], "warning");
        assert_eq!(
            (&warning["line"], &warning["col"]),
            (&10.into(), &13.into())
        );
        assert_eq!(warning["hint"], "did you mean `overwrite`?");
        // A misspelled *required* key stays an error: AWSTOE rejects the missing key.
        assert_eq!(json[1]["valid"], false);
        assert_eq!(json[1]["problems"][0]["severity"], "error");
        assert_eq!(json[1]["problems"][0]["hint"], "did you mean `commands`?");
    }

    #[test]
    fn unreadable_file_exits_2() {
        builder()
            .args(["component", "validate", "no/such/file.yml"])
            .assert()
            .code(2)
            .stderr(predicate::str::contains(
                "could not read the component document\n  Caused by: failed to open file `no/such/file.yml`",
            ));
    }

    #[test]
    fn json_lists_every_problem_on_stdout() {
        let out = builder()
            .args([
                "component",
                "validate",
                "--json",
                "fixtures/components/install-nginx.yml",
                "tests/cases/component/many-problems.yml",
            ])
            .assert()
            .code(2)
            .get_output()
            .stdout
            .clone();
        let json: serde_json::Value = serde_json::from_slice(&out).expect("stdout is JSON");
        assert_eq!(json[0]["valid"], true);
        assert_eq!(json[1]["valid"], false);
        let problems = json[1]["problems"].as_array().expect("a list");
        assert_eq!(problems.len(), 12);
        assert_eq!(problems[0]["line"], 3);
        assert_eq!(problems[0]["col"], 1);
        assert_eq!(problems[0]["hint"], "did you mean `parameters`?");
    }
}
