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

/// Issue 13: the admin page stands on the credentials service's API (and the model) only:
/// no store, no CA, no broker. `crate::listen` is the crate's shared listener helper.
#[test]
fn the_admin_page_stands_on_the_credentials_api_only() {
    let mut bad = Vec::new();
    let mut files = 0;
    for e in std::fs::read_dir(src("web")).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "rs") {
            check(
                &path,
                &["web", "credentials", "duration", "listen"],
                false,
                &mut bad,
            );
            files += 1;
        }
    }
    assert!(files >= 8, "only {files} files in src/web");
    assert!(bad.is_empty(), "the admin page names:\n{}", bad.join("\n"));
}

/// Every `.rs` file under `src/`, recursively.
fn all_sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            all_sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Issue 11: the sessions capability stands on the store alone (it knows no MQTT connection,
/// no uplink, no front door).
#[test]
fn the_sessions_capability_stands_on_the_store_only() {
    let mut bad = Vec::new();
    for f in ["mod.rs", "owner.rs", "record.rs", "topic.rs"] {
        check(
            &src("sessions").join(f),
            &["store", "duration", "sessions"],
            f == "mod.rs",
            &mut bad,
        );
    }
    assert!(
        bad.is_empty(),
        "the sessions capability names:\n{}",
        bad.join("\n")
    );
}

/// Issue 11: a persistent session gets its QoS 1/2 messages only from its durable queue (the
/// front door drops the core's copies), so every one of the gateway's own publishers into
/// the core (a `broker::local_client`) must queue what it publishes there too
/// (`SessionsHandle::publish_internal` or `publish_internal_durable`), or persistent
/// sessions never see it.
#[test]
fn every_internal_publisher_into_the_core_feeds_the_persistent_sessions() {
    let mut files = Vec::new();
    all_sources(&src(""), &mut files);
    let mut publishers = 0;
    let mut bad = Vec::new();
    for f in files {
        if f.ends_with("broker.rs") {
            continue; // defines local_client
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let code: String = text
            .lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        if code.contains("local_client(") {
            publishers += 1;
            // `publish_internal(` or `publish_internal_durable(`.
            if !code.contains(".publish_internal") {
                bad.push(f.display().to_string());
            }
        }
    }
    assert!(
        publishers >= 2,
        "found {publishers} internal publishers: the check reads the wrong files"
    );
    assert!(
        bad.is_empty(),
        "publish into the core without publish_internal: {bad:?}"
    );
}

/// Issue 12: the CAN frame model and the candump format are a leaf.
#[test]
fn the_can_frame_and_log_format_are_a_leaf() {
    let mut bad = Vec::new();
    for f in [
        "mod.rs",
        "frame.rs",
        "candump.rs",
        "profile.rs",
        "detect.rs",
        "rules.rs",
        "dbc.rs",
        "payload.rs",
        "baseline.rs",
    ] {
        check(&src("can").join(f), &["can"], f == "mod.rs", &mut bad);
    }
    assert!(bad.is_empty(), "src/can/ names:\n{}", bad.join("\n"));
}

/// Issue 13: the credential records, the device and fleet messages and the sealing are
/// leaves; the inventory's stores stand on the records and the store only (no service, no
/// transport), so both stores can be tested and benchmarked on their own.
#[test]
fn the_credential_records_and_messages_are_leaves_and_the_inventory_stands_on_the_store() {
    let mut bad = Vec::new();
    for f in ["model.rs", "msg.rs", "seal.rs"] {
        check(
            &src("credentials").join(f),
            &["credentials"],
            false,
            &mut bad,
        );
    }
    check(
        &src("credentials").join("fleet_msg.rs"),
        &["credentials", "acl"],
        false,
        &mut bad,
    );
    let mut inv = vec![src("credentials").join("inventory.rs")];
    all_sources(&src("credentials").join("inventory"), &mut inv);
    assert!(inv.len() >= 3, "the check reads the wrong files: {inv:?}");
    for f in &inv {
        let text = std::fs::read_to_string(f).unwrap();
        for (line, what) in escapes(&text, &["credentials", "store"], false) {
            if what != "super::" {
                bad.push(format!("{}:{line}: {what}", f.display()));
            }
        }
        for (n, l) in text.lines().enumerate() {
            let code = l.split("//").next().unwrap_or("");
            if code.contains("service") && code.contains("use ") {
                bad.push(format!("{}:{}: names the service", f.display(), n + 1));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "src/credentials/ leaves:\n{}",
        bad.join("\n")
    );
}

/// Issue 14's escalation ladder is a pure state machine: it names no other module of the
/// crate and reads no clock (every event carries its time), so its state-machine tests
/// are the whole truth about it.
#[test]
fn the_authz_ladder_is_pure() {
    let path = src("authz/ladder.rs");
    let mut bad = Vec::new();
    check(&path, &[], false, &mut bad);
    let text = std::fs::read_to_string(&path).unwrap();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        for clock in [
            "Instant",
            "SystemTime",
            "std::time",
            "tokio",
            "std::fs",
            "std::net",
        ] {
            if code.contains(clock) {
                bad.push(format!("{}:{}: {clock}", path.display(), n + 1));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "the ladder is not pure:\n{}",
        bad.join("\n")
    );
}
