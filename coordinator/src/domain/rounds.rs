//! Synchronisation rounds between student workers: local SGD / periodic model averaging.
//!
//! A pure state machine (STYLE.md §7): calls that depend on time take `now: Instant`, nothing
//! sleeps or does I/O; the driver ([`crate::driver`]) moves parameters on the wire and calls
//! [`SyncRounds::tick`] periodically.
//!
//! Semantics, decided here:
//! - **What is averaged.** Every `sync_every` local updates a worker sends its whole parameter
//!   set and the number of training rows it trained since it last took averaged parameters. A
//!   round's result is the average of the contributions weighted by those rows (all weights 0:
//!   plain mean). Optimizer state (momentum, Adam moments) stays local to each worker: moving it
//!   would double the traffic, and local-SGD practice (Lin et al. 2020, "Don't use large
//!   mini-batches, use local SGD") keeps it local. With `sync_every = 1` and plain SGD, averaging
//!   the parameters after one step from a common start equals averaging the gradients, which is
//!   synchronous data parallelism; with momentum or AdamW the local state makes it close to, not
//!   equal to, it.
//! - **Who is in a round.** The *live* workers: those with an open batch stream that have not
//!   made their final contribution. Who has a stream is the worker table's to know
//!   ([`super::workers::WorkerTable`]); each call that depends on it is given the live set. A
//!   round opens with its first contribution and closes when
//!   every live worker has contributed ([`CloseReason::AllReported`]), when a worker leaves and
//!   the rest have all reported ([`CloseReason::WorkerLeft`]), or `round_timeout` after it opened
//!   ([`CloseReason::Timeout`]; the workers that did not report are listed as `missing` and take
//!   part in the next round with all the rows they trained meanwhile). A contribution already in
//!   an open round stays in it if its worker dies: that work is real and its acks stand.
//! - **Joining.** A worker that joins mid-run starts from the latest average ([`SyncRounds::latest`]).
//! - **Only one contributor.** The average is its own parameters; the reply tells it to keep
//!   them (`unchanged`), so a lone worker pays only the upload.
//! - **Commit point.** Each contribution records the worker's highest ack sequence number when it
//!   was sent; once in a closed round those acks are in the averaged model's history
//!   ([`Closed::commits`], which the run hands to the ledger, the one keeper of commit points).
//!   Acks after it live only in the worker's own parameters and are lost with it: the run rolls
//!   them back. A dead worker's contribution in the open round will be averaged, so its acks
//!   through [`SyncRounds::pending_seq`] are not rolled back.
//! - **Gradient rounds** (`[sync] average = "gradients"`, [`SyncRounds::with_gradient_step`]):
//!   a contribution that trained rows carries that batch's gradients, computed at the latest
//!   parameters (a gradient on an older version is refused); one that trained none (in answer
//!   to `SyncNow`) carries parameters and weighs nothing. The round's result is one step of the
//!   run's [`GradientStep`] on the rows-weighted average of the gradients (a round without
//!   gradients leaves the parameters as they are), so it is parameters, as in every other mode.
//!   The run's seeded initial parameters are version 0.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use distill_proto::params::Param;

use super::gradient_step::GradientStep;
use super::ledger::Worker;

/// A parameter set shared between the round state and the senders.
pub type Params = Arc<Vec<Param>>;

/// One worker's parameters for a round.
#[derive(Debug, Clone)]
pub struct Contribution {
    /// Who sent it.
    pub worker: Worker,
    /// The averaged version it last took (0: its own initial weights).
    pub base_version: u64,
    /// Rows trained since then: the weight in the average.
    pub samples: u64,
    /// Its parameters, in model order.
    pub params: Params,
    /// Sent in answer to `SyncNow` (the worker will train nothing more).
    pub is_final: bool,
    /// The worker's highest ack sequence number when it sent this (0: none).
    pub last_ack_seq: u64,
    /// Bytes of parameter values it carried on the wire.
    pub wire_bytes: u64,
    /// `params` are the gradients of the batch it trained (a gradient-averaging run).
    pub gradients: bool,
}

/// Why a round closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Every live worker contributed.
    AllReported,
    /// A worker left and every remaining live worker had contributed.
    WorkerLeft,
    /// The round timeout passed.
    Timeout,
}

/// A closed round: the new average and who gets it.
#[derive(Debug, Clone)]
pub struct Closed {
    /// The round number, which is the version of `params`.
    pub version: u64,
    /// The average.
    pub params: Params,
    /// Contributors, each with whether it may keep its own parameters (`unchanged`).
    pub replies: Vec<(Worker, bool)>,
    /// Per contributor id, its highest ack sequence number now in the average.
    pub commits: Vec<(String, u64)>,
    /// Live workers that did not contribute (timeout).
    pub missing: Vec<Worker>,
    /// Rows trained in the round, all contributors together.
    pub samples: u64,
    /// From the first contribution to the close.
    pub seconds: f64,
    /// Parameter bytes uploaded in the round.
    pub up_bytes: u64,
    /// Why it closed.
    pub reason: CloseReason,
    /// The round's result could not be computed (a gradient round's optimizer step failed):
    /// the run cannot go on.
    pub error: Option<String>,
}

/// A mistake by a caller (a worker's message that does not fit the round state).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    /// The worker has no open stream (it left, or never joined).
    #[error("worker {0} is not in the synchronisation rounds")]
    NotLive(Worker),
    /// The worker already contributed to the open round.
    #[error("worker {0} already contributed to round {1}")]
    Duplicate(Worker, u64),
    /// Parameter sets of different shapes.
    #[error("the contribution of {0} does not match the parameters of the others: {1}")]
    Mismatch(Worker, String),
    /// Gradients where parameters were expected, or the other way round, or gradients taken
    /// at parameters that are no longer the latest.
    #[error("the contribution of {0} {1}")]
    Kind(Worker, String),
}

#[derive(Debug)]
struct OpenRound {
    opened: Instant,
    contribs: BTreeMap<Worker, Contribution>,
}

/// The synchronisation rounds of a run.
#[derive(Debug)]
pub struct SyncRounds {
    timeout: Duration,
    /// Step on the averaged change of a round with several contributors (1: plain average).
    outer_lr: f64,
    /// Nesterov momentum of the outer optimizer (0: none).
    outer_momentum: f64,
    /// The outer optimizer's momentum buffer, in model order (None: none yet).
    momentum: Option<Params>,
    version: u64,
    params: Option<Params>,
    /// Incarnations whose final contribution is in a closed round.
    finished: BTreeSet<Worker>,
    open: Option<OpenRound>,
    seconds_total: f64,
    up_bytes_total: u64,
    /// Gradient rounds: the optimizer that steps on each round's averaged gradients.
    gradient_step: Option<GradientStep>,
}

impl SyncRounds {
    /// No rounds yet; `latest` is a resumed average (its version and parameters), if any.
    pub fn new(round_timeout: Duration, latest: Option<(u64, Params)>) -> Self {
        let (version, params) = match latest {
            Some((v, p)) => (v, Some(p)),
            None => (0, None),
        };
        Self {
            timeout: round_timeout,
            outer_lr: 1.0,
            outer_momentum: 0.0,
            momentum: None,
            version,
            params,
            finished: BTreeSet::new(),
            open: None,
            seconds_total: 0.0,
            up_bytes_total: 0,
            gradient_step: None,
        }
    }

    /// Gradient rounds (synchronous data parallelism): each round's result is one step of
    /// `step` on the averaged gradients. `initial` are the run's seeded initial parameters, the
    /// latest ones until a round closes (a resumed average, restored after, replaces them).
    pub fn with_gradient_step(mut self, step: GradientStep, initial: Params) -> Self {
        if self.params.is_none() {
            self.params = Some(initial);
        }
        self.gradient_step = Some(step);
        self
    }

    /// Whether rounds average gradients.
    pub fn averages_gradients(&self) -> bool {
        self.gradient_step.is_some()
    }

    /// The gradient rounds' optimizer state as bytes (None in other modes).
    pub fn optimizer_state(&self) -> Option<Result<Vec<u8>, String>> {
        self.gradient_step.as_ref().map(GradientStep::state_bytes)
    }

    /// Restores the gradient rounds' optimizer state from a commit point.
    pub fn restore_optimizer(&mut self, bytes: &[u8]) -> Result<(), String> {
        match &mut self.gradient_step {
            Some(g) => g.restore(bytes),
            None => Ok(()),
        }
    }

    /// Rounds with several contributors step `outer_lr` times the averaged change from the
    /// previous round's parameters: `previous + outer_lr × (average − previous)` (see
    /// `[sync] outer_lr`). The first round, with no previous parameters here, is a plain
    /// average; so is every round at 1 (the default).
    pub fn with_outer_lr(mut self, outer_lr: f64) -> Self {
        self.outer_lr = outer_lr;
        self
    }

    /// An outer optimizer with Nesterov momentum `momentum` (0: none): each round's averaged
    /// change from the previous parameters is a pseudo-gradient `g = previous − average`, and
    /// `m ← momentum·m + g`, `new = previous − outer_lr·(g + momentum·m)` (DiLoCo's outer
    /// Nesterov SGD, in PyTorch's form). With momentum every round that trained rows takes the
    /// step, a lone contributor's too (the momentum is the run's, not the workers'); a round
    /// that trained nothing (the final ones) leaves the parameters and the momentum as they are.
    /// The first round, with no previous parameters here, is a plain average.
    pub fn with_outer_momentum(mut self, momentum: f64) -> Self {
        self.outer_momentum = momentum;
        self
    }

    /// The outer optimizer's momentum buffer (None without momentum or before its first step).
    pub fn momentum(&self) -> Option<Params> {
        self.momentum.clone()
    }

    /// Restores a resumed run's momentum buffer.
    pub fn restore_momentum(&mut self, momentum: Option<Params>) {
        if momentum.is_some() {
            self.momentum = momentum;
        }
    }

    /// The latest average and its version (None before the first round).
    pub fn latest(&self) -> Option<(u64, Params)> {
        self.params.as_ref().map(|p| (self.version, p.clone()))
    }

    /// Rounds closed (the current version).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Total seconds rounds were open, and parameter bytes uploaded, over all rounds.
    pub fn totals(&self) -> (f64, u64) {
        (self.seconds_total, self.up_bytes_total)
    }

    /// Restores a resumed run's latest average (version and parameters), if it had one.
    pub fn restore(&mut self, latest: Option<(u64, Params)>) {
        if let Some((version, params)) = latest {
            self.version = version;
            self.params = Some(params);
        }
    }

    /// The last ack sequence number of `worker`'s contribution in the open round, if it made
    /// one: those acks will be in the next average even if the worker is gone.
    pub fn pending_seq(&self, worker: &Worker) -> Option<u64> {
        self.open
            .as_ref()
            .and_then(|r| r.contribs.get(worker))
            .map(|c| c.last_ack_seq)
    }

    /// A worker's stream ended; `live` is who still has one. It no longer holds up rounds; the
    /// open round closes if everyone left in it has reported.
    pub fn leave(
        &mut self,
        worker: &Worker,
        live: &BTreeSet<Worker>,
        now: Instant,
    ) -> Option<Closed> {
        self.finished.remove(worker);
        if self.all_reported(live) {
            self.close(live, now, CloseReason::WorkerLeft)
        } else {
            None
        }
    }

    /// Whether every live worker has made its final contribution and no round is open: the
    /// latest average is the final student.
    pub fn all_final(&self, live: &BTreeSet<Worker>) -> bool {
        self.open.is_none() && live.iter().all(|w| self.finished.contains(w))
    }

    /// Whether `worker` has made its final contribution (and it was averaged).
    pub fn is_finished(&self, worker: &Worker) -> bool {
        self.finished.contains(worker)
    }

    /// A contribution from one of the `live` workers arrived; returns the closed round when it
    /// completes one.
    pub fn contribute(
        &mut self,
        c: Contribution,
        live: &BTreeSet<Worker>,
        now: Instant,
    ) -> Result<Option<Closed>, SyncError> {
        if !live.contains(&c.worker) {
            return Err(SyncError::NotLive(c.worker));
        }
        let round = self.open.get_or_insert_with(|| OpenRound {
            opened: now,
            contribs: BTreeMap::new(),
        });
        if round.contribs.contains_key(&c.worker) {
            return Err(SyncError::Duplicate(c.worker, self.version + 1));
        }
        let kind_error = match (self.gradient_step.is_some(), c.gradients) {
            (false, true) => Some("carries gradients, but this run averages parameters".into()),
            (true, false) if c.samples > 0 => Some(format!(
                "carries parameters after training {} rows; this run averages gradients",
                c.samples
            )),
            (true, true) if c.base_version != self.version => Some(format!(
                "carries gradients taken at version {}, but the latest is {}",
                c.base_version, self.version
            )),
            _ => None,
        };
        if let Some(msg) = kind_error {
            if round.contribs.is_empty() {
                self.open = None;
            }
            return Err(SyncError::Kind(c.worker, msg));
        }
        if let Some(first) = round.contribs.values().next() {
            check_same_shapes(&first.params, &c.params)
                .map_err(|msg| SyncError::Mismatch(c.worker.clone(), msg))?;
        } else if let Some(p) = &self.params {
            check_same_shapes(p, &c.params)
                .map_err(|msg| SyncError::Mismatch(c.worker.clone(), msg))?;
        }
        round.contribs.insert(c.worker.clone(), c);
        Ok(if self.all_reported(live) {
            self.close(live, now, CloseReason::AllReported)
        } else {
            None
        })
    }

    /// When the open round times out, if one is open.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.open.as_ref().map(|r| r.opened + self.timeout)
    }

    /// Closes the open round if its timeout has passed.
    pub fn tick(&mut self, live: &BTreeSet<Worker>, now: Instant) -> Option<Closed> {
        match self.next_deadline() {
            Some(d) if now >= d => self.close(live, now, CloseReason::Timeout),
            _ => None,
        }
    }

    fn all_reported(&self, live: &BTreeSet<Worker>) -> bool {
        let Some(round) = &self.open else {
            return false;
        };
        live.iter()
            .filter(|w| !self.finished.contains(w))
            .all(|w| round.contribs.contains_key(w))
    }

    fn close(
        &mut self,
        live: &BTreeSet<Worker>,
        now: Instant,
        reason: CloseReason,
    ) -> Option<Closed> {
        let round = self.open.take()?;
        if round.contribs.is_empty() {
            return None;
        }
        let contribs: Vec<&Contribution> = round.contribs.values().collect();
        let single = contribs.len() == 1;
        let samples: u64 = contribs
            .iter()
            .fold(0u64, |a, c| a.saturating_add(c.samples));
        let mut error = None;
        let average = if let Some(gs) = &mut self.gradient_step {
            let sets: Vec<_> = contribs
                .iter()
                .filter(|c| c.gradients && c.samples > 0)
                .map(|c| (c.samples, c.params.as_slice()))
                .collect();
            match &self.params {
                Some(prev) if !sets.is_empty() => match gs.step(prev, &average(&sets)) {
                    Ok(next) => Arc::new(next),
                    Err(e) => {
                        error = Some(e);
                        prev.clone()
                    }
                },
                Some(prev) => prev.clone(),
                None => {
                    error = Some("a gradient round without parameters to step from".into());
                    contribs[0].params.clone()
                }
            }
        } else if single {
            contribs[0].params.clone()
        } else {
            let sets: Vec<_> = contribs
                .iter()
                .map(|c| (c.samples, c.params.as_slice()))
                .collect();
            Arc::new(average(&sets))
        };
        let params = match &self.params {
            _ if self.gradient_step.is_some() => average,
            Some(prev) if self.outer_momentum > 0.0 && samples == 0 => prev.clone(),
            Some(prev) if self.outer_momentum > 0.0 => {
                let (next, m) = nesterov_step(
                    prev,
                    &average,
                    self.momentum.as_deref().map(Vec::as_slice),
                    self.outer_lr,
                    self.outer_momentum,
                );
                self.momentum = Some(Arc::new(m));
                Arc::new(next)
            }
            Some(prev) if !single && self.outer_lr != 1.0 => {
                Arc::new(scaled_step(prev, &average, self.outer_lr))
            }
            _ => average,
        };
        // A contributor may keep its own parameters when they are the result.
        let replies = contribs
            .iter()
            .map(|c| (c.worker.clone(), Arc::ptr_eq(&c.params, &params)))
            .collect();
        self.version += 1;
        self.params = Some(params.clone());
        let up_bytes = contribs.iter().map(|c| c.wire_bytes).sum();
        let seconds = now.saturating_duration_since(round.opened).as_secs_f64();
        self.seconds_total += seconds;
        self.up_bytes_total += up_bytes;
        for c in &contribs {
            if c.is_final {
                self.finished.insert(c.worker.clone());
            }
        }
        let missing = live
            .iter()
            .filter(|w| !round.contribs.contains_key(w) && !self.finished.contains(w))
            .cloned()
            .collect();
        Some(Closed {
            version: self.version,
            params,
            replies,
            commits: contribs
                .iter()
                .map(|c| (c.worker.id.clone(), c.last_ack_seq))
                .collect(),
            missing,
            samples,
            seconds,
            up_bytes,
            reason,
            error,
        })
    }
}

/// `prev + lr × (weighted average of sets − prev)`, accumulated in f64 (shapes as in
/// [`average`]; `prev` has the same shapes, checked when the contributions were accepted).
pub fn outer_step(prev: &[Param], sets: &[(u64, &[Param])], lr: f64) -> Vec<Param> {
    scaled_step(prev, &average(sets), lr)
}

/// `prev + lr × (average − prev)`, accumulated in f64.
fn scaled_step(prev: &[Param], average: &[Param], lr: f64) -> Vec<Param> {
    average
        .iter()
        .zip(prev)
        .map(|((name, shape, avg), (_, _, p))| {
            let v = avg
                .iter()
                .zip(p)
                .map(|(&a, &p)| (f64::from(p) + lr * (f64::from(a) - f64::from(p))) as f32)
                .collect();
            (name.clone(), shape.clone(), v)
        })
        .collect()
}

/// One step of Nesterov momentum SGD on the pseudo-gradient `g = prev − average`:
/// `m ← μ·m + g` (`m` starts at 0), `new = prev − lr·(g + μ·m)`; returns the new parameters and
/// the new momentum, accumulated in f64 (shapes as in [`average`]).
pub fn nesterov_step(
    prev: &[Param],
    average: &[Param],
    momentum: Option<&[Param]>,
    lr: f64,
    mu: f64,
) -> (Vec<Param>, Vec<Param>) {
    let mut next = Vec::with_capacity(prev.len());
    let mut moms = Vec::with_capacity(prev.len());
    for (i, ((name, shape, p), (_, _, a))) in prev.iter().zip(average).enumerate() {
        let m_old = momentum
            .and_then(|m| m.get(i))
            .map(|(_, _, v)| v.as_slice());
        let mut v = Vec::with_capacity(p.len());
        let mut m = Vec::with_capacity(p.len());
        for (j, (&p, &a)) in p.iter().zip(a).enumerate() {
            let g = f64::from(p) - f64::from(a);
            let m_prev = m_old.and_then(|m| m.get(j)).map_or(0.0, |&x| f64::from(x));
            let m_new = mu * m_prev + g;
            v.push((f64::from(p) - lr * (g + mu * m_new)) as f32);
            m.push(m_new as f32);
        }
        next.push((name.clone(), shape.clone(), v));
        moms.push((name.clone(), shape.clone(), m));
    }
    (next, moms)
}

fn check_same_shapes(a: &[Param], b: &[Param]) -> Result<(), String> {
    if a.len() != b.len() {
        return Err(format!("{} parameters, expected {}", b.len(), a.len()));
    }
    for ((na, sa, _), (nb, sb, _)) in a.iter().zip(b) {
        if na != nb || sa != sb {
            return Err(format!("`{nb}` {sb:?} where `{na}` {sa:?} was expected"));
        }
    }
    Ok(())
}

/// The weighted average of parameter sets of equal shapes, accumulated in f64. Weights are row
/// counts; when they are all 0 every set counts once.
pub fn average(sets: &[(u64, &[Param])]) -> Vec<Param> {
    // Saturating: row counts come from the ledger, but a sum must never wrap.
    let total: u64 = sets.iter().fold(0u64, |a, (w, _)| a.saturating_add(*w));
    let weights: Vec<f64> = if total == 0 {
        vec![1.0 / sets.len().max(1) as f64; sets.len()]
    } else {
        sets.iter().map(|(w, _)| *w as f64 / total as f64).collect()
    };
    let Some((_, first)) = sets.first() else {
        return Vec::new();
    };
    first
        .iter()
        .enumerate()
        .map(|(i, (name, shape, v0))| {
            let mut acc = vec![0f64; v0.len()];
            for ((_, set), &w) in sets.iter().zip(&weights) {
                for (a, &x) in acc.iter_mut().zip(&set[i].2) {
                    *a += w * f64::from(x);
                }
            }
            (
                name.clone(),
                shape.clone(),
                acc.into_iter().map(|a| a as f32).collect(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(vals: &[f32]) -> Params {
        Arc::new(vec![
            (
                "w".into(),
                vec![vals.len() - 1],
                vals[..vals.len() - 1].to_vec(),
            ),
            ("b".into(), vec![1], vec![vals[vals.len() - 1]]),
        ])
    }

    fn contrib(w: &Worker, samples: u64, vals: &[f32], seq: u64) -> Contribution {
        Contribution {
            worker: w.clone(),
            base_version: 0,
            samples,
            params: p(vals),
            is_final: false,
            last_ack_seq: seq,
            wire_bytes: 4 * vals.len() as u64,
            gradients: false,
        }
    }

    fn flat(ps: &Params) -> Vec<f32> {
        ps.iter().flat_map(|(_, _, v)| v.clone()).collect()
    }

    /// Gradient rounds for a logistic regression `mlp:1-2` (weight [2, 1], bias [2]) with plain
    /// SGD at lr 0.5; its parameters at version 0 are the seeded ones.
    fn gradient_rounds() -> (SyncRounds, Params) {
        let settings = distill_core::settings::StudentSettings {
            spec: distill_core::spec::ModelSpec {
                arch: distill_core::spec::Arch::parse("mlp:1-2").unwrap(),
                dropout: 0.0,
                input_dropout: 0.0,
            },
            optim: distill_core::optim::OptimConfig::sgd(0.5, 0.0),
            temperature: 2.0,
            alpha: 0.5,
            epochs: 1,
            batch_size: 4,
            seed: 1,
            checkpoint_every: 0,
            precision: Default::default(),
            init: None,
        };
        let (step, init) = GradientStep::new(&settings, 4, 2).unwrap();
        let init = Arc::new(init);
        let s =
            SyncRounds::new(Duration::from_secs(10), None).with_gradient_step(step, init.clone());
        (s, init)
    }

    fn grad(w: &Worker, samples: u64, g: [f32; 4], base_version: u64) -> Contribution {
        Contribution {
            params: Arc::new(vec![
                ("fc0.weight".into(), vec![2, 1], g[..2].to_vec()),
                ("fc0.bias".into(), vec![2], g[2..].to_vec()),
            ]),
            base_version,
            gradients: true,
            ..contrib(w, samples, &[0.0], 1)
        }
    }

    #[test]
    fn a_gradient_round_steps_the_optimizer_on_the_rows_weighted_average() {
        let t0 = Instant::now();
        let (w1, w2) = (Worker::new("a", 1), Worker::new("b", 1));
        let live: BTreeSet<Worker> = [w1.clone(), w2.clone()].into();
        let (mut s, init) = gradient_rounds();
        assert!(s.averages_gradients());
        assert_eq!(
            init.iter().map(|(n, _, _)| n.as_str()).collect::<Vec<_>>(),
            ["fc0.weight", "fc0.bias"]
        );
        assert_eq!(
            s.latest().unwrap().0,
            0,
            "the seeded parameters are version 0"
        );
        // Parameters after training rows, or a gradient taken at another version, are refused.
        let mut stale = grad(&w1, 1, [1.0, 1.0, 1.0, 1.0], 1);
        assert!(matches!(
            s.contribute(stale.clone(), &live, t0),
            Err(SyncError::Kind(..))
        ));
        stale.gradients = false;
        stale.base_version = 0;
        stale.params = init.clone();
        assert!(matches!(
            s.contribute(stale, &live, t0),
            Err(SyncError::Kind(..))
        ));
        // Weighted 1:3: the average gradient is (0.25·g1 + 0.75·g2); SGD moves by −0.5 × it.
        assert!(
            s.contribute(grad(&w1, 1, [4.0, -8.0, 2.0, 0.0], 0), &live, t0)
                .unwrap()
                .is_none()
        );
        let c = s
            .contribute(grad(&w2, 3, [0.0, 8.0, -2.0, 4.0], 0), &live, t0)
            .unwrap()
            .unwrap();
        assert!(c.error.is_none());
        let want: Vec<f32> = flat(&init)
            .iter()
            .zip([1.0f32, 4.0, -1.0, 3.0])
            .map(|(p, g)| p - 0.5 * g)
            .collect();
        assert_eq!(flat(&c.params), want);
        assert_eq!(c.version, 1);
        assert!(c.replies.iter().all(|(_, unchanged)| !unchanged));
        // Final contributions (parameters, no rows) leave the parameters as they are.
        let done = |w: &Worker| Contribution {
            params: c.params.clone(),
            base_version: 1,
            is_final: true,
            ..contrib(w, 0, &[0.0], 1)
        };
        let _ = s.contribute(done(&w1), &live, t0).unwrap();
        let f = s.contribute(done(&w2), &live, t0).unwrap().unwrap();
        assert_eq!(flat(&f.params), want);
        assert!(s.optimizer_state().unwrap().is_ok());
    }

    #[test]
    fn averaging_known_sets_is_exact() {
        let a = p(&[1.0, 2.0, -4.0]);
        let b = p(&[3.0, 6.0, 4.0]);
        let c = p(&[0.5, 0.25, 0.0]);
        // Equal weights.
        let m = average(&[(10, &a), (10, &b)]);
        assert_eq!(flat(&Arc::new(m)), [2.0, 4.0, 0.0]);
        // Weighted 1:3.
        let m = average(&[(1, &a), (3, &b)]);
        assert_eq!(flat(&Arc::new(m)), [2.5, 5.0, 2.0]);
        // Three sets, weights 2:1:1.
        let m = average(&[(2, &a), (1, &b), (1, &c)]);
        assert_eq!(flat(&Arc::new(m)), [1.375, 2.5625, -1.0]);
        // All-zero weights: a plain mean.
        let m = average(&[(0, &a), (0, &b)]);
        assert_eq!(flat(&Arc::new(m)), [2.0, 4.0, 0.0]);
    }

    #[test]
    fn an_outer_step_scales_the_averaged_change_from_the_previous_parameters() {
        let t0 = Instant::now();
        let (w1, w2) = (Worker::new("a", 1), Worker::new("b", 1));
        let mut s = SyncRounds::new(Duration::from_secs(10), None).with_outer_lr(2.0);
        let mut live = BTreeSet::new();
        live.insert(w1.clone());
        live.insert(w2.clone());
        // The first round has no previous parameters here: a plain average.
        let _ = s.contribute(contrib(&w1, 1, &[1.0, 2.0, -4.0], 1), &live, t0);
        let c = s
            .contribute(contrib(&w2, 1, &[3.0, 6.0, 4.0], 1), &live, t0)
            .unwrap()
            .unwrap();
        assert_eq!(flat(&c.params), [2.0, 4.0, 0.0]);
        // Then previous + 2 × (average − previous): the two changes summed.
        let _ = s.contribute(contrib(&w1, 1, &[2.5, 4.0, 1.0], 2), &live, t0);
        let c = s
            .contribute(contrib(&w2, 3, &[2.5, 5.0, -1.0], 2), &live, t0)
            .unwrap()
            .unwrap();
        // Average weighted 1:3 is [2.5, 4.75, -0.5]; change [0.5, 0.75, -0.5]; doubled.
        assert_eq!(flat(&c.params), [3.0, 5.5, -1.0]);
        assert_eq!(flat(&s.latest().unwrap().1), [3.0, 5.5, -1.0]);
        assert!(c.replies.iter().all(|(_, unchanged)| !unchanged));
        // A lone contributor keeps its own parameters whatever the step.
        live.remove(&w2);
        s.leave(&w2, &live, t0);
        let c = s
            .contribute(contrib(&w1, 1, &[9.0, 9.0, 9.0], 3), &live, t0)
            .unwrap()
            .unwrap();
        assert_eq!(flat(&c.params), [9.0, 9.0, 9.0]);
        assert_eq!(c.replies, vec![(w1.clone(), true)]);
        // The free function, at a fractional step.
        let prev = p(&[0.0, 0.0, 0.0]);
        let a = p(&[1.0, 2.0, 4.0]);
        assert_eq!(
            flat(&Arc::new(outer_step(&prev, &[(1, &a)], 0.5))),
            [0.5, 1.0, 2.0]
        );
    }

    #[test]
    fn nesterov_momentum_steps_on_the_pseudo_gradient_and_keeps_its_buffer() {
        let t0 = Instant::now();
        let (w1, w2) = (Worker::new("a", 1), Worker::new("b", 1));
        let mut s = SyncRounds::new(Duration::from_secs(10), None)
            .with_outer_lr(0.5)
            .with_outer_momentum(0.5);
        let mut live: BTreeSet<Worker> = [w1.clone(), w2.clone()].into_iter().collect();
        let round = |s: &mut SyncRounds, live: &BTreeSet<Worker>, a: &[f32], b: &[f32], rows| {
            let _ = s.contribute(contrib(&w1, rows, a, 1), live, t0).unwrap();
            s.contribute(contrib(&w2, rows, b, 1), live, t0)
                .unwrap()
                .unwrap()
        };
        // No previous parameters: a plain average, no momentum yet.
        let c = round(&mut s, &live, &[1.0, 2.0, -4.0], &[3.0, 6.0, 4.0], 1);
        assert_eq!(flat(&c.params), [2.0, 4.0, 0.0]);
        assert!(s.momentum().is_none());
        // Average [1, 3, 1]: g = [1, 1, -1], m = g, new = prev − 0.5 (g + 0.5 m).
        let c = round(&mut s, &live, &[0.0, 2.0, 0.0], &[2.0, 4.0, 2.0], 1);
        assert_eq!(flat(&c.params), [1.25, 3.25, 0.75]);
        assert_eq!(flat(&s.momentum().unwrap()), [1.0, 1.0, -1.0]);
        assert!(c.replies.iter().all(|(_, unchanged)| !unchanged));
        // No change: the momentum alone moves on, m = [0.5, 0.5, -0.5].
        let c = round(&mut s, &live, &[1.25, 3.25, 0.75], &[1.25, 3.25, 0.75], 1);
        assert_eq!(flat(&c.params), [1.125, 3.125, 0.875]);
        assert_eq!(flat(&s.momentum().unwrap()), [0.5, 0.5, -0.5]);
        // A round that trained nothing (the final one) moves neither.
        let c = round(&mut s, &live, &[9.0, 9.0, 9.0], &[9.0, 9.0, 9.0], 0);
        assert_eq!(flat(&c.params), [1.125, 3.125, 0.875]);
        assert_eq!(flat(&s.momentum().unwrap()), [0.5, 0.5, -0.5]);
        // A lone contributor takes the step too, and is sent the result.
        live.remove(&w2);
        s.leave(&w2, &live, t0);
        let c = s
            .contribute(contrib(&w1, 1, &[1.125, 3.125, 0.875], 2), &live, t0)
            .unwrap()
            .unwrap();
        assert_eq!(flat(&c.params), [1.0625, 3.0625, 0.9375]);
        assert_eq!(c.replies, vec![(w1.clone(), false)]);
        // Restored from a commit point, the buffer is what was written.
        let mut r = SyncRounds::new(Duration::from_secs(10), s.latest())
            .with_outer_lr(0.5)
            .with_outer_momentum(0.5);
        r.restore_momentum(s.momentum());
        assert_eq!(flat(&r.momentum().unwrap()), [0.25, 0.25, -0.25]);
    }

    #[test]
    fn a_round_closes_when_every_live_worker_reported() {
        let t0 = Instant::now();
        let (w1, w2) = (Worker::new("a", 1), Worker::new("b", 1));
        let mut s = SyncRounds::new(Duration::from_secs(10), None);
        let mut live = BTreeSet::new();
        live.insert(w1.clone());
        live.insert(w2.clone());
        assert!(
            s.contribute(contrib(&w1, 100, &[1.0, 1.0, 1.0], 3), &live, t0)
                .unwrap()
                .is_none()
        );
        assert_eq!(s.next_deadline(), Some(t0 + Duration::from_secs(10)));
        let e = s
            .contribute(contrib(&w1, 1, &[1.0, 1.0, 1.0], 3), &live, t0)
            .unwrap_err();
        assert_eq!(e, SyncError::Duplicate(w1.clone(), 1));
        let closed = s
            .contribute(
                contrib(&w2, 300, &[5.0, 5.0, 5.0], 4),
                &live,
                t0 + Duration::from_secs(2),
            )
            .unwrap()
            .unwrap();
        assert_eq!(closed.reason, CloseReason::AllReported);
        assert_eq!(closed.version, 1);
        assert_eq!(flat(&closed.params), [4.0, 4.0, 4.0]);
        assert_eq!(closed.replies, [(w1.clone(), false), (w2.clone(), false)]);
        assert_eq!(closed.samples, 400);
        assert_eq!(closed.seconds, 2.0);
        assert_eq!(closed.up_bytes, 24);
        assert!(closed.missing.is_empty());
        assert_eq!(closed.commits, [("a".into(), 3), ("b".into(), 4)]);
        assert_eq!(s.latest().map(|(v, _)| v), Some(1));
        assert!(s.next_deadline().is_none());
    }

    #[test]
    fn a_round_with_a_missing_worker_closes_at_its_timeout() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(5);
        let (w1, w2) = (Worker::new("a", 1), Worker::new("b", 1));
        let mut s = SyncRounds::new(timeout, None);
        let mut live = BTreeSet::new();
        live.insert(w1.clone());
        live.insert(w2.clone());
        assert!(
            s.contribute(contrib(&w1, 10, &[2.0, 2.0, 2.0], 1), &live, t0)
                .unwrap()
                .is_none()
        );
        assert!(
            s.tick(&live, t0 + timeout - Duration::from_millis(1))
                .is_none()
        );
        let closed = s.tick(&live, t0 + timeout).unwrap();
        assert_eq!(closed.reason, CloseReason::Timeout);
        assert_eq!(closed.missing, std::slice::from_ref(&w2));
        // The lone contributor keeps its own parameters.
        assert_eq!(closed.replies, [(w1.clone(), true)]);
        assert_eq!(flat(&closed.params), [2.0, 2.0, 2.0]);
        // The late worker's contribution goes into the next round with its rows.
        let t1 = t0 + Duration::from_secs(6);
        assert!(
            s.contribute(contrib(&w2, 30, &[6.0, 6.0, 6.0], 2), &live, t1)
                .unwrap()
                .is_none()
        );
        let closed = s
            .contribute(contrib(&w1, 10, &[2.0, 2.0, 2.0], 5), &live, t1)
            .unwrap()
            .unwrap();
        assert_eq!(closed.version, 2);
        assert_eq!(flat(&closed.params), [5.0, 5.0, 5.0]);
    }

    #[test]
    fn a_departure_closes_the_round_and_keeps_the_dead_workers_contribution() {
        let t0 = Instant::now();
        let (w1, w2, w3) = (
            Worker::new("a", 1),
            Worker::new("b", 1),
            Worker::new("c", 1),
        );
        let mut s = SyncRounds::new(Duration::from_secs(60), None);
        let mut live = BTreeSet::new();
        for w in [&w1, &w2, &w3] {
            live.insert(w.clone());
        }
        assert!(
            s.contribute(contrib(&w1, 1, &[0.0, 0.0, 0.0], 7), &live, t0)
                .unwrap()
                .is_none()
        );
        assert!(
            s.contribute(contrib(&w2, 1, &[2.0, 2.0, 2.0], 8), &live, t0)
                .unwrap()
                .is_none()
        );
        // w2 dies with its contribution in the round: it counts, and so do its acks through 8.
        live.remove(&w2);
        assert!(s.leave(&w2, &live, t0).is_none());
        assert_eq!(s.pending_seq(&w2), Some(8));
        assert_eq!(s.pending_seq(&w3), None);
        // w3 dies before contributing: the round closes with the two contributions.
        live.remove(&w3);
        let closed = s.leave(&w3, &live, t0).unwrap();
        assert_eq!(closed.reason, CloseReason::WorkerLeft);
        assert_eq!(flat(&closed.params), [1.0, 1.0, 1.0]);
        assert_eq!(closed.commits, [("a".into(), 7), ("b".into(), 8)]);
        assert_eq!(s.pending_seq(&w2), None, "the round is closed");
        // A dead worker cannot contribute; a new incarnation can, and starts from the average.
        let e = s
            .contribute(contrib(&w3, 1, &[0.0; 3], 9), &live, t0)
            .unwrap_err();
        assert_eq!(e, SyncError::NotLive(w3.clone()));
        let w3b = Worker::new("c", 2);
        live.insert(w3b.clone());
        assert_eq!(
            s.latest().map(|(v, p)| (v, flat(&p))),
            Some((1, vec![1.0; 3]))
        );
    }

    #[test]
    fn final_contributions_end_the_rounds() {
        let t0 = Instant::now();
        let (w1, w2) = (Worker::new("a", 1), Worker::new("b", 1));
        let mut s = SyncRounds::new(Duration::from_secs(60), None);
        let mut live = BTreeSet::new();
        live.insert(w1.clone());
        live.insert(w2.clone());
        let mut c = contrib(&w1, 5, &[1.0, 1.0, 1.0], 1);
        c.is_final = true;
        assert!(s.contribute(c, &live, t0).unwrap().is_none());
        assert!(!s.all_final(&live));
        let closed = s
            .contribute(contrib(&w2, 5, &[3.0, 3.0, 3.0], 2), &live, t0)
            .unwrap()
            .unwrap();
        assert_eq!(flat(&closed.params), [2.0; 3]);
        assert!(s.is_finished(&w1) && !s.is_finished(&w2));
        assert!(!s.all_final(&live));
        // The finished worker no longer holds up rounds: b's final one closes on its own.
        let mut c = contrib(&w2, 0, &[2.0, 2.0, 2.0], 2);
        c.is_final = true;
        let closed = s.contribute(c, &live, t0).unwrap().unwrap();
        assert_eq!(closed.replies, [(w2.clone(), true)]);
        assert!(s.all_final(&live));
    }

    #[test]
    fn mismatched_shapes_are_refused() {
        let t0 = Instant::now();
        let (w1, w2) = (Worker::new("a", 1), Worker::new("b", 1));
        let mut s = SyncRounds::new(Duration::from_secs(60), None);
        let mut live = BTreeSet::new();
        live.insert(w1.clone());
        live.insert(w2.clone());
        s.contribute(contrib(&w1, 1, &[1.0, 1.0, 1.0], 1), &live, t0)
            .unwrap();
        let e = s
            .contribute(contrib(&w2, 1, &[1.0, 1.0], 1), &live, t0)
            .unwrap_err();
        assert!(matches!(e, SyncError::Mismatch(..)), "{e:?}");
    }
}
