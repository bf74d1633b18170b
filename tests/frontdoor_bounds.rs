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
    let mut gw = Gateway::unstarted(|data_dir| {
        std::fs::create_dir(data_dir).unwrap();
        std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        base_config(data_dir, "")
    });
    let data_dir = gw.data_dir.clone();

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

// ---------------------------------------------------------------------------------------------
// Subscription and retained-message bounds

const SMALL: &str = r#"[frontdoor]
max_filters_per_connection = 4
max_filters_per_device = 6
max_new_filters_per_device = 8
max_core_filters = 10
max_retained_per_device = 2
"#;

fn refused(gw: &Gateway, reason: &str) -> i64 {
    gw.metric(&format!(
        "outpost_subscribe_refused_total{{reason=\"{reason}\"}}"
    ))
}

fn filters(prefix: &str, range: std::ops::RangeInclusive<u32>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

async fn subscribe_all<S: AsyncRead + AsyncWrite + Unpin>(
    r: &mut Raw<S>,
    pid: u16,
    filters: &[String],
) -> Vec<u8> {
    let f: Vec<(&str, u8)> = filters.iter().map(|f| (f.as_str(), 0)).collect();
    r.subscribe(pid, &f).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_are_capped_per_connection_device_and_core() {
    let gw = Gateway::start_with(SMALL);
    let a = gw.issue("dev-a");
    let b = gw.issue("dev-b");
    const NO: u8 = 0x80;

    // Per connection: four of six.
    let mut dev = tls(&gw, &a).await;
    assert_eq!(connect(&mut dev, "dev-a", false).await.1, 0);
    let f = filters("devices/dev-a/f", 1..=6);
    assert_eq!(
        subscribe_all(&mut dev, 1, &f).await,
        vec![0, 0, 0, 0, NO, NO]
    );
    assert_eq!(refused(&gw, "connection"), 2);
    // A refused filter never reached the core: nothing routed on it.
    let mut ops = sec::local(gw.plain(), "ops").await;
    ops.send(&wire::publish("devices/dev-a/f5", b"refused", 0, 0))
        .await;
    ops.send(&wire::publish("devices/dev-a/f1", b"admitted", 0, 0))
        .await;
    let (t, _, p) = dev.next_publish(LIMIT).await.expect("publish on f1");
    assert_eq!(
        (t.as_str(), p.as_slice()),
        ("devices/dev-a/f1", b"admitted".as_slice())
    );
    dev.send(&wire::DISCONNECT).await;
    assert!(dev.closed_within(LIMIT).await);

    // Per device: the persistent session keeps f1..f4, so two more fit, not three.
    let mut dev = tls(&gw, &a).await;
    assert_eq!(connect(&mut dev, "dev-a", false).await, (true, 0));
    let f = filters("devices/dev-a/f", 5..=7);
    assert_eq!(subscribe_all(&mut dev, 2, &f).await, vec![0, 0, NO]);
    assert_eq!(refused(&gw, "device"), 1);
    dev.send(&wire::DISCONNECT).await;
    assert!(dev.closed_within(LIMIT).await);

    // New filters per device: a clean session starts empty, but the core still holds
    // f1..f6 (it frees no filter): two new ones fit, the ninth does not; known ones do.
    let mut dev = tls(&gw, &a).await;
    assert_eq!(connect(&mut dev, "dev-a", true).await.1, 0);
    let mut f = filters("devices/dev-a/f", 7..=9);
    f.push("devices/dev-a/f1".into());
    assert_eq!(subscribe_all(&mut dev, 3, &f).await, vec![0, 0, NO, 0]);
    assert_eq!(refused(&gw, "device_new"), 1);
    assert_eq!(gw.metric("outpost_core_filters"), 8);

    // The core total caps everybody: two more, then nothing new for anyone.
    let mut other = tls(&gw, &b).await;
    assert_eq!(connect(&mut other, "dev-b", true).await.1, 0);
    let f: Vec<String> = ["devices/dev-b/g1", "devices/dev-b/g2", "devices/dev-b/g3"]
        .map(String::from)
        .into();
    assert_eq!(subscribe_all(&mut other, 1, &f).await, vec![0, 0, NO]);
    assert_eq!(refused(&gw, "core"), 1);
    assert_eq!(gw.metric("outpost_core_filters"), 10);
    // UNSUBSCRIBE frees room in the session and the connection, not in the core.
    other
        .send(&wire::packet(0xa2, &{
            let mut b = 7u16.to_be_bytes().to_vec();
            b.extend(wire::string(b"devices/dev-b/g1"));
            b
        }))
        .await;
    let p = other.expect("UNSUBACK").await;
    assert_eq!(p.kind(), 11);
    let f: Vec<String> = ["devices/dev-b/g1", "devices/dev-b/g4"]
        .map(String::from)
        .into();
    assert_eq!(subscribe_all(&mut other, 2, &f).await, vec![0, NO]);
    assert_eq!(refused(&gw, "core"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_are_capped_per_device() {
    let gw = Gateway::start_with(SMALL);
    let b = gw.issue("dev-b");
    let mut dev = sec::device(gw.mqtts(), &b).await;
    let retained = |topic: &str, payload: &[u8], pid: u16| {
        let mut p = wire::publish(topic, payload, 1, pid);
        p[0] |= 1;
        p
    };
    for (i, t) in ["r1", "r2", "r3"].iter().enumerate() {
        let pid = i as u16 + 1;
        dev.send(&retained(&format!("devices/dev-b/{t}"), t.as_bytes(), pid))
            .await;
        dev.expect_exact(PUBACK, &pid.to_be_bytes(), "PUBACK").await;
    }
    assert_eq!(
        gw.metric("outpost_retain_refused_total{reason=\"device\"}"),
        1
    );

    let mut late = sec::local(gw.plain(), "late").await;
    assert_eq!(late.subscribe(1, &[("devices/dev-b/+", 0)]).await, vec![0]);
    dev.send(&wire::publish("devices/dev-b/end", b"sentinel", 1, 9))
        .await;
    dev.expect_exact(PUBACK, &9u16.to_be_bytes(), "PUBACK")
        .await;
    let got = late.sorted_payloads_until(b"sentinel").await;
    assert_eq!(
        got,
        vec![b"r1".to_vec(), b"r2".to_vec()],
        "only two retained"
    );

    // Clearing one (empty payload) makes room again.
    dev.send(&retained("devices/dev-b/r1", b"", 10)).await;
    dev.expect_exact(PUBACK, &10u16.to_be_bytes(), "PUBACK")
        .await;
    dev.send(&retained("devices/dev-b/r3", b"r3-again", 11))
        .await;
    dev.expect_exact(PUBACK, &11u16.to_be_bytes(), "PUBACK")
        .await;
    assert_eq!(
        gw.metric("outpost_retain_refused_total{reason=\"device\"}"),
        1
    );
    let mut later = sec::local(gw.plain(), "later").await;
    assert_eq!(later.subscribe(1, &[("devices/dev-b/+", 0)]).await, vec![0]);
    dev.send(&wire::publish("devices/dev-b/end", b"sentinel", 1, 12))
        .await;
    let got = later.sorted_payloads_until(b"sentinel").await;
    assert_eq!(got, vec![b"r2".to_vec(), b"r3-again".to_vec()]);
}

fn rss_kb(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The reported flood: 25 SUBSCRIBEs of 10,000 filters from one device, default bounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_flood_is_refused_and_does_not_grow_the_core() {
    let gw = Gateway::start();
    let a = gw.issue("dev-a");
    let pid = gw.child.as_ref().unwrap().id();
    let mut dev = sec::device(gw.mqtts(), &a).await;
    assert_eq!(
        dev.subscribe(1, &[("devices/dev-a/warm", 0)]).await,
        vec![0]
    );
    let before = rss_kb(pid);
    let started = std::time::Instant::now();
    let mut admitted = 0;
    for round in 0..25u32 {
        let f = filters(&format!("devices/dev-a/{round}/"), 1..=10_000);
        let codes = subscribe_all(&mut dev, round as u16 + 2, &f).await;
        assert_eq!(codes.len(), 10_000);
        admitted += codes.iter().filter(|c| **c != 0x80).count();
    }
    let took = started.elapsed();
    let after = rss_kb(pid);
    drop(dev);
    println!(
        "flood: 25 x 10,000 filters in {took:?}; admitted {admitted}; RSS {before} kB -> {after} kB"
    );
    // Default bounds: 100 per connection and device, the warm-up filter one of them.
    assert_eq!(admitted, 99);
    assert_eq!(refused(&gw, "connection"), 250_000 - 99);
    assert!(
        after < before + 64 * 1024,
        "RSS grew from {before} kB to {after} kB"
    );
}

// ---------------------------------------------------------------------------------------------
// Log amplification

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_warnings_are_rate_limited_per_connection() {
    let gw = Gateway::start();
    let a = gw.issue("dev-a");
    let mut dev = sec::device(gw.mqtts(), &a).await;
    let f = filters("devices/dev-b/x", 1..=5000);
    let codes = subscribe_all(&mut dev, 1, &f).await;
    assert_eq!(codes, vec![0x80; 5000]);
    assert_eq!(
        gw.metric("outpost_acl_denied_total{op=\"subscribe\"}"),
        5000
    );
    assert_eq!(gw.metric("outpost_log_suppressed_total"), 4990);
    dev.send(&wire::DISCONNECT).await;
    assert!(dev.closed_within(LIMIT).await);
    sec::wait_until(LIMIT, "summary line", || gw.log().contains("suppressed"));
    let log = common::strip_ansi(&gw.log());
    let denied = log
        .lines()
        .filter(|l| l.contains("subscribe denied by ACL"))
        .count();
    assert_eq!(denied, 10, "warning lines for 5,000 denied filters");
    let summary: Vec<&str> = log.lines().filter(|l| l.contains("suppressed=")).collect();
    assert_eq!(summary.len(), 1, "{summary:?}");
    assert!(summary[0].contains("suppressed=4990"), "{summary:?}");
}
