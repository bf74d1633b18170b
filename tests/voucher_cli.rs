//! `outpost voucher`, end to end with the real binary: a manufacturer makes a device
//! (`init-device`), transfers its voucher to a gateway (`owner-cert`, `extend`), the voucher
//! is shown and imported, into a stopped gateway (the store directly) and into a running
//! one (the admin socket). Tampered and foreign vouchers are refused with a reason.

mod common;

use common::roles::{fails, ok};
use common::{Gateway, BIN};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run outpost")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Make a device in `dir`; returns (device dir, manufacturer dir).
fn init_device(dir: &Path, curve: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dev = dir.join(format!("dev-{curve}"));
    let mfg = dir.join("mfg");
    let out = ok(run(&[
        "voucher",
        "init-device",
        "--out",
        s(&dev),
        "--mfg-dir",
        s(&mfg),
        "--device-info",
        "thermo-9000 sn:42",
        "--rv-dns",
        "rv.example",
        "--rv-port",
        "8082",
        "--rv-protocol",
        "https",
        "--curve",
        curve,
    ]));
    assert!(out.contains("voucher extend"), "{out}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dev.join("device.cred"))
        .expect("device.cred")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let key = mfg.join(format!("manufacturer-{curve}.key"));
    assert!(key.exists());
    (dev, mfg)
}

/// Issue 10: `--rv-port` is the device's RVDevPort; the owner's RVOwnerPort defaults to it
/// and `--rv-owner-port` sets it apart, so an owner doing TO0 from the voucher's RVInfo dials
/// the right port instead of falling back to 80/443.
#[test]
fn init_device_writes_the_device_and_the_owner_port() {
    let tmp = tempfile::tempdir().unwrap();
    let mfg = tmp.path().join("mfg");
    let make = |name: &str, extra: &[&str]| {
        let dev = tmp.path().join(name);
        let mut args = vec![
            "voucher",
            "init-device",
            "--out",
            s(&dev),
            "--mfg-dir",
            s(&mfg),
            "--rv-ip",
            "192.0.2.7",
            "--rv-port",
            "8041",
        ];
        args.extend_from_slice(extra);
        ok(run(&args));
        ok(run(&["voucher", "show", s(&dev.join("voucher.pem"))]))
    };
    let same = make("same", &[]);
    assert!(
        same.contains("ip=192.0.2.7 dev-port=8041 owner-port=8041 protocol=http"),
        "{same}"
    );
    let apart = make("apart", &["--rv-owner-port", "9041"]);
    assert!(
        apart.contains("ip=192.0.2.7 dev-port=8041 owner-port=9041 protocol=http"),
        "{apart}"
    );
}

#[test]
fn make_extend_show_and_import_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("gw-data");
    let (dev, mfg) = init_device(tmp.path(), "p256");
    let voucher = dev.join("voucher.pem");

    // Shown and verified, including the HMAC with the device credential.
    let shown = ok(run(&[
        "voucher",
        "show",
        s(&voucher),
        "--cred",
        s(&dev.join("device.cred")),
    ]));
    assert!(
        shown.contains("Device info:      thermo-9000 sn:42"),
        "{shown}"
    );
    assert!(
        shown.contains("dns=rv.example dev-port=8082 owner-port=8082 protocol=https"),
        "{shown}"
    );
    assert!(shown.contains("Entries:          0"), "{shown}");
    assert!(shown.contains("HMAC-SHA256 verified"), "{shown}");

    // The gateway's owner certificate (created once, then the same).
    let cert = ok(run(&["voucher", "owner-cert", "--data-dir", s(&data)]));
    assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"), "{cert}");
    assert_eq!(
        ok(run(&["voucher", "owner-cert", "--data-dir", s(&data)])),
        cert
    );
    let cert_path = tmp.path().join("owner.crt");
    std::fs::write(&cert_path, &cert).unwrap();

    // The manufacturer transfers the voucher to the gateway.
    let extended = tmp.path().join("to-gateway.pem");
    let out = ok(run(&[
        "voucher",
        "extend",
        "--voucher",
        s(&voucher),
        "--key",
        s(&mfg.join("manufacturer-p256.key")),
        "--to",
        s(&cert_path),
        "--out",
        s(&extended),
    ]));
    assert!(out.contains("entry 0 transfers it"), "{out}");
    let shown = ok(run(&["voucher", "show", s(&extended)]));
    assert!(shown.contains("Entries:          1"), "{shown}");
    assert!(shown.contains("Chain:            verified"), "{shown}");
    assert!(shown.contains("not checked"), "{shown}");

    // Only the current owner can extend: the manufacturer cannot any more.
    let again = fails(run(&[
        "voucher",
        "extend",
        "--voucher",
        s(&extended),
        "--key",
        s(&mfg.join("manufacturer-p256.key")),
        "--to",
        s(&cert_path),
        "--out",
        s(&tmp.path().join("nope.pem")),
    ]));
    assert!(
        again.contains("not the voucher's current owner key"),
        "{again}"
    );

    // Import into the stopped gateway (the store directly); again replaces it.
    let imported = ok(run(&[
        "voucher",
        "import",
        s(&extended),
        "--data-dir",
        s(&data),
    ]));
    assert!(imported.contains("imported voucher"), "{imported}");
    assert!(!imported.contains("replacing"), "{imported}");
    let imported = ok(run(&[
        "voucher",
        "import",
        s(&extended),
        "--data-dir",
        s(&data),
    ]));
    assert!(imported.contains("replacing the stored one"), "{imported}");

    // A voucher not extended to this gateway is refused.
    let refused = fails(run(&[
        "voucher",
        "import",
        s(&voucher),
        "--data-dir",
        s(&data),
    ]));
    assert!(
        refused.contains("not one of this gateway's owner keys"),
        "{refused}"
    );

    // A tampered voucher (one byte of the device info flipped) fails `show` and `import`
    // with the reason.
    let v = std::fs::read_to_string(&extended).unwrap();
    let body: String = v.lines().filter(|l| !l.starts_with("-----")).collect();
    let mut der = pem_decode(&body);
    let at = der
        .windows(b"thermo-9000".len())
        .position(|w| w == b"thermo-9000")
        .unwrap();
    der[at] ^= 0x20;
    let tampered = tmp.path().join("tampered.cbor");
    std::fs::write(&tampered, &der).unwrap();
    let shown = fails(run(&["voucher", "show", s(&tampered)]));
    assert!(shown.contains("Chain:            FAILED"), "{shown}");
    assert!(
        shown.contains("OVHeader or OVHeaderHMac was altered"),
        "{shown}"
    );
    let refused = fails(run(&[
        "voucher",
        "import",
        s(&tampered),
        "--data-dir",
        s(&data),
    ]));
    assert!(refused.contains("was altered"), "{refused}");

    // Garbage is a decoding error, not a crash.
    let junk = tmp.path().join("junk");
    std::fs::write(&junk, b"\x85\x18\x65\x42").unwrap();
    let out = fails(run(&["voucher", "show", s(&junk)]));
    assert!(
        out.contains("truncated") || out.contains("malformed"),
        "{out}"
    );
}

/// Base64 decoding for the test (the armour is plain base64).
fn pem_decode(b64: &str) -> Vec<u8> {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut buf, mut bits) = (0u32, 0);
    for c in b64.bytes().filter(|c| *c != b'=') {
        let v = A.iter().position(|a| *a == c).expect("base64") as u32;
        buf = (buf << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
            buf &= (1 << bits) - 1;
        }
    }
    out
}

#[test]
fn import_into_a_running_gateway_over_the_admin_socket() {
    let mut gw = Gateway::start();
    let tmp = tempfile::tempdir().unwrap();
    for curve in ["p256", "p384"] {
        let (dev, mfg) = init_device(tmp.path(), curve);
        // The owner certificate of the matching curve, from the running gateway's data dir.
        let cert = ok(gw.cli(&["voucher", "owner-cert", "--curve", curve]));
        let cert_path = tmp.path().join(format!("owner-{curve}.crt"));
        std::fs::write(&cert_path, &cert).unwrap();
        let extended = tmp.path().join(format!("to-gw-{curve}.pem"));
        ok(run(&[
            "voucher",
            "extend",
            "--voucher",
            s(&dev.join("voucher.pem")),
            "--key",
            s(&mfg.join(format!("manufacturer-{curve}.key"))),
            "--to",
            s(&cert_path),
            "--out",
            s(&extended),
        ]));
        let out = ok(gw.cli(&["voucher", "import", s(&extended)]));
        assert!(out.contains("imported voucher"), "{out}");
    }
    // The running gateway did the import (its log), and a P-256 voucher cannot be extended
    // to the P-384 owner key.
    assert!(
        gw.log().matches("imported ownership voucher").count() == 2,
        "{}",
        gw.log()
    );
    let (dev, mfg) = init_device(tmp.path(), "p256");
    let wrong = fails(run(&[
        "voucher",
        "extend",
        "--voucher",
        s(&dev.join("voucher.pem")),
        "--key",
        s(&mfg.join("manufacturer-p256.key")),
        "--to",
        s(&tmp.path().join("owner-p384.crt")),
        "--out",
        s(&tmp.path().join("x.pem")),
    ]));
    assert!(wrong.contains("manufacturer key's type"), "{wrong}");
    // Refusals come back through the socket with their reason.
    let refused = fails(gw.cli(&["voucher", "import", s(&dev.join("voucher.pem"))]));
    assert!(
        refused.contains("not one of this gateway's owner keys"),
        "{refused}"
    );

    // After a stop, the stored voucher is still there: importing again replaces it.
    gw.signal("TERM");
    assert!(
        gw.wait(Duration::from_secs(10)).is_some(),
        "gateway did not stop"
    );
    let again = ok(gw.cli(&["voucher", "import", s(&tmp.path().join("to-gw-p256.pem"))]));
    assert!(again.contains("replacing the stored one"), "{again}");
}
