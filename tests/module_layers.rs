//! No module depends on a module that depends on it: the library's top-level modules form
//! layers (the map in `src/lib.rs`). A dependency is any `crate::<module>` in a module's files,
//! code, doc links and comments alike (rustdoc resolves doc links, and a comment that names a
//! module upward is usually a design that points the wrong way). Pure, reads `src/`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// (module, depends on) → where it does first, as `file:line`.
type Edges = BTreeMap<(String, String), String>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs_err::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules `src/lib.rs` declares.
fn modules(src: &Path) -> BTreeSet<String> {
    let lib = fs_err::read_to_string(src.join("lib.rs")).expect("src/lib.rs");
    lib.lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';').to_string())
        .collect()
}

/// Every `crate::name` and `crate::{name, other::…}` on a line: the top-level names.
fn referenced(line: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut names = Vec::new();
    for (at, _) in line.match_indices("crate::") {
        // `builder_crate::` or `mycrate::` are not ours.
        if line[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            continue;
        }
        let rest = &line[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level names of the group: those after `{` or a `,` at depth 0.
            let mut depth = 0;
            let mut start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if c.is_whitespace() => {}
                    _ if start && depth == 0 => {
                        names.push(ident(&group[i..]));
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            names.push(ident(rest));
        }
    }
    names
}

fn edges(src: &Path) -> (BTreeSet<String>, Edges) {
    let modules = modules(src);
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut edges = Edges::new();
    for file in files {
        let rel = file.strip_prefix(src).expect("under src");
        // The crate root lists every module; the binary (`main.rs`, `cli/`) is not the library.
        let Some(first) = rel.components().next() else {
            continue;
        };
        let first = first.as_os_str().to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if !modules.contains(&module) {
            continue;
        }
        let text = fs_err::read_to_string(&file).expect("a source file");
        for (n, line) in text.lines().enumerate() {
            for name in referenced(line) {
                if name != module && modules.contains(&name) {
                    edges
                        .entry((module.clone(), name))
                        .or_insert_with(|| format!("src/{}:{}", rel.display(), n + 1));
                }
            }
        }
    }
    (modules, edges)
}

/// A path of edges from `from` to `to`, if there is one.
fn path(edges: &Edges, from: &str, to: &str) -> Option<Vec<(String, String)>> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![(from.to_string(), Vec::new())];
    while let Some((at, trail)) = stack.pop() {
        if at == to {
            return Some(trail);
        }
        if !seen.insert(at.clone()) {
            continue;
        }
        for (a, b) in edges.keys().filter(|(a, _)| *a == at) {
            let mut next = trail.clone();
            next.push((a.clone(), b.clone()));
            stack.push((b.clone(), next));
        }
    }
    None
}

#[test]
fn no_module_depends_on_a_module_that_depends_on_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (modules, edges) = edges(&src);
    assert!(
        modules.len() > 5,
        "read the modules of src/lib.rs: {modules:?}"
    );
    // Each cycle once, whichever of its edges found it.
    let mut cycles = BTreeMap::new();
    for ((a, b), at) in &edges {
        if let Some(back) = path(&edges, b, a) {
            let mut text = format!("{a} -> {b} ({at})");
            for (x, y) in &back {
                text.push_str(&format!(
                    ", {x} -> {y} ({})",
                    edges[&(x.clone(), y.clone())]
                ));
            }
            let mut key: BTreeSet<_> = back.into_iter().collect();
            key.insert((a.clone(), b.clone()));
            cycles.entry(key).or_insert(text);
        }
    }
    assert!(
        cycles.is_empty(),
        "modules that depend on each other (each edge at its first `crate::` reference; \
         move the shared concept below both):\n  {}",
        cycles.into_values().collect::<Vec<_>>().join("\n  ")
    );
}

#[test]
fn references_are_read_in_paths_groups_and_doc_links() {
    assert_eq!(referenced("use crate::vm::Session;"), ["vm"]);
    assert_eq!(
        referenced("use crate::{undo::{self, Outcome}, store::Store};"),
        ["undo", "store"]
    );
    assert_eq!(referenced("//! ([`crate::machine`]'s agent)"), ["machine"]);
    assert_eq!(
        referenced("mycrate::vm and builder::vm"),
        Vec::<String>::new()
    );
}
