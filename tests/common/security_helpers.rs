//! Helpers for the security acceptance tests (TLS clients, ACL, revocation, core bypass):
//! bounded process runs, a line-reading wrapper around long-running mosquitto clients, a raw
//! MQTT 3.1.1 client over TCP or TLS, rumqttc over TLS, and certificates made in the test.
//!
//! Used as `use common::security_helpers as sec;`.
#![allow(dead_code)]

use super::{Creds, Gateway};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Generous bound for anything that should happen "promptly" on a loaded machine.
pub const LIMIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Waiting without sleeping-as-assertion

/// Poll `cond` until it holds; panic with `what` after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Poll a metric sample until `ok(value)`; panic (showing the value) after `limit`.
pub fn wait_metric(gw: &Gateway, sample: &str, ok: impl Fn(i64) -> bool) -> i64 {
    let deadline = Instant::now() + LIMIT;
    loop {
        let v = gw.metric(sample);
        if ok(v) {
            return v;
        }
        assert!(Instant::now() < deadline, "metric {sample} stuck at {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// External processes

/// Run a command to completion, killing it (and panicking) if it takes longer than `limit`.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut v);
            }
            v
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// `mosquitto_pub` with the given arguments (plus `-d`), bounded.
pub fn mosquitto_pub(args: &[String]) -> Output {
    run_bounded(Command::new("mosquitto_pub").args(args).arg("-d"), LIMIT)
}

pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Arguments for a client on the plain listener.
pub fn plain_args(addr: SocketAddr) -> Vec<String> {
    vec![
        "-h".into(),
        addr.ip().to_string(),
        "-p".into(),
        addr.port().to_string(),
    ]
}

pub fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// A long-running client process (mosquitto_sub) whose stdout and stderr lines are collected.
pub struct Proc {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

/// Output format for mosquitto_sub: one line per message, easy to pick out of `-d` output.
pub const MSG_FORMAT: &str = "MSG|%t|%q|%p";

impl Proc {
    /// Run `program` with line-buffered stdout (`stdbuf -oL`): C clients writing to a pipe
    /// otherwise hold their output back until they exit.
    pub fn spawn(program: &str, args: &[String]) -> Proc {
        let mut child = Command::new("stdbuf")
            .arg("-oL")
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let t1 = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = t1.send(l);
            }
        });
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(format!("stderr: {l}"));
            }
        });
        Proc {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// A `mosquitto_sub -d` on `filter`, returned once its SUBACK has been printed.
    pub fn subscriber(conn_args: Vec<String>, filter: &str, qos: u8) -> Proc {
        let mut args = conn_args;
        args.extend(strs(&[
            "-d",
            "-t",
            filter,
            "-q",
            &qos.to_string(),
            "-F",
            MSG_FORMAT,
        ]));
        let mut p = Proc::spawn("mosquitto_sub", &args);
        p.wait_for(LIMIT, "SUBACK", |l| l.contains("received SUBACK"));
        p
    }

    /// Wait for a line matching `pred` (earlier lines are kept in `seen`).
    pub fn try_wait_for(
        &mut self,
        limit: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Option<String> {
        if let Some(l) = self.seen.iter().find(|l| pred(l)) {
            return Some(l.clone());
        }
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if pred(&l) {
                        return Some(l);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    pub fn wait_for(
        &mut self,
        limit: Duration,
        what: &str,
        pred: impl FnMut(&str) -> bool,
    ) -> String {
        match self.try_wait_for(limit, pred) {
            Some(l) => l,
            None => panic!(
                "no {what} within {limit:?}; output so far:\n{}",
                self.seen.join("\n")
            ),
        }
    }

    /// Wait for the message line `MSG|topic|qos|payload` with this payload.
    pub fn wait_message(&mut self, payload: &str) -> (String, u8) {
        let l = self.wait_for(LIMIT, &format!("message {payload:?}"), |l| {
            l.starts_with("MSG|") && l.rsplit('|').next() == Some(payload)
        });
        let parts: Vec<&str> = l.splitn(4, '|').collect();
        (parts[1].to_string(), parts[2].parse().unwrap())
    }

    /// Payloads of every message line seen so far.
    pub fn payloads(&self) -> Vec<String> {
        self.seen
            .iter()
            .filter(|l| l.starts_with("MSG|"))
            .map(|l| l.splitn(4, '|').nth(3).unwrap_or_default().to_string())
            .collect()
    }

    /// Poll for the process to exit; `None` if it is still running after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Everything printed so far (drains what is pending without waiting).
    pub fn output(&mut self) -> String {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
        self.seen.join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Certificates made in the test

fn write_creds(dir: &Path, id: &str, cert_pem: &str, key_pem: &str, server_ca: &Path) -> Creds {
    std::fs::create_dir_all(dir).unwrap();
    let cert = dir.join(format!("{id}.crt"));
    let key = dir.join(format!("{id}.key"));
    std::fs::write(&cert, cert_pem).unwrap();
    std::fs::write(&key, key_pem).unwrap();
    Creds {
        id: id.to_string(),
        cert,
        key,
        ca: server_ca.to_path_buf(),
        serial: String::new(),
    }
}

fn device_params(id: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, id);
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p
}

/// A device certificate from a CA the gateway has never seen (the client still trusts the
/// gateway's server certificate, so only the client side of the handshake is wrong).
pub fn foreign_device(gw: &Gateway, id: &str) -> Creds {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Some other CA");
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = device_params(id).signed_by(&key, &issuer).unwrap();
    write_creds(
        &gw.dir.path().join("foreign"),
        id,
        &cert.pem(),
        &key.serialize_pem(),
        &gw.data_dir.join("ca.crt"),
    )
}

/// A CA of the fleet (the cloud's) that a gateway is told to trust for client certificates
/// (`tls.extra_client_cas`), kept in a temp dir for the test's life.
pub struct FleetCa {
    pub dir: tempfile::TempDir,
    pub ca_path: std::path::PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

pub fn fleet_ca(name: &str) -> FleetCa {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = ca.self_signed(&ca_key).unwrap();
    let ca_path = dir.path().join("fleet-ca.crt");
    std::fs::write(&ca_path, cert.pem()).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    FleetCa {
        dir,
        ca_path,
        issuer,
    }
}

impl FleetCa {
    /// A device certificate of this CA for `id`, with a random serial (`Creds::serial` set,
    /// lower-case hex as the gateway writes serials).
    pub fn issue(&self, gw: &Gateway, id: &str) -> Creds {
        let mut p = device_params(id);
        let mut raw = rand::random::<[u8; 16]>();
        raw[0] &= 0x7f;
        raw[0] |= 0x10;
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&raw));
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        let mut c = write_creds(
            &gw.dir.path().join("fleet").join(id),
            id,
            &cert.pem(),
            &key.serialize_pem(),
            &gw.data_dir.join("ca.crt"),
        );
        c.serial = hex::encode(raw);
        c
    }
}

/// A device certificate signed by the gateway's own CA key whose validity ended yesterday.
pub fn expired_device(gw: &Gateway, id: &str) -> Creds {
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(gw.data_dir.join("ca.key")).unwrap()).unwrap();
    let ca_pem = std::fs::read_to_string(gw.data_dir.join("ca.crt")).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let mut p = device_params(id);
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(30);
    p.not_after = now - time::Duration::days(1);
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &issuer).unwrap();
    write_creds(
        &gw.dir.path().join("expired"),
        id,
        &cert.pem(),
        &key.serialize_pem(),
        &gw.data_dir.join("ca.crt"),
    )
}

/// Issue a certificate into its own directory (so a second certificate for the same device
/// does not overwrite the first one's files).
pub fn issue_into(gw: &Gateway, id: &str, sub: &str) -> Creds {
    let out_dir = gw.dir.path().join(sub);
    let out = gw.cli(&[
        "ca",
        "issue-device",
        "--id",
        id,
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "issue-device: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let serial = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(3)
        .unwrap_or_default()
        .to_string();
    assert!(!serial.is_empty(), "no serial in {:?}", out);
    Creds {
        id: id.to_string(),
        cert: out_dir.join(format!("{id}.crt")),
        key: out_dir.join(format!("{id}.key")),
        ca: out_dir.join("ca.crt"),
        serial,
    }
}

// ---------------------------------------------------------------------------------------------
// TLS and MQTT clients

/// rustls client configuration with the ring provider: trusts `creds.ca`, presents the
/// device certificate.
pub fn client_config(creds: &Creds) -> Arc<rustls::ClientConfig> {
    let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut read(&creds.ca).as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let chain = rustls_pemfile::certs(&mut read(&creds.cert).as_slice())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut read(&creds.key).as_slice())
        .unwrap()
        .expect("private key");
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    Arc::new(cfg)
}

/// rumqttc over TLS with a device certificate. Clean session, keep-alive 30 s.
pub fn rumqtt_device(
    addr: SocketAddr,
    creds: &Creds,
    client_id: &str,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let mut o = rumqttc::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(true);
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(client_config(creds)),
    ));
    rumqttc::AsyncClient::new(o, 32)
}

/// Drive a rumqttc event loop until an incoming packet matches `pick`; panic after `limit`
/// or on a connection error.
#[allow(clippy::result_large_err)] // rumqttc's ConnectionError, as the event loop returns it
pub async fn rumqtt_until<T>(
    el: &mut rumqttc::EventLoop,
    limit: Duration,
    what: &str,
    mut pick: impl FnMut(&rumqttc::Packet) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let ev = tokio::time::timeout_at(deadline, el.poll())
            .await
            .unwrap_or_else(|_| panic!("rumqttc: no {what} within {limit:?}"));
        match ev {
            Ok(rumqttc::Event::Incoming(p)) => {
                if let Some(v) = pick(&p) {
                    return v;
                }
            }
            Ok(rumqttc::Event::Outgoing(_)) => {}
            Err(e) => panic!("rumqttc: connection error while waiting for {what}: {e:?}"),
        }
    }
}

pub type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// TCP + TLS handshake to the device listener (the server is verified as 127.0.0.1).
pub async fn tls_connect(addr: SocketAddr, creds: &Creds) -> std::io::Result<Tls> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::from(addr.ip());
    tokio_rustls::TlsConnector::from(client_config(creds))
        .connect(name, tcp)
        .await
}

/// MQTT 3.1.1 encoders, written independently of the gateway's own codec.
pub mod wire {
    pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        let mut len = body.len();
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
        out.extend_from_slice(body);
        out
    }

    pub fn string(s: &[u8]) -> Vec<u8> {
        let mut out = (s.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(s);
        out
    }

    pub struct Connect<'a> {
        pub client_id: &'a str,
        pub will: Option<(&'a str, &'a [u8], u8)>,
        pub username: Option<&'a str>,
        pub password: Option<&'a [u8]>,
        pub keep_alive: u16,
    }

    impl<'a> Connect<'a> {
        pub fn new(client_id: &'a str) -> Self {
            Connect {
                client_id,
                will: None,
                username: None,
                password: None,
                keep_alive: 30,
            }
        }

        pub fn encode(&self) -> Vec<u8> {
            let mut body = string(b"MQTT");
            body.push(4);
            let mut flags = 0x02u8;
            if let Some((_, _, q)) = self.will {
                flags |= 0x04 | (q << 3);
            }
            if self.username.is_some() {
                flags |= 0x80;
            }
            if self.password.is_some() {
                flags |= 0x40;
            }
            body.push(flags);
            body.extend(self.keep_alive.to_be_bytes());
            body.extend(string(self.client_id.as_bytes()));
            if let Some((t, p, _)) = self.will {
                body.extend(string(t.as_bytes()));
                body.extend(string(p));
            }
            if let Some(u) = self.username {
                body.extend(string(u.as_bytes()));
            }
            if let Some(p) = self.password {
                body.extend(string(p));
            }
            packet(0x10, &body)
        }
    }

    pub fn publish(topic: &str, payload: &[u8], qos: u8, pid: u16) -> Vec<u8> {
        let mut body = string(topic.as_bytes());
        if qos > 0 {
            body.extend(pid.to_be_bytes());
        }
        body.extend_from_slice(payload);
        packet(0x30 | (qos << 1), &body)
    }

    pub fn subscribe(pid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
        let mut body = pid.to_be_bytes().to_vec();
        for (f, q) in filters {
            body.extend(string(f.as_bytes()));
            body.push(*q);
        }
        packet(0x82, &body)
    }

    /// PUBACK (4), PUBREC (5), PUBREL (6), PUBCOMP (7).
    pub fn ack(kind: u8, pid: u16) -> Vec<u8> {
        let flags = if kind == 6 { 0x02 } else { 0 };
        packet((kind << 4) | flags, &pid.to_be_bytes())
    }

    pub const DISCONNECT: [u8; 2] = [0xe0, 0];
}

pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const PUBREC: u8 = 5;
pub const PUBREL: u8 = 6;
pub const PUBCOMP: u8 = 7;
pub const SUBACK: u8 = 9;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub first: u8,
    pub body: Vec<u8>,
}

impl Packet {
    pub fn kind(&self) -> u8 {
        self.first >> 4
    }

    /// (topic, qos, payload) of a PUBLISH.
    pub fn publish(&self) -> (String, u8, Vec<u8>) {
        assert_eq!(self.kind(), PUBLISH, "not a PUBLISH: {self:?}");
        let n = u16::from_be_bytes([self.body[0], self.body[1]]) as usize;
        let topic = String::from_utf8_lossy(&self.body[2..2 + n]).to_string();
        let qos = (self.first >> 1) & 3;
        let start = 2 + n + if qos > 0 { 2 } else { 0 };
        (topic, qos, self.body[start..].to_vec())
    }

    pub fn pid(&self) -> u16 {
        let off = if self.kind() == PUBLISH {
            2 + u16::from_be_bytes([self.body[0], self.body[1]]) as usize
        } else {
            0
        };
        u16::from_be_bytes([self.body[off], self.body[off + 1]])
    }
}

/// How a read ended when no packet came.
#[derive(Debug, PartialEq, Eq)]
pub enum NoPacket {
    Closed,
    Timeout,
}

/// A raw MQTT client over any stream: sends bytes, reads whole packets.
pub struct Raw<S> {
    pub s: S,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Raw<S> {
    pub async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.expect("send to gateway");
        self.s.flush().await.expect("flush");
    }

    async fn read_one(&mut self) -> std::io::Result<Option<Packet>> {
        let mut first = [0u8; 1];
        if self.s.read(&mut first).await? == 0 {
            return Ok(None);
        }
        let mut len = 0usize;
        for i in 0..4 {
            let b = self.s.read_u8().await?;
            len |= ((b & 0x7f) as usize) << (7 * i);
            if b & 0x80 == 0 {
                let mut body = vec![0u8; len];
                self.s.read_exact(&mut body).await?;
                return Ok(Some(Packet {
                    first: first[0],
                    body,
                }));
            }
        }
        Err(std::io::Error::other("bad remaining length"))
    }

    /// The next packet, or why there was none (EOF and I/O errors both count as closed).
    pub async fn next(&mut self, limit: Duration) -> Result<Packet, NoPacket> {
        match tokio::time::timeout(limit, self.read_one()).await {
            Ok(Ok(Some(p))) => Ok(p),
            Ok(Ok(None)) | Ok(Err(_)) => Err(NoPacket::Closed),
            Err(_) => Err(NoPacket::Timeout),
        }
    }

    pub async fn expect(&mut self, what: &str) -> Packet {
        match self.next(LIMIT).await {
            Ok(p) => p,
            Err(e) => panic!("expected {what}, got {e:?}"),
        }
    }

    /// Expect exactly this packet kind and body.
    pub async fn expect_exact(&mut self, kind: u8, body: &[u8], what: &str) {
        let p = self.expect(what).await;
        assert_eq!(
            (p.kind(), p.body.as_slice()),
            (kind, body),
            "{what}: got {p:?}"
        );
    }

    /// CONNECT and return the CONNACK return code.
    pub async fn connect(&mut self, c: &wire::Connect<'_>) -> u8 {
        self.send(&c.encode()).await;
        let p = self.expect("CONNACK").await;
        assert_eq!(p.kind(), CONNACK, "expected CONNACK, got {p:?}");
        p.body[1]
    }

    /// SUBSCRIBE and return the SUBACK return codes.
    pub async fn subscribe(&mut self, pid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
        self.send(&wire::subscribe(pid, filters)).await;
        loop {
            let p = self.expect("SUBACK").await;
            if p.kind() == SUBACK {
                assert_eq!(p.pid(), pid, "SUBACK packet id");
                return p.body[2..].to_vec();
            }
        }
    }

    /// Read until the next PUBLISH (acknowledging QoS 1/2 deliveries); `None` on timeout.
    pub async fn next_publish(&mut self, limit: Duration) -> Option<(String, u8, Vec<u8>)> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let p = match self.next(left).await {
                Ok(p) => p,
                Err(NoPacket::Timeout) => return None,
                Err(NoPacket::Closed) => panic!("connection closed while waiting for a PUBLISH"),
            };
            match p.kind() {
                PUBLISH => {
                    let m = p.publish();
                    match m.1 {
                        1 => self.send(&wire::ack(PUBACK, p.pid())).await,
                        2 => self.send(&wire::ack(PUBREC, p.pid())).await,
                        _ => {}
                    }
                    return Some(m);
                }
                PUBREL => self.send(&wire::ack(PUBCOMP, p.pid())).await,
                _ => {}
            }
        }
    }

    /// Collect PUBLISH payloads until one equals `sentinel`; returns those before it.
    pub async fn payloads_until(&mut self, sentinel: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut got = Vec::new();
        loop {
            match self.next_publish(LIMIT).await {
                Some((_, _, p)) if p == sentinel => return got,
                // The gateway's own retained state topic reaches every `#` watcher.
                Some((t, _, _)) if t == "outpost/uplink/state" => {}
                Some((t, _, p)) => got.push((t, p)),
                None => panic!("sentinel never arrived; got {got:?}"),
            }
        }
    }

    /// The payloads of [`payloads_until`](Self::payloads_until), sorted (for checks that do
    /// not depend on the order of delivery).
    pub async fn sorted_payloads_until(&mut self, sentinel: &[u8]) -> Vec<Vec<u8>> {
        let mut got: Vec<Vec<u8>> = self
            .payloads_until(sentinel)
            .await
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        got.sort();
        got
    }

    /// True if the peer closes the connection within `limit`.
    pub async fn closed_within(&mut self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Ok(_) => continue,
                Err(NoPacket::Closed) => return true,
                Err(NoPacket::Timeout) => return false,
            }
        }
    }
}

/// A connected device session over TLS (CONNACK 0 asserted).
pub async fn device(addr: SocketAddr, creds: &Creds) -> Raw<Tls> {
    let s = tls_connect(addr, creds).await.expect("TLS handshake");
    let mut r = Raw { s };
    let code = r.connect(&wire::Connect::new(&creds.id)).await;
    assert_eq!(code, 0, "CONNACK for device {}", creds.id);
    r
}

/// A connected session on the plain listener (CONNACK 0 asserted).
pub async fn local(addr: SocketAddr, client_id: &str) -> Raw<tokio::net::TcpStream> {
    let s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect plain");
    s.set_nodelay(true).unwrap();
    let mut r = Raw { s };
    let code = r.connect(&wire::Connect::new(client_id)).await;
    assert_eq!(code, 0, "CONNACK for local client {client_id}");
    r
}
