//! Test support for the uplink: a real Mosquitto as the "cloud" broker (TLS, client
//! certificates), a fault-injecting TCP proxy the tests own, certificates made with rcgen, an
//! at-least-once device publisher and a cloud-side subscriber.
#![allow(dead_code)]

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ------------------------------------------------------------------------------------------
// Certificates

pub struct CloudPki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    ca_key: KeyPair,
    ca_params: CertificateParams,
}

impl CloudPki {
    pub fn new(dir: &Path) -> CloudPki {
        std::fs::create_dir_all(dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Test Cloud CA");
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = p.self_signed(&ca_key).unwrap();
        let ca = dir.join("cloud-ca.crt");
        std::fs::write(&ca, ca_cert.pem()).unwrap();
        let mut pki = CloudPki {
            dir: dir.to_path_buf(),
            ca,
            server_cert: dir.join("cloud-server.crt"),
            server_key: dir.join("cloud-server.key"),
            ca_key,
            ca_params: p,
        };
        let (c, k) = pki.issue("localhost", true);
        std::fs::rename(c, &pki.server_cert).unwrap();
        std::fs::rename(k, &pki.server_key).unwrap();
        pki
    }

    /// Issue a leaf; returns (cert path, key path).
    pub fn issue(&mut self, cn: &str, server: bool) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        if server {
            p.subject_alt_names = vec![
                SanType::DnsName("localhost".try_into().unwrap()),
                SanType::IpAddress("127.0.0.1".parse().unwrap()),
            ];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        } else {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = p.signed_by(&key, &issuer).unwrap();
        let c = self.dir.join(format!("{cn}.crt"));
        let k = self.dir.join(format!("{cn}.key"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

// ------------------------------------------------------------------------------------------
// Mosquitto as the cloud

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Cloud {
    pub port: u16,
    child: Child,
}

impl Cloud {
    pub fn start(pki: &CloudPki) -> Cloud {
        Cloud::start_with_cafile(pki, &pki.ca)
    }

    /// Client certificates are verified against `cafile` (e.g. a bundle with a gateway CA,
    /// for devices that use the cloud broker directly).
    pub fn start_with_cafile(pki: &CloudPki, cafile: &Path) -> Cloud {
        Cloud::start_on(pki, free_port(), cafile, "use_identity_as_username true\n")
    }

    /// A cloud broker that completes TLS (client certificate verified) but refuses every
    /// CONNECT with return code 5, Not authorized: it wants a username and password from its
    /// password file, and the gateway sends none. On `port` (0: any).
    pub fn start_refusing(pki: &CloudPki, port: u16) -> Cloud {
        let passwords = pki.dir.join("passwords");
        let st = Command::new("mosquitto_passwd")
            .args(["-c", "-b"])
            .arg(&passwords)
            .args(["someone-else", "secret"])
            .status()
            .expect("mosquitto_passwd");
        assert!(st.success());
        let port = if port == 0 { free_port() } else { port };
        let extra = format!("password_file {}\n", passwords.display());
        Cloud::start_on(pki, port, &pki.ca, &extra)
    }

    /// The usual (accepting) cloud broker on a given port, e.g. replacing a refusing one.
    pub fn start_on_port(pki: &CloudPki, port: u16) -> Cloud {
        Cloud::start_on(pki, port, &pki.ca, "use_identity_as_username true\n")
    }

    fn start_on(pki: &CloudPki, port: u16, cafile: &Path, extra: &str) -> Cloud {
        let conf = pki.dir.join(format!("mosquitto-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n{extra}allow_anonymous false\npersistence false\nmax_queued_messages 0\nmax_inflight_messages 0\nlog_type error\nlog_dest stderr\n",
                cafile.display(),
                pki.server_cert.display(),
                pki.server_key.display()
            ),
        )
        .unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (apt-get install mosquitto) must be installed");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Cloud { port, child }
    }
}

impl Cloud {
    /// Stop the broker now (e.g. to start another on its port).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------------------------------
// Fault-injecting TCP proxy

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// Forward everything.
    Pass,
    /// Accept, then forward nothing and answer nothing (packets silently dropped); what was
    /// held back is delivered when the fault ends, like TCP retransmission.
    Blackhole,
    /// Reset every connection and every new one.
    Reset,
    /// Add this one-way delay to every chunk.
    Delay(Duration),
    /// Emulated packet loss: each chunk (and each new connection's SYN) is "lost" with this
    /// probability and delivered after a retransmission timeout (200 ms chunks, 1 s SYN),
    /// repeatedly, as TCP over a lossy link behaves.
    Loss(f64),
}

pub struct Proxy {
    pub addr: SocketAddr,
    /// When each connection was accepted (bounded: the first 10,000).
    pub accepted: Arc<Mutex<Vec<Instant>>>,
    fault: tokio::sync::watch::Sender<Fault>,
    _rt: Arc<tokio::runtime::Runtime>,
}

impl Proxy {
    pub fn start(target: SocketAddr) -> Proxy {
        Proxy::start_on(0, target)
    }

    /// On a given loopback port (0: any), for addresses that must be known in advance.
    pub fn start_on(port: u16, target: SocketAddr) -> Proxy {
        let rt = Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
        );
        let (tx, rx) = tokio::sync::watch::channel(Fault::Pass);
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let log = accepted.clone();
        rt.spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                {
                    let mut log = log.lock().unwrap();
                    if log.len() < 10_000 {
                        log.push(Instant::now());
                    }
                }
                let rx = rx.clone();
                tokio::spawn(proxy_conn(client, target, rx));
            }
        });
        Proxy {
            addr,
            accepted,
            fault: tx,
            _rt: rt,
        }
    }

    pub fn set(&self, f: Fault) {
        self.fault.send_replace(f);
    }
}

fn lost(p: f64) -> bool {
    rand::random::<f64>() < p
}

async fn wait_not_blackhole(rx: &mut tokio::sync::watch::Receiver<Fault>) -> Fault {
    loop {
        let f = *rx.borrow_and_update();
        if f != Fault::Blackhole {
            return f;
        }
        if rx.changed().await.is_err() {
            return Fault::Reset;
        }
    }
}

fn reset(s: tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
}

async fn proxy_conn(
    client: tokio::net::TcpStream,
    target: SocketAddr,
    mut rx: tokio::sync::watch::Receiver<Fault>,
) {
    let f = wait_not_blackhole(&mut rx).await;
    match f {
        Fault::Reset => return reset(client),
        Fault::Loss(p) => {
            while lost(p) {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        Fault::Delay(d) => tokio::time::sleep(d).await,
        _ => {}
    }
    let Ok(server) = tokio::net::TcpStream::connect(target).await else {
        return reset(client);
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = tokio::spawn(pump(cr, sw, rx.clone()));
    let down = tokio::spawn(pump(sr, cw, rx));
    let _ = tokio::join!(up, down);
}

/// Copy one direction, applying the fault in force to every chunk. On Reset both sockets
/// of the connection are closed with RST (linger 0).
async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    mut rx: tokio::sync::watch::Receiver<Fault>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rst = |r: &tokio::net::tcp::OwnedReadHalf, w: &tokio::net::tcp::OwnedWriteHalf| {
        let _ = socket2::SockRef::from(r.as_ref()).set_linger(Some(Duration::ZERO));
        let _ = socket2::SockRef::from(w.as_ref()).set_linger(Some(Duration::ZERO));
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // Blackhole: stop reading too, so nothing is acknowledged end to end.
        if wait_not_blackhole(&mut rx).await == Fault::Reset {
            return rst(&r, &w);
        }
        let n = tokio::select! {
            res = r.read(&mut buf) => match res {
                Ok(0) | Err(_) => {
                    let _ = w.shutdown().await;
                    return;
                }
                Ok(n) => n,
            },
            ch = rx.changed() => {
                if ch.is_err() || *rx.borrow() == Fault::Reset {
                    return rst(&r, &w);
                }
                continue;
            }
        };
        loop {
            match wait_not_blackhole(&mut rx).await {
                Fault::Reset => return rst(&r, &w),
                Fault::Delay(d) => tokio::time::sleep(d).await,
                Fault::Loss(p) if lost(p) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                _ => {}
            }
            break;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

// ------------------------------------------------------------------------------------------
// At-least-once device publisher (MQTT 3.1.1 over TLS, written out by hand so that it
// re-sends everything unacknowledged after any reconnect: rumqttc drops its in-flight
// messages when the broker has no session, which would hide losses or invent them).

pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

pub fn tls_client_config(ca: &Path, cert: &Path, key: &Path) -> Arc<rustls::ClientConfig> {
    let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    tls_client_config_pem(&read(ca), &read(cert), &read(key))
}

/// [`tls_client_config`] from PEM bytes.
pub fn tls_client_config_pem(
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &ca_pem[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let chain = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .unwrap()
        .unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap(),
    )
}

fn connect_tls(
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
) -> std::io::Result<Box<dyn Stream>> {
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_millis(200)))?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let conn = rustls::ClientConnection::new(tls.clone(), name).map_err(std::io::Error::other)?;
    Ok(Box::new(rustls::StreamOwned::new(conn, tcp)))
}

fn publish_packet(topic: &str, pid: u16, payload: &[u8], dup: bool) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&pid.to_be_bytes());
    body.extend_from_slice(payload);
    let mut p = vec![0x32 | if dup { 0x08 } else { 0 }];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        p.push(b);
        if len == 0 {
            break;
        }
    }
    p.extend_from_slice(&body);
    p
}

/// Publish QoS 1 messages `"{id}:{i}"` for i in `range` to `topic`, keeping `window` in
/// flight and re-sending every unacknowledged one after a reconnect. Returns the number of
/// reconnects. Gives up (panics) after `deadline`.
pub fn publish_at_least_once(
    addr: impl Fn() -> SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    id: &str,
    topic: &str,
    range: std::ops::Range<usize>,
    window: usize,
    deadline: Instant,
) -> usize {
    let count = range.end;
    let mut next = range.start;
    let mut outstanding: std::collections::VecDeque<(u16, usize)> = Default::default();
    let mut reconnects = 0usize;
    let mut first = true;
    'session: loop {
        assert!(
            Instant::now() < deadline,
            "{id}: gave up with {} unsent/unacknowledged",
            count - next + outstanding.len()
        );
        if next >= count && outstanding.is_empty() {
            return reconnects;
        }
        if !first {
            reconnects += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        first = false;
        let Ok(mut s) = connect_tls(addr(), &tls) else {
            continue;
        };
        let connect =
            outpost::frontdoor::mqtt::encode_connect(&outpost::frontdoor::mqtt::Connect {
                clean_session: true,
                keep_alive: 30,
                client_id: id.to_string(),
                will: None,
                username: None,
                password: None,
            });
        if s.write_all(&connect).is_err() {
            continue;
        }
        let mut buf: Vec<u8> = Vec::new();
        let mut connacked = false;
        let t0 = Instant::now();
        // Re-send the unacknowledged ones first, in order.
        let mut resend: Vec<u8> = Vec::new();
        for (pid, i) in &outstanding {
            resend.extend(publish_packet(
                topic,
                *pid,
                format!("{id}:{i}").as_bytes(),
                true,
            ));
        }
        let mut resent = false;
        loop {
            if !connacked && t0.elapsed() > Duration::from_secs(5) {
                continue 'session;
            }
            if connacked {
                if !resent {
                    if s.write_all(&resend).is_err() {
                        continue 'session;
                    }
                    resent = true;
                }
                let mut out = Vec::new();
                while outstanding.len() < window && next < count {
                    let pid = (next % 60000) as u16 + 1;
                    out.extend(publish_packet(
                        topic,
                        pid,
                        format!("{id}:{next}").as_bytes(),
                        false,
                    ));
                    outstanding.push_back((pid, next));
                    next += 1;
                }
                if !out.is_empty() && s.write_all(&out).is_err() {
                    continue 'session;
                }
                if next >= count && outstanding.is_empty() {
                    return reconnects;
                }
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk) {
                Ok(0) => continue 'session,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => continue 'session,
            }
            while let Ok(Some((t, _, h, total))) = outpost::frontdoor::mqtt::frame(&buf, 1 << 20) {
                match t {
                    2 => {
                        if buf.get(h + 1) != Some(&0) {
                            continue 'session;
                        }
                        connacked = true;
                    }
                    4 => {
                        let pid = u16::from_be_bytes([buf[h], buf[h + 1]]);
                        if let Some(pos) = outstanding.iter().position(|(p, _)| *p == pid) {
                            outstanding.remove(pos);
                        }
                    }
                    _ => {}
                }
                buf.drain(..total);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Cloud-side subscriber (rumqttc, directly on the cloud broker).

pub struct CloudSubscriber {
    pub received: Arc<Mutex<Vec<(String, String)>>>,
    rt: tokio::runtime::Runtime,
    pub client: rumqttc::AsyncClient,
}

impl CloudSubscriber {
    pub fn start(
        port: u16,
        tls: Arc<rustls::ClientConfig>,
        id: &str,
        filter: &str,
    ) -> CloudSubscriber {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let mut o = rumqttc::MqttOptions::new(id, "localhost", port);
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
        o.set_keep_alive(Duration::from_secs(30));
        o.set_clean_session(false);
        o.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut el) = rumqttc::AsyncClient::new(o, 100);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let r = received.clone();
        let c = client.clone();
        let filter = filter.to_string();
        rt.spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match el.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        let _ = c.subscribe(filter.clone(), rumqttc::QoS::AtLeastOnce).await;
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        if let Some(t) = ready.take() {
                            let _ = t.send(());
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        r.lock().unwrap().push((
                            p.topic.clone(),
                            String::from_utf8_lossy(&p.payload).into_owned(),
                        ));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("cloud subscriber subscribed");
        CloudSubscriber {
            received,
            rt,
            client,
        }
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// Distinct messages received (duplicates from resends counted once): what "everything
    /// arrived" must be judged on, since duplicates can make `count` reach the total first.
    pub fn unique(&self) -> usize {
        let r = self.received.lock().unwrap();
        r.iter()
            .map(|(_, payload)| payload.as_str())
            .collect::<std::collections::HashSet<_>>()
            .len()
    }

    /// Publish from the cloud side (e.g. a command to a device).
    pub fn publish(&self, topic: &str, payload: &str) {
        let c = self.client.clone();
        let (t, p) = (topic.to_string(), payload.to_string());
        self.rt.block_on(async move {
            c.publish(t, rumqttc::QoS::AtLeastOnce, false, p)
                .await
                .unwrap()
        });
    }
}

/// Check the cloud got every `"{dev}:{i}"` for i in 0..count, first occurrences in order.
/// Returns the number of duplicates.
pub fn verify_stream(received: &[(String, String)], devices: &[String], count: usize) -> usize {
    let mut seen: HashMap<&str, Vec<bool>> = devices
        .iter()
        .map(|d| (d.as_str(), vec![false; count]))
        .collect();
    let mut last: HashMap<&str, i64> = HashMap::new();
    let mut dups = 0;
    for (_, payload) in received {
        let Some((dev, i)) = payload.split_once(':') else {
            continue;
        };
        let Some(flags) = seen.get_mut(dev) else {
            continue;
        };
        let i: usize = i.parse().unwrap();
        if flags[i] {
            dups += 1;
            continue;
        }
        flags[i] = true;
        let l = last.entry(dev).or_insert(-1);
        assert!(
            i as i64 > *l,
            "order broken for {dev}: {i} arrived after {l}"
        );
        *l = i as i64;
    }
    for (dev, flags) in &seen {
        let missing: Vec<usize> = flags
            .iter()
            .enumerate()
            .filter(|(_, f)| !**f)
            .map(|(i, _)| i)
            .take(10)
            .collect();
        assert!(
            missing.is_empty(),
            "{dev}: missing messages (first: {missing:?})"
        );
    }
    dups
}
