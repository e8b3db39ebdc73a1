//! The coordinator's Prometheus series (served with `--metrics-listen`; no-ops without it).
//!
//! The run's figures have one owner, the run state: this module does not count them again but
//! copies them into the recorder once a second ([`run_publisher`], from the same snapshot
//! `RunStatus` answers with). Only what the snapshot cannot hold, the latency of each teacher
//! request, is recorded where it happens ([`member_answered`]).
//!
//! | series | kind | labels |
//! | --- | --- | --- |
//! | `distill_coordinator_batches_leased_total` | counter: leases handed out | |
//! | `distill_coordinator_batches_acked_total` | counter: batches trained | |
//! | `distill_coordinator_batches_requeued_total` | counter: batches put back in line | |
//! | `distill_coordinator_degraded_batches_total` | counter: batches from a subset of the members | |
//! | `distill_coordinator_prefetch_depth` | gauge: batches being prepared or queued for a worker | `worker` |
//! | `distill_coordinator_student_wait_seconds_total` | gauge that only grows: seconds workers waited for batches | `worker` (`all`) |
//! | `distill_coordinator_rounds_total` | counter: synchronisation rounds closed | |
//! | `distill_coordinator_member_request_seconds` | histogram: answered teacher requests | `member` |
//! | `distill_coordinator_member_requests_total` | counter: answered teacher requests | `member` |
//! | `distill_coordinator_member_failures_total` | counter: failed teacher attempts | `member` |
//! | `distill_coordinator_hedges_total` | counter: hedged copies sent | `member` |
//! | `distill_coordinator_replicas` | gauge: replicas in rotation | `member` |

use std::time::Duration;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::driver::{Command, Handle, StatusView};
use crate::teachers::TeacherPool;

/// How often the run's figures are copied into the recorder.
const PERIOD: Duration = Duration::from_secs(1);

/// One answered teacher request of `member` that took `secs`.
pub fn member_answered(member: &str, secs: f64) {
    metrics::histogram!("distill_coordinator_member_request_seconds", "member" => member.to_string())
        .record(secs);
}

/// Copies the run's figures into the recorder every [`PERIOD`] until `stop`.
pub async fn run_publisher(
    driver: Handle,
    pool: std::sync::Arc<TeacherPool>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (reply, rx) = oneshot::channel();
        match driver.ask(Command::Status { reply }, rx).await {
            Ok(view) => publish(&view, &pool),
            // The driver has stopped: the run is over.
            Err(_) => return,
        }
    }
}

fn publish(view: &StatusView, pool: &TeacherPool) {
    let f = &view.facts;
    metrics::counter!("distill_coordinator_batches_leased_total").absolute(f.ledger.leases);
    metrics::counter!("distill_coordinator_batches_acked_total").absolute(f.progress.total_acked);
    metrics::counter!("distill_coordinator_batches_requeued_total")
        .absolute(f.ledger.requeued_batches);
    metrics::counter!("distill_coordinator_degraded_batches_total")
        .absolute(f.counters.degraded_batches);
    metrics::counter!("distill_coordinator_rounds_total").absolute(f.rounds);
    metrics::gauge!("distill_coordinator_student_wait_seconds_total", "worker" => "all")
        .set(f.counters.wait_secs);
    for (worker, depth) in &f.queues {
        metrics::gauge!("distill_coordinator_prefetch_depth", "worker" => worker.clone())
            .set(*depth as f64);
    }
    for m in &view.members {
        let member = m.member.clone();
        metrics::counter!("distill_coordinator_member_requests_total", "member" => member.clone())
            .absolute(m.requests);
        metrics::counter!("distill_coordinator_member_failures_total", "member" => member.clone())
            .absolute(m.failures);
        metrics::counter!("distill_coordinator_hedges_total", "member" => member)
            .absolute(m.hedged_requests);
    }
    if let Ok(ms) = pool.membership().lock() {
        for m in &pool.members {
            metrics::gauge!("distill_coordinator_replicas", "member" => m.name.clone())
                .set(ms.rotation_len(&m.name) as f64);
        }
    }
}
