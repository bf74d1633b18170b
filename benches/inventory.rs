//! `cargo bench --bench inventory`: the credential inventory's page queries at
//! `BENCH_ROWS` credentials on both stores, side by side in one run.
//!
//! Loads the same generated credentials into the embedded store (a `store.rs` directory)
//! and into PostgreSQL (a throw-away cluster from `tests/common/pg.rs`, default server
//! settings, `VACUUM ANALYZE` after the load as autovacuum would do), then runs a fixed
//! mix of page queries (50 rows each, the parameters varied per iteration) `BENCH_ITERS`
//! times per kind, interleaved, and prints p50 / p95 / max of each query call (the time
//! `InventoryStore::query` takes in this process: for PostgreSQL that includes the
//! loopback round trips and decoding the page's JSONB records).
//!
//! Environment: BENCH_ROWS (1000000), BENCH_ITERS (200), BENCH_STORES (`embedded,postgres`),
//! BENCH_DIR (parent of the temporary directories; default the system temp dir).

#[path = "../tests/common/pg.rs"]
mod pg;
mod support;

use outpost::credentials::inventory::{Inventory, InventoryStore};
use outpost::credentials::model::{Credential, Event, Kind, OpState, Query, SortKey};
use outpost::store::Store;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};
use support::env_or;

const NOW: i64 = 1_780_000_000;
const DAY: i64 = 86_400;
const EXPIRING: i64 = 30 * DAY;
const LOAD_CHUNK: usize = 10_000;
const SERVERS: [&str; 4] = ["gateway", "cloud", "ota", "diag"];
const ECUS: [&str; 12] = [
    "gateway",
    "brake",
    "engine",
    "body",
    "telematics",
    "infotainment",
    "adas",
    "battery",
    "charger",
    "door-fl",
    "door-fr",
    "seat",
];

/// Credential `i` of a fleet: about 5 per holder, 10 per vehicle.
fn credential(i: usize, rng: &mut StdRng) -> Credential {
    let kind = match i % 10 {
        0..=5 => Kind::Certificate,
        6 => Kind::ForeignCertificate,
        7 | 8 => Kind::SymmetricKey,
        _ => Kind::Token,
    };
    let serial = format!("{:016x}", (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let holder = format!("dev-{:07}", i / 5);
    let id = match kind {
        Kind::Certificate => format!("cert:{serial}"),
        Kind::ForeignCertificate => format!("foreign:oem-ca:{serial}"),
        Kind::SymmetricKey => format!("key:{holder}:{serial}"),
        _ => format!("token:{holder}:t{i}"),
    };
    let mut c = Credential::new(id, kind, serial, holder, NOW - rng.gen_range(0..400 * DAY));
    if rng.gen_bool(0.9) {
        c.vehicle = Some(format!("WVW{:08}", i / 10));
        c.ecu = Some(ECUS[i % ECUS.len()].to_string());
    }
    c.server = SERVERS[rng.gen_range(0..SERVERS.len())].to_string();
    c.issuer = "Outpost fleet CA".into();
    let nb = NOW - rng.gen_range(0..700 * DAY);
    c.not_before = Some(nb);
    c.not_after = (!matches!(kind, Kind::Token) || rng.gen_bool(0.5))
        .then(|| nb + rng.gen_range(90..800) * DAY);
    c.revoked_at = rng.gen_bool(0.02).then_some(NOW - DAY);
    c.op_state = match rng.gen_range(0..100) {
        0..=79 => OpState::Issued,
        80..=84 => OpState::RenewalPending,
        85..=89 => OpState::Renewed,
        90..=92 => OpState::Failed,
        93..=95 => OpState::Reported,
        _ => OpState::InvalidationPending,
    };
    c.last_seen = rng.gen_bool(0.8).then(|| NOW - rng.gen_range(0..30 * DAY));
    if matches!(kind, Kind::Certificate) {
        c.fingerprint = Some(format!("{:064x}", i));
        // About the size of a P-256 device certificate's PEM.
        c.pem = Some(format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            "MIIBszCCAVmgAwIBAgIU".repeat(28)
        ));
    }
    if rng.gen_bool(0.01) {
        c.audit.push("shared".into());
    }
    c.history.push(Event {
        at: c.op_date,
        what: "issued".into(),
        by: "ca".into(),
        detail: String::new(),
    });
    c
}

#[derive(Clone, Copy)]
enum Mix {
    NotAfter,
    HolderDesc,
    OpState,
    Expiring30d,
    SearchHolder,
    Vehicle,
    DeepPage,
}

const MIX: [(Mix, &str); 7] = [
    (Mix::NotAfter, "sort not-after"),
    (Mix::HolderDesc, "sort holder desc"),
    (Mix::OpState, "op-state = renewal-pending"),
    (Mix::Expiring30d, "expiring within 30 days"),
    (Mix::SearchHolder, "search holder substring"),
    (Mix::Vehicle, "vehicle = ..."),
    (Mix::DeepPage, "offset 10,000 (not-after)"),
];

fn query(m: Mix, rows: usize, rng: &mut StdRng) -> Query {
    let base = Query {
        limit: 50,
        ..Query::default()
    };
    match m {
        Mix::NotAfter => base,
        Mix::HolderDesc => Query {
            sort: SortKey::Holder,
            desc: true,
            ..base
        },
        Mix::OpState => Query {
            op_state: Some(OpState::RenewalPending),
            ..base
        },
        Mix::Expiring30d => Query {
            expiring_within: Some(30 * DAY),
            ..base
        },
        Mix::SearchHolder => Query {
            // "v-0012345": a holder's number; about 1 to 10 holders match.
            search: Some(format!(
                "v-{:06}",
                rng.gen_range(0..(rows / 5).max(1) / 10 + 1)
            )),
            ..base
        },
        Mix::Vehicle => Query {
            vehicle: Some(format!("WVW{:08}", rng.gen_range(0..(rows / 10).max(1)))),
            ..base
        },
        Mix::DeepPage => Query {
            offset: 10_000,
            ..base
        },
    }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

struct Measured {
    name: &'static str,
    load_s: f64,
    note: String,
    /// Per mix entry: sorted latencies, and the last page's total.
    lat: Vec<(Vec<Duration>, u64, bool)>,
    /// Per mix entry: the HTML page's and the JSON API's sorted request times through the
    /// real credentials service and admin page (empty with BENCH_PAGE=0).
    page: Vec<(Vec<Duration>, Vec<Duration>)>,
}

async fn load(inv: &Inventory, rows: usize) -> f64 {
    let t = Instant::now();
    let mut rng = StdRng::seed_from_u64(1);
    let mut i = 0;
    while i < rows {
        let n = LOAD_CHUNK.min(rows - i);
        let chunk: Vec<Credential> = (i..i + n).map(|j| credential(j, &mut rng)).collect();
        inv.put(&chunk).await.expect("load");
        i += n;
        if (i / LOAD_CHUNK).is_multiple_of(20) {
            eprintln!("  loaded {i} in {:.0} s", t.elapsed().as_secs_f64());
        }
    }
    t.elapsed().as_secs_f64()
}

async fn measure(inv: &Inventory, rows: usize, iters: usize) -> Vec<(Vec<Duration>, u64, bool)> {
    let mut rng = StdRng::seed_from_u64(2);
    let mut lat: Vec<(Vec<Duration>, u64, bool)> = MIX
        .iter()
        .map(|_| (Vec::with_capacity(iters), 0, true))
        .collect();
    // One warm-up round, not counted.
    for (m, _) in MIX {
        inv.query(&query(m, rows, &mut rng), NOW, EXPIRING)
            .await
            .expect("query");
    }
    for _ in 0..iters {
        for (k, (m, _)) in MIX.iter().enumerate() {
            let q = query(*m, rows, &mut rng);
            let t = Instant::now();
            let page = inv.query(&q, NOW, EXPIRING).await.expect("query");
            lat[k].0.push(t.elapsed());
            lat[k].1 = page.total;
            lat[k].2 = page.exact;
            assert!(page.rows.len() <= 50);
        }
    }
    for l in &mut lat {
        l.0.sort();
    }
    lat
}

fn main() {
    if !support::run_by_cargo_bench() {
        return;
    }
    let rows: usize = env_or("BENCH_ROWS", 1_000_000);
    let iters: usize = env_or("BENCH_ITERS", 200);
    let stores: String = env_or("BENCH_STORES", "embedded,postgres".to_string());
    let parent = std::env::var_os("BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    support::print_title(&format!(
        "credential inventory: {rows} credentials, {iters} queries per kind"
    ));
    println!("machine: {}", support::machine());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut results: Vec<Measured> = Vec::new();
    if stores.contains("embedded") {
        let dir = tempfile::tempdir_in(&parent).expect("temp dir");
        let store = Store::open(&dir.path().join("store")).expect("store");
        let rss0 = rss_mib();
        let m = rt.block_on(async {
            let inv = Inventory::open("", &store).await.expect("open");
            eprintln!("embedded: loading");
            let load_s = load(&inv, rows).await;
            let rss = rss_mib();
            drop(inv);
            // Reopen: the in-memory rows are rebuilt from the records.
            let t = Instant::now();
            let inv = Inventory::open("", &store).await.expect("reopen");
            let reopen_s = t.elapsed().as_secs_f64();
            eprintln!("embedded: querying");
            let lat = measure(&inv, rows, iters).await;
            let (inv, page) = page::measure(inv, rows, iters, &parent).await;
            drop(inv);
            Measured {
                name: "embedded",
                page,
                load_s,
                note: format!(
                    "RSS {rss0:.0} MiB before the load, {rss:.0} MiB after it (rows + sled \
                     cache); reopen (index rebuild) {reopen_s:.1} s; store on disk {} MiB",
                    support::cmd_out("du", &["-sm", &dir.path().display().to_string()])
                        .split_whitespace()
                        .next()
                        .unwrap_or("?")
                ),
                lat,
            }
        });
        results.push(m);
    }
    if stores.contains("postgres") {
        let cluster = pg::PgCluster::start(&[]).expect("PostgreSQL cluster");
        let db = cluster.fresh_db();
        let dir = tempfile::tempdir_in(&parent).expect("temp dir");
        let store = Store::open(&dir.path().join("store")).expect("store");
        let m = rt.block_on(async {
            let inv = Inventory::open(&cluster.url(&db), &store)
                .await
                .expect("open");
            let trigram = match &inv {
                Inventory::Postgres(p) => p.has_trigram_index(),
                Inventory::Embedded(_) => false,
            };
            eprintln!("postgres: loading (trigram index: {trigram})");
            let load_s = load(&inv, rows).await;
            let t = Instant::now();
            cluster
                .psql(&db, "VACUUM ANALYZE credentials")
                .expect("analyze");
            let analyze_s = t.elapsed().as_secs_f64();
            eprintln!("postgres: querying");
            let lat = measure(&inv, rows, iters).await;
            let (_inv, page) = page::measure(inv, rows, iters, &parent).await;
            let size = cluster
                .psql(
                    &db,
                    "SELECT pg_size_pretty(pg_table_size('credentials')) || ' table, ' || \
                     pg_size_pretty(pg_indexes_size('credentials')) || ' indexes'",
                )
                .unwrap_or_default();
            Measured {
                name: "postgres",
                page,
                load_s,
                note: format!(
                    "PostgreSQL {}; pg_trgm index {trigram}; VACUUM ANALYZE {analyze_s:.1} s; {}",
                    cluster
                        .bin
                        .parent()
                        .and_then(|p| p.file_name())
                        .map(|v| v.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    size.trim()
                ),
                lat,
            }
        });
        results.push(m);
        drop(cluster);
    }
    println!();
    for r in &results {
        println!(
            "{}: loaded {rows} in {:.1} s ({:.0}/s); {}",
            r.name,
            r.load_s,
            rows as f64 / r.load_s,
            r.note
        );
    }
    println!();
    let mut header = format!("{:<28}", "query (50 rows)");
    for r in &results {
        header.push_str(&format!(" | {:>8} p50 | p95 | max ms", r.name));
    }
    println!("{header} | total (last)");
    for (k, (_, label)) in MIX.iter().enumerate() {
        let mut line = format!("{label:<28}");
        let mut totals = Vec::new();
        for r in &results {
            let (l, total, exact) = &r.lat[k];
            line.push_str(&format!(
                " | {:>12.1} | {:>5.1} | {:>6.1}",
                pct(l, 0.5),
                pct(l, 0.95),
                pct(l, 1.0)
            ));
            totals.push(format!("{total}{}", if *exact { "" } else { "+" }));
        }
        println!("{line} | {}", totals.join(" / "));
    }
    if results.iter().all(|r| r.page.is_empty()) {
        return;
    }
    println!();
    println!(
        "the same queries as requests to the admin page (HTML, 50 rows) and its JSON API, over \
         loopback HTTP with a session, through the credentials service (ms, client-side: \
         request written to answer read)"
    );
    let mut header = format!("{:<28}", "request");
    for r in &results {
        header.push_str(&format!(" | {:>8} page p50 | p95 | api p50 | p95", r.name));
    }
    println!("{header}");
    for (k, (_, label)) in MIX.iter().enumerate() {
        let mut line = format!("{label:<28}");
        for r in &results {
            let (p, a) = &r.page[k];
            line.push_str(&format!(
                " | {:>17.1} | {:>5.1} | {:>7.1} | {:>5.1}",
                pct(p, 0.5),
                pct(p, 0.95),
                pct(a, 0.5),
                pct(a, 0.95)
            ));
        }
        println!("{line}");
    }
}

/// The page and API requests: the real service (`credentials::service::start`, no core)
/// over the loaded inventory, the real admin page over it, a logged-in session.
mod page {
    use super::{query, Inventory, MIX};
    use outpost::credentials::model::Query;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn url(q: &Query) -> String {
        let mut p = vec![
            format!("sort={}", q.sort.as_str()),
            format!("limit={}", q.limit),
            format!("offset={}", q.offset),
        ];
        if q.desc {
            p.push("desc=1".into());
        }
        if let Some(s) = &q.search {
            p.push(format!("search={s}"));
        }
        if let Some(s) = q.op_state {
            p.push(format!("op_state={}", s.as_str()));
        }
        if let Some(v) = &q.vehicle {
            p.push(format!("vehicle={v}"));
        }
        if let Some(e) = q.expiring_within {
            p.push(format!("expiring_within={e}"));
        }
        p.join("&")
    }

    async fn get(addr: std::net::SocketAddr, path: &str, cookie: &str) -> (u16, usize) {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.expect("read");
        let status = std::str::from_utf8(&buf[..buf.len().min(12)])
            .ok()
            .and_then(|l| l.get(9..12))
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, buf.len())
    }

    pub async fn measure(
        inv: Inventory,
        rows: usize,
        iters: usize,
        parent: &std::path::Path,
    ) -> (Arc<Inventory>, Vec<(Vec<Duration>, Vec<Duration>)>) {
        let inv = Arc::new(inv);
        if std::env::var("BENCH_PAGE").as_deref() == Ok("0") {
            return (inv, Vec::new());
        }
        let dir = tempfile::tempdir_in(parent).expect("temp dir");
        let ca_store = outpost::store::Store::open(&dir.path().join("ca-store")).expect("store");
        let ca = outpost::ca::Ca::open_or_create(
            &dir.path().join("ca"),
            "bench",
            &outpost::ca::CaConfig::default(),
            ca_store,
        )
        .expect("CA");
        let issuer = outpost::credentials::service::issuer_name(ca.ca_der());
        let (ca, _thread) = outpost::ca::CaHandle::spawn(ca).expect("CA thread");
        let tracker = tokio_util::task::TaskTracker::new();
        let stop = tokio_util::sync::CancellationToken::new();
        let handle = outpost::credentials::service::start(
            outpost::credentials::CredentialsConfig::default(),
            inv.clone(),
            outpost::credentials::service::Deps {
                ca,
                core: None,
                durable: None,
                live: Arc::new(|_: &str| false),
                issuer,
                vehicle: None,
                up: None,
                fleet: None,
            },
            &tracker,
            stop.clone(),
        );
        let admins_path = dir.path().join("admins.toml");
        outpost::web::admins::set_password_in(&admins_path, "bench", "bench passphrase")
            .expect("admin");
        let cfg = outpost::web::WebConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            ..outpost::web::WebConfig::default()
        };
        let l = outpost::web::bind(&cfg).await.expect("bind").expect("on");
        let addr = l.local_addr().expect("addr");
        let state = outpost::web::WebState::new(
            handle,
            outpost::web::admins::Admins::open(admins_path).expect("admins"),
            cfg,
        );
        tokio::spawn(outpost::web::serve(l, state, stop.clone()));
        // Log in: the session cookie.
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let body = "user=bench&password=bench+passphrase";
        let req = format!(
            "POST /login HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.expect("read");
        let text = String::from_utf8_lossy(&buf);
        let cookie = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("set-cookie: ")
                    .or_else(|| l.strip_prefix("Set-Cookie: "))
            })
            .and_then(|c| c.split(';').next())
            .expect("a session cookie after the login")
            .to_string();
        let mut rng = StdRng::seed_from_u64(3);
        let mut out: Vec<(Vec<Duration>, Vec<Duration>)> = MIX
            .iter()
            .map(|_| (Vec::with_capacity(iters), Vec::with_capacity(iters)))
            .collect();
        let n = iters.min(100);
        for round in 0..=n {
            for (k, (m, _)) in MIX.iter().enumerate() {
                let q = url(&query(*m, rows, &mut rng));
                let t = Instant::now();
                let (st, len) = get(addr, &format!("/credentials?{q}"), &cookie).await;
                let page = t.elapsed();
                assert_eq!(st, 200, "page {q}: {st}");
                assert!(len > 1000);
                let t = Instant::now();
                let (st, _) = get(addr, &format!("/api/credentials?{q}"), &cookie).await;
                let api = t.elapsed();
                assert_eq!(st, 200, "api {q}: {st}");
                if round > 0 {
                    out[k].0.push(page);
                    out[k].1.push(api);
                }
            }
        }
        for o in &mut out {
            o.0.sort();
            o.1.sort();
        }
        stop.cancel();
        tracker.close();
        tracker.wait().await;
        (inv, out)
    }
}
