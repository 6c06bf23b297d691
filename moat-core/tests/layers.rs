//! The layers of ARCHITECTURE.md, checked: a module of moat-core uses only
//! the modules listed before it (no import cycles, nothing pointing down).
//! Comments and `mod tests` blocks are not dependencies.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;

/// In order, as ARCHITECTURE.md lists them.
const LAYERS: &[&str] = &[
    "error",
    "secret",
    "paths",
    "process",
    "rt",
    "net", // foundations
    "runtime",
    "ssh", // engines, SSH basics
    "policy",
    "trace",
    "audit",
    "deps",
    "config", // what a run is and records
    "proxy",
    "ssh_agent",
    "routing", // what serves its traffic
    "credential",
    "secrets",
    "agent",    // what it may use
    "run",      // a run
    "blocking", // sync handles
];

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without comments and without its test module.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level names after a path prefix: `a` of `a::b`, or each item of
/// a group (`{a::{b, c}, d}`: a, d).
fn names_after(rest: &str, found: &mut BTreeSet<String>) {
    let ident = |t: &str| -> String {
        t.trim()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    if let Some(group) = rest.strip_prefix('{') {
        let mut depth = 0;
        let mut item = String::new();
        let mut items = Vec::new();
        for c in group.chars() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => items.push(std::mem::take(&mut item)),
                _ if depth == 0 => item.push(c),
                _ => {}
            }
        }
        items.push(item);
        for item in items {
            found.insert(ident(&item));
        }
    } else {
        found.insert(ident(rest));
    }
}

/// The modules a piece of code names through `crate::`, or through as many
/// `super::` as climb from its module (`depth` deep: 1 for `run/mod.rs` and
/// `run.rs`, 2 for `run/start.rs`) to the crate's root.
fn uses(code: &str, depth: usize) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        names_after(rest, &mut found);
    }
    let mut at = 0;
    while let Some(i) = code[at..].find("super::") {
        let start = at + i;
        let before = code[..start].chars().next_back();
        let mut end = start;
        let mut supers = 0;
        while code[end..].starts_with("super::") {
            end += "super::".len();
            supers += 1;
        }
        at = end;
        // Not the middle of a longer name, and up to the root.
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        if supers >= depth {
            names_after(&code[end..], &mut found);
        }
    }
    found
}

/// How deep a file's module is below the crate's root.
fn depth(rel: &Path) -> usize {
    let parts = rel.iter().count();
    if rel.file_name().is_some_and(|n| n == "mod.rs") {
        parts - 1
    } else {
        parts
    }
}

#[test]
fn modules_use_only_the_layers_above_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut seen = BTreeSet::new();
    let mut wrong = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let module = rel
            .iter()
            .next()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if module == "lib" || rel.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let Some(rank) = LAYERS.iter().position(|m| *m == module) else {
            wrong.push(format!(
                "{}: module {module} is not in the layers",
                rel.display()
            ));
            continue;
        };
        seen.insert(module.clone());
        let text = std::fs::read_to_string(file).unwrap();
        for used in uses(&code(&text), depth(rel)) {
            if used == module {
                continue;
            }
            if let Some(other) = LAYERS.iter().position(|m| *m == used) {
                if other > rank {
                    wrong.push(format!(
                        "{}: {module} uses {used}, which comes after it",
                        rel.display()
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // Every layer named is a module (a rename shows here).
    for m in LAYERS {
        assert!(seen.contains(*m), "no module {m}");
    }
}

#[test]
fn the_scan_sees_a_use_that_points_down() {
    let text = "#[cfg(test)]\nmod tests;\nuse crate::run::RunPlan;\n// crate::blocking in a comment\nfn f() { crate::{paths, proxy::{Proxy, x}, secrets}; }\n#[cfg(test)]\nmod tests { use crate::agent; }\n";
    let found = uses(&code(text), 1);
    assert_eq!(
        found,
        ["paths", "proxy", "run", "secrets"]
            .map(String::from)
            .into()
    );
    // Through `super::`: only as many as reach the root name a module of
    // the crate (in `run/supervisor/steps.rs`, three).
    let text = "use super::super::super::blocking::X;\nuse super::super::{lifecycle, meta};\nfn f() { super::super::super::{agent, trace::T}; }\n";
    assert_eq!(
        uses(&code(text), depth(Path::new("run/supervisor/steps.rs"))),
        ["agent", "blocking", "trace"].map(String::from).into()
    );
    assert_eq!(depth(Path::new("run/mod.rs")), 1);
    assert_eq!(depth(Path::new("paths.rs")), 1);
}
