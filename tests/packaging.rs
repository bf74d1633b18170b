//! Packaging checks: the systemd unit verifies, the example config is the embedded default,
//! and no aws-lc-rs sneaks into the build (we use ring: no cmake, no Go, easy cross builds).

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_outpost");
const INSTALLED_BIN: &str = "/usr/local/bin/outpost";
const HINT: &str = "run the README's test command, scripts/test.sh (it installs what is missing)";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = repo().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Values of `Key=` in the unit (every occurrence, in order).
fn unit_values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    let prefix = format!("{key}=");
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix(prefix.as_str()))
        .collect()
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let unit = read("systemd/outpost.service");
    let exec = unit_values(&unit, "ExecStart");
    assert_eq!(exec.len(), 1, "exactly one ExecStart= expected");
    assert!(
        exec[0].starts_with(INSTALLED_BIN),
        "ExecStart must run {INSTALLED_BIN}: {}",
        exec[0]
    );
    // Point ExecStart at the binary cargo just built: verify checks that it exists.
    let bin = if BIN.contains(char::is_whitespace) {
        format!("\"{BIN}\"")
    } else {
        BIN.to_string()
    };
    let rewritten: String = unit
        .lines()
        .map(|l| match l.strip_prefix("ExecStart=") {
            Some(cmd) => format!("ExecStart={}{}\n", bin, &cmd[INSTALLED_BIN.len()..]),
            None => format!("{l}\n"),
        })
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("outpost.service");
    std::fs::write(&path, rewritten).expect("write unit copy");

    let out = match Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .env("SYSTEMD_LOG_COLOR", "0")
        .env("SYSTEMD_PAGER", "cat")
        .output()
    {
        Ok(o) => o,
        Err(e) => panic!("systemd-analyze is not available ({e}): {HINT}"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let about_unit: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("outpost.service") || l.contains(&*dir.path().to_string_lossy()))
        .collect();
    assert!(
        out.status.success() && about_unit.is_empty(),
        "systemd-analyze verify {} ({}):\n{text}",
        path.display(),
        out.status
    );
}

#[test]
fn systemd_unit_user_comes_from_sysusers_and_stop_timeout_covers_grace() {
    let unit = read("systemd/outpost.service");
    let sysusers = read("systemd/outpost.sysusers");
    let user = unit_values(&unit, "User");
    assert_eq!(user, vec!["outpost"]);
    assert_eq!(unit_values(&unit, "Group"), vec!["outpost"]);
    let created: Vec<&str> = sysusers
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some("u")).then(|| f.next()).flatten()
        })
        .collect();
    assert_eq!(
        created,
        vec!["outpost"],
        "sysusers must create the unit's User="
    );

    // Drain (grace) + mDNS goodbye + store flush (bounded at 5 s) must fit before SIGKILL.
    let stop: Vec<u64> = unit_values(&unit, "TimeoutStopSec")
        .iter()
        .map(|v| v.parse().expect("TimeoutStopSec in plain seconds"))
        .collect();
    let grace = outpost::config::Config::default().shutdown.grace.as_secs();
    assert_eq!(stop.len(), 1);
    assert!(
        stop[0] >= grace + 10,
        "TimeoutStopSec={} < grace {grace} s + 10 s",
        stop[0]
    );
    assert_eq!(unit_values(&unit, "Type"), vec!["notify"]);
    assert_eq!(unit_values(&unit, "WatchdogSec"), vec!["30"]);
}

#[test]
fn example_config_is_the_embedded_default() {
    let text = read("configs/outpost.toml");
    let cfg = outpost::config::Config::from_toml(&text)
        .unwrap_or_else(|e| panic!("configs/outpost.toml does not parse: {e}"));
    assert_eq!(
        cfg,
        outpost::config::Config::default(),
        "configs/outpost.toml drifted from Config::default() (see `outpost print-default-config`)"
    );
    // Every field is present (not just defaulted): the example documents all of them.
    let defaults: toml::Table = toml::from_str(&outpost::config::Config::default_toml()).unwrap();
    let example: toml::Table = toml::from_str(&text).unwrap();
    for (section, fields) in &defaults {
        let fields = fields.as_table().expect("section");
        let got = example
            .get(section)
            .and_then(|s| s.as_table())
            .unwrap_or_else(|| panic!("configs/outpost.toml lacks [{section}]"));
        for key in fields.keys() {
            assert!(
                got.contains_key(key),
                "configs/outpost.toml lacks {section}.{key}"
            );
        }
    }
}

#[test]
fn aws_lc_rs_is_not_in_the_build() {
    // Cargo.lock lists every package of every target platform: if aws-lc is not in it, no
    // build of Outpost (Pi cross-builds included) can link it.
    let lock = std::fs::read_to_string(repo().join("Cargo.lock")).expect("Cargo.lock is committed");
    for name in ["aws-lc-rs", "aws-lc-sys", "aws-lc-fips-sys"] {
        assert!(
            !lock.contains(&format!("name = \"{name}\"")),
            "{name} is in Cargo.lock: keep rustls, rcgen and rumqttc on ring"
        );
    }
    // And the host build graph agrees (`cargo tree` needs no network for the host target).
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(&cargo)
        .args([
            "tree",
            "--offline",
            "--edges",
            "normal,build",
            "-i",
            "aws-lc-rs",
            "--manifest-path",
        ])
        .arg(repo().join("Cargo.toml"))
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", Path::new(&cargo).display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.stdout.is_empty() && stderr.contains("did not match any packages"),
        "cargo tree -i aws-lc-rs: status {}\n{}{stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}
