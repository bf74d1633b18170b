//! Issue 4, acceptance 1 and 2, with the real binary in every role: a manufacturer makes a
//! device (`outpost voucher init-device`), its voucher is extended to an owner and imported
//! there; the owner registers it at its rendezvous server (TO0, by itself); `outpost device`
//! finds its owner (TO1), onboards (TO2), receives an operational certificate for a key it
//! generated, and publishes through the gateway's mTLS broker with it. The owner's registry
//! records the device.

mod common;

use common::roles::{extend_to, made_for_gateway, make_device, registry, s, Agent, Cloud};
use common::{base_config, expect_publish, mqtt_subscribe, plain_session, tls_args, Gateway};
use std::process::Command;
use std::time::Duration;

/// The device's heartbeat arrives at a local subscriber of the gateway, and a real MQTT
/// client (mosquitto_pub) with the device's files is accepted by the gateway's mTLS
/// listener and routed.
fn check_publishes_through_gateway(gw: &Gateway, agent: &Agent, client_id: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut sub = plain_session(gw.plain(), "watcher").await;
        mqtt_subscribe(&mut sub, &format!("devices/{client_id}/#"), 1).await;
        let beat = expect_publish(
            &mut sub,
            &format!("devices/{client_id}/telemetry/heartbeat"),
            Duration::from_secs(20),
        )
        .await;
        let beat: serde_json::Value = serde_json::from_slice(&beat).expect("heartbeat JSON");
        assert!(beat["seq"].as_u64().unwrap_or(0) >= 1, "{beat}");

        common::require_mosquitto();
        let creds = agent.creds(client_id);
        let topic = format!("devices/{client_id}/telemetry/manual");
        let out = Command::new("mosquitto_pub")
            .args(tls_args(gw.mqtts(), &creds))
            .args([
                "-i",
                client_id,
                "-q",
                "1",
                "-t",
                &topic,
                "-m",
                "from-mosquitto",
            ])
            .output()
            .expect("mosquitto_pub");
        assert!(
            out.status.success(),
            "mosquitto_pub with the onboarded credentials: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = expect_publish(&mut sub, &topic, Duration::from_secs(10)).await;
        assert_eq!(got, b"from-mosquitto");
    });
}

fn check_entry(
    entries: &[serde_json::Value],
    old_guid: &str,
    guid: &str,
    by: &str,
) -> serde_json::Value {
    let e = entries
        .iter()
        .find(|e| e["guid"] == guid)
        .unwrap_or_else(|| panic!("{guid} not in registry {entries:?}"))
        .clone();
    assert_eq!(e["old_guid"], old_guid);
    assert_eq!(e["registered_by"], by);
    assert!(
        e["cert_serial"].as_str().is_some_and(|s| !s.is_empty()),
        "{e}"
    );
    assert!(
        e["device_cert_hash"]
            .as_str()
            .is_some_and(|s| s.len() == 64),
        "{e}"
    );
    assert!(
        e["owner_key_id"].as_str().is_some_and(|s| !s.is_empty()),
        "{e}"
    );
    assert!(
        e["device_info"]
            .as_str()
            .is_some_and(|s| s.contains("model-x")),
        "{e}"
    );
    assert!(
        e["onboarded_at"].as_i64().unwrap_or(0) > 1_700_000_000,
        "{e}"
    );
    assert!(
        e["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{e}"
    );
    e
}

#[test]
fn device_onboards_against_the_cloud_and_publishes_through_the_gateway() {
    // The cloud's CA exists before the gateway starts, so that the gateway can accept the
    // certificates it issues; the gateway's CA is what devices need to verify the gateway.
    let mut cloud = Cloud::prepare("");
    let cloud_ca = cloud.ca_cert();
    let gw = Gateway::start_custom(|data| {
        base_config(
            data,
            &format!("[tls]\nextra_client_cas = [\"{}\"]\n", cloud_ca.display()),
        )
    });
    let gw_ca = gw.data_dir.join("ca.crt");
    let text = std::fs::read_to_string(&cloud.config_path)
        .unwrap()
        .replace(
            "[fdo]\n",
            &format!(
                "[fdo]\nmqtt_servers = [\"mqtts://127.0.0.1:{}\"]\nserver_trust = [\"{}\"]\n",
                gw.mqtts().port(),
                gw_ca.display()
            ),
        );
    std::fs::write(&cloud.config_path, text).unwrap();
    cloud.start();

    let work = tempfile::tempdir().unwrap();
    let dev = make_device(work.path(), "dev-cloud", cloud.fdo());
    let owner = cloud.cli(&["voucher", "owner-cert"]);
    let v = extend_to(&dev, &owner, "cloud");
    let imported = cloud.cli(&["voucher", "import", s(&v)]);
    assert!(imported.contains(&dev.guid), "{imported}");

    let mut agent = Agent::start(&dev.cred, &work.path().join("state"), &[]);
    let onboarded = agent.expect("onboarded", Duration::from_secs(30));
    assert_eq!(onboarded["old_guid"], dev.guid.as_str());
    let client_id = onboarded["client_id"]
        .as_str()
        .expect("client id")
        .to_string();
    assert_eq!(onboarded["guid"], client_id.as_str());
    assert_ne!(client_id, dev.guid, "TO2 gives the device a new GUID");
    assert_eq!(
        onboarded["servers"],
        serde_json::json!([format!("mqtts://127.0.0.1:{}", gw.mqtts().port())])
    );
    let connected = agent.expect("connected", Duration::from_secs(15));
    assert_eq!(
        connected["server"],
        format!("mqtts://127.0.0.1:{}", gw.mqtts().port())
    );
    check_publishes_through_gateway(&gw, &agent, &client_id);

    // The cloud recorded it, the certificate serial is one its CA issued, and the device
    // key never left the device (the CA's record says it came from a CSR).
    let reg = registry(&cloud.config_path);
    let e = check_entry(&reg, &dev.guid, &client_id, "cloud cloud-test");
    let certs: Vec<serde_json::Value> =
        serde_json::from_str(&cloud.cli(&["ca", "list", "--json"])).unwrap();
    let c = certs
        .iter()
        .find(|c| c["serial"] == e["cert_serial"])
        .unwrap_or_else(|| panic!("serial not in the cloud CA: {certs:?}"));
    assert_eq!(c["device_id"], client_id.as_str());
    assert_eq!(c["key_source"], "csr");
    // The device credential file was replaced: it names the new GUID, so the old voucher
    // no longer matches it.
    let out = Command::new(common::BIN)
        .args(["voucher", "show", s(&v), "--cred", s(&dev.cred)])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("expected {client_id}")), "{err}");
}

#[test]
fn device_onboards_against_the_gateway_as_rendezvous_and_owner() {
    let gw = Gateway::start();
    let work = tempfile::tempdir().unwrap();
    let dev = made_for_gateway(&gw, work.path(), "dev-gw");

    let mut agent = Agent::start(&dev.cred, &work.path().join("state"), &[]);
    let onboarded = agent.expect("onboarded", Duration::from_secs(30));
    let client_id = onboarded["client_id"]
        .as_str()
        .expect("client id")
        .to_string();
    let primary = format!("mqtts://127.0.0.1:{}", gw.mqtts().port());
    assert_eq!(onboarded["servers"][0], primary.as_str());
    let connected = agent.expect("connected", Duration::from_secs(15));
    assert_eq!(connected["server"], primary.as_str());
    check_publishes_through_gateway(&gw, &agent, &client_id);

    let reg = registry(&gw.config_path);
    let e = check_entry(&reg, &dev.guid, &client_id, "gateway gw-test");
    let list = gw.cli(&["ca", "list", "--json"]);
    let certs: Vec<serde_json::Value> = serde_json::from_slice(&list.stdout).unwrap();
    assert!(
        certs
            .iter()
            .any(|c| c["serial"] == e["cert_serial"] && c["device_id"] == client_id.as_str()),
        "{certs:?}"
    );
    // The log says how the device was found and onboarded.
    let log = gw.log();
    assert!(log.contains("TO0: registered"), "{log}");
    assert!(log.contains("TO1: device proved itself"), "{log}");

    // Restarted, the agent reuses its credentials instead of onboarding again.
    drop(agent);
    let mut again = Agent::start(&dev.cred, &work.path().join("state"), &[]);
    let c = again.expect("connected", Duration::from_secs(15));
    assert_eq!(c["server"], primary.as_str());
    assert!(
        !again.seen.iter().any(|e| e["event"] == "onboarded"),
        "{:?}",
        again.seen
    );
    assert_eq!(registry(&gw.config_path).len(), 1);
}

/// The FDO listener is bounded: stalled clients hold a connection slot for at most the
/// request timeout, garbage gets an error answer, and onboarding traffic still goes through.
#[test]
fn fdo_listener_survives_stalled_and_garbage_clients() {
    use std::io::{Read, Write};
    let gw = Gateway::start_custom(|data| {
        base_config(data, "").replace(
            "[fdo]\nlisten = \"127.0.0.1:0\"\n",
            "[fdo]\nlisten = \"127.0.0.1:0\"\nmax_connections = 4\nrequest_timeout = \"1s\"\n",
        )
    });
    let fdo = gw.ep.fdo.expect("FDO listener");
    // Four connections that send half a request and stall: every slot taken.
    let mut stalled: Vec<std::net::TcpStream> = (0..4)
        .map(|_| {
            let mut c = std::net::TcpStream::connect(fdo).unwrap();
            c.write_all(b"POST /fdo/101/msg/30 HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            c
        })
        .collect();
    let started = std::time::Instant::now();
    // A real request waits for a slot, then is answered (error 255: unknown GUID).
    let mut c = std::net::TcpStream::connect(fdo).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = [
        0x82, 0x50, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x82, 0x26, 0xf6,
    ];
    let mut req = format!(
        "POST /fdo/101/msg/30 HTTP/1.1\r\nHost: x\r\nContent-Type: application/cbor\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    c.write_all(&req).unwrap();
    let mut answer = Vec::new();
    c.read_to_end(&mut answer).unwrap();
    let waited = started.elapsed();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 500"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("message-type: 255"),
        "{text}"
    );
    assert!(
        waited >= Duration::from_millis(700) && waited < Duration::from_secs(5),
        "a slot freed after {waited:?} (request_timeout 1 s)"
    );
    // The stalled connections were closed by the gateway.
    for s in &mut stalled {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
    }
    // Garbage: not HTTP at all, and an oversized body.
    let mut g = std::net::TcpStream::connect(fdo).unwrap();
    g.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    g.write_all(&[
        0x16, 0x03, 0x01, 0xff, 0xff, 0, 1, 2, 3, b'\r', b'\n', b'\r', b'\n',
    ])
    .unwrap();
    let mut buf = Vec::new();
    let _ = g.read_to_end(&mut buf);
    let mut big = std::net::TcpStream::connect(fdo).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    big.write_all(
        b"POST /fdo/101/msg/60 HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut buf = Vec::new();
    let _ = big.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 413"), "oversized body: {text}");
    // Still serving, and onboarding works.
    let work = tempfile::tempdir().unwrap();
    let dev = make_device(work.path(), "dev-after", fdo);
    let owner = gw.cli(&["voucher", "owner-cert"]);
    let v = extend_to(&dev, &String::from_utf8_lossy(&owner.stdout), "gw");
    assert!(gw.cli(&["voucher", "import", s(&v)]).status.success());
    let mut agent = Agent::start(&dev.cred, &work.path().join("state"), &["--onboard-only"]);
    agent.expect("onboarded", Duration::from_secs(30));
}

/// A flooder on the FDO listener: `threads` keep-alive HTTP connections from `from` sending
/// TO0.Hello, TO1.HelloRV and TO2.HelloDevice (for `guid`, which is no secret) back to back,
/// never going further than the first message. Stops when `stop` is set; returns requests
/// answered.
fn flood(
    fdo: std::net::SocketAddr,
    from: std::net::IpAddr,
    guid: outpost::fdo_wire::Guid,
    threads: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<std::thread::JoinHandle<usize>> {
    use outpost::fdo_wire::msg::{self, HelloDevice, Nonce, To1HelloRv};
    use outpost::fdo_wire::types::SigInfo;
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    let sig = SigInfo {
        sg_type: -7,
        info: Vec::new(),
    };
    let bodies: Vec<(u8, Vec<u8>)> = vec![
        (20, msg::to0_hello()),
        (
            30,
            To1HelloRv {
                guid,
                sig_info: sig.clone(),
            }
            .encode(),
        ),
        (
            60,
            HelloDevice {
                max_device_message_size: 0,
                guid,
                nonce: Nonce([9; 16]),
                kex_suite: msg::KEX_ECDH256.into(),
                cipher_suite: 1,
                sig_info: sig,
            }
            .encode(),
        ),
    ];
    let requests: Vec<Vec<u8>> = bodies
        .iter()
        .map(|(n, b)| {
            let mut r = format!(
                "POST /fdo/101/msg/{n} HTTP/1.1\r\nHost: x\r\nContent-Type: application/cbor\r\nContent-Length: {}\r\n\r\n",
                b.len()
            )
            .into_bytes();
            r.extend_from_slice(b);
            r
        })
        .collect();
    (0..threads)
        .map(|t| {
            let (requests, stop) = (requests.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut done = 0usize;
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let sock =
                        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                            .unwrap();
                    sock.bind(&std::net::SocketAddr::new(from, 0).into())
                        .expect("bind the flooder's address");
                    if sock.connect(&fdo.into()).is_err() {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                    let mut c: std::net::TcpStream = sock.into();
                    c.set_nodelay(true).unwrap();
                    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let mut buf = Vec::new();
                    'conn: while !stop.load(Ordering::Relaxed) {
                        if c.write_all(&requests[i % requests.len()]).is_err() {
                            break;
                        }
                        i += 1;
                        // One answer: headers, then Content-Length bytes.
                        loop {
                            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                                let len: usize = head
                                    .lines()
                                    .find_map(|l| l.strip_prefix("content-length:"))
                                    .and_then(|v| v.trim().parse().ok())
                                    .unwrap_or(0);
                                if buf.len() >= end + 4 + len {
                                    buf.drain(..end + 4 + len);
                                    done += 1;
                                    let close = head.contains("connection: close");
                                    if close {
                                        break 'conn;
                                    }
                                    break;
                                }
                            }
                            let mut chunk = [0u8; 4096];
                            match c.read(&mut chunk) {
                                Ok(0) | Err(_) => break 'conn,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                    }
                }
                done
            })
        })
        .collect()
}

/// Issue 10 part 4: FDO session tables cannot be filled without authenticating. A peer
/// floods TO0.Hello, TO1.HelloRV and TO2.HelloDevice (for the very device that onboards)
/// from its own address while the gateway registers a freshly imported voucher (its own
/// TO0) and a real device runs TO1 and TO2: the device onboards within the bound, the flood
/// only evicts its own unproven sessions, and nothing is refused.
#[test]
fn device_onboards_while_a_peer_floods_new_fdo_sessions() {
    use std::sync::atomic::{AtomicBool, Ordering};
    // A small table (the same mechanics as the default 10,000), so the flood fills it fast.
    let gw = Gateway::start_custom(|data| {
        base_config(data, "").replace(
            "[fdo]\nlisten = \"127.0.0.1:0\"\n",
            "[fdo]\nlisten = \"127.0.0.1:0\"\nmax_sessions = 200\n",
        )
    });
    let fdo = gw.ep.fdo.expect("FDO listener");
    let work = tempfile::tempdir().unwrap();
    let dev = make_device(work.path(), "dev-flood", fdo);
    let guid = outpost::fdo_wire::Guid(
        hex::decode(&dev.guid)
            .expect("hex GUID")
            .try_into()
            .expect("16 bytes"),
    );
    let owner = gw.cli(&["voucher", "owner-cert"]);
    let v = extend_to(&dev, &String::from_utf8_lossy(&owner.stdout), "gw");

    // The flooder is another host (127.0.0.2); the gateway and the device are 127.0.0.1.
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flooders = flood(fdo, "127.0.0.2".parse().unwrap(), guid, 4, stop.clone());
    let t0 = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    assert!(gw.cli(&["voucher", "import", s(&v)]).status.success());
    let m = |table: &str, what: &str| {
        let sample = format!("outpost_fdo_sessions_{what}_total{{table=\"{table}\"}}");
        gw.metrics()
            .lines()
            .find_map(|l| {
                l.strip_prefix(sample.as_str())
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0i64)
    };
    // Once the GUID is registered the flood's HelloRV and HelloDevice open sessions too: the
    // device comes when every table has been flooded past its size.
    let t_import = std::time::Instant::now();
    while ["to0", "to1", "to2"].iter().any(|t| m(t, "evicted") < 200)
        && t_import.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let t_device = std::time::Instant::now();
    let mut agent = Agent::start(&dev.cred, &work.path().join("state"), &["--onboard-only"]);
    agent.expect("onboarded", Duration::from_secs(60));
    let took = t_device.elapsed();
    stop.store(true, Ordering::Relaxed);
    let sent: usize = flooders.into_iter().map(|f| f.join().unwrap()).sum();
    let flood_time = t0.elapsed().as_secs_f64();
    eprintln!(
        "flood: {sent} requests in {flood_time:.1} s ({:.0}/s); device onboarded in {took:?}; evicted to0 {} to1 {} to2 {}",
        sent as f64 / flood_time,
        m("to0", "evicted"),
        m("to1", "evicted"),
        m("to2", "evicted"),
    );
    assert!(
        took < Duration::from_secs(30),
        "onboarding took {took:?} during the flood"
    );
    for t in ["to0", "to1", "to2"] {
        assert!(m(t, "evicted") >= 200, "the flood overfilled table {t}");
        assert_eq!(m(t, "refused"), 0, "nothing refused in {t}");
    }
    let log = gw.log();
    assert!(log.contains("TO0: registered"), "{log}");
    assert!(!log.contains("too many open sessions"), "{log}");
}
