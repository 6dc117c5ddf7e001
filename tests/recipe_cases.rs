//! Pure tier: each file in tests/cases/recipe/ holds the mistake it is named after; `builder
//! validate` must reject it with exit code 2 and the rendered problems in the snapshot next to
//! it (tests/cases/recipe/snapshots/). Component documents and the infrastructure file those
//! recipes name live in the subfolders.

use std::path::{Path, PathBuf};

const CASES: &str = "tests/cases/recipe";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn cases() -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(root().join(CASES))
        .expect("the cases folder exists")
        .map(|e| e.expect("a readable folder entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml"))
        .collect();
    cases.sort();
    cases
}

/// `builder validate` on a case, run from the repository root so paths in messages are the
/// relative paths a user would type.
fn validate(relative: &str) -> (Option<i32>, String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_builder"))
        .args(["validate", relative])
        .current_dir(root())
        .env("NO_COLOR", "1")
        .env_remove("BUILDER_TEST_UNSET_VARIABLE")
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
    let cases = cases();
    assert!(
        cases.len() >= 14,
        "expected the case files, found {}",
        cases.len()
    );
    for case in &cases {
        let name = case
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("a UTF-8 name");
        let relative = format!("{CASES}/{name}.yml");
        let (code, stdout, stderr) = validate(&relative);
        assert_eq!(code, Some(2), "{relative} should be invalid:\n{stderr}");
        assert!(stdout.is_empty(), "{relative} printed on stdout: {stdout}");
        assert!(
            !stderr.contains("panicked"),
            "{relative} made builder panic:\n{stderr}"
        );
        let mut settings = insta::Settings::clone_current();
        settings.set_snapshot_path(root().join(CASES).join("snapshots"));
        settings.set_prepend_module_to_snapshot(false);
        settings.set_input_file(case);
        settings.set_omit_expression(true);
        settings.bind(|| insta::assert_snapshot!(name, stderr));
    }
}

/// The STYLE.md example, character for character (with our key `infrastructure` in place of
/// the guide's `vm`, on the same line and column).
#[test]
fn the_style_guide_example_is_rendered_exactly() {
    let (code, _, stderr) = validate("tests/cases/recipe/unknown-accelerator.yml");
    assert_eq!(code, Some(2));
    assert_eq!(
        stderr,
        "error: `tests/cases/recipe/unknown-accelerator.yml` is not a valid recipe (1 problem); nothing was started
  --> tests/cases/recipe/unknown-accelerator.yml:6:16
   |
 6 |   accelerator: kvmm
   |                ^^^^ unknown accelerator `kvmm`; expected `auto`, `kvm` or `tcg`
   = hint: did you mean `kvm`?
"
    );
}

#[test]
fn an_unreadable_recipe_is_an_input_error() {
    let (code, _, stderr) = validate("tests/cases/recipe/no-such-recipe.yml");
    assert_eq!(code, Some(2));
    assert!(
        stderr.starts_with("error: could not read `tests/cases/recipe/no-such-recipe.yml`"),
        "{stderr}"
    );
}

#[test]
fn json_output_lists_every_file_and_problem() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_builder"))
        .args([
            "validate",
            "--json",
            "tests/cases/recipe/recipe-and-component-both-invalid.yml",
            "tests/cases/recipe/no-such-recipe.yml",
        ])
        .current_dir(root())
        .output()
        .expect("builder runs");
    assert_eq!(output.status.code(), Some(2));
    let results: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("stdout is JSON");
    let first = &results[0];
    assert_eq!(first["valid"], false);
    let files: Vec<&str> = first["files"]
        .as_array()
        .expect("a list of files")
        .iter()
        .map(|f| f["path"].as_str().expect("a path"))
        .collect();
    assert_eq!(
        files,
        [
            "tests/cases/recipe/recipe-and-component-both-invalid.yml",
            "tests/cases/recipe/components/broken.yml"
        ]
    );
    let memory = &first["files"][0]["problems"][0];
    assert_eq!(
        (memory["line"].as_u64(), memory["col"].as_u64()),
        (Some(6), Some(11))
    );
    assert_eq!(
        memory["message"],
        "memory (100MiB) is below the minimum (256MiB)"
    );
    assert!(
        results[1]["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("could not read")),
        "{results}"
    );
}
