//! Pure tier: each file in tests/cases/pipeline/ holds the mistake it is named after; `builder
//! pipeline validate` must reject it with exit code 2 and the rendered problems in the
//! snapshot next to it (tests/cases/pipeline/snapshots/). The recipes those pipelines name are
//! in tests/cases/pipeline/recipes/. The example pipelines in images/pipelines/ are valid.

use std::path::{Path, PathBuf};

const CASES: &str = "tests/cases/pipeline";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn yml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join(dir))
        .expect("the folder exists")
        .map(|e| e.expect("a readable folder entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml"))
        .collect();
    files.sort();
    files
}

/// `builder pipeline validate ARGS`, from the repository root so paths in messages are the
/// relative paths a user would type.
fn validate(args: &[&str]) -> (Option<i32>, String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_builder"))
        .arg("pipeline")
        .arg("validate")
        .args(args)
        .current_dir(root())
        .env("NO_COLOR", "1")
        .env("BUILDER_BASE_IMAGE", "tests/cases/recipe/parent.raw")
        .output()
        .expect("builder runs");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn every_case_is_rejected_with_its_rendered_problems() {
    let cases = yml_files(CASES);
    assert!(
        cases.len() >= 11,
        "expected the case files, found {}",
        cases.len()
    );
    for case in &cases {
        let name = case
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("a UTF-8 name");
        let relative = format!("{CASES}/{name}.yml");
        let (code, stdout, stderr) = validate(&[&relative]);
        assert_eq!(code, Some(2), "{relative} should be invalid:\n{stderr}");
        assert!(stdout.is_empty(), "{relative} printed on stdout: {stdout}");
        assert!(!stderr.contains("panicked"), "{relative}:\n{stderr}");
        let mut settings = insta::Settings::clone_current();
        settings.set_snapshot_path(root().join(CASES).join("snapshots"));
        settings.set_prepend_module_to_snapshot(false);
        settings.set_input_file(case);
        settings.set_omit_expression(true);
        settings.bind(|| insta::assert_snapshot!(name, stderr));
    }
}

#[test]
fn an_impossible_schedule_is_explained() {
    let (code, _, stderr) = validate(&["tests/cases/pipeline/impossible-cron.yml"]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("tests/cases/pipeline/impossible-cron.yml:4:15"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "never matches a time from now on: it means \"At 00:00, on day 31, in February.\""
        ),
        "{stderr}"
    );
}

#[test]
fn every_file_is_checked_and_the_worst_outcome_is_the_exit_code() {
    let (code, _, stderr) = validate(&[
        "images/pipelines/weekly-base.yml",
        "tests/cases/pipeline/bad-timezone.yml",
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("ok: images/pipelines/weekly-base.yml"),
        "{stderr}"
    );
    assert!(stderr.contains("did you mean `Europe/Paris`?"), "{stderr}");
}

#[test]
fn the_example_pipelines_are_valid() {
    let examples = yml_files("images/pipelines");
    assert!(examples.len() >= 2, "{examples:?}");
    for example in &examples {
        let path = example.strip_prefix(root()).expect("inside the repository");
        let (code, _, stderr) = validate(&[&path.to_string_lossy()]);
        assert_eq!(code, Some(0), "{}:\n{stderr}", path.display());
        assert!(stderr.starts_with("ok: "), "{stderr}");
    }
}
