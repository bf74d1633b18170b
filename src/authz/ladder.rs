//! The escalation ladder of issue 14 (seed 002's management part): what happens to a user
//! (or one of its credentials) that keeps sending invalid operation requests.
//!
//! Modelled on fail2ban's `maxretry` / `findtime` / `bantime.increment`: violations within
//! `findtime` that reach `maxretry` make one **offence**; the k-th offence takes `steps[k]`
//! (the last step repeats past the end): a warning, a lockout whose length grows with each
//! lockout (`base · factor^(n-1)`, at most `max`), a downgrade of the role, or the
//! revocation of the credential. A quiet `forget_after` resets the counts; an admin's lift
//! ends the measures in force.
//!
//! Pure: no clock (every event carries its time, in seconds), no I/O, no other module of the
//! crate. The owner task that will hold the states (`authz/service.rs`, not built yet: see
//! docs/design/operation-authorization.md) persists them and carries out the [`Effect`]s.
//!
//! Bounded: a state holds at most `maxretry` violation times, whatever a peer sends.

use std::collections::VecDeque;

/// One rung of the ladder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Log, warn the user in the answer, tell the cloud.
    Warn,
    /// Refuse every request for a while (growing with each lockout).
    Lockout,
    /// Cap the user's roles at `LadderConfig::downgrade_to` until an admin lifts it.
    Downgrade,
    /// Revoke the credential (absorbing: only a new credential leaves it).
    Revoke,
}

/// The lockout's length: the n-th lockout lasts `min(base · factor^(n-1), max)` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockoutCurve {
    pub base: i64,
    pub factor: u32,
    pub max: i64,
}

impl LockoutCurve {
    /// The length of the `n`-th lockout (1-based), saturating.
    pub fn length(&self, n: u32) -> i64 {
        let mut d = self.base.max(0);
        for _ in 1..n.max(1) {
            if d >= self.max {
                break;
            }
            d = d.saturating_mul(i64::from(self.factor));
        }
        d.min(self.max)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LadderConfig {
    /// Violations within `findtime` that make an offence.
    pub maxretry: u32,
    /// Seconds.
    pub findtime: i64,
    /// Seconds without a violation after which the offence and lockout counts are forgotten.
    pub forget_after: i64,
    pub steps: Vec<Step>,
    pub lockout: LockoutCurve,
    /// The role a downgrade caps the user at.
    pub downgrade_to: String,
}

impl Default for LadderConfig {
    fn default() -> Self {
        LadderConfig {
            maxretry: 3,
            findtime: 600,
            forget_after: 7 * 86_400,
            steps: vec![
                Step::Warn,
                Step::Lockout,
                Step::Lockout,
                Step::Lockout,
                Step::Downgrade,
                Step::Revoke,
            ],
            lockout: LockoutCurve {
                base: 60,
                factor: 2,
                max: 3_600,
            },
            downgrade_to: "guest".into(),
        }
    }
}

/// A ladder setting that cannot work: the field (below the ladder's section) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Invalid {
    pub field: &'static str,
    pub reason: &'static str,
}

impl LadderConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        let bad = |field, reason| Err(Invalid { field, reason });
        if self.maxretry == 0 || self.maxretry > 1_000 {
            return bad("maxretry", "must be 1 to 1000");
        }
        if self.findtime <= 0 {
            return bad("findtime", "must be positive");
        }
        if self.forget_after < self.findtime {
            return bad("forget_after", "must be at least findtime");
        }
        if self.steps.is_empty() || self.steps.len() > 64 {
            return bad("steps", "must have 1 to 64 steps");
        }
        if self.lockout.base <= 0 || self.lockout.max < self.lockout.base {
            return bad("lockout", "base must be positive and at most max");
        }
        if self.lockout.factor == 0 {
            return bad("lockout.factor", "must be at least 1");
        }
        if self.steps.contains(&Step::Downgrade) && self.downgrade_to.is_empty() {
            return bad("downgrade_to", "a downgrade step needs a role");
        }
        Ok(())
    }
}

/// One user's (or credential's) place on the ladder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    /// Times of the violations in the current window (at most `maxretry`).
    pub window: VecDeque<i64>,
    /// Offences so far (the next one takes `steps[offences]`).
    pub offences: u32,
    /// Lockouts so far (the next one is the `lockouts + 1`-th).
    pub lockouts: u32,
    pub last_violation: Option<i64>,
    pub locked_until: Option<i64>,
    pub downgraded_to: Option<String>,
    pub revoked: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An invalid request at `at`.
    Violation { at: i64 },
    /// Time passes (lockouts expire, counts are forgotten).
    Tick { at: i64 },
    /// An admin lifts the measures in force; with `reset_history` the counts go too.
    Lift { at: i64, reset_history: bool },
}

/// What the owner must do after a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Warned { offence: u32 },
    LockedOut { until: i64, lockout: u32 },
    LockoutExpired,
    Downgraded { to: String },
    Revoke,
    Lifted,
    Forgotten,
}

impl State {
    /// Locked out at `now`?
    pub fn locked(&self, now: i64) -> bool {
        self.revoked || self.locked_until.is_some_and(|u| now < u)
    }

    /// Apply `e`; the effects in the order they happened. A revoked state ignores
    /// everything but answers nothing new (only a new credential leaves it).
    pub fn step(&mut self, e: Event, cfg: &LadderConfig) -> Vec<Effect> {
        let mut out = Vec::new();
        if self.revoked {
            return out;
        }
        match e {
            Event::Tick { at } => self.expire(at, cfg, &mut out),
            Event::Violation { at } => {
                self.expire(at, cfg, &mut out);
                self.last_violation = Some(at);
                // While locked out, a violation is refused anyway: it does not climb.
                if self.locked(at) {
                    return out;
                }
                self.window.retain(|t| at.saturating_sub(*t) < cfg.findtime);
                self.window.push_back(at);
                while self.window.len() > cfg.maxretry as usize {
                    self.window.pop_front();
                }
                if self.window.len() >= cfg.maxretry as usize {
                    self.window.clear();
                    self.offence(at, cfg, &mut out);
                }
            }
            Event::Lift { at, reset_history } => {
                self.window.clear();
                self.locked_until = None;
                self.downgraded_to = None;
                if reset_history {
                    self.offences = 0;
                    self.lockouts = 0;
                }
                self.last_violation = Some(at);
                out.push(Effect::Lifted);
            }
        }
        out
    }

    fn offence(&mut self, at: i64, cfg: &LadderConfig, out: &mut Vec<Effect>) {
        // Past the end the last step repeats (`validate` refuses an empty ladder; an
        // unchecked one takes no step rather than panic).
        let Some(step) = cfg
            .steps
            .get(self.offences as usize)
            .or(cfg.steps.last())
            .copied()
        else {
            return;
        };
        self.offences = self.offences.saturating_add(1);
        match step {
            Step::Warn => out.push(Effect::Warned {
                offence: self.offences,
            }),
            Step::Lockout => {
                self.lockouts = self.lockouts.saturating_add(1);
                let until = at.saturating_add(cfg.lockout.length(self.lockouts));
                self.locked_until = Some(until);
                out.push(Effect::LockedOut {
                    until,
                    lockout: self.lockouts,
                });
            }
            Step::Downgrade => {
                self.downgraded_to = Some(cfg.downgrade_to.clone());
                out.push(Effect::Downgraded {
                    to: cfg.downgrade_to.clone(),
                });
            }
            Step::Revoke => {
                self.revoked = true;
                self.locked_until = None;
                out.push(Effect::Revoke);
            }
        }
    }

    fn expire(&mut self, at: i64, cfg: &LadderConfig, out: &mut Vec<Effect>) {
        if self.locked_until.is_some_and(|u| at >= u) {
            self.locked_until = None;
            out.push(Effect::LockoutExpired);
        }
        let quiet = self
            .last_violation
            .is_some_and(|l| at.saturating_sub(l) >= cfg.forget_after);
        if quiet && self.locked_until.is_none() && (self.offences > 0 || !self.window.is_empty()) {
            self.window.clear();
            self.offences = 0;
            self.lockouts = 0;
            out.push(Effect::Forgotten);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LadderConfig {
        LadderConfig {
            maxretry: 2,
            findtime: 10,
            forget_after: 1_000,
            ..LadderConfig::default()
        }
    }

    fn with_steps(steps: &[Step]) -> LadderConfig {
        LadderConfig {
            steps: steps.to_vec(),
            ..cfg()
        }
    }

    /// Two violations within `findtime` at `at` and `at + 1`.
    fn offence(s: &mut State, at: i64, c: &LadderConfig) -> Vec<Effect> {
        let mut e = s.step(Event::Violation { at }, c);
        e.extend(s.step(Event::Violation { at: at + 1 }, c));
        e
    }

    #[test]
    fn violation_below_maxretry_changes_nothing_but_the_window() {
        let c = cfg();
        let mut s = State::default();
        assert!(s.step(Event::Violation { at: 0 }, &c).is_empty());
        assert_eq!(s.window.len(), 1);
        assert_eq!(s.offences, 0);
        assert!(!s.locked(0));
    }

    #[test]
    fn violations_further_apart_than_findtime_never_make_an_offence() {
        let c = cfg();
        let mut s = State::default();
        for k in 0..100 {
            assert!(s.step(Event::Violation { at: k * 10 }, &c).is_empty());
        }
        assert_eq!(s.offences, 0);
        assert!(s.window.len() <= c.maxretry as usize);
    }

    #[test]
    fn offence_walks_warn_lockout_growing_downgrade_revoke() {
        let c = cfg();
        let mut s = State::default();
        assert_eq!(offence(&mut s, 0, &c), vec![Effect::Warned { offence: 1 }]);
        // Lockouts of 60, 120 and 240 s, each taken once the previous one expired.
        let mut at = 100;
        for (n, len) in [(1, 60), (2, 120), (3, 240)] {
            let e = offence(&mut s, at, &c);
            assert_eq!(
                e,
                vec![Effect::LockedOut {
                    until: at + 1 + len,
                    lockout: n
                }]
            );
            assert!(s.locked(at + len));
            assert!(!s.locked(at + 1 + len));
            at += 1 + len;
            assert_eq!(s.step(Event::Tick { at }, &c), vec![Effect::LockoutExpired]);
            at += 1;
        }
        assert_eq!(
            offence(&mut s, at, &c),
            vec![Effect::Downgraded { to: "guest".into() }]
        );
        assert_eq!(s.downgraded_to.as_deref(), Some("guest"));
        assert_eq!(offence(&mut s, at + 5, &c), vec![Effect::Revoke]);
        assert!(s.revoked && s.locked(i64::MAX));
    }

    #[test]
    fn revoked_is_absorbing() {
        let c = with_steps(&[Step::Revoke]);
        let mut s = State::default();
        assert_eq!(offence(&mut s, 0, &c), vec![Effect::Revoke]);
        let before = s.clone();
        assert!(s
            .step(
                Event::Lift {
                    at: 5,
                    reset_history: true
                },
                &c
            )
            .is_empty());
        assert!(s.step(Event::Tick { at: 1_000_000 }, &c).is_empty());
        assert_eq!(s, before);
    }

    #[test]
    fn violation_while_locked_out_does_not_climb() {
        let c = with_steps(&[Step::Lockout, Step::Revoke]);
        let mut s = State::default();
        offence(&mut s, 0, &c);
        for k in 2..50 {
            assert!(s.step(Event::Violation { at: k }, &c).is_empty());
        }
        assert_eq!(s.offences, 1);
        assert!(!s.revoked);
    }

    #[test]
    fn lockout_expired_on_tick_and_on_the_next_violation() {
        let c = with_steps(&[Step::Lockout]);
        let mut s = State::default();
        offence(&mut s, 0, &c);
        assert!(s.step(Event::Tick { at: 30 }, &c).is_empty());
        assert_eq!(
            s.step(Event::Violation { at: 61 }, &c),
            vec![Effect::LockoutExpired]
        );
        // The last step repeats: the next offence is the second lockout, twice as long.
        assert_eq!(
            s.step(Event::Violation { at: 62 }, &c),
            vec![Effect::LockedOut {
                until: 182,
                lockout: 2
            }]
        );
    }

    #[test]
    fn lift_ends_lockout_and_downgrade_and_keeps_the_history_unless_asked() {
        let c = with_steps(&[Step::Downgrade, Step::Lockout]);
        let mut s = State::default();
        offence(&mut s, 0, &c);
        offence(&mut s, 5, &c);
        assert!(s.locked(10) && s.downgraded_to.is_some());
        let lift = |reset_history| Event::Lift {
            at: 20,
            reset_history,
        };
        assert_eq!(s.step(lift(false), &c), vec![Effect::Lifted]);
        assert!(!s.locked(20) && s.downgraded_to.is_none());
        assert_eq!((s.offences, s.lockouts), (2, 1));
        s.step(lift(true), &c);
        assert_eq!((s.offences, s.lockouts), (0, 0));
    }

    #[test]
    fn forget_after_a_quiet_period_resets_the_counts() {
        let c = cfg();
        let mut s = State::default();
        offence(&mut s, 0, &c);
        assert_eq!(s.offences, 1);
        assert!(s.step(Event::Tick { at: 500 }, &c).is_empty());
        assert_eq!(
            s.step(Event::Tick { at: 1_001 }, &c),
            vec![Effect::Forgotten]
        );
        assert_eq!(s.offences, 0);
        // The ladder starts again at its first step.
        assert_eq!(
            offence(&mut s, 2_000, &c),
            vec![Effect::Warned { offence: 1 }]
        );
    }

    #[test]
    fn the_lockout_curve_saturates_at_max() {
        let l = LockoutCurve {
            base: 60,
            factor: 2,
            max: 3_600,
        };
        let got: Vec<i64> = (1..=8).map(|n| l.length(n)).collect();
        assert_eq!(got, vec![60, 120, 240, 480, 960, 1_920, 3_600, 3_600]);
        assert_eq!(l.length(u32::MAX), 3_600);
        let huge = LockoutCurve {
            base: i64::MAX / 2,
            factor: 1_000,
            max: i64::MAX,
        };
        assert_eq!(huge.length(10), i64::MAX);
    }

    #[test]
    fn a_bad_ladder_names_its_field() {
        let bad = |f: fn(&mut LadderConfig)| {
            let mut c = LadderConfig::default();
            f(&mut c);
            c.validate().unwrap_err().field
        };
        assert!(LadderConfig::default().validate().is_ok());
        assert_eq!(bad(|c| c.maxretry = 0), "maxretry");
        assert_eq!(bad(|c| c.findtime = 0), "findtime");
        assert_eq!(bad(|c| c.forget_after = 1), "forget_after");
        assert_eq!(bad(|c| c.steps.clear()), "steps");
        assert_eq!(bad(|c| c.lockout.base = 0), "lockout");
        assert_eq!(bad(|c| c.lockout.factor = 0), "lockout.factor");
        assert_eq!(bad(|c| c.downgrade_to.clear()), "downgrade_to");
    }
}
