//! Bounds on what one client can make the gateway hold or do (issue 10, part 4): subscription
//! and retained-message caps, the local clients' own client-id namespace, owner-only modes
//! of the data directory, and rate-limited warnings.
//!
//! Every test runs the real binary (see `common`) with real MQTT clients.

mod common;

use common::security_helpers as sec;
use common::{base_config, Gateway};
use sec::{wire, NoPacket, Raw, LIMIT, PUBACK};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// CONNECT with a chosen clean-session flag (the shared helper always sets it).
fn connect_packet(client_id: &str, clean: bool) -> Vec<u8> {
    let mut body = wire::string(b"MQTT");
    body.push(4);
    body.push(if clean { 0x02 } else { 0x00 });
    body.extend(30u16.to_be_bytes());
    body.extend(wire::string(client_id.as_bytes()));
    wire::packet(0x10, &body)
}

/// CONNECT and return (session present, return code).
async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    r: &mut Raw<S>,
    client_id: &str,
    clean: bool,
) -> (bool, u8) {
    r.send(&connect_packet(client_id, clean)).await;
    let p = r.expect("CONNACK").await;
    assert_eq!(p.kind(), sec::CONNACK, "expected CONNACK, got {p:?}");
    (p.body[0] & 1 == 1, p.body[1])
}

async fn plain(gw: &Gateway) -> Raw<tokio::net::TcpStream> {
    let s = tokio::net::TcpStream::connect(gw.plain())
        .await
        .expect("connect plain");
    Raw { s }
}

async fn tls(gw: &Gateway, c: &common::Creds) -> Raw<sec::Tls> {
    Raw {
        s: sec::tls_connect(gw.mqtts(), c)
            .await
            .expect("TLS handshake"),
    }
}

// ---------------------------------------------------------------------------------------------
// Local clients cannot reach a device's session

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_client_id_never_reaches_a_device_session() {
    let gw = Gateway::start();
    let alice = gw.issue("alice");
    let bob = gw.issue("bob");

    // bob: a persistent session with a command subscription, then away.
    let mut dev = tls(&gw, &bob).await;
    assert_eq!(connect(&mut dev, "bob", false).await.1, 0);
    assert_eq!(
        dev.subscribe(1, &[("devices/bob/commands/#", 1)]).await,
        vec![1]
    );
    dev.send(&wire::DISCONNECT).await;
    assert!(dev.closed_within(LIMIT).await);

    // A command for bob is queued in his session.
    let mut ops = sec::local(gw.plain(), "ops").await;
    ops.send(&wire::publish(
        "devices/bob/commands/reboot",
        b"cmd-1",
        1,
        1,
    ))
    .await;
    ops.expect_exact(PUBACK, &1u16.to_be_bytes(), "PUBACK")
        .await;

    // A local process calling itself bob gets a fresh session of its own, not bob's.
    let mut fake = plain(&gw).await;
    let (present, code) = connect(&mut fake, "bob", false).await;
    assert_eq!(
        (present, code),
        (false, 0),
        "local `bob` must not see bob's session"
    );
    assert_eq!(
        fake.next_publish(Duration::from_secs(2)).await,
        None,
        "local `bob` received bob's queued command"
    );

    // A device session is not taken over by a local client of the same name.
    let mut a = tls(&gw, &alice).await;
    assert_eq!(connect(&mut a, "alice", true).await.1, 0);
    let mut fake_alice = plain(&gw).await;
    assert_eq!(connect(&mut fake_alice, "alice", true).await.1, 0);
    assert_eq!(
        a.next(Duration::from_secs(2)).await,
        Err(NoPacket::Timeout),
        "alice's TLS session was cut by local `alice`"
    );
    assert_eq!(
        gw.metric("outpost_forced_disconnects_total{reason=\"taken_over\"}"),
        0
    );
    // ... and still works.
    assert_eq!(a.subscribe(2, &[("devices/alice/x", 0)]).await, vec![0]);

    // The real bob still finds his command.
    let mut dev = tls(&gw, &bob).await;
    let (present, code) = connect(&mut dev, "bob", false).await;
    assert_eq!((present, code), (true, 0));
    let (topic, _, payload) = dev.next_publish(LIMIT).await.expect("bob's queued command");
    assert_eq!(
        (topic.as_str(), payload.as_slice()),
        ("devices/bob/commands/reboot", b"cmd-1".as_slice())
    );
}

// ---------------------------------------------------------------------------------------------
// Data directory modes

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

/// Every directory 0700 and every file 0600 below `dir` (the directory itself included).
fn loose_entries(dir: &Path) -> Vec<String> {
    let mut bad = Vec::new();
    if mode(dir) != 0o700 {
        bad.push(format!("{} {:o}", dir.display(), mode(dir)));
    }
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let t = std::fs::symlink_metadata(&p).unwrap().file_type();
        if t.is_dir() {
            bad.extend(loose_entries(&p));
        } else if t.is_file() && mode(&p) != 0o600 {
            bad.push(format!("{} {:o}", p.display(), mode(&p)));
        }
    }
    bad
}

fn chmod_tree(dir: &Path, d: u32, f: u32) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(d)).unwrap();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            chmod_tree(&p, d, f);
        } else {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(f)).unwrap();
        }
    }
}

/// Start the gateway under `umask 000` and wait until it is ready.
fn spawn_umask_000(gw: &mut Gateway) {
    let _ = std::fs::remove_file(gw.data_dir.join(outpost::ENDPOINTS_FILE));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(gw.dir.path().join("gateway.log"))
        .unwrap();
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg("umask 000; exec \"$0\" run --config \"$1\"")
        .arg(common::BIN)
        .arg(&gw.config_path)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let pid = child.id();
    gw.child = Some(child);
    sec::wait_until(LIMIT, "gateway ready", || {
        outpost::Endpoints::read(&gw.data_dir).is_some_and(|ep| ep.pid == pid)
    });
}

#[test]
fn an_existing_loose_data_dir_is_tightened_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    std::fs::create_dir(&data_dir).unwrap();
    std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config_path = dir.path().join("outpost.toml");
    std::fs::write(&config_path, base_config(&data_dir, "")).unwrap();
    let mut gw = Gateway {
        dir,
        data_dir: data_dir.clone(),
        config_path,
        child: None,
        ep: outpost::Endpoints {
            gateway_id: String::new(),
            mqtts: "127.0.0.1:1".parse().unwrap(),
            plain: None,
            metrics: None,
            fdo: None,
            pid: 0,
        },
    };

    spawn_umask_000(&mut gw);
    let store = data_dir.join("store");
    assert_eq!(mode(&data_dir), 0o700, "data dir");
    assert_eq!(
        loose_entries(&store),
        Vec::<String>::new(),
        "store after first start"
    );
    assert_eq!(mode(&data_dir.join("ca.key")), 0o600);

    // A store left world-writable (an older version, a restored backup) is tightened too.
    gw.signal("TERM");
    assert!(gw.wait(LIMIT).is_some(), "gateway did not stop");
    chmod_tree(&store, 0o777, 0o666);
    std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    spawn_umask_000(&mut gw);
    assert_eq!(mode(&data_dir), 0o700, "data dir after restart");
    assert_eq!(
        loose_entries(&store),
        Vec::<String>::new(),
        "store after restart"
    );
}
