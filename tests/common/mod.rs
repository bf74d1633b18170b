//! Test harness: starts the real `outpost` binary on 127.0.0.1:0 ports in a temp data dir
//! and talks to it over real sockets.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use outpost::Endpoints;

/// TLS clients, ACL, revocation and core-bypass helpers (mosquitto processes, raw MQTT over
/// TLS, rumqttc, certificates made in the test).
pub mod can;
/// A throw-away PostgreSQL cluster (tests/inventory.rs, benches/inventory.rs).
pub mod pg;
pub mod roles;
pub mod security_helpers;

pub const BIN: &str = env!("CARGO_BIN_EXE_outpost");

pub struct Gateway {
    pub dir: tempfile::TempDir,
    pub data_dir: PathBuf,
    pub config_path: PathBuf,
    pub child: Option<Child>,
    pub ep: Endpoints,
}

/// Paths of a device's credentials as written by `outpost ca issue-device`.
#[derive(Clone, Debug)]
pub struct Creds {
    pub id: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub serial: String,
}

pub fn base_config(data_dir: &Path, extra: &str) -> String {
    format!(
        r#"[gateway]
id = "gw-test"
data_dir = "{}"

[listeners]
mqtts = "127.0.0.1:0"
plain = "127.0.0.1:0"

[metrics]
listen = "127.0.0.1:0"

[mdns]
enabled = false

[fdo]
listen = "127.0.0.1:0"

[web]
listen = "127.0.0.1:0"

{extra}
"#,
        data_dir.display()
    )
}

impl Gateway {
    pub fn start() -> Gateway {
        Gateway::start_with("")
    }

    /// `extra` is TOML appended to the base config (sections not already in the base).
    pub fn start_with(extra: &str) -> Gateway {
        Gateway::start_custom(|data_dir| base_config(data_dir, extra))
    }

    /// Start (again) the process on the same data dir and config.
    pub fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.data_dir.join(outpost::ENDPOINTS_FILE));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("gateway.log"))
            .expect("log file");
        // OUTPOST_BIN: run the gateway from another program instead (for example a wrapper
        // that execs a debug build under heaptrack's preload library, keeping the pid).
        let bin = std::env::var_os("OUTPOST_BIN").unwrap_or_else(|| BIN.into());
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(&self.config_path)
            .env_remove("RUST_LOG") // the gateway's own default filter
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn outpost");
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(ep) = Endpoints::read(&self.data_dir) {
                if ep.pid == pid {
                    self.ep = ep;
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("gateway exited early with {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "gateway not ready in 30 s: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .output()
            .expect("run outpost cli")
    }

    /// Issue a device certificate through the running gateway (or the store when stopped).
    pub fn issue(&self, id: &str) -> Creds {
        let out_dir = self.dir.path().join("devices").join(id);
        let out = self.cli(&[
            "ca",
            "issue-device",
            "--id",
            id,
            "--out",
            out_dir.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "issue-device failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let serial = text
            .split_whitespace()
            .nth(3)
            .unwrap_or_default()
            .to_string();
        Creds {
            id: id.to_string(),
            cert: out_dir.join(format!("{id}.crt")),
            key: out_dir.join(format!("{id}.key")),
            ca: out_dir.join("ca.crt"),
            serial,
        }
    }

    pub fn revoke_id(&self, id: &str) {
        let out = self.cli(&["ca", "revoke", "--id", id]);
        assert!(
            out.status.success(),
            "revoke failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn mqtts(&self) -> SocketAddr {
        self.ep.mqtts
    }

    pub fn plain(&self) -> SocketAddr {
        self.ep.plain.expect("plain listener")
    }

    /// GET /metrics.
    pub fn metrics(&self) -> String {
        http_get(self.ep.metrics.expect("metrics listener"), "/metrics")
    }

    /// Value of one sample line (name with labels, exactly as rendered).
    pub fn metric(&self, sample: &str) -> i64 {
        let text = self.metrics();
        text.lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("metric {sample} not found in:\n{text}"))
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// Wait for the process to exit.
    pub fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut()?;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn is_alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect metrics");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or(body)
}

/// Arguments that make a mosquitto client use a device's credentials.
pub fn tls_args(addr: SocketAddr, c: &Creds) -> Vec<String> {
    vec![
        "-h".into(),
        addr.ip().to_string(),
        "-p".into(),
        addr.port().to_string(),
        "--cafile".into(),
        c.ca.display().to_string(),
        "--cert".into(),
        c.cert.display().to_string(),
        "--key".into(),
        c.key.display().to_string(),
    ]
}

pub fn require_mosquitto() {
    let ok = Command::new("mosquitto_pub").arg("--help").output().is_ok();
    assert!(
        ok,
        "mosquitto-clients are not installed: run the README's test command (it installs them)"
    );
}

// ---------------------------------------------------------------------------------------------
// Helpers added for the robustness and process tests: free ports, TLS device clients, a raw
// MQTT 3.1.1 client, waiting on metrics.

/// A loopback TCP port that was free a moment ago (bound to port 0, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind probe")
        .local_addr()
        .unwrap()
        .port()
}

/// Poll a metric until `ok(value)` holds or `limit` passes; returns the last value.
pub fn wait_metric(gw: &Gateway, sample: &str, limit: Duration, ok: impl Fn(i64) -> bool) -> i64 {
    let deadline = Instant::now() + limit;
    loop {
        let v = gw.metric(sample);
        if ok(v) || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// rustls client config presenting a device's certificate and trusting the gateway CA.
pub fn device_tls_config(c: &Creds) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    let pem = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem(&c.ca).as_slice()) {
        roots.add(cert.expect("CA PEM")).expect("add CA");
    }
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem(&c.cert).as_slice())
        .collect::<Result<_, _>>()
        .expect("device cert PEM");
    let key = rustls_pemfile::private_key(&mut pem(&c.key).as_slice())
        .expect("device key PEM")
        .expect("a private key");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client auth");
    std::sync::Arc::new(cfg)
}

pub type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// TCP connect + TLS handshake (server name `localhost`) with a device certificate.
pub async fn tls_connect(
    addr: SocketAddr,
    cfg: std::sync::Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
}

/// The bytes of a real TLS ClientHello (what a device sends first), for stalling and fuzzing.
pub fn client_hello(cfg: std::sync::Arc<rustls::ClientConfig>) -> Vec<u8> {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(cfg, name).expect("client connection");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write ClientHello");
    }
    out
}

/// Encoders for MQTT 3.1.1 packets, valid unless the caller breaks them on purpose.
pub mod wire {
    pub fn remaining_length(mut len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let mut b = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                b |= 0x80;
            }
            out.push(b);
            if len == 0 {
                return out;
            }
        }
    }

    pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        out.extend(remaining_length(body.len()));
        out.extend_from_slice(body);
        out
    }

    pub fn string(s: &[u8]) -> Vec<u8> {
        let mut out = (s.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(s);
        out
    }

    /// CONNECT, clean session, no will, no credentials.
    pub fn connect(client_id: &str, keep_alive: u16) -> Vec<u8> {
        let mut body = string(b"MQTT");
        body.push(4);
        body.push(0x02);
        body.extend(keep_alive.to_be_bytes());
        body.extend(string(client_id.as_bytes()));
        packet(0x10, &body)
    }

    pub fn publish(topic: &str, payload: &[u8], qos: u8, pid: u16) -> Vec<u8> {
        let mut body = string(topic.as_bytes());
        if qos > 0 {
            body.extend(pid.to_be_bytes());
        }
        body.extend_from_slice(payload);
        packet(0x30 | (qos << 1), &body)
    }

    pub fn subscribe(pid: u16, filter: &str, qos: u8) -> Vec<u8> {
        let mut body = pid.to_be_bytes().to_vec();
        body.extend(string(filter.as_bytes()));
        body.push(qos);
        packet(0x82, &body)
    }

    pub fn unsubscribe(pid: u16, filter: &str) -> Vec<u8> {
        let mut body = pid.to_be_bytes().to_vec();
        body.extend(string(filter.as_bytes()));
        packet(0xa2, &body)
    }

    pub fn ack(ptype: u8, pid: u16) -> Vec<u8> {
        let flags = if ptype == 6 { 0x02 } else { 0 };
        packet((ptype << 4) | flags, &pid.to_be_bytes())
    }

    pub const PINGREQ: [u8; 2] = [0xc0, 0];
    pub const DISCONNECT: [u8; 2] = [0xe0, 0];
}

/// One MQTT packet: first header byte and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub first: u8,
    pub body: Vec<u8>,
}

impl Packet {
    pub fn kind(&self) -> u8 {
        self.first >> 4
    }
}

/// Read one packet. `Ok(None)`: the peer closed the connection cleanly.
pub async fn read_packet<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
) -> std::io::Result<Option<Packet>> {
    use tokio::io::AsyncReadExt;
    let mut first = [0u8; 1];
    if rd.read(&mut first).await? == 0 {
        return Ok(None);
    }
    let mut len = 0usize;
    for i in 0..4 {
        let b = rd.read_u8().await?;
        len |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            let mut body = vec![0u8; len];
            rd.read_exact(&mut body).await?;
            return Ok(Some(Packet {
                first: first[0],
                body,
            }));
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "bad remaining length",
    ))
}

/// Read one packet within `limit`; panics with `what` on timeout, EOF or error.
pub async fn expect_packet<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    limit: Duration,
    what: &str,
) -> Packet {
    match tokio::time::timeout(limit, read_packet(rd)).await {
        Ok(Ok(Some(p))) => p,
        Ok(Ok(None)) => panic!("{what}: connection closed"),
        Ok(Err(e)) => panic!("{what}: {e}"),
        Err(_) => panic!("{what}: nothing within {limit:?}"),
    }
}

/// Read (and discard) until the peer closes or fails the connection; `None` on timeout.
pub async fn wait_closed<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    limit: Duration,
) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let start = Instant::now();
    let mut buf = vec![0u8; 4096];
    let res = tokio::time::timeout(limit, async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    res.ok().map(|_| start.elapsed())
}

/// Send CONNECT and wait for CONNACK; returns the CONNACK return code.
pub async fn mqtt_connect<S>(s: &mut S, client_id: &str, limit: Duration) -> u8
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    s.write_all(&wire::connect(client_id, 30))
        .await
        .expect("send CONNECT");
    let p = expect_packet(s, limit, "CONNACK").await;
    assert_eq!(p.kind(), 2, "expected CONNACK, got {p:?}");
    assert_eq!(p.body.len(), 2, "CONNACK body {p:?}");
    p.body[1]
}

/// A connected (CONNACK 0) MQTT session on the plain listener.
pub async fn plain_session(addr: SocketAddr, client_id: &str) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect plain");
    s.set_nodelay(true).unwrap();
    let code = mqtt_connect(&mut s, client_id, Duration::from_secs(5)).await;
    assert_eq!(code, 0, "CONNACK code for {client_id}");
    s
}

/// SUBSCRIBE and wait for a SUBACK granting the filter.
pub async fn mqtt_subscribe<S>(s: &mut S, filter: &str, qos: u8)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    s.write_all(&wire::subscribe(1, filter, qos))
        .await
        .expect("send SUBSCRIBE");
    let p = expect_packet(s, Duration::from_secs(5), "SUBACK").await;
    assert_eq!(p.kind(), 9, "expected SUBACK, got {p:?}");
    assert!(
        p.body.len() == 3 && p.body[2] <= 2,
        "subscription to {filter} refused: {p:?}"
    );
}

/// Read packets until a PUBLISH on `topic` arrives; returns its payload.
pub async fn expect_publish<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    topic: &str,
    limit: Duration,
) -> Vec<u8> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let p = expect_packet(rd, left, &format!("PUBLISH on {topic}")).await;
        if p.kind() != 3 {
            continue;
        }
        let n = u16::from_be_bytes([p.body[0], p.body[1]]) as usize;
        if &p.body[2..2 + n] != topic.as_bytes() {
            continue;
        }
        let qos = (p.first >> 1) & 3;
        let start = 2 + n + if qos > 0 { 2 } else { 0 };
        return p.body[start..].to_vec();
    }
}

/// End-to-end check that the gateway still works: a device publishes over TLS (QoS 1, with
/// PUBACK) and a local subscriber on the plain listener receives it. Returns the time from
/// TCP connect to CONNACK of the device.
pub async fn device_roundtrip(
    gw_mqtts: SocketAddr,
    gw_plain: SocketAddr,
    dev: &Creds,
    tag: &str,
) -> Duration {
    use tokio::io::AsyncWriteExt;
    let topic = format!("devices/{}/{tag}", dev.id);
    let mut sub = plain_session(gw_plain, &format!("watch-{tag}")).await;
    mqtt_subscribe(&mut sub, &topic, 0).await;

    let cfg = device_tls_config(dev);
    let start = Instant::now();
    let mut s = tokio::time::timeout(Duration::from_secs(5), tls_connect(gw_mqtts, cfg))
        .await
        .expect("TLS handshake within 5 s")
        .expect("TLS handshake");
    let code = mqtt_connect(&mut s, &dev.id, Duration::from_secs(5)).await;
    let connack = start.elapsed();
    assert_eq!(code, 0, "device CONNACK code");
    s.write_all(&wire::publish(&topic, tag.as_bytes(), 1, 7))
        .await
        .unwrap();
    let ack = expect_packet(&mut s, Duration::from_secs(5), "PUBACK").await;
    assert_eq!(
        (ack.kind(), ack.body.as_slice()),
        (4, &[0u8, 7][..]),
        "PUBACK"
    );
    let got = expect_publish(&mut sub, &topic, Duration::from_secs(5)).await;
    assert_eq!(got, tag.as_bytes());
    let _ = s.write_all(&wire::DISCONNECT).await;
    let _ = sub.write_all(&wire::DISCONNECT).await;
    connack
}

impl Gateway {
    /// Start with a whole config file of the caller's making (`make` gets the data dir), for
    /// settings the base config fixes (e.g. `[mdns]`).
    pub fn start_custom(make: impl FnOnce(&Path) -> String) -> Gateway {
        let mut gw = Gateway::prepare_custom(make);
        gw.spawn();
        gw
    }

    /// Write the config and create the data dir and CA (with `ca list`), without starting:
    /// for set-ups that need the gateway CA before the gateway runs. Start with `spawn`.
    pub fn prepare_custom(make: impl FnOnce(&Path) -> String) -> Gateway {
        let gw = Gateway::unstarted(make);
        let out = gw.cli(&["ca", "list"]);
        assert!(
            out.status.success(),
            "ca list: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        gw
    }

    /// Only write the config (`make` gets the data dir, which does not exist yet unless
    /// `make` creates it): nothing else is touched before the first start.
    pub fn unstarted(make: impl FnOnce(&Path) -> String) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        let config_path = dir.path().join("outpost.toml");
        std::fs::write(&config_path, make(&data_dir)).expect("write config");
        Gateway {
            dir,
            data_dir,
            config_path,
            child: None,
            ep: Endpoints {
                gateway_id: String::new(),
                mqtts: "127.0.0.1:1".parse().unwrap(),
                plain: None,
                metrics: None,
                fdo: None,
                web: None,
                pid: 0,
            },
        }
    }
}

/// A log without ANSI colour sequences (`ESC [ ... m`), so that fields read `key=value`.
pub fn strip_ansi(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut it = log.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' && it.peek() == Some(&'[') {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A device agent's state directory (under `work`) holding `c`, as onboarding would have
/// left it: its key and certificate, the gateway's CA to trust, and `mqtt.json` naming
/// the gateway's TLS listener.
pub fn agent_state(work: &Path, gw: &Gateway, c: &Creds) -> PathBuf {
    let d = work.join("agents").join(&c.id);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(&c.key, d.join("mqtt.key")).unwrap();
    std::fs::copy(&c.cert, d.join("mqtt.crt")).unwrap();
    std::fs::copy(gw.data_dir.join("ca.crt"), d.join("mqtt-ca.crt")).unwrap();
    std::fs::write(
        d.join("mqtt.json"),
        serde_json::json!({
            "client_id": c.id,
            "servers": [format!("mqtts://127.0.0.1:{}", gw.mqtts().port())],
        })
        .to_string(),
    )
    .unwrap();
    d
}

/// `outpost device` on a state directory, without heartbeats; its JSON events are the
/// lines of the process.
pub fn spawn_agent(dir: &Path) -> security_helpers::Proc {
    security_helpers::Proc::spawn(
        BIN,
        &[
            "device".into(),
            "--state-dir".into(),
            dir.display().to_string(),
            "--cred".into(),
            dir.join("unused.cred").display().to_string(),
            "--interval".into(),
            "0s".into(),
        ],
    )
}
