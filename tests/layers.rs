//! The modules stand in layers, and a module uses only modules below it: no
//! cycle, and a reader can take them bottom to top (the picture is in
//! `src/lib.rs`). A new module must be given its place here.

use std::collections::BTreeSet;
use std::path::Path;

/// Every module of the crate and its rank: a module may use only modules of
/// a lower rank. The layers of `src/lib.rs` group the ranks.
const RANKS: &[(&str, u8)] = &[
    // 1. leaves
    ("files", 0),
    ("sys", 0),
    ("threads", 0),
    ("systemd", 0),
    ("amqp_url", 0),
    ("stream", 0),
    ("cli", 0),
    ("twin", 0),
    ("address", 0),
    ("logging", 1),
    ("secret", 2),
    ("budget", 2),
    ("stats", 3),
    // 2. configuration, then the one look at the host
    ("config", 4),
    ("resolve", 5),
    // 3. what goes over a connection
    ("frame", 6),
    ("incoming", 6),
    ("wire", 7),
    ("http", 8),
    // 4. a member's queue and writer, the channels, the relay's handle
    ("peer", 9),
    ("channels", 10),
    ("link", 11),
    // 5. the shared state
    ("server", 12),
    // 6. a connection's threads: an HTTP publish, a member's reader and writer
    ("publish", 13),
    ("client", 14),
    // 7. the process: accept loops, broker thread, daemon, metrics, stopping
    ("listener", 15),
    ("event_loop", 16),
    ("relay", 15),
    ("daemon", 15),
    ("metrics", 16),
    ("shutdown", 16),
    ("signals", 17),
    // 8. wiring
    ("run", 18),
];

fn rank(module: &str) -> Option<u8> {
    RANKS.iter().find(|(m, _)| *m == module).map(|(_, r)| *r)
}

/// The crate modules that `text` names (`use crate::a`, `use crate::{a, b}`,
/// `crate::a::f()`), comments aside.
fn uses(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in text.lines() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let names: Vec<&str> = match rest.strip_prefix('{') {
                Some(list) => list
                    .split('}')
                    .next()
                    .unwrap_or("")
                    .split(',')
                    .map(|n| n.trim().split("::").next().unwrap_or(""))
                    .collect(),
                None => vec![
                    rest.split(|c: char| !c.is_alphanumeric() && c != '_')
                        .next()
                        .unwrap_or(""),
                ],
            };
            found.extend(
                names
                    .into_iter()
                    .filter(|n| !n.is_empty())
                    .map(String::from),
            );
        }
    }
    found
}

#[test]
fn every_module_uses_only_modules_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut wrong = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let module = path.file_stem().unwrap().to_str().unwrap().to_owned();
        if path.extension().is_none_or(|e| e != "rs") || module == "lib" || module == "main" {
            continue;
        }
        let Some(own) = rank(&module) else {
            wrong.push(format!(
                "{module}: not in RANKS (tests/layers.rs): give it its layer"
            ));
            continue;
        };
        for used in uses(&std::fs::read_to_string(&path).unwrap()) {
            match rank(&used) {
                Some(r) if r < own => {}
                Some(r) => wrong.push(format!("{module} ({own}) uses {used} ({r})")),
                None => wrong.push(format!("{module} uses {used}, which has no rank")),
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
}

#[test]
fn the_check_reads_every_form_of_use() {
    let text = "use crate::a::B;\nuse crate::{c, d::E};\n// crate::no\nlet x = crate::f::g();\n";
    let found: Vec<String> = uses(text).into_iter().collect();
    assert_eq!(found, ["a", "c", "d", "f"]);
}
