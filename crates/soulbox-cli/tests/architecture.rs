//! ARCHITECTURE.md's code map is checked against `cargo metadata`, so the dependency table a
//! new engineer reads first cannot drift from the workspace's `Cargo.toml` files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

/// Each crate's normal (not dev or build) dependencies, from `cargo metadata`.
fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let mut deps = BTreeMap::new();
    for p in meta["packages"].as_array().expect("packages") {
        let names = p["dependencies"]
            .as_array()
            .expect("dependencies")
            .iter()
            .filter(|d| d["kind"].is_null())
            .filter_map(|d| d["name"].as_str().map(str::to_owned))
            .collect();
        deps.insert(p["name"].as_str().expect("name").to_owned(), names);
    }
    deps
}

/// The code map's rows: crate → (workspace crates it uses, key crates), as written.
fn code_map() -> BTreeMap<String, (BTreeSet<String>, BTreeSet<String>)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ARCHITECTURE.md");
    let text = std::fs::read_to_string(&path).expect("read ARCHITECTURE.md");
    let list = |cell: &str| -> BTreeSet<String> {
        cell.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty() && *s != "—")
            .map(str::to_owned)
            .collect()
    };
    text.lines()
        .filter(|l| l.starts_with("| `soulbox-"))
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split(" | ").map(str::trim).collect();
            assert_eq!(cells.len(), 4, "a code map row needs 4 cells: {l}");
            let name = cells[0].trim_matches('`').to_owned();
            let workspace = list(cells[2])
                .into_iter()
                .map(|c| format!("soulbox-{c}"))
                .collect();
            (name, (workspace, list(cells[3])))
        })
        .collect()
}

#[test]
fn code_map_matches_the_workspace() {
    let deps = dependencies();
    let map = code_map();
    let crates: BTreeSet<&String> = deps.keys().collect();
    let rows: BTreeSet<&String> = map.keys().collect();
    assert_eq!(
        rows, crates,
        "ARCHITECTURE.md's code map lists other crates than the workspace"
    );
    let mut drift = Vec::new();
    for (name, (workspace, key)) in &map {
        let actual = &deps[name];
        let actual_ws: BTreeSet<String> = actual
            .iter()
            .filter(|d| d.starts_with("soulbox-"))
            .cloned()
            .collect();
        if &actual_ws != workspace {
            drift.push(format!(
                "{name}: the table says it uses {workspace:?}, Cargo.toml has {actual_ws:?}"
            ));
        }
        for k in key.difference(actual) {
            drift.push(format!("{name}: key crate {k} is not a dependency"));
        }
    }
    assert!(
        drift.is_empty(),
        "ARCHITECTURE.md drifted:\n{}",
        drift.join("\n")
    );
}
