//! `cargo bench --bench onboard`: FDO onboardings per second (issue 4, acceptance point 6),
//! TO1 + TO2 with P-256 device keys, ECDH256 and A128GCM, `BENCH_DEVICES` devices at once,
//! on this machine, all on 127.0.0.1, with its anchors side by side in the same run.
//!
//! * **Server**, set up as a deployment does it: a data directory with a sled `Store`, the
//!   gateway CA (`Ca` on that store, run by `CaHandle` on its own thread) as the credential
//!   issuer of `outpost:mqtt`, the owner keys of the data directory, the store-backed owner
//!   (`StoreOwnerBackend`: vouchers imported with `owner::import_voucher`, the device
//!   registry) and the rendezvous server (the code offers the in-memory registration store
//!   only), both behind one listener served by `fdo::http::serve` on 127.0.0.1:0, as the
//!   gateway does. The same server is served on two listeners: one bound like the gateway
//!   binds (`tokio::net::TcpListener::bind`: listen backlog 128), one with backlog
//!   `BENCH_BACKLOG`; each measured group of devices uses one of them. The server runs on
//!   its own tokio runtime (2 workers, threads `fdo-server`); the devices run on another (2
//!   workers, threads `fdo-client`), so the two do not share worker threads (they share the
//!   machine's 2 cores). The owner backend and the issuer are wrapped in pass-through
//!   adapters that time their calls (nothing else).
//! * **Devices**: `2 * BENCH_DEVICES + 2 * BENCH_SEQ` devices made with
//!   `Manufacturer::init_device` (P-256), their rendezvous info naming one of the bench's
//!   listeners, vouchers extended to the owner key, imported, and registered at the
//!   rendezvous with `client::to0_register` over HTTP (timed: the TO0 rows).
//! * **Concurrent onboarding**: for each listener, `BENCH_DEVICES` devices call
//!   `client::onboard` (TO1 then TO2 with `outpost:mqtt`: each device makes a key, sends a
//!   CSR and gets a certificate from the CA) all at once, released by one barrier. Wall
//!   time, onboardings/s, the latency of each device (p50/p90/p99/max), failures (each
//!   printed), listen-queue overflows, CPU time by thread group. Afterwards (not timed):
//!   the registry holds one entry per onboarding, every certificate verifies with the CA and
//!   carries its device's key, and serials are unique.
//! * **Anchors** in the same run: (a) one device at a time, `BENCH_SEQ` onboardings before
//!   and `BENCH_SEQ` after the concurrent runs (unloaded latency, 1-client throughput);
//!   (b) the crypto floor: the public-key operations of one onboarding, both sides, back to
//!   back without HTTP, storage, protocol state or scheduling, in thread CPU time on 1
//!   thread (2 CPUs / that = an upper bound for onboardings/s on this machine), and timed
//!   by the wall clock on 2 threads at once (what this run could get of a shared machine);
//!   (c) the CA alone: issuing a certificate for a CSR through `CaHandle` one at a time (the
//!   CA is one thread, so its rate bounds onboardings with `outpost:mqtt`), and a bare
//!   store flush.
//!
//! Environment: BENCH_DEVICES (1000), BENCH_SEQ (50), BENCH_FLOOR (300 floor iterations
//! per thread), BENCH_CA (50 CA issuances), BENCH_BACKLOG (4096), BENCH_BLOCK_IN_PLACE (0;
//! 1 = the owner backend's `onboarded()` runs under `tokio::task::block_in_place`, an A/B
//! for moving its store flushes off the async worker), BENCH_TIMEOUT_S (600), BENCH_LOG (a
//! tracing filter such as `info` to measure with the library's logging on stderr; default:
//! no subscriber), BENCH_DIR (parent of the temporary data directory; default cargo's
//! target tmpdir). The soft RLIMIT_NOFILE is raised to the hard limit (1,000 devices hold
//! up to 2,000 sockets in this process).
//!
//! Does nothing unless run by `cargo bench` (`--bench`), and nothing for `--list`.

mod support;

use outpost::ca::{Ca, CaHandle, CA_CERT, CA_KEY};
use outpost::config::CaConfig;
use outpost::fdo::client::{self, DeviceOptions, Endpoint};
use outpost::fdo::http::{self, FdoServer};
use outpost::fdo::owner;
use outpost::fdo::owner_backend::StoreOwnerBackend;
use outpost::fdo::owner_service::{
    BoxFuture, CredentialIssuer, IssueRequest, IssuedCredential, OnboardRecord, OwnerBackend,
    OwnerConfig, OwnerService,
};
use outpost::fdo::rendezvous::{Rendezvous, RvConfig, StoreRvStore};
use outpost::fdo_wire::crypto::{self, Curve, SigningKey};
use outpost::fdo_wire::kex::{CipherSuite, KexParty, KexSuite};
use outpost::fdo_wire::manufacturer::{DeviceOptions as MfgOptions, Manufacturer};
use outpost::fdo_wire::msg::{
    transport, Eat, HelloDevice, Nonce, ProveOvHdr, ProveOvHdrPayload, SetupDevicePayload,
    SignedMsg, To1dPayload, To2Addr,
};
use outpost::fdo_wire::types::{Guid, PublicKey, RendezvousInfo, RvDirective, RvProtocol, SigInfo};
use outpost::fdo_wire::{DeviceCredential, OwnershipVoucher};
use outpost::store::Store;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{cmd_out, env_or, loadavg, machine, print_title, raise_nofile, run_by_cargo_bench};

// ------------------------------------------------------------------------------------------
// Parameters

#[derive(Clone, Debug)]
struct Params {
    devices: usize,
    seq: usize,
    floor: usize,
    ca: usize,
    backlog: u32,
    block_in_place: bool,
    timeout: Duration,
}

impl Params {
    fn from_env() -> Params {
        Params {
            devices: env_or("BENCH_DEVICES", 1000usize).max(1),
            seq: env_or("BENCH_SEQ", 50usize).max(1),
            floor: env_or("BENCH_FLOOR", 300usize).max(10),
            ca: env_or("BENCH_CA", 50usize).max(1),
            backlog: env_or("BENCH_BACKLOG", 4096u32).max(1),
            block_in_place: env_or("BENCH_BLOCK_IN_PLACE", 0u8) != 0,
            timeout: Duration::from_secs(env_or("BENCH_TIMEOUT_S", 600u64)),
        }
    }
}

// ------------------------------------------------------------------------------------------
// Statistics and machine facts

/// Percentile (nearest rank) of sorted durations, in ms.
fn pct_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() as f64)).ceil() as usize;
    sorted[i.clamp(1, sorted.len()) - 1].as_secs_f64() * 1000.0
}

/// Busy and total jiffies of the whole machine (first line of /proc/stat).
fn machine_jiffies() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// TcpExt ListenOverflows + ListenDrops (whole network namespace).
fn listen_drops() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = s.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return (0, 0);
    };
    let m: HashMap<&str, u64> = names
        .split_whitespace()
        .zip(values.split_whitespace())
        .filter_map(|(n, v)| Some((n, v.parse().ok()?)))
        .collect();
    (
        m.get("ListenOverflows").copied().unwrap_or(0),
        m.get("ListenDrops").copied().unwrap_or(0),
    )
}

// ------------------------------------------------------------------------------------------
// CPU time of this process by thread group

/// On-CPU nanoseconds of each live thread, by name.
fn thread_cpu() -> HashMap<u32, (String, u64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let p = e.path();
        let comm = std::fs::read_to_string(p.join("comm"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let ns = std::fs::read_to_string(p.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        out.insert(tid, (comm, ns));
    }
    out
}

/// user + system CPU of the whole process (exited threads included), ns.
fn process_cpu() -> u64 {
    // SAFETY: getrusage with a valid pointer to a zeroed rusage.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut u) != 0 {
            return 0;
        }
        let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
        tv(u.ru_utime) + tv(u.ru_stime)
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Cpu {
    server: f64,
    client: f64,
    ca: f64,
    store: f64,
    process: f64,
    machine_busy: f64,
    wall: f64,
}

struct CpuMark {
    threads: HashMap<u32, (String, u64)>,
    process: u64,
    machine: (u64, u64),
    at: Instant,
}

impl CpuMark {
    fn now() -> CpuMark {
        CpuMark {
            threads: thread_cpu(),
            process: process_cpu(),
            machine: machine_jiffies(),
            at: Instant::now(),
        }
    }

    fn since(&self) -> Cpu {
        let now = thread_cpu();
        let mut c = Cpu {
            process: (process_cpu().saturating_sub(self.process)) as f64 / 1e9,
            wall: self.at.elapsed().as_secs_f64(),
            ..Default::default()
        };
        let (busy, total) = machine_jiffies();
        let ncpu = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1) as f64;
        // Busy CPUs of the whole machine over the interval, in CPU-seconds.
        let dt = (total - self.machine.1) as f64;
        if dt > 0.0 {
            c.machine_busy = (busy - self.machine.0) as f64 / dt * ncpu * c.wall;
        }
        for (tid, (comm, ns)) in &now {
            let before = self.threads.get(tid).map(|(_, n)| *n).unwrap_or(0);
            let d = ns.saturating_sub(before) as f64 / 1e9;
            if comm.starts_with("fdo-server") {
                c.server += d;
            } else if comm.starts_with("fdo-client") {
                c.client += d;
            } else if comm.starts_with("outpost-ca") {
                c.ca += d;
            } else if comm.contains("sled") || comm.contains("flush") {
                c.store += d;
            }
        }
        c
    }
}

impl Cpu {
    fn line(&self) -> String {
        let other = (self.process - self.server - self.client - self.ca - self.store).max(0.0);
        let pct = |x: f64| 100.0 * x / self.wall.max(1e-9);
        format!(
            "CPU over {:.2} s wall: server {:.2} s ({:.0}%), CA thread {:.2} s ({:.0}%), sled {:.2} s, \
             devices {:.2} s ({:.0}%), rest of process {:.2} s; process {:.2} s ({:.0}%); \
             whole machine busy {:.2} CPU-s ({:.0}% of 2 CPUs), so others {:.2} CPU-s",
            self.wall,
            self.server,
            pct(self.server),
            self.ca,
            pct(self.ca),
            self.store,
            self.client,
            pct(self.client),
            other,
            self.process,
            pct(self.process),
            self.machine_busy,
            pct(self.machine_busy) / 2.0,
            (self.machine_busy - self.process).max(0.0),
        )
    }
}

// ------------------------------------------------------------------------------------------
// Pass-through adapters that time the owner's blocking backend calls and the CA

#[derive(Default)]
struct Timing {
    calls: AtomicU64,
    ns: AtomicU64,
    max_ns: AtomicU64,
}

impl Timing {
    fn add(&self, d: Duration) {
        let ns = d.as_nanos() as u64;
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.ns.fetch_add(ns, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
    }

    fn take(&self) -> (u64, f64, f64) {
        let n = self.calls.swap(0, Ordering::Relaxed);
        let ns = self.ns.swap(0, Ordering::Relaxed);
        let max = self.max_ns.swap(0, Ordering::Relaxed);
        (n, ns as f64 / 1e9, max as f64 / 1e6)
    }

    fn line(&self, what: &str) -> String {
        let (n, s, max) = self.take();
        if n == 0 {
            return format!("{what}: no calls");
        }
        format!(
            "{what}: {n} calls, {:.2} ms mean, {max:.1} ms max, {s:.2} s total",
            s * 1000.0 / n as f64
        )
    }
}

#[derive(Default)]
struct Timings {
    voucher: Timing,
    onboarded: Timing,
    issue: Timing,
}

/// `StoreOwnerBackend` with its (synchronous, on the server's async workers) calls timed.
struct TimedBackend {
    inner: StoreOwnerBackend,
    t: Arc<Timings>,
    /// BENCH_BLOCK_IN_PLACE=1: run `onboarded` (two store flushes) under
    /// `tokio::task::block_in_place`, to show what moving it off the async worker would do.
    block_in_place: bool,
}

impl OwnerBackend for TimedBackend {
    fn voucher(&self, guid: &Guid) -> Result<Option<OwnershipVoucher>, String> {
        let s = Instant::now();
        let r = self.inner.voucher(guid);
        self.t.voucher.add(s.elapsed());
        r
    }

    fn owner_key(&self, key: &PublicKey) -> Option<Arc<SigningKey>> {
        self.inner.owner_key(key)
    }

    fn onboarded(
        &self,
        rec: &OnboardRecord,
        new_voucher: Option<&OwnershipVoucher>,
    ) -> Result<(), String> {
        let s = Instant::now();
        let r = if self.block_in_place {
            tokio::task::block_in_place(|| self.inner.onboarded(rec, new_voucher))
        } else {
            self.inner.onboarded(rec, new_voucher)
        };
        self.t.onboarded.add(s.elapsed());
        r
    }
}

/// `CaHandle` as the issuer, with the time from request to certificate measured.
struct TimedIssuer {
    ca: CaHandle,
    t: Arc<Timings>,
}

impl CredentialIssuer for TimedIssuer {
    fn issue(&self, req: IssueRequest) -> BoxFuture<'_, Result<IssuedCredential, String>> {
        Box::pin(async move {
            let s = Instant::now();
            let r = self.ca.issue(req).await;
            self.t.issue.add(s.elapsed());
            r
        })
    }
}

// ------------------------------------------------------------------------------------------
// The rig

struct Device {
    cred: DeviceCredential,
    voucher: OwnershipVoucher,
}

struct Rig {
    dir: tempfile::TempDir,
    /// Kept alive: the server runs on it.
    _server_rt: tokio::runtime::Runtime,
    client_rt: tokio::runtime::Runtime,
    /// Bound like the gateway binds (`tokio::net::TcpListener::bind`: listen backlog 128).
    ep: Endpoint,
    /// The same server on a listener with backlog `BENCH_BACKLOG`.
    ep_wide: Endpoint,
    owner_key: Arc<SigningKey>,
    backend: Arc<TimedBackend>,
    ca: CaHandle,
    timings: Arc<Timings>,
    mfg: Manufacturer,
    store: Store,
}

impl Rig {
    fn start(p: &Params) -> Rig {
        let parent =
            std::env::var("BENCH_DIR").unwrap_or_else(|_| env!("CARGO_TARGET_TMPDIR").into());
        std::fs::create_dir_all(&parent).expect("BENCH_DIR");
        let dir = tempfile::Builder::new()
            .prefix("onboard-")
            .tempdir_in(&parent)
            .expect("temporary data dir");
        let data = dir.path();
        println!(
            "data dir {} ({}), store: sled",
            data.display(),
            cmd_out("stat", &["-f", "-c", "%T", &data.display().to_string()])
        );
        let server_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fdo-server")
            .enable_all()
            .build()
            .expect("server runtime");
        let client_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fdo-client")
            .enable_all()
            .build()
            .expect("client runtime");
        // As `outpost run`: the CA in the data dir on the store in `store/`, run by its thread.
        let store = Store::open(&data.join("store")).expect("store");
        let ca =
            Ca::open_or_create(data, "bench", &CaConfig::default(), store.clone()).expect("CA");
        let (ca, _join) = CaHandle::spawn(ca).expect("CA thread");
        let store_handle = store.clone();
        let owner = owner::current_or_create(data, Curve::P256, "bench").expect("owner key");
        let owner_key = Arc::new(owner.key);
        let timings = Arc::new(Timings::default());
        let backend = Arc::new(TimedBackend {
            inner: StoreOwnerBackend::open(store.clone(), data, "cloud bench")
                .expect("owner backend"),
            t: timings.clone(),
            block_in_place: p.block_in_place,
        });
        // One client address for every simulated device: no per-peer limit, and no short
        // lifetime before the first proof (this measures throughput, not flood fairness).
        let sessions = outpost::fdo::session::SessionLimits {
            max_per_peer: usize::MAX,
            unproven_ttl: outpost::fdo::session::SessionLimits::default().ttl,
            ..Default::default()
        };
        let rendezvous = Arc::new(Rendezvous::new(
            RvConfig {
                sessions: sessions.clone(),
                ..RvConfig::default()
            },
            Arc::new(
                StoreRvStore::open(&store, 100_000.max(4 * (p.devices + 2 * p.seq)))
                    .expect("rendezvous table"),
            ),
            None,
        ));
        let service = Arc::new(OwnerService::new(
            OwnerConfig {
                mqtt_servers: vec![
                    "mqtts://gw.local:8883".into(),
                    "mqtts://cloud.example:8883".into(),
                ],
                sessions,
                ..Default::default()
            },
            backend.clone(),
            Some(Arc::new(TimedIssuer {
                ca: ca.clone(),
                t: timings.clone(),
            })),
        ));
        let server = FdoServer {
            rendezvous: Some(rendezvous),
            owner: Some(service),
            to1: None,
        };
        let listener = server_rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let ep = Endpoint::from(listener.local_addr().expect("local addr"));
        server_rt.spawn(http::serve(
            listener,
            server.clone(),
            std::future::pending(),
        ));
        let backlog = p.backlog;
        let wide = server_rt
            .block_on(async move {
                let s = tokio::net::TcpSocket::new_v4()?;
                s.set_reuseaddr(true)?;
                s.bind("127.0.0.1:0".parse().unwrap())?;
                s.listen(backlog)
            })
            .expect("bind");
        let ep_wide = Endpoint::from(wide.local_addr().expect("local addr"));
        server_rt.spawn(http::serve(wide, server, std::future::pending()));
        let mfg = Manufacturer::open_or_create(&data.join("mfg"), Curve::P256).expect("mfg");
        Rig {
            dir,
            _server_rt: server_rt,
            client_rt,
            ep,
            ep_wide,
            owner_key,
            backend,
            ca,
            timings,
            mfg,
            store: store_handle,
        }
    }

    fn rv_info(ep: &Endpoint) -> RendezvousInfo {
        RendezvousInfo(vec![RvDirective::default()
            .with_ip("127.0.0.1".parse().unwrap())
            .with_dev_port(ep.port)
            .with_protocol(RvProtocol::Http)
            .with_delay_secs(5)])
    }

    fn addrs(ep: &Endpoint) -> Vec<To2Addr> {
        vec![To2Addr {
            ip: Some("127.0.0.1".parse().unwrap()),
            dns: None,
            port: ep.port,
            protocol: transport::HTTP,
        }]
    }

    /// `n` devices, made on 2 threads: credential + voucher extended to our owner key.
    fn make_devices(&self, n: usize, ep: &Endpoint) -> Vec<Device> {
        let rv_info = Self::rv_info(ep);
        let owner_pub = self.owner_key.public_key();
        let one = |i: usize| {
            let (cred, v) = self
                .mfg
                .init_device(&MfgOptions {
                    device_info: format!("bench-{i}"),
                    rv_info: rv_info.clone(),
                    curve: Curve::P256,
                })
                .expect("init_device");
            let voucher = v.extend(self.mfg.key(), &owner_pub).expect("extend");
            Device { cred, voucher }
        };
        std::thread::scope(|s| {
            let half = n / 2;
            let one = &one;
            let a = s.spawn(move || (0..half).map(one).collect::<Vec<_>>());
            let b = s.spawn(move || (half..n).map(one).collect::<Vec<_>>());
            let mut v = a.join().unwrap();
            v.extend(b.join().unwrap());
            v
        })
    }

    /// `outpost voucher import` for each voucher (PEM, as the tool reads it).
    fn import(&self, devices: &[Device]) {
        for d in devices {
            owner::import_voucher(&self.store, self.dir.path(), d.voucher.to_pem().as_bytes())
                .expect("import");
        }
    }

    /// TO0 at the rendezvous on `ep`, naming the owner on the same listener.
    fn to0(
        &self,
        v: &OwnershipVoucher,
        ep: &Endpoint,
    ) -> impl std::future::Future<Output = Result<u32, String>> {
        let ep = ep.clone();
        let v = v.clone();
        let key = self.owner_key.clone();
        let addrs = Self::addrs(&ep);
        async move {
            client::to0_register(&ep, &v, &key, addrs, 3600)
                .await
                .map_err(|e| e.to_string())
        }
    }
}

// ------------------------------------------------------------------------------------------
// Measured rows

#[derive(Debug, Clone)]
struct Row {
    name: String,
    n: usize,
    ok: usize,
    wall: f64,
    lat: Vec<Duration>,
    cpu: Option<Cpu>,
}

impl Row {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.wall
    }

    fn print(&self) {
        println!(
            "  {:<44} {:>5} {:>5} {:>8.2} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
            self.name,
            self.n,
            self.n - self.ok,
            self.wall,
            self.rate(),
            pct_ms(&self.lat, 50.0),
            pct_ms(&self.lat, 90.0),
            pct_ms(&self.lat, 99.0),
            pct_ms(&self.lat, 100.0),
        );
    }
}

fn header() {
    println!(
        "  {:<44} {:>5} {:>5} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "", "n", "fail", "wall s", "per s", "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
}

/// Run `n` jobs one after the other on the client runtime.
fn sequential<F, Fut, T>(rig: &Rig, name: &str, n: usize, job: F) -> (Row, Vec<T>)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T, String>> + Send + 'static,
    T: Send + 'static,
{
    let mark = CpuMark::now();
    let start = Instant::now();
    let mut lat = Vec::with_capacity(n);
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for i in 0..n {
        let fut = job(i);
        // Spawned, so that the device runs on a client worker thread as in the concurrent
        // run (block_on alone would run it on this thread).
        let h = rig.client_rt.spawn(async move {
            let s = Instant::now();
            let r = fut.await;
            (s.elapsed(), r)
        });
        let (d, r) = rig.client_rt.block_on(h).expect("device task");
        match r {
            Ok(v) => {
                lat.push(d);
                out.push(v);
            }
            Err(e) => errors.push(e),
        }
    }
    let wall = start.elapsed().as_secs_f64();
    report_errors(name, &errors);
    lat.sort();
    let row = Row {
        name: name.into(),
        n,
        ok: out.len(),
        wall,
        lat,
        cpu: Some(mark.since()),
    };
    (row, out)
}

/// Run `n` jobs at once on the client runtime, released together by a barrier.
fn concurrent<F, Fut, T>(rig: &Rig, p: &Params, name: &str, n: usize, job: F) -> (Row, Vec<T>)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T, String>> + Send + 'static,
    T: Send + 'static,
{
    let barrier = Arc::new(tokio::sync::Barrier::new(n + 1));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let fut = job(i);
            let b = barrier.clone();
            rig.client_rt.spawn(async move {
                b.wait().await;
                let s = Instant::now();
                let r = fut.await;
                (s.elapsed(), Instant::now(), r)
            })
        })
        .collect();
    let drops0 = listen_drops();
    let mark = CpuMark::now();
    let timeout = p.timeout;
    let (start, results) = rig.client_rt.block_on(async move {
        barrier.wait().await;
        let start = Instant::now();
        let mut results = Vec::with_capacity(n);
        let deadline = tokio::time::Instant::now() + timeout;
        for h in handles {
            match tokio::time::timeout_at(deadline, h).await {
                Ok(Ok(r)) => results.push(Some(r)),
                Ok(Err(e)) => panic!("device task: {e}"),
                Err(_) => results.push(None),
            }
        }
        (start, results)
    });
    let cpu = mark.since();
    let drops1 = listen_drops();
    let mut lat = Vec::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    let mut errors = Vec::new();
    let mut end = start;
    for r in results {
        match r {
            Some((d, at, Ok(v))) => {
                lat.push(d);
                out.push(v);
                end = end.max(at);
            }
            Some((_, at, Err(e))) => {
                errors.push(e);
                end = end.max(at);
            }
            None => errors.push(format!("no result within {timeout:?}")),
        }
    }
    report_errors(name, &errors);
    if drops1 != drops0 {
        println!(
            "  {name}: kernel listen queue overflows {} drops {} during the run",
            drops1.0 - drops0.0,
            drops1.1 - drops0.1
        );
    }
    lat.sort();
    let row = Row {
        name: name.into(),
        n,
        ok: out.len(),
        wall: (end - start).as_secs_f64(),
        lat,
        cpu: Some(cpu),
    };
    (row, out)
}

fn report_errors(name: &str, errors: &[String]) {
    if errors.is_empty() {
        return;
    }
    let mut count: HashMap<&str, usize> = HashMap::new();
    for e in errors {
        *count.entry(e.as_str()).or_default() += 1;
    }
    println!("  {name}: {} FAILED:", errors.len());
    for (e, n) in count {
        println!("    {n} x {e}");
    }
}

// ------------------------------------------------------------------------------------------
// Anchor (b): the crypto floor

/// The material of one onboarding, made once; the floor repeats only the operations.
struct FloorKit {
    cred: DeviceCredential,
    voucher: OwnershipVoucher,
    owner_key: Arc<SigningKey>,
    owner_pub: PublicKey,
    mfg_pub: PublicKey,
    /// The CA key, loaded once (as `Ca` holds it).
    ca_key: rcgen::KeyPair,
    ca_der: Vec<u8>,
}

/// One onboarding's public-key work on the device side: TO1 EAT sign; TO2 verify
/// ProveOVHdr, the voucher entry and to1d with the owner key; ECDH256 (key generation and
/// agreement); EAT sign; verify SetupDevice; the `outpost:mqtt` key pair and its CSR.
/// The messages it verifies are made once by [`FloorKit::outputs`].
fn device_side(k: &FloorKit, s: &OwnerOutputs) -> usize {
    let c = &k.cred;
    let nonce = Nonce::random().unwrap();
    let e1 = Eat::sign(&c.device_key, &c.guid, &nonce, None, None).unwrap();
    let owner_vk = s.prove.owner_key.verifying_key().unwrap();
    s.prove.signed.verify(&owner_vk, "ProveOVHdr").unwrap();
    let mfg_vk = k.mfg_pub.verifying_key().unwrap();
    outpost::fdo_wire::cose::verify(k.voucher.entries()[0].sign1(), &mfg_vk, "OVEntry").unwrap();
    s.to1d.verify(&owner_vk, "to1d").unwrap();
    let kex = KexParty::new(KexSuite::Ecdh256).unwrap();
    let xb = kex.param().to_vec();
    let sek = kex.finish(&s.xa, false, CipherSuite::A128Gcm).unwrap();
    let e2 = Eat::sign(
        &c.device_key,
        &c.guid,
        &nonce,
        Some(cbor_array_bytes(xb)),
        Some(&nonce),
    )
    .unwrap();
    let o2 = k.owner_pub.verifying_key().unwrap();
    s.setup.verify(&o2, "SetupDevice").unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, c.guid.hex());
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    e1.signed.raw.len() + e2.signed.raw.len() + sek.len() + csr.len()
}

fn cbor_array_bytes(b: Vec<u8>) -> outpost::fdo_wire::cbor::Value {
    outpost::fdo_wire::cbor::Value::Array(vec![outpost::fdo_wire::cbor::Value::Bytes(b)])
}

/// What each side sends that the other verifies (made once).
struct OwnerOutputs {
    prove: ProveOvHdr,
    to1d: SignedMsg,
    setup: SignedMsg,
    xa: Vec<u8>,
    eat_to1: Vec<u8>,
    eat_to2: Vec<u8>,
    csr: String,
}

/// One onboarding's public-key work on the server side: TO1 verify the device's EAT; TO2
/// verify the voucher (device certificate chain + entry signature), sign ProveOVHdr,
/// ECDH256 (key generation and agreement), verify the device's EAT, sign SetupDevice; the
/// CA: parse and verify the CSR, sign the certificate (as `Ca::issue_device`, without the
/// store).
fn owner_side(k: &FloorKit, o: &OwnerOutputs) -> usize {
    let guid = k.cred.guid;
    // TO1.ProveToRV
    let eat = Eat::decode(&o.eat_to1, "TO1").unwrap();
    let dk = k.voucher.device_public_key().unwrap().unwrap();
    eat.signed
        .verify(&dk.verifying_key().unwrap(), "TO1")
        .unwrap();
    // TO2.HelloDevice
    let chain = k.voucher.verify_for_guid(&guid).unwrap();
    let kex = KexParty::new(KexSuite::Ecdh256).unwrap();
    let nonce = Nonce::random().unwrap();
    let prove = ProveOvHdr::sign(
        &k.owner_key,
        prove_payload(k, kex.param().to_vec()),
        &nonce,
        &chain.owner_key,
    )
    .unwrap();
    // TO2.ProveDevice
    let eat = Eat::decode(&o.eat_to2, "TO2").unwrap();
    let dk = k.voucher.device_public_key().unwrap().unwrap();
    eat.signed
        .verify(&dk.verifying_key().unwrap(), "TO2")
        .unwrap();
    let xb = match &eat.fdo {
        Some(outpost::fdo_wire::cbor::Value::Array(a)) => match a.first() {
            Some(outpost::fdo_wire::cbor::Value::Bytes(b)) => b.clone(),
            _ => unreachable!(),
        },
        _ => unreachable!(),
    };
    let sek = kex.finish(&xb, true, CipherSuite::A128Gcm).unwrap();
    let setup = SignedMsg::sign(&k.owner_key, setup_payload(k), Default::default()).unwrap();
    // outpost:mqtt: the CA signs the CSR.
    let cert = ca_sign(k, &o.csr);
    prove.signed.raw.len() + setup.raw.len() + sek.len() + cert.len()
}

fn prove_payload(k: &FloorKit, xa: Vec<u8>) -> ProveOvHdrPayload {
    let hello = HelloDevice {
        max_device_message_size: 0,
        guid: k.cred.guid,
        nonce: Nonce::random().unwrap(),
        kex_suite: KexSuite::Ecdh256.name().into(),
        cipher_suite: CipherSuite::A128Gcm.id(),
        sig_info: SigInfo {
            sg_type: Curve::P256.cose_alg(),
            info: Vec::new(),
        },
    };
    ProveOvHdrPayload {
        header_bytes: k.voucher.header_bytes().to_vec(),
        header: k.voucher.header().clone(),
        num_entries: k.voucher.entries().len() as u8,
        hmac: k.voucher.hmac().clone(),
        nonce: hello.nonce,
        sig_info: hello.sig_info.clone(),
        xa,
        hello_device_hash: crypto::hash(Curve::P256.hash_alg(), &[&hello.encode()]).unwrap(),
        max_owner_message_size: 0,
    }
}

fn setup_payload(k: &FloorKit) -> Vec<u8> {
    SetupDevicePayload {
        rv_info: k.voucher.header().rv_info.clone(),
        guid: Guid::random().unwrap(),
        nonce: Nonce::random().unwrap(),
        owner2_key: k.owner_pub.clone(),
    }
    .encode()
}

/// `Ca::issue_device` with a CSR, minus the store: issuer from the CA certificate, CSR
/// parsed and its signature verified, certificate signed.
fn ca_sign(k: &FloorKit, csr: &str) -> Vec<u8> {
    use rcgen::{
        CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
        ExtendedKeyUsagePurpose, IsCa, Issuer, KeyUsagePurpose, SanType, SerialNumber,
    };
    let issuer = Issuer::from_ca_cert_der(&k.ca_der.clone().into(), &k.ca_key).unwrap();
    let id = Guid::random().unwrap().hex();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, id.clone());
    dn.push(DnType::OrganizationName, "Outpost device");
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(
        format!("urn:outpost:device:{id}").try_into().unwrap(),
    )];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let mut serial = crypto::random_bytes(16).unwrap();
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.use_authority_key_identifier_extension = true;
    let parsed = CertificateSigningRequestParams::from_pem(csr).unwrap();
    let req = CertificateSigningRequestParams {
        params,
        public_key: parsed.public_key,
    };
    req.signed_by(&issuer).unwrap().der().to_vec()
}

impl FloorKit {
    fn new(rig: &Rig, d: Device) -> FloorKit {
        let data = rig.dir.path();
        let ca_pem = std::fs::read_to_string(data.join(CA_CERT)).unwrap();
        FloorKit {
            owner_pub: rig.owner_key.public_key(),
            owner_key: rig.owner_key.clone(),
            mfg_pub: rig.mfg.public_key(),
            ca_key: rcgen::KeyPair::from_pem(&std::fs::read_to_string(data.join(CA_KEY)).unwrap())
                .unwrap(),
            ca_der: crypto::cert_der_from_pem(&ca_pem).unwrap(),
            cred: d.cred,
            voucher: d.voucher,
        }
    }

    /// Owner messages and device messages of one exchange, for the other side to verify.
    fn outputs(&self) -> OwnerOutputs {
        let c = &self.cred;
        let nonce = Nonce::random().unwrap();
        let owner_kex = KexParty::new(KexSuite::Ecdh256).unwrap();
        let dev_kex = KexParty::new(KexSuite::Ecdh256).unwrap();
        let prove = ProveOvHdr::sign(
            &self.owner_key,
            prove_payload(self, owner_kex.param().to_vec()),
            &nonce,
            &self.owner_pub,
        )
        .unwrap();
        let to1d = SignedMsg::sign(
            &self.owner_key,
            To1dPayload {
                addrs: vec![],
                to0d_hash: crypto::hash(Curve::P256.hash_alg(), &[b"to0d"]).unwrap(),
            }
            .encode(),
            Default::default(),
        )
        .unwrap();
        let setup =
            SignedMsg::sign(&self.owner_key, setup_payload(self), Default::default()).unwrap();
        let eat_to1 = Eat::sign(&c.device_key, &c.guid, &nonce, None, None).unwrap();
        let eat_to2 = Eat::sign(
            &c.device_key,
            &c.guid,
            &nonce,
            Some(cbor_array_bytes(dev_kex.param().to_vec())),
            Some(&nonce),
        )
        .unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, c.guid.hex());
        params.distinguished_name = dn;
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        OwnerOutputs {
            xa: owner_kex.param().to_vec(),
            prove,
            to1d,
            setup,
            eat_to1: eat_to1.signed.raw,
            eat_to2: eat_to2.signed.raw,
            csr,
        }
    }
}

/// CPU time of the calling thread, ns (not inflated by preemption on a shared machine).
fn thread_cpu_ns() -> u64 {
    // SAFETY: clock_gettime with a valid pointer to a zeroed timespec.
    unsafe {
        let mut t: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t);
        t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
    }
}

struct Floor {
    /// Thread CPU time per onboarding, µs.
    device_us: f64,
    owner_us: f64,
    /// The same in wall time on 1 thread (includes preemption by other processes).
    wall_us: f64,
    /// Onboardings/s: 1 thread doing both sides, scaled by 2; then measured on 2 threads.
    one_thread_x2: f64,
    two_threads: f64,
    owner_only_x2: f64,
}

fn floor(kit: &FloorKit, iters: usize) -> Floor {
    let outs = kit.outputs();
    // Warm-up.
    for _ in 0..10 {
        std::hint::black_box(device_side(kit, &outs) + owner_side(kit, &outs));
    }
    let wall = Instant::now();
    let t = thread_cpu_ns();
    for _ in 0..iters {
        std::hint::black_box(device_side(kit, &outs));
    }
    let device_us = (thread_cpu_ns() - t) as f64 / 1e3 / iters as f64;
    let t = thread_cpu_ns();
    for _ in 0..iters {
        std::hint::black_box(owner_side(kit, &outs));
    }
    let owner_us = (thread_cpu_ns() - t) as f64 / 1e3 / iters as f64;
    let wall_us = wall.elapsed().as_secs_f64() * 1e6 / iters as f64;
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for _ in 0..iters {
                    std::hint::black_box(device_side(kit, &outs) + owner_side(kit, &outs));
                }
            });
        }
    });
    let two_threads = (2 * iters) as f64 / t.elapsed().as_secs_f64();
    Floor {
        device_us,
        owner_us,
        wall_us,
        one_thread_x2: 2.0 * 1e6 / (device_us + owner_us),
        two_threads,
        owner_only_x2: 2.0 * 1e6 / owner_us,
    }
}

/// Single primitive costs, for the record (µs): P-256 sign, verify, ECDH.
fn primitives(kit: &FloorKit) -> (f64, f64, f64) {
    let n = 500;
    let key = &kit.cred.device_key;
    let msg = [7u8; 200];
    let us = |t: u64| (thread_cpu_ns() - t) as f64 / 1e3 / n as f64;
    let t = thread_cpu_ns();
    let mut sig = Vec::new();
    for _ in 0..n {
        sig = key.sign(&msg).unwrap();
    }
    let sign = us(t);
    let vk = key.public_key().verifying_key().unwrap();
    let t = thread_cpu_ns();
    for _ in 0..n {
        assert!(vk.verify(&msg, &sig));
    }
    let verify = us(t);
    let peer = KexParty::new(KexSuite::Ecdh256).unwrap();
    let t = thread_cpu_ns();
    for _ in 0..n {
        let k = KexParty::new(KexSuite::Ecdh256).unwrap();
        std::hint::black_box(k.finish(peer.param(), true, CipherSuite::A128Gcm).unwrap());
    }
    let ecdh = us(t);
    (sign, verify, ecdh)
}

// ------------------------------------------------------------------------------------------
// Anchor (c): the CA alone, and a bare store flush

fn ca_alone(rig: &Rig, n: usize) -> (f64, f64) {
    let csrs: Vec<String> = (0..n)
        .map(|i| {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut params = rcgen::CertificateParams::default();
            let mut dn = rcgen::DistinguishedName::new();
            dn.push(rcgen::DnType::CommonName, format!("ca-anchor-{i}"));
            params.distinguished_name = dn;
            params.serialize_request(&key).unwrap().pem().unwrap()
        })
        .collect();
    let t = Instant::now();
    rig.client_rt.block_on(async {
        for (i, csr) in csrs.into_iter().enumerate() {
            rig.ca
                .issue_device(&format!("ca-anchor-{i}"), Some(csr))
                .await
                .expect("CA issue");
        }
    });
    let ca_ms = t.elapsed().as_secs_f64() * 1000.0 / n as f64;
    let log = rig.store.log("bench-flush").unwrap();
    let t = Instant::now();
    for i in 0..n as u64 {
        log.append(i, &[vec![0u8; 300]]).unwrap();
        rig.store.flush().unwrap();
    }
    let flush_ms = t.elapsed().as_secs_f64() * 1000.0 / n as f64;
    (ca_ms, flush_ms)
}

// ------------------------------------------------------------------------------------------
// Main

type Done = (Guid, client::Onboarded);

fn onboard_job(
    devs: &[DeviceCredential],
) -> impl Fn(
    usize,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Done, String>> + Send>>
       + '_ {
    move |i| {
        let cred = copy(&devs[i]);
        Box::pin(async move {
            let opts = DeviceOptions {
                mqtt: true,
                ..Default::default()
            };
            client::onboard(&cred, &opts)
                .await
                .map(|o| (cred.guid, o))
                .map_err(|e| e.to_string())
        })
    }
}

fn copy(c: &DeviceCredential) -> DeviceCredential {
    DeviceCredential::decode(&c.encode()).expect("credential")
}

fn main() {
    if !run_by_cargo_bench() {
        return;
    }
    let p = Params::from_env();
    if let Ok(filter) = std::env::var("BENCH_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    let (nofile_before, nofile) = raise_nofile();
    print_title("Outpost FDO onboarding benchmark");
    println!(
        "machine: {}; {}",
        machine(),
        if cfg!(debug_assertions) {
            "NOT an optimized build"
        } else {
            "optimized build"
        }
    );
    println!(
        "params {p:?}; RLIMIT_NOFILE soft {nofile_before} -> {nofile}; ephemeral ports {}; somaxconn {}",
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join("-"),
        std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .unwrap_or_default()
            .trim()
    );
    let rig = Rig::start(&p);
    println!(
        "FDO server (rendezvous + owner): {} (listener bound like the gateway, tokio TcpListener::bind: backlog 128) and {} (same server, backlog {})",
        rig.ep, rig.ep_wide, p.backlog
    );
    if p.block_in_place {
        println!("BENCH_BLOCK_IN_PLACE=1: the owner backend's onboarded() runs under tokio::task::block_in_place");
    }

    // Devices: 2 x BENCH_SEQ for anchor (a), then BENCH_DEVICES per listener.
    let t = Instant::now();
    let mut devices = rig.make_devices(2 * p.seq + p.devices, &rig.ep);
    devices.extend(rig.make_devices(p.devices, &rig.ep_wide));
    let total = devices.len();
    println!(
        "made {total} P-256 devices + vouchers extended to the owner key in {:.2} s (2 threads)",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    rig.import(&devices);
    println!(
        "imported {total} vouchers (owner::import_voucher, one flush each) in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let vouchers: Vec<OwnershipVoucher> = devices.iter().map(|d| d.voucher.clone()).collect();
    let creds: Vec<DeviceCredential> = devices.iter().map(|d| copy(&d.cred)).collect();
    let floor_kit = FloorKit::new(&rig, devices.into_iter().next().unwrap());
    let (seq_v, rest) = vouchers.split_at(2 * p.seq);
    let (a_v, b_v) = rest.split_at(p.devices);
    let (seq_c, rest) = creds.split_at(2 * p.seq);
    let (a_c, b_c) = rest.split_at(p.devices);
    let (before, after) = seq_c.split_at(p.seq);
    let n = p.devices;

    let mut rows: Vec<Row> = Vec::new();
    println!();
    println!("TO0 (owner -> rendezvous over HTTP):");
    header();
    let (r, _) = sequential(&rig, "TO0, one at a time", seq_v.len(), |i| {
        rig.to0(&seq_v[i], &rig.ep)
    });
    r.print();
    rows.push(r);
    for (name, v, ep) in [
        (format!("TO0, {n} at once, backlog 128"), a_v, &rig.ep),
        (
            format!("TO0, {n} at once, backlog {}", p.backlog),
            b_v,
            &rig.ep_wide,
        ),
    ] {
        let (r, _) = concurrent(&rig, &p, &name, v.len(), |i| rig.to0(&v[i], ep));
        r.print();
        if let Some(c) = &r.cpu {
            println!("    {}", c.line());
        }
        rows.push(r);
    }

    // Anchors (b) and (c) while the server is idle.
    println!();
    let (sign, verify, ecdh) = primitives(&floor_kit);
    println!(
        "primitives (ring, 1 thread, thread CPU time): ECDSA P-256 sign {sign:.1} µs, verify {verify:.1} µs, ECDH256 keygen+agree+KDF {ecdh:.1} µs"
    );
    let fl = floor(&floor_kit, p.floor);
    println!(
        "(b) crypto floor per onboarding, 1 thread, thread CPU time: device side {:.0} µs, server side {:.0} µs (incl. the CA's CSR check + signing), total {:.0} µs ({:.0} µs wall)",
        fl.device_us,
        fl.owner_us,
        fl.device_us + fl.owner_us,
        fl.wall_us
    );
    println!(
        "    => upper bound, both sides on this machine: {:.0}/s (2 CPUs / CPU time per onboarding), {:.0}/s measured on 2 threads (wall, shared machine); server side alone: {:.0}/s",
        fl.one_thread_x2, fl.two_threads, fl.owner_only_x2
    );
    let (ca_ms, flush_ms) = ca_alone(&rig, p.ca);
    println!(
        "(c) CA alone (CaHandle::issue_device with a CSR, one at a time, incl. its store flush): {ca_ms:.2} ms each = {:.0}/s; bare store append + flush: {flush_ms:.2} ms",
        1000.0 / ca_ms
    );

    // Anchor (a), the concurrent runs, anchor (a) again.
    let _ = (
        rig.timings.voucher.take(),
        rig.timings.onboarded.take(),
        rig.timings.issue.take(),
    );
    println!();
    println!("Onboarding (TO1 + TO2, P-256, ECDH256, A128GCM, outpost:mqtt CSR -> CA):");
    header();
    let mut done: Vec<Done> = Vec::new();
    let mut runs: Vec<(Row, String)> = Vec::new();
    let timing_line = |rig: &Rig| {
        format!(
            "{}; {}; {}",
            rig.timings.voucher.line("owner backend voucher()"),
            rig.timings
                .onboarded
                .line("owner backend onboarded() (on the async worker)"),
            rig.timings.issue.line("CA issue (request to certificate)"),
        )
    };
    let (r, mut d) = sequential(
        &rig,
        "(a) one device at a time, before",
        before.len(),
        onboard_job(before),
    );
    r.print();
    done.append(&mut d);
    runs.push((r, timing_line(&rig)));
    for (name, c) in [
        (format!("{n} devices at once, backlog 128"), a_c),
        (format!("{n} devices at once, backlog {}", p.backlog), b_c),
    ] {
        let (r, mut d) = concurrent(&rig, &p, &name, c.len(), onboard_job(c));
        r.print();
        done.append(&mut d);
        runs.push((r, timing_line(&rig)));
    }
    let (r, mut d) = sequential(
        &rig,
        "(a) one device at a time, after",
        after.len(),
        onboard_job(after),
    );
    r.print();
    done.append(&mut d);
    runs.push((r, timing_line(&rig)));

    println!();
    println!("Where the time goes:");
    for (r, t) in &runs {
        println!("  {}:", r.name);
        if let Some(c) = &r.cpu {
            println!("    {}", c.line());
            if r.ok > 0 {
                println!(
                    "    per onboarding: server {:.0} µs CPU, CA thread {:.0} µs, sled threads {:.0} µs, devices {:.0} µs, whole process {:.0} µs",
                    c.server * 1e6 / r.ok as f64,
                    c.ca * 1e6 / r.ok as f64,
                    c.store * 1e6 / r.ok as f64,
                    c.client * 1e6 / r.ok as f64,
                    c.process * 1e6 / r.ok as f64
                );
            }
        }
        println!("    {t}");
    }
    rows.extend(runs.iter().map(|(r, _)| r.clone()));

    // Sanity (not timed).
    let reg = rig.backend.inner.registry().expect("registry");
    let old: HashSet<String> = reg.iter().map(|e| e.old_guid.clone()).collect();
    let ca_der = crypto::cert_der_from_pem(rig.ca.ca_pem()).expect("CA cert");
    let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).expect("CA cert");
    let mut serials = HashSet::new();
    let mut bad = 0;
    for (guid, o) in &done {
        let ok = (|| {
            let m = o.mqtt.as_ref()?;
            let der = crypto::cert_der_from_pem(&m.cert_pem).ok()?;
            let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
            cert.verify_signature(Some(ca_cert.public_key())).ok()?;
            let key = SigningKey::from_pem(&m.key_pem).ok()?;
            (crypto::cert_public_key(&der).ok()?.point() == key.public_point()).then_some(())?;
            serials.insert(cert.raw_serial().to_vec()).then_some(())?;
            old.contains(&guid.hex()).then_some(())
        })();
        if ok.is_none() {
            bad += 1;
        }
    }
    println!();
    println!(
        "check: registry holds {} entries for {} onboardings; {} certificates verify with the CA and carry their device's key, serials unique: {}; {} bad",
        reg.len(),
        done.len(),
        done.len() - bad,
        serials.len() == done.len() - bad,
        bad
    );

    // Summary.
    println!();
    println!("Summary (same run):");
    header();
    for r in &rows {
        r.print();
    }
    for (name, rate) in [
        ("(b) crypto floor, both sides, 2 CPUs", fl.one_thread_x2),
        (
            "(b) crypto floor, both sides, 2 threads wall",
            fl.two_threads,
        ),
        (
            "(b) crypto floor, server side only, 2 CPUs",
            fl.owner_only_x2,
        ),
        ("(c) CA alone, one at a time", 1000.0 / ca_ms),
    ] {
        println!("  {name:<44} {:>5} {:>5} {:>8} {rate:>8.1}", "", "", "");
    }
    let seq_before = &runs[0].0;
    for (r, _) in &runs[1..runs.len() - 1] {
        let Some(c) = r.cpu else { continue };
        let cpu_per = c.process / r.ok.max(1) as f64;
        println!(
            "  {}: {:.1}/s = {:.0}% of the crypto floor (2 CPUs), {:.0}% of the floor measured on 2 threads in this run, {:.1}x one device at a time; p50 {:.0} ms vs {:.1} ms unloaded",
            r.name,
            r.rate(),
            100.0 * r.rate() / fl.one_thread_x2,
            100.0 * r.rate() / fl.two_threads,
            r.rate() / seq_before.rate(),
            pct_ms(&r.lat, 50.0),
            pct_ms(&seq_before.lat, 50.0)
        );
        println!(
            "    this process had {:.0}% of the machine ({:.2} of {:.2} busy CPU-s); it spent {:.2} ms CPU per onboarding ({:.2} ms in the crypto floor): 2 idle CPUs would give at most {:.0}/s (derived, not measured)",
            100.0 * c.process / c.machine_busy.max(1e-9),
            c.process,
            c.machine_busy,
            cpu_per * 1e3,
            (fl.device_us + fl.owner_us) / 1e3,
            2.0 / cpu_per
        );
    }
    println!();
    println!("load avg at the end: {}", loadavg());
    assert_eq!(reg.len(), done.len(), "registry entries vs onboardings");
    assert_eq!(bad, 0, "bad certificates");
}
