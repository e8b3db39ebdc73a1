//! The run's one table of worker identities and their batch streams.
//!
//! A worker is `(id, incarnation)` ([`Worker`]); each `Join` of an id makes its next incarnation
//! the current one. A current incarnation may have one open batch stream ([`StreamId`]): the
//! stream holds the worker's credits (its prefetch window), the leases being prepared for it in
//! lease order, the leases sent and not yet acked, and what it was last sent of the rounds.
//! Once that stream closes the incarnation has left: it must join again (as the next
//! incarnation) to take part. [`super::run_state::RunState`] owns the table; nothing else keeps
//! worker identity: the ledger only records which incarnation holds each lease, the rounds are
//! given the live set ([`WorkerTable::live`]), and the table's incarnations are persisted with
//! each commit point so that a restored run still fences off the old processes.
//!
//! **Who may be a worker id.** Each incarnation holds a session secret, handed out with its
//! `Join`: its `Hello` must present it, and so must a `Join` of the same id while that
//! incarnation is *held* — its stream is open, or it joined less than `hold` ago (the Hello
//! deadline) and has not left. So another holder of the worker credential cannot fence a
//! working worker by joining with its id (ids are listed by `RunStatus`) nor open a stream as
//! it; a worker whose stream broke rejoins with its secret; once an incarnation has left (its
//! stream closed, or it never opened one in time) or the run was restored, its id is free to
//! join without one.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use super::claim::Claim;
use super::ledger::{BatchId, Worker};
use distill_transport::secret::secrets_match;

/// A batch stream, numbered in opening order.
pub type StreamId = u64;

/// A lease being prepared for a stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Preparing {
    /// The lease.
    pub lease_id: u64,
    /// Its batch.
    pub batch: BatchId,
    /// Set once its soft targets are ready: (from the cache, degraded).
    pub ready: Option<(bool, bool)>,
}

/// One open batch stream.
#[derive(Debug, Clone)]
pub struct Stream {
    /// Whose stream it is.
    pub worker: Worker,
    /// Credits left: how many more batches the worker will take now.
    pub credits: u32,
    /// Leases being prepared, in lease order (sent in that order).
    pub preparing: VecDeque<Preparing>,
    /// Leases sent and not yet acked; an ack of one of these returns its credit.
    pub in_flight: BTreeSet<u64>,
    /// The round version of the parameters it was last sent.
    pub sent_version: u64,
    /// The epoch whose barrier it was asked to help pass with a non-final round.
    pub asked_commit: Option<u32>,
    /// Whether it was asked for its final contribution.
    pub asked_final: bool,
}

impl Stream {
    /// Credits in use or held: what the cap on a worker's credits bounds.
    pub fn credits_held(&self) -> u64 {
        u64::from(self.credits) + self.preparing.len() as u64 + self.in_flight.len() as u64
    }
}

/// One worker id.
#[derive(Debug, Clone, Default)]
struct Entry {
    incarnation: u64,
    stream: Option<StreamId>,
    /// Its stream closed: this incarnation takes no further part.
    left: bool,
    /// Training rows acked since its last contribution to a round: its weight in the next one.
    rows_since_contribution: u64,
    /// The incarnation's session secret (empty for a restored one, which has left).
    secret: String,
    /// When it joined (None for a restored one).
    joined_at: Option<Instant>,
}

impl Entry {
    /// Whether a Join of this id needs the incarnation's secret at `now` (see the module docs).
    fn held(&self, now: Instant, hold: Duration) -> bool {
        !self.left
            && (self.stream.is_some()
                || self
                    .joined_at
                    .is_some_and(|t| now < t.checked_add(hold).unwrap_or(t)))
    }
}

/// Why a worker may not do what it asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkerError {
    /// The id never joined.
    #[error("worker `{0}` has not joined this run")]
    Unknown(String),
    /// A newer incarnation replaced it.
    #[error("worker `{id}` incarnation {incarnation} was replaced by incarnation {current}")]
    Replaced {
        id: String,
        incarnation: u64,
        current: u64,
    },
    /// It already has an open stream.
    #[error("worker {0} already has an open batch stream")]
    StreamOpen(Worker),
    /// Its stream closed; it must join again.
    #[error("worker {0} has left the run (its batch stream closed); join again")]
    Left(Worker),
    /// Another process holds the id, and this request does not present its session secret.
    #[error(
        "worker id `{id}` is in the run (incarnation {incarnation}); only the process holding its session secret may join or open a stream as `{id}` (another process joins under another id, or after that incarnation left)"
    )]
    Held { id: String, incarnation: u64 },
}

/// The incarnation a join replaces, with its open stream if it has one.
pub type Replaced = (Worker, Option<StreamId>);

/// Every worker id of the run and the open streams.
#[derive(Debug, Clone, Default)]
pub struct WorkerTable {
    workers: BTreeMap<String, Entry>,
    streams: BTreeMap<StreamId, Stream>,
    next_stream: StreamId,
    next_auto_id: u64,
}

impl WorkerTable {
    /// A table that knows the ids and current incarnations of a restored run. Every
    /// incarnation counts as left (its stream died with the previous coordinator): each worker
    /// joins again, as its next incarnation.
    pub fn restored(incarnations: impl IntoIterator<Item = (String, u64)>) -> Self {
        Self {
            workers: incarnations
                .into_iter()
                .map(|(id, incarnation)| {
                    (
                        id,
                        Entry {
                            incarnation,
                            left: true,
                            ..Entry::default()
                        },
                    )
                })
                .collect(),
            ..Self::default()
        }
    }

    /// The next incarnation of `requested_id` (a fresh `worker-N` id when empty), and the
    /// incarnation it replaces with that one's stream, if any; refused when that incarnation
    /// is held at `now` and `presented` is not its secret. Nothing changes until
    /// [`Self::commit_join`].
    pub fn next_join(
        &mut self,
        requested_id: &str,
        presented: &str,
        now: Instant,
        hold: Duration,
    ) -> Result<(Worker, Option<Replaced>), WorkerError> {
        let id = if requested_id.is_empty() {
            loop {
                let id = format!("worker-{}", self.next_auto_id);
                self.next_auto_id += 1;
                if !self.workers.contains_key(&id) {
                    break id;
                }
            }
        } else {
            requested_id.to_string()
        };
        Ok(match self.workers.get(&id) {
            Some(e) => {
                if e.held(now, hold) && !secrets_match(&e.secret, presented) {
                    return Err(WorkerError::Held {
                        id,
                        incarnation: e.incarnation,
                    });
                }
                (
                    Worker::new(id.clone(), e.incarnation.saturating_add(1)),
                    Some((Worker::new(id, e.incarnation), e.stream)),
                )
            }
            None => (Worker::new(id, 1), None),
        })
    }

    /// Makes `worker` the current incarnation of its id at `now`, holding `claim.fresh` as
    /// its session secret (its rows count from zero).
    pub fn commit_join(&mut self, worker: &Worker, claim: &Claim, now: Instant) {
        self.workers.insert(
            worker.id.clone(),
            Entry {
                incarnation: worker.incarnation,
                stream: None,
                left: false,
                rows_since_contribution: 0,
                secret: claim.fresh.clone(),
                joined_at: Some(now),
            },
        );
    }

    /// Every id's current incarnation: what a commit point stores.
    pub fn incarnations(&self) -> BTreeMap<String, u64> {
        self.workers
            .iter()
            .map(|(id, e)| (id.clone(), e.incarnation))
            .collect()
    }

    /// The workers with an open stream: who takes part in the rounds.
    pub fn live(&self) -> BTreeSet<Worker> {
        self.streams.values().map(|s| s.worker.clone()).collect()
    }

    /// Checks that `worker` is the current incarnation of a joined id.
    pub fn check(&self, worker: &Worker) -> Result<(), WorkerError> {
        match self.workers.get(&worker.id) {
            None => Err(WorkerError::Unknown(worker.id.clone())),
            Some(e) if e.incarnation != worker.incarnation => Err(WorkerError::Replaced {
                id: worker.id.clone(),
                incarnation: worker.incarnation,
                current: e.incarnation,
            }),
            Some(_) => Ok(()),
        }
    }

    /// Whether `worker` is the current incarnation of its id.
    pub fn is_current(&self, worker: &Worker) -> bool {
        self.check(worker).is_ok()
    }

    /// Opens a stream for the current incarnation `worker`, presenting its session secret
    /// `secret`, with `credits`.
    pub fn open_stream(
        &mut self,
        worker: &Worker,
        secret: &str,
        credits: u32,
    ) -> Result<StreamId, WorkerError> {
        self.check(worker)?;
        let entry = self
            .workers
            .get_mut(&worker.id)
            .ok_or_else(|| WorkerError::Unknown(worker.id.clone()))?;
        if entry.left {
            return Err(WorkerError::Left(worker.clone()));
        }
        if !secrets_match(&entry.secret, secret) {
            return Err(WorkerError::Held {
                id: worker.id.clone(),
                incarnation: entry.incarnation,
            });
        }
        if entry.stream.is_some() {
            return Err(WorkerError::StreamOpen(worker.clone()));
        }
        let id = self.next_stream;
        self.next_stream += 1;
        entry.stream = Some(id);
        self.streams.insert(
            id,
            Stream {
                worker: worker.clone(),
                credits,
                preparing: VecDeque::new(),
                in_flight: BTreeSet::new(),
                sent_version: 0,
                asked_commit: None,
                asked_final: false,
            },
        );
        Ok(id)
    }

    /// Removes a stream; returns it, and whether its worker is still the current incarnation.
    pub fn close_stream(&mut self, stream: StreamId) -> Option<(Stream, bool)> {
        let s = self.streams.remove(&stream)?;
        let current = match self.workers.get_mut(&s.worker.id) {
            Some(e) if e.incarnation == s.worker.incarnation => {
                if e.stream == Some(stream) {
                    e.stream = None;
                    e.left = true;
                }
                true
            }
            _ => false,
        };
        Some((s, current))
    }

    /// The open stream of a worker id, if its current incarnation has one.
    pub fn stream_of(&self, worker: &Worker) -> Option<StreamId> {
        self.workers
            .get(&worker.id)
            .filter(|e| e.incarnation == worker.incarnation)
            .and_then(|e| e.stream)
    }

    /// A stream.
    pub fn stream(&self, id: StreamId) -> Option<&Stream> {
        self.streams.get(&id)
    }

    /// A stream, to change.
    pub fn stream_mut(&mut self, id: StreamId) -> Option<&mut Stream> {
        self.streams.get_mut(&id)
    }

    /// The open streams' ids, in opening order.
    pub fn stream_ids(&self) -> Vec<StreamId> {
        self.streams.keys().copied().collect()
    }

    /// Open streams.
    pub fn open_streams(&self) -> usize {
        self.streams.len()
    }

    /// The stream preparing lease `lease_id`.
    pub fn preparing_stream(&self, lease_id: u64) -> Option<StreamId> {
        self.streams
            .iter()
            .find(|(_, s)| s.preparing.iter().any(|p| p.lease_id == lease_id))
            .map(|(&id, _)| id)
    }

    /// Counts `rows` acked by `worker_id` towards its next contribution.
    pub fn add_rows(&mut self, worker_id: &str, rows: u64) {
        if let Some(e) = self.workers.get_mut(worker_id) {
            e.rows_since_contribution = e.rows_since_contribution.saturating_add(rows);
        }
    }

    /// The rows acked by `worker_id` since its last contribution, and starts counting again.
    pub fn take_rows(&mut self, worker_id: &str) -> u64 {
        self.workers
            .get_mut(worker_id)
            .map_or(0, |e| std::mem::take(&mut e.rows_since_contribution))
    }

    /// The rows acked by `worker_id` since its last contribution.
    pub fn rows(&self, worker_id: &str) -> u64 {
        self.workers
            .get(worker_id)
            .map_or(0, |e| e.rows_since_contribution)
    }

    /// Per open stream: its worker and how many batches are being prepared for it.
    pub fn queue_depths(&self) -> Vec<(String, usize)> {
        self.streams
            .values()
            .map(|s| (s.worker.id.clone(), s.preparing.len()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const HOLD: Duration = Duration::from_secs(30);

    fn claim(presented: &str, fresh: &str) -> Claim {
        Claim::new(presented, fresh)
    }

    /// Joins `id` at `now` presenting `presented`, holding `fresh`.
    fn join(
        t: &mut WorkerTable,
        id: &str,
        presented: &str,
        fresh: &str,
        now: Instant,
    ) -> Result<(Worker, Option<Replaced>), WorkerError> {
        let (w, prev) = t.next_join(id, presented, now, HOLD)?;
        t.commit_join(&w, &claim(presented, fresh), now);
        Ok((w, prev))
    }

    #[test]
    fn each_join_is_the_next_incarnation_and_fences_off_the_previous_one() {
        let mut t = WorkerTable::default();
        let t0 = Instant::now();
        let (w1, prev) = join(&mut t, "w", "", "s1", t0).unwrap();
        assert_eq!((w1.clone(), prev), (Worker::new("w", 1), None));
        let s1 = t.open_stream(&w1, "s1", 4).unwrap();
        assert_eq!(
            t.open_stream(&w1, "s1", 4),
            Err(WorkerError::StreamOpen(w1.clone()))
        );
        assert_eq!(t.live(), BTreeSet::from([w1.clone()]));
        // The process holding the secret joins again (its stream broke, say).
        let (w2, prev) = join(&mut t, "w", "s1", "s2", t0).unwrap();
        assert_eq!(w2, Worker::new("w", 2));
        assert_eq!(prev, Some((w1.clone(), Some(s1))));
        assert_eq!(
            t.check(&w1),
            Err(WorkerError::Replaced {
                id: "w".into(),
                incarnation: 1,
                current: 2
            })
        );
        assert!(t.open_stream(&w1, "s1", 1).is_err());
        // The replaced incarnation's stream closes as not current.
        let (s, current) = t.close_stream(s1).unwrap();
        assert_eq!((s.worker, current), (w1, false));
        assert!(t.live().is_empty());
        assert_eq!(
            t.check(&Worker::new("x", 1)),
            Err(WorkerError::Unknown("x".into()))
        );
        // Empty ids get fresh names.
        let (auto, _) = join(&mut t, "", "", "s3", t0).unwrap();
        assert_eq!(auto, Worker::new("worker-0", 1));
    }

    #[test]
    fn a_held_id_takes_a_join_or_a_stream_only_with_its_session_secret() {
        let mut t = WorkerTable::default();
        let t0 = Instant::now();
        let (w, _) = join(&mut t, "w", "", "secret-1", t0).unwrap();
        let held = WorkerError::Held {
            id: "w".into(),
            incarnation: 1,
        };
        // Joined, no stream yet, within the hold: nobody else may take the id.
        for presented in ["", "secret-2", "secret-"] {
            assert_eq!(
                t.next_join("w", presented, t0 + HOLD / 2, HOLD).map(|_| ()),
                Err(held.clone())
            );
        }
        // Nor open its stream.
        assert_eq!(t.open_stream(&w, "", 2), Err(held.clone()));
        assert_eq!(t.open_stream(&w, "secret-2", 2), Err(held.clone()));
        let s = t.open_stream(&w, "secret-1", 2).unwrap();
        // With its stream open it is held however long ago it joined.
        assert_eq!(
            t.next_join("w", "", t0 + HOLD * 100, HOLD).map(|_| ()),
            Err(held.clone())
        );
        assert_eq!(t.check(&w), Ok(()), "a refused join changes nothing");
        // Once it has left, the id is free.
        let _ = t.close_stream(s).unwrap();
        let (next, prev) = join(&mut t, "w", "", "secret-3", t0 + HOLD * 100).unwrap();
        assert_eq!(
            (next.incarnation, prev.map(|(p, _)| p)),
            (2, Some(w.clone()))
        );
        // An incarnation that never opened a stream is free once the hold ran out.
        let (u, _) = join(&mut t, "u", "", "secret-u", t0).unwrap();
        assert!(t.next_join("u", "", t0 + HOLD, HOLD).is_ok());
        assert!(
            t.next_join("u", "", t0 + HOLD - Duration::from_millis(1), HOLD)
                .is_err()
        );
        assert_eq!(u.incarnation, 1);
    }

    #[test]
    fn an_incarnation_whose_stream_closed_has_left_and_so_has_every_restored_one() {
        let mut t = WorkerTable::default();
        let t0 = Instant::now();
        let (w, _) = join(&mut t, "w", "", "s", t0).unwrap();
        let s = t.open_stream(&w, "s", 1).unwrap();
        let (_, current) = t.close_stream(s).unwrap();
        assert!(current);
        assert_eq!(t.open_stream(&w, "s", 1), Err(WorkerError::Left(w.clone())));
        assert_eq!(t.incarnations(), BTreeMap::from([("w".to_string(), 1)]));
        // A restored run knows every id's incarnation, and each must join again (no secret
        // survives a restart: nothing holds the ids).
        let mut r = WorkerTable::restored(t.incarnations());
        assert_eq!(r.open_stream(&w, "s", 1), Err(WorkerError::Left(w.clone())));
        let (next, prev) = join(&mut r, "w", "", "s2", t0).unwrap();
        assert_eq!((next.incarnation, prev.map(|(p, _)| p)), (2, Some(w)));
        assert!(r.open_stream(&next, "s2", 1).is_ok());
    }
}
