//! The gateway as a process: signals, exit codes, configuration errors, defaults, mDNS.

mod common;

use common::*;
use outpost::config::Config;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn ca_list(gw: &Gateway) -> Vec<serde_json::Value> {
    let out = gw.cli(&["ca", "list", "--json"]);
    assert!(
        out.status.success(),
        "ca list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ca list --json is a JSON array")
}

fn record<'a>(list: &'a [serde_json::Value], serial: &str) -> &'a serde_json::Value {
    list.iter()
        .find(|r| r["serial"] == serial)
        .unwrap_or_else(|| panic!("serial {serial} not listed in {list:?}"))
}

fn pem_der(path: &Path) -> Vec<u8> {
    let pem = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let der = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .expect("a PEM certificate")
        .expect("valid PEM")
        .to_vec();
    der
}

fn sha256_hex(der: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(der))
}

/// Connect a device and report whether the gateway accepted its MQTT session.
async fn device_accepted(addr: SocketAddr, dev: &Creds) -> bool {
    let Ok(Ok(mut s)) = tokio::time::timeout(
        Duration::from_secs(5),
        tls_connect(addr, device_tls_config(dev)),
    )
    .await
    else {
        return false;
    };
    if s.write_all(&wire::connect(&dev.id, 30)).await.is_err() {
        return false;
    }
    match tokio::time::timeout(Duration::from_secs(5), read_packet(&mut s)).await {
        Ok(Ok(Some(p))) => p.kind() == 2 && p.body == [0, 0],
        _ => false,
    }
}

/// SIGTERM / SIGINT with every kind of live connection open: exit 0 within the grace period,
/// and what the CA did before is all there after a restart on the same data dir.
fn stop_with_live_clients_then_restart(sig: &str) {
    require_mosquitto();
    const GRACE: Duration = Duration::from_secs(3);
    let mut gw = Gateway::start_with("[shutdown]\ngrace = \"3s\"\n");
    let keep = gw.issue("dev-keep");
    let sub_dev = gw.issue("dev-sub");
    let gone = gw.issue("dev-gone");
    gw.revoke_id("dev-gone");
    let ca_before = std::fs::read(gw.data_dir.join("ca.crt")).unwrap();
    let rt = runtime();

    // A stock client that stays subscribed (and would reconnect).
    let mut mosq: Child = Command::new("mosquitto_sub")
        .args(tls_args(gw.mqtts(), &sub_dev))
        .args(["-i", "dev-sub", "-t", "devices/dev-sub/#"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mosquitto_sub");

    let (elapsed, status) = rt.block_on(async {
        let mut device = tls_connect(gw.mqtts(), device_tls_config(&keep))
            .await
            .expect("device TLS");
        assert_eq!(
            mqtt_connect(&mut device, "dev-keep", Duration::from_secs(5)).await,
            0
        );
        mqtt_subscribe(&mut device, "devices/dev-keep/#", 1).await;
        let mut local = plain_session(gw.plain(), "local-live").await;
        mqtt_subscribe(&mut local, "devices/#", 0).await;
        // Half-open or idle sockets of every listener.
        let stalled_tls = tokio::net::TcpStream::connect(gw.mqtts()).await.unwrap();
        let no_connect = tokio::net::TcpStream::connect(gw.plain()).await.unwrap();
        let mut http_idle = std::net::TcpStream::connect(gw.ep.metrics.unwrap()).unwrap();
        http_idle
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        http_idle
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut first = [0u8; 12];
        http_idle.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");
        let mut http_partial = std::net::TcpStream::connect(gw.ep.metrics.unwrap()).unwrap();
        http_partial
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        let admin_idle =
            std::os::unix::net::UnixStream::connect(gw.data_dir.join("admin.sock")).unwrap();

        // Device, local and mosquitto_sub sessions, and the plain socket waiting for CONNECT
        // (the TLS socket without handshake is not an MQTT connection yet).
        let open = wait_metric(
            &gw,
            "outpost_connections_open",
            Duration::from_secs(10),
            |v| v >= 4,
        );
        assert_eq!(open, 4, "live connections before the signal");

        let start = Instant::now();
        gw.signal(sig);
        let status = tokio::task::block_in_place(|| gw.wait(GRACE + Duration::from_secs(10)));
        let elapsed = start.elapsed();
        // The device's session was ended by the gateway.
        assert!(wait_closed(&mut device, Duration::from_secs(2))
            .await
            .is_some());
        drop((
            stalled_tls,
            no_connect,
            http_idle,
            http_partial,
            admin_idle,
            local,
        ));
        (elapsed, status)
    });
    let _ = mosq.kill();
    let _ = mosq.wait();
    let status = status.unwrap_or_else(|| {
        panic!(
            "no exit {:?} after SIG{sig}:\n{}",
            GRACE + Duration::from_secs(10),
            gw.log()
        )
    });
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIG{sig}:\n{}",
        gw.log()
    );
    assert!(
        elapsed <= GRACE + Duration::from_millis(1500),
        "SIG{sig} exit took {elapsed:?}; shutdown.grace is {GRACE:?}:\n{}",
        gw.log()
    );
    assert!(
        !gw.data_dir.join(outpost::ENDPOINTS_FILE).exists(),
        "endpoints.json left behind"
    );
    assert!(
        !gw.data_dir.join("admin.sock").exists(),
        "admin.sock left behind"
    );

    // Restart on the same data dir: same CA, the issued certificates and the revocation.
    gw.spawn();
    assert_eq!(
        std::fs::read(gw.data_dir.join("ca.crt")).unwrap(),
        ca_before,
        "CA changed across restart"
    );
    let list = ca_list(&gw);
    assert!(
        record(&list, &keep.serial)["revoked_at"].is_null(),
        "dev-keep must still be valid"
    );
    assert!(record(&list, &sub_dev.serial)["revoked_at"].is_null());
    let g = record(&list, &gone.serial);
    assert_eq!(g["device_id"], "dev-gone");
    assert!(
        g["revoked_at"].is_i64(),
        "revocation lost across restart: {g}"
    );
    rt.block_on(async {
        assert!(
            device_accepted(gw.mqtts(), &keep).await,
            "valid device refused after restart"
        );
        assert!(
            !device_accepted(gw.mqtts(), &gone).await,
            "revoked device accepted after restart"
        );
    });
    assert!(gw.metric("outpost_tls_handshake_failures_total") >= 1);
    gw.signal("TERM");
    let st = gw.wait(Duration::from_secs(10)).expect("second stop");
    assert_eq!(st.code(), Some(0));
}

#[test]
fn sigterm_with_live_clients_exits_zero_and_state_survives() {
    stop_with_live_clients_then_restart("TERM");
}

#[test]
fn sigint_with_live_clients_exits_zero_and_state_survives() {
    stop_with_live_clients_then_restart("INT");
}

// ---------------------------------------------------------------------------------------------
// Configuration errors

fn config_text(data_dir: &Path, mqtts_port: u16, listeners_extra: &str, extra: &str) -> String {
    format!(
        r#"[gateway]
id = "gw-cfg"
data_dir = "{}"

[listeners]
mqtts = "127.0.0.1:{mqtts_port}"
plain = "127.0.0.1:0"
{listeners_extra}

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

fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Run `outpost ARGS` to completion (at most 20 s).
fn run_to_exit(args: &[&str], config: &Path) -> std::process::Output {
    let mut child = Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn outpost");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "outpost {args:?} still running after 20 s (it accepted the config?): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn invalid_configs_exit_64_naming_the_field_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let port = free_port();
    let path = dir.path().join("bad.toml");

    // Control: the same template with nothing wrong starts and binds the port.
    std::fs::write(&path, config_text(&data_dir, port, "", "")).unwrap();
    let mut ok = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Endpoints::read(&data_dir).is_none() {
        assert!(
            ok.try_wait().unwrap().is_none(),
            "control config did not start"
        );
        assert!(
            Instant::now() < deadline,
            "control config not ready in 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !port_is_free(port),
        "control gateway does not hold its mqtts port"
    );
    let _ = ok.kill();
    let _ = ok.wait();
    std::fs::remove_dir_all(&data_dir).unwrap();
    assert!(port_is_free(port));

    let cases: &[(&str, String, &str)] = &[
        (
            "unknown field",
            config_text(&data_dir, port, "", "[limits]\nmax_conections = 5\n"),
            "max_conections",
        ),
        (
            "unknown section",
            config_text(&data_dir, port, "", "[limit]\nmax_connections = 5\n"),
            "`limit`",
        ),
        (
            "packet size too small",
            config_text(&data_dir, port, "", "[limits]\nmax_packet_size = 1\n"),
            "limits.max_packet_size",
        ),
        (
            "no connections",
            config_text(&data_dir, port, "", "[limits]\nmax_connections = 0\n"),
            "limits.max_connections",
        ),
        (
            "plain on network",
            config_text(&data_dir, port, "", "")
                .replace("plain = \"127.0.0.1:0\"", "plain = \"0.0.0.0:0\""),
            "listeners.plain",
        ),
        (
            "wrong type",
            config_text(
                &data_dir,
                port,
                "",
                "[limits]\nmax_connections = \"many\"\n",
            ),
            "max_connections",
        ),
        (
            "bad duration",
            config_text(
                &data_dir,
                port,
                "",
                "[limits]\nconnect_timeout = \"soon\"\n",
            ),
            "connect_timeout",
        ),
        (
            "zero handshake timeout",
            config_text(
                &data_dir,
                port,
                "",
                "[limits]\ntls_handshake_timeout = \"0s\"\n",
            ),
            "limits.tls_handshake_timeout",
        ),
        (
            "grace too long",
            config_text(&data_dir, port, "", "[shutdown]\ngrace = \"1h\"\n"),
            "shutdown.grace",
        ),
        (
            "bad address",
            config_text(&data_dir, port, "", "").replace(&format!("127.0.0.1:{port}"), "nowhere"),
            "mqtts",
        ),
        (
            "bad gateway id",
            config_text(&data_dir, port, "", "").replace("gw-cfg", "gw/cfg"),
            "gateway.id",
        ),
        (
            "bad ACL pattern",
            config_text(&data_dir, port, "", "[acl]\ndevice_publish = [\"a/#/b\"]\n"),
            "acl.device_publish",
        ),
        (
            "missing extra CA file",
            config_text(
                &data_dir,
                port,
                "",
                "[tls]\nextra_client_cas = [\"/nonexistent/cloud-ca.pem\"]\n",
            ),
            "tls.extra_client_cas",
        ),
        (
            "unparseable TOML",
            config_text(&data_dir, port, "", "[limits\nmax_connections = \n"),
            "line",
        ),
        // Issue 10 part 6: type errors name the dotted field, not only line and column.
        (
            "wrong type",
            config_text(
                &data_dir,
                port,
                "",
                "[limits]\nmax_connections = \"many\"\n",
            ),
            "field `limits.max_connections`",
        ),
        (
            "not a duration",
            config_text(
                &data_dir,
                port,
                "",
                "[uplink.detection]\nheartbeat_timeout = \"soon\"\n",
            ),
            "field `uplink.detection.heartbeat_timeout`",
        ),
    ];
    for (what, text, field) in cases {
        std::fs::write(&path, text).unwrap();
        for args in [&["run"][..], &["ca", "list"][..]] {
            let out = run_to_exit(args, &path);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(64),
                "{what} ({args:?}): exit {:?}, stderr: {stderr}",
                out.status
            );
            assert!(
                stderr.contains(field),
                "{what} ({args:?}): stderr does not name {field:?}: {stderr}"
            );
            assert!(
                !stderr.contains("listening"),
                "{what}: a listener was bound: {stderr}"
            );
            assert!(
                !data_dir.exists(),
                "{what} ({args:?}): data dir created before the config was refused"
            );
            assert!(port_is_free(port), "{what}: mqtts port {port} was bound");
        }
    }

    // A missing file names the path.
    let missing = dir.path().join("no-such.toml");
    let out = run_to_exit(&["run"], &missing);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "missing file: {stderr}");
    assert!(
        stderr.contains("no-such.toml"),
        "missing file not named: {stderr}"
    );
    assert!(!data_dir.exists());
}

// ---------------------------------------------------------------------------------------------
// Defaults

#[test]
fn printed_default_config_parses_back_to_the_defaults() {
    let out = Command::new(BIN)
        .arg("print-default-config")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    // Durations as the example configuration writes them (issue 10 part 6), not humantime's
    // "19years 11months 25days 9h 50m 24s".
    for line in [
        "ca_validity = \"7300d\"",
        "device_validity = \"365d\"",
        "grace = \"5s\"",
        "backoff_min = \"250ms\"",
    ] {
        assert!(text.contains(line), "{line} not in:\n{text}");
    }
    assert!(
        !text.contains("years") && !text.contains("months"),
        "{text}"
    );
    let parsed = Config::from_toml(&text)
        .unwrap_or_else(|e| panic!("printed default config does not parse: {e}\n{text}"));
    assert_eq!(parsed, Config::default());

    // The binary accepts the printed file too (`ca list` loads config exactly as `run` does,
    // without binding the default ports).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("default.toml");
    std::fs::write(&path, &text).unwrap();
    let data = dir.path().join("data");
    let out = Command::new(BIN)
        .args(["ca", "list", "--json", "--config"])
        .arg(&path)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "printed config refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
}

fn spawn_outpost(args: &[&str], extra: &[&Path], log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(BIN)
        .args(args)
        .args(extra)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn outpost")
}

fn wait_ready(child: &mut Child, data_dir: &Path, log: &Path) -> Endpoints {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(ep) = Endpoints::read(data_dir) {
            if ep.pid == child.id() {
                return ep;
            }
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!(
                "outpost exited with {st}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "not ready in 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop(child: &mut Child) {
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert_eq!(st.code(), Some(0));
            return;
        }
        assert!(Instant::now() < deadline, "no exit 15 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

fn validity_days(der: &[u8]) -> i64 {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp()) / 86_400
}

/// A fresh data dir after a first start with default settings.
fn check_first_start(data: &Path, ep: &Endpoints) {
    assert_eq!(mode(data), 0o700, "data dir mode");
    assert_eq!(mode(&data.join("ca.key")), 0o600, "ca.key mode");
    assert_eq!(mode(&data.join("server.key")), 0o600, "server.key mode");
    for f in ["ca.crt", "server.crt", "crl.pem", "store"] {
        assert!(data.join(f).exists(), "{f} not created");
    }
    assert_eq!(ep.gateway_id, Config::default().gateway_id());
    assert!(ep.plain.is_some() && ep.metrics.is_some());
    // Validity periods are the defaults (20 years CA, 2 years server; 5 min backdating).
    let ca_days = validity_days(&pem_der(&data.join("ca.crt")));
    assert!((7300..=7301).contains(&ca_days), "CA valid {ca_days} days");
    let srv_days = validity_days(&pem_der(&data.join("server.crt")));
    assert!(
        (730..=731).contains(&srv_days),
        "server cert valid {srv_days} days"
    );
}

#[test]
fn first_start_with_defaults_creates_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("state");
    let cfg = dir.path().join("ports.toml");
    // Only the ports differ from the defaults.
    std::fs::write(
        &cfg,
        "[listeners]\nmqtts = \"127.0.0.1:0\"\nplain = \"127.0.0.1:0\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n[fdo]\nlisten = \"127.0.0.1:0\"\n\n[web]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let log = dir.path().join("log");
    let mut child = spawn_outpost(
        &["run", "--config"],
        &[&cfg, Path::new("--data-dir"), &data],
        &log,
    );
    let ep = wait_ready(&mut child, &data, &log);
    check_first_start(&data, &ep);

    // Devices get the default one-year certificates.
    let out_dir = dir.path().join("dev");
    let out = Command::new(BIN)
        .args(["ca", "issue-device", "--id", "dev-d", "--out"])
        .arg(&out_dir)
        .arg("--config")
        .arg(&cfg)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let days = validity_days(&pem_der(&out_dir.join("dev-d.crt")));
    assert!((365..=366).contains(&days), "device cert valid {days} days");
    assert_eq!(mode(&out_dir.join("dev-d.key")), 0o600);
    stop(&mut child);

    // The CA is reused, not recreated, on the next start.
    let ca = std::fs::read(data.join("ca.key")).unwrap();
    let mut child = spawn_outpost(
        &["run", "--config"],
        &[&cfg, Path::new("--data-dir"), &data],
        &log,
    );
    wait_ready(&mut child, &data, &log);
    assert_eq!(std::fs::read(data.join("ca.key")).unwrap(), ca);
    stop(&mut child);
}

/// Issue 10 part 6: a clean start says nothing at WARN or ERROR (rumqttd logged "router-drop"
/// for the gateway's own start-up probe of its routing core, depending on timing: three fresh
/// starts), and the "listening" lines come under the `outpost` target, not `outpost::metrics`.
#[test]
fn a_clean_start_logs_no_warning_and_names_its_listeners_under_outpost() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("ports.toml");
    std::fs::write(
        &cfg,
        "[listeners]\nmqtts = \"127.0.0.1:0\"\nplain = \"127.0.0.1:0\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n[fdo]\nlisten = \"127.0.0.1:0\"\n\n[mdns]\nenabled = false\n\n[web]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    for round in 0..3 {
        let data = dir.path().join(format!("state-{round}"));
        let log = dir.path().join(format!("log-{round}"));
        let mut child = spawn_outpost(
            &["run", "--config"],
            &[&cfg, Path::new("--data-dir"), &data],
            &log,
        );
        wait_ready(&mut child, &data, &log);
        std::thread::sleep(Duration::from_millis(300));
        stop(&mut child);
        let text = strip_ansi(&std::fs::read_to_string(&log).unwrap());
        let loud: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        assert!(loud.is_empty(), "start {round}: {loud:#?}\n{text}");
        let listening: Vec<&str> = text.lines().filter(|l| l.contains(" listening ")).collect();
        // mqtts, fdo, plain, metrics and the admin page.
        assert_eq!(listening.len(), 5, "{text}");
        for l in listening {
            assert!(l.contains(" outpost: listening"), "{l}");
        }
    }
}

#[test]
fn run_without_any_config_uses_default_ports() {
    let wanted: [SocketAddr; 4] = [
        "0.0.0.0:8883".parse().unwrap(),
        "127.0.0.1:1883".parse().unwrap(),
        "127.0.0.1:9883".parse().unwrap(),
        "0.0.0.0:8041".parse().unwrap(),
    ];
    let busy: Vec<SocketAddr> = wanted
        .iter()
        .copied()
        .filter(|a| std::net::TcpListener::bind(a).is_err())
        .collect();
    if !busy.is_empty() {
        println!("SKIPPED run_without_any_config_uses_default_ports: default ports busy: {busy:?}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data: PathBuf = dir.path().join("state");
    let log = dir.path().join("log");
    let mut child = spawn_outpost(&["run", "--data-dir"], &[&data], &log);
    let deadline = Instant::now() + Duration::from_secs(30);
    let ep = loop {
        if let Some(ep) = Endpoints::read(&data).filter(|ep| ep.pid == child.id()) {
            break ep;
        }
        if let Some(st) = child.try_wait().unwrap() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("cannot bind") {
                // Someone took a default port between our check and the start.
                println!("SKIPPED run_without_any_config_uses_default_ports: {text}");
                return;
            }
            panic!("outpost exited with {st}: {text}");
        }
        assert!(Instant::now() < deadline, "not ready in 30 s");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(ep.mqtts, wanted[0]);
    assert_eq!(ep.plain, Some(wanted[1]));
    assert_eq!(ep.metrics, Some(wanted[2]));
    assert_eq!(ep.fdo, Some(wanted[3]));
    check_first_start(&data, &ep);
    stop(&mut child);
}

// ---------------------------------------------------------------------------------------------
// mDNS

#[test]
fn mdns_advertises_the_device_listener_and_withdraws_it() {
    use mdns_sd::{ServiceDaemon, ServiceEvent};
    let id = format!("gw-mdns-{}", std::process::id());
    let mut gw = Gateway::start_custom(|data| {
        base_config(data, "")
            .replace("id = \"gw-test\"", &format!("id = \"{id}\""))
            .replace("[mdns]\nenabled = false", "[mdns]\nenabled = true")
    });
    assert_eq!(gw.ep.gateway_id, id);
    let ca_fp = sha256_hex(&pem_der(&gw.data_dir.join("ca.crt")));
    let fullname = format!("{id}.{}", outpost::mdns::SERVICE_TYPE);

    let browser = ServiceDaemon::new().expect("mDNS daemon in the test");
    let events = browser.browse(outpost::mdns::SERVICE_TYPE).expect("browse");
    let deadline = Instant::now() + Duration::from_secs(10);
    let resolved = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(ServiceEvent::ServiceResolved(s)) if s.fullname == fullname => break s,
            Ok(_) => {}
            Err(_) => panic!(
                "{fullname} not resolved within 10 s: no multicast DNS answer from the gateway \
                 (multicast between processes on this host does not work?)\n{}",
                gw.log()
            ),
        }
    };
    assert_eq!(resolved.port, gw.mqtts().port(), "advertised port");
    assert_eq!(
        resolved.txt_properties.get_property_val_str("gw"),
        Some(id.as_str())
    );
    assert_eq!(
        resolved.txt_properties.get_property_val_str("ca_sha256"),
        Some(ca_fp.as_str())
    );
    assert!(!resolved.addresses.is_empty(), "no address advertised");

    // The FDO listener, under the host name devices are made with (outpost.local).
    let fdo_events = browser
        .browse(outpost::mdns::FDO_SERVICE_TYPE)
        .expect("browse fdo");
    let fdo_name = format!("{id}.{}", outpost::mdns::FDO_SERVICE_TYPE);
    let fdo = loop {
        let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(5);
        match fdo_events.recv_timeout(left) {
            Ok(ServiceEvent::ServiceResolved(s)) if s.fullname == fdo_name => break s,
            Ok(_) => {}
            Err(_) => panic!("{fdo_name} not resolved:\n{}", gw.log()),
        }
    };
    assert_eq!(Some(fdo.port), gw.ep.fdo.map(|a| a.port()), "FDO port");
    assert_eq!(fdo.host, "outpost.local.");
    assert!(!fdo.addresses.is_empty(), "no address for outpost.local");

    gw.signal("TERM");
    let st = gw
        .wait(Duration::from_secs(15))
        .expect("exit after SIGTERM");
    assert_eq!(st.code(), Some(0));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(ServiceEvent::ServiceRemoved(_, name)) if name == fullname => break,
            Ok(_) => {}
            Err(_) => panic!(
                "no ServiceRemoved for {fullname} within 5 s of exit:\n{}",
                gw.log()
            ),
        }
    }
    let _ = browser.shutdown();
}
