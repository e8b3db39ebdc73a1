//! Replica health: `failure_threshold` consecutive failed requests take a replica out of
//! rotation; out of rotation it is probed with exponential backoff and seeded jitter until a
//! probe (or any request) succeeds.

use std::time::{Duration, Instant};

use super::{
    Event, Membership, MembershipConfig, ModelIdentity, Probe, ProbeKind, RemovalReason, ReplicaId,
};

/// Probing state of a replica out of rotation.
#[derive(Debug, Clone)]
struct Probing {
    /// Failed probes so far.
    attempt: u32,
    next_due: Instant,
    /// Handed to the driver and not yet reported.
    in_flight: bool,
}

/// The health of one replica: its failure count, and its probes while out of rotation.
#[derive(Debug, Clone, Default)]
pub(super) struct ReplicaHealth {
    failures: u32,
    /// `None`: in rotation.
    probing: Option<Probing>,
}

impl ReplicaHealth {
    /// Whether requests go to it.
    pub(super) fn in_rotation(&self) -> bool {
        self.probing.is_none()
    }

    /// Failed requests since the last success.
    pub(super) fn failures(&self) -> u32 {
        self.failures
    }

    /// When its next probe is due (None: in rotation, or a probe is in flight).
    pub(super) fn next_probe(&self) -> Option<Instant> {
        self.probing
            .as_ref()
            .filter(|p| !p.in_flight)
            .map(|p| p.next_due)
    }

    /// A failed request; true when this failure reaches `threshold` for a replica in rotation
    /// (the caller then takes it out with [`ReplicaHealth::take_out`]).
    fn failed(&mut self, threshold: u32) -> bool {
        self.failures = self.failures.saturating_add(1);
        self.probing.is_none() && self.failures >= threshold.max(1)
    }

    /// Out of rotation (or still out) after `attempt` failed probes; the next is due at `due`.
    pub(super) fn take_out(&mut self, attempt: u32, due: Instant) {
        self.probing = Some(Probing {
            attempt,
            next_due: due,
            in_flight: false,
        });
    }

    /// It answered a request or a probe: the failure count restarts; true if it was out.
    pub(super) fn answered(&mut self) -> bool {
        self.failures = 0;
        self.probing.take().is_some()
    }

    /// Marks its probe as handed out if one is due at `now`; true if so.
    fn claim_probe(&mut self, now: Instant) -> bool {
        match self.probing.as_mut() {
            Some(p) if !p.in_flight && now >= p.next_due => {
                p.in_flight = true;
                true
            }
            _ => false,
        }
    }

    /// The process at its address started again: probe it at `now` instead of waiting out
    /// the backoff.
    pub(super) fn restart_probes(&mut self, now: Instant) {
        if let Some(p) = self.probing.as_mut() {
            p.attempt = 0;
            p.next_due = now;
        }
    }

    /// Failed probes so far (None: in rotation).
    fn probe_attempts(&self) -> Option<u32> {
        self.probing.as_ref().map(|p| p.attempt)
    }
}

/// Probe delays: probe `n` (from 0) waits `min(initial · 2ⁿ, max) · (1 − jitter · u)`, `u` in
/// [0, 1) from SplitMix64 seeded with the config's `seed`.
#[derive(Debug, Clone)]
pub(super) struct ProbeBackoff {
    initial: Duration,
    max: Duration,
    jitter: f64,
    rng: u64,
}

impl ProbeBackoff {
    /// The backoff of `cfg`'s probe settings, its generator seeded with `cfg.seed`.
    pub(super) fn new(cfg: &MembershipConfig) -> Self {
        Self {
            initial: cfg.probe_initial,
            max: cfg.probe_max,
            jitter: cfg.probe_jitter.clamp(0.0, 1.0),
            rng: cfg.seed,
        }
    }

    /// The delay before probe `attempt` (0 = the first probe), with jitter.
    fn delay(&mut self, attempt: u32) -> Duration {
        let base = self
            .initial
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.max);
        base.mul_f64(1.0 - self.jitter * self.next_unit())
    }

    /// A uniform draw in [0, 1) from SplitMix64 (Steele, Lea & Flood 2014).
    fn next_unit(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Membership {
    /// A request to replica `id` failed at `now`: an error, a timeout, a reply that is not
    /// `[rows, classes]` finite values, or a refusal of a request another replica accepted.
    pub fn record_failure(&mut self, id: ReplicaId, now: Instant) -> Vec<Event> {
        let mut events = Vec::new();
        let threshold = self.cfg.failure_threshold;
        let Some(r) = self.replicas.get_mut(&id) else {
            return events;
        };
        if r.health.failed(threshold) {
            let delay = self.backoff.delay(0);
            r.health.take_out(0, now + delay);
            events.push(Event::OutOfRotation {
                member: r.member.clone(),
                replica: id,
                address: r.address.clone(),
                failures: r.health.failures(),
                first_probe_in: delay,
            });
            // Only a replica going out can change whether its member is up.
            self.member_transitions(&mut events);
        }
        events
    }

    /// When the next probe is due (None: no replica out of rotation waits for one).
    pub fn next_probe(&self) -> Option<Instant> {
        self.replicas
            .values()
            .filter_map(|r| r.health.next_probe())
            .min()
    }

    /// Replicas out of rotation or on trial whose probe is due at `now`; each is marked as
    /// being probed until the driver reports [`Membership::probe_succeeded`],
    /// [`Membership::probe_failed`] or (a trial) [`Membership::canary_disagreed`]. A trial
    /// names the replica to compare with ([`Membership::reference_for`]).
    pub fn due_probes(&mut self, now: Instant) -> Vec<Probe> {
        let due: Vec<ReplicaId> = self
            .replicas
            .iter_mut()
            .filter_map(|(&id, r)| r.health.claim_probe(now).then_some(id))
            .collect();
        due.into_iter()
            .filter_map(|id| {
                let r = self.replicas.get(&id)?;
                let kind = if r.on_trial {
                    ProbeKind::Trial {
                        reference: self.reference_for(&r.member, id),
                    }
                } else {
                    ProbeKind::Health
                };
                Some(Probe {
                    replica: id,
                    member: r.member.clone(),
                    address: r.address.clone(),
                    kind,
                })
            })
            .collect()
    }

    /// A replica on trial answered the canary rows other than the reference did (`detail`
    /// says how): it is removed, counted, and its address refused for `probe_max` (the
    /// longest wait between two checks), so it cannot register again at once.
    pub fn canary_disagreed(&mut self, id: ReplicaId, detail: &str, now: Instant) -> Vec<Event> {
        let mut events = Vec::new();
        let Some(r) = self.replicas.get(&id).filter(|r| r.on_trial) else {
            return events;
        };
        let (member, address) = (r.member.clone(), r.address.clone());
        let banned_for = self.cfg.probe_max;
        self.banned.insert(address.clone(), now + banned_for);
        if let Some(m) = self.members.get_mut(&member) {
            m.canary_refusals = m.canary_refusals.saturating_add(1);
        }
        events.push(Event::CanaryRefused {
            member,
            replica: id,
            address,
            detail: detail.into(),
            banned_for,
        });
        self.remove(id, RemovalReason::Disagreed, &mut events);
        self.member_transitions(&mut events);
        events
    }

    /// A probe of replica `id` answered; with `identity` (a Describe) it must still serve the
    /// member's model, or the probe counts as failed.
    pub fn probe_succeeded(
        &mut self,
        id: ReplicaId,
        identity: Option<ModelIdentity>,
        now: Instant,
    ) -> Vec<Event> {
        let Some(r) = self.replicas.get(&id) else {
            return Vec::new();
        };
        if let Some(identity) = identity {
            if let Err(e) = self.check_identity(&r.member, &r.address, &identity) {
                return self.probe_failed(id, &e.to_string(), now);
            }
            if let Some(r) = self.replicas.get_mut(&id) {
                r.identity = Some(identity);
            }
        }
        if let Some(r) = self.replicas.get_mut(&id).filter(|r| r.on_trial) {
            // Its trial passed: it serves the member's model, so its identity may pin.
            r.on_trial = false;
            r.health.answered();
            let (member, address) = (r.member.clone(), r.address.clone());
            if let Some(identity) = r.identity.clone() {
                self.pin_identity(&member, &identity);
            }
            let mut events = vec![Event::Admitted {
                member,
                replica: id,
                address,
            }];
            self.member_transitions(&mut events);
            return events;
        }
        let mut events: Vec<Event> = self
            .replicas
            .get_mut(&id)
            .and_then(|r| r.answered(id))
            .into_iter()
            .collect();
        self.member_transitions(&mut events);
        events
    }

    /// A probe of replica `id` failed at `now`; the next one is due after a longer delay.
    pub fn probe_failed(&mut self, id: ReplicaId, error: &str, now: Instant) -> Vec<Event> {
        let mut events = Vec::new();
        let Some(r) = self.replicas.get_mut(&id) else {
            return events;
        };
        // In rotation (a stale probe report, or an identity check of a healthy replica
        // failed): it is taken out now, as if by its first failed probe.
        let was_in = r.health.in_rotation();
        let attempt = r.health.probe_attempts().map_or(0, |a| a.saturating_add(1));
        let delay = self.backoff.delay(attempt);
        r.health.take_out(attempt, now + delay);
        events.push(if was_in {
            Event::OutOfRotation {
                member: r.member.clone(),
                replica: id,
                address: r.address.clone(),
                failures: r.health.failures(),
                first_probe_in: delay,
            }
        } else {
            Event::ProbeFailed {
                member: r.member.clone(),
                replica: id,
                address: r.address.clone(),
                attempt,
                next_probe_in: delay,
                error: error.into(),
            }
        });
        self.member_transitions(&mut events);
        events
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::super::testutil::*;
    use super::super::*;

    #[test]
    fn failures_take_a_replica_out_then_probes_with_backoff_until_one_succeeds() {
        let mut m = membership();
        let t0 = Instant::now();
        let id = register(&mut m, "b", "http://h:1", t0).replica;
        let other = register(&mut m, "b", "http://h:2", t0).replica;
        // A success in between resets the count.
        assert!(m.record_failure(id, t0).is_empty());
        assert!(m.record_success(id, Duration::from_millis(5)).is_empty());
        assert!(m.record_failure(id, t0).is_empty());
        assert_eq!(m.replica(id).unwrap().consecutive_failures, 1);
        // The second consecutive failure (threshold 2) takes it out.
        let events = m.record_failure(id, t0);
        let first_probe_in = match events.as_slice() {
            [
                Event::OutOfRotation {
                    replica,
                    failures: 2,
                    first_probe_in,
                    ..
                },
            ] if *replica == id => *first_probe_in,
            other => panic!("{other:?}"),
        };
        // probe_initial 100 ms, jitter 0.5: in (50 ms, 100 ms].
        assert!(
            first_probe_in > Duration::from_millis(50)
                && first_probe_in <= Duration::from_millis(100),
            "{first_probe_in:?}"
        );
        assert_eq!(m.replica(id).unwrap().health, Health::OutOfRotation);
        assert_eq!(
            m.rotation("b").iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![other]
        );
        assert!(m.is_up("b"), "the other replica is still in rotation");
        assert_eq!(m.next_deadline(), Some(t0 + first_probe_in));
        // Not due yet.
        assert!(
            m.due_probes(t0 + first_probe_in - Duration::from_nanos(1))
                .is_empty()
        );
        let mut now = t0 + first_probe_in;
        let mut delays = vec![first_probe_in];
        for attempt in 1..=6u32 {
            let due = m.due_probes(now);
            assert_eq!(
                due,
                vec![Probe {
                    replica: id,
                    member: "b".into(),
                    address: "http://h:1".into(),
                    kind: ProbeKind::Health,
                }]
            );
            // Handed out once until reported.
            assert!(m.due_probes(now + secs(100)).is_empty());
            let events = m.probe_failed(id, "connection refused", now);
            let next = match events.as_slice() {
                [
                    Event::ProbeFailed {
                        attempt: a,
                        next_probe_in,
                        error,
                        ..
                    },
                ] if *a == attempt && error == "connection refused" => *next_probe_in,
                other => panic!("{other:?}"),
            };
            let base = Duration::from_millis(100 * (1 << attempt)).min(Duration::from_millis(1000));
            assert!(
                next > base / 2 && next <= base,
                "attempt {attempt}: {next:?}"
            );
            delays.push(next);
            now += next;
        }
        // Capped at probe_max (with jitter) from attempt 4 on.
        assert!(
            delays[4..]
                .iter()
                .all(|d| *d <= Duration::from_millis(1000))
        );
        let due = m.due_probes(now);
        assert_eq!(due.len(), 1);
        let events = m.probe_succeeded(id, Some(identity(DIGEST_A)), now);
        assert_eq!(
            events,
            vec![Event::BackInRotation {
                member: "b".into(),
                replica: id,
                address: "http://h:1".into(),
            }]
        );
        let r = m.replica(id).unwrap();
        assert_eq!((r.health, r.consecutive_failures), (Health::InRotation, 0));
        assert_eq!(m.rotation("b").len(), 2);
        assert!(m.due_probes(now + secs(1000)).is_empty());
    }

    #[test]
    fn probe_delays_are_deterministic_for_a_seed() {
        let delays = |seed: u64| {
            let mut m = Membership::new(
                MembershipConfig { seed, ..cfg() },
                [("a".to_string(), vec!["http://s1:1".to_string()])],
            )
            .unwrap();
            let t0 = Instant::now();
            let _ = m.record_failure(1, t0);
            let _ = m.record_failure(1, t0);
            (0..5)
                .map(|_| {
                    m.probe_failed(1, "down", t0)
                        .into_iter()
                        .find_map(|e| match e {
                            Event::ProbeFailed { next_probe_in, .. } => Some(next_probe_in),
                            _ => None,
                        })
                        .unwrap()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(delays(7), delays(7));
        assert_ne!(delays(7), delays(8));
        // Without jitter the delays are exactly 200, 400, 800, 1000, 1000 ms.
        let mut m = Membership::new(
            MembershipConfig {
                probe_jitter: 0.0,
                ..cfg()
            },
            [("a".to_string(), vec!["http://s1:1".to_string()])],
        )
        .unwrap();
        let t0 = Instant::now();
        let _ = m.record_failure(1, t0);
        let out = m.record_failure(1, t0);
        assert!(matches!(
            out.as_slice(),
            [Event::OutOfRotation { first_probe_in, .. }, Event::MemberDown { .. }]
                if *first_probe_in == Duration::from_millis(100)
        ));
        let got: Vec<Duration> = (0..5)
            .map(|_| match m.probe_failed(1, "down", t0).as_slice() {
                [Event::ProbeFailed { next_probe_in, .. }] => *next_probe_in,
                other => panic!("{other:?}"),
            })
            .collect();
        let ms = |v: u64| Duration::from_millis(v);
        assert_eq!(got, vec![ms(200), ms(400), ms(800), ms(1000), ms(1000)]);
    }

    #[test]
    fn a_member_is_down_when_all_its_replicas_are_out_and_up_when_one_returns() {
        let mut m = membership();
        let t0 = Instant::now();
        let r1 = register(&mut m, "b", "http://h:1", t0).replica;
        let r2 = register(&mut m, "b", "http://h:2", t0).replica;
        for _ in 0..2 {
            let _ = m.record_failure(r1, t0);
        }
        assert!(m.is_up("b"));
        let _ = m.record_failure(r2, t0);
        let events = m.record_failure(r2, t0);
        assert_eq!(
            events.last(),
            Some(&Event::MemberDown { member: "b".into() })
        );
        assert!(!m.is_up("b"));
        assert!(m.rotation("b").is_empty());
        assert_eq!(m.replicas("b").len(), 2);
        // A late success of an in-flight request counts as a sign of life.
        let events = m.record_success(r2, Duration::from_millis(3));
        assert_eq!(
            events,
            vec![
                Event::BackInRotation {
                    member: "b".into(),
                    replica: r2,
                    address: "http://h:2".into(),
                },
                Event::MemberUp { member: "b".into() },
            ]
        );
        // The static member `a` was never affected.
        assert!(m.is_up("a"));
        // Expiry of the only replica in rotation takes the member down as well.
        let _ = m.heartbeat(r1, "http://h:1", SECRET, Load::default(), t0 + secs(5));
        let events = m.tick(t0 + secs(10));
        assert_eq!(removed(&events), vec![(r2, RemovalReason::Expired)]);
        assert_eq!(
            events.last(),
            Some(&Event::MemberDown { member: "b".into() })
        );
        assert_eq!(
            m.replicas("b").len(),
            1,
            "r1 renewed its lease and stays, out of rotation"
        );
    }

    #[test]
    fn registering_an_address_that_is_out_of_rotation_makes_its_probe_due_at_once() {
        let mut m = membership();
        let t0 = Instant::now();
        let id = register(&mut m, "b", "http://h:1", t0).replica;
        let _ = m.record_failure(id, t0);
        let _ = m.record_failure(id, t0);
        let _ = m.due_probes(t0 + secs(1));
        let _ = m.probe_failed(id, "down", t0 + secs(1));
        // The second probe is due 100..=200 ms after the first failed.
        let t = t0 + Duration::from_millis(1001);
        assert!(m.due_probes(t).is_empty());
        // The same process registering again (it holds the lease secret).
        let reg = m
            .register("b", "http://h:1", identity(DIGEST_A), renewal(), t)
            .value
            .unwrap();
        assert!(reg.renewed);
        assert_eq!(m.replica(id).unwrap().health, Health::OutOfRotation);
        assert_eq!(m.due_probes(t).len(), 1);
    }
}
