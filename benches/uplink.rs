//! `cargo bench --bench uplink`: the uplink's figures (issue 3), side by side in one run, on
//! this machine, all on 127.0.0.1.
//!
//! * **Durable ingest.** QoS 1 publishes from `BENCH_DEVICES` concurrent device connections
//!   (each keeping `BENCH_WINDOW` unacknowledged) on an uplink topic
//!   (`devices/{id}/telemetry/bench`: appended to the durable queue and group-committed before
//!   the PUBACK) against the same load on a non-uplink topic (`devices/{id}/other`: no
//!   durability), same gateway, alternating, `BENCH_RUNS` runs, medians. Measured over the TLS
//!   device listener (client certificates) *and* the plain loopback listener, so that the TLS
//!   cost can be seen apart from the queue's. The uplink topic is measured with the link
//!   Offline (queue only) and Online (queue + forwarding to the cloud at the same time). Each
//!   run also has an unloaded pass (one connection, one message in flight): the latency a
//!   group commit adds without queueing.
//! * **Drain rate.** The gateway's uplink goes straight to the cloud (Mosquitto with TLS +
//!   client certificates), as in production. A backlog of `BENCH_BACKLOG` messages is loaded
//!   through the plain listener while Mosquitto is frozen (SIGSTOP: its connections stay open
//!   and nothing answers, so the gateway sees a blackhole and goes Offline); then it is thawed
//!   (SIGCONT) and the rate at which the messages arrive at a cloud subscriber is measured
//!   until the queue is empty. (The fault-injecting proxy of `tests/cloud` is not in this
//!   path: it would take its own share of the machine's two cores.) It is compared with
//!   Mosquitto's own ingest rate for the same message size and topic length from a direct
//!   QoS 1 publisher over TLS with the same in-flight window as the uplink
//!   (`BENCH_INFLIGHT`), measured by the same subscriber, once before the outage and once
//!   after the drain (the machine's load changes: the ratio uses their mean). During the
//!   drain a local client publishes (QoS 1) on a non-uplink topic every `BENCH_PROBE_MS` ms to
//!   a local subscriber (plain listener): its publish -> receive latency during the drain
//!   against idle shows whether live local traffic is starved.
//! * **Detection.** Through the proxy: `BENCH_OUTAGES` blackhole/restore cycles at random
//!   phases; the times to `outpost_uplink_online` 0 and back to 1, polled on the metrics
//!   endpoint every 10 ms.
//!
//! The gateway is the release `outpost` binary cargo builds for this bench (target/release),
//! started with its own default log filter (not the test harness's `RUST_LOG`).
//! CPU use of the gateway, Mosquitto, this process (proxy + load generators + subscriber) and
//! of everything else on the machine is printed for each phase: the machine is shared.
//!
//! Environment: BENCH_SIZE (128 B payload), BENCH_DEVICES (4), BENCH_WINDOW (32),
//! BENCH_INGEST (40000 messages per measured row), BENCH_RUNS (3), BENCH_PING (1000),
//! BENCH_BACKLOG (1000000), BENCH_DIRECT (BENCH_BACKLOG / 2, for each direct run),
//! BENCH_INFLIGHT (100), BENCH_PROBE_MS (5), BENCH_IDLE_S (3), BENCH_OUTAGES (20),
//! BENCH_TIMEOUT_S (900), BENCH_PHASES (`ingest,drain,detect`; also `durability`: fdatasync
//! against `OUTPOST_UNSAFE_SKIP_FDATASYNC=1` side by side and one fdatasync's cost), BENCH_DRAIN_VIA_PROXY (0; 1:
//! the drain goes through the proxy, outage = its blackhole); profiling: BENCH_PERF (a
//! directory: `perf record` of the gateway per phase), BENCH_PERF_ARGS (`record -F 499 -g`).
//!
//! Does nothing unless run by `cargo bench` (`--bench`), and nothing for `--list`.

#[path = "../tests/cloud/mod.rs"]
mod cloud;
#[path = "../tests/common/mod.rs"]
mod common;

mod support;

use bytes::{Buf, BytesMut};
use cloud::{Cloud, CloudPki, Fault, Proxy};
use common::Gateway;
use outpost::frontdoor::mqtt;
use rand::Rng;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use support::{
    cmd_out, env_or, loadavg, machine, machine_ticks, pid_with_cmdline, print_title, proc_ticks,
    run_by_cargo_bench, TICKS_PER_S,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

// ------------------------------------------------------------------------------------------
// Parameters

#[derive(Clone, Debug)]
struct Params {
    size: usize,
    devices: usize,
    window: usize,
    ingest: usize,
    runs: usize,
    ping: usize,
    backlog: usize,
    direct: usize,
    inflight: usize,
    probe: Duration,
    idle: Duration,
    outages: usize,
    timeout: Duration,
    phases: String,
    /// Drain through the test proxy (outage: its blackhole) instead of straight to Mosquitto.
    drain_via_proxy: bool,
}

/// Payload header: tag (1), id (4), send time in ns since BASE (8).
const HEADER: usize = 13;

impl Params {
    fn from_env() -> Params {
        let backlog = env_or("BENCH_BACKLOG", 1_000_000usize).max(1);
        let p = Params {
            size: env_or("BENCH_SIZE", 128usize),
            devices: env_or("BENCH_DEVICES", 4usize).max(1),
            window: env_or("BENCH_WINDOW", 32usize).clamp(1, 30_000),
            ingest: env_or("BENCH_INGEST", 40_000usize).max(100),
            runs: env_or("BENCH_RUNS", 3usize).max(1),
            ping: env_or("BENCH_PING", 1_000usize).max(10),
            backlog,
            direct: env_or("BENCH_DIRECT", backlog.div_ceil(2)).max(1),
            inflight: env_or("BENCH_INFLIGHT", 100usize).clamp(1, 30_000),
            probe: Duration::from_millis(env_or("BENCH_PROBE_MS", 5u64).max(1)),
            idle: Duration::from_secs(env_or("BENCH_IDLE_S", 3u64)),
            outages: env_or("BENCH_OUTAGES", 20usize),
            timeout: Duration::from_secs(env_or("BENCH_TIMEOUT_S", 900u64)),
            phases: env_or("BENCH_PHASES", "ingest,drain,detect".to_string()),
            drain_via_proxy: env_or("BENCH_DRAIN_VIA_PROXY", 0u8) == 1,
        };
        assert!(
            p.size >= HEADER,
            "BENCH_SIZE must be at least {HEADER} bytes (tag, id, timestamp)"
        );
        p
    }

    fn phase(&self, name: &str) -> bool {
        self.phases.split(',').any(|p| p.trim() == name)
    }
}

static BASE: OnceLock<Instant> = OnceLock::new();

fn now_ns() -> u64 {
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

// ------------------------------------------------------------------------------------------
// Statistics and machine facts

/// Percentile (nearest rank) of sorted microsecond samples, in ms.
fn pct_ms(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() as f64)).ceil() as usize;
    sorted[i.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[derive(Clone, Copy)]
struct CpuSnap {
    at: Instant,
    outpost: u64,
    mosquitto: u64,
    me: u64,
    busy: u64,
    steal: u64,
}

struct CpuUse {
    outpost: f64,
    mosquitto: f64,
    me: f64,
    others: f64,
    steal: f64,
}

impl std::fmt::Display for CpuUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CPU (100% = one core): outpost {:.0}%, mosquitto {:.0}%, bench process (proxy, clients) {:.0}%, other processes {:.0}%, steal {:.0}%",
            self.outpost, self.mosquitto, self.me, self.others, self.steal
        )
    }
}

/// With `BENCH_PERF=DIR`: `perf record` the gateway during a measured phase (the drain, the
/// first loaded pass of each ingest row) into DIR/NAME.data.
fn perf_start(pid: Option<u32>, name: &str) -> Option<std::process::Child> {
    let dir = std::env::var("BENCH_PERF").ok()?;
    let out = Path::new(&dir).join(format!("{name}.data"));
    // BENCH_PERF_ARGS replaces `record -F 499 -g` (e.g. `sched record` for off-CPU time).
    let args = std::env::var("BENCH_PERF_ARGS").unwrap_or_else(|_| "record -F 499 -g".into());
    std::process::Command::new("perf")
        .args(args.split_whitespace())
        .args(["-p", &pid?.to_string(), "-o"])
        .arg(out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()
}

fn perf_stop(c: Option<std::process::Child>) {
    if let Some(mut c) = c {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &c.id().to_string()])
            .status();
        let _ = c.wait();
    }
}

// ------------------------------------------------------------------------------------------
// The rig: Mosquitto "cloud" behind the proxy, the gateway with the uplink enabled.

struct Rig {
    _tmp: tempfile::TempDir,
    pki: CloudPki,
    cloud: Cloud,
    proxy: Proxy,
    /// The gateway's uplink goes through `proxy` (else straight to Mosquitto).
    via_proxy: bool,
    gw: Gateway,
    mosq_pid: Option<u32>,
}

impl Rig {
    /// `via_proxy`: the uplink goes through the fault-injecting proxy and outages are its
    /// blackhole; otherwise it goes straight to Mosquitto (the production path) and an outage
    /// freezes Mosquitto (SIGSTOP: connections stay open and nothing answers, as in a
    /// blackhole) until SIGCONT.
    fn start(p: &Params, via_proxy: bool) -> Rig {
        common::require_mosquitto();
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut pki = CloudPki::new(&tmp.path().join("cloud"));
        let (gw_cert, gw_key) = pki.issue("gw-test", false);
        pki.issue("cloud-app", false);
        pki.issue("cloud-direct", false);
        let cloud = Cloud::start(&pki);
        let mosq_pid = pid_with_cmdline(&pki.dir.join("mosquitto.conf").display().to_string());
        let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], cloud.port)));
        let quota: u64 =
            ((p.backlog.max(p.ingest * 4) as u64) * (p.size as u64 + 100) * 2).max(256 << 20);
        let cfg = format!(
            "[uplink]\nenabled = true\nhost = \"127.0.0.1\"\nport = {}\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\ninflight = {}\nqueue_max_bytes = {quota}\n",
            if via_proxy { proxy.addr.port() } else { cloud.port },
            pki.ca.display(),
            gw_cert.display(),
            gw_key.display(),
            p.inflight,
        );
        let gw = start_gateway(&cfg);
        Rig {
            _tmp: tmp,
            pki,
            cloud,
            proxy,
            via_proxy,
            gw,
            mosq_pid,
        }
    }

    /// Start (`true`) or end an outage of the cloud link.
    fn outage(&self, on: bool) {
        if self.via_proxy {
            self.proxy
                .set(if on { Fault::Blackhole } else { Fault::Pass });
            return;
        }
        let pid = self.mosq_pid.expect("mosquitto pid (needed to freeze it)");
        let sig = if on { "-STOP" } else { "-CONT" };
        let st = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("kill");
        assert!(st.success(), "kill {sig} {pid}");
    }

    fn cloud_tls(&self, cn: &str) -> Arc<rustls::ClientConfig> {
        cloud::tls_client_config(
            &self.pki.ca,
            &self.pki.dir.join(format!("{cn}.crt")),
            &self.pki.dir.join(format!("{cn}.key")),
        )
    }

    fn metric(&self, name: &str) -> i64 {
        self.gw.metric(name)
    }

    /// Poll `outpost_uplink_online` every 10 ms until it is `online`; the time it took.
    fn wait_online(&self, online: bool, limit: Duration) -> Option<Duration> {
        let t0 = Instant::now();
        loop {
            if (self.metric("outpost_uplink_online") == 1) == online {
                return Some(t0.elapsed());
            }
            if t0.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_metric(&self, name: &str, limit: Duration, ok: impl Fn(i64) -> bool) -> Option<i64> {
        let t0 = Instant::now();
        loop {
            let v = self.metric(name);
            if ok(v) {
                return Some(v);
            }
            if t0.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn must_be_online(&self, online: bool) {
        if self.wait_online(online, Duration::from_secs(30)).is_none() {
            panic!(
                "uplink not {} within 30 s\n{}",
                if online { "online" } else { "offline" },
                self.gw.log()
            );
        }
    }

    fn gw_pid(&self) -> Option<u32> {
        self.gw.child.as_ref().map(|c| c.id())
    }

    fn cpu(&self) -> CpuSnap {
        let gw_pid = self.gw.child.as_ref().map(|c| c.id()).unwrap_or(0);
        let (busy, steal) = machine_ticks();
        CpuSnap {
            at: Instant::now(),
            outpost: proc_ticks(gw_pid),
            mosquitto: self.mosq_pid.map(proc_ticks).unwrap_or(0),
            me: proc_ticks("self"),
            busy,
            steal,
        }
    }
}

/// `common::Gateway::start_with`, but with the gateway's own default log filter (the test
/// harness sets `RUST_LOG=info,rumqttd=warn`, which keeps rumqttd's per-publish span on: a
/// cost production does not pay).
fn start_gateway(extra: &str) -> Gateway {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let config_path = dir.path().join("outpost.toml");
    std::fs::write(&config_path, common::base_config(&data_dir, extra)).expect("write config");
    let log = std::fs::File::create(dir.path().join("gateway.log")).expect("log file");
    let child = std::process::Command::new(common::BIN)
        .args(["run", "--config"])
        .arg(&config_path)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn outpost");
    let pid = child.id();
    let mut gw = Gateway {
        dir,
        data_dir,
        config_path,
        child: Some(child),
        ep: common::Endpoints {
            gateway_id: String::new(),
            mqtts: "127.0.0.1:1".parse().unwrap(),
            plain: None,
            metrics: None,
            fdo: None,
            web: None,
            pid: 0,
        },
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(ep) = common::Endpoints::read(&gw.data_dir) {
            if ep.pid == pid {
                gw.ep = ep;
                return gw;
            }
        }
        if let Ok(Some(st)) = gw.child.as_mut().unwrap().try_wait() {
            panic!("gateway exited early with {st}: {}", gw.log());
        }
        assert!(
            Instant::now() < deadline,
            "gateway not ready in 30 s: {}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cpu_use(a: CpuSnap, b: CpuSnap) -> CpuUse {
    let secs = (b.at - a.at).as_secs_f64().max(1e-3);
    let pc = |x: u64, y: u64| (y.saturating_sub(x)) as f64 / TICKS_PER_S / secs * 100.0;
    let outpost = pc(a.outpost, b.outpost);
    let mosquitto = pc(a.mosquitto, b.mosquitto);
    let me = pc(a.me, b.me);
    let busy = pc(a.busy, b.busy);
    CpuUse {
        outpost,
        mosquitto,
        me,
        others: (busy - outpost - mosquitto - me).max(0.0),
        steal: pc(a.steal, b.steal),
    }
}

fn dir_size(p: &Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => n += dir_size(&e.path()),
                Ok(m) => n += m.len(),
                Err(_) => {}
            }
        }
    }
    n
}

// ------------------------------------------------------------------------------------------
// A small hand-written MQTT 3.1.1 client (no per-message allocation or task hop of its own,
// so that the load generator costs as little as possible and every PUBACK is timed).

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Conn = Box<dyn Io>;

#[derive(Clone)]
enum Target {
    Plain(SocketAddr),
    Tls(SocketAddr, Arc<rustls::ClientConfig>),
}

async fn open(target: &Target, client_id: &str) -> Conn {
    let mut c: Conn = match target {
        Target::Plain(a) => {
            let s = tokio::net::TcpStream::connect(a)
                .await
                .unwrap_or_else(|e| panic!("connect {a}: {e}"));
            s.set_nodelay(true).unwrap();
            Box::new(s)
        }
        Target::Tls(a, cfg) => Box::new(
            common::tls_connect(*a, cfg.clone())
                .await
                .unwrap_or_else(|e| panic!("TLS to {a}: {e}")),
        ),
    };
    let code = common::mqtt_connect(&mut c, client_id, Duration::from_secs(10)).await;
    assert_eq!(code, 0, "CONNACK for {client_id}");
    c
}

fn put_publish(out: &mut Vec<u8>, topic: &str, qos: u8, pid: u16, payload: &[u8]) {
    let mut len = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + payload.len();
    out.push(0x30 | (qos << 1));
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic.as_bytes());
    if qos > 0 {
        out.extend_from_slice(&pid.to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// Payload: tag, id, send time, padding to `size`.
fn fill_payload(buf: &mut Vec<u8>, tag: u8, id: u32, size: usize) {
    buf.clear();
    buf.push(tag);
    buf.extend_from_slice(&id.to_le_bytes());
    buf.extend_from_slice(&now_ns().to_le_bytes());
    buf.resize(size, b'x');
}

struct StreamResult {
    /// PUBLISH written -> PUBACK read, measured messages only.
    lat_us: Vec<u32>,
    first_send: Option<Instant>,
    last_ack: Instant,
}

/// Publish `warm + n` QoS 1 messages on one connection with at most `window` unacknowledged
/// (a closed loop: every PUBACK lets one more go). Payload ids are `id0 + i`.
#[allow(clippy::too_many_arguments)]
async fn publish_stream(
    mut c: Conn,
    topic: String,
    tag: u8,
    id0: u32,
    warm: usize,
    n: usize,
    window: usize,
    size: usize,
    deadline: Instant,
) -> StreamResult {
    let total = warm + n;
    let mut sent_at: Vec<Option<(Instant, bool)>> = vec![None; 65536];
    let mut out = Vec::with_capacity(64 * 1024);
    let mut payload = Vec::with_capacity(size);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut lat_us = Vec::with_capacity(n);
    let (mut next, mut acked, mut outstanding) = (0usize, 0usize, 0usize);
    let mut first_send = None;
    let mut last_ack = Instant::now();
    while acked < total {
        if outstanding < window && next < total {
            let now = Instant::now();
            while outstanding < window && next < total {
                let pid = (next % 65535) as u16 + 1;
                fill_payload(&mut payload, tag, id0 + next as u32, size);
                put_publish(&mut out, &topic, 1, pid, &payload);
                let measured = next >= warm;
                if measured && first_send.is_none() {
                    first_send = Some(now);
                }
                sent_at[pid as usize] = Some((now, measured));
                next += 1;
                outstanding += 1;
            }
            c.write_all(&out).await.expect("write PUBLISH");
            c.flush().await.expect("flush");
            out.clear();
        }
        buf.reserve(32 * 1024);
        let left = deadline.saturating_duration_since(Instant::now());
        let r = tokio::time::timeout(left, c.read_buf(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{topic}: {acked} of {total} acknowledged by the deadline"));
        match r {
            Ok(0) => panic!("{topic}: connection closed after {acked} of {total} PUBACKs"),
            Ok(_) => {}
            Err(e) => panic!("{topic}: {e}"),
        }
        let now = Instant::now();
        while let Some((ptype, _, hdr, len)) = mqtt::frame(&buf, 1 << 24).expect("frame") {
            if ptype == mqtt::PUBACK {
                let pid = u16::from_be_bytes([buf[hdr], buf[hdr + 1]]);
                if let Some((t0, measured)) = sent_at[pid as usize].take() {
                    if measured {
                        lat_us.push((now - t0).as_micros().min(u32::MAX as u128) as u32);
                    }
                    acked += 1;
                    outstanding -= 1;
                    last_ack = now;
                }
            }
            buf.advance(len);
        }
    }
    let _ = c.write_all(&common::wire::DISCONNECT).await;
    let _ = c.flush().await;
    StreamResult {
        lat_us,
        first_send,
        last_ack,
    }
}

#[derive(Clone, Copy, Default)]
struct LoadResult {
    rate: f64,
    p50: f64,
    p99: f64,
}

/// Several connections at once; aggregate rate and latency percentiles.
async fn run_load(
    conns: Vec<(Conn, String)>,
    tag: u8,
    warm: usize,
    per_conn: usize,
    window: usize,
    size: usize,
    limit: Duration,
) -> LoadResult {
    let deadline = Instant::now() + limit;
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, (c, topic))| {
            tokio::spawn(publish_stream(
                c,
                topic,
                tag,
                (i * (warm + per_conn)) as u32,
                warm,
                per_conn,
                window,
                size,
                deadline,
            ))
        })
        .collect();
    let mut lat = Vec::new();
    let mut start: Option<Instant> = None;
    let mut end: Option<Instant> = None;
    for t in tasks {
        let r = t.await.expect("publisher task");
        lat.extend_from_slice(&r.lat_us);
        if let Some(s) = r.first_send {
            start = Some(start.map_or(s, |x: Instant| x.min(s)));
        }
        end = Some(end.map_or(r.last_ack, |x: Instant| x.max(r.last_ack)));
    }
    lat.sort_unstable();
    let secs = match (start, end) {
        (Some(s), Some(e)) => (e - s).as_secs_f64().max(1e-6),
        _ => f64::NAN,
    };
    LoadResult {
        rate: lat.len() as f64 / secs,
        p50: pct_ms(&lat, 50.0),
        p99: pct_ms(&lat, 99.0),
    }
}

// ------------------------------------------------------------------------------------------
// Cloud-side subscriber: counts what arrives per payload tag (unique ids, duplicates, first
// and last arrival, arrivals per 100 ms).

#[derive(Default)]
struct Tally {
    n: u64,
    unique: u64,
    dups: u64,
    first_ns: u64,
    last_ns: u64,
    seen: Vec<u64>,
    per_100ms: Vec<u32>,
}

impl Tally {
    fn add(&mut self, id: u32, now: u64) {
        if self.n == 0 {
            self.first_ns = now;
        }
        self.n += 1;
        self.last_ns = now;
        let (w, b) = (id as usize / 64, id % 64);
        if self.seen.len() <= w {
            self.seen.resize(w + 1, 0);
        }
        if self.seen[w] & (1 << b) != 0 {
            self.dups += 1;
        } else {
            self.seen[w] |= 1 << b;
            self.unique += 1;
        }
        let slot = ((now - self.first_ns) / 100_000_000) as usize;
        if self.per_100ms.len() <= slot {
            self.per_100ms.resize(slot + 1, 0);
        }
        self.per_100ms[slot] += 1;
    }

    /// Messages per second from the first to the last arrival.
    fn rate(&self) -> f64 {
        if self.n < 2 {
            return f64::NAN;
        }
        (self.n - 1) as f64 / ((self.last_ns - self.first_ns) as f64 / 1e9)
    }

    /// Min and median of the per-second rates over whole seconds (10 x 100 ms slots).
    fn per_second(&self) -> (f64, f64, f64) {
        let secs: Vec<f64> = self
            .per_100ms
            .chunks(10)
            .filter(|c| c.len() == 10)
            .map(|c| c.iter().map(|&x| x as f64).sum())
            .collect();
        if secs.is_empty() {
            return (f64::NAN, f64::NAN, f64::NAN);
        }
        let min = secs.iter().copied().fold(f64::INFINITY, f64::min);
        let max = secs.iter().copied().fold(0.0, f64::max);
        (min, median(&secs), max)
    }
}

type Tallies = Arc<Mutex<HashMap<u8, Tally>>>;

const TAG_INGEST: u8 = 0;
const TAG_DRAIN: u8 = 1;
const TAG_DIRECT: u8 = 2;
const TAG_DIRECT_PROXY: u8 = 3;
const TAG_DIRECT_AFTER: u8 = 4;

async fn start_cloud_subscriber(target: Target, filter: &str, tallies: Tallies) {
    let mut c = open(&target, "cloud-app").await;
    common::mqtt_subscribe(&mut c, filter, 1).await;
    tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(256 * 1024);
        let mut acks = Vec::with_capacity(16 * 1024);
        loop {
            buf.reserve(128 * 1024);
            match c.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let now = now_ns();
            {
                let mut t = tallies.lock().unwrap();
                while let Ok(Some((ptype, flags, hdr, len))) = mqtt::frame(&buf, 1 << 24) {
                    if ptype == mqtt::PUBLISH {
                        let body = &buf[hdr..len];
                        let tl = u16::from_be_bytes([body[0], body[1]]) as usize;
                        let mut off = 2 + tl;
                        if (flags >> 1) & 3 > 0 {
                            acks.extend_from_slice(&[0x40, 2, body[off], body[off + 1]]);
                            off += 2;
                        }
                        let pl = &body[off..];
                        if pl.len() >= HEADER {
                            let id = u32::from_le_bytes(pl[1..5].try_into().unwrap());
                            t.entry(pl[0]).or_default().add(id, now);
                        }
                    }
                    buf.advance(len);
                }
            }
            if !acks.is_empty() {
                if c.write_all(&acks).await.is_err() || c.flush().await.is_err() {
                    break;
                }
                acks.clear();
            }
        }
    });
}

// ------------------------------------------------------------------------------------------
// Local latency prober: publish (QoS 1) on a non-uplink topic at a fixed rate, receive it on
// a local subscriber (QoS 0), both on the plain listener.

const PROBE_TOPIC: &str = "bench/local/latency";

struct Prober {
    stop: Arc<AtomicBool>,
    /// (send time ns, latency us)
    samples: Arc<Mutex<Vec<(u64, u32)>>>,
    task: tokio::task::JoinHandle<()>,
}

async fn start_prober(plain: SocketAddr, period: Duration) -> Prober {
    let mut sub = common::plain_session(plain, "bench-lat-sub").await;
    common::mqtt_subscribe(&mut sub, PROBE_TOPIC, 0).await;
    let publ = common::plain_session(plain, "bench-lat-pub").await;
    let samples = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = samples.clone();
    tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(16 * 1024);
        loop {
            buf.reserve(8 * 1024);
            match sub.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let now = now_ns();
            while let Ok(Some((ptype, flags, hdr, len))) = mqtt::frame(&buf, 1 << 20) {
                if ptype == mqtt::PUBLISH {
                    let body = &buf[hdr..len];
                    let tl = u16::from_be_bytes([body[0], body[1]]) as usize;
                    let off = 2 + tl + if (flags >> 1) & 3 > 0 { 2 } else { 0 };
                    if let Some(b) = body.get(off..off + 8) {
                        let sent = u64::from_le_bytes(b.try_into().unwrap());
                        let lat = (now.saturating_sub(sent) / 1000).min(u32::MAX as u64) as u32;
                        s2.lock().unwrap().push((sent, lat));
                    }
                }
                buf.advance(len);
            }
        }
    });
    let (mut rd, mut wr) = publ.into_split();
    tokio::spawn(async move {
        let mut b = vec![0u8; 4096];
        while matches!(rd.read(&mut b).await, Ok(n) if n > 0) {}
    });
    let st = stop.clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut pid: u16 = 0;
        let mut out = Vec::new();
        while !st.load(Ordering::Relaxed) {
            tick.tick().await;
            pid = pid % 65535 + 1;
            out.clear();
            put_publish(&mut out, PROBE_TOPIC, 1, pid, &now_ns().to_le_bytes());
            if wr.write_all(&out).await.is_err() {
                break;
            }
        }
        let _ = wr.write_all(&common::wire::DISCONNECT).await;
    });
    Prober {
        stop,
        samples,
        task,
    }
}

impl Prober {
    /// Latency percentiles of the probes sent in [from, to) (ns since BASE).
    fn window(&self, from: u64, to: u64) -> (usize, f64, f64, f64) {
        let mut v: Vec<u32> = self
            .samples
            .lock()
            .unwrap()
            .iter()
            .filter(|(s, _)| *s >= from && *s < to)
            .map(|(_, l)| *l)
            .collect();
        v.sort_unstable();
        (
            v.len(),
            pct_ms(&v, 50.0),
            pct_ms(&v, 99.0),
            v.last().map(|&x| x as f64 / 1000.0).unwrap_or(f64::NAN),
        )
    }
}

// ------------------------------------------------------------------------------------------
// Phase 1: durable ingest

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Row {
    Other,
    UplinkOffline,
    UplinkOnline,
}

impl Row {
    fn label(self) -> &'static str {
        match self {
            Row::Other => "devices/{id}/other (not uplink, no queue)",
            Row::UplinkOffline => "devices/{id}/telemetry/bench, link Offline",
            Row::UplinkOnline => "devices/{id}/telemetry/bench, link Online",
        }
    }
    fn topic(self, id: &str) -> String {
        match self {
            Row::Other => format!("devices/{id}/other"),
            _ => format!("devices/{id}/telemetry/bench"),
        }
    }
}

struct IngestRows {
    loaded: HashMap<Row, Vec<LoadResult>>,
    unloaded: HashMap<Row, Vec<LoadResult>>,
    cpu: HashMap<Row, Vec<CpuUse>>,
}

fn ingest_phase(rt: &tokio::runtime::Runtime, p: &Params) {
    println!();
    println!("== 1. Durable ingest ==");
    let rig = Rig::start(p, true);
    rig.must_be_online(true);
    let ids: Vec<String> = (0..p.devices).map(|i| format!("dev-{i}")).collect();
    let tls: Vec<Arc<rustls::ClientConfig>> = ids
        .iter()
        .map(|id| common::device_tls_config(&rig.gw.issue(id)))
        .collect();
    let per_conn = (p.ingest / p.devices).max(1);
    let warm = (p.window * 10).min(per_conn);
    println!(
        "load: {} connections x window {} in flight, QoS 1, {} B payload, {} messages measured per row and run \
         (+{} warm-up per connection); unloaded pass: 1 connection, 1 in flight, {} messages; {} runs, medians",
        p.devices,
        p.window,
        p.size,
        per_conn * p.devices,
        warm,
        p.ping,
        p.runs
    );
    let limit = p.timeout;
    let mut tables = Vec::new();
    for listener in ["TLS", "plain"] {
        let target = |i: usize| match listener {
            "TLS" => Target::Tls(rig.gw.mqtts(), tls[i].clone()),
            _ => Target::Plain(rig.gw.plain()),
        };
        let mut rows = IngestRows {
            loaded: HashMap::new(),
            unloaded: HashMap::new(),
            cpu: HashMap::new(),
        };
        let measure = |row: Row, rows: &mut IngestRows| {
            let conns = rt.block_on(async {
                let mut v = Vec::new();
                for (i, id) in ids.iter().enumerate() {
                    v.push((open(&target(i), id).await, row.topic(id)));
                }
                v
            });
            let perf = if !rows.loaded.contains_key(&row) {
                perf_start(rig.gw_pid(), &format!("ingest-{listener}-{row:?}"))
            } else {
                None
            };
            let c0 = rig.cpu();
            let r = rt.block_on(run_load(
                conns, TAG_INGEST, warm, per_conn, p.window, p.size, limit,
            ));
            let c1 = rig.cpu();
            perf_stop(perf);
            let one = rt.block_on(async {
                let c = open(&target(0), &ids[0]).await;
                run_load(
                    vec![(c, row.topic(&ids[0]))],
                    TAG_INGEST,
                    20,
                    p.ping,
                    1,
                    p.size,
                    limit,
                )
                .await
            });
            println!(
                "  {listener:<5} {:<44} {:>9.0} msg/s  p50 {:>7.2} ms  p99 {:>7.2} ms | unloaded p50 {:>6.2} ms  p99 {:>6.2} ms",
                row.label(),
                r.rate,
                r.p50,
                r.p99,
                one.p50,
                one.p99
            );
            rows.loaded.entry(row).or_default().push(r);
            rows.unloaded.entry(row).or_default().push(one);
            rows.cpu.entry(row).or_default().push(cpu_use(c0, c1));
        };
        for run in 0..p.runs {
            println!("  run {} ({listener}), load avg {}", run + 1, loadavg());
            rig.proxy.set(Fault::Blackhole);
            rig.must_be_online(false);
            let order = if run % 2 == 0 {
                [Row::Other, Row::UplinkOffline]
            } else {
                [Row::UplinkOffline, Row::Other]
            };
            for row in order {
                measure(row, &mut rows);
            }
            rig.proxy.set(Fault::Pass);
            rig.must_be_online(true);
            if rig
                .wait_metric("outpost_uplink_queue_depth", limit, |d| d == 0)
                .is_none()
            {
                panic!("the queue did not drain after run {}", run + 1);
            }
            measure(Row::UplinkOnline, &mut rows);
        }
        tables.push((listener, rows));
    }

    println!();
    println!(
        "Durable ingest, medians of {} runs ({} connections x {} in flight, {} B):",
        p.runs, p.devices, p.window, p.size
    );
    println!(
        "  {:<6}{:<46}{:>10}{:>9}{:>9}  |{:>9}{:>9}  | CPU outpost",
        "", "topic", "msg/s", "p50 ms", "p99 ms", "1-in-fl", "p99 ms"
    );
    for (listener, rows) in &tables {
        let med = |m: &HashMap<Row, Vec<LoadResult>>, row: Row, f: fn(&LoadResult) -> f64| {
            median(&m[&row].iter().map(f).collect::<Vec<_>>())
        };
        for row in [Row::Other, Row::UplinkOffline, Row::UplinkOnline] {
            let cpu = median(&rows.cpu[&row].iter().map(|c| c.outpost).collect::<Vec<_>>());
            println!(
                "  {listener:<6}{:<46}{:>10.0}{:>9.2}{:>9.2}  |{:>9.2}{:>9.2}  | {:>4.0}%",
                row.label(),
                med(&rows.loaded, row, |r| r.rate),
                med(&rows.loaded, row, |r| r.p50),
                med(&rows.loaded, row, |r| r.p99),
                med(&rows.unloaded, row, |r| r.p50),
                med(&rows.unloaded, row, |r| r.p99),
                cpu
            );
        }
        for row in [Row::UplinkOffline, Row::UplinkOnline] {
            let o = |m: &HashMap<Row, Vec<LoadResult>>, f: fn(&LoadResult) -> f64| {
                (med(m, row, f), med(m, Row::Other, f))
            };
            let (ru, ro) = o(&rows.loaded, |r| r.rate);
            let (pu, po) = o(&rows.loaded, |r| r.p50);
            let (qu, qo) = o(&rows.loaded, |r| r.p99);
            let (uu, uo) = o(&rows.unloaded, |r| r.p50);
            let (vu, vo) = o(&rows.unloaded, |r| r.p99);
            println!(
                "  {listener:<6}{:<46}{:>9.2}x{:>+9.2}{:>+9.2}  |{:>+9.2}{:>+9.2}",
                format!(
                    "ratio/added: {} vs other",
                    if row == Row::UplinkOffline {
                        "Offline"
                    } else {
                        "Online"
                    }
                ),
                ru / ro,
                pu - po,
                qu - qo,
                uu - uo,
                vu - vo
            );
        }
    }
    println!(
        "  (ratio = uplink msg/s / other msg/s; latency columns = uplink minus other, ms; \
         CPU = outpost's share of one core during the loaded pass)"
    );
    println!(
        "  group commits: {} for {} appended messages",
        rig.metric("outpost_uplink_queue_group_commits_total"),
        rig.metric("outpost_uplink_queue_appended_total")
    );
}

// ------------------------------------------------------------------------------------------
// Phase "durability" (issue 10): durable ingest with the store's fdatasyncs against the same
// gateway build with them skipped (`OUTPOST_UNSAFE_SKIP_FDATASYNC=1`: sled's flush only, the
// guarantee before issue 10), in one run, plus the cost of one fdatasync on this disk.

fn durability_phase(rt: &tokio::runtime::Runtime, p: &Params) {
    println!();
    println!("== D. Durability against power loss: fdatasync vs skipped, TLS, link Offline ==");
    let skip_var = outpost::store::UNSAFE_SKIP_FDATASYNC;
    let mut rigs = Vec::new();
    for skip in [false, true] {
        if skip {
            std::env::set_var(skip_var, "1");
        } else {
            std::env::remove_var(skip_var);
        }
        let rig = Rig::start(p, true);
        std::env::remove_var(skip_var);
        rig.must_be_online(true);
        rig.proxy.set(Fault::Blackhole);
        rig.must_be_online(false);
        rigs.push((if skip { "skip-fdatasync" } else { "durable" }, rig));
    }
    let ids: Vec<String> = (0..p.devices).map(|i| format!("dev-{i}")).collect();
    let tls: Vec<Vec<Arc<rustls::ClientConfig>>> = rigs
        .iter()
        .map(|(_, rig)| {
            ids.iter()
                .map(|id| common::device_tls_config(&rig.gw.issue(id)))
                .collect()
        })
        .collect();
    let per_conn = (p.ingest / p.devices).max(1);
    let warm = (p.window * 10).min(per_conn);
    let limit = p.timeout;
    println!(
        "load: {} TLS connections x window {}, QoS 1, {} B, {} messages per row and run; unloaded: 1 x 1, {} messages; {} runs, medians",
        p.devices, p.window, p.size, per_conn * p.devices, p.ping, p.runs
    );
    // (mode, row) -> (loaded, unloaded)
    let mut res: HashMap<(usize, Row), (Vec<LoadResult>, Vec<LoadResult>)> = HashMap::new();
    for run in 0..p.runs {
        println!("  run {}, load avg {}", run + 1, loadavg());
        let modes: Vec<usize> = if run % 2 == 0 { vec![0, 1] } else { vec![1, 0] };
        for m in modes {
            let (name, rig) = &rigs[m];
            let order = if run % 2 == 0 {
                [Row::Other, Row::UplinkOffline]
            } else {
                [Row::UplinkOffline, Row::Other]
            };
            for row in order {
                let target = |i: usize| Target::Tls(rig.gw.mqtts(), tls[m][i].clone());
                let (r, one) = rt.block_on(async {
                    let mut conns = Vec::new();
                    for (i, id) in ids.iter().enumerate() {
                        conns.push((open(&target(i), id).await, row.topic(id)));
                    }
                    let r =
                        run_load(conns, TAG_INGEST, warm, per_conn, p.window, p.size, limit).await;
                    let c = open(&target(0), &ids[0]).await;
                    let one = run_load(
                        vec![(c, row.topic(&ids[0]))],
                        TAG_INGEST,
                        20,
                        p.ping,
                        1,
                        p.size,
                        limit,
                    )
                    .await;
                    (r, one)
                });
                println!(
                    "    {name:<15} {:<44} {:>9.0} msg/s  p99 {:>7.2} ms | unloaded p99 {:>6.2} ms",
                    row.label(),
                    r.rate,
                    r.p99,
                    one.p99
                );
                let e = res.entry((m, row)).or_default();
                e.0.push(r);
                e.1.push(one);
            }
        }
    }
    println!();
    println!("Durability, medians of {} runs:", p.runs);
    println!(
        "  {:<16}{:>12}{:>12}{:>8}{:>14}{:>16}{:>14}",
        "mode", "uplink/s", "other/s", "ratio", "p99 added ms", "1-in-fl p99 ms", "1-in-fl added"
    );
    for (m, (name, rig)) in rigs.iter().enumerate() {
        let med = |row: Row, loaded: bool, f: fn(&LoadResult) -> f64| {
            let (l, u) = &res[&(m, row)];
            median(
                &(if loaded { l } else { u })
                    .iter()
                    .map(f)
                    .collect::<Vec<_>>(),
            )
        };
        let (ru, ro) = (
            med(Row::UplinkOffline, true, |r| r.rate),
            med(Row::Other, true, |r| r.rate),
        );
        println!(
            "  {name:<16}{ru:>12.0}{ro:>12.0}{:>7.2}x{:>+14.2}{:>16.2}{:>+14.2}",
            ru / ro,
            med(Row::UplinkOffline, true, |r| r.p99) - med(Row::Other, true, |r| r.p99),
            med(Row::UplinkOffline, false, |r| r.p99),
            med(Row::UplinkOffline, false, |r| r.p99) - med(Row::Other, false, |r| r.p99),
        );
        println!(
            "  {:<16}group commits: {} for {} appended messages",
            "",
            rig.metric("outpost_uplink_queue_group_commits_total"),
            rig.metric("outpost_uplink_queue_appended_total")
        );
    }
    flush_cost(rigs[0].1.gw.data_dir.as_path());
}

/// The cost of one fdatasync on the disk of `dir`: append then fdatasync, p50/p99.
fn flush_cost(dir: &Path) {
    use std::io::Write;
    let path = dir.join("bench-fdatasync.tmp");
    for size in [128usize, 4096, 65536] {
        let mut f = std::fs::File::create(&path).expect("create");
        let buf = vec![0x5au8; size];
        let mut us: Vec<u32> = Vec::new();
        for _ in 0..300 {
            f.write_all(&buf).expect("write");
            let t = Instant::now();
            f.sync_data().expect("fdatasync");
            us.push(t.elapsed().as_micros() as u32);
        }
        us.sort_unstable();
        println!(
            "  one fdatasync after appending {size:>6} B (this disk, 300 samples): p50 {:.3} ms  p99 {:.3} ms",
            pct_ms(&us, 50.0),
            pct_ms(&us, 99.0)
        );
    }
    let _ = std::fs::remove_file(&path);
}

// ------------------------------------------------------------------------------------------
// Phase 2: drain rate (and local latency during the drain), then phase 3 on the same rig.

fn wait_tally(tallies: &Tallies, tag: u8, n: u64, limit: Duration) -> bool {
    let t0 = Instant::now();
    loop {
        let got = tallies.lock().unwrap().get(&tag).map_or(0, |t| t.unique);
        if got >= n {
            return true;
        }
        if t0.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// (rate, received, unique, duplicates, seconds, per-second (min, median, max)).
type Summary = (f64, u64, u64, u64, f64, (f64, f64, f64));

fn tally_summary(tallies: &Tallies, tag: u8) -> Option<Summary> {
    let t = tallies.lock().unwrap();
    let t = t.get(&tag)?;
    Some((
        t.rate(),
        t.n,
        t.unique,
        t.dups,
        (t.last_ns - t.first_ns) as f64 / 1e9,
        t.per_second(),
    ))
}

fn drain_phase(rt: &tokio::runtime::Runtime, p: &Params, rig: &Rig) {
    println!();
    println!("== 2. Drain rate ==");
    let filter = "outpost/gw-test/devices/+/telemetry/#";
    let tallies: Tallies = Arc::default();
    rt.block_on(start_cloud_subscriber(
        Target::Tls(
            SocketAddr::from(([127, 0, 0, 1], rig.cloud.port)),
            rig.cloud_tls("cloud-app"),
        ),
        filter,
        tallies.clone(),
    ));
    // Mosquitto's own ingest: a direct QoS 1 publisher with the uplink's window.
    let direct_topic = "outpost/gw-test/devices/drct-0/telemetry/bench".to_string();
    let direct_run = |tag: u8, addr: SocketAddr| {
        let c0 = rig.cpu();
        let r = rt.block_on(async {
            let c = open(
                &Target::Tls(addr, rig.cloud_tls("cloud-direct")),
                "cloud-direct",
            )
            .await;
            run_load(
                vec![(c, direct_topic.clone())],
                tag,
                0,
                p.direct,
                p.inflight,
                p.size,
                p.timeout,
            )
            .await
        });
        let ok = wait_tally(&tallies, tag, p.direct as u64, Duration::from_secs(60));
        let c1 = rig.cpu();
        (r, ok, cpu_use(c0, c1))
    };
    // Before the outage and again after the drain, so that a change in the machine's load
    // shows.
    let (db_pub, db_ok, db_cpu) = direct_run(
        TAG_DIRECT,
        SocketAddr::from(([127, 0, 0, 1], rig.cloud.port)),
    );
    let direct_before = tally_summary(&tallies, TAG_DIRECT);

    rig.outage(true);
    rig.must_be_online(false);

    // Backlog through the plain listener.
    let loaders = p.devices;
    let per = p.backlog.div_ceil(loaders);
    let total = per * loaders;
    let load_cpu0 = rig.cpu();
    let t0 = Instant::now();
    let load = rt.block_on(async {
        let mut v = Vec::new();
        for i in 0..loaders {
            let id = format!("load-{i}");
            v.push((
                open(&Target::Plain(rig.gw.plain()), &id).await,
                format!("devices/{id}/telemetry/bench"),
            ));
        }
        run_load(v, TAG_DRAIN, 0, per, p.inflight, p.size, p.timeout).await
    });
    let load_secs = t0.elapsed().as_secs_f64();
    let load_cpu = cpu_use(load_cpu0, rig.cpu());
    let depth = rig
        .wait_metric("outpost_uplink_queue_depth", Duration::from_secs(60), |d| {
            d >= total as i64
        })
        .unwrap_or_else(|| rig.metric("outpost_uplink_queue_depth"));
    let qbytes = rig.metric("outpost_uplink_queue_bytes");
    let disk = dir_size(&rig.gw.data_dir);
    println!(
        "backlog: {total} x {} B loaded through the plain listener ({loaders} connections x {} in flight) in {load_secs:.1} s \
         = {:.0} msg/s (ack p50 {:.2} ms, p99 {:.2} ms); queue depth {depth}, {:.0} MB queued, data dir {:.0} MB",
        p.size,
        p.inflight,
        load.rate,
        load.p50,
        load.p99,
        qbytes as f64 / 1e6,
        disk as f64 / 1e6
    );
    println!("  {load_cpu}");
    assert!(
        tallies.lock().unwrap().get(&TAG_DRAIN).is_none(),
        "messages went through the blackhole"
    );

    // Idle local latency, then restore and drain with the prober still running.
    let mut prober = rt.block_on(start_prober(rig.gw.plain(), p.probe));
    std::thread::sleep(Duration::from_millis(300));
    let idle_from = now_ns();
    std::thread::sleep(p.idle);
    let idle_to = now_ns();
    let c0 = rig.cpu();
    let la0 = loadavg();
    let perf = perf_start(rig.gw_pid(), "drain");
    let t_restore = Instant::now();
    let restore_ns = now_ns();
    rig.outage(false);
    let online_after = rig.wait_online(true, Duration::from_secs(30));
    let done = wait_tally(&tallies, TAG_DRAIN, total as u64, p.timeout);
    let drained_in = t_restore.elapsed();
    let c1 = rig.cpu();
    perf_stop(perf);
    let empty = rig.wait_metric("outpost_uplink_queue_depth", Duration::from_secs(30), |d| {
        d == 0
    });
    let drain_end_ns = now_ns();
    std::thread::sleep(Duration::from_millis(500));
    prober.stop.store(true, Ordering::Relaxed);
    let _ = rt.block_on(&mut prober.task);
    let (first_ns, _) = {
        let t = tallies.lock().unwrap();
        t.get(&TAG_DRAIN)
            .map(|t| (t.first_ns, t.last_ns))
            .unwrap_or((drain_end_ns, drain_end_ns))
    };
    let drain = tally_summary(&tallies, TAG_DRAIN);
    let idle_lat = prober.window(idle_from, idle_to);
    let drain_lat = prober.window(first_ns, drain_end_ns);
    let drain_cpu = cpu_use(c0, c1);
    let resent = rig.metric("outpost_uplink_resent_total");
    let la1 = loadavg();

    let (da_pub, da_ok, da_cpu) = direct_run(
        TAG_DIRECT_AFTER,
        SocketAddr::from(([127, 0, 0, 1], rig.cloud.port)),
    );
    let direct_after = tally_summary(&tallies, TAG_DIRECT_AFTER);
    // The same publisher through the proxy, when the drain went through it.
    let (dp_pub, dp_ok, dp_cpu) = if rig.via_proxy {
        let (r, ok, c) = direct_run(TAG_DIRECT_PROXY, rig.proxy.addr);
        (Some(r), ok, Some(c))
    } else {
        (None, false, None)
    };
    let direct_proxy = tally_summary(&tallies, TAG_DIRECT_PROXY);

    println!();
    println!(
        "Drain rate: {total} queued messages of {} B, uplink window {} (rumqttc, TLS {}), \
         cloud subscriber QoS 1 (TLS, straight to Mosquitto); outage: {}",
        p.size,
        p.inflight,
        if rig.via_proxy {
            "via the test proxy"
        } else {
            "straight to Mosquitto"
        },
        if rig.via_proxy {
            "proxy blackhole"
        } else {
            "Mosquitto frozen (SIGSTOP/SIGCONT)"
        }
    );
    if let Some(d) = online_after {
        println!(
            "  restore -> Online {:.0} ms; restore -> first message at the cloud {:.0} ms",
            d.as_secs_f64() * 1e3,
            (first_ns.saturating_sub(restore_ns)) as f64 / 1e6
        );
    }
    let row = |name: &str, s: &Option<Summary>, note: &str| {
        match s {
            Some((rate, n, u, dups, secs, (mn, md, mx))) => println!(
                "  {name:<44}{rate:>10.0} msg/s  ({u} unique of {n} received, {dups} duplicates, {secs:.1} s; per second min {mn:.0} / median {md:.0} / max {mx:.0}){note}"
            ),
            None => println!("  {name:<44}       n/a  (nothing received){note}"),
        }
    };
    row(
        "gateway drain -> cloud subscriber",
        &drain,
        if done { "" } else { "  INCOMPLETE (timeout)" },
    );
    let note = |ok: bool, r: &LoadResult| {
        format!(
            "{}; publisher acked {:.0} msg/s",
            if ok { "" } else { "  INCOMPLETE" },
            r.rate
        )
    };
    row(
        "direct publisher -> Mosquitto (before drain)",
        &direct_before,
        &note(db_ok, &db_pub),
    );
    row(
        "direct publisher -> Mosquitto (after drain)",
        &direct_after,
        &note(da_ok, &da_pub),
    );
    if let Some(dp_pub) = &dp_pub {
        row(
            "direct publisher -> proxy -> Mosquitto",
            &direct_proxy,
            &note(dp_ok, dp_pub),
        );
    }
    if let (Some(d), Some(b), Some(a)) = (&drain, &direct_before, &direct_after) {
        let direct = (b.0 + a.0) / 2.0;
        let ratio = d.0 / direct * 100.0;
        println!(
            "  ratio drain / direct (mean of before and after, {direct:.0} msg/s): {ratio:.0} % (target >= 80 %: {}); \
             against before only {:.0} %, after only {:.0} %",
            if ratio >= 80.0 { "met" } else { "MISSED" },
            d.0 / b.0 * 100.0,
            d.0 / a.0 * 100.0
        );
    }
    println!(
        "  restore -> all {total} at the cloud: {:.1} s; queue empty: {}; gateway resent (possible duplicates): {resent}",
        drained_in.as_secs_f64(),
        if empty.is_some() { "yes" } else { "NO" }
    );
    println!("  during the drain: {drain_cpu}; load avg {la0} -> {la1}");
    println!("  direct before:    {db_cpu}");
    println!("  direct after:     {da_cpu}");
    if let Some(dp_cpu) = dp_cpu {
        println!("  direct via proxy: {dp_cpu}");
    }
    println!();
    println!(
        "Local traffic during the drain (plain listener, QoS 1 publish every {} ms on {PROBE_TOPIC} -> local QoS 0 subscriber):",
        p.probe.as_millis()
    );
    for (name, (n, p50, p99, max)) in [
        ("idle (backlog queued, link down)", idle_lat),
        ("during the drain", drain_lat),
    ] {
        println!(
            "  {name:<44} p50 {p50:>7.2} ms  p99 {p99:>7.2} ms  max {max:>7.2} ms  ({n} samples)"
        );
    }
}

fn detect_phase(p: &Params, rig: &Rig) {
    println!();
    println!("== 3. Detection ==");
    rig.proxy.set(Fault::Pass);
    rig.must_be_online(true);
    let mut rng = rand::thread_rng();
    let mut down = Vec::new();
    let mut up = Vec::new();
    let mut connects = rig.metric("outpost_uplink_connects_total");
    let log_from = rig.gw.log().len();
    for i in 0..p.outages {
        // Wait for the MQTT session itself (not only the probes), then a random phase.
        let _ = rig.wait_metric(
            "outpost_uplink_connects_total",
            Duration::from_secs(15),
            |c| c > connects || i == 0,
        );
        std::thread::sleep(Duration::from_millis(rng.gen_range(500..1500)));
        connects = rig.metric("outpost_uplink_connects_total");
        rig.proxy.set(Fault::Blackhole);
        let d = rig.wait_online(false, Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(rng.gen_range(1000..2000)));
        rig.proxy.set(Fault::Pass);
        let u = rig.wait_online(true, Duration::from_secs(30));
        let ms = |x: Option<Duration>| x.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
        println!(
            "  outage {:>2}: blackhole -> Offline {:>6.0} ms, restore -> Online {:>6.0} ms",
            i + 1,
            ms(d),
            ms(u)
        );
        down.push(ms(d));
        up.push(ms(u));
    }
    let stats = |v: &[f64]| {
        let f: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        (
            f.iter().copied().fold(f64::INFINITY, f64::min),
            median(&f),
            f.iter().copied().fold(0.0, f64::max),
            v.len() - f.len(),
        )
    };
    let log = rig.gw.log();
    let mut reasons: HashMap<String, usize> = HashMap::new();
    for l in common::strip_ansi(log.get(log_from..).unwrap_or("")).lines() {
        for (arrow, name) in [
            ("Online -> Offline", "Offline"),
            ("Offline -> Online", "Online"),
        ] {
            if l.contains(arrow) {
                let r = l.split_once("reason=").map_or("?", |(_, r)| r.trim());
                *reasons.entry(format!("{name}: {r}")).or_default() += 1;
            }
        }
    }
    let cfg = outpost::uplink::DetectionConfig::default();
    println!();
    println!(
        "Detection over {} outages (metrics polled every 10 ms; detection interval {:?}, heartbeat timeout {:?}, \
         probe timeout {:?}, {} failure(s) to Offline, {} success(es) to Online):",
        p.outages,
        cfg.interval,
        cfg.heartbeat_timeout,
        cfg.probe_timeout,
        cfg.failures_to_offline,
        cfg.successes_to_online
    );
    for (name, v) in [("blackhole -> Offline", &down), ("restore -> Online", &up)] {
        let (mn, md, mx, missed) = stats(v);
        println!(
            "  {name:<22} min {mn:>6.0} ms  median {md:>6.0} ms  max {mx:>6.0} ms{}",
            if missed > 0 {
                format!("  ({missed} not detected within 30 s)")
            } else {
                String::new()
            }
        );
    }
    let mut reasons: Vec<_> = reasons.into_iter().collect();
    reasons.sort();
    for (r, n) in reasons {
        println!("  {n:>3} x {r}");
    }
}

fn main() {
    if !run_by_cargo_bench() {
        return;
    }
    let _ = BASE.get_or_init(Instant::now);
    let p = Params::from_env();
    let bin = common::BIN;
    print_title("Outpost uplink benchmarks");
    println!(
        "machine: {}; binary {}{}",
        machine(),
        bin,
        if bin.contains("/release/") {
            ""
        } else {
            " (NOT a release build)"
        }
    );
    println!(
        "cloud: {}; params {:?}",
        cmd_out("mosquitto", &["-h"])
            .lines()
            .next()
            .unwrap_or("mosquitto"),
        p
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if p.phase("ingest") {
        ingest_phase(&rt, &p);
    }
    if p.phase("durability") {
        durability_phase(&rt, &p);
    }
    if p.phase("drain") {
        // The production path (the gateway straight to the cloud broker) unless asked.
        let rig = Rig::start(&p, p.drain_via_proxy);
        rig.must_be_online(true);
        drain_phase(&rt, &p, &rig);
    }
    if p.phase("detect") && p.outages > 0 {
        let rig = Rig::start(&p, true);
        rig.must_be_online(true);
        detect_phase(&p, &rig);
    }
    println!();
    println!("load avg at the end: {}", loadavg());
}
