//! Pure tier: each file in tests/cases/recipe/ holds the mistake it is named after; `builder
//! validate` must reject it with exit code 2 and the rendered problems in the snapshot next to
//! it (tests/cases/recipe/snapshots/). Component documents and the infrastructure file those
//! recipes name live in the subfolders.

#[path = "support/cases.rs"]
mod cases;

use cases::root;

const CASES: &str = "tests/cases/recipe";

/// `builder validate` on a case.
fn validate(relative: &str) -> (Option<i32>, String, String) {
    cases::builder(&["validate", relative], |c| {
        c.env_remove("BUILDER_TEST_UNSET_VARIABLE")
    })
}

#[test]
fn every_case_is_rejected_with_its_rendered_problems() {
    for case in cases::rejected_cases(CASES, 14, validate) {
        let (name, stderr) = (case.name, case.stderr);
        case.settings.bind(|| insta::assert_snapshot!(name, stderr));
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
        stderr.starts_with(
            "error: could not read the recipe\n  Caused by: failed to open file `tests/cases/recipe/no-such-recipe.yml`"
        ),
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

/// A component document's warnings (a key AWSTOE ignores, a `{{` kept as text) are shown with
/// their place and hint, in text and in `--json`, and do not make the recipe invalid.
#[test]
fn component_warnings_are_shown_and_do_not_fail() {
    let recipe = "tests/cases/recipe/valid/component-warnings.yml";
    let (code, _, stderr) = validate(recipe);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("--> tests/cases/recipe/valid/../components/warns.yml:16:13"),
        "{stderr}"
    );
    assert!(
        stderr.contains("warning: unknown key `force` in the inputs of `DeleteFile` is ignored"),
        "{stderr}"
    );
    assert!(stderr.contains("= hint: expected `path`"), "{stderr}");
    assert!(
        stderr.contains("warning: `{{` is not closed by `}}`, so it is kept as text"),
        "{stderr}"
    );
    assert!(stderr.contains("ok: tests/cases/recipe/valid/component-warnings.yml"));

    let (code, stdout, stderr) = cases::builder(&["validate", "--json", recipe], |c| c);
    assert_eq!(code, Some(0), "{stderr}");
    let results: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is JSON");
    assert_eq!(results[0]["valid"], true);
    let problems = results[0]["files"][0]["problems"]
        .as_array()
        .expect("a list of problems");
    assert_eq!(problems.len(), 2, "{results}");
    assert!(
        problems.iter().all(|p| p["severity"] == "warning"),
        "{results}"
    );
    assert_eq!(
        (&problems[1]["line"], &problems[1]["col"]),
        (&21.into(), &21.into())
    );
}

/// `infrastructure.boot: appliance` is a valid recipe (with `diskSize` and `network: user`);
/// with `userData` it is not (`user-data-with-appliance-boot.yml`).
#[test]
fn an_appliance_boot_recipe_is_valid() {
    let (code, _, stderr) = validate("tests/cases/recipe/valid/appliance-boot.yml");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("ok: tests/cases/recipe/valid/appliance-boot.yml"),
        "{stderr}"
    );
}

/// A container recipe (`containerType: docker`, a custom template, an archive by default in
/// its `directory` target) is valid, and says what it builds.
#[test]
fn a_container_recipe_is_valid() {
    let (code, _, stderr) = validate("tests/cases/recipe/valid/container.yml");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(
            "ok: tests/cases/recipe/valid/container.yml (tools 1.0.0: a container image, 1 component)"
        ),
        "{stderr}"
    );
}
