//! The crate's layering, checked on the source text (issue 12): every `crate::<module>`
//! path in `src/` must point to a module of a lower layer (or to the file's own module),
//! so the top-level module graph has no cycles and a newcomer can read the crate from the
//! bottom up. Within a module folder, the files must not import each other in a circle
//! either (a parent's `mod` declarations and `pub use` re-exports do not count: they are
//! the folder's table of contents, not a use).
//!
//! The layers, lowest first, are [`LAYERS`]; `src/lib.rs` documents the same table.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules by layer. A module may use modules of strictly lower layers only.
const LAYERS: &[&[&str]] = &[
    &["util"],
    &["kernels"],
    &["models", "data"],
    &["hub", "store", "sae"],
    &["eval", "train"],
    &["capture", "jsae", "synthetic"],
    &["config"],
    &["pipeline"],
    &["tools"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("src/ is readable")
        .map(|e| e.expect("readable entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The source without comments (doc links may name any module) and string literals.
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut in_str = false;
        let mut prev = ' ';
        let mut kept = String::new();
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if !in_str && c == '/' && chars.get(i + 1) == Some(&'/') {
                break;
            }
            if c == '"' && prev != '\\' {
                in_str = !in_str;
            } else if !in_str {
                kept.push(c);
            }
            prev = c;
            i += 1;
        }
        out.push_str(&kept);
        out.push('\n');
    }
    out
}

/// Module path of a file relative to `src/`: `sae/topk.rs` → `["sae", "topk"]`,
/// `sae/mod.rs` → `["sae"]`.
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|s| s.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// Every `crate::a::b::…` path in `code` (the identifiers after `crate::`, up to the
/// first non-path token), plus `super::x` resolved against `module`.
fn referenced_paths(code: &str, module: &[String], is_mod_rs: bool) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes: Vec<char> = code.chars().collect();
    let ident = |i: &mut usize| {
        let mut s = String::new();
        while *i < bytes.len() && (bytes[*i].is_alphanumeric() || bytes[*i] == '_') {
            s.push(bytes[*i]);
            *i += 1;
        }
        s
    };
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !(bytes[i - 1].is_alphanumeric() || bytes[i - 1] == '_');
        let rest: String = bytes[i..bytes.len().min(i + 7)].iter().collect();
        let (base, skip) = if starts_word && rest.starts_with("crate::") {
            (Vec::new(), 7)
        } else if starts_word && rest.starts_with("super::") {
            // `super` of `a/b.rs` is `a`; of `a/mod.rs` (module `a`) it is the crate root.
            let mut m = module.to_vec();
            if !is_mod_rs || !m.is_empty() {
                m.pop();
            }
            (m, 7)
        } else {
            i += 1;
            continue;
        };
        i += skip;
        let mut path = base;
        loop {
            let id = ident(&mut i);
            if id.is_empty() {
                break;
            }
            path.push(id);
            if bytes.get(i) == Some(&':') && bytes.get(i + 1) == Some(&':') {
                i += 2;
            } else {
                break;
            }
        }
        out.push(path);
    }
    out
}

struct Crate {
    /// File (relative to `src/`) → its module path.
    files: BTreeMap<PathBuf, Vec<String>>,
    /// File → module paths it references.
    refs: BTreeMap<PathBuf, Vec<Vec<String>>>,
}

fn read_crate() -> Crate {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    rs_files(&src, &mut paths);
    let mut files = BTreeMap::new();
    let mut refs = BTreeMap::new();
    for p in paths {
        let rel = p.strip_prefix(&src).expect("under src").to_path_buf();
        let text = std::fs::read_to_string(&p).expect("readable source");
        let module = module_path(&rel);
        let is_mod_rs = rel.file_name().is_some_and(|f| f == "mod.rs");
        let code = code_only(&text);
        let r = referenced_paths(&code, &module, is_mod_rs);
        files.insert(rel.clone(), module);
        refs.insert(rel, r);
    }
    Crate { files, refs }
}

#[test]
fn no_module_imports_a_higher_layer() {
    let c = read_crate();
    let mut bad = Vec::new();
    for (file, module) in &c.files {
        let Some(top) = module.first() else { continue };
        if top == "main" || top == "cli" || top == "lib" {
            continue;
        }
        let Some(mine) = layer_of(top) else {
            bad.push(format!(
                "{}: top-level module `{top}` is in no layer of tests/it/layers.rs",
                file.display()
            ));
            continue;
        };
        for path in &c.refs[file] {
            let Some(target) = path.first() else { continue };
            if target == top {
                continue;
            }
            match layer_of(target) {
                Some(l) if l < mine => {}
                Some(l) => bad.push(format!(
                    "{}: uses crate::{} (layer {l}) from `{top}` (layer {mine})",
                    file.display(),
                    path.join("::")
                )),
                None => {}
            }
        }
    }
    assert!(
        bad.is_empty(),
        "upward or sideways imports:\n{}",
        bad.join("\n")
    );
}

#[test]
fn every_top_level_module_has_a_layer() {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs"))
        .expect("src/lib.rs");
    let declared: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';'))
        .collect();
    assert!(declared.len() > 5, "{declared:?}");
    for m in declared {
        assert!(
            layer_of(m).is_some(),
            "src/lib.rs declares `{m}`, which no layer lists"
        );
    }
}

/// Resolve a referenced path to the file that defines it: the longest prefix that is a
/// file's module path.
fn resolve<'a>(
    by_module: &'a BTreeMap<Vec<String>, PathBuf>,
    path: &[String],
) -> Option<&'a PathBuf> {
    (1..=path.len())
        .rev()
        .find_map(|n| by_module.get(&path[..n].to_vec()))
}

#[test]
fn files_within_a_module_import_each_other_without_cycles() {
    let c = read_crate();
    let by_module: BTreeMap<Vec<String>, PathBuf> = c
        .files
        .iter()
        .map(|(f, m)| (m.clone(), f.clone()))
        .collect();
    // File-level edges, inside one top-level module only (across modules the layers rule).
    let mut edges: BTreeMap<&PathBuf, BTreeSet<&PathBuf>> = BTreeMap::new();
    for (file, module) in &c.files {
        let is_mod_rs = file.file_name().is_some_and(|f| f == "mod.rs");
        let text =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(file))
                .expect("readable");
        // A parent's `pub use child::…` and `mod child;` are its table of contents.
        let code: String = code_only(&text)
            .lines()
            .filter(|l| {
                let t = l.trim_start();
                !(is_mod_rs
                    && (t.starts_with("pub use ")
                        || t.starts_with("pub mod ")
                        || t.starts_with("mod ")
                        || t.starts_with("pub(crate) mod ")))
            })
            .collect::<Vec<_>>()
            .join("\n");
        for path in referenced_paths(&code, module, is_mod_rs) {
            if path.first() != module.first() {
                continue;
            }
            if let Some(target) = resolve(&by_module, &path) {
                if target != file {
                    edges.entry(file).or_default().insert(target);
                }
            }
        }
    }
    // Depth-first search for a back edge.
    fn visit<'a>(
        n: &'a PathBuf,
        edges: &BTreeMap<&'a PathBuf, BTreeSet<&'a PathBuf>>,
        state: &mut BTreeMap<&'a PathBuf, u8>,
        stack: &mut Vec<&'a PathBuf>,
    ) -> Option<Vec<String>> {
        state.insert(n, 1);
        stack.push(n);
        for &m in edges.get(n).into_iter().flatten() {
            match state.get(m) {
                Some(1) => {
                    let i = stack.iter().position(|s| *s == m).unwrap_or(0);
                    let mut cyc: Vec<String> =
                        stack[i..].iter().map(|p| p.display().to_string()).collect();
                    cyc.push(m.display().to_string());
                    return Some(cyc);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(m, edges, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(n, 2);
        None
    }
    let mut state = BTreeMap::new();
    let nodes: Vec<&PathBuf> = edges.keys().copied().collect();
    for n in nodes {
        if !state.contains_key(n) {
            let mut stack = Vec::new();
            if let Some(cyc) = visit(n, &edges, &mut state, &mut stack) {
                panic!("import cycle between files: {}", cyc.join(" -> "));
            }
        }
    }
}

#[test]
fn the_checker_sees_an_upward_import() {
    // The parser itself: a `crate::` path in code counts, one in a comment or string does not.
    let code = code_only(
        "use crate::pipeline::train;\n// crate::tools::x\nlet s = \"crate::cli\";\nsuper::topk::W;\n",
    );
    let module = vec!["sae".to_string(), "gated".to_string()];
    let refs = referenced_paths(&code, &module, false);
    assert_eq!(
        refs,
        vec![
            vec!["pipeline".to_string(), "train".to_string()],
            vec!["sae".to_string(), "topk".to_string(), "W".to_string()],
        ]
    );
}
