//! `cargo bench --bench persistence`: issue 11, acceptance point 4, on this machine, all on
//! 127.0.0.1, with Mosquitto (`persistence true`) as the anchor in the same run.
//!
//! The state: `BENCH_RETAINED` retained topics (`r/<i>`, 32-byte payloads) and
//! `BENCH_SESSIONS` persistent sessions (CleanSession 0, each subscribed at QoS 1 to
//! `s/<i>/cmd`) with `BENCH_QUEUED` QoS 1 messages queued for each while it is away. For each
//! broker in turn: start it empty, build the state through its plain MQTT port (one raw
//! client, QoS 1, pipelined), stop it with SIGTERM (Mosquitto writes its persistence file
//! then), start it again and time process start → first CONNACK on its port (polled every
//! 2 ms): what a restart with that state costs before anyone can connect. Then it checks what
//! came back: a fresh subscriber to `r/#` must get every retained message, and a sample of
//! `BENCH_SAMPLE` sessions must each get all their queued messages, in order.
//!
//! Outpost: the release binary, `[frontdoor] max_retained_per_device` raised to hold the
//! retained set. Its own log lines give the two parts of its restore (loading the sessions
//! index, publishing the retained messages back into the core).
//!
//! Environment: BENCH_RETAINED (10000), BENCH_SESSIONS (1000), BENCH_QUEUED (100),
//! BENCH_SAMPLE (20), BENCH_RUNS (3: restarts timed per broker; the median is reported).

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::env_or;

struct Params {
    retained: usize,
    sessions: usize,
    queued: usize,
    sample: usize,
    runs: usize,
}

fn send(s: &mut TcpStream, first: u8, body: &[u8]) {
    let mut p = vec![first];
    p.extend(common::wire::remaining_length(body.len()));
    p.extend_from_slice(body);
    s.write_all(&p).expect("send");
}

fn recv(s: &mut TcpStream) -> (u8, Vec<u8>) {
    try_recv(s).expect("packet")
}

/// The next packet, or `None` once the socket is quiet past its read timeout.
fn try_recv(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut first = [0u8; 1];
    s.read_exact(&mut first).ok()?;
    let (mut len, mut mul) = (0usize, 1usize);
    loop {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).expect("length");
        len += (b[0] & 0x7f) as usize * mul;
        mul *= 128;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).expect("body");
    Some((first[0], body))
}

fn connect(port: u16, id: &str, clean: bool) -> (TcpStream, u8) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut body = common::wire::string(b"MQTT");
    body.extend([4, if clean { 0x02 } else { 0x00 }, 0, 60]);
    body.extend(common::wire::string(id.as_bytes()));
    send(&mut s, 0x10, &body);
    let (t, b) = recv(&mut s);
    assert_eq!(t, 0x20, "CONNACK expected");
    assert_eq!(b[1], 0, "CONNACK code {}", b[1]);
    (s, b[0])
}

/// QoS 1 publishes, `window` at a time, each batch waiting for its PUBACKs.
fn publish_all(s: &mut TcpStream, msgs: impl Iterator<Item = (String, Vec<u8>, bool)>) {
    let mut batch = Vec::new();
    let mut pid = 0u16;
    let flush = |s: &mut TcpStream, batch: &mut Vec<u8>, n: &mut usize| {
        s.write_all(batch).expect("publish");
        batch.clear();
        while *n > 0 {
            let (t, _) = recv(s);
            assert_eq!(t & 0xf0, 0x40, "PUBACK expected, got {t:#x}");
            *n -= 1;
        }
    };
    let mut n = 0usize;
    for (topic, payload, retain) in msgs {
        pid = pid % 60_000 + 1;
        let mut body = common::wire::string(topic.as_bytes());
        body.extend(pid.to_be_bytes());
        body.extend(payload);
        batch.push(0x32 | retain as u8);
        batch.extend(common::wire::remaining_length(body.len()));
        batch.extend(body);
        n += 1;
        if n == 200 {
            flush(s, &mut batch, &mut n);
        }
    }
    flush(s, &mut batch, &mut n);
}

fn build_state(port: u16, p: &Params) {
    let t = Instant::now();
    for i in 0..p.sessions {
        let (mut s, _) = connect(port, &format!("sess-{i}"), false);
        let mut body = 1u16.to_be_bytes().to_vec();
        body.extend(common::wire::string(format!("s/{i}/cmd").as_bytes()));
        body.push(1);
        send(&mut s, 0x82, &body);
        let (t, b) = recv(&mut s);
        assert_eq!((t, b.get(2).copied()), (0x90, Some(1)), "SUBACK");
        send(&mut s, 0xe0, &[]);
    }
    let (mut s, _) = connect(port, "loader", true);
    publish_all(
        &mut s,
        (0..p.retained).map(|i| (format!("r/{i}"), format!("{i:032}").into_bytes(), true)),
    );
    let queued = p.queued;
    publish_all(
        &mut s,
        (0..queued).flat_map(|k| {
            (0..p.sessions)
                .map(move |i| (format!("s/{i}/cmd"), format!("{k:08}").into_bytes(), false))
        }),
    );
    send(&mut s, 0xe0, &[]);
    println!(
        "  state built in {:.1} s: {} sessions, {} retained, {} queued",
        t.elapsed().as_secs_f64(),
        p.sessions,
        p.retained,
        p.sessions * p.queued
    );
}

/// Process start → first CONNACK.
fn time_to_connack(start: &dyn Fn() -> Child, port: u16) -> (Child, Duration) {
    let t = Instant::now();
    let mut child = start();
    loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut body = common::wire::string(b"MQTT");
            body.extend([4, 0x02, 0, 60]);
            body.extend(common::wire::string(b"probe"));
            send(&mut s, 0x10, &body);
            let mut b = [0u8; 4];
            if s.read_exact(&mut b).is_ok() && b[0] == 0x20 {
                let took = t.elapsed();
                let _ = s.write_all(&[0xe0, 0]);
                return (child, took);
            }
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("broker exited during start: {st}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no CONNACK in 120 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < Duration::from_secs(60), "broker did not stop");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What came back: every retained message, and the sample sessions' queues in order.
fn verify(port: u16, p: &Params) -> String {
    let (mut s, _) = connect(port, "checker", true);
    let mut body = 1u16.to_be_bytes().to_vec();
    body.extend(common::wire::string(b"r/#"));
    body.push(0);
    send(&mut s, 0x82, &body);
    let mut retained = 0;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    while retained < p.retained {
        match try_recv(&mut s) {
            Some((t, _)) if t & 0xf0 == 0x30 => retained += 1,
            Some(_) => {}
            None => break,
        }
    }
    let step = (p.sessions / p.sample.max(1)).max(1);
    let mut sessions_ok = 0;
    let mut present = 0;
    for i in (0..p.sessions).step_by(step).take(p.sample) {
        let (mut s, sp) = connect(port, &format!("sess-{i}"), false);
        present += sp as usize;
        let mut got = 0;
        let mut in_order = true;
        while got < p.queued {
            let (t, body) = recv(&mut s);
            if t & 0xf0 != 0x30 {
                continue;
            }
            let tl = u16::from_be_bytes([body[0], body[1]]) as usize;
            let qos = (t >> 1) & 3;
            let at = 2 + tl + if qos > 0 { 2 } else { 0 };
            if qos > 0 {
                send(&mut s, 0x40, &body[2 + tl..2 + tl + 2]);
            }
            if body[at..] != *format!("{got:08}").as_bytes() {
                in_order = false;
            }
            got += 1;
        }
        send(&mut s, 0xe0, &[]);
        sessions_ok += in_order as usize;
    }
    format!(
        "retained {retained}/{}, sample sessions complete and in order {sessions_ok}/{}, session-present {present}/{}",
        p.retained, p.sample, p.sample
    )
}

/// Start empty, build the state, stop; then `p.runs` timed restarts, checking what came back
/// after the last one. Returns the median restart time and the check.
fn measure(name: &str, start: &dyn Fn() -> Child, port: u16, p: &Params) -> (Duration, String) {
    let (child, empty) = time_to_connack(start, port);
    println!(
        "  {name}, empty: first CONNACK {:.0} ms",
        empty.as_secs_f64() * 1e3
    );
    build_state(port, p);
    stop(child);
    let mut times = Vec::new();
    let mut check = String::new();
    for run in 0..p.runs {
        let (child, took) = time_to_connack(start, port);
        println!(
            "  {name} restart {}: first CONNACK {:.0} ms",
            run + 1,
            took.as_secs_f64() * 1e3
        );
        times.push(took);
        if run + 1 == p.runs {
            check = verify(port, p);
        }
        stop(child);
    }
    (median(times), check)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn outpost(p: &Params) -> (Duration, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let data = dir.path().join("data");
    let cfg = dir.path().join("outpost.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nid = \"bench\"\ndata_dir = \"{}\"\n[listeners]\nmqtts = \"127.0.0.1:0\"\nplain = \"127.0.0.1:{port}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n[mdns]\nenabled = false\n[fdo]\nenabled = false\n[frontdoor]\nmax_retained_per_device = {}\n[sessions]\nmax_sessions = {}\n",
            data.display(),
            p.retained + 100,
            p.sessions + 100,
        ),
    )
    .unwrap();
    let log = dir.path().join("gateway.log");
    let start = || {
        Command::new(common::BIN)
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .spawn()
            .expect("outpost")
    };
    let (median, check) = measure("outpost", &start, port, p);
    let text = common::strip_ansi(&std::fs::read_to_string(&log).unwrap_or_default());
    let parts = text
        .lines()
        .filter(|l| {
            l.contains("loaded") && l.contains("persistent sessions")
                || l.contains("restored into the routing core")
        })
        .last_n(2)
        .join("\n    ");
    (median, check, parts)
}

trait LastN {
    fn last_n(self, n: usize) -> Vec<String>;
}

impl<'a, I: Iterator<Item = &'a str>> LastN for I {
    fn last_n(self, n: usize) -> Vec<String> {
        let all: Vec<String> = self.map(|l| l.trim().to_string()).collect();
        all[all.len().saturating_sub(n)..].to_vec()
    }
}

fn mosquitto(p: &Params) -> (Duration, String) {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let conf = dir.path().join("mosquitto.conf");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    std::fs::write(
        &conf,
        format!(
            "{}listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nautosave_interval 3600\nmax_queued_messages {}\nlog_type error\nlog_dest stderr\n",
            if root { "user root\n" } else { "" },
            dir.path().display(),
            p.queued + 10,
        ),
    )
    .unwrap();
    let start = || {
        Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto")
    };
    let (median, check) = measure("mosquitto", &start, port, p);
    println!(
        "  mosquitto.db: {} bytes",
        std::fs::metadata(dir.path().join("mosquitto.db"))
            .map(|m| m.len())
            .unwrap_or(0)
    );
    (median, check)
}

fn main() {
    if !support::run_by_cargo_bench() {
        return;
    }
    common::require_mosquitto();
    let p = Params {
        retained: env_or("BENCH_RETAINED", 10_000),
        sessions: env_or("BENCH_SESSIONS", 1000),
        queued: env_or("BENCH_QUEUED", 100),
        sample: env_or("BENCH_SAMPLE", 20),
        runs: env_or("BENCH_RUNS", 3),
    };
    support::print_title("persistence restore (issue 11)");
    println!(
        "{}; load {}; {} retained, {} sessions x {} queued",
        support::cpu_model(),
        support::loadavg(),
        p.retained,
        p.sessions,
        p.queued
    );
    let (o, o_check, o_parts) = outpost(&p);
    let (m, m_check) = mosquitto(&p);
    println!();
    println!(
        "| broker | restart → first CONNACK (median of {}) | what came back |",
        p.runs
    );
    println!("|---|---|---|");
    println!("| outpost | {:.0} ms | {o_check} |", o.as_secs_f64() * 1e3);
    println!(
        "| mosquitto 2 (persistence true) | {:.0} ms | {m_check} |",
        m.as_secs_f64() * 1e3
    );
    println!("outpost's own account of the last restart:\n    {o_parts}");
    println!("load after: {}", support::loadavg());
}
