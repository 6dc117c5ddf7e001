//! The case runners' shared parts (tests/recipe_cases.rs, tests/pipeline_cases.rs): each file
//! of a cases folder holds the mistake it is named after and must be rejected by `builder` with
//! the rendered problems in the snapshot next to it. The snapshot assertion stays in each test
//! file, so a snapshot names the test that wrote it.

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The `*.yml` files of `dir` (relative to the repository root), sorted.
pub fn yml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs_err::read_dir(root().join(dir))
        .expect("the folder exists")
        .map(|e| e.expect("a readable folder entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml"))
        .collect();
    files.sort();
    files
}

/// `builder ARGS` run from the repository root (so paths in messages are the relative paths a
/// user would type), without colours: its exit code, stdout and stderr.
pub fn builder(
    args: &[&str],
    configure: impl FnOnce(&mut Command) -> &mut Command,
) -> (Option<i32>, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_builder"));
    command.args(args).current_dir(root()).env("NO_COLOR", "1");
    let output = configure(&mut command).output().expect("builder runs");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// One rejected case: its name (the file stem), what `builder` printed on stderr, and the
/// insta settings that put its snapshot in `<dir>/snapshots/<name>.snap`.
pub struct Rejected {
    pub name: String,
    pub stderr: String,
    pub settings: insta::Settings,
}

/// Every case of `dir` (at least `min`) run through `run(relative path)`, checked to exit
/// with 2, print nothing on stdout and not panic.
pub fn rejected_cases(
    dir: &str,
    min: usize,
    run: impl Fn(&str) -> (Option<i32>, String, String),
) -> Vec<Rejected> {
    let cases = yml_files(dir);
    assert!(
        cases.len() >= min,
        "expected the case files, found {}",
        cases.len()
    );
    cases
        .iter()
        .map(|case| {
            let name = case
                .file_stem()
                .and_then(|s| s.to_str())
                .expect("a UTF-8 name")
                .to_string();
            let relative = format!("{dir}/{name}.yml");
            let (code, stdout, stderr) = run(&relative);
            assert_eq!(code, Some(2), "{relative} should be invalid:\n{stderr}");
            assert!(stdout.is_empty(), "{relative} printed on stdout: {stdout}");
            assert!(
                !stderr.contains("panicked"),
                "{relative} made builder panic:\n{stderr}"
            );
            let mut settings = insta::Settings::clone_current();
            settings.set_snapshot_path(root().join(dir).join("snapshots"));
            settings.set_prepend_module_to_snapshot(false);
            settings.set_input_file(case);
            settings.set_omit_expression(true);
            Rejected {
                name,
                stderr,
                settings,
            }
        })
        .collect()
}
