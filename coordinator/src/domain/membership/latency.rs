//! Latency: each replica's EWMA, each member's smoothed latency and mean deviation (RFC 6298,
//! as TCP's retransmission timer), and what follows from them: the hedge delay and stragglers.

use std::time::Duration;

use super::{Membership, MembershipConfig, ReplicaId};

/// A replica's latency EWMA, seconds.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct ReplicaLatency {
    ewma: Option<f64>,
    samples: u64,
}

impl ReplicaLatency {
    /// A request answered in `secs`.
    pub(super) fn observe(&mut self, secs: f64, alpha: f64) {
        self.samples += 1;
        self.ewma = Some(match self.ewma {
            None => secs,
            Some(e) => e + alpha * (secs - e),
        });
    }

    /// A request given up after `secs`: its latency is at least that, so the EWMA moves up
    /// towards it, never down; not a sample.
    fn at_least(&mut self, secs: f64, alpha: f64) {
        self.ewma = Some(match self.ewma {
            None => secs,
            Some(e) if secs > e => e + alpha * (secs - e),
            Some(e) => e,
        });
    }

    /// The EWMA (None before the first timed request).
    pub(super) fn ewma(&self) -> Option<Duration> {
        self.ewma.and_then(|s| Duration::try_from_secs_f64(s).ok())
    }

    /// Timed requests.
    pub(super) fn samples(&self) -> u64 {
        self.samples
    }
}

/// A member's smoothed latency and mean deviation over all its replicas' requests, seconds.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct MemberLatency {
    srtt: Option<(f64, f64)>,
    samples: u64,
}

impl MemberLatency {
    /// A request answered in `secs` (Jacobson/Karels).
    pub(super) fn observe(&mut self, secs: f64, alpha: f64, beta: f64) {
        self.samples += 1;
        self.srtt = Some(match self.srtt {
            // RFC 6298 §2.2: the first sample sets SRTT = R, RTTVAR = R/2.
            None => (secs, secs / 2.0),
            Some((srtt, var)) => {
                let var = var + beta * ((srtt - secs).abs() - var);
                (srtt + alpha * (secs - srtt), var)
            }
        });
    }

    /// `max(hedge_min, srtt + hedge_deviations · rttvar)` once `hedge_min_samples` requests
    /// were timed (None before, or with hedging off).
    fn hedge_delay(&self, cfg: &MembershipConfig) -> Option<Duration> {
        if !cfg.hedge || self.samples < cfg.hedge_min_samples {
            return None;
        }
        let (srtt, var) = self.srtt?;
        let secs = srtt + cfg.hedge_deviations * var;
        let after = Duration::try_from_secs_f64(secs).unwrap_or(cfg.hedge_min);
        Some(after.max(cfg.hedge_min))
    }
}

impl Membership {
    /// A request to replica `id` was given up unanswered after `elapsed` because a hedged copy
    /// answered first: its latency is at least `elapsed`, so its EWMA moves up towards it (never
    /// down). Its failure count, its sample count and the member's smoothed latency are left
    /// alone (the request neither failed nor was timed to the end).
    pub fn record_slow(&mut self, id: ReplicaId, elapsed: Duration) {
        let alpha = self.cfg.latency_alpha;
        if let Some(r) = self.replicas.get_mut(&id) {
            r.latency.at_least(elapsed.as_secs_f64(), alpha);
        }
    }

    /// How long to wait for a request to `member` before sending a hedged copy to another
    /// replica (None: hedging off, not enough samples yet, or no other replica to send it to).
    pub fn hedge_after(&self, member: &str) -> Option<Duration> {
        let after = self.members.get(member)?.latency.hedge_delay(&self.cfg)?;
        self.in_rotation(member).nth(1).is_some().then_some(after)
    }

    /// Whether replica `id` is much slower than the fastest in-rotation replica of its member
    /// (both with at least `hedge_min_samples` timed requests).
    pub fn is_straggler(&self, id: ReplicaId) -> bool {
        let Some(r) = self.replicas.get(&id) else {
            return false;
        };
        let min_samples = self.cfg.hedge_min_samples;
        let Some(mine) = r.latency.ewma.filter(|_| r.latency.samples >= min_samples) else {
            return false;
        };
        let fastest = self
            .in_rotation(&r.member)
            .filter(|(other, o)| **other != id && o.latency.samples >= min_samples)
            .filter_map(|(_, o)| o.latency.ewma)
            .fold(f64::INFINITY, f64::min);
        fastest.is_finite() && mine > self.cfg.straggler_factor * fastest
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::super::testutil::*;
    use super::super::*;
    use super::*;

    #[test]
    fn a_member_latency_follows_rfc_6298() {
        // By hand: 10 ms sets SRTT 10, RTTVAR 5; 30 ms: RTTVAR = 5 + (|10 − 30| − 5)/4 = 8.75,
        // SRTT = 10 + (30 − 10)/8 = 12.5.
        let mut l = MemberLatency::default();
        l.observe(0.010, 0.125, 0.25);
        assert_eq!(l.srtt, Some((0.010, 0.005)));
        l.observe(0.030, 0.125, 0.25);
        let (srtt, var) = l.srtt.unwrap();
        assert!(
            (srtt - 0.0125).abs() < 1e-12 && (var - 0.00875).abs() < 1e-12,
            "{l:?}"
        );
        let cfg = MembershipConfig {
            hedge_min_samples: 2,
            ..MembershipConfig::default()
        };
        // 12.5 + 4 × 8.75 = 47.5 ms.
        let h = l.hedge_delay(&cfg).unwrap();
        assert!((h.as_secs_f64() - 0.0475).abs() < 1e-9, "{h:?}");
        assert_eq!(
            l.hedge_delay(&MembershipConfig::default()),
            None,
            "8 samples needed"
        );
    }

    #[test]
    fn a_replica_latency_is_an_ewma_that_a_given_up_request_only_raises() {
        let mut l = ReplicaLatency::default();
        assert_eq!(l.ewma(), None);
        l.observe(0.100, 0.125);
        l.observe(0.200, 0.125);
        // 100 + (200 − 100)/8 = 112.5 ms.
        assert!((l.ewma.unwrap() - 0.1125).abs() < 1e-12);
        l.at_least(0.050, 0.125);
        assert!((l.ewma.unwrap() - 0.1125).abs() < 1e-12);
        assert_eq!(l.samples(), 2);
        let mut fresh = ReplicaLatency::default();
        fresh.at_least(0.3, 0.125);
        assert_eq!(fresh.ewma(), Some(Duration::from_millis(300)));
        assert_eq!(fresh.samples(), 0);
    }

    #[test]
    fn hedge_after_is_the_smoothed_latency_plus_four_deviations() {
        let mut m = membership();
        let t0 = Instant::now();
        let r1 = register(&mut m, "b", "http://h:1", t0).replica;
        assert_eq!(m.hedge_after("b"), None, "no samples");
        for _ in 0..8 {
            let _ = m.record_success(r1, Duration::from_millis(10));
        }
        assert_eq!(m.hedge_after("b"), None, "no other replica to hedge to");
        let _r2 = register(&mut m, "b", "http://h:2", t0).replica;
        // Computed by hand from RFC 6298: the first sample sets SRTT = 10 ms, RTTVAR = 5 ms;
        // each of the 7 equal samples after it leaves SRTT and multiplies RTTVAR by 3/4, so
        // RTTVAR = 5 ms · 0.75^7 = 0.66742 ms and SRTT + 4·RTTVAR = 12.66968 ms.
        let h = m.hedge_after("b").unwrap();
        let want = 0.010 + 4.0 * 0.005 * 0.75f64.powi(7);
        assert!((h.as_secs_f64() - want).abs() < 1e-9, "{h:?} vs {want}");
        assert_eq!(m.hedge_after("a"), None);
        assert_eq!(m.hedge_after("zzz"), None);
        // Never below hedge_min.
        let mut fast = membership();
        let f1 = register(&mut fast, "b", "http://h:1", t0).replica;
        let _ = register(&mut fast, "b", "http://h:2", t0);
        for _ in 0..8 {
            let _ = fast.record_success(f1, Duration::from_micros(10));
        }
        assert_eq!(fast.hedge_after("b"), Some(fast.config().hedge_min));
    }

    #[test]
    fn a_replica_much_slower_than_the_fastest_is_a_straggler() {
        let mut m = membership();
        let t0 = Instant::now();
        let fast = register(&mut m, "b", "http://h:1", t0).replica;
        let slow = register(&mut m, "b", "http://h:2", t0).replica;
        for _ in 0..8 {
            let _ = m.record_success(fast, Duration::from_millis(10));
            let _ = m.record_success(slow, Duration::from_millis(50));
        }
        assert!(m.is_straggler(slow));
        assert!(!m.is_straggler(fast));
        let ewma = m.replica(slow).unwrap().latency.unwrap();
        assert!((ewma.as_secs_f64() - 0.050).abs() < 1e-9);
        // With the fast one out of rotation there is nobody to compare with.
        let _ = m.record_failure(fast, t0);
        let _ = m.record_failure(fast, t0);
        assert!(!m.is_straggler(slow));
    }

    #[test]
    fn a_request_given_up_for_its_hedge_only_raises_the_latency_estimate() {
        let mut m = membership();
        let t0 = Instant::now();
        let r = register(&mut m, "b", "http://h:1", t0).replica;
        let _other = register(&mut m, "b", "http://h:2", t0);
        m.record_slow(r, Duration::from_millis(40));
        assert_eq!(
            m.replica(r).unwrap().latency,
            Some(Duration::from_millis(40))
        );
        for _ in 0..8 {
            let _ = m.record_success(r, Duration::from_millis(10));
        }
        let _ = m.record_failure(r, t0);
        let before = m.replica(r).unwrap();
        let hedge = m.hedge_after("b");
        // A shorter wait says nothing: the estimate stays.
        m.record_slow(r, Duration::from_millis(1));
        assert_eq!(m.replica(r).unwrap().latency, before.latency);
        // A longer one moves it up by α of the gap; failures, counts and the member's smoothed
        // latency (hence the hedge delay) are untouched.
        m.record_slow(r, Duration::from_millis(810));
        let after = m.replica(r).unwrap();
        let want = before.latency.unwrap().as_secs_f64()
            + 0.125 * (0.810 - before.latency.unwrap().as_secs_f64());
        assert!((after.latency.unwrap().as_secs_f64() - want).abs() < 1e-9);
        assert_eq!(after.consecutive_failures, 1);
        assert_eq!(after.answered, 8);
        assert_eq!(m.hedge_after("b"), hedge);
        m.record_slow(999, Duration::from_secs(1)); // unknown: ignored
    }

    #[test]
    fn hedging_can_be_turned_off() {
        let t0 = Instant::now();
        let mut m = Membership::new(
            MembershipConfig {
                hedge: false,
                ..cfg()
            },
            [("b".to_string(), vec![])],
        )
        .unwrap();
        let r1 = register(&mut m, "b", "http://h:1", t0).replica;
        let _ = register(&mut m, "b", "http://h:2", t0);
        for _ in 0..8 {
            let _ = m.record_success(r1, Duration::from_millis(10));
        }
        assert_eq!(m.hedge_after("b"), None);
    }
}
