//! The prober: replicas out of rotation are checked when their probe is due, and the result
//! goes back to the membership (which puts them back, or schedules the next probe). A probe is
//! a `Describe` (the replica must still serve the member's model) and one `Infer` of a zero row
//! at T = 1, whose reply must pass [`super::reply::checked_logits`]: a replica taken out for
//! bad replies does not come back on a good description alone.

use std::time::Instant;

use distill_proto::pb::{DescribeRequest, InferRequest};
use distill_proto::{DType, HostTensor};
use tokio_util::sync::CancellationToken;

use super::{TeacherPool, identity, reply};
use crate::domain::membership::{ModelIdentity, Probe};

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
                        Ok(id) => m.probe_succeeded(p.replica, Some(id), now),
                        Err(e) => m.probe_failed(p.replica, &e, now),
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

    /// One probe: what the replica says it serves, if it also answers a test row well.
    async fn probe(&self, p: &Probe) -> Result<ModelIdentity, String> {
        let c = self.client(p.replica).map_err(|e| e.to_string())?;
        let within = |what: &str| format!("{what}: no answer within {:?}", self.timeout);
        let described =
            tokio::time::timeout(self.timeout, c.client.clone().describe(DescribeRequest {}))
                .await
                .map_err(|_| within("Describe"))?
                .map_err(|s| format!("Describe: {}: {}", s.code(), s.message()))?;
        let row = HostTensor::from_f32(vec![1, self.row_len], &vec![0.0; self.row_len])
            .map_err(|e| format!("test row: {e}"))?;
        let req = InferRequest {
            request_id: 0,
            inputs: Some(row.into()),
            temperature: 1.0,
            output_dtype: distill_proto::pb::DType::from(DType::F32) as i32,
        };
        let answered = tokio::time::timeout(self.timeout, c.client.clone().infer(req))
            .await
            .map_err(|_| within("Infer"))?
            .map_err(|s| format!("Infer: {}: {}", s.code(), s.message()))?;
        reply::checked_logits(answered.into_inner(), 1, self.classes)
            .map_err(|e| format!("Infer: bad reply: {e}"))?;
        Ok(identity(described.get_ref()))
    }
}
