//! The house rules of the library crates, checked on their sources: no two modules of a crate
//! import each other (a module's `crate::` paths, re-exports at the crate root resolved to the
//! module that defines them), and no source file grows past the size a reader takes in at once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The library crates' folders.
const CRATES: &[&str] = &[
    "cqrs-core",
    "cqrs-macros",
    "cqrs-postgres",
    "cqrs-transport",
    "cqrs-kafka",
    "cqrs-rabbitmq",
    "cqrs-nats",
    "cqrs-sqs",
    "cqrs-redis",
    "cqrs-cli",
    "evently",
];

/// The most lines a source file may have.
const MAX_LINES: usize = 650;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or_else(|| panic!("the tests folder has a parent"))
        .to_owned()
}

fn sources(dir: &Path, into: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
        if path.is_dir() {
            sources(&path, into);
        } else if path.extension().is_some_and(|e| e == "rs") {
            into.push(path);
        }
    }
}

/// The code of a file without its unit tests and comments.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The identifiers after each `crate::`, including each name of a `crate::{a, b::c}` group.
fn crate_paths(code: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        // `$crate::` in macros and `evently_core::` (ends in "core::") are not this crate.
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The first name of each item at the group's own level (nested groups skipped).
            let (mut depth, mut item) = (0usize, String::new());
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        names.push(first_name(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 {
                    item.push(c);
                }
            }
            if !item.trim().is_empty() {
                names.push(first_name(&item));
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            names.push(name);
        }
    }
    names
}

/// The first path segment of a `use` item (`store::X` -> `store`).
fn first_name(item: &str) -> String {
    let first = item.trim().split("::").next().unwrap_or_default();
    first
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// The root's re-exports: name -> the module it comes from (`pub use module::{A, B};`).
fn root_exports(root: &str) -> BTreeMap<String, String> {
    let mut exports = BTreeMap::new();
    for statement in root.split(';') {
        let Some(rest) = statement.trim().strip_prefix("pub use ") else {
            continue;
        };
        let Some((module, items)) = rest.split_once("::") else {
            continue;
        };
        let items = items.trim().trim_start_matches('{').trim_end_matches('}');
        for item in items.split(',') {
            let name = item.rsplit(" as ").next().unwrap_or_default();
            let name = name.rsplit("::").next().unwrap_or_default().trim();
            if !name.is_empty() {
                exports.insert(name.to_owned(), module.trim().to_owned());
            }
        }
    }
    exports
}

#[test]
fn no_two_modules_of_a_crate_import_each_other() {
    let mut cycles = Vec::new();
    for krate in CRATES {
        let src = workspace().join(krate).join("src");
        let root = ["lib.rs", "main.rs"]
            .iter()
            .map(|f| src.join(f))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{krate} has no lib.rs or main.rs"));
        let exports = root_exports(&std::fs::read_to_string(&root).unwrap_or_default());
        let mut files = Vec::new();
        sources(&src, &mut files);
        let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in &files {
            let relative = file.strip_prefix(&src).unwrap_or(file);
            let top = relative
                .components()
                .next()
                .map(|c| {
                    c.as_os_str()
                        .to_string_lossy()
                        .trim_end_matches(".rs")
                        .to_owned()
                })
                .unwrap_or_default();
            if top == "lib" || top == "main" {
                continue;
            }
            let text = std::fs::read_to_string(file).unwrap_or_default();
            for name in crate_paths(&code(&text)) {
                let module = exports.get(&name).cloned().unwrap_or(name);
                let is_module =
                    src.join(format!("{module}.rs")).exists() || src.join(&module).is_dir();
                if is_module && module != top {
                    edges.entry(top.clone()).or_default().insert(module);
                }
            }
        }
        for (a, targets) in &edges {
            for b in targets {
                if a < b && edges.get(b).is_some_and(|back| back.contains(a)) {
                    cycles.push(format!("{krate}: {a} <-> {b}"));
                }
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "modules importing each other: {cycles:?}"
    );
}

#[test]
fn no_source_file_is_longer_than_a_reader_takes_in() {
    let mut long = Vec::new();
    for krate in CRATES {
        let mut files = Vec::new();
        sources(&workspace().join(krate).join("src"), &mut files);
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            // Unit tests at the end of a file do not count.
            let lines = text
                .split("#[cfg(test)]")
                .next()
                .unwrap_or_default()
                .lines()
                .count();
            if lines > MAX_LINES {
                long.push(format!("{} ({lines} lines)", file.display()));
            }
        }
    }
    assert!(
        long.is_empty(),
        "split these by what a reader looks for (at most {MAX_LINES} lines): {long:?}"
    );
}

#[test]
fn the_import_scan_sees_groups_and_skips_other_crates() {
    let code = "use crate::{store::StoreError, projection::{Lag, Subscription}};\n\
                use evently_core::x; $crate::y; let a = crate::envelope::StreamId::new();";
    assert_eq!(crate_paths(code), ["store", "projection", "envelope"]);
    let exports =
        root_exports("pub use store::{EventStore, StoreError as Error};\npub use a::b::C;");
    assert_eq!(exports.get("Error").map(String::as_str), Some("store"));
    assert_eq!(exports.get("C").map(String::as_str), Some("a"));
}
