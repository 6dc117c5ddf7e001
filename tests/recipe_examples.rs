//! Pure tier: the example recipes in images/ are valid (`builder validate`), every key they
//! use is in the JSON Schema (`builder schema recipe`) so editors accept them, and `builder
//! plan` resolves them the same way every time.
//!
//! The examples read their parent image from `$BUILDER_BASE_IMAGE` (machine recipes) or
//! `$BUILDER_BASE_CONTAINER` (container recipes); here both point at a small raw file, since
//! validating and planning only need a file to hash.

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

const BASE_IMAGE: &str = "tests/cases/recipe/parent.raw";

fn examples() -> Vec<PathBuf> {
    let mut recipes: Vec<PathBuf> = fs_err::read_dir(root().join("images"))
        .expect("images/ exists")
        .map(|e| {
            e.expect("a readable folder entry")
                .path()
                .join("recipe.yml")
        })
        .filter(|p| p.is_file())
        .collect();
    recipes.sort();
    recipes
}

fn builder(args: &[&str], store: &Path) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_builder"))
        .args(args)
        .current_dir(root())
        .env("NO_COLOR", "1")
        .env("BUILDER_BASE_IMAGE", BASE_IMAGE)
        .env("BUILDER_BASE_CONTAINER", BASE_IMAGE)
        .env("BUILDER_STORE", store)
        .output()
        .expect("builder runs")
}

fn relative(path: &Path) -> String {
    path.strip_prefix(root())
        .expect("under the repository")
        .display()
        .to_string()
}

#[test]
fn every_example_recipe_validates() {
    let store = tempfile::tempdir().expect("temp dir");
    let recipes = examples();
    assert!(
        recipes.len() >= 3,
        "expected the example recipes, found {recipes:?}"
    );
    for recipe in &recipes {
        let out = builder(&["validate", &relative(recipe)], store.path());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}:\n{stderr}",
            recipe.display()
        );
        assert!(stderr.starts_with("ok: "), "{stderr}");
        assert!(!stderr.contains("warning"), "{stderr}");
    }
}

/// The schema node `schema` after following `$ref`s into `$defs`.
fn resolve<'a>(schema: &'a Value, root: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let name = reference.trim_start_matches("#/$defs/");
            resolve(&root["$defs"][name], root)
        }
        None => schema,
    }
}

/// The alternatives a value may match: `anyOf`/`oneOf` members, or the schema itself.
fn alternatives<'a>(schema: &'a Value, root: &'a Value) -> Vec<&'a Value> {
    let schema = resolve(schema, root);
    for key in ["anyOf", "oneOf"] {
        if let Some(list) = schema.get(key).and_then(Value::as_array) {
            return list
                .iter()
                .flat_map(|alt| alternatives(alt, root))
                .collect();
        }
    }
    vec![schema]
}

/// Every mapping key in `node` that the schema does not allow at its place, as `a.b.c`.
fn unknown_keys(node: &Value, schema: &Value, root: &Value, at: &str, out: &mut Vec<String>) {
    let alts = alternatives(schema, root);
    match node {
        Value::Object(map) => {
            for (key, value) in map {
                let allowed: Vec<&Value> = alts
                    .iter()
                    .filter_map(|alt| {
                        alt.get("properties")
                            .and_then(|p| p.get(key))
                            .or_else(|| alt.get("additionalProperties").filter(|a| a.is_object()))
                    })
                    .collect();
                let path = format!("{at}.{key}");
                match allowed.first() {
                    Some(sub) => unknown_keys(value, sub, root, &path, out),
                    None => out.push(path),
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = alts.iter().find_map(|alt| alt.get("items")) {
                for (i, item) in items.iter().enumerate() {
                    unknown_keys(item, item_schema, root, &format!("{at}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

/// A YAML node as JSON (scalars as strings: only keys matter here).
fn to_json(node: &builder::yaml::Node) -> Value {
    use builder::yaml::NodeKind;
    match &node.kind {
        NodeKind::Scalar(s) => Value::String(s.value.clone()),
        NodeKind::Sequence(items) => Value::Array(items.iter().map(to_json).collect()),
        NodeKind::Mapping(entries) => Value::Object(
            entries
                .iter()
                .map(|(k, v)| (k.as_str().unwrap_or_default().to_string(), to_json(v)))
                .collect(),
        ),
    }
}

#[test]
fn every_key_in_the_examples_is_in_the_schema() {
    let store = tempfile::tempdir().expect("temp dir");
    let out = builder(&["schema", "recipe"], store.path());
    assert_eq!(out.status.code(), Some(0));
    let schema: Value = serde_json::from_slice(&out.stdout).expect("the schema is JSON");
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );

    // The check itself must be able to fail.
    let mut unknown = Vec::new();
    let wrong = serde_json::json!({"name": "x", "infrastructure": {"cpu": 2}});
    unknown_keys(&wrong, &schema, &schema, "", &mut unknown);
    assert_eq!(unknown, [".infrastructure.cpu"]);

    for recipe in examples() {
        let text = fs_err::read_to_string(&recipe).expect("readable example");
        let (node, problems) = builder::yaml::parse(&text);
        assert!(problems.is_empty(), "{problems:?}");
        let json = to_json(&node.expect("a document"));
        let mut unknown = Vec::new();
        unknown_keys(&json, &schema, &schema, "", &mut unknown);
        assert!(
            unknown.is_empty(),
            "{}: keys the schema lacks: {unknown:?}",
            recipe.display()
        );
    }
}

#[test]
fn plan_is_stable_and_lists_the_stages() {
    let store = tempfile::tempdir().expect("temp dir");
    let recipe = "images/debian-12-web/recipe.yml";
    let first = builder(&["plan", recipe, "--json"], store.path());
    assert_eq!(
        first.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let second = builder(&["plan", recipe, "--json"], store.path());
    assert_eq!(first.stdout, second.stdout, "same inputs, same plan");
    let plan: builder::build::plan::Plan =
        serde_json::from_slice(&first.stdout).expect("the plan JSON reads back");
    assert_eq!(plan.recipe.name, "debian-12-web");
    assert_eq!(plan.components.len(), 2);
    assert_eq!(plan.components[0].parameters["Packages"], "nginx curl");
    // Defaults from the document are filled in.
    assert_eq!(plan.components[0].parameters["UpdateCache"], "true");
    assert_eq!(
        plan.tests.components[0].name.as_deref(),
        Some("nginx-serves")
    );
    let parent = fs_err::read(root().join(BASE_IMAGE)).expect("the base file");
    assert_eq!(
        plan.parent.sha256().as_str(),
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&parent))
    );

    let text = builder(&["plan", recipe], store.path());
    assert_eq!(text.status.code(), Some(0));
    let text = String::from_utf8_lossy(&text.stdout);
    // Named as the build's `--json` events name them.
    let order = [
        "fetch           ",
        "overlay         ",
        "boot            ",
        "component       install-packages",
        "component       configure-nginx",
        "generalize",
        "shutdown",
        "test ",
        "export          qcow2 (zlib), vmdk",
        "store           debian-12-web/1.0.0/",
    ];
    let mut at = 0;
    for stage in order {
        let found = text[at..]
            .find(stage)
            .unwrap_or_else(|| panic!("`{stage}` missing or out of order in:\n{text}"));
        at += found;
    }
    assert!(text.contains(&plan.digest()), "{text}");
}

#[test]
fn a_stored_parent_that_is_not_there_is_an_input_error() {
    let store = tempfile::tempdir().expect("temp dir");
    let out = builder(
        &["plan", "images/debian-12-web-on-base/recipe.yml"],
        store.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no image `debian-12-base/1.x.x` in the store"),
        "{stderr}"
    );
}
