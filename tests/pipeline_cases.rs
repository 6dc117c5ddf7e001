//! Pure tier: each file in tests/cases/pipeline/ holds the mistake it is named after; `builder
//! pipeline validate` must reject it with exit code 2 and the rendered problems in the
//! snapshot next to it (tests/cases/pipeline/snapshots/). The recipes those pipelines name are
//! in tests/cases/pipeline/recipes/. The example pipelines in images/pipelines/ are valid.

#[path = "support/cases.rs"]
mod cases;

use cases::{root, yml_files};

const CASES: &str = "tests/cases/pipeline";

/// `builder pipeline validate ARGS`.
fn validate(args: &[&str]) -> (Option<i32>, String, String) {
    let args: Vec<&str> = ["pipeline", "validate"]
        .iter()
        .chain(args)
        .copied()
        .collect();
    cases::builder(&args, |c| {
        c.env("BUILDER_BASE_IMAGE", "tests/cases/recipe/parent.raw")
    })
}

#[test]
fn every_case_is_rejected_with_its_rendered_problems() {
    for case in cases::rejected_cases(CASES, 11, |relative| validate(&[relative])) {
        let (name, stderr) = (case.name, case.stderr);
        case.settings.bind(|| insta::assert_snapshot!(name, stderr));
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
