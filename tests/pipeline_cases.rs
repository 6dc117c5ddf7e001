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

/// A pipeline in a folder whose name is not UTF-8 is refused when its recipe is planned (a
/// plan is written as JSON), before the pipeline's `tests` replace the recipe's; that step
/// used to panic on such a path.
#[test]
fn a_folder_whose_name_is_not_utf8_is_refused_when_planned() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let folder = dir
        .path()
        .join(std::ffi::OsStr::from_bytes(b"pipelines-\xff"));
    fs_err::create_dir(&folder).expect("mkdir");
    for file in ["parent.raw", "components/hello.yml", "components/check.yml"] {
        let from = root().join("tests/cases/recipe").join(file);
        let name = from.file_name().expect("a file name").to_owned();
        fs_err::copy(&from, folder.join(name)).expect("copy");
    }
    let recipe = "name: hello\nversion: 1.0.0\nparentImage: parent.raw\ncomponents:\n  - path: hello.yml\n    parameters: {Greeting: hi}\ntests:\n  components:\n    - path: check.yml\n";
    fs_err::write(folder.join("recipe.yml"), recipe).expect("write");
    let pipeline = "name: weekly\nrecipe: recipe.yml\ntests: {timeoutSeconds: 600}\n";
    fs_err::write(folder.join("pipeline.yml"), pipeline).expect("write");
    let (code, _, stderr) = cases::builder(&["pipeline", "run", "pipeline.yml"], |c| {
        c.current_dir(&folder)
            .env("BUILDER_STORE", dir.path().join("store"))
    });
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("would name a path that is not UTF-8") && !stderr.contains("panicked"),
        "{stderr}"
    );
}
