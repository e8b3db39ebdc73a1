//! The prober: replicas out of rotation are checked when their probe is due, and the result
//! goes back to the membership (which puts them back, or schedules the next probe). A probe is
//! a `Describe` (the replica must still serve the member's model) and one `Infer` of a zero row
//! at T = 1, whose reply must pass [`super::reply::checked_logits`]: a replica taken out for
//! bad replies does not come back on a good description alone.
//!
//! A registration on trial is probed differently: after its `Describe`, it and the trusted
//! reference the membership names answer the pool's canary rows (rows of the data) at T = 1,
//! and the two answers must agree within `canary_tolerance`
//! ([`super::reply::largest_difference`]). Agreement admits it; disagreement, or a reply that
//! is no valid logits at all, refuses it ([`crate::domain::membership::Membership::canary_disagreed`]);
//! the replica not answering, or the reference being unavailable, only retries later. Nothing
//! a replica on trial returns is used for anything but the comparison.

use std::time::Instant;

use distill_proto::{DType, HostTensor};
use tokio_util::sync::CancellationToken;

use super::wire::{Described, Failure, TokenRequest};
use super::{TeacherPool, reply};
use crate::domain::membership::{ModelIdentity, Probe, ProbeKind, ReplicaId};

/// How a probe ended.
enum Probed {
    /// It answered well (and agreed, on trial): what it serves.
    Healthy(ModelIdentity),
    /// It did not answer, answered badly, or could not be compared: try again later.
    Failed(String),
    /// On trial, its answers disagree with the reference's.
    Disagreed(String),
}

impl TeacherPool {
    /// Probes the replicas out of rotation whose probe is due (each call within the request
    /// deadline), reports the results to the membership and logs the events, until `stop`.
    /// Sleeps until the next probe is due or the membership changes.
    pub async fn run_prober(&self, stop: CancellationToken) {
        let changed = self.membership_changed();
        loop {
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (due, next) = match self.membership.lock() {
                Ok(mut m) => (m.due_probes(Instant::now()), m.next_probe()),
                Err(e) => {
                    tracing::error!(error = %e, "replica probes stopped");
                    return;
                }
            };
            if let Err(e) = self.forget_removed() {
                tracing::error!(error = %e, "replica probes stopped");
                return;
            }
            let probes = due.into_iter().map(|p| async move {
                let result = self.probe(&p).await;
                let now = Instant::now();
                let reported = self.membership.update(|m| {
                    let events = match result {
                        Probed::Healthy(id) => m.probe_succeeded(p.replica, Some(id), now),
                        Probed::Failed(e) => m.probe_failed(p.replica, &e, now),
                        Probed::Disagreed(e) => m.canary_disagreed(p.replica, &e, now),
                    };
                    ((), events)
                });
                if let Err(e) = reported {
                    tracing::error!(error = %e, replica = p.replica, "probe result lost");
                }
            });
            futures::future::join_all(probes).await;
            let next_probe = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = next_probe => {}
                _ = notified => {}
            }
        }
    }

    /// One probe: what the replica says it serves, if it also answers a test row well (or, on
    /// trial, the canary rows as its reference does).
    async fn probe(&self, p: &Probe) -> Probed {
        match p.kind {
            ProbeKind::Health => match self.health_probe(p).await {
                Ok(id) => Probed::Healthy(id),
                Err(e) => Probed::Failed(e),
            },
            ProbeKind::Trial { reference: None } => Probed::Failed(
                "no trusted replica of the member is in rotation to compare its answers with"
                    .into(),
            ),
            ProbeKind::Trial {
                reference: Some(reference),
            } => self.trial(p, reference).await,
        }
    }

    /// A trial of `p`'s replica against `reference` (see the module docs).
    async fn trial(&self, p: &Probe, reference: ReplicaId) -> Probed {
        if self.sequences {
            // Registrations state no tokenizer, so the membership never admits one to a
            // sequence member; a trial has no canary sequences to compare either.
            return Probed::Failed(
                "sequence members take static replicas only: there is no canary trial of \
                 token sequences"
                    .into(),
            );
        }
        let ident = match self.describe(p.replica).await {
            Ok(d) => d,
            Err(e) => return Probed::Failed(e),
        };
        let rows = self.canary.shape().first().copied().unwrap_or(0);
        let (got, want) = tokio::join!(
            self.answer(p.replica, &self.canary),
            self.answer(reference, &self.canary)
        );
        let want = match want {
            Ok(Ok(v)) => v,
            Ok(Err(bad)) | Err(bad) => {
                return Probed::Failed(format!("the trusted replica {reference}: {bad}"));
            }
        };
        let got = match got {
            Ok(Ok(v)) => v,
            // Not valid logits at all: as wrong as wrong values.
            Ok(Err(bad)) => return Probed::Disagreed(format!("canary rows: bad reply: {bad}")),
            Err(e) => return Probed::Failed(e),
        };
        let tolerance = match self.membership.lock() {
            Ok(m) => m.config().canary_tolerance,
            Err(e) => return Probed::Failed(e.to_string()),
        };
        match reply::largest_difference(&got, &want, self.classes) {
            Some((_, _, d)) if d <= tolerance => Probed::Healthy(ident),
            Some((row, class, d)) => Probed::Disagreed(format!(
                "on {rows} canary rows its logits differ from the trusted replica's by up to \
                 {d} (row {row}, class {class}; tolerance {tolerance})"
            )),
            None => Probed::Failed("no canary rows to compare".into()),
        }
    }

    /// Replica `id`'s logits for `rows` at T = 1: the outer error when it did not answer, the
    /// inner one when its reply is no valid logits.
    async fn answer(
        &self,
        id: ReplicaId,
        rows: &HostTensor,
    ) -> Result<Result<Vec<f32>, String>, String> {
        let c = self.client(id).map_err(|e| e.to_string())?;
        let answered = tokio::time::timeout(self.timeout, c.client.infer(rows, 1.0, self.classes))
            .await
            .map_err(|_| format!("Infer: no answer within {:?}", self.timeout))?;
        match answered {
            Ok(logits) => Ok(Ok(logits)),
            Err(Failure::BadReply(bad)) => Ok(Err(bad)),
            Err(Failure::Unsendable(msg)) => Err(msg),
            Err(Failure::Status(s)) => Err(format!("Infer: {}: {}", s.code(), s.message())),
        }
    }

    /// What replica `id` says it serves.
    async fn describe(&self, id: ReplicaId) -> Result<ModelIdentity, String> {
        let c = self.client(id).map_err(|e| e.to_string())?;
        let described =
            tokio::time::timeout(self.timeout, c.client.describe(self.row_len, self.classes))
                .await
                .map_err(|_| format!("Describe: no answer within {:?}", self.timeout))?;
        match described {
            Described::Model(ident) => Ok(ident),
            Described::NotReady(msg) | Described::Mismatch(msg) => Err(msg),
        }
    }

    /// A replica out of rotation: its description, if it also answers a zero row well.
    async fn health_probe(&self, p: &Probe) -> Result<ModelIdentity, String> {
        let ident = self.describe(p.replica).await?;
        if self.sequences {
            // One sequence of one token (id 0 exists in every vocabulary), its top 1.
            let req = TokenRequest::new(&[0], 1, 1, Vec::new(), 1.0, 1)
                .map_err(|e| format!("test sequence: {e}"))?;
            let c = self.client(p.replica).map_err(|e| e.to_string())?;
            return match tokio::time::timeout(
                self.timeout,
                c.client.infer_tokens(&req, self.classes),
            )
            .await
            {
                Err(_) => Err(format!("Infer: no answer within {:?}", self.timeout)),
                Ok(Ok(_)) => Ok(ident),
                Ok(Err(Failure::BadReply(bad))) => Err(format!("Infer: bad reply: {bad}")),
                Ok(Err(Failure::Unsendable(msg))) => Err(msg),
                Ok(Err(Failure::Status(s))) => Err(format!("Infer: {}: {}", s.code(), s.message())),
            };
        }
        // Zero pixels: 0.0 as floats too, and sendable to any input datatype.
        let row = HostTensor::new(vec![1, self.row_len], DType::U8, vec![0u8; self.row_len])
            .map_err(|e| format!("test row: {e}"))?;
        self.answer(p.replica, &row)
            .await?
            .map_err(|e| format!("Infer: bad reply: {e}"))?;
        Ok(ident)
    }
}
