//! The layering of the crate, checked on its sources: the FDO wire format (`src/fdo_wire/`)
//! is a leaf that names no other module of the crate, and the device registry
//! (`src/registry.rs`) stands on the store and the wire format only, never on the FDO
//! services (`src/fdo/`). A `use` that breaks either fails here, naming the file and line.

use std::path::{Path, PathBuf};

/// The modules of the crate that the `crate::` paths and the parent-module paths of `src`
/// name, outside comments, that are not in `allowed`: `(line, module)`. `top` says whether
/// the file's `super` is the crate root (`src/fdo_wire/mod.rs`, a file directly in `src/`),
/// where only the glob import of a test module may name it.
fn escapes(src: &str, allowed: &[&str], top: bool) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    for (n, line) in src.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        for (at, _) in code.match_indices("crate::") {
            if code[..at].ends_with(ident) {
                continue;
            }
            let name: String = code[at + "crate::".len()..]
                .chars()
                .take_while(|c| ident(*c))
                .collect();
            if !allowed.contains(&name.as_str()) {
                out.push((n + 1, format!("crate::{name}")));
            }
        }
        let parent = code.trim_start().trim_start_matches("pub ");
        let glob = parent.starts_with("use super::*;");
        if code.contains("super::super") || (top && code.contains("super::") && !glob) {
            out.push((n + 1, "super::".into()));
        }
    }
    out
}

fn src(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(rel)
}

fn check(path: &Path, allowed: &[&str], top: bool, bad: &mut Vec<String>) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for (line, what) in escapes(&text, allowed, top) {
        bad.push(format!("{}:{line}: {what}", path.display()));
    }
}

#[test]
fn the_fdo_wire_format_is_a_leaf() {
    let dir = src("fdo_wire");
    let mut bad = Vec::new();
    let mut files = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        assert!(
            path.is_file(),
            "{}: the leaf is one flat directory",
            path.display()
        );
        if path.extension().is_some_and(|x| x == "rs") {
            let top = path.file_name().is_some_and(|n| n == "mod.rs");
            check(&path, &["fdo_wire"], top, &mut bad);
            files += 1;
        }
    }
    assert!(files >= 12, "only {files} files in {}", dir.display());
    assert!(
        bad.is_empty(),
        "the FDO wire format leaves its leaf:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_registry_stands_on_the_store_and_the_wire_format_only() {
    let mut bad = Vec::new();
    check(
        &src("registry.rs"),
        &["registry", "store", "fdo_wire"],
        true,
        &mut bad,
    );
    assert!(
        bad.is_empty(),
        "the registry reaches past the store and the wire format:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_check_sees_every_escape() {
    let text = "use crate::store::Store;\nuse crate::fdo_wire::cbor; // crate::ca\n\
                let x = crate::metrics::X; let y = my_crate::Z;\nuse super::super::fdo;\n";
    let want = [(1, "crate::store"), (3, "crate::metrics"), (4, "super::")];
    assert_eq!(
        escapes(text, &["fdo_wire"], false),
        want.map(|(n, s)| (n, s.to_string()))
    );
    assert_eq!(escapes("use super::cbor;", &[], true).len(), 1);
    assert!(escapes("use super::cbor;", &[], false).is_empty());
    assert!(escapes("    use super::*;", &[], true).is_empty());
}
