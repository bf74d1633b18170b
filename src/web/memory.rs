//! An in-memory [`Operator`] over model records: the admin page served without a
//! gateway (its tests, the WebDriver test, a demo). Queries use the model's own reference
//! predicate and order ([`Query::matches`], [`Query::compare`]); operations make one job
//! per holder that moves queued → delivered → in progress → succeeded, one step every
//! `step`, and then record the outcome in the credential (renew and rotate make the
//! successor record, invalidate revokes), as the credentials service does with real
//! holders.

use super::{OpFuture, Operator};
use crate::credentials::model::{
    Credential, Job, JobState, Kind, OpState, Operation, Page, Query, COUNT_CAP,
};
use crate::credentials::service::{CredentialsError, Detail};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

struct Running {
    job: Job,
    started: Instant,
    /// The credential's state before the operation (restored when it is canceled).
    before: OpState,
}

struct Inner {
    creds: BTreeMap<String, Credential>,
    jobs: Vec<Running>,
    last_query: Option<Query>,
}

pub struct MemoryOperator {
    inner: Mutex<Inner>,
    expiring: i64,
    step: Duration,
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl MemoryOperator {
    /// Records `creds`; `expiring` seconds of warning; jobs advance one state per `step`.
    pub fn new(creds: Vec<Credential>, expiring: i64, step: Duration) -> MemoryOperator {
        MemoryOperator {
            inner: Mutex::new(Inner {
                creds: creds.into_iter().map(|c| (c.id.clone(), c)).collect(),
                jobs: Vec::new(),
                last_query: None,
            }),
            expiring,
            step,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last query run (tests check that the page's parameters reached it).
    pub fn last_query(&self) -> Option<Query> {
        self.lock().last_query.clone()
    }

    /// Every job made so far.
    pub fn jobs(&self) -> Vec<Job> {
        self.lock().jobs.iter().map(|r| r.job.clone()).collect()
    }

    fn advance(&self, inner: &mut Inner) {
        let now = Instant::now();
        let at = now_unix();
        let step = self.step.max(Duration::from_millis(1));
        for r in inner.jobs.iter_mut() {
            if r.job.state.is_terminal() {
                continue;
            }
            let steps =
                (now.saturating_duration_since(r.started).as_nanos() / step.as_nanos()) as usize;
            let target = [
                JobState::Queued,
                JobState::Delivered,
                JobState::InProgress,
                JobState::Succeeded,
            ][steps.min(3)];
            let order = |s: JobState| match s {
                JobState::Queued => 0,
                JobState::Delivered => 1,
                JobState::InProgress => 2,
                _ => 3,
            };
            while order(r.job.state) < order(target) {
                let next = match r.job.state {
                    JobState::Queued => JobState::Delivered,
                    JobState::Delivered => JobState::InProgress,
                    _ => JobState::Succeeded,
                };
                if !r.job.state.may_become(next) {
                    break;
                }
                if next == JobState::Delivered {
                    r.job.attempts += 1;
                }
                r.job.state = next;
                r.job.updated_at = at;
            }
            if r.job.state == JobState::Succeeded {
                let Some(c) = inner.creds.get_mut(&r.job.credential) else {
                    continue;
                };
                let by = format!("device:{}", r.job.device);
                let op = r.job.op;
                c.set_state(OpState::done(op), at, &by, "job succeeded");
                let mut successor = None;
                match op {
                    Operation::Invalidate => c.revoked_at = Some(at),
                    Operation::Delete if c.kind == Kind::Certificate => c.revoked_at = Some(at),
                    Operation::Renew | Operation::Rotate => {
                        let serial = format!("{}{:x}", c.serial, at & 0xffff);
                        let id = match c.kind {
                            Kind::Certificate => Credential::cert_id(&serial),
                            _ => format!("key:{}:{serial}", c.holder),
                        };
                        let mut n = c.clone();
                        n.id = id.clone();
                        n.serial = serial;
                        n.history.clear();
                        n.audit.clear();
                        n.seen_by.clear();
                        n.replaced_by = None;
                        n.replaces = Some(c.id.clone());
                        n.revoked_at = None;
                        if let (Some(nb), Some(na)) = (c.not_before, c.not_after) {
                            n.not_before = Some(at);
                            n.not_after = Some(at.saturating_add(na.saturating_sub(nb)));
                        }
                        n.set_state(
                            OpState::Issued,
                            at,
                            &by,
                            format!("{} of {}", op.as_str(), c.id),
                        );
                        c.replaced_by = Some(id.clone());
                        r.job.result = Some(format!("new credential {id}"));
                        successor = Some(n);
                    }
                    Operation::Delete => {}
                }
                if let Some(n) = successor {
                    inner.creds.insert(n.id.clone(), n);
                }
            }
        }
    }

    fn query_now(&self, q: &Query) -> Result<Page, CredentialsError> {
        q.validate()?;
        let mut inner = self.lock();
        self.advance(&mut inner);
        inner.last_query = Some(q.clone());
        let now = now_unix();
        let mut hits: Vec<&Credential> = inner
            .creds
            .values()
            .filter(|c| q.matches(c, now, self.expiring))
            .collect();
        hits.sort_by(|a, b| q.compare(a, b));
        let total = hits.len() as u64;
        let rows = hits
            .into_iter()
            .skip(q.offset.min(usize::MAX as u64) as usize)
            .take(q.limit as usize)
            .cloned()
            .collect();
        Ok(Page {
            rows,
            total: total.min(COUNT_CAP),
            exact: total <= COUNT_CAP,
        })
    }

    fn show_now(&self, id: &str) -> Option<Detail> {
        let mut inner = self.lock();
        self.advance(&mut inner);
        let c = inner.creds.get(id)?.clone();
        let mut jobs: Vec<Job> = inner
            .jobs
            .iter()
            .filter(|r| r.job.credential == id)
            .map(|r| r.job.clone())
            .collect();
        jobs.reverse();
        Some(Detail {
            validity: c.validity(now_unix(), self.expiring),
            credential: c,
            jobs,
        })
    }

    fn operate_now(
        &self,
        id: &str,
        op: Operation,
        by: &str,
        reason: &str,
    ) -> Result<Vec<Job>, CredentialsError> {
        let mut inner = self.lock();
        self.advance(&mut inner);
        let at = now_unix();
        let Some(c) = inner.creds.get(id) else {
            return Err(CredentialsError::NotFound(id.into()));
        };
        if !c.kind.allows(op) {
            return Err(CredentialsError::NotAllowed(format!(
                "a {} cannot be {}d",
                c.kind.as_str(),
                op.as_str()
            )));
        }
        if c.op_state.is_final() {
            return Err(CredentialsError::NotAllowed(format!(
                "{id} is already {}",
                c.op_state.as_str()
            )));
        }
        if inner
            .jobs
            .iter()
            .any(|r| r.job.credential == id && !r.job.state.is_terminal())
        {
            return Err(CredentialsError::NotAllowed(format!(
                "an operation on {id} is still running"
            )));
        }
        let mut raw = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut raw);
        let job = Job {
            id: hex::encode(raw),
            credential: id.into(),
            op,
            device: c.holder.clone(),
            state: JobState::Queued,
            attempts: 0,
            created_at: at,
            updated_at: at,
            next_attempt_at: at,
            deadline: at + 7 * 86_400,
            by: by.into(),
            reason: reason.into(),
            result: None,
            gateway: None,
        };
        let before = c.op_state;
        if let Some(c) = inner.creds.get_mut(id) {
            c.log(at, op.as_str(), by, reason);
            c.set_state(OpState::pending(op), at, by, format!("job {}", job.id));
        }
        inner.jobs.push(Running {
            job: job.clone(),
            started: Instant::now(),
            before,
        });
        Ok(vec![job])
    }

    fn cancel_now(&self, job: &str, by: &str) -> Result<Job, CredentialsError> {
        let mut inner = self.lock();
        self.advance(&mut inner);
        let at = now_unix();
        let Some(r) = inner.jobs.iter_mut().find(|r| r.job.id == job) else {
            return Err(CredentialsError::NotFound(job.into()));
        };
        if !r.job.state.may_become(JobState::Canceled) {
            return Err(CredentialsError::NotAllowed(format!(
                "job {job} has already ended ({})",
                r.job.state.as_str()
            )));
        }
        r.job.state = JobState::Canceled;
        r.job.updated_at = at;
        let (done, before) = (r.job.clone(), r.before);
        if let Some(c) = inner.creds.get_mut(&done.credential) {
            c.set_state(before, at, by, format!("job {job} canceled"));
        }
        Ok(done)
    }
}

impl Operator for MemoryOperator {
    fn query<'a>(&'a self, q: &'a Query) -> OpFuture<'a, Page> {
        Box::pin(async move { self.query_now(q) })
    }
    fn show<'a>(&'a self, id: &'a str) -> OpFuture<'a, Option<Detail>> {
        Box::pin(async move { Ok(self.show_now(id)) })
    }
    fn operate<'a>(
        &'a self,
        id: &'a str,
        op: Operation,
        by: &'a str,
        reason: &'a str,
    ) -> OpFuture<'a, Vec<Job>> {
        Box::pin(async move { self.operate_now(id, op, by, reason) })
    }
    fn cancel<'a>(&'a self, job: &'a str, by: &'a str) -> OpFuture<'a, Job> {
        Box::pin(async move { self.cancel_now(job, by) })
    }
    fn expiring_secs(&self) -> i64 {
        self.expiring
    }
}

/// A made-up fleet of `n` credentials (a demo and test fixture): certificates of our CA
/// for devices and ECUs with spread-out end dates, some symmetric keys, foreign
/// certificates and tokens, a few with audit findings.
pub fn sample_fleet(n: usize, now: i64) -> Vec<Credential> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let kind = match i % 10 {
            0..=5 => Kind::Certificate,
            6 | 7 => Kind::SymmetricKey,
            8 => Kind::ForeignCertificate,
            _ => Kind::Token,
        };
        let holder = format!("dev-{:04}", i / 2);
        let serial = format!(
            "{:08x}",
            0x1000_0000u64 + (i as u64).wrapping_mul(2_654_435_761) % 0x0fff_ffff
        );
        let id = match kind {
            Kind::Certificate => Credential::cert_id(&serial),
            Kind::ForeignCertificate => format!("foreign:tier1-ca:{serial}"),
            Kind::SymmetricKey => format!("key:{holder}:secoc-{i}"),
            _ => format!("token:{holder}:ota-{i}"),
        };
        let mut c = Credential::new(id, kind, serial, holder, now - 86_400 * (i as i64 % 40));
        c.issuer = match kind {
            Kind::ForeignCertificate => "Tier-1 supplier CA".into(),
            _ => "outpost gateway CA".into(),
        };
        c.server = ["gateway", "cloud", "ota", "telemetry.example"][i % 4].into();
        if i % 3 == 0 {
            c.vehicle = Some(format!("VIN{:05}", i / 6));
            c.ecu = Some(["brake", "gateway", "infotainment", "adas"][i % 4].into());
        }
        let life = 365 * 86_400;
        // End dates from 10 days ago to about a year ahead, not in id order.
        let offset = ((i as i64 * 7919) % 380 - 10) * 86_400 + (i as i64 % 97) * 613;
        c.not_after = Some(now + offset);
        c.not_before = Some(now + offset - life);
        c.last_seen = Some(now - (i as i64 % 50) * 3_600);
        if kind == Kind::ForeignCertificate {
            c.op_state = OpState::Reported;
        }
        if i % 17 == 5 {
            c.flag(
                "not-reported",
                now,
                "audit",
                "the holder did not report it at check-in",
            );
        }
        c.log(c.op_date, "issued", "ca", "");
        out.push(c);
    }
    out
}
