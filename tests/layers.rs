//! The folders of `src/` are the layers, and a module uses only the
//! modules of the folders below its own, and those of its own folder ranked
//! below it: no cycle, and a reader can take them bottom to top (the picture
//! is in `src/lib.rs`). A new module or folder must be given its place here.

use std::collections::BTreeSet;
use std::path::Path;

/// The folders of `src/`, bottom to top: a module may use any module of a
/// folder before its own. `run.rs`, at the top of `src/`, wires them all.
const FOLDERS: &[&str] = &["os", "memory", "config", "proto", "hub", "conn", "process"];

/// Every module, as `folder/module` (`mod` is the folder's `mod.rs`), and
/// its rank within its folder: it may use the modules of its folder of a
/// lower rank.
const RANKS: &[(&str, u8)] = &[
    ("os/mod", 0),
    ("os/files", 0),
    ("os/sys", 0),
    ("os/stream", 0),
    ("os/systemd", 0),
    ("os/threads", 0),
    ("os/logging", 1),
    ("memory/mod", 0),
    ("memory/budget", 0),
    ("memory/stats", 1),
    ("config/cli", 0),
    ("config/address", 0),
    ("config/percent", 0),
    ("config/amqp_url", 1),
    ("config/mod", 2),
    ("config/resolve", 3),
    ("proto/mod", 0),
    ("proto/twin", 0),
    ("proto/frame", 0),
    ("proto/incoming", 0),
    ("proto/query", 0),
    ("proto/wire", 1),
    ("proto/http", 2),
    ("hub/mod", 0),
    ("hub/peer", 0),
    ("hub/channels", 1),
    ("hub/link", 2),
    ("conn/mod", 0),
    ("conn/server", 0),
    ("conn/http", 3),
    ("conn/client", 2),
    ("process/mod", 0),
    ("process/secret", 0),
    ("process/listener", 1),
    ("process/relay", 1),
    ("process/detach", 1),
    ("process/event_loop", 2),
    ("process/metrics", 2),
    ("process/shutdown", 2),
    ("process/signals", 3),
];

/// Where a module stands: its folder's place (the top of `src/` above them
/// all) and its rank in its folder.
fn place(module: &str) -> Option<(usize, u8)> {
    if module == "run" {
        return Some((FOLDERS.len(), 0));
    }
    let folder = module.split('/').next()?;
    let at = FOLDERS.iter().position(|f| *f == folder)?;
    let rank = RANKS.iter().find(|(m, _)| *m == module)?.1;
    Some((at, rank))
}

/// The module a path after `crate::` names: `folder/module`, the folder's
/// own `folder/mod` for an item of its `mod.rs`, or a module of the top.
fn module_of(path: &str) -> String {
    let mut parts = path.split("::").map(str::trim);
    let first = parts.next().unwrap_or("");
    if !FOLDERS.contains(&first) {
        return first.to_owned();
    }
    let inner = format!("{first}/{}", parts.next().unwrap_or(""));
    if RANKS.iter().any(|(m, _)| *m == inner) {
        inner
    } else {
        format!("{first}/mod")
    }
}

/// The crate modules that `text` names (`use crate::a::b`, `use crate::{a,
/// b::c}`, `crate::a::f()`), comments aside.
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
            let paths: Vec<&str> = match rest.strip_prefix('{') {
                Some(list) => list.split('}').next().unwrap_or("").split(',').collect(),
                None => vec![
                    rest.split(|c: char| !c.is_alphanumeric() && c != '_' && c != ':')
                        .next()
                        .unwrap_or(""),
                ],
            };
            found.extend(
                paths
                    .into_iter()
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(module_of),
            );
        }
    }
    found
}

/// Every `.rs` file under `dir` but `lib.rs` and `main.rs`, with its module
/// name (`folder/module`, or the file's stem at the top).
/// Every module file under `dir` with its module's name: `folder/module` in
/// a layer's folder; a file in a module's own folder (`hub/peer/queue.rs`)
/// is a part of that module (`hub/peer`) and ranks with it.
fn modules(dir: &Path, folder: Option<&str>, out: &mut Vec<(String, std::path::PathBuf)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_str().unwrap().to_owned();
        let name = match folder {
            Some(folder) if folder.contains('/') => folder.to_owned(),
            Some(folder) => format!("{folder}/{stem}"),
            None => stem.clone(),
        };
        if path.is_dir() {
            modules(&path, Some(&name), out);
        } else if path.extension().is_some_and(|e| e == "rs") && name != "lib" && name != "main" {
            out.push((name, path));
        }
    }
}

#[test]
fn every_module_uses_only_modules_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    modules(&src, None, &mut all);
    let mut wrong = Vec::new();
    for (module, path) in all {
        let Some(own) = place(&module) else {
            wrong.push(format!(
                "{module}: not in FOLDERS and RANKS (tests/layers.rs): give it its place"
            ));
            continue;
        };
        for used in uses(&std::fs::read_to_string(&path).unwrap()) {
            if used == module {
                continue;
            }
            match place(&used) {
                // A lower folder, or a lower rank in the same folder.
                Some(p) if p.0 < own.0 || (p.0 == own.0 && p.1 < own.1) => {}
                Some(p) => wrong.push(format!("{module} {own:?} uses {used} {p:?}")),
                None => wrong.push(format!("{module} uses {used}, which has no place")),
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
}

#[test]
fn the_check_reads_every_form_of_use() {
    let text = "use crate::os::files::open;\nuse crate::{proto::http, hub::peer::Peer};\n\
                // crate::no\nlet x = crate::config::Settings::default();\n\
                crate::run::run();\n";
    let found: Vec<String> = uses(text).into_iter().collect();
    assert_eq!(
        found,
        ["config/mod", "hub/peer", "os/files", "proto/http", "run"]
    );
}
