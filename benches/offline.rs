//! `cargo bench --bench offline`: issue 5, acceptance point 6, on this machine, all on
//! 127.0.0.1, with the anchors printed side by side in the same run.
//!
//! * **Restore → registry consistency** (`BENCH_REGISTRATIONS` devices). A gateway (the
//!   release binary) with its uplink → the tests' fault proxy → Mosquitto (TLS, client
//!   certificates), and `outpost cloud` syncing through the same Mosquitto (directly). The
//!   link is blackholed; N devices (made in-process, vouchers imported into the gateway's
//!   store before it starts) onboard on the gateway at once (in-process FDO clients, with
//!   `outpost:mqtt`: each gets its certificate). Then the link is restored and the bench
//!   measures restore → uplink Online, → first / last registration message at the cloud
//!   broker (a subscriber of our own on `outpost/#`, straight on Mosquitto), → first / last
//!   registration applied by `outpost cloud` (its `sync: registration recorded` log lines,
//!   tailed every 25 ms), → all N in `outpost registry --json` of the cloud (polled every
//!   `BENCH_POLL_MS`). Duplicates: at the broker (messages − distinct GUIDs) and in the cloud
//!   registry (which must hold exactly N).
//!   Anchor (same run, after): the same number of plain QoS 1 telemetry messages of the same
//!   mean size, queued while offline through the plain listener, drained on restore to the
//!   same subscriber: what the transport alone costs.
//! * **Reconnect storm** (`BENCH_STORM` TLS MQTT device clients, rumqttc, certificates signed
//!   in-process by the gateway CA's key, CN = device id). They connect through a fault proxy
//!   in front of the broker's TLS port; the proxy is set to Reset (every connection is RST
//!   on both sides, and new ones too) for `BENCH_OUTAGE_MS`, then to Pass. The clients
//!   reconnect with the agent's policy (`jitter`: full jitter, 250 ms · 2^n capped at 30 s,
//!   reset after a connection, as `src/device.rs`) or `nojitter` (at once after the loss,
//!   then 250 ms · 2^n exactly). Measured from the restore: time until all have a CONNACK,
//!   p50/p99 per device, broker peak CPU and RSS (sampled every 100 ms), connection errors.
//!   Anchor (same run, same clients and CA): Mosquitto with TLS and `require_certificate`.
//! * **Memory** (`memory`, not run by default; issue 10). The same rig and clients: RSS of
//!   the idle broker, with `BENCH_STORM` idle TLS devices connected, after each of
//!   `BENCH_STORMS` reconnect storms in a row (`BENCH_MEMORY_POLICY`, read `BENCH_SETTLE_MS`
//!   after all are back), and once all clients are gone. A leak keeps growing from storm to
//!   storm; allocator retention plateaus. Anchor: Mosquitto, the same clients, after Outpost.
//!
//! Environment: BENCH_REGISTRATIONS (1000), BENCH_STORM (1000), BENCH_PHASES
//! (`restore,storm`; `memory` on request), BENCH_VARIANTS (`jitter,nojitter`),
//! BENCH_OUTAGE_MS (1000), BENCH_POLL_MS (500), BENCH_ANCHOR_RUNS (2), BENCH_CLI_SAMPLE (20:
//! vouchers imported with `outpost voucher import`, one call each, to time that path),
//! BENCH_TIMEOUT_S (300), BENCH_STORMS (10), BENCH_SETTLE_MS (3000), BENCH_MEMORY_POLICY
//! (`nojitter`).
//! The soft RLIMIT_NOFILE is raised to the hard limit (inherited by the brokers).
//!
//! Does nothing unless run by `cargo bench` (`--bench`), and nothing for `--list`.

#[path = "../tests/cloud/mod.rs"]
mod cloud;
#[path = "../tests/common/mod.rs"]
mod common;

mod support;

use cloud::{CloudPki, Fault, Proxy};
use common::roles::Cloud as CloudService;
use common::Gateway;
use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{
    cmd_out, env_or, loadavg, machine, machine_ticks, pid_with_cmdline, print_title, proc_ticks,
    raise_nofile, run_by_cargo_bench, TICKS_PER_S,
};

// ------------------------------------------------------------------------------------------
// Parameters and machine facts

#[derive(Debug, Clone)]
struct Params {
    registrations: usize,
    storm: usize,
    phases: String,
    variants: String,
    outage: Duration,
    poll: Duration,
    anchor_runs: usize,
    cli_sample: usize,
    timeout: Duration,
    storms: usize,
    settle: Duration,
    memory_policy: String,
}

impl Params {
    fn from_env() -> Params {
        Params {
            registrations: env_or("BENCH_REGISTRATIONS", 1000usize).max(1),
            storm: env_or("BENCH_STORM", 1000usize).max(1),
            phases: env_or("BENCH_PHASES", "restore,storm".to_string()),
            variants: env_or("BENCH_VARIANTS", "jitter,nojitter".to_string()),
            outage: Duration::from_millis(env_or("BENCH_OUTAGE_MS", 1000u64)),
            poll: Duration::from_millis(env_or("BENCH_POLL_MS", 500u64).max(50)),
            anchor_runs: env_or("BENCH_ANCHOR_RUNS", 2usize),
            cli_sample: env_or("BENCH_CLI_SAMPLE", 20usize),
            timeout: Duration::from_secs(env_or("BENCH_TIMEOUT_S", 300u64)),
            storms: env_or("BENCH_STORMS", 10usize).max(1),
            settle: Duration::from_millis(env_or("BENCH_SETTLE_MS", 3000u64)),
            memory_policy: env_or("BENCH_MEMORY_POLICY", "nojitter".to_string()),
        }
    }
    fn phase(&self, name: &str) -> bool {
        self.phases.split(',').any(|p| p.trim() == name)
    }
}

/// A `/proc/PID/status` field in kB (VmRSS, VmHWM).
fn proc_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU use of named processes, this process, the rest of the machine, and steal, between
/// two snapshots.
struct CpuWatch {
    at: Instant,
    pids: Vec<(&'static str, u32, u64)>,
    me: u64,
    busy: u64,
    steal: u64,
}

impl CpuWatch {
    fn start(pids: &[(&'static str, u32)]) -> CpuWatch {
        let (busy, steal) = machine_ticks();
        CpuWatch {
            at: Instant::now(),
            pids: pids.iter().map(|(n, p)| (*n, *p, proc_ticks(*p))).collect(),
            me: proc_ticks(std::process::id()),
            busy,
            steal,
        }
    }
    fn line(&self) -> String {
        let secs = self.at.elapsed().as_secs_f64().max(1e-3);
        let pc = |a: u64, b: u64| b.saturating_sub(a) as f64 / TICKS_PER_S / secs * 100.0;
        let mut parts = Vec::new();
        let mut ours = 0.0;
        for (n, p, t) in &self.pids {
            let v = pc(*t, proc_ticks(*p));
            ours += v;
            parts.push(format!("{n} {v:.0}%"));
        }
        let me = pc(self.me, proc_ticks(std::process::id()));
        let (busy, steal) = machine_ticks();
        let busy = pc(self.busy, busy);
        parts.push(format!("bench process {me:.0}%"));
        parts.push(format!(
            "other processes {:.0}%",
            (busy - ours - me).max(0.0)
        ));
        parts.push(format!("steal {:.0}%", pc(self.steal, steal)));
        format!(
            "CPU over {secs:.1} s (100% = one core): {}",
            parts.join(", ")
        )
    }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

fn ms(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.0}", d.as_secs_f64() * 1000.0))
        .unwrap_or_else(|| "-".into())
}

fn runtime(threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("runtime")
}

// ------------------------------------------------------------------------------------------
// Phase 1: restore -> registry consistency

/// What our own subscriber on the cloud broker saw.
#[derive(Default)]
struct Seen {
    /// (arrival, topic, payload bytes, GUID of a registration)
    msgs: Vec<(Instant, String, usize, Option<String>)>,
}

fn start_collector(
    rt: &tokio::runtime::Runtime,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
) -> Arc<Mutex<Seen>> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut o = rumqttc::MqttOptions::new("bench-collector", "127.0.0.1", port);
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls),
    ));
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(true);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = rumqttc::AsyncClient::new(o, 100);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let s = seen.clone();
    rt.spawn(async move {
        let mut ready = Some(ready_tx);
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    let _ = client
                        .subscribe("outpost/#", rumqttc::QoS::AtLeastOnce)
                        .await;
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                    if let Some(t) = ready.take() {
                        let _ = t.send(());
                    }
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    let now = Instant::now();
                    let guid = if p.topic.ends_with("/sync/up") {
                        serde_json::from_slice::<serde_json::Value>(&p.payload)
                            .ok()
                            .and_then(|v| v["entry"]["guid"].as_str().map(str::to_string))
                    } else {
                        None
                    };
                    s.lock()
                        .unwrap()
                        .msgs
                        .push((now, p.topic.clone(), p.payload.len(), guid));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("collector subscribed");
    seen
}

fn registry_json(config: &Path) -> Option<Vec<serde_json::Value>> {
    let out = std::process::Command::new(common::BIN)
        .args(["registry", "--json", "--config"])
        .arg(config)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Counts lines containing `needle` appended to a log file since the last call.
struct LogTail {
    path: PathBuf,
    pos: u64,
    partial: String,
    count: usize,
}

impl LogTail {
    fn new(path: PathBuf) -> LogTail {
        let pos = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        LogTail {
            path,
            pos,
            partial: String::new(),
            count: 0,
        }
    }
    fn poll(&mut self, needle: &str) -> usize {
        if let Ok(mut f) = std::fs::File::open(&self.path) {
            if f.seek(std::io::SeekFrom::Start(self.pos)).is_ok() {
                let mut buf = Vec::new();
                if let Ok(n) = f.read_to_end(&mut buf) {
                    self.pos += n as u64;
                    self.partial.push_str(&String::from_utf8_lossy(&buf));
                    while let Some(i) = self.partial.find('\n') {
                        if self.partial[..i].contains(needle) {
                            self.count += 1;
                        }
                        self.partial.drain(..=i);
                    }
                }
            }
        }
        self.count
    }
}

struct Site {
    _tmp: tempfile::TempDir,
    pki: CloudPki,
    _broker: cloud::Cloud,
    mosq_pid: u32,
    proxy: Proxy,
    cloud: CloudService,
    gw: Gateway,
}

impl Site {
    fn online(&self) -> bool {
        self.gw.metric("outpost_uplink_online") == 1
    }
    fn wait_online(&self, on: bool, limit: Duration) {
        let t0 = Instant::now();
        while self.online() != on {
            assert!(
                t0.elapsed() < limit,
                "uplink not {on} in {limit:?}:\n{}",
                self.gw.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    fn pids(&self) -> Vec<(&'static str, u32)> {
        vec![
            ("outpost gateway", self.gw.child.as_ref().unwrap().id()),
            ("outpost cloud", self.cloud.child.as_ref().unwrap().id()),
            ("mosquitto", self.mosq_pid),
        ]
    }
}

fn restore_phase(p: &Params) {
    use outpost::fdo_wire::crypto::{self, Curve};
    use outpost::fdo_wire::manufacturer::{DeviceOptions as MfgOptions, Manufacturer};
    use outpost::fdo_wire::types::{RendezvousInfo, RvDirective, RvProtocol};
    use outpost::fdo_wire::PublicKey;
    let n = p.registrations;
    println!();
    println!("== Restore -> registry consistency, {n} offline registrations ==");
    common::require_mosquitto();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut pki = CloudPki::new(&tmp.path().join("pki"));
    let (gw_cert, gw_key) = pki.issue("gw-test", false);
    let (cl_cert, cl_key) = pki.issue("cloud-test", false);
    let (col_cert, col_key) = pki.issue("bench-collector", false);
    let broker = cloud::Cloud::start(&pki);
    let mosq_pid =
        pid_with_cmdline(&pki.dir.join("mosquitto.conf").display().to_string()).unwrap_or(0);
    let proxy = Proxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], broker.port)));

    // The gateway: a fixed FDO port (the devices' rendezvous info names it), prepared but not
    // started, so that the vouchers go straight into its store.
    let fdo_port = common::free_port();
    let up = common::roles::uplink_section(proxy.addr.port(), &pki.ca, &gw_cert, &gw_key);
    let mut gw = Gateway::prepare_custom(|data| {
        common::base_config(data, &up).replace(
            "[fdo]\nlisten = \"127.0.0.1:0\"",
            &format!("[fdo]\nlisten = \"127.0.0.1:{fdo_port}\""),
        )
    });
    // The cloud service (its devices' MQTT server list is not used here).
    let mut cloud_svc = CloudService::prepare(&format!(
        "mqtt_servers = [\"mqtts://127.0.0.1:{}\"]\nserver_trust = [\"{}\"]\n\n{}\n[sync]\ngateways = [\"gw-test\"]\n",
        fdo_port,
        gw.data_dir.join("ca.crt").display(),
        common::roles::uplink_section(broker.port, &pki.ca, &cl_cert, &cl_key)
    ));
    cloud_svc.start();
    let t_make = Instant::now();
    // `voucher owner-cert` on the stopped gateway makes its owner key.
    let owner_pem =
        String::from_utf8_lossy(&gw.cli(&["voucher", "owner-cert"]).stdout).into_owned();
    let (next_key, cert) = crypto::public_key_from_pem(&owner_pem).expect("owner cert");
    let mfg = Manufacturer::open_or_create(&tmp.path().join("mfg"), Curve::P256).expect("mfg");
    let rv = RendezvousInfo(vec![RvDirective::default()
        .with_ip(std::net::IpAddr::from([127, 0, 0, 1]))
        .with_dev_port(fdo_port)
        .with_protocol(RvProtocol::Http)
        .with_delay_secs(1)]);
    let mut creds = Vec::new();
    let mut pems = Vec::new();
    for i in 0..n {
        let (cred, v) = mfg
            .init_device(&MfgOptions {
                device_info: format!("offline-{i}"),
                rv_info: rv.clone(),
                curve: Curve::P256,
            })
            .expect("init device");
        let next = PublicKey::encoded_like(&v.header().mfg_pub_key, &next_key, cert.as_deref());
        let v = v.extend(mfg.key(), &next).expect("extend");
        pems.push(v.to_pem());
        creds.push(cred);
    }
    let made = t_make.elapsed();
    let sample = p.cli_sample.min(n);
    let t_imp = Instant::now();
    {
        let store = outpost::store::Store::open(&gw.data_dir.join("store")).expect("store");
        for pem in &pems[sample..] {
            outpost::fdo::owner::import_voucher(&store, &gw.data_dir, pem.as_bytes())
                .expect("import");
        }
        store.flush().expect("flush");
    }
    let imported = t_imp.elapsed();
    gw.spawn();
    let t_cli = Instant::now();
    for (i, pem) in pems[..sample].iter().enumerate() {
        let f = tmp.path().join(format!("v-{i}.pem"));
        std::fs::write(&f, pem).unwrap();
        let out = gw.cli(&["voucher", "import", f.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let cli = t_cli.elapsed();
    println!(
        "set-up: {n} devices made and vouchers extended in {:.1} s; {} vouchers imported in-process into the stopped gateway's store in {:.2} s ({:.2} ms each); {sample} with `outpost voucher import` (one process each, running gateway, admin socket) in {:.2} s ({:.0} ms each, so {:.0} s for all {n})",
        made.as_secs_f64(),
        n - sample,
        imported.as_secs_f64(),
        imported.as_secs_f64() * 1000.0 / (n - sample).max(1) as f64,
        cli.as_secs_f64(),
        cli.as_secs_f64() * 1000.0 / sample.max(1) as f64,
        cli.as_secs_f64() / sample.max(1) as f64 * n as f64
    );

    let site = Site {
        _tmp: tmp,
        pki,
        _broker: broker,
        mosq_pid,
        proxy,
        cloud: cloud_svc,
        gw,
    };
    site.wait_online(true, Duration::from_secs(30));
    let rt = runtime(2);
    let seen = start_collector(
        &rt,
        site._broker.port,
        cloud::tls_client_config(&site.pki.ca, &col_cert, &col_key),
    );

    // Cut off; onboard everything at the gateway.
    site.proxy.set(Fault::Blackhole);
    site.wait_online(false, Duration::from_secs(30));
    let t_on = Instant::now();
    let ids: Vec<String> = rt.block_on(common::roles::onboard_all(creds, true));
    println!(
        "offline onboarding: {n} devices (TO1 + TO2 with outpost:mqtt) at once in {:.1} s ({:.0}/s)",
        t_on.elapsed().as_secs_f64(),
        n as f64 / t_on.elapsed().as_secs_f64()
    );
    let gw_reg = registry_json(&site.gw.config_path).expect("gateway registry");
    assert_eq!(gw_reg.len(), n, "gateway registry");
    // The sync message of a registration is {"kind":"registration","entry":ENTRY}.
    let msg_size = gw_reg
        .iter()
        .map(|e| {
            serde_json::json!({"kind": "registration", "entry": e})
                .to_string()
                .len()
        })
        .sum::<usize>()
        / n;
    // Wait until the sync has queued them all.
    let t_q = Instant::now();
    while site.gw.metric("outpost_uplink_queue_depth") < n as i64 {
        assert!(t_q.elapsed() < p.timeout, "registrations not queued");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let depth = site.gw.metric("outpost_uplink_queue_depth");
    let cloud_before = registry_json(&site.cloud.config_path)
        .map(|r| r.len())
        .unwrap_or(0);
    println!(
        "queued for the cloud: depth {depth} (about {msg_size} B per registration message); cloud registry before restore: {cloud_before}; load avg {}",
        loadavg()
    );

    // Restore and measure.
    let mut tail = LogTail::new(site.cloud.dir.path().join("cloud.log"));
    let base_msgs = seen.lock().unwrap().msgs.len();
    let cpu = CpuWatch::start(&site.pids());
    let t0 = Instant::now();
    site.proxy.set(Fault::Pass);
    let (mut online, mut first_apply, mut all_apply, mut all_reg, mut drained) =
        (None, None, None, None, None);
    let mut last_poll = Instant::now() - p.poll;
    let mut polls = 0;
    while all_reg.is_none() || all_apply.is_none() || online.is_none() {
        if t0.elapsed() > p.timeout {
            let at_broker = seen.lock().unwrap().msgs[base_msgs..]
                .iter()
                .filter(|m| m.3.is_some())
                .count();
            panic!(
                "not consistent after {:?}: {at_broker} registration messages at the broker, gateway queue depth {}, {} applied by the cloud\n{}",
                p.timeout,
                site.gw.metric("outpost_uplink_queue_depth"),
                tail.count,
                site.cloud.log()
            );
        }
        let now = t0.elapsed();
        if online.is_none() && site.online() {
            online = Some(now);
        }
        if drained.is_none() && site.gw.metric("outpost_uplink_queue_depth") == 0 {
            drained = Some(now);
        }
        let c = tail.poll("registration recorded");
        if c > 0 && first_apply.is_none() {
            first_apply = Some(now);
        }
        if c >= n && all_apply.is_none() {
            all_apply = Some(now);
        }
        if all_reg.is_none() && last_poll.elapsed() >= p.poll {
            last_poll = Instant::now();
            polls += 1;
            if registry_json(&site.cloud.config_path).map(|r| r.len()) >= Some(n) {
                all_reg = Some(t0.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let cpu_line = cpu.line();
    std::thread::sleep(Duration::from_secs(2));
    let final_reg = registry_json(&site.cloud.config_path).expect("cloud registry");
    let guids: HashSet<&str> = final_reg
        .iter()
        .filter_map(|e| e["guid"].as_str())
        .collect();
    let missing = ids.iter().filter(|i| !guids.contains(i.as_str())).count();
    let (reg_first, reg_last, reg_msgs, reg_unique, reg_bytes) = {
        let s = seen.lock().unwrap();
        let regs: Vec<_> = s.msgs[base_msgs..]
            .iter()
            .filter(|m| m.3.is_some())
            .collect();
        let uniq: HashSet<&str> = regs.iter().filter_map(|m| m.3.as_deref()).collect();
        (
            regs.first().map(|m| m.0 - t0),
            regs.last().map(|m| m.0 - t0),
            regs.len(),
            uniq.len(),
            regs.iter().map(|m| m.2).sum::<usize>() / regs.len().max(1),
        )
    };
    let all_apply_s = all_apply.unwrap().as_secs_f64();
    let mut rows = vec![(
        format!("{n} registrations (sync/up, applied by outpost cloud)"),
        online,
        reg_first,
        reg_last,
        first_apply,
        all_apply,
        all_reg,
        drained,
        format!(
            "{:.0}/s applied (restore -> all applied); {:.0}/s at the broker (first -> last)",
            n as f64 / all_apply_s,
            reg_unique.saturating_sub(1) as f64
                / (reg_last.unwrap_or_default() - reg_first.unwrap_or_default())
                    .as_secs_f64()
                    .max(1e-3)
        ),
    )];
    let dup_line = format!(
        "registration messages at the broker: {reg_bytes} B on average. Duplicates: broker saw {reg_msgs} registration messages for {reg_unique} GUIDs ({} duplicate deliveries); cloud registry holds {} entries, {} distinct GUIDs, {missing} of ours missing (must be exactly {n}); {polls} registry polls",
        reg_msgs - reg_unique,
        final_reg.len(),
        guids.len()
    );
    println!("{cpu_line}");

    // Anchor: the same number of plain telemetry messages of the same size.
    let plain = site.gw.plain();
    for run in 0..p.anchor_runs {
        site.proxy.set(Fault::Blackhole);
        site.wait_online(false, Duration::from_secs(30));
        let id = format!("anchor-{run}");
        let topic = format!("devices/{id}/telemetry/bench");
        let t_load = Instant::now();
        rt.block_on(load_plain(plain, &id, &topic, n, msg_size));
        let loaded = t_load.elapsed();
        let t_q = Instant::now();
        while site.gw.metric("outpost_uplink_queue_depth") < n as i64 {
            assert!(t_q.elapsed() < p.timeout, "anchor not queued");
            std::thread::sleep(Duration::from_millis(20));
        }
        let remote = format!("outpost/gw-test/{topic}");
        let base = seen.lock().unwrap().msgs.len();
        let cpu = CpuWatch::start(&site.pids());
        let t0 = Instant::now();
        site.proxy.set(Fault::Pass);
        let (mut online, mut drained, mut all) = (None, None, None);
        while all.is_none() || drained.is_none() || online.is_none() {
            assert!(t0.elapsed() < p.timeout, "anchor drain timed out");
            let now = t0.elapsed();
            if online.is_none() && site.online() {
                online = Some(now);
            }
            if drained.is_none() && site.gw.metric("outpost_uplink_queue_depth") == 0 {
                drained = Some(now);
            }
            if all.is_none() {
                let s = seen.lock().unwrap();
                let got = s.msgs[base..].iter().filter(|m| m.1 == remote).count();
                if got >= n {
                    all = Some(now);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let (first, last, count) = {
            let s = seen.lock().unwrap();
            let m: Vec<_> = s.msgs[base..].iter().filter(|m| m.1 == remote).collect();
            (
                m.first().map(|m| m.0 - t0),
                m.last().map(|m| m.0 - t0),
                m.len(),
            )
        };
        println!(
            "anchor run {}: {n} telemetry messages of {msg_size} B loaded through the plain listener in {:.2} s; {}",
            run + 1,
            loaded.as_secs_f64(),
            cpu.line()
        );
        rows.push((
            format!(
                "anchor {}: {n} QoS 1 telemetry messages of {msg_size} B",
                run + 1
            ),
            online,
            first,
            last,
            None,
            None,
            None,
            drained,
            format!(
                "{:.0}/s (restore -> last at the broker); {count} received",
                n as f64 / last.unwrap_or_default().as_secs_f64().max(1e-3)
            ),
        ));
    }
    println!();
    println!("times from the restore (proxy Pass), ms:");
    println!("| what | Online | first at broker | last at broker | first applied | all applied (log) | all in `registry --json` | gateway queue empty | rate |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.0,
            ms(r.1),
            ms(r.2),
            ms(r.3),
            ms(r.4),
            ms(r.5),
            ms(r.6),
            ms(r.7),
            r.8
        );
    }
    println!("{dup_line}");
    println!(
        "(`registry --json` was polled every {} ms: that column is up to one interval late; the log column is polled every 25 ms)",
        p.poll.as_millis()
    );
}

/// Publish `n` QoS 1 messages of `size` bytes through the plain listener, all acknowledged.
async fn load_plain(addr: std::net::SocketAddr, id: &str, topic: &str, n: usize, size: usize) {
    let mut o = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(100);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = rumqttc::AsyncClient::new(o, 200);
    let t = topic.to_string();
    tokio::spawn(async move {
        for i in 0..n {
            let mut payload = format!("{i:08}").into_bytes();
            payload.resize(size.max(8), b'x');
            if client
                .publish(t.clone(), rumqttc::QoS::AtLeastOnce, false, payload)
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut acked = 0;
    while acked < n {
        match el.poll().await {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => acked += 1,
            Ok(_) => {}
            Err(e) => panic!("anchor loader: {e}"),
        }
    }
}

// ------------------------------------------------------------------------------------------
// Phase 2: reconnect storm

#[derive(Clone, Copy, PartialEq, Debug)]
enum Policy {
    /// The agent's: after a loss, and after each failure, wait U[0, 250 ms · 2^n] (cap 30 s).
    Jitter,
    /// At once after a loss, then exactly 250 ms · 2^n.
    NoJitter,
}

#[derive(Default)]
struct DevState {
    connected: bool,
    /// First CONNACK after the loss.
    back: Option<Instant>,
}

struct Storm {
    devs: Vec<Mutex<DevState>>,
    connected: AtomicUsize,
    lost_at: Mutex<Option<Instant>>,
    restored_at: Mutex<Option<Instant>>,
    errors_outage: AtomicUsize,
    errors_after: Mutex<HashMap<String, usize>>,
    stop: AtomicBool,
}

fn cap(attempt: u32) -> Duration {
    Duration::from_millis(250)
        .saturating_mul(1u32 << attempt.min(16))
        .min(Duration::from_secs(30))
}

async fn storm_client(
    i: usize,
    port: u16,
    id: String,
    tls: Arc<rustls::ClientConfig>,
    policy: Policy,
    st: Arc<Storm>,
) {
    use rand::Rng;
    let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls),
    ));
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(true);
    let (_client, mut el) = rumqttc::AsyncClient::new(o, 10);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_connection_timeout(10);
    el.set_network_options(net);
    let mut attempt = 0u32;
    while !st.stop.load(Ordering::Relaxed) {
        match el.poll().await {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                let mut d = st.devs[i].lock().unwrap();
                d.connected = true;
                if st.lost_at.lock().unwrap().is_some() && d.back.is_none() {
                    d.back = Some(Instant::now());
                }
                st.connected.fetch_add(1, Ordering::SeqCst);
            }
            Ok(_) => {}
            Err(e) => {
                let was = {
                    let mut d = st.devs[i].lock().unwrap();
                    std::mem::replace(&mut d.connected, false)
                };
                if was {
                    st.connected.fetch_sub(1, Ordering::SeqCst);
                }
                if st.restored_at.lock().unwrap().is_some() {
                    let mut k = e.to_string();
                    k.truncate(70);
                    *st.errors_after.lock().unwrap().entry(k).or_default() += 1;
                } else if st.lost_at.lock().unwrap().is_some() && !was {
                    st.errors_outage.fetch_add(1, Ordering::Relaxed);
                }
                let wait = match policy {
                    Policy::Jitter => {
                        if was {
                            attempt = 0;
                        }
                        let c = cap(attempt);
                        attempt = attempt.saturating_add(1);
                        Duration::from_millis(
                            rand::thread_rng().gen_range(0..=c.as_millis().max(1) as u64),
                        )
                    }
                    Policy::NoJitter => {
                        if was {
                            attempt = 0;
                            Duration::ZERO
                        } else {
                            let c = cap(attempt);
                            attempt = attempt.saturating_add(1);
                            c
                        }
                    }
                };
                tokio::time::sleep(wait).await;
            }
        }
    }
}

struct Sample {
    cpu_peak: f64,
    rss_peak_kb: u64,
    cpu_s: f64,
}

/// Sample a process's CPU (per 100 ms) and RSS until `stop`.
fn sampler(pid: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Sample> {
    std::thread::spawn(move || {
        let t_start = proc_ticks(pid);
        let mut last = (Instant::now(), t_start);
        let mut s = Sample {
            cpu_peak: 0.0,
            rss_peak_kb: proc_kb(pid, "VmRSS"),
            cpu_s: 0.0,
        };
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
            let now = (Instant::now(), proc_ticks(pid));
            let secs = (now.0 - last.0).as_secs_f64();
            let pc = (now.1 - last.1) as f64 / TICKS_PER_S / secs * 100.0;
            s.cpu_peak = s.cpu_peak.max(pc);
            s.rss_peak_kb = s.rss_peak_kb.max(proc_kb(pid, "VmRSS"));
            last = now;
        }
        s.cpu_s = (last.1 - t_start) as f64 / TICKS_PER_S;
        s
    })
}

struct StormResult {
    broker: String,
    variant: Policy,
    all: Option<Duration>,
    back: Vec<Duration>,
    n: usize,
    sample: Sample,
    rss_before_kb: u64,
    errors_outage: usize,
    errors_after: HashMap<String, usize>,
    initial: Duration,
    cpu_line: String,
}

#[allow(clippy::too_many_arguments)]
fn storm_run(
    rt: &tokio::runtime::Runtime,
    p: &Params,
    broker: &str,
    pid: u32,
    others: &[(&'static str, u32)],
    proxy: &Proxy,
    tls: &[(String, Arc<rustls::ClientConfig>)],
    policy: Policy,
) -> StormResult {
    let n = tls.len();
    proxy.set(Fault::Pass);
    let st = Arc::new(Storm {
        devs: (0..n).map(|_| Mutex::new(DevState::default())).collect(),
        connected: AtomicUsize::new(0),
        lost_at: Mutex::new(None),
        restored_at: Mutex::new(None),
        errors_outage: AtomicUsize::new(0),
        errors_after: Mutex::new(HashMap::new()),
        stop: AtomicBool::new(false),
    });
    // Connect everyone first, 2 ms apart (not measured).
    let t_init = Instant::now();
    let port = proxy.addr.port();
    let mut tasks = Vec::new();
    for (i, (id, cfg)) in tls.iter().enumerate() {
        let _g = rt.enter();
        tasks.push(rt.spawn(storm_client(
            i,
            port,
            id.clone(),
            cfg.clone(),
            policy,
            st.clone(),
        )));
        std::thread::sleep(Duration::from_millis(2));
    }
    while st.connected.load(Ordering::SeqCst) < n {
        assert!(
            t_init.elapsed() < p.timeout,
            "{broker}: only {} of {n} connected initially",
            st.connected.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let initial = t_init.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let rss_before_kb = proc_kb(pid, "VmRSS");
    let stop = Arc::new(AtomicBool::new(false));
    let samp = sampler(pid, stop.clone());
    let mut all_pids = vec![(
        if broker == "outpost" {
            "outpost"
        } else {
            "mosquitto"
        },
        pid,
    )];
    all_pids.extend_from_slice(others);
    let cpu = CpuWatch::start(&all_pids);
    // The storm.
    *st.lost_at.lock().unwrap() = Some(Instant::now());
    proxy.set(Fault::Reset);
    std::thread::sleep(p.outage);
    let t0 = Instant::now();
    *st.restored_at.lock().unwrap() = Some(t0);
    proxy.set(Fault::Pass);
    let all = loop {
        let back = st
            .devs
            .iter()
            .filter(|d| d.lock().unwrap().back.is_some())
            .count();
        if back == n {
            let last = st
                .devs
                .iter()
                .filter_map(|d| d.lock().unwrap().back)
                .max()
                .unwrap();
            break Some(last.saturating_duration_since(t0));
        }
        if t0.elapsed() > p.timeout {
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let sample = samp.join().unwrap();
    let cpu_line = cpu.line();
    let mut back: Vec<Duration> = st
        .devs
        .iter()
        .filter_map(|d| {
            d.lock()
                .unwrap()
                .back
                .map(|b| b.saturating_duration_since(t0))
        })
        .collect();
    back.sort();
    st.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    std::thread::sleep(Duration::from_millis(500));
    let errors_after = st.errors_after.lock().unwrap().clone();
    StormResult {
        broker: broker.into(),
        variant: policy,
        all,
        back,
        n,
        sample,
        rss_before_kb,
        errors_outage: st.errors_outage.load(Ordering::Relaxed),
        errors_after,
        initial,
        cpu_line,
    }
}

/// The brokers of the storm and memory phases: the gateway (release binary, defaults) and
/// Mosquitto (TLS, `require_certificate`, the same CA and server certificate), each behind
/// its own fault proxy, and `n` device client configs (certificates signed in-process by the
/// gateway CA's key, CN = device id).
struct Rig {
    /// Kept for its lifetime (the process and its temp dir).
    _gw: Gateway,
    gw_pid: u32,
    tls: Vec<(String, Arc<rustls::ClientConfig>)>,
    mosq: std::process::Child,
    mosq_pid: u32,
    gw_proxy: Proxy,
    mq_proxy: Proxy,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.mosq.kill();
        let _ = self.mosq.wait();
    }
}

fn rig(n: usize) -> Rig {
    common::require_mosquitto();
    let gw = Gateway::start_with("");
    let gw_pid = gw.child.as_ref().unwrap().id();
    // Client certificates signed in-process with the gateway CA (the profile of src/ca.rs).
    let ca_pem = std::fs::read_to_string(gw.data_dir.join("ca.crt")).unwrap();
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(gw.data_dir.join("ca.key")).unwrap())
            .expect("CA key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("CA");
    let t_certs = Instant::now();
    let tls: Vec<(String, Arc<rustls::ClientConfig>)> = (0..n)
        .map(|i| {
            let id = format!("storm-{i:04}");
            let key = rcgen::KeyPair::generate().unwrap();
            let mut cp = rcgen::CertificateParams::default();
            let mut dn = rcgen::DistinguishedName::new();
            dn.push(rcgen::DnType::CommonName, id.as_str());
            dn.push(rcgen::DnType::OrganizationName, "Outpost device");
            cp.distinguished_name = dn;
            cp.subject_alt_names = vec![rcgen::SanType::URI(
                format!("urn:outpost:device:{id}").try_into().unwrap(),
            )];
            cp.is_ca = rcgen::IsCa::ExplicitNoCa;
            cp.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
            cp.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
            cp.use_authority_key_identifier_extension = true;
            cp.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
            cp.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(7);
            let cert = cp.signed_by(&key, &issuer).unwrap();
            let cfg = cloud::tls_client_config_pem(
                ca_pem.as_bytes(),
                cert.pem().as_bytes(),
                key.serialize_pem().as_bytes(),
            );
            (id, cfg)
        })
        .collect();
    println!(
        "{n} client certificates signed in-process in {:.2} s",
        t_certs.elapsed().as_secs_f64()
    );
    // Mosquitto: same CA, the gateway's server certificate.
    let mport = common::free_port();
    let mdir = gw.dir.path().join("storm-mosquitto");
    std::fs::create_dir_all(&mdir).unwrap();
    for f in ["ca.crt", "server.crt", "server.key"] {
        std::fs::copy(gw.data_dir.join(f), mdir.join(f)).unwrap();
    }
    let conf = mdir.join("mosquitto.conf");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    std::fs::write(
        &conf,
        format!(
            "{}listener {mport} 127.0.0.1\ncafile {d}/ca.crt\ncertfile {d}/server.crt\nkeyfile {d}/server.key\nrequire_certificate true\nuse_identity_as_username true\nallow_anonymous false\npersistence false\nmax_connections -1\nconnection_messages false\nlog_type error\nlog_dest stderr\n",
            // As root, mosquitto would switch to user `mosquitto`, who cannot read the temp dir.
            if root { "user root\n" } else { "" },
            d = mdir.display(),
        ),
    )
    .unwrap();
    let mosq = std::process::Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(mdir.join("mosquitto.log")).unwrap())
        .spawn()
        .expect("mosquitto");
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", mport)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "mosquitto did not start: {}",
            std::fs::read_to_string(mdir.join("mosquitto.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mosq_pid = mosq.id();
    let gw_proxy = Proxy::start(gw.mqtts());
    let mq_proxy = Proxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], mport)));
    Rig {
        _gw: gw,
        gw_pid,
        tls,
        mosq,
        mosq_pid,
        gw_proxy,
        mq_proxy,
    }
}

fn storm_phase(p: &Params) {
    let n = p.storm;
    println!();
    println!(
        "== Reconnect storm: {n} TLS MQTT devices, outage {} ms (proxy Reset), then restore ==",
        p.outage.as_millis()
    );
    let rig = rig(n);
    let (gw_pid, mosq_pid, tls) = (rig.gw_pid, rig.mosq_pid, &rig.tls);
    println!(
        "idle RSS: outpost {} kB, mosquitto {} kB; load avg {}",
        proc_kb(gw_pid, "VmRSS"),
        proc_kb(mosq_pid, "VmRSS"),
        loadavg()
    );
    // The clients' own runtime (2 workers), apart from the proxies'.
    let rt = runtime(2);
    let mut results = Vec::new();
    for v in p.variants.split(',') {
        let policy = match v.trim() {
            "jitter" => Policy::Jitter,
            "nojitter" => Policy::NoJitter,
            other => panic!("unknown variant {other:?}"),
        };
        for (name, pid, proxy, other) in [
            (
                "outpost",
                gw_pid,
                &rig.gw_proxy,
                ("mosquitto (idle)", mosq_pid),
            ),
            (
                "mosquitto",
                mosq_pid,
                &rig.mq_proxy,
                ("outpost (idle)", gw_pid),
            ),
        ] {
            let r = storm_run(&rt, p, name, pid, &[other], proxy, tls, policy);
            println!(
                "{name}, {policy:?}: initial connect {:.1} s; {}; load avg {}",
                r.initial.as_secs_f64(),
                r.cpu_line,
                loadavg()
            );
            results.push(r);
        }
    }
    println!();
    println!("| broker | policy | all {n} back (s) | p50 (ms) | p99 (ms) | max (ms) | peak CPU (%, 100 ms) | CPU-s during storm | RSS before → peak (MB) | failed attempts during outage | errors after restore |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in &results {
        let errs: usize = r.errors_after.values().sum();
        let mut kinds: Vec<_> = r.errors_after.iter().collect();
        kinds.sort_by(|a, b| b.1.cmp(a.1));
        let kinds: Vec<String> = kinds
            .iter()
            .take(3)
            .map(|(k, v)| format!("{v}× {k}"))
            .collect();
        println!(
            "| {} | {:?} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.1} → {:.1} | {} | {errs} {} |",
            r.broker,
            r.variant,
            r.all
                .map(|d| format!("{:.2}", d.as_secs_f64()))
                .unwrap_or_else(|| format!("NOT ALL ({} of {})", r.back.len(), r.n)),
            pct(&r.back, 0.50),
            pct(&r.back, 0.99),
            pct(&r.back, 1.0),
            r.sample.cpu_peak,
            r.sample.cpu_s,
            r.rss_before_kb as f64 / 1024.0,
            r.sample.rss_peak_kb as f64 / 1024.0,
            r.errors_outage,
            if kinds.is_empty() {
                String::new()
            } else {
                format!("({})", kinds.join("; "))
            }
        );
    }
    println!(
        "outpost VmHWM (peak RSS of the whole run): {:.1} MB; mosquitto VmHWM: {:.1} MB",
        proc_kb(gw_pid, "VmHWM") as f64 / 1024.0,
        proc_kb(mosq_pid, "VmHWM") as f64 / 1024.0
    );
    drop(rig);
}

/// RSS of a process, its anonymous part, and its thread count, from `/proc/PID/status`.
#[derive(Clone, Copy, Default)]
struct Mem {
    rss_kb: u64,
    anon_kb: u64,
    threads: u64,
}

fn mem_of(pid: u32) -> Mem {
    Mem {
        rss_kb: proc_kb(pid, "VmRSS"),
        anon_kb: proc_kb(pid, "RssAnon"),
        threads: proc_kb(pid, "Threads"),
    }
}

struct MemoryResult {
    broker: &'static str,
    idle: Mem,
    connected: Mem,
    /// After each storm, once all are back and the broker has settled.
    storms: Vec<(Mem, Option<Duration>)>,
    /// After every client has gone (aborted) and the broker has settled.
    after: Mem,
    peak_kb: u64,
}

/// Idle RSS; `n` idle TLS devices; `p.storms` reconnect storms in a row (the proxy resets
/// every connection for `p.outage`, then passes again), RSS after each once all are back
/// and `p.settle` has passed; then all clients gone.
#[allow(clippy::too_many_arguments)]
fn memory_run(
    rt: &tokio::runtime::Runtime,
    p: &Params,
    broker: &'static str,
    pid: u32,
    proxy: &Proxy,
    tls: &[(String, Arc<rustls::ClientConfig>)],
    policy: Policy,
) -> MemoryResult {
    let n = tls.len();
    proxy.set(Fault::Pass);
    std::thread::sleep(p.settle);
    let idle = mem_of(pid);
    let st = Arc::new(Storm {
        devs: (0..n).map(|_| Mutex::new(DevState::default())).collect(),
        connected: AtomicUsize::new(0),
        lost_at: Mutex::new(None),
        restored_at: Mutex::new(None),
        errors_outage: AtomicUsize::new(0),
        errors_after: Mutex::new(HashMap::new()),
        stop: AtomicBool::new(false),
    });
    let t_init = Instant::now();
    let port = proxy.addr.port();
    let mut tasks = Vec::new();
    for (i, (id, cfg)) in tls.iter().enumerate() {
        let _g = rt.enter();
        tasks.push(rt.spawn(storm_client(
            i,
            port,
            id.clone(),
            cfg.clone(),
            policy,
            st.clone(),
        )));
        std::thread::sleep(Duration::from_millis(2));
    }
    while st.connected.load(Ordering::SeqCst) < n {
        assert!(
            t_init.elapsed() < p.timeout,
            "{broker}: only {} of {n} connected initially",
            st.connected.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(p.settle);
    let connected = mem_of(pid);
    println!(
        "{broker}: idle {:.1} MB; {n} idle TLS devices {:.1} MB (connected in {:.1} s)",
        idle.rss_kb as f64 / 1024.0,
        connected.rss_kb as f64 / 1024.0,
        t_init.elapsed().as_secs_f64()
    );
    let mut storms = Vec::new();
    for s in 1..=p.storms {
        for d in &st.devs {
            d.lock().unwrap().back = None;
        }
        *st.lost_at.lock().unwrap() = Some(Instant::now());
        proxy.set(Fault::Reset);
        std::thread::sleep(p.outage);
        // The proxy resets a connection when its pumps see Reset; one not polled during the
        // outage (a loaded machine) would survive it and never come "back". Hold the outage
        // until every client has lost its connection.
        let t_out = Instant::now();
        while st.connected.load(Ordering::SeqCst) > 0 && t_out.elapsed() < p.timeout {
            std::thread::sleep(Duration::from_millis(10));
        }
        let t0 = Instant::now();
        *st.restored_at.lock().unwrap() = Some(t0);
        proxy.set(Fault::Pass);
        let all = loop {
            let back: Vec<Instant> = st
                .devs
                .iter()
                .filter_map(|d| d.lock().unwrap().back)
                .collect();
            if back.len() == n {
                break back
                    .iter()
                    .max()
                    .map(|last| last.saturating_duration_since(t0));
            }
            if t0.elapsed() > p.timeout {
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        std::thread::sleep(p.settle);
        let m = mem_of(pid);
        println!(
            "{broker}: storm {s}: all back in {}; RSS {:.1} MB; load avg {}",
            all.map(|d| format!("{:.2} s", d.as_secs_f64()))
                .unwrap_or_else(|| "NOT ALL".into()),
            m.rss_kb as f64 / 1024.0,
            loadavg()
        );
        storms.push((m, all));
    }
    st.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    std::thread::sleep(p.settle);
    MemoryResult {
        broker,
        idle,
        connected,
        storms,
        after: mem_of(pid),
        peak_kb: proc_kb(pid, "VmHWM"),
    }
}

fn memory_phase(p: &Params) {
    let n = p.storm;
    let policy = match p.memory_policy.trim() {
        "jitter" => Policy::Jitter,
        "nojitter" => Policy::NoJitter,
        other => panic!("unknown BENCH_MEMORY_POLICY {other:?}"),
    };
    println!();
    println!(
        "== Memory: idle, {n} idle TLS devices, {} reconnect storms ({policy:?}, outage {} ms), settle {} ms before each reading ==",
        p.storms,
        p.outage.as_millis(),
        p.settle.as_millis()
    );
    let rig = rig(n);
    let rt = runtime(2);
    let mut results = Vec::new();
    for (name, pid, proxy) in [
        ("outpost", rig.gw_pid, &rig.gw_proxy),
        ("mosquitto", rig.mosq_pid, &rig.mq_proxy),
    ] {
        results.push(memory_run(&rt, p, name, pid, proxy, &rig.tls, policy));
    }
    let mb = |m: &Mem| format!("{:.1}", m.rss_kb as f64 / 1024.0);
    println!();
    println!("| broker | idle (MB) | {n} idle TLS devices (MB) | per connection (kB) | after storm 1 | after storm {} | storm {} / storm 1 | all gone (MB) | VmHWM (MB) | threads idle → connected |", p.storms, p.storms);
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in &results {
        let first = r.storms.first().map(|s| s.0);
        let last = r.storms.last().map(|s| s.0);
        println!(
            "| {} | {} | {} | {:.1} | {} | {} | {} | {} | {:.1} | {} → {} |",
            r.broker,
            mb(&r.idle),
            mb(&r.connected),
            (r.connected.rss_kb.saturating_sub(r.idle.rss_kb)) as f64 / n as f64,
            first.map(|m| mb(&m)).unwrap_or_else(|| "-".into()),
            last.map(|m| mb(&m)).unwrap_or_else(|| "-".into()),
            match (first, last) {
                (Some(a), Some(b)) if a.rss_kb > 0 => format!(
                    "{:+.1} %",
                    (b.rss_kb as f64 / a.rss_kb as f64 - 1.0) * 100.0
                ),
                _ => "-".into(),
            },
            mb(&r.after),
            r.peak_kb as f64 / 1024.0,
            r.idle.threads,
            r.connected.threads,
        );
    }
    println!();
    println!("RSS after each storm (MB), anonymous part in brackets; time until all were back:");
    for r in &results {
        let row: Vec<String> = r
            .storms
            .iter()
            .map(|(m, all)| {
                format!(
                    "{} ({}; {})",
                    mb(m),
                    m.anon_kb / 1024,
                    all.map(|d| format!("{:.1} s", d.as_secs_f64()))
                        .unwrap_or_else(|| "NOT ALL".into())
                )
            })
            .collect();
        println!(
            "{}: idle {} ({}), connected {} ({}): {}",
            r.broker,
            mb(&r.idle),
            r.idle.anon_kb / 1024,
            mb(&r.connected),
            r.connected.anon_kb / 1024,
            row.join(", ")
        );
    }
    drop(rig);
}

fn main() {
    if !run_by_cargo_bench() {
        return;
    }
    let p = Params::from_env();
    let (before, after) = raise_nofile();
    print_title("Outpost offline onboarding and reconnect benchmarks");
    println!(
        "machine: {}; RLIMIT_NOFILE {before} -> {after}; binary {}{}",
        machine(),
        common::BIN,
        if common::BIN.contains("/release/") {
            ""
        } else {
            " (NOT a release build)"
        }
    );
    println!(
        "{}; params {p:?}",
        cmd_out("mosquitto", &["-h"])
            .lines()
            .next()
            .unwrap_or("mosquitto")
    );
    if p.phase("restore") {
        restore_phase(&p);
    }
    if p.phase("storm") {
        storm_phase(&p);
    }
    if p.phase("memory") {
        memory_phase(&p);
    }
    println!();
    println!("load avg at the end: {}", loadavg());
}
