//! The fixed schedule of a run with synchronisation rounds: which batches each worker trains in
//! each round, decided when the round starts, so that the student is a function of the seed and
//! the number of workers, never of timing.
//!
//! A pure value owned by [`super::run_state::RunState`], which decides when a round is planned
//! and performs what the plan says. Semantics, decided here:
//! - **Members.** A round's members are the workers with an open stream when it is planned,
//!   in worker order. A worker that joins mid-round waits for the next one; a member that dies
//!   leaves the round (its leases go back in line and the round closes without it).
//! - **Assignment.** The round's batches are leased at once, in turn: the first batch in the
//!   ledger's line to the first member, the next to the second, and so on, until each member
//!   holds `every` batches or the line is empty (the end of an epoch, where the members get
//!   what is left, at most one apart). Each member is sent its batches in that order, as its
//!   credits allow.
//! - **Contributions.** A member whose quota is `every` contributes on its own after its
//!   `every`th update; one with fewer (the end of an epoch, a batch that could not be prepared)
//!   is asked once all of its batches are acked, so every member contributes exactly the
//!   updates of its planned batches, and the round closes when all have.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::ledger::{Lease, Worker};

/// One member's part of a round.
#[derive(Debug, Default)]
struct Part {
    /// Planned leases not yet handed to the stream.
    waiting: VecDeque<Lease>,
    /// Batches it is to train in the round (planned, less those that could not be prepared).
    quota: u64,
    /// Whether it was asked to contribute.
    asked: bool,
}

/// The current round's plan.
#[derive(Debug)]
pub struct RoundPlan {
    every: u64,
    parts: BTreeMap<Worker, Part>,
}

impl RoundPlan {
    /// Plans a round for `members` with `every` updates each; `lease` gives the next batch in
    /// line for a member (None: the line is empty). Returns None when no batch was leased.
    pub fn plan<E>(
        members: &BTreeSet<Worker>,
        every: u64,
        mut lease: impl FnMut(&Worker) -> Result<Option<Lease>, E>,
    ) -> Result<Option<Self>, E> {
        let mut parts: BTreeMap<Worker, Part> = members
            .iter()
            .map(|w| (w.clone(), Part::default()))
            .collect();
        let mut any = false;
        'rounds: for _ in 0..every {
            for (w, part) in parts.iter_mut() {
                match lease(w)? {
                    Some(l) => {
                        part.waiting.push_back(l);
                        part.quota += 1;
                        any = true;
                    }
                    None => break 'rounds,
                }
            }
        }
        Ok(any.then_some(Self { every, parts }))
    }

    /// The round's members still in it.
    pub fn members(&self) -> BTreeSet<Worker> {
        self.parts.keys().cloned().collect()
    }

    /// Whether `worker` is a member.
    pub fn contains(&self, worker: &Worker) -> bool {
        self.parts.contains_key(worker)
    }

    /// Whether no member is left.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// The next planned lease of `worker`, to be prepared and sent now.
    pub fn next_lease(&mut self, worker: &Worker) -> Option<Lease> {
        self.parts.get_mut(worker)?.waiting.pop_front()
    }

    /// A batch of `worker` could not be prepared and went back in line: one update fewer.
    pub fn lost_one(&mut self, worker: &Worker) {
        if let Some(p) = self.parts.get_mut(worker) {
            p.quota = p.quota.saturating_sub(1);
        }
    }

    /// `worker` left the round; its planned leases (the ledger takes them back).
    pub fn remove(&mut self, worker: &Worker) -> Vec<Lease> {
        self.parts
            .remove(worker)
            .map(|p| p.waiting.into())
            .unwrap_or_default()
    }

    /// Whether `worker` must be asked to contribute now: it is a member, its quota is short of
    /// `every` (so it will not contribute on its own), `idle` (everything it was sent is acked
    /// and nothing is left to send) and it was not asked yet. Marks it asked.
    pub fn ask_if_due(&mut self, worker: &Worker, idle: bool) -> bool {
        let every = self.every;
        match self.parts.get_mut(worker) {
            Some(p) if idle && !p.asked && p.waiting.is_empty() && p.quota < every => {
                p.asked = true;
                true
            }
            _ => false,
        }
    }

    /// Per member, its quota (for logs and tests).
    pub fn quotas(&self) -> BTreeMap<Worker, u64> {
        self.parts
            .iter()
            .map(|(w, p)| (w.clone(), p.quota))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ledger::BatchId;
    use std::time::Instant;

    fn line(n: u32) -> impl FnMut(&Worker) -> Result<Option<Lease>, ()> {
        let mut next = 0u32;
        move |w: &Worker| {
            if next >= n {
                return Ok(None);
            }
            next += 1;
            Ok(Some(Lease {
                id: u64::from(next),
                batch: BatchId {
                    epoch: 0,
                    index: next - 1,
                },
                samples: vec![],
                worker: w.clone(),
                deadline: Instant::now(),
            }))
        }
    }

    fn indices(p: &mut RoundPlan, w: &Worker) -> Vec<u32> {
        std::iter::from_fn(|| p.next_lease(w))
            .map(|l| l.batch.index)
            .collect()
    }

    #[test]
    fn batches_are_dealt_in_turn_and_an_epochs_end_is_shared() {
        let (a, b) = (Worker::new("a", 1), Worker::new("b", 1));
        let members: BTreeSet<_> = [b.clone(), a.clone()].into_iter().collect();
        let mut p = RoundPlan::plan(&members, 3, line(100)).unwrap().unwrap();
        assert_eq!(indices(&mut p, &a), [0, 2, 4]);
        assert_eq!(indices(&mut p, &b), [1, 3, 5]);
        assert!(
            !p.ask_if_due(&a, true),
            "a full quota contributes on its own"
        );
        // Three batches left at the end of an epoch: two for a, one for b.
        let mut p = RoundPlan::plan(&members, 3, line(3)).unwrap().unwrap();
        assert_eq!(p.quotas().into_values().collect::<Vec<_>>(), [2, 1]);
        assert!(!p.ask_if_due(&b, true), "b still has a batch to be sent");
        assert_eq!(indices(&mut p, &b), [1]);
        assert!(!p.ask_if_due(&b, false), "not while its batch is unacked");
        assert!(p.ask_if_due(&b, true));
        assert!(!p.ask_if_due(&b, true), "asked once");
        // An empty line plans nothing.
        assert!(RoundPlan::plan(&members, 3, line(0)).unwrap().is_none());
    }

    #[test]
    fn a_member_that_leaves_hands_back_its_planned_leases() {
        let (a, b) = (Worker::new("a", 1), Worker::new("b", 1));
        let members: BTreeSet<_> = [a.clone(), b.clone()].into_iter().collect();
        let mut p = RoundPlan::plan(&members, 2, line(100)).unwrap().unwrap();
        assert_eq!(p.next_lease(&b).map(|l| l.batch.index), Some(1));
        let back: Vec<u32> = p.remove(&b).iter().map(|l| l.batch.index).collect();
        assert_eq!(back, [3]);
        assert_eq!(p.members(), [a.clone()].into_iter().collect());
        // A lost preparation shortens a's quota: it is then asked.
        p.lost_one(&a);
        assert_eq!(indices(&mut p, &a), [0, 2]);
        assert!(p.ask_if_due(&a, true));
    }
}
