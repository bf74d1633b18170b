//! Durability against power loss, proven by syscall order: the real gateway runs under
//! `strace -f`, and every acknowledgement we check (a PUBACK for an uplink QoS 1 publish, the
//! admin reply to `outpost ca issue-device`) must be written to its socket only after an
//! `fdatasync` of the store's `db` file that started after the write of the acknowledged
//! record (found by a marker in the `pwrite64` of sled's log) had completed.
//!
//! Only `fdatasync` counts: sled's background flusher `fsync`s the same file every 500 ms,
//! which would make a build without the fix pass now and then.
mod cloud;
mod common;

use common::Gateway;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One system call as traced: its arguments (entry and resumed parts), where its entry and
/// its exit are in the trace, and its result.
#[derive(Debug)]
struct Call {
    name: String,
    fd: i64,
    bytes: Vec<u8>,
    start: usize,
    end: usize,
    ret: i64,
}

/// Decode every `"\xHH..."` string of a line traced with `-xx`, concatenated.
fn strings(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("\"\\x") {
        rest = &rest[i + 1..];
        let end = rest.find('"').unwrap_or(rest.len());
        let hex = &rest[..end];
        for h in hex.split("\\x").filter(|h| h.len() == 2) {
            if let Ok(b) = u8::from_str_radix(h, 16) {
                out.push(b);
            }
        }
        rest = &rest[(end + 1).min(rest.len())..];
    }
    out
}

fn parse(trace: &str) -> Vec<Call> {
    let mut calls: Vec<Call> = Vec::new();
    let mut pending: HashMap<String, usize> = HashMap::new();
    for (n, line) in trace.lines().enumerate() {
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        if let Some(resumed) = rest.strip_prefix("<... ") {
            if let Some(i) = pending.remove(pid) {
                let c = &mut calls[i];
                c.end = n;
                c.bytes.extend(strings(resumed));
                c.ret = ret_of(resumed);
            }
            continue;
        }
        let Some(paren) = rest.find('(') else {
            continue;
        };
        let name = rest[..paren].to_string();
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let args = &rest[paren + 1..];
        // `fdatasync(11 <unfinished ...>` has no comma or parenthesis after its fd.
        let fd = args
            .split([',', ')', ' '])
            .next()
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or(-1);
        let unfinished = rest.ends_with("<unfinished ...>");
        calls.push(Call {
            name,
            fd,
            bytes: strings(args),
            start: n,
            end: n,
            ret: if unfinished { -1 } else { ret_of(args) },
        });
        if unfinished {
            pending.insert(pid.to_string(), calls.len() - 1);
        }
    }
    calls
}

fn ret_of(text: &str) -> i64 {
    text.rsplit_once(" = ")
        .and_then(|(_, r)| r.split_whitespace().next())
        .and_then(|r| r.parse().ok())
        .unwrap_or(-1)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Check that the first socket write matching `is_ack` comes after an `fdatasync` of the
/// store's `db` that covers the `pwrite64` carrying `marker`.
fn assert_ack_after_covering_fdatasync(
    trace: &str,
    what: &str,
    marker: &[u8],
    is_ack: impl Fn(&[u8]) -> bool,
) {
    let calls = parse(trace);
    let db_fds: HashSet<i64> = calls
        .iter()
        .filter(|c| c.name == "openat" && c.ret >= 0 && c.bytes.ends_with(b"/store/db"))
        .map(|c| c.ret)
        .collect();
    assert!(!db_fds.is_empty(), "{what}: no openat of store/db traced");
    let write = calls
        .iter()
        .find(|c| c.name == "pwrite64" && db_fds.contains(&c.fd) && contains(&c.bytes, marker))
        .unwrap_or_else(|| panic!("{what}: no pwrite64 of the record to store/db traced"));
    let ack = calls
        .iter()
        .find(|c| {
            matches!(c.name.as_str(), "write" | "writev" | "sendto" | "sendmsg")
                && c.fd > 2
                && !db_fds.contains(&c.fd)
                && is_ack(&c.bytes)
        })
        .unwrap_or_else(|| panic!("{what}: the acknowledgement write was not traced"));
    assert!(
        write.end < ack.start,
        "{what}: acknowledged (trace line {}: {} on fd {}, {} bytes) before the record was \
         written (line {})",
        ack.start + 1,
        ack.name,
        ack.fd,
        ack.bytes.len(),
        write.end + 1
    );
    let covering = calls.iter().find(|c| {
        c.name == "fdatasync"
            && db_fds.contains(&c.fd)
            && c.ret == 0
            && c.start > write.end
            && c.end < ack.start
    });
    assert!(
        covering.is_some(),
        "{what}: no fdatasync of store/db between the record's pwrite64 (trace line {}) and \
         the acknowledgement (line {}): acknowledged before it was on stable storage",
        write.end + 1,
        ack.start + 1
    );
}

/// The gateway under `strace -f`, writing its trace to a file.
struct Traced {
    gw: Gateway,
    strace: Option<Child>,
    trace: PathBuf,
    pid: u32,
}

impl Traced {
    fn start(extra: &str) -> Traced {
        assert!(
            Command::new("strace").arg("-V").output().is_ok(),
            "strace is required (apt-get install strace; scripts/test.sh installs it)"
        );
        let extra = extra.to_string();
        let mut gw = Gateway::prepare_custom(|d| common::base_config(d, &extra));
        let trace = gw.dir.path().join("strace.txt");
        let log = std::fs::File::create(gw.dir.path().join("gateway.log")).unwrap();
        let strace = Command::new("strace")
            .args(["-f", "-xx", "-s", "1048576", "-o"])
            .arg(&trace)
            .args([
                "-e",
                "trace=openat,write,writev,sendto,sendmsg,fsync,fdatasync,sync_file_range,pwrite64",
                common::BIN,
                "run",
                "--config",
            ])
            .arg(&gw.config_path)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn strace");
        let deadline = Instant::now() + Duration::from_secs(60);
        let ep = loop {
            if let Some(ep) = common::Endpoints::read(&gw.data_dir) {
                break ep;
            }
            assert!(
                Instant::now() < deadline,
                "gateway under strace not ready in 60 s: {}",
                gw.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let pid = ep.pid;
        gw.ep = ep;
        Traced {
            gw,
            strace: Some(strace),
            trace,
            pid,
        }
    }

    /// Stop the gateway (SIGTERM), let strace finish and return the trace.
    fn finish(mut self) -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        if let Some(mut s) = self.strace.take() {
            let deadline = Instant::now() + Duration::from_secs(30);
            while s.try_wait().unwrap().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = s.kill();
            let _ = s.wait();
        }
        std::fs::read_to_string(&self.trace).expect("read trace")
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        if let Some(mut s) = self.strace.take() {
            let _ = Command::new("kill")
                .args(["-KILL", &self.pid.to_string()])
                .status();
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

/// An `[uplink]` section whose cloud is unreachable (a free port): uplink messages stay in
/// the queue (store and forward), each PUBACK waiting only for the local flush.
fn offline_uplink(dir: &std::path::Path) -> String {
    let mut pki = cloud::CloudPki::new(&dir.join("cloud"));
    let (cert, key) = pki.issue("gw-test", false);
    format!(
        "[uplink]\nenabled = true\nhost = \"127.0.0.1\"\nport = {}\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        common::free_port(),
        pki.ca.display(),
        cert.display(),
        key.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplink_puback_comes_after_an_fdatasync_covering_the_message() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg = offline_uplink(dir.path());
    let t = Traced::start(&cfg);
    let mut s = common::plain_session(t.gw.plain(), "dev1").await;
    let marker = b"durability-marker-7f3a91";
    s.write_all(&common::wire::publish(
        "devices/dev1/telemetry/t",
        marker,
        1,
        0x1234,
    ))
    .await
    .unwrap();
    let p = common::expect_packet(&mut s, Duration::from_secs(20), "PUBACK").await;
    assert_eq!((p.kind(), &p.body[..]), (4, &[0x12, 0x34][..]), "{p:?}");
    drop(s);
    let trace = t.finish();
    assert_ack_after_covering_fdatasync(&trace, "uplink PUBACK", marker, |b| {
        contains(b, &[0x40, 0x02, 0x12, 0x34])
    });
}

/// Issue 11: a retained QoS 1 publish is acknowledged only once the retained record is on
/// stable storage (it is restored into the core at the next start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_puback_comes_after_an_fdatasync_covering_the_retained_record() {
    use tokio::io::AsyncWriteExt;
    let t = Traced::start("");
    let mut s = common::plain_session(t.gw.plain(), "pa").await;
    let marker = b"retained-marker-5c21d0";
    let mut frame = common::wire::publish("state/pa", marker, 1, 0x2345);
    frame[0] |= 1; // RETAIN
    s.write_all(&frame).await.unwrap();
    let p = common::expect_packet(&mut s, Duration::from_secs(20), "PUBACK").await;
    assert_eq!((p.kind(), &p.body[..]), (4, &[0x23, 0x45][..]), "{p:?}");
    drop(s);
    let trace = t.finish();
    assert_ack_after_covering_fdatasync(&trace, "retained PUBACK", marker, |b| {
        contains(b, &[0x40, 0x02, 0x23, 0x45])
    });
}

/// Issue 11: a persistent session's SUBSCRIBE is answered only once its subscription is on
/// stable storage, and a QoS 1 message for it while it is away is acknowledged to the
/// publisher only once it is on stable storage in the session's queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suback_and_queued_message_puback_come_after_fdatasyncs_covering_them() {
    use tokio::io::AsyncWriteExt;
    let t = Traced::start("");
    let filter = "cmd/durable-filter-9e1b";
    {
        let mut d = tokio::net::TcpStream::connect(t.gw.plain()).await.unwrap();
        let mut body = common::wire::string(b"MQTT");
        body.extend([4, 0x00, 0, 30]); // CleanSession 0
        body.extend(common::wire::string(b"sess"));
        d.write_all(&common::wire::packet(0x10, &body))
            .await
            .unwrap();
        let p = common::expect_packet(&mut d, Duration::from_secs(10), "CONNACK").await;
        assert_eq!((p.kind(), &p.body[..]), (2, &[0, 0][..]), "{p:?}");
        d.write_all(&common::wire::subscribe(0x3a3a, filter, 1))
            .await
            .unwrap();
        let p = common::expect_packet(&mut d, Duration::from_secs(10), "SUBACK").await;
        assert_eq!((p.kind(), &p.body[..]), (9, &[0x3a, 0x3a, 1][..]), "{p:?}");
        d.write_all(&common::wire::DISCONNECT).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut s = common::plain_session(t.gw.plain(), "ctl").await;
    let marker = b"queued-marker-4d77e2";
    s.write_all(&common::wire::publish(filter, marker, 1, 0x3456))
        .await
        .unwrap();
    let p = common::expect_packet(&mut s, Duration::from_secs(20), "PUBACK").await;
    assert_eq!((p.kind(), &p.body[..]), (4, &[0x34, 0x56][..]), "{p:?}");
    drop(s);
    let trace = t.finish();
    assert_ack_after_covering_fdatasync(&trace, "persistent SUBACK", filter.as_bytes(), |b| {
        contains(b, &[0x90, 0x03, 0x3a, 0x3a])
    });
    assert_ack_after_covering_fdatasync(&trace, "queued message PUBACK", marker, |b| {
        contains(b, &[0x40, 0x02, 0x34, 0x56])
    });
}

/// A burst of uplink publishes without waiting for any PUBACK: the connection reads the
/// later ones while the earlier ones are being flushed (pipelined batches, overlapping
/// flushes), and still every PUBACK comes after an fdatasync that covers its message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_puback_of_a_pipelined_burst_comes_after_a_covering_fdatasync() {
    use tokio::io::AsyncWriteExt;
    const N: u16 = 150;
    let dir = tempfile::tempdir().unwrap();
    let cfg = offline_uplink(dir.path());
    let t = Traced::start(&cfg);
    let mut s = common::plain_session(t.gw.plain(), "dev1").await;
    let marker = |i: u16| format!("durability-burst-{i:05}");
    // Packet ids from 0x1001 up: the gateway's own core clients (`outpost~uplink`'s state
    // publish) use small ones, and the acknowledgement is found by its bytes.
    let pid = |i: u16| 0x1000 + i;
    for i in 1..=N {
        s.write_all(&common::wire::publish(
            "devices/dev1/telemetry/t",
            marker(i).as_bytes(),
            1,
            pid(i),
        ))
        .await
        .unwrap();
    }
    let mut acked = HashSet::new();
    while acked.len() < usize::from(N) {
        let p = common::expect_packet(&mut s, Duration::from_secs(30), "PUBACK").await;
        assert_eq!(p.kind(), 4, "{p:?}");
        acked.insert(u16::from_be_bytes([p.body[0], p.body[1]]));
    }
    drop(s);
    let trace = t.finish();
    let _ = std::fs::write(std::env::temp_dir().join("outpost-burst-trace.txt"), &trace);
    assert_eq!(acked, (1..=N).map(pid).collect::<HashSet<_>>());
    for i in 1..=N {
        let [hi, lo] = pid(i).to_be_bytes();
        assert_ack_after_covering_fdatasync(
            &trace,
            &format!("uplink PUBACK {i} of the burst"),
            marker(i).as_bytes(),
            |b| contains(b, &[0x40, 0x02, hi, lo]),
        );
    }
}

#[test]
fn admin_issue_device_reply_comes_after_an_fdatasync_covering_the_certificate() {
    let t = Traced::start("");
    let id = "strace-dev-4d2c";
    let out = t.gw.cli(&[
        "ca",
        "issue-device",
        "--id",
        id,
        "--out",
        t.gw.dir.path().join("dev").to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "issue-device: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let trace = t.finish();
    // The stored record names the device; the reply carries the certificate.
    let needle = format!("\"device_id\":\"{id}\"");
    assert_ack_after_covering_fdatasync(&trace, "ca issue-device", needle.as_bytes(), |b| {
        b.starts_with(b"{") && contains(b, b"BEGIN CERTIFICATE")
    });
}

#[test]
fn voucher_import_reply_and_to2_done_come_after_an_fdatasync_covering_them() {
    use common::roles::{made_for_gateway, Agent};
    let t = Traced::start("");
    let work = tempfile::tempdir().unwrap();
    let dev = made_for_gateway(&t.gw, work.path(), "dev-strace");
    let mut agent = Agent::start(&dev.cred, &work.path().join("state"), &[]);
    let onboarded = agent.expect("onboarded", Duration::from_secs(60));
    let client_id = onboarded["client_id"]
        .as_str()
        .expect("client id")
        .to_string();
    drop(agent);
    let trace = t.finish();
    // TO2: the certificate record of the new GUID is stored before TO2.Done2 (71) is sent.
    let cert = format!("\"device_id\":\"{client_id}\"");
    assert_ack_after_covering_fdatasync(&trace, "TO2.Done2", cert.as_bytes(), |b| {
        contains(&b.to_ascii_lowercase(), b"message-type: 71\r\n")
    });
    // The imported voucher record names its GUID; the admin reply is one JSON document.
    let voucher = format!("\"guid\":\"{}\"", dev.guid);
    assert_ack_after_covering_fdatasync(&trace, "voucher import", voucher.as_bytes(), |b| {
        b.starts_with(b"{") && contains(b, dev.guid.as_bytes())
    });
}
