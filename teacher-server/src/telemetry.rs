//! The teacher server's Prometheus series (served with `--metrics-listen`; no-ops without it).
//!
//! | series | kind | labels |
//! | --- | --- | --- |
//! | `distill_teacher_requests_total` | counter: inference requests, answered or refused | `member`, `protocol` (`distill`, `oip`) |
//! | `distill_teacher_rows_total` | counter: rows answered | `member` |
//! | `distill_teacher_rejections_total` | counter: requests refused | `member`, `protocol`, `reason` (the gRPC code, e.g. `resource_exhausted`) |
//! | `distill_teacher_request_seconds` | histogram: answered requests, admission to reply | `member`, `protocol` |
//! | `distill_teacher_queue_depth` | gauge: requests holding an in-flight permit | |
//! | `distill_teacher_batch_rows` | histogram: rows per forward pass | |

use std::time::Duration;

/// Which service a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `distill.v1.Teacher` (`Infer`, `InferStream`).
    Distill,
    /// `inference.GRPCInferenceService` (`ModelInfer`).
    Oip,
}

impl Protocol {
    fn label(self) -> &'static str {
        match self {
            Protocol::Distill => "distill",
            Protocol::Oip => "oip",
        }
    }
}

/// An answered request of `rows` rows that took `took`.
pub fn answered(member: &str, protocol: Protocol, rows: usize, took: Duration) {
    let (m, p) = (member.to_string(), protocol.label());
    metrics::counter!("distill_teacher_requests_total", "member" => m.clone(), "protocol" => p)
        .increment(1);
    metrics::counter!("distill_teacher_rows_total", "member" => m.clone()).increment(rows as u64);
    metrics::histogram!("distill_teacher_request_seconds", "member" => m, "protocol" => p)
        .record(took.as_secs_f64());
}

/// A request refused with `status`.
pub fn refused(member: &str, protocol: Protocol, status: &tonic::Status) {
    let (m, p) = (member.to_string(), protocol.label());
    metrics::counter!("distill_teacher_requests_total", "member" => m.clone(), "protocol" => p)
        .increment(1);
    metrics::counter!(
        "distill_teacher_rejections_total",
        "member" => m,
        "protocol" => p,
        "reason" => reason(status.code()),
    )
    .increment(1);
}

/// Requests now holding an in-flight permit.
pub fn queue_depth(n: usize) {
    metrics::gauge!("distill_teacher_queue_depth").set(n as f64);
}

/// One forward pass over `rows` rows.
pub fn batch(rows: usize) {
    metrics::histogram!("distill_teacher_batch_rows").record(rows as f64);
}

/// A refusal's label: the gRPC code in snake case.
fn reason(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
    }
}
