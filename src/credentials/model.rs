//! The inventory's records (issue 13, seed 001's "management information"): one
//! [`Credential`] per certificate, key, password or token a holder has, the [`Job`]s that
//! carry an operation to its holders, and the [`Query`] an admin runs over them.
//!
//! A leaf: it knows no service, no store and no transport. Times are Unix seconds.

use serde::{Deserialize, Serialize};

/// Most history events one record keeps (the oldest go first).
pub const MAX_HISTORY: usize = 64;
/// Most rows one page of a query returns.
pub const MAX_PAGE: u32 = 500;
/// Longest search string, holder, server, vehicle or ECU id accepted in a query or report.
pub const MAX_TEXT: usize = 256;

/// What a credential is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A certificate this deployment's CA issued (the gateway's or the cloud's).
    Certificate,
    /// A certificate from another CA that its holder reports.
    ForeignCertificate,
    /// A symmetric key (a SecOC key, a pre-shared key).
    SymmetricKey,
    Password,
    Token,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Certificate,
        Kind::ForeignCertificate,
        Kind::SymmetricKey,
        Kind::Password,
        Kind::Token,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Certificate => "certificate",
            Kind::ForeignCertificate => "foreign-certificate",
            Kind::SymmetricKey => "symmetric-key",
            Kind::Password => "password",
            Kind::Token => "token",
        }
    }
    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
    /// The operations that make sense for this kind.
    pub fn allows(self, op: Operation) -> bool {
        match op {
            Operation::Renew => matches!(self, Kind::Certificate),
            Operation::Invalidate | Operation::Delete => true,
            Operation::Rotate => matches!(self, Kind::SymmetricKey),
        }
    }
}

/// Where a credential stands in its life: the last operation and how it went
/// (seed 001's "operation state").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum OpState {
    Issued,
    RenewalPending,
    InvalidationPending,
    DeletionPending,
    RotationPending,
    Renewed,
    Rotated,
    Invalidated,
    Deleted,
    Failed,
    /// Reported by a holder, not issued here (a foreign certificate, a key we did not make).
    Reported,
}

impl OpState {
    pub const ALL: [OpState; 11] = [
        OpState::Issued,
        OpState::RenewalPending,
        OpState::InvalidationPending,
        OpState::DeletionPending,
        OpState::RotationPending,
        OpState::Renewed,
        OpState::Rotated,
        OpState::Invalidated,
        OpState::Deleted,
        OpState::Failed,
        OpState::Reported,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            OpState::Issued => "issued",
            OpState::RenewalPending => "renewal-pending",
            OpState::InvalidationPending => "invalidation-pending",
            OpState::DeletionPending => "deletion-pending",
            OpState::RotationPending => "rotation-pending",
            OpState::Renewed => "renewed",
            OpState::Rotated => "rotated",
            OpState::Invalidated => "invalidated",
            OpState::Deleted => "deleted",
            OpState::Failed => "failed",
            OpState::Reported => "reported",
        }
    }
    pub fn parse(s: &str) -> Option<OpState> {
        OpState::ALL.into_iter().find(|k| k.as_str() == s)
    }
    /// The state a credential is in while `op` runs for it.
    pub fn pending(op: Operation) -> OpState {
        match op {
            Operation::Renew => OpState::RenewalPending,
            Operation::Invalidate => OpState::InvalidationPending,
            Operation::Delete => OpState::DeletionPending,
            Operation::Rotate => OpState::RotationPending,
        }
    }
    /// The state once `op` succeeded.
    pub fn done(op: Operation) -> OpState {
        match op {
            Operation::Renew => OpState::Renewed,
            Operation::Invalidate => OpState::Invalidated,
            Operation::Delete => OpState::Deleted,
            Operation::Rotate => OpState::Rotated,
        }
    }
    /// Whether the credential is out of use for good.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            OpState::Renewed | OpState::Rotated | OpState::Invalidated | OpState::Deleted
        )
    }
}

/// Whether a credential can be used now: derived from its dates and revocation, never
/// stored, so it is always true at the time it is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Validity {
    Valid,
    /// Valid, but ends within the expiring window.
    Expiring,
    Expired,
    Revoked,
    /// Not valid yet.
    Future,
}

impl Validity {
    pub const ALL: [Validity; 5] = [
        Validity::Valid,
        Validity::Expiring,
        Validity::Expired,
        Validity::Revoked,
        Validity::Future,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Validity::Valid => "valid",
            Validity::Expiring => "expiring",
            Validity::Expired => "expired",
            Validity::Revoked => "revoked",
            Validity::Future => "future",
        }
    }
    pub fn parse(s: &str) -> Option<Validity> {
        Validity::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// One thing that happened to a credential, and who did it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub at: i64,
    /// `issued`, `reported`, `renew`, `invalidate`, `revoked`, `job-succeeded`, `audit`, ...
    pub what: String,
    /// `admin:<name>`, `policy`, `ca`, `fdo-owner`, `device:<id>`, `binding`, `sync:<gw>`.
    pub by: String,
    pub detail: String,
}

/// One credential of one holder (seed 001: target information and its management
/// information; seed 000: with the vehicle and ECU it was issued for).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    /// Unique: `cert:<serial>` for our CA's certificates, `foreign:<issuer>:<serial>`,
    /// `key:<holder>:<key id>`, `password:<holder>:<name>`, `token:<holder>:<name>`.
    pub id: String,
    pub kind: Kind,
    /// Serial (lower-case hex) or key id.
    pub serial: String,
    /// The device that holds it (for an ECU: the ECU's device identity).
    pub holder: String,
    pub vehicle: Option<String>,
    pub ecu: Option<String>,
    /// The server it is used with: `gateway`, `cloud`, `ota`, or a named server.
    pub server: String,
    /// The issuing CA's name or the reporting device's claim.
    pub issuer: String,
    /// SHA-256 of the certificate DER (hex), when it is a certificate.
    pub fingerprint: Option<String>,
    pub not_before: Option<i64>,
    pub not_after: Option<i64>,
    pub revoked_at: Option<i64>,
    pub op_state: OpState,
    /// When the operation state last changed.
    pub op_date: i64,
    /// When a holder last reported it at check-in.
    pub last_seen: Option<i64>,
    /// Devices other than the holder that reported it (an audit finding when not empty).
    pub seen_by: Vec<String>,
    /// Open audit findings (`revoked-in-use`, `shared`, `not-reported`, `unknown-binding`).
    pub audit: Vec<String>,
    /// The certificate (PEM), when we have it.
    pub pem: Option<String>,
    /// The credential that replaced this one (renewal, rotation), or that it replaced.
    pub replaced_by: Option<String>,
    pub replaces: Option<String>,
    pub history: Vec<Event>,
    /// In the cloud's fleet inventory: the gateway the holder is behind (operations go to
    /// it). `None` on a gateway, and for the cloud's own records.
    #[serde(default)]
    pub gateway: Option<String>,
}

impl Credential {
    /// A blank record of `kind` for `holder`; the caller fills in the rest.
    pub fn new(id: String, kind: Kind, serial: String, holder: String, at: i64) -> Credential {
        Credential {
            id,
            kind,
            serial,
            holder,
            vehicle: None,
            ecu: None,
            server: "gateway".into(),
            issuer: String::new(),
            fingerprint: None,
            not_before: None,
            not_after: None,
            revoked_at: None,
            op_state: OpState::Issued,
            op_date: at,
            last_seen: None,
            seen_by: Vec::new(),
            audit: Vec::new(),
            pem: None,
            replaced_by: None,
            replaces: None,
            history: Vec::new(),
            gateway: None,
        }
    }

    /// The validity at `now`, with `expiring` seconds of warning before the end.
    pub fn validity(&self, now: i64, expiring: i64) -> Validity {
        validity_of(
            self.not_before,
            self.not_after,
            self.revoked_at,
            now,
            expiring,
        )
    }

    /// Record an event (history bounded to [`MAX_HISTORY`]).
    pub fn log(&mut self, at: i64, what: &str, by: &str, detail: impl Into<String>) {
        if self.history.len() >= MAX_HISTORY {
            self.history.remove(0);
        }
        self.history.push(Event {
            at,
            what: what.into(),
            by: by.into(),
            detail: detail.into(),
        });
    }

    /// Move to `state` at `at`, recording it.
    pub fn set_state(&mut self, state: OpState, at: i64, by: &str, detail: impl Into<String>) {
        self.op_state = state;
        self.op_date = at;
        self.log(at, state.as_str(), by, detail);
    }

    /// Add an audit finding once.
    pub fn flag(&mut self, finding: &str, at: i64, by: &str, detail: impl Into<String>) -> bool {
        if self.audit.iter().any(|a| a == finding) {
            return false;
        }
        self.audit.push(finding.into());
        self.log(at, "audit", by, format!("{finding}: {}", detail.into()));
        true
    }

    /// The id of one of our CA's certificates.
    pub fn cert_id(serial: &str) -> String {
        format!("cert:{serial}")
    }
}

/// [`Validity`] from the dates alone (shared with the stores' SQL, which computes the same).
pub fn validity_of(
    not_before: Option<i64>,
    not_after: Option<i64>,
    revoked_at: Option<i64>,
    now: i64,
    expiring: i64,
) -> Validity {
    if revoked_at.is_some() {
        return Validity::Revoked;
    }
    if let Some(nb) = not_before {
        if now < nb {
            return Validity::Future;
        }
    }
    match not_after {
        Some(na) if now >= na => Validity::Expired,
        Some(na) if now >= na.saturating_sub(expiring) => Validity::Expiring,
        _ => Validity::Valid,
    }
}

/// What an admin (or a policy, or the binding check) asks to be done to a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Operation {
    /// The holder makes a new key and CSR (the key never leaves it); we issue.
    Renew,
    /// Revoke, and the holder deletes it.
    Invalidate,
    /// The holder deletes it (and, for our certificates, it is revoked too).
    Delete,
    /// A new symmetric key, delivered encrypted to the holder only.
    Rotate,
}

impl Operation {
    pub const ALL: [Operation; 4] = [
        Operation::Renew,
        Operation::Invalidate,
        Operation::Delete,
        Operation::Rotate,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Renew => "renew",
            Operation::Invalidate => "invalidate",
            Operation::Delete => "delete",
            Operation::Rotate => "rotate",
        }
    }
    pub fn parse(s: &str) -> Option<Operation> {
        Operation::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// Where one holder's command stands (AWS IoT Jobs' execution states).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    Queued,
    Delivered,
    InProgress,
    Succeeded,
    Failed,
    TimedOut,
    Canceled,
}

impl JobState {
    pub const ALL: [JobState; 7] = [
        JobState::Queued,
        JobState::Delivered,
        JobState::InProgress,
        JobState::Succeeded,
        JobState::Failed,
        JobState::TimedOut,
        JobState::Canceled,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Delivered => "delivered",
            JobState::InProgress => "in-progress",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::TimedOut => "timed-out",
            JobState::Canceled => "canceled",
        }
    }
    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|k| k.as_str() == s)
    }
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::TimedOut | JobState::Canceled
        )
    }
    /// The transitions a job may take; anything else is refused (and logged) by the owner.
    pub fn may_become(self, next: JobState) -> bool {
        use JobState::*;
        match (self, next) {
            (Queued, Delivered | Canceled | TimedOut | Failed) => true,
            // A redelivery after a lost answer, or the holder's own progress.
            (Delivered, Delivered | InProgress | Succeeded | Failed | TimedOut | Canceled) => true,
            (InProgress, InProgress | Succeeded | Failed | TimedOut | Canceled) => true,
            // A retry puts a failed delivery back in the queue.
            (Delivered | InProgress, Queued) => true,
            _ => false,
        }
    }
}

/// One operation for one holder of one credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// 16 random bytes, hex.
    pub id: String,
    pub credential: String,
    pub op: Operation,
    /// The holder this job goes to, and no other device.
    pub device: String,
    pub state: JobState,
    pub attempts: u32,
    pub created_at: i64,
    pub updated_at: i64,
    /// Earliest time of the next delivery attempt.
    pub next_attempt_at: i64,
    /// The job times out at this time unless it ended.
    pub deadline: i64,
    /// Who asked for it (`admin:<name>`, `policy`, `binding`).
    pub by: String,
    pub reason: String,
    /// What the holder or the gateway said last (an error, the new serial).
    pub result: Option<String>,
    /// In the cloud's fleet inventory: the gateway that runs this job (the cloud only
    /// mirrors it). `None`: run here.
    #[serde(default)]
    pub gateway: Option<String>,
}

/// A column to sort on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SortKey {
    Id,
    Kind,
    Serial,
    Holder,
    Vehicle,
    Ecu,
    Server,
    NotBefore,
    #[default]
    NotAfter,
    OpState,
    OpDate,
    LastSeen,
}

impl SortKey {
    pub const ALL: [SortKey; 12] = [
        SortKey::Id,
        SortKey::Kind,
        SortKey::Serial,
        SortKey::Holder,
        SortKey::Vehicle,
        SortKey::Ecu,
        SortKey::Server,
        SortKey::NotBefore,
        SortKey::NotAfter,
        SortKey::OpState,
        SortKey::OpDate,
        SortKey::LastSeen,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            SortKey::Id => "id",
            SortKey::Kind => "kind",
            SortKey::Serial => "serial",
            SortKey::Holder => "holder",
            SortKey::Vehicle => "vehicle",
            SortKey::Ecu => "ecu",
            SortKey::Server => "server",
            SortKey::NotBefore => "not-before",
            SortKey::NotAfter => "not-after",
            SortKey::OpState => "op-state",
            SortKey::OpDate => "op-date",
            SortKey::LastSeen => "last-seen",
        }
    }
    pub fn parse(s: &str) -> Option<SortKey> {
        SortKey::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// A search over the inventory: every filter given must hold; rows come sorted on `sort`
/// (ties broken by `id`, ascending), `offset` rows skipped, at most `limit` returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Query {
    /// Case-insensitive substring of the id, serial, holder, vehicle, ECU or server.
    pub search: Option<String>,
    pub kind: Option<Kind>,
    pub op_state: Option<OpState>,
    pub validity: Option<Validity>,
    pub server: Option<String>,
    pub holder: Option<String>,
    pub vehicle: Option<String>,
    pub ecu: Option<String>,
    /// Valid now and ending within this many seconds.
    pub expiring_within: Option<i64>,
    /// Only records with an open audit finding.
    pub audit: bool,
    pub sort: SortKey,
    pub desc: bool,
    pub offset: u64,
    pub limit: u32,
}

impl Default for Query {
    fn default() -> Self {
        Query {
            search: None,
            kind: None,
            op_state: None,
            validity: None,
            server: None,
            holder: None,
            vehicle: None,
            ecu: None,
            expiring_within: None,
            audit: false,
            sort: SortKey::default(),
            desc: false,
            offset: 0,
            limit: 50,
        }
    }
}

/// Why a query or a record was refused: the field and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Invalid {
    pub field: String,
    pub reason: String,
}

fn invalid(field: &str, reason: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Printable text of at most [`MAX_TEXT`] bytes.
pub fn check_text(field: &str, s: &str) -> Result<(), Invalid> {
    if s.len() > MAX_TEXT {
        return Err(invalid(field, format!("longer than {MAX_TEXT} bytes")));
    }
    if s.chars().any(char::is_control) {
        return Err(invalid(field, "contains a control character"));
    }
    Ok(())
}

impl Query {
    /// Check the bounds a peer could abuse.
    pub fn validate(&self) -> Result<(), Invalid> {
        for (f, v) in [
            ("search", &self.search),
            ("server", &self.server),
            ("holder", &self.holder),
            ("vehicle", &self.vehicle),
            ("ecu", &self.ecu),
        ] {
            if let Some(v) = v {
                check_text(f, v)?;
            }
        }
        if self.limit == 0 || self.limit > MAX_PAGE {
            return Err(invalid("limit", format!("must be 1..={MAX_PAGE}")));
        }
        if self.offset > 10_000_000 {
            return Err(invalid("offset", "too far; narrow the search"));
        }
        if let Some(d) = self.expiring_within {
            if !(0..=100 * 365 * 86_400).contains(&d) {
                return Err(invalid("expiring_within", "must be 0..=100 years"));
            }
        }
        Ok(())
    }

    /// Whether `c` passes every filter at `now` (the embedded store's predicate and the
    /// reference the PostgreSQL store's SQL is tested against).
    pub fn matches(&self, c: &Credential, now: i64, expiring: i64) -> bool {
        if let Some(k) = self.kind {
            if c.kind != k {
                return false;
            }
        }
        if let Some(s) = self.op_state {
            if c.op_state != s {
                return false;
            }
        }
        if let Some(v) = self.validity {
            if c.validity(now, expiring) != v {
                return false;
            }
        }
        let eq = |want: &Option<String>, have: Option<&str>| match want {
            Some(w) => have == Some(w.as_str()),
            None => true,
        };
        if !eq(&self.server, Some(&c.server))
            || !eq(&self.holder, Some(&c.holder))
            || !eq(&self.vehicle, c.vehicle.as_deref())
            || !eq(&self.ecu, c.ecu.as_deref())
        {
            return false;
        }
        if let Some(w) = self.expiring_within {
            let ok = c.revoked_at.is_none()
                && matches!(c.not_after, Some(na) if na > now && na <= now.saturating_add(w));
            if !ok {
                return false;
            }
        }
        if self.audit && c.audit.is_empty() {
            return false;
        }
        if let Some(s) = &self.search {
            let s = s.to_lowercase();
            let hit = [
                Some(c.id.as_str()),
                Some(c.serial.as_str()),
                Some(c.holder.as_str()),
                c.vehicle.as_deref(),
                c.ecu.as_deref(),
                Some(c.server.as_str()),
            ]
            .into_iter()
            .flatten()
            .any(|f| f.to_lowercase().contains(&s));
            if !hit {
                return false;
            }
        }
        true
    }

    /// The ordering of two records under this query's sort (ties by id), the reference for
    /// both stores. `None` sorts before any value ascending.
    pub fn compare(&self, a: &Credential, b: &Credential) -> std::cmp::Ordering {
        use std::cmp::Ordering;
        let o: Ordering = match self.sort {
            SortKey::Id => Ordering::Equal,
            SortKey::Kind => a.kind.as_str().cmp(b.kind.as_str()),
            SortKey::Serial => a.serial.cmp(&b.serial),
            SortKey::Holder => a.holder.cmp(&b.holder),
            SortKey::Vehicle => a.vehicle.cmp(&b.vehicle),
            SortKey::Ecu => a.ecu.cmp(&b.ecu),
            SortKey::Server => a.server.cmp(&b.server),
            SortKey::NotBefore => a.not_before.cmp(&b.not_before),
            SortKey::NotAfter => a.not_after.cmp(&b.not_after),
            SortKey::OpState => a.op_state.as_str().cmp(b.op_state.as_str()),
            SortKey::OpDate => a.op_date.cmp(&b.op_date),
            SortKey::LastSeen => a.last_seen.cmp(&b.last_seen),
        };
        let o = o.then_with(|| a.id.cmp(&b.id));
        if self.desc {
            o.reverse()
        } else {
            o
        }
    }
}

/// One page of a query's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    pub rows: Vec<Credential>,
    /// Rows matching the filters, counted up to [`COUNT_CAP`].
    pub total: u64,
    /// False when `total` stopped at the cap.
    pub exact: bool,
}

/// Counting stops here: an admin needs "more than 100,000", not the precise figure, and a
/// precise count of a million filtered rows would cost more than the page itself.
pub const COUNT_CAP: u64 = 100_000;

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(serial: &str, na: i64) -> Credential {
        let mut c = Credential::new(
            Credential::cert_id(serial),
            Kind::Certificate,
            serial.into(),
            "dev-1".into(),
            0,
        );
        c.not_before = Some(0);
        c.not_after = Some(na);
        c
    }

    #[test]
    fn validity_follows_the_dates_and_revocation() {
        let mut c = cert("01", 1000);
        assert_eq!(c.validity(10, 100), Validity::Valid);
        assert_eq!(c.validity(900, 100), Validity::Expiring);
        assert_eq!(c.validity(1000, 100), Validity::Expired);
        assert_eq!(c.validity(-5, 100), Validity::Future);
        c.revoked_at = Some(5);
        assert_eq!(c.validity(10, 100), Validity::Revoked);
    }

    #[test]
    fn the_names_round_trip_and_match_serde() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
        for s in OpState::ALL {
            assert_eq!(OpState::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        for s in JobState::ALL {
            assert_eq!(JobState::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        for s in SortKey::ALL {
            assert_eq!(SortKey::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        for s in Validity::ALL {
            assert_eq!(Validity::parse(s.as_str()), Some(s));
        }
        for s in Operation::ALL {
            assert_eq!(Operation::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn terminal_job_states_never_move() {
        for a in JobState::ALL.into_iter().filter(|s| s.is_terminal()) {
            for b in JobState::ALL {
                assert!(!a.may_become(b), "{a:?} -> {b:?}");
            }
        }
        assert!(JobState::Queued.may_become(JobState::Delivered));
        assert!(!JobState::Queued.may_become(JobState::Succeeded));
    }

    #[test]
    fn history_is_bounded() {
        let mut c = cert("02", 10);
        for i in 0..(MAX_HISTORY as i64 + 10) {
            c.log(i, "x", "t", "");
        }
        assert_eq!(c.history.len(), MAX_HISTORY);
        assert_eq!(c.history[0].at, 10);
    }

    #[test]
    fn the_query_filters_and_sorts() {
        let a = cert("0a", 100);
        let mut b = cert("0b", 50);
        b.holder = "dev-2".into();
        b.vehicle = Some("VIN1".into());
        let q = Query {
            search: Some("DEV-2".into()),
            ..Query::default()
        };
        assert!(!q.matches(&a, 0, 10) && q.matches(&b, 0, 10));
        let q = Query {
            expiring_within: Some(60),
            ..Query::default()
        };
        assert!(!q.matches(&a, 0, 10) && q.matches(&b, 0, 10));
        let q = Query::default();
        assert_eq!(q.compare(&a, &b), std::cmp::Ordering::Greater);
        let q = Query {
            sort: SortKey::Vehicle,
            ..Query::default()
        };
        assert_eq!(q.compare(&a, &b), std::cmp::Ordering::Less);
        let bad = Query {
            limit: 0,
            ..Query::default()
        };
        assert_eq!(bad.validate().unwrap_err().field, "limit");
        let bad = Query {
            search: Some("x".repeat(300)),
            ..Query::default()
        };
        assert_eq!(bad.validate().unwrap_err().field, "search");
    }
}
