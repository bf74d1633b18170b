//! `cargo bench --bench credentials`: issue 13, acceptance point 6, "commands dispatched per
//! second at a check-in storm of 10,000 devices", in-process, with the routing core alone as
//! the anchor in the same run.
//!
//! The rig is the gateway's own wiring without the front door: a temp data dir, one `Store`
//! (fdatasync on unless `OUTPOST_UNSAFE_SKIP_FDATASYNC=1`), the `Ca` on its thread
//! (`CaHandle`), the routing core (`broker::start`), the embedded inventory on the same store
//! and `credentials::service::start` with `durable: None` and a `live` closure that reads one
//! `AtomicBool` per device.
//!
//! * **Phase 1 (setup, timed too).** `BENCH_DEVICES` device certificates issued through the
//!   `CaHandle` (the service records them from the CA's events; we wait until the inventory
//!   counts them all), then one renew job per certificate through
//!   `CredentialsHandle::operate`, all asked at once, while `live` is false: every job stays
//!   queued for its holder's check-in.
//! * **Anchors (no service on these topics).** The same `BENCH_CLIENTS` core clients publish
//!   one report-sized QoS 1 message per device, (A) straight to a subscriber (one hop: the
//!   core alone), and (B) to an echo client that answers each with a command-sized QoS 1
//!   message on the device's command topic (two hops, no work: the shape of the service's
//!   path without the service).
//! * **Phase 2 (the storm).** Every device checks in at once: it turns online (its `live`
//!   flag, as a connection in the front door's session table) and publishes its
//!   report (`msg::Report`, the certificate's serial, issuer and fingerprint, as
//!   `device::holder` makes it) on `devices/{id}/credentials/report`, QoS 1, as fast as the
//!   clients go. A subscriber on `devices/+/commands/outpost/credentials` records when each
//!   device's first command arrives. Figures: first report → the last device's command,
//!   commands/s, report → command latency p50/p95/max, durable inventory writes during the
//!   storm (reports per write is the group-commit batch), and duplicates (retries).
//!
//! Environment: BENCH_DEVICES (10000), BENCH_CLIENTS (4), BENCH_TIMEOUT_S (900).
//! Does nothing unless run by `cargo bench` (`--bench`), and nothing for `--list`.

mod support;

use outpost::broker::{self, BrokerConfig, BrokerLink, CoreLimits};
use outpost::ca::{Ca, CaConfig, CaHandle};
use outpost::credentials::inventory::{Inventory, InventoryStore};
use outpost::credentials::model::{Credential, Kind, Operation};
use outpost::credentials::msg::{self, Held, Report, ToDevice};
use outpost::credentials::service::{self, CredentialsHandle, Deps};
use outpost::credentials::CredentialsConfig;
use outpost::store::Store;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::env_or;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

fn device_id(i: usize) -> String {
    format!("dev-{i:05}")
}

/// The device index in `x/{dev-NNNNN}/...`.
fn device_index(topic: &str) -> Option<usize> {
    topic.split('/').nth(1)?.strip_prefix("dev-")?.parse().ok()
}

/// A client of the routing core, as `broker::local_client` makes one, with its event loop.
fn core_client(core: &BrokerLink, id: &str) -> (AsyncClient, EventLoop) {
    assert!(id.starts_with("outpost~"));
    let mut o = MqttOptions::new(id, core.addr.ip().to_string(), core.addr.port());
    o.set_credentials(id, core.secret.to_string());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(true);
    o.set_max_packet_size(1 << 20, 1 << 20);
    AsyncClient::new(o, 1024)
}

/// Poll `el` until CONNACK (and SUBACK when `sub`), then keep polling in a task, handing
/// each incoming publish to `on_publish`.
async fn run_client(
    client: &AsyncClient,
    mut el: EventLoop,
    sub: Option<&str>,
    on_publish: impl Fn(rumqttc::Publish) + Send + 'static,
    stop: CancellationToken,
) {
    loop {
        match el.poll().await.expect("core client") {
            Event::Incoming(Packet::ConnAck(_)) => match sub {
                Some(f) => client.subscribe(f, QoS::AtLeastOnce).await.unwrap(),
                None => break,
            },
            Event::Incoming(Packet::SubAck(_)) => break,
            _ => {}
        }
    }
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                ev = el.poll() => match ev {
                    Ok(Event::Incoming(Packet::Publish(p))) => on_publish(p),
                    Ok(_) => {}
                    Err(e) => panic!("core client: {e}"),
                },
            }
        }
    });
}

/// Per device: when its message was sent and when its first answer came (ns since `t0` + 1;
/// 0 = not yet).
struct Track {
    t0: Instant,
    sent: Vec<AtomicU64>,
    got: Vec<AtomicU64>,
    distinct: AtomicUsize,
    total: AtomicUsize,
    done: Notify,
}

impl Track {
    fn new(n: usize) -> Arc<Track> {
        Arc::new(Track {
            t0: Instant::now(),
            sent: (0..n).map(|_| AtomicU64::new(0)).collect(),
            got: (0..n).map(|_| AtomicU64::new(0)).collect(),
            distinct: AtomicUsize::new(0),
            total: AtomicUsize::new(0),
            done: Notify::new(),
        })
    }
    fn stamp(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64 + 1
    }
    fn sent(&self, i: usize) {
        self.sent[i].store(self.stamp(), Relaxed);
    }
    fn got(&self, topic: &str) {
        self.total.fetch_add(1, Relaxed);
        let Some(i) = device_index(topic).filter(|i| *i < self.got.len()) else {
            return;
        };
        if self.got[i]
            .compare_exchange(0, self.stamp(), Relaxed, Relaxed)
            .is_ok()
            && self.distinct.fetch_add(1, Relaxed) + 1 == self.got.len()
        {
            self.done.notify_one();
        }
    }
    /// Until every device answered; stops the bench when nothing new came for `STALL`, or
    /// past `timeout`, saying how far it got (and `ctx`: the service's counters).
    async fn wait(&self, timeout: Duration, what: &str, ctx: &dyn Fn() -> String) {
        let start = Instant::now();
        let (mut last, mut since) = (usize::MAX, Instant::now());
        loop {
            if tokio::time::timeout(Duration::from_millis(250), self.done.notified())
                .await
                .is_ok()
            {
                return;
            }
            let now = self.distinct.load(Relaxed);
            if now == self.got.len() {
                return;
            }
            if now != last {
                (last, since) = (now, Instant::now());
            }
            let stalled = since.elapsed() > STALL;
            if stalled || start.elapsed() > timeout {
                panic!(
                    "{what}: {} of {} devices answered; {} ({})",
                    now,
                    self.got.len(),
                    if stalled {
                        format!("nothing new for {} s: stalled", STALL.as_secs())
                    } else {
                        format!("not within {} s", timeout.as_secs())
                    },
                    ctx()
                );
            }
        }
    }
}

/// No new answer for this long: the run is stuck, not slow.
const STALL: Duration = Duration::from_secs(60);

struct Figures {
    span: Duration,
    rate: f64,
    p50: Duration,
    p95: Duration,
    max: Duration,
    total: usize,
}

fn figures(t: &Track) -> Figures {
    let first = t.sent.iter().map(|s| s.load(Relaxed)).min().unwrap_or(0);
    let last = t.got.iter().map(|s| s.load(Relaxed)).max().unwrap_or(0);
    let mut lat: Vec<u64> = t
        .sent
        .iter()
        .zip(&t.got)
        .map(|(s, g)| g.load(Relaxed).saturating_sub(s.load(Relaxed)))
        .collect();
    lat.sort_unstable();
    let pct = |p: f64| Duration::from_nanos(lat[((lat.len() - 1) as f64 * p).round() as usize]);
    let span = Duration::from_nanos(last.saturating_sub(first));
    Figures {
        span,
        rate: t.got.len() as f64 / span.as_secs_f64(),
        p50: pct(0.50),
        p95: pct(0.95),
        max: pct(1.0),
        total: t.total.load(Relaxed),
    }
}

fn print_figures(label: &str, f: &Figures, n: usize) {
    println!(
        "  {label:<34} {:>8.1} ms  {:>8.0} /s   latency p50 {:>7.1} ms  p95 {:>7.1} ms  max {:>7.1} ms  ({} received for {n} devices)",
        f.span.as_secs_f64() * 1e3,
        f.rate,
        f.p50.as_secs_f64() * 1e3,
        f.p95.as_secs_f64() * 1e3,
        f.max.as_secs_f64() * 1e3,
        f.total,
    );
}

/// Publish `payload(i)` on `topic(i)` for every device, QoS 1, spread over the clients (each
/// takes its share in turn, as fast as it goes), stamping each send in `track`.
async fn publish_all(
    clients: &[AsyncClient],
    n: usize,
    topic: Arc<dyn Fn(usize) -> String + Send + Sync>,
    payload: Arc<dyn Fn(usize) -> Vec<u8> + Send + Sync>,
    track: Arc<Track>,
) {
    let k = clients.len();
    let mut tasks = Vec::new();
    for (c, client) in clients.iter().enumerate() {
        let (client, topic, payload, track) = (
            client.clone(),
            topic.clone(),
            payload.clone(),
            track.clone(),
        );
        tasks.push(tokio::spawn(async move {
            for i in (c..n).step_by(k) {
                let (t, p) = (topic(i), payload(i));
                track.sent(i);
                client
                    .publish(t, QoS::AtLeastOnce, false, p)
                    .await
                    .expect("publish");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Anchor: the same clients, the same number of messages, no service.
async fn anchor(
    core: &BrokerLink,
    clients: &[AsyncClient],
    reports: &Arc<Vec<Vec<u8>>>,
    echo: bool,
    timeout: Duration,
) -> Figures {
    let n = reports.len();
    let tag = if echo { "b" } else { "a" };
    let stop = CancellationToken::new();
    let track = Track::new(n);
    let (sub, el) = core_client(core, &format!("outpost~bench-anchor-{tag}-sub"));
    let tr = track.clone();
    run_client(
        &sub,
        el,
        Some("anchor/+/commands/outpost/credentials"),
        move |p| tr.got(&p.topic),
        stop.clone(),
    )
    .await;
    let topic: Arc<dyn Fn(usize) -> String + Send + Sync> = if echo {
        // A command-sized answer for each report, as fast as the echo client goes.
        let (e, el) = core_client(core, &format!("outpost~bench-anchor-{tag}-echo"));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        run_client(
            &e,
            el,
            Some("anchor/+/credentials/report"),
            move |p| {
                let _ = tx.send(p.topic.clone());
            },
            stop.clone(),
        )
        .await;
        let body = ToDevice::Renew {
            job: "0".repeat(32),
            serial: "0".repeat(32),
            server: "gateway".into(),
        }
        .encode();
        tokio::spawn(async move {
            while let Some(t) = rx.recv().await {
                let dev = t.split('/').nth(1).unwrap_or_default().to_string();
                e.publish(
                    format!("anchor/{dev}/commands/outpost/credentials"),
                    QoS::AtLeastOnce,
                    false,
                    body.clone(),
                )
                .await
                .expect("echo");
            }
        });
        Arc::new(|i| format!("anchor/{}/credentials/report", device_id(i)))
    } else {
        Arc::new(|i| format!("anchor/{}/commands/outpost/credentials", device_id(i)))
    };
    let r = reports.clone();
    publish_all(
        clients,
        n,
        topic,
        Arc::new(move |i| r[i].clone()),
        track.clone(),
    )
    .await;
    track
        .wait(timeout, if echo { "anchor B" } else { "anchor A" }, &|| {
            String::new()
        })
        .await;
    // Let late duplicates (none expected) arrive before counting.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.cancel();
    figures(&track)
}

fn main() {
    if !support::run_by_cargo_bench() {
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let n: usize = env_or("BENCH_DEVICES", 10_000);
    let k: usize = env_or("BENCH_CLIENTS", 4);
    let timeout = Duration::from_secs(env_or("BENCH_TIMEOUT_S", 900));
    support::print_title("Credential operations: check-in storm (issue 13)");
    println!("{}", support::machine());
    let skip = std::env::var_os(outpost::store::UNSAFE_SKIP_FDATASYNC).is_some_and(|v| v == "1");
    println!(
        "{n} devices, {k} core clients for the reports, fdatasync {}, service defaults (retry_min {} s)",
        if skip { "OFF" } else { "on" },
        CredentialsConfig::default().retry_min.as_secs()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(n, k, timeout));
}

async fn run(n: usize, k: usize, timeout: Duration) {
    let tmp = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(&tmp.path().join("store")).expect("store");
    let ca = Ca::open_or_create(
        &tmp.path().join("ca"),
        "bench-gw",
        &CaConfig::default(),
        store.clone(),
    )
    .expect("CA");
    let (ca, _ca_thread) = CaHandle::spawn(ca).expect("CA thread");
    let limits = outpost::frontdoor::config::LimitsConfig::default();
    let core = broker::start(
        &BrokerConfig::default(),
        CoreLimits {
            max_packet_size: limits.max_packet_size,
            max_inflight: limits.max_inflight,
            max_connections: limits.max_connections,
        },
    )
    .expect("routing core");
    let inventory = Inventory::open("", &store).await.expect("inventory");

    // The report clients ("devices" through the front door are core clients too).
    let stop = CancellationToken::new();
    let mut clients = Vec::new();
    for c in 0..k {
        let (client, el) = core_client(&core, &format!("outpost~bench-dev-{c}"));
        run_client(&client, el, None, |_| {}, stop.clone()).await;
        clients.push(client);
    }

    // Anchors first, before the service exists.
    let filler: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..n)
            .map(|i| {
                Report {
                    v: msg::VERSION,
                    credentials: vec![Held {
                        kind: Kind::Certificate,
                        id: format!("{:032x}", i),
                        server: "gateway".into(),
                        issuer: Some("Outpost CA bench-gw".into()),
                        fingerprint: Some("0".repeat(64)),
                        not_before: Some(1_700_000_000),
                        not_after: Some(1_800_000_000),
                    }],
                }
                .encode()
            })
            .collect(),
    );
    println!("\nAnchors: the routing core without the service ({n} QoS 1 messages, {k} clients, {} B each)", filler[0].len());
    let a = anchor(&core, &clients, &filler, false, timeout).await;
    print_figures("A. core alone (1 hop)", &a, n);
    let b = anchor(&core, &clients, &filler, true, timeout).await;
    print_figures("B. core + echo client (2 hops)", &b, n);

    // The service, as `run` wires it, `live` under our control: a device is online from
    // the moment its report is handed to its client (it connected, then reported), as the
    // front door's session table says in `run`.
    let live: Arc<Vec<AtomicBool>> = Arc::new((0..n).map(|_| AtomicBool::new(false)).collect());
    let l = live.clone();
    let tracker = TaskTracker::new();
    let svc_stop = CancellationToken::new();
    let deps = Deps {
        ca: ca.clone(),
        core: Some(core.clone()),
        durable: None,
        live: Arc::new(move |d: &str| {
            d.strip_prefix("dev-")
                .and_then(|i| i.parse::<usize>().ok())
                .and_then(|i| l.get(i))
                .is_some_and(|b| b.load(Relaxed))
        }),
        issuer: service::issuer_name(ca.ca_der()),
        vehicle: None,
        up: None,
        fleet: None,
    };
    let svc: CredentialsHandle = service::start(
        CredentialsConfig::default(),
        Arc::new(inventory.clone()),
        deps,
        &tracker,
        svc_stop.clone(),
    );
    let stats = svc.stats.clone();

    println!("\nPhase 1: setup");
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let per = n.div_ceil(16);
    for w in 0..16 {
        let ca = ca.clone();
        tasks.spawn(async move {
            let mut out = Vec::new();
            for i in (w * per)..((w + 1) * per).min(n) {
                let is = ca.issue_device(&device_id(i), None).await.expect("issue");
                out.push((i, is));
            }
            out
        });
    }
    let mut issued: Vec<Option<outpost::ca::Issued>> = (0..n).map(|_| None).collect();
    while let Some(r) = tasks.join_next().await {
        for (i, is) in r.unwrap() {
            issued[i] = Some(is);
        }
    }
    let issued: Vec<outpost::ca::Issued> = issued.into_iter().map(Option::unwrap).collect();
    let ca_s = t.elapsed().as_secs_f64();
    loop {
        if inventory.count().await.expect("count") >= n as u64 {
            break;
        }
        assert!(t.elapsed() < timeout, "the inventory never counted {n}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rec_s = t.elapsed().as_secs_f64();
    println!(
        "  {n} certificates issued through the CaHandle in {ca_s:.1} s ({:.0}/s; one CA thread, a flushed store write each); \
         all {n} in the inventory after {rec_s:.1} s; inventory writes {}",
        n as f64 / ca_s,
        stats.writes.load(Relaxed)
    );

    let w0 = stats.writes.load(Relaxed);
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for is in &issued {
        let (svc, id) = (svc.clone(), Credential::cert_id(&is.serial));
        tasks.spawn(async move {
            svc.operate(&id, Operation::Renew, "bench", "check-in storm")
                .await
        });
    }
    let mut jobs = 0;
    while let Some(r) = tasks.join_next().await {
        jobs += r.unwrap().expect("operate").len();
    }
    let op_s = t.elapsed().as_secs_f64();
    let ow = stats.writes.load(Relaxed) - w0;
    assert_eq!(jobs, n, "one renew job per device");
    assert_eq!(
        stats.commands_sent.load(Relaxed),
        0,
        "nothing sent while away"
    );
    println!(
        "  {n} renew jobs (operate, all asked at once, holders away) in {op_s:.2} s ({:.0}/s), {ow} inventory writes ({:.0} jobs per write)",
        n as f64 / op_s,
        n as f64 / ow.max(1) as f64
    );

    // Phase 2: the storm.
    let reports: Arc<Vec<Vec<u8>>> = Arc::new(
        issued
            .iter()
            .map(|is| {
                let der = pem::parse(&is.cert_pem).expect("PEM");
                let (_, x) = x509_parser::parse_x509_certificate(der.contents()).expect("X.509");
                Report {
                    v: msg::VERSION,
                    credentials: vec![Held {
                        kind: Kind::Certificate,
                        id: outpost::ca::serial_hex(x.raw_serial()),
                        server: "gateway".into(),
                        issuer: Some(service::issuer_name(ca.ca_der())),
                        fingerprint: Some(outpost::ca::fingerprint(der.contents())),
                        not_before: Some(x.validity().not_before.timestamp()),
                        not_after: Some(x.validity().not_after.timestamp()),
                    }],
                }
                .encode()
            })
            .collect(),
    );
    let track = Track::new(n);
    let (sub, el) = core_client(&core, "outpost~bench-commands");
    let tr = track.clone();
    let kinds = Arc::new(AtomicUsize::new(0));
    let kk = kinds.clone();
    run_client(
        &sub,
        el,
        Some("devices/+/commands/outpost/credentials"),
        move |p| {
            if !matches!(ToDevice::decode(&p.payload), Ok(ToDevice::Renew { .. })) {
                kk.fetch_add(1, Relaxed);
            }
            tr.got(&p.topic)
        },
        stop.clone(),
    )
    .await;
    let (w0, r0) = (stats.writes.load(Relaxed), stats.reports.load(Relaxed));
    println!(
        "\nPhase 2: the storm ({n} check-ins at once, {} B reports)",
        reports[0].len()
    );
    let (r, l) = (reports.clone(), live.clone());
    publish_all(
        &clients,
        n,
        Arc::new(|i| msg::report_topic(&device_id(i))),
        Arc::new(move |i| {
            l[i].store(true, Relaxed);
            r[i].clone()
        }),
        track.clone(),
    )
    .await;
    let published = track.t0.elapsed();
    let st = stats.clone();
    track
        .wait(timeout, "the storm", &move || {
            format!(
                "service: {} reports taken, {} commands sent, {} writes",
                st.reports.load(Relaxed),
                st.commands_sent.load(Relaxed),
                st.writes.load(Relaxed)
            )
        })
        .await;
    let (w1, r1) = (stats.writes.load(Relaxed), stats.reports.load(Relaxed));
    let s = figures(&track);
    // The commands can beat the reports (the tick delivers a queued job to a holder that is
    // online): how long until every report was taken and recorded, too.
    let t_cmds = track.t0.elapsed();
    let reports_done = loop {
        let taken = stats.reports.load(Relaxed) - r0;
        if taken >= n as u64 {
            break Some(track.t0.elapsed());
        }
        if track.t0.elapsed() > t_cmds + timeout {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let w2 = stats.writes.load(Relaxed);
    let first = track
        .sent
        .iter()
        .map(|s| s.load(Relaxed))
        .min()
        .unwrap_or(1);
    print_figures("service: report → command", &s, n);
    println!(
        "  reports published in {:.1} ms; the service took {} reports, {} durable inventory writes ({:.1} reports per write), \
         commands_sent {}, {} received that were not a renew",
        (published.as_nanos() as u64).saturating_sub(first) as f64 / 1e6,
        r1 - r0,
        w1 - w0,
        (r1 - r0) as f64 / (w1 - w0).max(1) as f64,
        stats.commands_sent.load(Relaxed),
        kinds.load(Relaxed),
    );
    let first_s = first as f64 / 1e9;
    match reports_done {
        Some(d) => println!(
            "  all {n} reports taken and recorded {:.0} ms after the first ({:.0} reports/s), {} durable inventory writes in all",
            (d.as_secs_f64() - first_s) * 1e3,
            n as f64 / (d.as_secs_f64() - first_s),
            w2 - w0
        ),
        None => println!("  not every report was taken within the timeout"),
    }
    println!(
        "\nSide by side: service {:.0} commands/s against the core's {:.0} msg/s alone (A, {:.1}x) and {:.0}/s with an echo client (B, {:.1}x)",
        s.rate,
        a.rate,
        a.rate / s.rate,
        b.rate,
        b.rate / s.rate
    );
    // Holders away again, so that no retry is in flight when the core clients stop.
    for b in live.iter() {
        b.store(false, Relaxed);
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    svc_stop.cancel();
    stop.cancel();
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
}
