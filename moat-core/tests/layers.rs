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

/// The modules a piece of code names through `crate::`.
fn uses(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The group's top-level items (`crate::{a::{b, c}, d}`: a, d).
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
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                found.insert(name);
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            found.insert(name);
        }
    }
    found
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
        for used in uses(&code(&text)) {
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
    let found = uses(&code(text));
    assert_eq!(
        found,
        ["paths", "proxy", "run", "secrets"]
            .map(String::from)
            .into()
    );
}
