//! The rule that keeps the rooms of this crate (docs/architecture.md) in
//! one direction: a room may use only the rooms listed for it in [`ALLOWED`].
//! The test reads every source file and finds each `crate::<room>` path in
//! its code (comments aside), also inside grouped `use crate::{…}` lists.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

/// Each room with the rooms it may use. Listed in dependency order: a room
/// uses only rooms listed before it, so the rooms can have no cycle.
const ALLOWED: &[(&str, &[&str])] = &[
    ("model", &[]),
    ("bpf", &["model"]),
    ("host", &["model", "bpf"]),
    ("observe", &["model", "bpf", "host"]),
    ("source", &["model", "observe"]),
    ("reconcile", &["model", "bpf", "observe"]),
    ("agent", &["model", "bpf", "host", "observe", "source", "reconcile"]),
    ("cmd", &["model", "bpf", "host", "observe", "source", "reconcile", "agent"]),
];

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without its `//` comments (doc links are not uses).
fn code_of(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            // `//` inside a string ("http://...") is rare enough here to keep
            // the rest of such a line; a comment after code is dropped.
            Some(at) if !line[..at].contains('"') => &line[..at],
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first path segment after each `crate::` in `code`.
fn crate_uses(code: &str) -> BTreeSet<String> {
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    let mut uses = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items of `crate::{a::x, b::{y, z}, c}`.
            let mut depth = 0;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if c.is_whitespace() => {}
                    _ if item_start && depth == 0 => {
                        uses.insert(ident(&group[i..]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            uses.insert(ident(rest));
        }
    }
    // `crate::*` or `crate::{*}`: a glob names no room, so it is allowed in none.
    if uses.remove("") {
        uses.insert("*".to_owned());
    }
    uses
}

/// Room of a file under src/: its first directory (a top-level file is its
/// own room: lib.rs, rooms.rs, and single-file rooms such as `model.rs`).
fn room_of(relative: &Path) -> String {
    let first = relative.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
    first.strip_suffix(".rs").map(str::to_owned).unwrap_or(first)
}

#[test]
fn rooms_depend_one_way() {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    // The table itself is ordered, so it has no cycle.
    for (index, (room, uses)) in ALLOWED.iter().enumerate() {
        let earlier: Vec<&str> = ALLOWED[..index].iter().map(|(r, _)| *r).collect();
        for used in *uses {
            assert!(earlier.contains(used), "{room} may use {used}, which is not listed before it");
        }
    }
    let mut files = Vec::new();
    rust_files(&src_dir(), &mut files);
    let mut violations = BTreeSet::new();
    for path in &files {
        let relative = path.strip_prefix(src_dir()).unwrap();
        let room = room_of(relative);
        let text = fs::read_to_string(path).unwrap();
        // Ways to reach a module that the path scan below would not see.
        // (This file names them, in strings.)
        let escapes: &[&str] = if room == "rooms" {
            &[]
        } else {
            &["#[path", "include!(", "extern crate self", "use crate as", "crate ::"]
        };
        for escape in escapes {
            assert!(
                !code_of(&text).contains(escape),
                "{}: `{escape}` hides which room is used; write crate::<room> paths",
                relative.display()
            );
        }
        let Some(may_use) = allowed.get(room.as_str()) else {
            // Not a room: the crate root, the binary, this check.
            assert!(
                ["lib", "bin", "rooms"].contains(&room.as_str()),
                "{}: {room} is not a room listed in rooms::ALLOWED",
                relative.display()
            );
            continue;
        };
        assert!(
            !text.contains("super::super"),
            "{}: use crate::<room> paths across rooms",
            relative.display()
        );
        for used in crate_uses(&code_of(&text)) {
            if used != room && !may_use.contains(&used.as_str()) {
                violations.insert((relative.to_string_lossy().into_owned(), used));
            }
        }
    }
    assert!(violations.is_empty(), "uses against the direction of rooms (rooms::ALLOWED): {violations:?}");
}

#[test]
fn finds_grouped_and_inline_uses() {
    let code = "use crate::{\n    bpf::datapath::{A, B},\n    host::state,\n};\nlet x = crate::observe::health::bind();";
    let uses: Vec<String> = crate_uses(code).into_iter().collect();
    assert_eq!(uses, ["bpf", "host", "observe"]);
    assert_eq!(crate_uses("use crate::*;").into_iter().collect::<Vec<_>>(), ["*"]);
    assert_eq!(crate_uses("use crate::{*};").into_iter().collect::<Vec<_>>(), ["*"]);
    assert_eq!(code_of("let a = 1; // crate::bpf\n/// [`crate::host`]"), "let a = 1; \n");
}
