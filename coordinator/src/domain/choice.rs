//! Which replica of a member gets a request: least expected completion time, with exploration.
//!
//! - A replica's *cost* is `(busy + 1) × ratio`, where `ratio` is its latency EWMA over the
//!   fastest candidate's (ratios under [`SIMILAR`] count as 1, so replicas of about the same
//!   speed share the load by requests in flight; an untimed replica counts as 1, so it is
//!   tried) and `busy` is the larger of the requests this coordinator has in flight there and
//!   the count the replica last reported (a teacher shared with other runs is busier than our
//!   own count says). A replica three times slower thus gets a request only when the fast ones
//!   have three in flight each.
//! - A replica at its reported `max_in_flight` is chosen only when every candidate is.
//! - Ties go round-robin: the pick number rotates which candidate wins a tie.
//! - A timed replica not chosen for [`EXPLORE_EVERY`] picks of its member is chosen once (its
//!   estimate may be stale: a straggler that recovered is noticed), except for a retry, which
//!   goes to the best candidate.

use std::time::Duration;

use super::membership::ReplicaId;

/// Latency ratios (to the fastest candidate) below this count as equal when choosing.
pub const SIMILAR: f64 = 1.5;

/// A replica not chosen for this many requests of its member is chosen once.
pub const EXPLORE_EVERY: u64 = 32;

/// One replica that may get the request, as the choice sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// The replica.
    pub id: ReplicaId,
    /// Its latency EWMA (None: not timed yet).
    pub latency: Option<Duration>,
    /// Requests this coordinator has in flight there.
    pub outstanding: usize,
    /// Requests in flight there at its last heartbeat.
    pub reported: Option<u32>,
    /// Its stated in-flight limit (0: not stated).
    pub max_in_flight: u32,
    /// The member's pick number when it was last chosen (0: never).
    pub last_pick: u64,
}

/// The index in `candidates` (in id order) of the replica that gets pick number `pick` of its
/// member (`pick` counts from 1); `retry` turns exploration off. None when there is no
/// candidate.
pub fn choose(candidates: &[Candidate], pick: u64, retry: bool) -> Option<usize> {
    if !retry
        && let Some((i, _)) = candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| {
                c.latency.is_some() && pick.saturating_sub(c.last_pick) > EXPLORE_EVERY
            })
            .min_by_key(|(_, c)| c.last_pick)
    {
        return Some(i);
    }
    let fastest = candidates
        .iter()
        .filter_map(|c| c.latency)
        .min()
        .map(|d| d.as_secs_f64().max(1e-9));
    let n = candidates.len().max(1);
    let rotate = (pick % n as u64) as usize;
    candidates
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let ratio = match (c.latency, fastest) {
                (Some(l), Some(f)) => l.as_secs_f64() / f,
                _ => 1.0,
            };
            let ratio = if ratio < SIMILAR { 1.0 } else { ratio };
            let busy = c.outstanding.max(c.reported.unwrap_or(0) as usize);
            let full = c.max_in_flight > 0 && busy >= c.max_in_flight as usize;
            let turn = (i + n - rotate) % n;
            (i, full, busy.saturating_add(1) as f64 * ratio, turn)
        })
        .min_by(|a, b| a.1.cmp(&b.1).then(a.2.total_cmp(&b.2)).then(a.3.cmp(&b.3)))
        .map(|(i, ..)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Option<Duration> {
        Some(Duration::from_millis(v))
    }

    fn c(id: ReplicaId, latency: Option<Duration>) -> Candidate {
        Candidate {
            id,
            latency,
            outstanding: 0,
            reported: None,
            max_in_flight: 0,
            last_pick: 0,
        }
    }

    /// The ids chosen for picks `from..from + n`, every chosen replica's `last_pick` updated.
    fn picks(cands: &mut [Candidate], from: u64, n: u64) -> Vec<ReplicaId> {
        (from..from + n)
            .map(|pick| {
                let i = choose(cands, pick, false).unwrap();
                cands[i].last_pick = pick;
                cands[i].id
            })
            .collect()
    }

    #[test]
    fn nothing_to_choose_from_is_none() {
        assert_eq!(choose(&[], 1, false), None);
        assert_eq!(choose(&[], 1, true), None);
    }

    #[test]
    fn replicas_of_similar_speed_take_turns() {
        // 10 ms and 14 ms: a ratio of 1.4 counts as equal. Pick 1 rotates the ties by one.
        let mut cands = [c(1, ms(10)), c(2, ms(14)), c(3, None)];
        assert_eq!(picks(&mut cands, 1, 6), vec![2, 3, 1, 2, 3, 1]);
    }

    #[test]
    fn a_slow_replica_gets_a_request_only_when_the_fast_ones_are_busy() {
        // Latencies whose ratio is exactly 3 in binary floating point.
        let mut fast = c(1, ms(250));
        let slow = c(2, ms(750));
        // Both idle: costs 1 and 3.
        assert_eq!(choose(&[fast, slow], 1, false), Some(0));
        // Two in flight at the fast one: cost 3 against 3, a tie broken by turn.
        fast.outstanding = 2;
        assert_eq!(choose(&[fast, slow], 2, false), Some(0));
        assert_eq!(choose(&[fast, slow], 3, false), Some(1));
        // Three in flight: 4 against 3.
        fast.outstanding = 3;
        assert_eq!(choose(&[fast, slow], 2, false), Some(1));
    }

    #[test]
    fn the_reported_load_counts_when_it_is_more_than_ours() {
        let mut a = c(1, ms(10));
        let b = c(2, ms(10));
        a.reported = Some(50);
        assert_eq!(choose(&[a, b], 1, false), Some(1));
        assert_eq!(choose(&[a, b], 2, false), Some(1));
        // Ours is more: ours counts.
        a.reported = Some(0);
        a.outstanding = 2;
        assert_eq!(choose(&[a, b], 1, false), Some(1));
    }

    #[test]
    fn a_replica_at_its_stated_limit_is_chosen_only_when_every_one_is() {
        let mut a = c(1, ms(10));
        let mut b = c(2, ms(20));
        b.reported = Some(8);
        b.max_in_flight = 8;
        a.reported = Some(40);
        // `a` costs 41 and `b` 9 × 2, but `b` is full.
        assert_eq!(choose(&[a, b], 1, false), Some(0));
        a.max_in_flight = 40;
        // Both full: cost decides.
        assert_eq!(choose(&[a, b], 1, false), Some(1));
    }

    #[test]
    fn a_timed_replica_not_chosen_for_a_while_is_explored_except_on_a_retry() {
        let mut cands = [c(1, ms(10)), c(2, ms(100))];
        cands[0].last_pick = 40;
        cands[1].last_pick = 7;
        assert_eq!(choose(&cands, 40, false), Some(1), "40 − 7 > 32");
        assert_eq!(
            choose(&cands, 40, true),
            Some(0),
            "a retry goes to the best"
        );
        assert_eq!(
            choose(&cands, 39, false),
            Some(0),
            "39 − 7 = 32 is not more"
        );
        // Untimed replicas are never explored (they count as fast anyway).
        cands[1].latency = None;
        assert_eq!(
            choose(&cands, 40, false),
            Some(0),
            "untimed: ratio 1, a tie"
        );
        assert_eq!(choose(&cands, 41, false), Some(1), "the tie's other turn");
    }

    #[test]
    fn over_many_picks_a_straggler_is_chosen_once_per_exploration_period() {
        let mut cands = [c(1, ms(10)), c(2, ms(1500))];
        cands[1].last_pick = 1;
        let chosen = picks(&mut cands, 2, 99);
        let slow: Vec<u64> = (2..101u64)
            .zip(&chosen)
            .filter(|(_, id)| **id == 2)
            .map(|(pick, _)| pick)
            .collect();
        assert_eq!(slow, vec![34, 67, 100]);
    }
}
