//! What the local broker holds for clients survives restarts (issue 11), tried as a user
//! would with the stock mosquitto clients on the plain listener: retained messages, a
//! persistent session's subscriptions and the QoS 1/2 messages queued for it while it is
//! away, after SIGTERM and after SIGKILL; session-present answered truthfully; the limits.
mod common;

use common::{expect_packet, wire, Gateway};
use std::process::{Command, Output};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// A mosquitto tool pointed at the gateway's plain listener.
fn tool(gw: &Gateway, tool: &str, args: &[&str]) -> Command {
    let mut c = Command::new(tool);
    c.args(["-h", "127.0.0.1", "-p", &gw.plain().port().to_string()])
        .args(args);
    c
}

fn run(gw: &Gateway, name: &str, args: &[&str]) -> Output {
    tool(gw, name, args).output().expect(name)
}

/// A mosquitto_sub left running, its output captured.
fn spawn_sub(gw: &Gateway, args: &[&str]) -> std::process::Child {
    tool(gw, "mosquitto_sub", args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_sub")
}

fn lines_of(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn publish(gw: &Gateway, args: &[&str]) {
    let out = run(gw, "mosquitto_pub", args);
    assert!(
        out.status.success(),
        "mosquitto_pub {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// mosquitto_sub: the lines it printed (it exits after `-C` messages or `-W` seconds).
fn subscribe(gw: &Gateway, args: &[&str]) -> Vec<String> {
    lines_of(&run(gw, "mosquitto_sub", args))
}

/// Stop the gateway with `sig` and start it again on the same data directory.
fn restart(gw: &mut Gateway, sig: &str) {
    gw.signal(sig);
    let st = gw
        .wait(Duration::from_secs(15))
        .expect("gateway did not exit");
    if sig == "TERM" {
        assert!(st.success(), "SIGTERM exit {st}: {}", gw.log());
    }
    gw.spawn();
}

/// The persistent session `id` resumes (subscribed to nothing it had) and gets nothing for
/// 2 s: everything queued was delivered and acknowledged before.
fn nothing_more(gw: &Gateway, id: &str, what: &str) {
    let other = format!("other/{id}");
    let got = subscribe(gw, &["-c", "-i", id, "-q", "2", "-t", &other, "-W", "2"]);
    assert!(got.is_empty(), "{what}: {got:?}");
}

/// A persistent session exists: mosquitto_sub -c subscribes and leaves at once.
fn open_session(gw: &Gateway, id: &str, filter: &str, qos: &str) {
    // -E: exit once the subscription is acknowledged.
    let out = run(
        gw,
        "mosquitto_sub",
        &["-c", "-i", id, "-q", qos, "-t", filter, "-E"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn retained_message_survives_sigterm_and_sigkill_and_an_empty_one_clears_it() {
    common::require_mosquitto();
    let mut gw = Gateway::start();
    publish(
        &gw,
        &["-i", "pa", "-t", "state/pa", "-m", "on", "-r", "-q", "1"],
    );
    restart(&mut gw, "TERM");
    let got = subscribe(
        &gw,
        &["-t", "state/pa", "-C", "1", "-W", "5", "-F", "%r %t %p"],
    );
    assert_eq!(got, ["1 state/pa on"], "after SIGTERM\n{}", gw.log());

    publish(
        &gw,
        &["-i", "pa", "-t", "state/pa", "-m", "off", "-r", "-q", "1"],
    );
    publish(
        &gw,
        &["-i", "pa", "-t", "state/pb", "-m", "zero", "-r", "-q", "0"],
    );
    // QoS 0 has no acknowledgement to wait for: wait until it is stored (the gauge is
    // updated after the flush) -- state/pa, state/pb and the uplink's state topic.
    common::wait_metric(
        &gw,
        "outpost_retained_messages",
        Duration::from_secs(5),
        |v| v == 3,
    );
    restart(&mut gw, "KILL");
    let got = subscribe(
        &gw,
        &["-t", "state/+", "-C", "2", "-W", "5", "-F", "%r %t %p"],
    );
    let mut got = got;
    got.sort();
    assert_eq!(
        got,
        ["1 state/pa off", "1 state/pb zero"],
        "after SIGKILL\n{}",
        gw.log()
    );
    // Those two and the uplink's own state topic.
    assert_eq!(gw.metric("outpost_retained_restored_total"), 3);

    // An empty retained publish clears it, durably too.
    publish(&gw, &["-i", "pa", "-t", "state/pa", "-n", "-r", "-q", "1"]);
    restart(&mut gw, "KILL");
    let got = subscribe(
        &gw,
        &["-t", "state/+", "-C", "2", "-W", "2", "-F", "%r %t %p"],
    );
    assert_eq!(got, ["1 state/pb zero"], "{}", gw.log());
}

#[test]
fn queued_qos1_command_reaches_the_persistent_session_after_sigterm_and_after_sigkill() {
    common::require_mosquitto();
    let mut gw = Gateway::start();
    open_session(&gw, "pa", "cmd/pa", "1");
    for (sig, body) in [("TERM", "first"), ("KILL", "second")] {
        // The device is away; a local process sends it a command and gets its PUBACK.
        publish(&gw, &["-i", "ctl", "-t", "cmd/pa", "-m", body, "-q", "1"]);
        restart(&mut gw, sig);
        // It comes back with the same session, subscribed to something else only: the
        // command arrives through the subscription its session kept.
        let got = subscribe(
            &gw,
            &[
                "-c", "-i", "pa", "-q", "1", "-t", "other/pa", "-C", "1", "-W", "8", "-F", "%t %p",
            ],
        );
        assert_eq!(
            got,
            [format!("cmd/pa {body}")],
            "after SIG{sig}\n{}",
            gw.log()
        );
    }
    // Delivered and acknowledged: not again.
    nothing_more(&gw, "pa", "delivered again");
}

#[test]
fn queued_qos2_commands_arrive_exactly_once_across_sigkill() {
    common::require_mosquitto();
    let mut gw = Gateway::start();
    open_session(&gw, "pb", "cmd/pb", "2");
    for i in 0..5 {
        publish(
            &gw,
            &[
                "-i",
                "ctl",
                "-t",
                "cmd/pb",
                "-m",
                &format!("m{i}"),
                "-q",
                "2",
            ],
        );
    }
    restart(&mut gw, "KILL");
    let got = subscribe(
        &gw,
        &[
            "-c", "-i", "pb", "-q", "2", "-t", "cmd/pb", "-C", "5", "-W", "8", "-F", "%q %p",
        ],
    );
    assert_eq!(
        got,
        ["2 m0", "2 m1", "2 m2", "2 m3", "2 m4"],
        "{}",
        gw.log()
    );
    // Every one completed its PUBREC/PUBREL/PUBCOMP: a crash now delivers nothing again.
    std::thread::sleep(Duration::from_millis(300));
    restart(&mut gw, "KILL");
    nothing_more(&gw, "pb", "delivered again after a crash");
}

/// CONNECT with CleanSession 0 (raw, to read the CONNACK's session-present flag).
fn connect_persistent(id: &str, clean: bool) -> Vec<u8> {
    let mut body = wire::string(b"MQTT");
    body.push(4);
    body.push(if clean { 0x02 } else { 0x00 });
    body.extend(30u16.to_be_bytes());
    body.extend(wire::string(id.as_bytes()));
    wire::packet(0x10, &body)
}

async fn connack(addr: std::net::SocketAddr, id: &str, clean: bool) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&connect_persistent(id, clean)).await.unwrap();
    let p = expect_packet(&mut s, Duration::from_secs(5), "CONNACK").await;
    assert_eq!(p.kind(), 2, "{p:?}");
    let _ = s.write_all(&wire::DISCONNECT).await;
    p.body
}

#[test]
fn session_present_is_truthful_across_a_restart_and_a_clean_connect_discards_it() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut gw = Gateway::start();
    let ack = |gw: &Gateway, clean| rt.block_on(connack(gw.plain(), "sp", clean));
    assert_eq!(ack(&gw, false), [0, 0], "new session");
    assert_eq!(ack(&gw, false), [1, 0], "resumed");
    restart(&mut gw, "KILL");
    assert_eq!(ack(&gw, false), [1, 0], "after SIGKILL");
    // CleanSession 1 discards it ([MQTT-3.1.2-6]) and is answered with 0.
    assert_eq!(ack(&gw, true), [0, 0]);
    assert_eq!(ack(&gw, false), [0, 0], "discarded");
}

/// A full session queue applies `sessions.when_full` and counts what it drops.
#[test]
fn full_session_queue_applies_its_policy_and_counts_the_drops() {
    common::require_mosquitto();
    for (policy, kept) in [
        ("drop-new", ["m0", "m1", "m2"]),
        ("drop-oldest", ["m2", "m3", "m4"]),
    ] {
        let gw = Gateway::start_with(&format!(
            "[sessions]\nmax_queued_messages = 3\nwhen_full = \"{policy}\"\n"
        ));
        open_session(&gw, "pq", "cmd/pq", "1");
        for i in 0..5 {
            let m = format!("m{i}");
            publish(&gw, &["-i", "ctl", "-t", "cmd/pq", "-m", &m, "-q", "1"]);
        }
        assert_eq!(
            gw.metric("outpost_session_dropped_total{reason=\"full\"}"),
            2,
            "{policy}"
        );
        assert_eq!(gw.metric("outpost_session_queued_messages"), 3, "{policy}");
        let got = subscribe(
            &gw,
            &[
                "-c", "-i", "pq", "-q", "1", "-t", "cmd/pq", "-C", "5", "-W", "3", "-F", "%p",
            ],
        );
        assert_eq!(got, kept, "{policy}");
    }
}

#[test]
fn persistent_sessions_over_the_limit_are_refused_with_connack_3() {
    common::require_mosquitto();
    let gw = Gateway::start_with("[sessions]\nmax_sessions = 2\n");
    open_session(&gw, "s1", "a/s1", "1");
    open_session(&gw, "s2", "a/s2", "1");
    let out = run(
        &gw,
        "mosquitto_sub",
        &["-c", "-i", "s3", "-q", "1", "-t", "a/s3", "-E"],
    );
    assert!(!out.status.success());
    assert_eq!(gw.metric("outpost_sessions_refused_total"), 1);
    // A clean session is not a persistent one: still served.
    let out = run(&gw, "mosquitto_sub", &["-i", "s4", "-t", "a/s4", "-E"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Online persistent subscribers get each message once (the front door delivers them from
/// the queue and drops the core's own copy), live QoS 0 still flows, and a retained message
/// reaches a new persistent subscription.
#[test]
fn online_persistent_subscriber_gets_each_message_once_and_retained_on_subscribe() {
    common::require_mosquitto();
    let gw = Gateway::start();
    publish(
        &gw,
        &[
            "-i",
            "pa",
            "-t",
            "live/state",
            "-m",
            "kept",
            "-r",
            "-q",
            "1",
        ],
    );
    let sub = spawn_sub(
        &gw,
        &[
            "-c",
            "-i",
            "live",
            "-q",
            "1",
            "-t",
            "live/#",
            "-C",
            "4",
            "-W",
            "8",
            "-F",
            "%r %q %t %p",
        ],
    );
    std::thread::sleep(Duration::from_millis(700));
    publish(&gw, &["-i", "ctl", "-t", "live/a", "-m", "one", "-q", "1"]);
    publish(&gw, &["-i", "ctl", "-t", "live/b", "-m", "zero", "-q", "0"]);
    publish(&gw, &["-i", "ctl", "-t", "live/c", "-m", "two", "-q", "2"]);
    let out = sub.wait_with_output().unwrap();
    let mut got = lines_of(&out);
    // Retained on subscribe first, flagged ([MQTT-3.3.1-8]); live messages never are
    // ([MQTT-3.3.1-9]). QoS 0 goes live through the core, QoS 1/2 through the queue, so
    // their relative order is not fixed.
    assert_eq!(
        got.first().map(String::as_str),
        Some("1 1 live/state kept"),
        "{}",
        gw.log()
    );
    got.sort();
    assert_eq!(
        got,
        [
            "0 0 live/b zero",
            "0 1 live/a one",
            "0 1 live/c two",
            "1 1 live/state kept"
        ],
        "{}",
        gw.log()
    );
    // No second copy of anything (subscribing to another filter: a new SUBSCRIBE to
    // `live/#` would rightly send the retained message again, [MQTT-3.8.4-3]).
    nothing_more(&gw, "live", "a second copy");
}

/// A store written by the previous schema (1, before the sessions tables; the fixture was
/// made by that build's `outpost ca issue-device` and `ca revoke`) opens and keeps its
/// certificates.
#[test]
fn a_schema_1_data_dir_opens_and_keeps_its_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let st = Command::new("tar")
        .args([
            "-xzf",
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/store-v1.tar.gz"
            ),
            "-C",
        ])
        .arg(&data)
        .status()
        .unwrap();
    assert!(st.success());
    let out = Command::new(common::BIN)
        .args(["ca", "list", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("40359eee7ca3cdc1b38f91537e87d687   sensor-1                 valid"),
        "{text}"
    );
    assert!(
        text.contains("3531a8748c5f7d18c8e24c3774a0f562   sensor-2                 revoked"),
        "{text}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("store migrated to the current schema"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Migrated once: the second open finds the current version.
    let out = Command::new(common::BIN)
        .args(["ca", "list", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("migrated"));
}

/// [MQTT-3.8.4-6]: a message goes out at the lower of its own QoS and the subscription's.
/// The routing core used to give every message the subscription's QoS (vendor/rumqttd,
/// OUTPOST.md change 4).
#[test]
fn delivery_qos_is_the_minimum_of_publish_and_subscription_qos() {
    common::require_mosquitto();
    let gw = Gateway::start();
    let sub = spawn_sub(
        &gw,
        &[
            "-i", "minq", "-q", "1", "-t", "minq/#", "-C", "3", "-W", "6", "-F", "%q %t",
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    publish(&gw, &["-i", "ctl", "-t", "minq/0", "-m", "x", "-q", "0"]);
    publish(&gw, &["-i", "ctl", "-t", "minq/1", "-m", "x", "-q", "1"]);
    publish(&gw, &["-i", "ctl", "-t", "minq/2", "-m", "x", "-q", "2"]);
    let out = sub.wait_with_output().unwrap();
    let got = lines_of(&out);
    assert_eq!(got, ["0 minq/0", "1 minq/1", "1 minq/2"]);
}

/// A client that goes without DISCONNECT: its QoS 1 will reaches a persistent session that
/// is away, through the session's queue (the core's own copy to it is dropped), also after
/// a crash.
#[test]
fn a_will_reaches_an_absent_persistent_session_across_sigkill() {
    common::require_mosquitto();
    let mut gw = Gateway::start();
    open_session(&gw, "pw", "wills/#", "1");
    let mut willer = tool(
        &gw,
        "mosquitto_sub",
        &[
            "-i",
            "willer",
            "-t",
            "nothing",
            "--will-topic",
            "wills/willer",
            "--will-payload",
            "gone",
            "--will-qos",
            "1",
        ],
    )
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    // Killed: no DISCONNECT, so the will is published.
    willer.kill().unwrap();
    let _ = willer.wait();
    let t = std::time::Instant::now();
    while gw.metric("outpost_session_queued_messages") < 1 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "will not queued\n{}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    restart(&mut gw, "KILL");
    let got = subscribe(
        &gw,
        &[
            "-c", "-i", "pw", "-q", "1", "-t", "other/pw", "-C", "1", "-W", "8", "-F", "%t %p",
        ],
    );
    assert_eq!(got, ["wills/willer gone"], "{}", gw.log());
}

/// More retained messages than one read of the core (200 at QoS 0, the free inflight slots
/// at QoS 1): a new subscriber gets every one (vendor/rumqttd, OUTPOST.md change 5; the
/// core used to drop the rest), and so does a persistent subscriber, from its queue.
#[test]
fn a_new_subscriber_gets_every_retained_message_not_one_reads_worth() {
    common::require_mosquitto();
    const N: usize = 600;
    let gw = Gateway::start_with("[frontdoor]\nmax_retained_per_device = 1000\n");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut s = common::plain_session(gw.plain(), "loader").await;
        let mut all = Vec::new();
        for i in 0..N {
            let mut f = wire::publish(
                &format!("many/{i}"),
                format!("v{i}").as_bytes(),
                1,
                i as u16 + 1,
            );
            f[0] |= 1;
            all.extend(f);
        }
        s.write_all(&all).await.unwrap();
        for _ in 0..N {
            let p = expect_packet(&mut s, Duration::from_secs(20), "PUBACK").await;
            assert_eq!(p.kind(), 4);
        }
    });
    for (id, args) in [
        ("qos0", vec!["-q", "0"]),
        ("qos1", vec!["-q", "1"]),
        ("persistent", vec!["-q", "1", "-c"]),
    ] {
        let mut a = vec![
            "-i", id, "-t", "many/#", "-C", "600", "-W", "10", "-F", "%r %t",
        ];
        a.extend(args);
        let got = subscribe(&gw, &a);
        assert_eq!(got.len(), N, "{id}: {} of {N} retained messages", got.len());
        assert!(
            got.iter().all(|l| l.starts_with("1 many/")),
            "{id}: {:?}",
            &got[..3]
        );
    }
}

/// `sessions.max_message_age`: a queued message older than that is dropped, counted, and
/// not delivered; `sessions.session_expiry`: a session away for longer is deleted (at the
/// next sweep; one runs at start), counted, and the client finds no session.
#[test]
fn old_messages_and_long_absent_sessions_expire_and_are_counted() {
    common::require_mosquitto();
    let mut gw =
        Gateway::start_with("[sessions]\nmax_message_age = \"1s\"\nsession_expiry = \"2s\"\n");
    open_session(&gw, "pe", "cmd/pe", "1");
    publish(
        &gw,
        &["-i", "ctl", "-t", "cmd/pe", "-m", "stale", "-q", "1"],
    );
    std::thread::sleep(Duration::from_millis(1500));
    let got = subscribe(
        &gw,
        &["-c", "-i", "pe", "-q", "1", "-t", "cmd/pe", "-W", "2"],
    );
    assert!(got.is_empty(), "an expired message was delivered: {got:?}");
    assert_eq!(
        gw.metric("outpost_session_dropped_total{reason=\"expired\"}"),
        1
    );
    // Away for more than 2 s, then the gateway restarts (a sweep runs at start).
    std::thread::sleep(Duration::from_millis(2500));
    restart(&mut gw, "TERM");
    assert_eq!(gw.metric("outpost_sessions_expired_total"), 1);
    assert_eq!(gw.metric("outpost_sessions_persistent"), 0);
}
