//! The PostgreSQL inventory (`[cloud] database_url`): `credentials` and `credential_jobs`,
//! each row the full record as JSONB plus the columns the lookups, filters and sorts use.
//!
//! * The schema is made on open when missing (`outpost_inventory_schema` holds its
//!   version; several instances opening at once serialise on an advisory lock).
//! * Every text column is `COLLATE "C"`, so ORDER BY is byte order like Rust's `str` order,
//!   and every sort column has an index `(column NULLS FIRST, id)`, which serves the
//!   ascending order (`None` first) forwards and the descending one (`None` last, ties by id
//!   descending: [`Query::compare`] reverses the whole ordering) backwards.
//! * The search is a `LIKE` over `search`: the six searched fields lower-cased in Rust
//!   (the same `to_lowercase` [`Query::matches`] uses) joined by U+0001, which a search
//!   (no control characters: [`Query::validate`]) cannot contain, so a match never spans two
//!   fields. With `pg_trgm` installed (tried on open) a trigram GIN index serves it.
//! * Validity is computed in SQL from the dates exactly as `model::validity_of` does: the
//!   "expiring" threshold on `not_after` (with `validity_of`'s saturating arithmetic) is
//!   found in Rust and passed as a parameter.
//! * A small pool of connections ([`POOL_SIZE`]), each used by one caller at a time; a
//!   closed connection is dropped and the call retried once on a new one.
//!
//! Every statement is parameterised; the only text spliced into SQL is fixed (the column
//! of a [`SortKey`], the clauses of the filters present).

use super::embedded::{check_job_keys, check_keys};
use super::InventoryError;
use crate::credentials::model::{
    Credential, Job, OpState, Page, Query, SortKey, Validity, COUNT_CAP,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};

/// Connections kept open to the database.
pub const POOL_SIZE: usize = 4;
/// The schema this build makes and reads.
pub const SCHEMA_VERSION: i32 = 1;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Rows per statement when many credentials are put at once.
const PUT_CHUNK: usize = 5000;

/// The inventory in PostgreSQL.
#[derive(Clone)]
pub struct PgInventory {
    inner: Arc<PgInner>,
}

struct PgInner {
    pool: Pool,
    count_cap: AtomicU64,
    trigram: bool,
}

fn pg_err(e: tokio_postgres::Error) -> InventoryError {
    match e.as_db_error() {
        Some(db) => InventoryError::Postgres(format!("{}: {}", db.code().code(), db.message())),
        None => InventoryError::Postgres(e.to_string()),
    }
}

/// A few connections, each lent to one caller at a time.
struct Pool {
    config: tokio_postgres::Config,
    idle: Mutex<Vec<Client>>,
    permits: tokio::sync::Semaphore,
}

struct Conn<'a> {
    client: Option<Client>,
    pool: &'a Pool,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl Conn<'_> {
    fn client(&mut self) -> Result<&mut Client, InventoryError> {
        self.client.as_mut().ok_or(InventoryError::Closed)
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            if !c.is_closed() {
                if let Ok(mut idle) = self.pool.idle.lock() {
                    idle.push(c);
                }
            }
        }
    }
}

impl Pool {
    async fn get(&self) -> Result<Conn<'_>, InventoryError> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| InventoryError::Closed)?;
        let reuse = loop {
            let next = match self.idle.lock() {
                Ok(mut idle) => idle.pop(),
                Err(_) => None,
            };
            match next {
                Some(c) if c.is_closed() => continue,
                other => break other,
            }
        };
        let client = match reuse {
            Some(c) => c,
            None => {
                let (client, connection) = self.config.connect(NoTls).await.map_err(pg_err)?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::warn!(error = %e, "inventory: PostgreSQL connection ended");
                    }
                });
                client
            }
        };
        Ok(Conn {
            client: Some(client),
            pool: self,
            _permit: permit,
        })
    }
}

/// Run `$body` (an async block using `$c: &mut Client`, giving
/// `Result<_, tokio_postgres::Error>`) on a pooled connection; once more on a new
/// connection when the first one turned out closed.
macro_rules! with_conn {
    ($pool:expr, |$c:ident| $body:expr) => {{
        let mut retried = false;
        loop {
            let mut conn = $pool.get().await?;
            let $c: &mut Client = conn.client()?;
            match $body.await {
                Err(e) if e.is_closed() && !retried => {
                    retried = true;
                    continue;
                }
                r => break r.map_err(pg_err),
            }
        }
    }};
}

fn final_states() -> String {
    OpState::ALL
        .into_iter()
        .filter(|s| s.is_final())
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn schema_sql(trigram: bool) -> String {
    let mut sql = String::from(
        r#"
CREATE TABLE IF NOT EXISTS credentials (
    id text COLLATE "C" PRIMARY KEY,
    kind text COLLATE "C" NOT NULL,
    serial text COLLATE "C" NOT NULL,
    holder text COLLATE "C" NOT NULL,
    vehicle text COLLATE "C",
    ecu text COLLATE "C",
    server text COLLATE "C" NOT NULL,
    not_before bigint,
    not_after bigint,
    revoked_at bigint,
    op_state text COLLATE "C" NOT NULL,
    op_date bigint NOT NULL,
    last_seen bigint,
    audit boolean NOT NULL,
    search text COLLATE "C" NOT NULL,
    record jsonb NOT NULL
);
CREATE TABLE IF NOT EXISTS credential_jobs (
    id text COLLATE "C" PRIMARY KEY,
    credential text COLLATE "C" NOT NULL,
    device text COLLATE "C" NOT NULL,
    created_at bigint NOT NULL,
    open boolean NOT NULL,
    record jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS credential_jobs_device ON credential_jobs (device, created_at DESC, id);
CREATE INDEX IF NOT EXISTS credential_jobs_credential ON credential_jobs (credential, created_at DESC, id);
CREATE INDEX IF NOT EXISTS credential_jobs_open ON credential_jobs (created_at, id) WHERE open;
"#,
    );
    for col in SORT_COLUMNS {
        sql.push_str(&format!(
            "CREATE INDEX IF NOT EXISTS credentials_{col} ON credentials ({col} NULLS FIRST, id);\n"
        ));
    }
    sql.push_str(&format!(
        "CREATE INDEX IF NOT EXISTS credentials_ending ON credentials (not_after, id) \
         WHERE kind = 'certificate' AND op_state NOT IN ({});\n",
        final_states()
    ));
    // The "expiring within N days" filter (`revoked_at IS NULL AND not_after in a range`):
    // without it PostgreSQL walks `credentials_not_after` and reads every row in the range
    // from the table to test `revoked_at` (35,000 random reads for a 30-day window at a
    // million credentials: ~180 ms); the partial index answers count and page alone (in
    // the order `order_by` asks for).
    sql.push_str(
        "CREATE INDEX IF NOT EXISTS credentials_unrevoked_not_after ON credentials \
         (not_after NULLS FIRST, id) WHERE revoked_at IS NULL;\n",
    );
    if trigram {
        sql.push_str(
            "CREATE INDEX IF NOT EXISTS credentials_search ON credentials \
             USING gin (search gin_trgm_ops);\n",
        );
    }
    sql
}

/// The columns a query sorts on besides `id` (each indexed with `id` as tie-breaker; the
/// holder, serial, vehicle and ECU lookups use the same indexes).
const SORT_COLUMNS: [&str; 11] = [
    "kind",
    "serial",
    "holder",
    "vehicle",
    "ecu",
    "server",
    "not_before",
    "not_after",
    "op_state",
    "op_date",
    "last_seen",
];

fn sort_column(k: SortKey) -> Option<&'static str> {
    Some(match k {
        SortKey::Id => return None,
        SortKey::Kind => "kind",
        SortKey::Serial => "serial",
        SortKey::Holder => "holder",
        SortKey::Vehicle => "vehicle",
        SortKey::Ecu => "ecu",
        SortKey::Server => "server",
        SortKey::NotBefore => "not_before",
        SortKey::NotAfter => "not_after",
        SortKey::OpState => "op_state",
        SortKey::OpDate => "op_date",
        SortKey::LastSeen => "last_seen",
    })
}

/// The searched fields, lower-cased, joined by U+0001.
pub fn search_text(c: &Credential) -> String {
    [
        Some(c.id.as_str()),
        Some(c.serial.as_str()),
        Some(c.holder.as_str()),
        c.vehicle.as_deref(),
        c.ecu.as_deref(),
        Some(c.server.as_str()),
    ]
    .into_iter()
    .flatten()
    .map(str::to_lowercase)
    .collect::<Vec<_>>()
    .join("\u{1}")
}

/// The largest `not_after` for which a credential valid at `now` counts as expiring
/// (`now >= not_after.saturating_sub(expiring)`, monotonic in `not_after`), or `None` when
/// none does.
pub fn expiring_threshold(now: i64, expiring: i64) -> Option<i64> {
    let hit = |na: i64| now >= na.saturating_sub(expiring);
    if !hit(i64::MIN) {
        return None;
    }
    let (mut lo, mut hi) = (i64::MIN, i64::MAX);
    if hit(hi) {
        return Some(hi);
    }
    // hit(lo) && !hit(hi)
    while (hi as i128) - (lo as i128) > 1 {
        let mid = ((lo as i128 + hi as i128) / 2) as i64;
        if hit(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(lo)
}

/// LIKE's special characters escaped (the default escape character, backslash).
fn like_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    for ch in s.chars() {
        if matches!(ch, '\\' | '%' | '_') {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

type Param = Box<dyn ToSql + Sync + Send>;

/// A WHERE clause under construction with its parameters.
#[derive(Default)]
struct Filter {
    clauses: Vec<String>,
    params: Vec<Param>,
}

impl Filter {
    fn param(&mut self, v: impl ToSql + Sync + Send + 'static) -> String {
        self.params.push(Box::new(v));
        format!("${}", self.params.len())
    }

    fn push(&mut self, clause: String) {
        self.clauses.push(clause);
    }

    fn sql(&self) -> String {
        if self.clauses.is_empty() {
            "TRUE".into()
        } else {
            self.clauses.join(" AND ")
        }
    }

    fn refs(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect()
    }

    fn of(q: &Query, now: i64, expiring: i64) -> Filter {
        let mut f = Filter::default();
        if let Some(k) = q.kind {
            let p = f.param(k.as_str());
            f.push(format!("kind = {p}"));
        }
        if let Some(s) = q.op_state {
            let p = f.param(s.as_str());
            f.push(format!("op_state = {p}"));
        }
        if let Some(v) = q.validity {
            let clause = if v == Validity::Revoked {
                "revoked_at IS NOT NULL".to_string()
            } else {
                let n = f.param(now);
                let started =
                    format!("revoked_at IS NULL AND (not_before IS NULL OR not_before <= {n})");
                let threshold = expiring_threshold(now, expiring);
                match (v, threshold) {
                    (Validity::Future, _) => format!("revoked_at IS NULL AND not_before > {n}"),
                    (Validity::Expired, _) => format!("{started} AND not_after <= {n}"),
                    (Validity::Expiring, None) => "FALSE".to_string(),
                    (Validity::Expiring, Some(t)) => {
                        let t = f.param(t);
                        format!("{started} AND not_after > {n} AND not_after <= {t}")
                    }
                    (Validity::Valid, None) => {
                        format!("{started} AND (not_after IS NULL OR not_after > {n})")
                    }
                    (Validity::Valid | Validity::Revoked, Some(t)) => {
                        let t = f.param(t);
                        format!(
                            "{started} AND (not_after IS NULL OR (not_after > {n} AND not_after > {t}))"
                        )
                    }
                    (Validity::Revoked, None) => "revoked_at IS NOT NULL".to_string(),
                }
            };
            f.push(format!("({clause})"));
        }
        for (col, v) in [
            ("server", &q.server),
            ("holder", &q.holder),
            ("vehicle", &q.vehicle),
            ("ecu", &q.ecu),
        ] {
            if let Some(v) = v {
                let p = f.param(v.clone());
                f.push(format!("{col} = {p}"));
            }
        }
        if let Some(w) = q.expiring_within {
            let n = f.param(now);
            let until = f.param(now.saturating_add(w));
            f.push(format!(
                "(revoked_at IS NULL AND not_after > {n} AND not_after <= {until})"
            ));
        }
        if q.audit {
            f.push("audit".into());
        }
        if let Some(s) = &q.search {
            let p = f.param(format!("%{}%", like_escape(&s.to_lowercase())));
            f.push(format!("search LIKE {p}"));
        }
        f
    }
}

fn order_by(q: &Query) -> String {
    let (dir, nulls) = if q.desc {
        ("DESC", "NULLS LAST")
    } else {
        ("ASC", "NULLS FIRST")
    };
    match sort_column(q.sort) {
        None => format!("id {dir}"),
        Some(col) => format!("{col} {dir} {nulls}, id {dir}"),
    }
}

fn decode<T: serde::de::DeserializeOwned>(
    table: &str,
    id: &str,
    json: &str,
) -> Result<T, InventoryError> {
    serde_json::from_str(json).map_err(|e| InventoryError::Corrupt {
        key: format!("{table}/{id}"),
        reason: e.to_string(),
    })
}

fn rows_to<T: serde::de::DeserializeOwned>(
    table: &str,
    rows: &[tokio_postgres::Row],
) -> Result<Vec<T>, InventoryError> {
    rows.iter()
        .map(|r| {
            let id: String = r.try_get(0).map_err(pg_err)?;
            let json: String = r.try_get(1).map_err(pg_err)?;
            decode(table, &id, &json)
        })
        .collect()
}

const CRED_COLUMNS: &str = "id, kind, serial, holder, vehicle, ecu, server, not_before, \
    not_after, revoked_at, op_state, op_date, last_seen, audit, search, record";

fn put_sql() -> String {
    let updates = CRED_COLUMNS
        .split(", ")
        .filter(|c| *c != "id")
        .map(|c| format!("{c} = EXCLUDED.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT INTO credentials ({CRED_COLUMNS}) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
         $6::text[], $7::text[], $8::int8[], $9::int8[], $10::int8[], $11::text[], $12::int8[], \
         $13::int8[], $14::bool[], $15::text[], $16::text[]::jsonb[]) \
         ON CONFLICT (id) DO UPDATE SET {updates}"
    )
}

const PUT_JOBS_SQL: &str = "INSERT INTO credential_jobs (id, credential, device, created_at, open, record) \
     SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::bool[], $6::text[]::jsonb[]) \
     ON CONFLICT (id) DO UPDATE SET credential = EXCLUDED.credential, device = EXCLUDED.device, \
     created_at = EXCLUDED.created_at, open = EXCLUDED.open, record = EXCLUDED.record";

/// One UNNEST statement's columns for a chunk of credentials.
struct CredColumns {
    id: Vec<String>,
    kind: Vec<&'static str>,
    serial: Vec<String>,
    holder: Vec<String>,
    vehicle: Vec<Option<String>>,
    ecu: Vec<Option<String>>,
    server: Vec<String>,
    not_before: Vec<Option<i64>>,
    not_after: Vec<Option<i64>>,
    revoked_at: Vec<Option<i64>>,
    op_state: Vec<&'static str>,
    op_date: Vec<i64>,
    last_seen: Vec<Option<i64>>,
    audit: Vec<bool>,
    search: Vec<String>,
    record: Vec<String>,
}

impl CredColumns {
    fn of(creds: &[&Credential]) -> Result<CredColumns, InventoryError> {
        let mut record = Vec::with_capacity(creds.len());
        for c in creds {
            record.push(
                serde_json::to_string(c).map_err(|e| InventoryError::Corrupt {
                    key: format!("credentials/{}", c.id),
                    reason: e.to_string(),
                })?,
            );
        }
        Ok(CredColumns {
            id: creds.iter().map(|c| c.id.clone()).collect(),
            kind: creds.iter().map(|c| c.kind.as_str()).collect(),
            serial: creds.iter().map(|c| c.serial.clone()).collect(),
            holder: creds.iter().map(|c| c.holder.clone()).collect(),
            vehicle: creds.iter().map(|c| c.vehicle.clone()).collect(),
            ecu: creds.iter().map(|c| c.ecu.clone()).collect(),
            server: creds.iter().map(|c| c.server.clone()).collect(),
            not_before: creds.iter().map(|c| c.not_before).collect(),
            not_after: creds.iter().map(|c| c.not_after).collect(),
            revoked_at: creds.iter().map(|c| c.revoked_at).collect(),
            op_state: creds.iter().map(|c| c.op_state.as_str()).collect(),
            op_date: creds.iter().map(|c| c.op_date).collect(),
            last_seen: creds.iter().map(|c| c.last_seen).collect(),
            audit: creds.iter().map(|c| !c.audit.is_empty()).collect(),
            search: creds.iter().map(|c| search_text(c)).collect(),
            record,
        })
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 16] {
        [
            &self.id,
            &self.kind,
            &self.serial,
            &self.holder,
            &self.vehicle,
            &self.ecu,
            &self.server,
            &self.not_before,
            &self.not_after,
            &self.revoked_at,
            &self.op_state,
            &self.op_date,
            &self.last_seen,
            &self.audit,
            &self.search,
            &self.record,
        ]
    }
}

struct JobColumns {
    id: Vec<String>,
    credential: Vec<String>,
    device: Vec<String>,
    created_at: Vec<i64>,
    open: Vec<bool>,
    record: Vec<String>,
}

impl JobColumns {
    fn of(jobs: &[&Job]) -> Result<JobColumns, InventoryError> {
        let mut record = Vec::with_capacity(jobs.len());
        for j in jobs {
            record.push(
                serde_json::to_string(j).map_err(|e| InventoryError::Corrupt {
                    key: format!("credential_jobs/{}", j.id),
                    reason: e.to_string(),
                })?,
            );
        }
        Ok(JobColumns {
            id: jobs.iter().map(|j| j.id.clone()).collect(),
            credential: jobs.iter().map(|j| j.credential.clone()).collect(),
            device: jobs.iter().map(|j| j.device.clone()).collect(),
            created_at: jobs.iter().map(|j| j.created_at).collect(),
            open: jobs.iter().map(|j| !j.state.is_terminal()).collect(),
            record,
        })
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 6] {
        [
            &self.id,
            &self.credential,
            &self.device,
            &self.created_at,
            &self.open,
            &self.record,
        ]
    }
}

impl PgInventory {
    /// Connect to `url` (`postgresql://user@host:port/db`; plain TCP or a Unix socket
    /// directory as `host`, no TLS: the database is local) and make the schema when it is
    /// missing.
    pub async fn open(url: &str) -> Result<PgInventory, InventoryError> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| InventoryError::Postgres(format!("database_url: {e}")))?;
        config.connect_timeout(CONNECT_TIMEOUT);
        if config.get_application_name().is_none() {
            config.application_name("outpost-inventory");
        }
        let pool = Pool {
            config,
            idle: Mutex::new(Vec::new()),
            permits: tokio::sync::Semaphore::new(POOL_SIZE),
        };
        let trigram = {
            let mut conn = pool.get().await?;
            let c = conn.client()?;
            // Needs the contrib package and the right to create it; without it the search
            // is a scan (correct, slower).
            if let Err(e) = c
                .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
                .await
            {
                tracing::info!(error = %pg_err(e), "inventory: no pg_trgm, search scans");
            }
            let trigram = c
                .query_opt("SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'", &[])
                .await
                .map_err(pg_err)?
                .is_some();
            let tx = c.transaction().await.map_err(pg_err)?;
            tx.batch_execute(
                "SELECT pg_advisory_xact_lock(7261011001); \
                 CREATE TABLE IF NOT EXISTS outpost_inventory_schema (version integer NOT NULL)",
            )
            .await
            .map_err(pg_err)?;
            let found: Option<i32> = tx
                .query_one("SELECT max(version) FROM outpost_inventory_schema", &[])
                .await
                .map_err(pg_err)?
                .try_get(0)
                .map_err(pg_err)?;
            match found {
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(InventoryError::Postgres(format!(
                        "inventory schema version {v} is newer than this build's {SCHEMA_VERSION}"
                    )));
                }
                _ => {}
            }
            tx.batch_execute(&schema_sql(trigram))
                .await
                .map_err(pg_err)?;
            if found.is_none() {
                tx.execute(
                    "INSERT INTO outpost_inventory_schema (version) VALUES ($1)",
                    &[&SCHEMA_VERSION],
                )
                .await
                .map_err(pg_err)?;
            }
            tx.commit().await.map_err(pg_err)?;
            trigram
        };
        Ok(PgInventory {
            inner: Arc::new(PgInner {
                pool,
                count_cap: AtomicU64::new(COUNT_CAP),
                trigram,
            }),
        })
    }

    /// Count at most `cap` matches in queries instead of [`COUNT_CAP`] (for tests of the
    /// cap on a small data set).
    pub fn set_count_cap(&self, cap: u64) {
        self.inner.count_cap.store(cap, Ordering::Relaxed);
    }

    /// Whether the search has its trigram index.
    pub fn has_trigram_index(&self) -> bool {
        self.inner.trigram
    }

    async fn write(&self, jobs: &[Job], creds: &[Credential]) -> Result<(), InventoryError> {
        for c in creds {
            check_keys(c)?;
        }
        for j in jobs {
            check_job_keys(j)?;
        }
        let creds = super::dedup(creds, |c| &c.id);
        let jobs = super::dedup(jobs, |j| &j.id);
        let mut cred_chunks = Vec::new();
        for chunk in creds.chunks(PUT_CHUNK) {
            cred_chunks.push(CredColumns::of(chunk)?);
        }
        let job_cols = JobColumns::of(&jobs)?;
        let put = put_sql();
        with_conn!(self.inner.pool, |c| async {
            let tx = c.transaction().await?;
            for cols in &cred_chunks {
                tx.execute(put.as_str(), &cols.params()).await?;
            }
            if !job_cols.id.is_empty() {
                tx.execute(PUT_JOBS_SQL, &job_cols.params()).await?;
            }
            tx.commit().await
        })
    }

    async fn creds_where(
        &self,
        clause: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Credential>, InventoryError> {
        let sql = format!("SELECT id, record::text FROM credentials WHERE {clause}");
        let rows = with_conn!(self.inner.pool, |c| c.query(sql.as_str(), params))?;
        rows_to("credentials", &rows)
    }

    async fn jobs_where(
        &self,
        clause: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Job>, InventoryError> {
        let sql = format!("SELECT id, record::text FROM credential_jobs WHERE {clause}");
        let rows = with_conn!(self.inner.pool, |c| c.query(sql.as_str(), params))?;
        rows_to("credential_jobs", &rows)
    }
}

impl super::InventoryStore for PgInventory {
    async fn put(&self, creds: &[Credential]) -> Result<(), InventoryError> {
        self.write(&[], creds).await
    }

    async fn get(&self, id: &str) -> Result<Option<Credential>, InventoryError> {
        Ok(self.creds_where("id = $1", &[&id]).await?.pop())
    }

    async fn by_holder(&self, device: &str) -> Result<Vec<Credential>, InventoryError> {
        self.creds_where("holder = $1 ORDER BY id", &[&device])
            .await
    }

    async fn by_serial(&self, serial: &str) -> Result<Vec<Credential>, InventoryError> {
        self.creds_where("serial = $1 ORDER BY id", &[&serial])
            .await
    }

    async fn by_vehicle(&self, vehicle: &str) -> Result<Vec<Credential>, InventoryError> {
        self.creds_where("vehicle = $1 ORDER BY id", &[&vehicle])
            .await
    }

    async fn by_ecu(&self, ecu: &str) -> Result<Vec<Credential>, InventoryError> {
        self.creds_where("ecu = $1 ORDER BY id", &[&ecu]).await
    }

    async fn ending_before(
        &self,
        until: i64,
        limit: usize,
    ) -> Result<Vec<Credential>, InventoryError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let clause = format!(
            "kind = 'certificate' AND op_state NOT IN ({}) AND not_after <= $1 \
             ORDER BY not_after, id LIMIT $2",
            final_states()
        );
        self.creds_where(&clause, &[&until, &limit]).await
    }

    async fn query(&self, q: &Query, now: i64, expiring: i64) -> Result<Page, InventoryError> {
        q.validate()?;
        let cap = self.inner.count_cap.load(Ordering::Relaxed);
        let mut f = Filter::of(q, now, expiring);
        let where_sql = f.sql();
        let count_limit = f.param(i64::try_from(cap.saturating_add(1)).unwrap_or(i64::MAX));
        let count_sql = format!(
            "SELECT count(*) FROM (SELECT 1 FROM credentials WHERE {where_sql} LIMIT {count_limit}) t"
        );
        let count_params = f.refs();
        let mut g = Filter::of(q, now, expiring);
        let limit = g.param(i64::from(q.limit));
        let offset = g.param(i64::try_from(q.offset).unwrap_or(i64::MAX));
        // The page's ids first, then their records: so that the rows skipped by the offset
        // are not converted to text (`record::text` in the inner query would be computed
        // for every row the LIMIT sees). The outer ORDER BY sorts the page's rows only.
        let order = order_by(q);
        let page_sql = format!(
            "SELECT id, c.record::text FROM (SELECT id FROM credentials WHERE {} \
             ORDER BY {order} LIMIT {limit} OFFSET {offset}) p JOIN credentials c USING (id) \
             ORDER BY {order}",
            g.sql(),
        );
        let page_params = g.refs();
        // Both on one connection, pipelined.
        let (counted, rows) = with_conn!(self.inner.pool, |c| async {
            let c: &Client = c;
            tokio::try_join!(
                c.query_one(count_sql.as_str(), &count_params),
                c.query(page_sql.as_str(), &page_params)
            )
        })?;
        let n: i64 = counted.try_get(0).map_err(pg_err)?;
        let n = u64::try_from(n).unwrap_or(0);
        Ok(Page {
            rows: rows_to("credentials", &rows)?,
            total: n.min(cap),
            exact: n <= cap,
        })
    }

    async fn count(&self) -> Result<u64, InventoryError> {
        let row = with_conn!(self.inner.pool, |c| c
            .query_one("SELECT count(*) FROM credentials", &[]))?;
        let n: i64 = row.try_get(0).map_err(pg_err)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn put_jobs(&self, jobs: &[Job], creds: &[Credential]) -> Result<(), InventoryError> {
        self.write(jobs, creds).await
    }

    async fn job(&self, id: &str) -> Result<Option<Job>, InventoryError> {
        Ok(self.jobs_where("id = $1", &[&id]).await?.pop())
    }

    async fn jobs_for_device(
        &self,
        device: &str,
        open_only: bool,
    ) -> Result<Vec<Job>, InventoryError> {
        self.jobs_where(
            "device = $1 AND (open OR NOT $2) ORDER BY created_at DESC, id",
            &[&device, &open_only],
        )
        .await
    }

    async fn jobs_for_credential(&self, credential: &str) -> Result<Vec<Job>, InventoryError> {
        self.jobs_where(
            "credential = $1 ORDER BY created_at DESC, id",
            &[&credential],
        )
        .await
    }

    async fn open_jobs(&self, limit: usize) -> Result<Vec<Job>, InventoryError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.jobs_where("open ORDER BY created_at, id LIMIT $1", &[&limit])
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::model::validity_of;

    #[test]
    fn the_expiring_threshold_agrees_with_validity_of() {
        let samples = [
            i64::MIN,
            i64::MIN + 1,
            -100,
            -1,
            0,
            1,
            5,
            100,
            i64::MAX - 1,
            i64::MAX,
        ];
        for now in samples {
            for exp in samples {
                let t = expiring_threshold(now, exp);
                for na in samples
                    .iter()
                    .copied()
                    .chain([now, now.saturating_add(exp)])
                {
                    let by_t = t.is_some_and(|t| na <= t);
                    assert_eq!(by_t, now >= na.saturating_sub(exp), "{now} {exp} {na}");
                    if na > now && by_t {
                        assert_eq!(
                            validity_of(None, Some(na), None, now, exp),
                            Validity::Expiring
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn like_patterns_are_escaped() {
        assert_eq!(like_escape(r"a%b_c\d"), r"a\%b\_c\\d");
    }

    #[test]
    fn the_order_follows_compare() {
        let q = Query {
            sort: SortKey::Vehicle,
            desc: true,
            ..Query::default()
        };
        assert_eq!(order_by(&q), "vehicle DESC NULLS LAST, id DESC");
        let q = Query::default();
        assert_eq!(order_by(&q), "not_after ASC NULLS FIRST, id ASC");
    }
}
