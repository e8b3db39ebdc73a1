//! The ensemble fan-out: every member's logits for one batch, under the run's policy for a
//! member that is down (no replica answered, see [`TeacherPool::infer`]):
//!
//! - `wait`: the members that answered are kept, and the others are asked again after a
//!   backoff (100 ms doubling to 5 s) or as soon as the membership changes (a registration, a
//!   replica back in rotation), until every member answered or `stop` is cancelled.
//! - `degrade`: the members that answered, as long as one did (the caller records which).
//!
//! A request every replica of a member refused ([`Error::TeacherRejected`]) fails at once: it
//! would be refused again. `stop` also interrupts requests in flight.

use std::time::Duration;

use distill_proto::HostTensor;
use tokio_util::sync::CancellationToken;

use super::TeacherPool;
use crate::config::TeacherPolicy;
use crate::error::{Error, Result};

/// First pause before members that are down are asked again.
const FIRST_WAIT: Duration = Duration::from_millis(100);
/// Longest pause between two rounds.
const MAX_WAIT: Duration = Duration::from_secs(5);

/// The members' answers for one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// Tempered logits (`rows × classes`, finite) of each member that answered, in the order
    /// of `answered`.
    pub logits: Vec<Vec<f32>>,
    /// Indices into [`TeacherPool::members`] of the members that answered, ascending (every
    /// member unless the policy degraded).
    pub answered: Vec<usize>,
}

impl TeacherPool {
    /// Every member's tempered logits for `inputs` at `temperature` under `policy` (see the
    /// module docs); [`Error::ShuttingDown`] once `stop` is cancelled.
    pub async fn ensemble_logits(
        &self,
        inputs: &HostTensor,
        temperature: f32,
        policy: TeacherPolicy,
        stop: &CancellationToken,
    ) -> Result<Answer> {
        let n = self.members.len();
        self.complete_logits(inputs, &vec![temperature; n], vec![None; n], policy, stop)
            .await
    }

    /// Like [`Self::ensemble_logits`], asking member `i` at `temperatures[i]` and only the
    /// members whose `known[i]` is None (the others' answers are taken as given: rows the
    /// soft-target cache already holds).
    pub async fn complete_logits(
        &self,
        inputs: &HostTensor,
        temperatures: &[f32],
        known: Vec<Option<Vec<f32>>>,
        policy: TeacherPolicy,
        stop: &CancellationToken,
    ) -> Result<Answer> {
        let n = self.members.len();
        if known.len() != n || temperatures.len() != n {
            return Err(Error::Internal(format!(
                "{} known answers and {} temperatures for {n} members",
                known.len(),
                temperatures.len()
            )));
        }
        let mut got = known;
        let mut wait = FIRST_WAIT;
        let changed = self.membership_changed();
        loop {
            // Armed before the requests, so a replica that joins (or comes back) meanwhile
            // ends the wait below at once.
            let membership_changed = changed.notified();
            tokio::pin!(membership_changed);
            membership_changed.as_mut().enable();
            let missing: Vec<usize> = (0..n).filter(|&i| got[i].is_none()).collect();
            let calls = missing
                .iter()
                .map(|&i| self.infer(i, inputs, temperatures[i]));
            let results = tokio::select! {
                _ = stop.cancelled() => return Err(Error::ShuttingDown),
                r = futures::future::join_all(calls) => r,
            };
            let mut down = None;
            for (i, r) in missing.into_iter().zip(results) {
                match r {
                    Ok(logits) => got[i] = Some(logits),
                    Err(e @ Error::TeacherRejected { .. }) => return Err(e),
                    Err(e) => down = Some(e),
                }
            }
            let answered: Vec<usize> = (0..n).filter(|&i| got[i].is_some()).collect();
            let Some(down) = down else {
                return Ok(Answer {
                    logits: got.into_iter().flatten().collect(),
                    answered,
                });
            };
            if policy == TeacherPolicy::Degrade && !answered.is_empty() {
                return Ok(Answer {
                    logits: got.into_iter().flatten().collect(),
                    answered,
                });
            }
            tracing::warn!(error = %down, ?wait, ?policy, "teacher members are down; waiting for them");
            tokio::select! {
                _ = stop.cancelled() => return Err(Error::ShuttingDown),
                _ = tokio::time::sleep(wait) => {}
                _ = membership_changed => {}
            }
            wait = (wait * 2).min(MAX_WAIT);
        }
    }
}
