//! The prober: replicas out of rotation are asked `Describe` when their probe is due, and the
//! result goes back to the membership (which puts them back, or schedules the next probe).

use std::time::Instant;

use distill_proto::pb::DescribeRequest;
use tokio_util::sync::CancellationToken;

use super::{TeacherPool, identity};

impl TeacherPool {
    /// Probes the replicas out of rotation whose probe is due (a `Describe` within the request
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
                let result = match self.client(p.replica) {
                    Ok(c) => {
                        match tokio::time::timeout(
                            self.timeout,
                            c.client.clone().describe(DescribeRequest {}),
                        )
                        .await
                        {
                            Ok(Ok(d)) => Ok(identity(d.get_ref())),
                            Ok(Err(status)) => {
                                Err(format!("{}: {}", status.code(), status.message()))
                            }
                            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
                        }
                    }
                    Err(e) => Err(e.to_string()),
                };
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
            let next_deadline = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = next_deadline => {}
                _ = notified => {}
            }
        }
    }
}
