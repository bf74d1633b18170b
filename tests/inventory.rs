//! The two inventory stores against the same tests: every test function runs once on the
//! embedded store (`embedded_*`, a temporary `store.rs` directory) and once on PostgreSQL
//! (`postgres_*`, a fresh database in this binary's throw-away cluster: tests/common/pg.rs).
//! Queries are checked against the reference semantics, `Query::matches` and
//! `Query::compare` over the same records in memory.

mod common;

use common::pg;
use outpost::credentials::inventory::{Inventory, InventoryError, InventoryStore};
use outpost::credentials::model::{
    Credential, Event, Job, JobState, Kind, OpState, Operation, Query, SortKey, Validity,
};
use outpost::store::Store;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const NOW: i64 = 1_700_000_000;
const DAY: i64 = 86_400;
const EXPIRING: i64 = 30 * DAY;

#[derive(Clone, Copy, Debug)]
enum Backend {
    Embedded,
    Postgres,
}

struct Fixture {
    inv: Inventory,
    store: Store,
    dir: tempfile::TempDir,
    /// The PostgreSQL database's name.
    db: Option<String>,
}

async fn fixture(b: Backend) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let (url, db) = match b {
        Backend::Embedded => (String::new(), None),
        Backend::Postgres => {
            let c = pg::shared();
            let db = c.fresh_db();
            (c.url(&db), Some(db))
        }
    };
    let inv = Inventory::open(&url, &store).await.unwrap();
    match (b, &inv) {
        (Backend::Embedded, Inventory::Embedded(_))
        | (Backend::Postgres, Inventory::Postgres(_)) => {}
        _ => panic!("Inventory::open chose the wrong store for {b:?}"),
    }
    Fixture {
        inv,
        store,
        dir,
        db,
    }
}

/// `embedded_<name>` and `postgres_<name>` running `name(Backend)`.
macro_rules! both {
    ($name:ident, $emb:ident, $pg:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $emb() {
            $name(Backend::Embedded).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $pg() {
            $name(Backend::Postgres).await
        }
    };
}

fn full_record(id: &str) -> Credential {
    let mut c = Credential::new(
        id.into(),
        Kind::Certificate,
        "0a1b2c".into(),
        "dev-Full".into(),
        NOW - 5,
    );
    c.vehicle = Some("VIN-ÄÖ-1".into());
    c.ecu = Some("ecu-brake".into());
    c.server = "cloud".into();
    c.issuer = "Outpost CA".into();
    c.fingerprint = Some("ab".repeat(32));
    c.not_before = Some(NOW - DAY);
    c.not_after = Some(NOW + 400 * DAY);
    c.revoked_at = Some(NOW - 1);
    c.op_state = OpState::InvalidationPending;
    c.op_date = NOW - 2;
    c.last_seen = Some(NOW - 3);
    c.seen_by = vec!["dev-other".into(), "dev-third".into()];
    c.audit = vec!["shared".into()];
    c.pem = Some("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into());
    c.replaced_by = Some("cert:0a1b2d".into());
    c.replaces = Some("cert:0a1b2b".into());
    c.history = vec![
        Event {
            at: NOW - 5,
            what: "issued".into(),
            by: "ca".into(),
            detail: "quote \" and 'apostrophe' and \\ and 💡".into(),
        },
        Event {
            at: i64::MIN,
            what: "audit".into(),
            by: "policy".into(),
            detail: String::new(),
        },
    ];
    c
}

async fn round_trip(b: Backend) {
    let f = fixture(b).await;
    let c = full_record("cert:0a1b2c");
    f.inv.put(std::slice::from_ref(&c)).await.unwrap();
    assert_eq!(f.inv.get(&c.id).await.unwrap(), Some(c.clone()));
    assert_eq!(f.inv.get("cert:nope").await.unwrap(), None);
    assert_eq!(f.inv.count().await.unwrap(), 1);

    // Every optional field empty too.
    let bare = Credential::new(
        "token:h:n".into(),
        Kind::Token,
        String::new(),
        "h".into(),
        0,
    );
    f.inv.put(std::slice::from_ref(&bare)).await.unwrap();
    assert_eq!(f.inv.get(&bare.id).await.unwrap(), Some(bare));

    // Replace: every index follows.
    let mut r = c.clone();
    r.holder = "dev-new".into();
    r.serial = "ff".into();
    r.vehicle = None;
    r.ecu = Some("ecu-gw".into());
    r.revoked_at = None;
    r.history.clear();
    f.inv.put(std::slice::from_ref(&r)).await.unwrap();
    assert_eq!(f.inv.get(&c.id).await.unwrap(), Some(r.clone()));
    assert_eq!(f.inv.count().await.unwrap(), 2);
    assert!(f.inv.by_holder("dev-Full").await.unwrap().is_empty());
    assert_eq!(f.inv.by_holder("dev-new").await.unwrap(), vec![r.clone()]);
    assert!(f.inv.by_serial("0a1b2c").await.unwrap().is_empty());
    assert_eq!(f.inv.by_serial("ff").await.unwrap(), vec![r.clone()]);
    assert!(f.inv.by_vehicle("VIN-ÄÖ-1").await.unwrap().is_empty());
    assert!(f.inv.by_ecu("ecu-brake").await.unwrap().is_empty());
    assert_eq!(f.inv.by_ecu("ecu-gw").await.unwrap(), vec![r.clone()]);

    // The last of one id in one put wins.
    let mut a = r.clone();
    a.holder = "first".into();
    let mut z = r.clone();
    z.holder = "second".into();
    f.inv.put(&[a, z.clone()]).await.unwrap();
    assert_eq!(f.inv.get(&r.id).await.unwrap(), Some(z));
    assert!(f.inv.by_holder("first").await.unwrap().is_empty());

    // Keys that cannot be stored are refused, not stored halfway.
    let mut bad = Credential::new("bad\0id".into(), Kind::Token, "s".into(), "h".into(), 0);
    assert!(matches!(
        f.inv.put(std::slice::from_ref(&bad)).await,
        Err(InventoryError::Invalid(_))
    ));
    bad.id = String::new();
    assert!(matches!(
        f.inv.put(&[bad]).await,
        Err(InventoryError::Invalid(_))
    ));
    assert_eq!(f.inv.count().await.unwrap(), 2);
}
both!(round_trip, embedded_round_trip, postgres_round_trip);

fn simple(id: &str, kind: Kind, serial: &str, holder: &str) -> Credential {
    Credential::new(id.into(), kind, serial.into(), holder.into(), NOW)
}

fn ids(v: &[Credential]) -> Vec<&str> {
    v.iter().map(|c| c.id.as_str()).collect()
}

async fn lookups(b: Backend) {
    let f = fixture(b).await;
    let mut a = simple("cert:01", Kind::Certificate, "01", "dev");
    a.vehicle = Some("VIN1".into());
    a.ecu = Some("brake".into());
    let mut b1 = simple("foreign:x:01", Kind::ForeignCertificate, "01", "dev1");
    b1.vehicle = Some("VIN1".into());
    b1.ecu = Some("gw".into());
    let mut c = simple("key:dev:k1", Kind::SymmetricKey, "k1", "dev");
    c.vehicle = Some("VIN2".into());
    c.ecu = Some("brake".into());
    let d = simple("password:dev-2:p", Kind::Password, "p", "dev-2");
    f.inv
        .put(&[a.clone(), b1.clone(), c.clone(), d.clone()])
        .await
        .unwrap();
    assert_eq!(
        ids(&f.inv.by_holder("dev").await.unwrap()),
        ["cert:01", "key:dev:k1"]
    );
    assert_eq!(
        ids(&f.inv.by_holder("dev1").await.unwrap()),
        ["foreign:x:01"]
    );
    assert!(f.inv.by_holder("de").await.unwrap().is_empty());
    assert_eq!(
        ids(&f.inv.by_serial("01").await.unwrap()),
        ["cert:01", "foreign:x:01"]
    );
    assert_eq!(
        ids(&f.inv.by_vehicle("VIN1").await.unwrap()),
        ["cert:01", "foreign:x:01"]
    );
    assert_eq!(
        ids(&f.inv.by_vehicle("VIN2").await.unwrap()),
        ["key:dev:k1"]
    );
    assert!(f.inv.by_vehicle("VIN").await.unwrap().is_empty());
    assert_eq!(
        ids(&f.inv.by_ecu("brake").await.unwrap()),
        ["cert:01", "key:dev:k1"]
    );
    assert_eq!(ids(&f.inv.by_ecu("gw").await.unwrap()), ["foreign:x:01"]);
    assert!(f.inv.by_ecu("nothing").await.unwrap().is_empty());

    // The renewal sweep: our CA's certificates, not final, ending by `until`, soonest first.
    let mut sweep = Vec::new();
    for (i, (na, state, kind)) in [
        (Some(NOW + 10), OpState::Issued, Kind::Certificate),
        (Some(NOW + 5), OpState::RenewalPending, Kind::Certificate),
        (Some(NOW + 5), OpState::Failed, Kind::Certificate),
        (Some(NOW - 50), OpState::Issued, Kind::Certificate),
        (Some(NOW + 1), OpState::Renewed, Kind::Certificate),
        (Some(NOW + 1), OpState::Issued, Kind::ForeignCertificate),
        (None, OpState::Issued, Kind::Certificate),
        (Some(NOW + 1000), OpState::Issued, Kind::Certificate),
    ]
    .into_iter()
    .enumerate()
    {
        let mut c = simple(&format!("cert:s{i}"), kind, &format!("s{i}"), "sweeper");
        c.not_after = na;
        c.op_state = state;
        sweep.push(c);
    }
    f.inv.put(&sweep).await.unwrap();
    assert_eq!(
        ids(&f.inv.ending_before(NOW + 10, 100).await.unwrap()),
        ["cert:s3", "cert:s1", "cert:s2", "cert:s0"]
    );
    assert_eq!(
        ids(&f.inv.ending_before(NOW + 10, 2).await.unwrap()),
        ["cert:s3", "cert:s1"]
    );
    assert!(f.inv.ending_before(NOW - 51, 10).await.unwrap().is_empty());
    // A renewal that finishes leaves the sweep.
    let mut done = sweep[3].clone();
    done.op_state = OpState::Renewed;
    f.inv.put(&[done]).await.unwrap();
    assert_eq!(
        ids(&f.inv.ending_before(NOW + 10, 100).await.unwrap()),
        ["cert:s1", "cert:s2", "cert:s0"]
    );
}
both!(lookups, embedded_lookups, postgres_lookups);

/// Records with NULLs, ties, every kind and state, revoked, expired, future, expiring,
/// mixed case, LIKE's special characters and non-ASCII text.
fn generate(n: usize, seed: u64) -> Vec<Credential> {
    let mut rng = StdRng::seed_from_u64(seed);
    let pick = |rng: &mut StdRng, xs: &[&str]| xs[rng.gen_range(0..xs.len())].to_string();
    let time = |rng: &mut StdRng| -> Option<i64> {
        if rng.gen_bool(0.15) {
            None
        } else {
            // A small domain: many ties; around now and the expiring window.
            Some(NOW + rng.gen_range(-6..=6) * 10 * DAY + rng.gen_range(0..3))
        }
    };
    (0..n)
        .map(|i| {
            let kind = Kind::ALL[rng.gen_range(0..Kind::ALL.len())];
            let serial = format!("{:04x}", rng.gen_range(0..(n as u32)));
            let holder = pick(
                &mut rng,
                &[
                    "dev-A1",
                    "dev-a1",
                    "Dev-B2",
                    "dev_c3",
                    "dev%d4",
                    "gw-Ölberg",
                    "dev-e5",
                ],
            );
            let id = format!("{}:{holder}:{i:05}", kind.as_str());
            let mut c = Credential::new(id, kind, serial, holder, NOW - rng.gen_range(0..5));
            c.vehicle = rng
                .gen_bool(0.7)
                .then(|| pick(&mut rng, &["VIN1", "VIN2", "vin3", "WVWZZZ1JZ"]));
            c.ecu = rng
                .gen_bool(0.6)
                .then(|| pick(&mut rng, &["brake", "Gateway", "ecu_1", "ecu%1"]));
            c.server = pick(&mut rng, &["gateway", "cloud", "ota", "Ota"]);
            c.not_before = time(&mut rng).map(|t| t - 200 * DAY * i64::from(rng.gen_bool(0.8)));
            c.not_after = time(&mut rng);
            c.revoked_at = rng.gen_bool(0.1).then_some(NOW - DAY);
            c.op_state = OpState::ALL[rng.gen_range(0..OpState::ALL.len())];
            c.last_seen = time(&mut rng);
            if rng.gen_bool(0.2) {
                c.audit.push("shared".into());
            }
            c.pem = rng.gen_bool(0.3).then(|| format!("PEM {i}"));
            c
        })
        .collect()
}

fn reference(data: &[Credential], q: &Query) -> (Vec<String>, u64) {
    let mut hits: Vec<&Credential> = data
        .iter()
        .filter(|c| q.matches(c, NOW, EXPIRING))
        .collect();
    hits.sort_by(|a, b| q.compare(a, b));
    let total = hits.len() as u64;
    let page = hits
        .into_iter()
        .skip(q.offset as usize)
        .take(q.limit as usize)
        .map(|c| c.id.clone())
        .collect();
    (page, total)
}

async fn check(inv: &Inventory, data: &[Credential], q: &Query) {
    let page = inv.query(q, NOW, EXPIRING).await.unwrap();
    let (want, total) = reference(data, q);
    let got: Vec<String> = page.rows.iter().map(|c| c.id.clone()).collect();
    assert_eq!(got, want, "{q:?}");
    assert_eq!((page.total, page.exact), (total, true), "{q:?}");
    // The page's rows are the full records.
    for r in &page.rows {
        assert_eq!(Some(r), data.iter().find(|c| c.id == r.id));
    }
}

fn queries(seed: u64, n: usize) -> Vec<Query> {
    let mut out = Vec::new();
    // Every sort key both ways, on everything.
    for sort in SortKey::ALL {
        for desc in [false, true] {
            out.push(Query {
                sort,
                desc,
                limit: 40,
                ..Query::default()
            });
        }
    }
    // Every filter on its own.
    let one = |f: &dyn Fn(&mut Query)| {
        let mut q = Query {
            limit: 500,
            ..Query::default()
        };
        f(&mut q);
        q
    };
    for k in Kind::ALL {
        out.push(one(&|q| q.kind = Some(k)));
    }
    for s in OpState::ALL {
        out.push(one(&|q| q.op_state = Some(s)));
    }
    for v in Validity::ALL {
        out.push(one(&|q| q.validity = Some(v)));
    }
    for s in ["gateway", "Ota", "none"] {
        out.push(one(&|q| q.server = Some(s.into())));
    }
    for h in ["dev-A1", "dev-a1", "gw-Ölberg", "dev"] {
        out.push(one(&|q| q.holder = Some(h.into())));
    }
    for v in ["VIN1", "vin3", "VIN"] {
        out.push(one(&|q| q.vehicle = Some(v.into())));
    }
    for e in ["brake", "ecu%1"] {
        out.push(one(&|q| q.ecu = Some(e.into())));
    }
    for w in [0, DAY, 30 * DAY, 45 * DAY] {
        out.push(one(&|q| q.expiring_within = Some(w)));
    }
    out.push(one(&|q| q.audit = true));
    for s in [
        "dev-a", "DEV", "%", "_", "d4", "ölb", "ÖLB", "vin", "Brake", "0", "", "zz-none", ":",
    ] {
        out.push(one(&|q| q.search = Some(s.into())));
    }
    // Random combinations, sorts, offsets.
    let mut rng = StdRng::seed_from_u64(seed);
    for _ in 0..n {
        let mut q = Query {
            sort: SortKey::ALL[rng.gen_range(0..SortKey::ALL.len())],
            desc: rng.gen_bool(0.5),
            offset: rng.gen_range(0..60),
            limit: rng.gen_range(1..80),
            ..Query::default()
        };
        if rng.gen_bool(0.3) {
            q.kind = Some(Kind::ALL[rng.gen_range(0..Kind::ALL.len())]);
        }
        if rng.gen_bool(0.2) {
            q.op_state = Some(OpState::ALL[rng.gen_range(0..OpState::ALL.len())]);
        }
        if rng.gen_bool(0.3) {
            q.validity = Some(Validity::ALL[rng.gen_range(0..Validity::ALL.len())]);
        }
        if rng.gen_bool(0.2) {
            q.vehicle = Some(["VIN1", "VIN2", "vin3"][rng.gen_range(0..3)].into());
        }
        if rng.gen_bool(0.2) {
            q.server = Some(["gateway", "cloud", "ota"][rng.gen_range(0..3)].into());
        }
        if rng.gen_bool(0.2) {
            q.expiring_within = Some(rng.gen_range(0..60) * DAY);
        }
        if rng.gen_bool(0.3) {
            q.search =
                Some(["dev-", "a1", "B2", "_c", "%", "gate", "ö"][rng.gen_range(0..7)].into());
        }
        q.audit = rng.gen_bool(0.1);
        out.push(q);
    }
    out
}

async fn queries_agree_with_the_reference(b: Backend) {
    let f = fixture(b).await;
    let data = generate(400, 7);
    // In several puts, some records replaced by changed versions.
    f.inv.put(&data[..150]).await.unwrap();
    f.inv.put(&data[150..]).await.unwrap();
    let mut data = data;
    let mut rng = StdRng::seed_from_u64(99);
    let changed: Vec<Credential> = generate(400, 8)
        .into_iter()
        .enumerate()
        .filter(|_| rng.gen_bool(0.2))
        .map(|(i, mut c)| {
            c.id = data[i].id.clone();
            data[i] = c.clone();
            c
        })
        .collect();
    assert!(changed.len() > 40);
    f.inv.put(&changed).await.unwrap();
    assert_eq!(f.inv.count().await.unwrap(), 400);
    // The data has what the test means to exercise.
    for v in Validity::ALL {
        assert!(
            data.iter()
                .filter(|c| c.validity(NOW, EXPIRING) == v)
                .count()
                >= 5,
            "too few {v:?}"
        );
    }
    for q in queries(11, 250) {
        check(&f.inv, &data, &q).await;
    }
    // Other clocks and warning windows, including the saturating edges.
    for (now, exp) in [
        (NOW - 40 * DAY, DAY),
        (NOW, 0),
        (NOW, i64::MAX),
        (NOW, -DAY),
    ] {
        for v in Validity::ALL {
            let q = Query {
                validity: Some(v),
                limit: 500,
                ..Query::default()
            };
            let page = f.inv.query(&q, now, exp).await.unwrap();
            let want: Vec<&str> = {
                let mut h: Vec<&Credential> =
                    data.iter().filter(|c| q.matches(c, now, exp)).collect();
                h.sort_by(|a, b| q.compare(a, b));
                h.iter().map(|c| c.id.as_str()).collect()
            };
            assert_eq!(ids(&page.rows), want, "{v:?} at {now} / {exp}");
        }
    }
    // A bad query is refused.
    let bad = Query {
        limit: 0,
        ..Query::default()
    };
    assert!(matches!(
        f.inv.query(&bad, NOW, EXPIRING).await,
        Err(InventoryError::Invalid(_))
    ));
}
both!(
    queries_agree_with_the_reference,
    embedded_queries_agree_with_the_reference,
    postgres_queries_agree_with_the_reference
);

async fn paging(b: Backend) {
    let f = fixture(b).await;
    let data = generate(300, 21);
    f.inv.put(&data).await.unwrap();
    for (sort, desc, filter) in [
        (SortKey::NotAfter, false, None),
        (SortKey::Holder, true, None),
        (SortKey::Vehicle, false, Some(Validity::Valid)),
        (SortKey::LastSeen, true, None),
        (SortKey::Id, true, Some(Validity::Expired)),
    ] {
        let base = Query {
            sort,
            desc,
            validity: filter,
            limit: 500,
            ..Query::default()
        };
        let (all, _) = reference(&data, &base);
        let mut walked = Vec::new();
        let mut offset = 0;
        loop {
            let q = Query {
                offset,
                limit: 7,
                ..base.clone()
            };
            let page = f.inv.query(&q, NOW, EXPIRING).await.unwrap();
            assert_eq!(page.total, all.len() as u64);
            if page.rows.is_empty() {
                break;
            }
            assert!(page.rows.len() <= 7);
            walked.extend(page.rows.into_iter().map(|c| c.id));
            offset += 7;
        }
        assert_eq!(walked, all, "{sort:?} desc={desc}");
        let unique: std::collections::HashSet<_> = walked.iter().collect();
        assert_eq!(unique.len(), walked.len());
        // Past the end: empty, with the count.
        let q = Query {
            offset: 10_000,
            ..base.clone()
        };
        let page = f.inv.query(&q, NOW, EXPIRING).await.unwrap();
        assert!(page.rows.is_empty());
        assert_eq!(page.total, all.len() as u64);
    }
}
both!(paging, embedded_paging, postgres_paging);

async fn the_count_stops_at_the_cap(b: Backend) {
    let f = fixture(b).await;
    let data = generate(120, 5);
    f.inv.put(&data).await.unwrap();
    f.inv.set_count_cap(50);
    let q = Query {
        limit: 10,
        ..Query::default()
    };
    let page = f.inv.query(&q, NOW, EXPIRING).await.unwrap();
    assert_eq!((page.total, page.exact), (50, false));
    assert_eq!(ids(&page.rows), reference(&data, &q).0);
    // Below and at the cap: exact.
    let few = Query {
        kind: Some(Kind::Token),
        ..q.clone()
    };
    let n = data.iter().filter(|c| c.kind == Kind::Token).count() as u64;
    assert!(n < 50);
    let page = f.inv.query(&few, NOW, EXPIRING).await.unwrap();
    assert_eq!((page.total, page.exact), (n, true));
    f.inv.set_count_cap(n);
    let page = f.inv.query(&few, NOW, EXPIRING).await.unwrap();
    assert_eq!((page.total, page.exact), (n, true));
    f.inv.set_count_cap(n - 1);
    let page = f.inv.query(&few, NOW, EXPIRING).await.unwrap();
    assert_eq!((page.total, page.exact), (n - 1, false));
    // A deep page past the cap still comes back.
    f.inv.set_count_cap(50);
    let deep = Query {
        offset: 100,
        limit: 20,
        ..Query::default()
    };
    let page = f.inv.query(&deep, NOW, EXPIRING).await.unwrap();
    assert_eq!(ids(&page.rows), reference(&data, &deep).0);
    assert_eq!(page.rows.len(), 20);
}
both!(
    the_count_stops_at_the_cap,
    embedded_the_count_stops_at_the_cap,
    postgres_the_count_stops_at_the_cap
);

fn job(id: &str, cred: &str, device: &str, state: JobState, created: i64) -> Job {
    Job {
        id: id.into(),
        credential: cred.into(),
        op: Operation::Renew,
        device: device.into(),
        state,
        attempts: 2,
        created_at: created,
        updated_at: created + 1,
        next_attempt_at: created + 60,
        deadline: created + DAY,
        by: "admin:alice".into(),
        reason: "rotation \"policy\"".into(),
        result: Some("serial 0b".into()),
        gateway: None,
    }
}

fn job_ids(v: &[Job]) -> Vec<&str> {
    v.iter().map(|j| j.id.as_str()).collect()
}

async fn jobs(b: Backend) {
    let f = fixture(b).await;
    let mut c1 = simple("cert:c1", Kind::Certificate, "c1", "dev-1");
    c1.op_state = OpState::RenewalPending;
    let c2 = simple("cert:c2", Kind::Certificate, "c2", "dev-1");
    let js = vec![
        job("j1", "cert:c1", "dev-1", JobState::Queued, 100),
        job("j2", "cert:c1", "dev-1", JobState::Succeeded, 300),
        job("j3", "cert:c2", "dev-1", JobState::InProgress, 200),
        job("j4", "cert:c2", "dev-2", JobState::Delivered, 50),
        job("j5", "cert:c2", "dev-1", JobState::Failed, 200),
        job("j0", "cert:c2", "dev-10", JobState::Queued, 100),
    ];
    f.inv
        .put_jobs(&js, &[c1.clone(), c2.clone()])
        .await
        .unwrap();
    // The jobs and the credentials came in the same write.
    assert_eq!(f.inv.get("cert:c1").await.unwrap(), Some(c1.clone()));
    for j in &js {
        assert_eq!(f.inv.job(&j.id).await.unwrap().as_ref(), Some(j));
    }
    assert_eq!(f.inv.job("nope").await.unwrap(), None);
    // Newest first (ties by id).
    assert_eq!(
        job_ids(&f.inv.jobs_for_device("dev-1", false).await.unwrap()),
        ["j2", "j3", "j5", "j1"]
    );
    assert_eq!(
        job_ids(&f.inv.jobs_for_device("dev-1", true).await.unwrap()),
        ["j3", "j1"]
    );
    assert!(f
        .inv
        .jobs_for_device("dev", false)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        job_ids(&f.inv.jobs_for_credential("cert:c2").await.unwrap()),
        ["j3", "j5", "j0", "j4"]
    );
    // Oldest first, bounded.
    assert_eq!(
        job_ids(&f.inv.open_jobs(100).await.unwrap()),
        ["j4", "j0", "j1", "j3"]
    );
    assert_eq!(job_ids(&f.inv.open_jobs(2).await.unwrap()), ["j4", "j0"]);
    // A job that ends leaves the open set, with its credential's new state, together.
    let mut j1 = js[0].clone();
    j1.state = JobState::Succeeded;
    let mut c1done = c1.clone();
    c1done.op_state = OpState::Renewed;
    f.inv
        .put_jobs(&[j1.clone()], &[c1done.clone()])
        .await
        .unwrap();
    assert_eq!(f.inv.job("j1").await.unwrap(), Some(j1));
    assert_eq!(f.inv.get("cert:c1").await.unwrap(), Some(c1done));
    assert_eq!(
        job_ids(&f.inv.open_jobs(100).await.unwrap()),
        ["j4", "j0", "j3"]
    );
    assert_eq!(
        job_ids(&f.inv.jobs_for_device("dev-1", true).await.unwrap()),
        ["j3"]
    );
    // A job moved to another device and credential leaves the old lookups.
    let mut j3 = js[2].clone();
    j3.device = "dev-3".into();
    j3.credential = "cert:c1".into();
    f.inv.put_jobs(&[j3], &[]).await.unwrap();
    assert_eq!(
        job_ids(&f.inv.jobs_for_device("dev-1", false).await.unwrap()),
        ["j2", "j5", "j1"]
    );
    assert_eq!(
        job_ids(&f.inv.jobs_for_credential("cert:c1").await.unwrap()),
        ["j2", "j3", "j1"]
    );
    // One bad part refuses the whole write: neither the job nor the credential is stored.
    let mut c3 = simple("cert:c3", Kind::Certificate, "c3", "dev-1");
    c3.op_state = OpState::RenewalPending;
    let bad = job("", "cert:c3", "dev-1", JobState::Queued, 500);
    assert!(f
        .inv
        .put_jobs(
            &[job("j9", "cert:c3", "dev-1", JobState::Queued, 500), bad],
            &[c3]
        )
        .await
        .is_err());
    assert_eq!(f.inv.get("cert:c3").await.unwrap(), None);
    assert_eq!(f.inv.job("j9").await.unwrap(), None);
}
both!(jobs, embedded_jobs, postgres_jobs);

/// Corrupt stored records are errors naming the record, not panics.
async fn corrupt_records(b: Backend) {
    let f = fixture(b).await;
    let good = generate(20, 3);
    f.inv.put(&good).await.unwrap();
    let victim = &good[4];
    match b {
        Backend::Embedded => {
            let t = f.store.table("inventory").unwrap();
            let mut k = b"c\0".to_vec();
            k.extend_from_slice(victim.id.as_bytes());
            t.put(&k, b"{\"id\": 5, not json").unwrap();
        }
        Backend::Postgres => {
            let db = f.db.as_deref().unwrap();
            pg::shared()
                .psql(
                    db,
                    &format!(
                        "UPDATE credentials SET record = '{{\"id\": 5}}' WHERE id = '{}'",
                        victim.id
                    ),
                )
                .unwrap();
        }
    }
    match f.inv.get(&victim.id).await {
        Err(InventoryError::Corrupt { key, .. }) => assert!(key.contains(&victim.id), "{key}"),
        other => panic!("{other:?}"),
    }
    match f.inv.by_holder(&victim.holder).await {
        Err(InventoryError::Corrupt { .. }) => {}
        other => panic!("{other:?}"),
    }
    let all = Query {
        sort: SortKey::Id,
        limit: 500,
        ..Query::default()
    };
    assert!(matches!(
        f.inv.query(&all, NOW, EXPIRING).await,
        Err(InventoryError::Corrupt { .. })
    ));
    // The others still read.
    assert_eq!(
        f.inv.get(&good[5].id).await.unwrap().as_ref(),
        Some(&good[5])
    );
    if let Backend::Embedded = b {
        // Reopening finds the corrupt record while rebuilding its index: refused, named.
        let Fixture {
            inv, store, dir, ..
        } = f;
        drop(inv);
        match Inventory::open("", &store).await {
            Err(InventoryError::Corrupt { key, .. }) => assert!(key.contains(&victim.id)),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("opened over a corrupt record"),
        }
        drop(dir);
    }
}
both!(
    corrupt_records,
    embedded_corrupt_records,
    postgres_corrupt_records
);

/// What resolved is there after a reopen (the embedded store rebuilds its query index from
/// the records; PostgreSQL's is a fresh connection pool on the same database).
async fn survives_reopen(b: Backend) {
    let f = fixture(b).await;
    let data = generate(200, 13);
    f.inv.put(&data).await.unwrap();
    f.inv
        .put_jobs(
            &[job("j1", &data[0].id, "dev-A1", JobState::Queued, 10)],
            &[],
        )
        .await
        .unwrap();
    let Fixture {
        inv,
        store,
        dir,
        db,
    } = f;
    drop(inv);
    let inv = match b {
        Backend::Embedded => {
            drop(store);
            let store = Store::open(&dir.path().join("store")).unwrap();
            Inventory::open("", &store).await.unwrap()
        }
        Backend::Postgres => {
            let url = pg::shared().url(db.as_deref().unwrap());
            Inventory::open(&url, &store).await.unwrap()
        }
    };
    assert_eq!(inv.count().await.unwrap(), 200);
    for c in data.iter().step_by(17) {
        assert_eq!(inv.get(&c.id).await.unwrap().as_ref(), Some(c));
    }
    let mut want: Vec<&Credential> = data.iter().filter(|c| c.holder == "dev-a1").collect();
    want.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(
        ids(&inv.by_holder("dev-a1").await.unwrap()),
        want.iter().map(|c| c.id.as_str()).collect::<Vec<_>>()
    );
    for q in queries(3, 40) {
        check(&inv, &data, &q).await;
    }
    assert_eq!(job_ids(&inv.open_jobs(10).await.unwrap()), ["j1"]);
}
both!(
    survives_reopen,
    embedded_survives_reopen,
    postgres_survives_reopen
);

/// Concurrent writers and readers: nothing lost, the indexes agree with the records.
async fn concurrent_writes(b: Backend) {
    let f = fixture(b).await;
    let data = generate(160, 17);
    let mut tasks = Vec::new();
    for chunk in data.chunks(10) {
        let inv = f.inv.clone();
        let chunk = chunk.to_vec();
        tasks.push(tokio::spawn(async move {
            for c in chunk {
                inv.put(std::slice::from_ref(&c)).await.unwrap();
                assert_eq!(inv.get(&c.id).await.unwrap(), Some(c));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(f.inv.count().await.unwrap(), 160);
    for q in queries(5, 20) {
        check(&f.inv, &data, &q).await;
    }
}
both!(
    concurrent_writes,
    embedded_concurrent_writes,
    postgres_concurrent_writes
);
