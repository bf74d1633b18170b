//! `cargo bench --bench broker`: Outpost's TLS front door against Mosquitto 2 with TLS, side
//! by side in one run, on this machine, with the same load generator and message size.
//!
//! * Outpost: the release `outpost` binary (built by `cargo bench` for this target), started
//!   on 127.0.0.1:0 in a temp dir with mDNS off. The bench config adds `devices/+/bench` to
//!   `acl.device_subscribe` so that subscriber devices may read the publishers' topics.
//! * Mosquitto: `mosquitto` on a free 127.0.0.1 port, TLS with the *same* CA and the gateway's
//!   server certificate, client certificate required, identity as user name, no persistence.
//! * Load: `BENCH_PUBS` publisher devices `pub-i`, each publishing its share of `BENCH_MSGS`
//!   QoS 1 messages of `BENCH_SIZE` bytes to `devices/pub-i/bench` with at most
//!   `BENCH_WINDOW` unacknowledged; one subscriber device `sub-i` per publisher reads that
//!   topic at QoS 1. Every client is rumqttc over rustls (ring) with its own certificate.
//!   Each payload starts with the send time, so the subscriber measures end-to-end latency.
//! * After a warm-up (`BENCH_WARMUP` messages), each broker is measured `BENCH_RUNS` times,
//!   alternating, and the median of each figure is reported. Each run also has an unloaded
//!   pass (`BENCH_PING` messages, one publisher, one message in flight) for latency without
//!   queueing: under saturation latency is mostly in-flight messages / throughput.
//!
//! It also prints the idle RSS of both brokers (after start and with a few idle TLS
//! connections), Outpost's peak RSS, and the size of the release binary after `strip`.
//!
//! Environment: BENCH_MSGS (100000), BENCH_SIZE (256), BENCH_PUBS (4), BENCH_WINDOW (100),
//! BENCH_WARMUP (2000), BENCH_RUNS (3), BENCH_IDLE (4), BENCH_PING (2000), BENCH_TIMEOUT_S (180),
//! OUTPOST_BIN (default: the binary cargo built), MOSQUITTO (default: `mosquitto` on PATH or
//! /usr/sbin/mosquitto; "none": Outpost alone), BENCH_MOSQ_NODELAY (false), BENCH_MOSQ_INFLIGHT (100),
//! BENCH_OUTPOST_TOML (extra TOML appended to the gateway's config, e.g. "[broker]\n...";
//! not the sections the bench writes: gateway, listeners, metrics, mdns, acl).

mod support;

use bytes::Bytes;
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, Incoming, MqttOptions, NetworkOptions,
    Outgoing, QoS, SubscribeReasonCode, TlsConfiguration, Transport,
};
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use support::{cpu_model, env_or};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

/// Payload header: send time (ns since BASE, little endian) then the phase byte.
const HEADER: usize = 9;
const WARM: u8 = 0;
const MEASURE: u8 = 1;

static BASE: OnceLock<Instant> = OnceLock::new();

fn now_ns() -> u64 {
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

#[derive(Clone)]
struct Params {
    pubs: usize,
    per_pub: usize,
    size: usize,
    window: u16,
    warm_per_pub: usize,
    runs: usize,
    idle: usize,
    /// Messages of the unloaded latency pass.
    ping: usize,
    /// Send the next message only once the previous one was delivered (unloaded pass).
    lockstep: bool,
    timeout: Duration,
}

impl Params {
    fn from_env() -> Params {
        let pubs: usize = env_or("BENCH_PUBS", 4).max(1);
        let msgs: usize = env_or("BENCH_MSGS", 100_000);
        let warm: usize = env_or("BENCH_WARMUP", 2_000);
        let size: usize = env_or("BENCH_SIZE", 256);
        assert!(
            size >= HEADER,
            "BENCH_SIZE must be at least {HEADER} bytes (timestamp header)"
        );
        Params {
            pubs,
            per_pub: (msgs / pubs).max(1),
            size,
            window: env_or("BENCH_WINDOW", 100u16).max(1),
            warm_per_pub: warm / pubs,
            runs: env_or("BENCH_RUNS", 3usize).max(1),
            idle: env_or("BENCH_IDLE", 4),
            ping: env_or("BENCH_PING", 2_000usize).max(1),
            lockstep: false,
            timeout: Duration::from_secs(env_or("BENCH_TIMEOUT_S", 180)),
        }
    }

    fn total(&self) -> usize {
        self.per_pub * self.pubs
    }

    /// The unloaded pass: one publisher, one message in flight.
    fn unloaded(&self) -> Params {
        Params {
            pubs: 1,
            per_pub: self.ping,
            window: 1,
            warm_per_pub: 100,
            lockstep: true,
            ..self.clone()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

struct Proc {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn outpost_bin() -> PathBuf {
    if let Ok(p) = std::env::var("OUTPOST_BIN") {
        return PathBuf::from(p);
    }
    // Cargo builds the package's binaries (same profile as this bench: release) for benches.
    PathBuf::from(env!("CARGO_BIN_EXE_outpost"))
}

fn start_outpost(bin: &Path, dir: &Path) -> Proc {
    let data_dir = dir.join("data");
    // The default device subscribe patterns plus the publishers' topics.
    let mut subscribe = outpost::config::Config::default().acl.device_subscribe;
    subscribe.push("devices/+/bench".into());
    let subscribe = toml::Value::Array(subscribe.into_iter().map(toml::Value::String).collect());
    let config_path = dir.join("outpost.toml");
    let config = format!(
        r#"[gateway]
id = "gw-bench"
data_dir = "{}"

[listeners]
mqtts = "127.0.0.1:0"
plain = "127.0.0.1:0"

[metrics]
listen = "127.0.0.1:0"

[mdns]
enabled = false

[fdo]
enabled = false

[acl]
device_subscribe = {subscribe}

{extra}
"#,
        data_dir.display(),
        extra = std::env::var("BENCH_OUTPOST_TOML").unwrap_or_default(),
    );
    std::fs::write(&config_path, config).expect("write outpost config");
    let log = std::fs::File::create(dir.join("outpost.log")).expect("outpost log");
    let child = Command::new(bin)
        .args(["run", "--config"])
        .arg(&config_path)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let pid = child.id();
    let mut p = Proc {
        name: "outpost",
        child,
        addr: "127.0.0.1:1".parse().unwrap(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(ep) = outpost::Endpoints::read(&data_dir) {
            if ep.pid == pid {
                p.addr = ep.mqtts;
                return p;
            }
        }
        if let Ok(Some(st)) = p.child.try_wait() {
            panic!(
                "outpost exited with {st}: {}",
                std::fs::read_to_string(dir.join("outpost.log")).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "outpost not ready within 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn issue(bin: &Path, dir: &Path, id: &str) -> Creds {
    let out_dir = dir.join("certs");
    let out = Command::new(bin)
        .args(["ca", "issue-device", "--id", id, "--out"])
        .arg(&out_dir)
        .arg("--config")
        .arg(dir.join("outpost.toml"))
        .output()
        .expect("run outpost ca issue-device");
    assert!(
        out.status.success(),
        "issue-device {id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Creds {
        id: id.to_string(),
        cert: out_dir.join(format!("{id}.crt")),
        key: out_dir.join(format!("{id}.key")),
        ca: out_dir.join("ca.crt"),
    }
}

fn mosquitto_bin() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("MOSQUITTO") {
        // MOSQUITTO=none measures Outpost alone.
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/local/sbin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file())
}

fn mosquitto_version(bin: &Path) -> String {
    let out = Command::new(bin).arg("-h").output().ok();
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string()
    })
    .unwrap_or_default()
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// Mosquitto with the gateway's CA and server certificate (SAN 127.0.0.1), client
/// certificates required. Settings that change throughput are aligned with Outpost's:
/// 100 QoS 1 messages in flight per client (Outpost's `limits.max_inflight`; Mosquitto's
/// default is 20) and no queue limit (Outpost drops nothing either). `set_tcp_nodelay` stays
/// at Mosquitto's default (off), which was the faster setting here; BENCH_MOSQ_NODELAY=true
/// and BENCH_MOSQ_INFLIGHT=N try the alternatives.
fn start_mosquitto(bin: &Path, dir: &Path, gw_data: &Path) -> Proc {
    let mdir = dir.join("mosquitto");
    std::fs::create_dir_all(&mdir).unwrap();
    for f in ["ca.crt", "server.crt", "server.key"] {
        std::fs::copy(gw_data.join(f), mdir.join(f)).unwrap_or_else(|e| panic!("copy {f}: {e}"));
    }
    let port = free_port();
    let conf = format!(
        "# generated by benches/broker.rs\n\
         {user}\
         per_listener_settings false\n\
         persistence false\n\
         log_dest stderr\n\
         log_type error\n\
         log_type warning\n\
         connection_messages false\n\
         max_inflight_messages {inflight}\n\
         max_queued_messages 0\n\
         listener {port} 127.0.0.1\n\
         set_tcp_nodelay {nodelay}\n\
         cafile {d}/ca.crt\n\
         certfile {d}/server.crt\n\
         keyfile {d}/server.key\n\
         require_certificate true\n\
         use_identity_as_username true\n",
        // As root, mosquitto would switch to user `mosquitto`, who cannot read the temp dir.
        user = if running_as_root() { "user root\n" } else { "" },
        d = mdir.display(),
        nodelay = env_or("BENCH_MOSQ_NODELAY", false),
        inflight = env_or("BENCH_MOSQ_INFLIGHT", 100u32),
    );
    let conf_path = mdir.join("mosquitto.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let log = std::fs::File::create(mdir.join("mosquitto.log")).unwrap();
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf_path)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut p = Proc {
        name: "mosquitto",
        child,
        addr,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if let Ok(Some(st)) = p.child.try_wait() {
            panic!(
                "mosquitto exited with {st}: {}",
                std::fs::read_to_string(mdir.join("mosquitto.log")).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "mosquitto not listening on {addr} within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

/// A field of /proc/PID/status in kB.
fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// User + system CPU seconds consumed by a process so far.
fn cpu_seconds(pid: &str) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (ticks(11) + ticks(12)) / clock_ticks()
}

// ---------------------------------------------------------------------------------------------
// Load generator

#[derive(Clone)]
struct Creds {
    id: String,
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

fn client_tls(c: &Creds) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    let ca_pem = std::fs::read(&c.ca).expect("read ca.crt");
    for der in rustls_pemfile::certs(&mut ca_pem.as_slice()) {
        roots.add(der.expect("CA PEM")).expect("add CA");
    }
    let cert_pem = std::fs::read(&c.cert).expect("read device cert");
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .expect("device cert PEM");
    let key_pem = std::fs::read(&c.key).expect("read device key");
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .expect("key PEM")
        .expect("no key in PEM");
    let cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client certificate");
    Arc::new(cfg)
}

struct Identities {
    tls: HashMap<String, Arc<ClientConfig>>,
}

impl Identities {
    fn get(&self, id: &str) -> Arc<ClientConfig> {
        self.tls
            .get(id)
            .unwrap_or_else(|| panic!("no credentials for {id}"))
            .clone()
    }
}

async fn connect(
    addr: SocketAddr,
    id: &str,
    tls: Arc<ClientConfig>,
    p: &Params,
) -> Result<(AsyncClient, EventLoop), String> {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(true);
    o.set_inflight(p.window);
    let max = (p.size + 1024).max(10 * 1024);
    o.set_max_packet_size(max, max);
    // A rendezvous request channel: a message is stamped at most one window slot before the
    // event loop takes it, so generator-side queueing stays out of the latency figures.
    let (client, mut el) = AsyncClient::new(o, 0);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(10);
    el.set_network_options(net);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match tokio::time::timeout_at(deadline, el.poll()).await {
            Err(_) => return Err(format!("{id}: no CONNACK within 15 s")),
            Ok(Err(e)) => return Err(format!("{id}: {e}")),
            Ok(Ok(Event::Incoming(Incoming::ConnAck(a)))) => {
                if a.code != ConnectReturnCode::Success {
                    return Err(format!("{id}: CONNACK {:?}", a.code));
                }
                return Ok((client, el));
            }
            Ok(Ok(_)) => {}
        }
    }
}

#[derive(Default)]
struct SubReport {
    latencies_ns: Vec<u64>,
    last_ns: u64,
    error: Option<String>,
}

/// Drive a subscriber until DISCONNECT goes out (or the deadline): count warm-up messages,
/// record the end-to-end latency of measured ones.
async fn subscriber(
    mut el: EventLoop,
    warm_expected: usize,
    expected: usize,
    mut warm_done: Option<oneshot::Sender<()>>,
    mut done: Option<oneshot::Sender<()>>,
    delivered: Arc<Notify>,
    deadline: tokio::time::Instant,
) -> SubReport {
    let mut r = SubReport {
        latencies_ns: Vec::with_capacity(expected),
        ..Default::default()
    };
    let mut warm = 0usize;
    if warm_expected == 0 {
        let _ = warm_done.take().map(|t| t.send(()));
    }
    loop {
        let ev = tokio::select! {
            ev = el.poll() => ev,
            _ = tokio::time::sleep_until(deadline) => {
                r.error = Some("deadline reached".into());
                break;
            }
        };
        match ev {
            Ok(Event::Incoming(Incoming::Publish(p))) => {
                let t = now_ns();
                if p.payload.len() < HEADER {
                    continue;
                }
                let ts = u64::from_le_bytes(p.payload[..8].try_into().unwrap());
                delivered.notify_one();
                if p.payload[8] == WARM {
                    warm += 1;
                    if warm == warm_expected {
                        let _ = warm_done.take().map(|t| t.send(()));
                    }
                } else {
                    r.latencies_ns.push(t.saturating_sub(ts));
                    r.last_ns = t;
                    if r.latencies_ns.len() == expected {
                        let _ = done.take().map(|t| t.send(()));
                    }
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(e) => {
                r.error = Some(e.to_string());
                break;
            }
        }
    }
    r
}

#[derive(Default)]
struct PubReport {
    acks: usize,
    last_ack_ns: u64,
    error: Option<String>,
}

/// Drive a publisher's connection and count PUBACKs.
async fn publisher(
    mut el: EventLoop,
    expected_acks: usize,
    mut done: Option<oneshot::Sender<()>>,
    deadline: tokio::time::Instant,
) -> PubReport {
    let mut r = PubReport::default();
    loop {
        let ev = tokio::select! {
            ev = el.poll() => ev,
            _ = tokio::time::sleep_until(deadline) => {
                r.error = Some("deadline reached".into());
                break;
            }
        };
        match ev {
            Ok(Event::Incoming(Incoming::PubAck(_))) => {
                r.acks += 1;
                if r.acks == expected_acks {
                    r.last_ack_ns = now_ns();
                    let _ = done.take().map(|t| t.send(()));
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(e) => {
                r.error = Some(e.to_string());
                break;
            }
        }
    }
    r
}

/// Publish `n` messages; in lockstep, each only after the previous one was delivered.
async fn send(
    client: AsyncClient,
    topic: String,
    phase: u8,
    n: usize,
    size: usize,
    lockstep: Option<Arc<Notify>>,
) {
    for i in 0..n {
        if let (Some(d), true) = (&lockstep, i > 0) {
            // A lost message must not stall the pass: the run's deadline reports it.
            let _ = tokio::time::timeout(Duration::from_secs(5), d.notified()).await;
        }
        let mut b = vec![0u8; size];
        b[..8].copy_from_slice(&now_ns().to_le_bytes());
        b[8] = phase;
        if client
            .publish_bytes(topic.clone(), QoS::AtLeastOnce, false, Bytes::from(b))
            .await
            .is_err()
        {
            return;
        }
    }
}

async fn wait_all(rxs: Vec<oneshot::Receiver<()>>, deadline: tokio::time::Instant) -> bool {
    for rx in rxs {
        if !matches!(tokio::time::timeout_at(deadline, rx).await, Ok(Ok(()))) {
            return false;
        }
    }
    true
}

#[derive(Clone, Debug, Default)]
struct RunResult {
    delivered_per_s: f64,
    acked_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    lost: f64,
    broker_cpu_us: f64,
    gen_cpu_us: f64,
    errors: Vec<String>,
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i] as f64 / 1e6
}

/// One measured run against one broker: connect, subscribe, warm up, measure, disconnect.
async fn run_once(target: &Proc, p: &Params, ids: &Identities) -> RunResult {
    let deadline = tokio::time::Instant::now() + p.timeout;
    let mut errors = Vec::new();
    let mut clients = Vec::new();

    // Subscribers first, each confirmed by SUBACK.
    let mut subs: Vec<JoinHandle<SubReport>> = Vec::new();
    let (mut warm_rx, mut sub_rx) = (Vec::new(), Vec::new());
    let delivered: Vec<Arc<Notify>> = (0..p.pubs).map(|_| Arc::new(Notify::new())).collect();
    let lockstep = |i: usize| p.lockstep.then(|| delivered[i].clone());
    for (i, delivered) in delivered.iter().enumerate() {
        let id = format!("sub-{i}");
        let (c, mut el) = connect(target.addr, &id, ids.get(&id), p)
            .await
            .expect("subscriber connect");
        // The request channel is a rendezvous: the event loop must be polled to take it.
        let c2 = c.clone();
        let topic = format!("devices/pub-{i}/bench");
        tokio::spawn(async move { c2.subscribe(topic, QoS::AtLeastOnce).await });
        loop {
            match tokio::time::timeout(Duration::from_secs(10), el.poll()).await {
                Ok(Ok(Event::Incoming(Incoming::SubAck(a)))) => {
                    assert!(
                        matches!(
                            a.return_codes.first(),
                            Some(SubscribeReasonCode::Success(_))
                        ),
                        "{}: subscription refused: {:?}",
                        target.name,
                        a.return_codes
                    );
                    break;
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("{}: {id}: {e}", target.name),
                Err(_) => panic!("{}: {id}: no SUBACK in 10 s", target.name),
            }
        }
        let (wt, wr) = oneshot::channel();
        let (dt, dr) = oneshot::channel();
        warm_rx.push(wr);
        sub_rx.push(dr);
        subs.push(tokio::spawn(subscriber(
            el,
            p.warm_per_pub,
            p.per_pub,
            Some(wt),
            Some(dt),
            delivered.clone(),
            deadline,
        )));
        clients.push(c);
    }

    let mut pubs: Vec<JoinHandle<PubReport>> = Vec::new();
    let mut pub_clients = Vec::new();
    let mut ack_rx = Vec::new();
    for i in 0..p.pubs {
        let id = format!("pub-{i}");
        let (c, el) = connect(target.addr, &id, ids.get(&id), p)
            .await
            .expect("publisher connect");
        let (t, r) = oneshot::channel();
        ack_rx.push(r);
        pubs.push(tokio::spawn(publisher(
            el,
            p.warm_per_pub + p.per_pub,
            Some(t),
            deadline,
        )));
        pub_clients.push(c);
    }

    // Warm-up: same path, not measured.
    for (i, c) in pub_clients.iter().enumerate() {
        tokio::spawn(send(
            c.clone(),
            format!("devices/pub-{i}/bench"),
            WARM,
            p.warm_per_pub,
            p.size,
            lockstep(i),
        ));
    }
    if !wait_all(warm_rx, deadline).await {
        errors.push("warm-up did not complete".into());
    }

    let me = std::process::id().to_string();
    let (cpu_b0, cpu_g0) = (cpu_seconds(&target.pid().to_string()), cpu_seconds(&me));
    let t0 = now_ns();
    for (i, c) in pub_clients.iter().enumerate() {
        tokio::spawn(send(
            c.clone(),
            format!("devices/pub-{i}/bench"),
            MEASURE,
            p.per_pub,
            p.size,
            lockstep(i),
        ));
    }
    let all_received = wait_all(sub_rx, deadline).await;
    let all_acked = wait_all(ack_rx, deadline).await;
    let (cpu_b1, cpu_g1) = (cpu_seconds(&target.pid().to_string()), cpu_seconds(&me));
    if !all_received {
        errors.push("not every message was delivered before the deadline".into());
    }
    if !all_acked {
        errors.push("not every publish was acknowledged before the deadline".into());
    }

    for c in clients.iter().chain(pub_clients.iter()) {
        // Bounded: a client whose event loop already stopped never takes the request.
        let _ = tokio::time::timeout(Duration::from_secs(2), c.disconnect()).await;
    }
    let mut lat = Vec::with_capacity(p.total());
    let mut last_rx = 0u64;
    for h in subs {
        match tokio::time::timeout(Duration::from_secs(10), h).await {
            Ok(Ok(r)) => {
                last_rx = last_rx.max(r.last_ns);
                lat.extend(r.latencies_ns);
                if let Some(e) = r.error {
                    errors.push(format!("subscriber: {e}"));
                }
            }
            _ => errors.push("subscriber did not finish".into()),
        }
    }
    let mut last_ack = 0u64;
    let mut acks = 0usize;
    for h in pubs {
        match tokio::time::timeout(Duration::from_secs(10), h).await {
            Ok(Ok(r)) => {
                last_ack = last_ack.max(r.last_ack_ns);
                acks += r.acks;
                if let Some(e) = r.error {
                    errors.push(format!("publisher: {e}"));
                }
            }
            _ => errors.push("publisher did not finish".into()),
        }
    }
    lat.sort_unstable();
    let received = lat.len();
    let secs = |t: u64| (t.saturating_sub(t0)) as f64 / 1e9;
    let acked = acks.saturating_sub(p.warm_per_pub * p.pubs);
    RunResult {
        delivered_per_s: received as f64 / secs(last_rx),
        acked_per_s: acked as f64 / secs(if last_ack > 0 { last_ack } else { now_ns() }),
        p50_ms: percentile(&lat, 0.50),
        p99_ms: percentile(&lat, 0.99),
        max_ms: lat.last().map(|&v| v as f64 / 1e6).unwrap_or(f64::NAN),
        lost: p.total().saturating_sub(received) as f64,
        broker_cpu_us: (cpu_b1 - cpu_b0) * 1e6 / p.total() as f64,
        gen_cpu_us: (cpu_g1 - cpu_g0) * 1e6 / p.total() as f64,
        errors,
    }
}

/// RSS right now, then with `n` idle TLS connections open for 2 s.
async fn idle_rss(target: &Proc, p: &Params, ids: &Identities) -> (u64, u64) {
    let before = status_kb(target.pid(), "VmRSS:").unwrap_or(0);
    let mut held = Vec::new();
    for i in 0..p.idle {
        let id = format!("idle-{i}");
        let (c, mut el) = connect(target.addr, &id, ids.get(&id), p)
            .await
            .expect("idle connect");
        let h = tokio::spawn(async move { while el.poll().await.is_ok() {} });
        held.push((c, h));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let with = status_kb(target.pid(), "VmRSS:").unwrap_or(0);
    for (c, h) in held {
        let _ = tokio::time::timeout(Duration::from_secs(2), c.disconnect()).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
    }
    (before, with)
}

// ---------------------------------------------------------------------------------------------
// Report

/// A report row: label, the figure taken from each run, decimals, note.
type Row = (&'static str, fn(&RunResult) -> f64, usize, &'static str);

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
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

fn fmt_num(v: f64, decimals: usize) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.decimals$}")
    }
}

/// kB (as /proc reports, i.e. KiB) as decimal megabytes.
fn mb(kb: u64) -> String {
    format!("{:.1} MB", kb as f64 * 1024.0 / 1e6)
}

fn stripped_size(bin: &Path, dir: &Path) -> Option<u64> {
    let copy = dir.join("outpost.stripped");
    let st = Command::new("strip")
        .arg("-o")
        .arg(&copy)
        .arg(bin)
        .status()
        .ok()?;
    if !st.success() {
        return None;
    }
    std::fs::metadata(&copy).ok().map(|m| m.len())
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` would too, with other flags.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let _ = BASE.get_or_init(Instant::now);
    let p = Params::from_env();
    let bin = outpost_bin();
    let tmp = tempfile::tempdir().expect("tempdir");

    let outpost = start_outpost(&bin, tmp.path());
    let mut creds = Vec::new();
    for i in 0..p.pubs {
        creds.push(issue(&bin, tmp.path(), &format!("pub-{i}")));
        creds.push(issue(&bin, tmp.path(), &format!("sub-{i}")));
    }
    for i in 0..p.idle {
        creds.push(issue(&bin, tmp.path(), &format!("idle-{i}")));
    }
    let ids = Identities {
        tls: creds
            .iter()
            .map(|c| (c.id.clone(), client_tls(c)))
            .collect(),
    };

    let mosq_bin = mosquitto_bin();
    let mosquitto = match &mosq_bin {
        Some(b) => Some(start_mosquitto(b, tmp.path(), &tmp.path().join("data"))),
        None => {
            eprintln!("mosquitto not found (set MOSQUITTO=/path): measuring Outpost alone");
            None
        }
    };
    let mosq_version = mosq_bin
        .as_deref()
        .map(mosquitto_version)
        .unwrap_or_default();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!();
    println!("Outpost vs Mosquitto: QoS 1 publish through TLS with client certificates, 127.0.0.1");
    println!(
        "load: {} publishers -> {} subscribers (one per topic), {} messages measured ({} each), {} B payload, \
         window {} in flight, warm-up {} messages, {} runs per broker alternating, medians",
        p.pubs,
        p.pubs,
        p.total(),
        p.per_pub,
        p.size,
        p.window,
        p.warm_per_pub * p.pubs,
        p.runs
    );
    println!(
        "machine: {nproc} CPUs, {}; outpost {}; {}",
        cpu_model(),
        env!("CARGO_PKG_VERSION"),
        if mosq_version.is_empty() {
            "mosquitto: none".into()
        } else {
            mosq_version.clone()
        }
    );

    // Idle memory before any load.
    let (o_rss0, o_rss_idle) = rt.block_on(idle_rss(&outpost, &p, &ids));
    let m_rss = mosquitto
        .as_ref()
        .map(|m| rt.block_on(idle_rss(m, &p, &ids)));

    let mut results: HashMap<&'static str, Vec<RunResult>> = HashMap::new();
    let mut unloaded: HashMap<&'static str, Vec<RunResult>> = HashMap::new();
    let p1 = p.unloaded();
    for run in 1..=p.runs {
        let mut targets = vec![&outpost];
        if let Some(m) = &mosquitto {
            // Alternate which broker goes first.
            if run % 2 == 0 {
                targets.insert(0, m);
            } else {
                targets.push(m);
            }
        }
        for t in targets {
            let r = rt.block_on(run_once(t, &p, &ids));
            println!(
                "  run {run} {:<9} delivered {:>9.0}/s  acked {:>9.0}/s  p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms  \
                 lost {}  broker CPU {:.1} us/msg{}",
                t.name,
                r.delivered_per_s,
                r.acked_per_s,
                r.p50_ms,
                r.p99_ms,
                r.max_ms,
                r.lost,
                r.broker_cpu_us,
                if r.errors.is_empty() { String::new() } else { format!("  ERRORS: {}", r.errors.join("; ")) }
            );
            results.entry(t.name).or_default().push(r);
            std::thread::sleep(Duration::from_millis(500));
            let u = rt.block_on(run_once(t, &p1, &ids));
            println!(
                "  run {run} {:<9} unloaded (1 publisher, window 1): p50 {:.3} ms  p99 {:.3} ms  max {:.2} ms  lost {}{}",
                t.name,
                u.p50_ms,
                u.p99_ms,
                u.max_ms,
                u.lost,
                if u.errors.is_empty() { String::new() } else { format!("  ERRORS: {}", u.errors.join("; ")) }
            );
            unloaded.entry(t.name).or_default().push(u);
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    // Idle again after the load: what the routing core keeps (its in-memory topic logs).
    std::thread::sleep(Duration::from_secs(2));
    let o_after = status_kb(outpost.pid(), "VmRSS:").unwrap_or(0);
    let m_after = mosquitto
        .as_ref()
        .and_then(|m| status_kb(m.pid(), "VmRSS:"));
    let o_peak = status_kb(outpost.pid(), "VmHWM:").unwrap_or(0);
    let m_peak = mosquitto
        .as_ref()
        .and_then(|m| status_kb(m.pid(), "VmHWM:"));

    let med = |name: &str, f: fn(&RunResult) -> f64| -> f64 {
        results
            .get(name)
            .map(|v| median(v.iter().map(f).collect()))
            .unwrap_or(f64::NAN)
    };
    let med_unloaded = |name: &str, f: fn(&RunResult) -> f64| -> f64 {
        unloaded
            .get(name)
            .map(|v| median(v.iter().map(f).collect()))
            .unwrap_or(f64::NAN)
    };
    let rows: [Row; 8] = [
        (
            "delivered msgs/s (sub side)",
            |r| r.delivered_per_s,
            0,
            "higher is better",
        ),
        (
            "acked publishes/s (PUBACK)",
            |r| r.acked_per_s,
            0,
            "higher is better",
        ),
        ("latency p50 (ms)", |r| r.p50_ms, 2, "lower is better"),
        ("latency p99 (ms)", |r| r.p99_ms, 2, "lower is better"),
        ("latency max (ms)", |r| r.max_ms, 2, "lower is better"),
        (
            "broker CPU per msg (us)",
            |r| r.broker_cpu_us,
            1,
            "lower is better",
        ),
        (
            "load generator CPU per msg (us)",
            |r| r.gen_cpu_us,
            1,
            "same client both sides",
        ),
        ("messages lost", |r| r.lost, 0, ""),
    ];
    let unloaded_rows: [Row; 3] = [
        (
            "unloaded latency p50 (ms)",
            |r| r.p50_ms,
            3,
            "1 publisher, window 1",
        ),
        (
            "unloaded latency p99 (ms)",
            |r| r.p99_ms,
            3,
            "lower is better",
        ),
        ("unloaded messages lost", |r| r.lost, 0, ""),
    ];
    println!();
    println!(
        "{:<34} {:>12} {:>12} {:>10}   note",
        "metric (median of runs)", "outpost", "mosquitto", "ratio o/m"
    );
    println!("{}", "-".repeat(90));
    let all = rows
        .iter()
        .map(|&(l, f, d, n)| (l, med("outpost", f), med("mosquitto", f), d, n))
        .chain(unloaded_rows.iter().map(|&(l, f, d, n)| {
            (
                l,
                med_unloaded("outpost", f),
                med_unloaded("mosquitto", f),
                d,
                n,
            )
        }))
        .collect::<Vec<_>>();
    for (label, o, m, dec, note) in all {
        let ratio = if m.is_nan() || m == 0.0 {
            "-".to_string()
        } else {
            format!("{:.2}", o / m)
        };
        println!(
            "{label:<34} {:>12} {:>12} {ratio:>10}   {note}",
            fmt_num(o, dec),
            fmt_num(m, dec)
        );
    }
    println!();
    let target_tp =
        med("outpost", |r| r.delivered_per_s) >= med("mosquitto", |r| r.delivered_per_s);
    if mosquitto.is_some() {
        println!(
            "throughput target (delivered msgs/s >= Mosquitto's): {}",
            if target_tp { "MET" } else { "NOT MET" }
        );
    }

    println!();
    println!(
        "outpost idle RSS: {} after start, {} with {} idle TLS connections (target <= 20 MB: {}); \
         peak during bench {}, idle after the load {}",
        mb(o_rss0),
        mb(o_rss_idle),
        p.idle,
        if o_rss_idle * 1024 <= 20_000_000 {
            "MET"
        } else {
            "NOT MET"
        },
        mb(o_peak),
        mb(o_after)
    );
    if let Some((m0, m1)) = m_rss {
        println!(
            "mosquitto idle RSS: {} after start, {} with {} idle TLS connections; peak during bench {}, \
             idle after the load {}",
            mb(m0),
            mb(m1),
            p.idle,
            m_peak.map(mb).unwrap_or_default(),
            m_after.map(mb).unwrap_or_default()
        );
    }
    let built = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);
    match stripped_size(&bin, tmp.path()) {
        Some(s) => println!(
            "outpost release binary: {:.2} MB as built, {:.2} MB after strip (target <= 15 MB: {})",
            built as f64 / 1e6,
            s as f64 / 1e6,
            if s <= 15_000_000 { "MET" } else { "NOT MET" }
        ),
        None => println!(
            "outpost release binary: {:.2} MB as built (strip unavailable: install binutils)",
            built as f64 / 1e6
        ),
    }
    println!("(binary: {})", bin.display());
    drop(mosquitto);
    drop(outpost);
}
