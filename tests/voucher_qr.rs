//! Issue 5's voucher sources and key rotation, with the real binary: a voucher printed as a
//! QR code (`voucher qr`) and imported from the PNG; a voucher extended to the operator's
//! installer key, extended by the gateway to its own owner key on import; owner key
//! rotation on a running gateway (acceptance 5: vouchers naming the old key still onboard,
//! new ones name the new key). Every device onboards (`outpost device --onboard-only`).

mod common;

use common::roles::{extend_to, fails, make_device, ok, s, Agent};
use common::Gateway;
use std::time::Duration;

fn onboard(cred: &std::path::Path, state: &std::path::Path) -> serde_json::Value {
    let mut agent = Agent::start(cred, state, &["--onboard-only"]);
    agent.expect("onboarded", Duration::from_secs(40))
}

#[test]
fn voucher_printed_as_qr_code_imports_and_the_device_onboards() {
    let gw = Gateway::start();
    let fdo = gw.ep.fdo.expect("FDO listener");
    let work = tempfile::tempdir().unwrap();
    let dev = make_device(work.path(), "dev-qr", fdo);
    let owner = ok(gw.cli(&["voucher", "owner-cert"]));
    let v = extend_to(&dev, &owner, "gw");

    // The manufacturer prints the voucher: raw CBOR in byte mode, a small symbol.
    let png = work.path().join("label.png");
    let out = common::roles::run_ok(&["voucher", "qr", "--voucher", s(&v), "--out", s(&png)]);
    assert!(out.contains("QR version"), "{out}");
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
    // `show` reads the label too.
    let shown = common::roles::run_ok(&["voucher", "show", s(&png)]);
    assert!(shown.contains(&dev.guid), "{shown}");
    assert!(shown.contains("Chain:            verified"), "{shown}");

    // Imported from the PNG into the running gateway.
    let imported = ok(gw.cli(&["voucher", "import", s(&png)]));
    assert!(imported.contains(&dev.guid), "{imported}");
    assert!(
        gw.log().contains("imported ownership voucher"),
        "{}",
        gw.log()
    );
    let onboarded = onboard(&dev.cred, &work.path().join("state"));
    assert_eq!(onboarded["old_guid"], dev.guid.as_str());

    // A QR code of something else, a truncated PNG, and a PNG with no code are refused
    // with the reason.
    let other = work.path().join("other.png");
    std::fs::write(
        &other,
        outpost::fdo_wire::qr::data_png(b"WIFI:S:shop-floor;T:WPA;P:hunter2;;", 4).unwrap(),
    )
    .unwrap();
    let e = fails(gw.cli(&["voucher", "import", s(&other)]));
    assert!(e.contains("does not carry an ownership voucher"), "{e}");
    assert!(e.contains("WIFI:S:shop-floor"), "{e}");
    let cut = work.path().join("cut.png");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = fails(gw.cli(&["voucher", "import", s(&cut)]));
    assert!(e.contains("QR code image") && e.contains("PNG"), "{e}");
    let magic_only = work.path().join("magic.png");
    std::fs::write(&magic_only, b"\x89PNG\r\n\x1a\n").unwrap();
    let e = fails(gw.cli(&["voucher", "import", s(&magic_only)]));
    assert!(e.contains("unreadable PNG"), "{e}");
    assert_eq!(gw.log().matches("imported ownership voucher").count(), 1);
}

#[test]
fn voucher_for_the_operators_installer_key_onboards_on_a_gateway_holding_it() {
    let gw = Gateway::start();
    let fdo = gw.ep.fdo.expect("FDO listener");
    let work = tempfile::tempdir().unwrap();

    // The operator makes the installer key on another gateway (stopped: its data dir)
    // and gives the certificate to the seller.
    let other = work.path().join("gw2");
    let key = work.path().join("installer.pem");
    let out = common::roles::run_ok(&[
        "voucher",
        "installer-key",
        "--create",
        "--out",
        s(&key),
        "--data-dir",
        s(&other),
    ]);
    assert!(out.contains("created and installed"), "{out}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let cert = common::roles::run_ok(&["voucher", "installer-cert", "--data-dir", s(&other)]);
    assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"), "{cert}");
    let key_id = out.split_whitespace().nth(2).unwrap().to_string();

    let dev = make_device(work.path(), "dev-inst", fdo);
    let v = extend_to(&dev, &cert, "installer");
    let shown = common::roles::run_ok(&["voucher", "show", s(&v), "--data-dir", s(&other)]);
    assert!(
        shown.contains(&format!(
            "Owner key:        {key_id} (this gateway's current installer key)"
        )),
        "{shown}"
    );

    // This gateway does not hold the key yet: refused, naming it.
    let e = fails(gw.cli(&["voucher", "import", s(&v)]));
    assert!(e.contains(&key_id), "{e}");
    assert!(e.contains("installer-key --import"), "{e}");
    let e = fails(gw.cli(&["voucher", "installer-cert"]));
    assert!(e.contains("no P-256 installer key"), "{e}");

    // Installed, the same voucher imports: extended to this gateway's owner key.
    let out = ok(gw.cli(&["voucher", "installer-key", "--import", s(&key)]));
    assert!(out.contains(&format!("installer key {key_id}")), "{out}");
    let installed = ok(gw.cli(&["voucher", "installer-cert"]));
    assert!(installed.starts_with("-----BEGIN CERTIFICATE-----"));
    let imported = ok(gw.cli(&["voucher", "import", s(&v)]));
    assert!(
        imported.contains(&format!("extended from installer key {key_id}")),
        "{imported}"
    );
    assert!(imported.contains("2 entries"), "{imported}");
    assert!(
        gw.log().contains("voucher named our installer key"),
        "{}",
        gw.log()
    );
    let onboarded = onboard(&dev.cred, &work.path().join("state"));
    assert_eq!(onboarded["old_guid"], dev.guid.as_str());
}

#[test]
fn owner_key_rotation_on_a_running_gateway() {
    let gw = Gateway::start();
    let fdo = gw.ep.fdo.expect("FDO listener");
    let work = tempfile::tempdir().unwrap();
    let old_cert = ok(gw.cli(&["voucher", "owner-cert"]));
    let dev1 = make_device(work.path(), "dev-old", fdo);
    let v1 = extend_to(&dev1, &old_cert, "old");
    let shown = ok(gw.cli(&["voucher", "show", s(&v1)]));
    assert!(
        shown.contains("(this gateway's current owner key)"),
        "{shown}"
    );

    // Rotation while the gateway runs: the old key is retired, not removed.
    let out = ok(gw.cli(&["voucher", "rotate-owner-key"]));
    assert!(out.contains("new owner key"), "{out}");
    assert!(out.contains("retired"), "{out}");
    let new_cert = ok(gw.cli(&["voucher", "owner-cert"]));
    assert_ne!(new_cert, old_cert, "owner-cert prints the new key");
    let dev2 = make_device(work.path(), "dev-new", fdo);
    let v2 = extend_to(&dev2, &new_cert, "new");

    // `show` tells them apart; without a gateway it still works (no role).
    let shown = ok(gw.cli(&["voucher", "show", s(&v1)]));
    assert!(
        shown.contains("(a retired owner key of this gateway)"),
        "{shown}"
    );
    let shown = ok(gw.cli(&["voucher", "show", s(&v2)]));
    assert!(
        shown.contains("(this gateway's current owner key)"),
        "{shown}"
    );
    let plain = common::roles::run_ok(&["voucher", "show", s(&v2)]);
    assert!(plain.contains("Owner key:"), "{plain}");
    assert!(!plain.contains("current owner key"), "{plain}");

    // Both import into the running gateway, and both devices onboard on it.
    for (v, dev) in [(&v1, &dev1), (&v2, &dev2)] {
        let imported = ok(gw.cli(&["voucher", "import", s(v)]));
        assert!(imported.contains(&dev.guid), "{imported}");
    }
    let a = onboard(&dev1.cred, &work.path().join("state-old"));
    assert_eq!(a["old_guid"], dev1.guid.as_str());
    let b = onboard(&dev2.cred, &work.path().join("state-new"));
    assert_eq!(b["old_guid"], dev2.guid.as_str());
    let reg: Vec<serde_json::Value> =
        serde_json::from_str(&ok(gw.cli(&["registry", "--json"]))).expect("registry JSON");
    let key_of = |guid: &str| {
        reg.iter()
            .find(|e| e["old_guid"] == guid)
            .unwrap_or_else(|| panic!("{guid} not in {reg:?}"))["owner_key_id"]
            .clone()
    };
    assert_ne!(key_of(&dev1.guid), key_of(&dev2.guid));
}
