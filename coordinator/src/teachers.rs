//! The teacher ensemble as the coordinator sees it: members, each with one or more replicas.
//!
//! A request goes to the replica of its member with the fewest requests outstanding
//! (least-outstanding-requests balancing). A failed or timed-out request is retried on another
//! replica of the same member, with exponential backoff, up to `2 × replicas` attempts; then the
//! member counts as down for that request and the caller gets [`Error::Teacher`].

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use distill_proto::pb::teacher_client::TeacherClient;
use distill_proto::pb::{DescribeRequest, InferRequest};
use distill_proto::{DType, HostTensor};
use tonic::transport::{Channel, Endpoint};

use crate::config::MemberConfig;
use crate::error::{Error, Result};

struct Replica {
    endpoint: String,
    client: TeacherClient<Channel>,
    outstanding: AtomicUsize,
}

/// Latency and count statistics of one member.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct MemberStats {
    /// Member name.
    pub member: String,
    /// Requests answered.
    pub requests: u64,
    /// Sum of latencies of answered requests, seconds.
    pub total_latency_secs: f64,
    /// Largest latency, seconds.
    pub max_latency_secs: f64,
    /// Failed attempts (each retried elsewhere or given up).
    pub failures: u64,
}

fn is_rejection(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::InvalidArgument
            | tonic::Code::FailedPrecondition
            | tonic::Code::Unimplemented
            | tonic::Code::Unauthenticated
            | tonic::Code::PermissionDenied
            | tonic::Code::OutOfRange
    )
}

/// One ensemble member.
pub struct Member {
    /// Member name.
    pub name: String,
    /// Combination weight.
    pub weight: f32,
    replicas: Vec<Replica>,
    stats: Mutex<MemberStats>,
}

/// Every member of the ensemble.
pub struct TeacherPool {
    /// The members in config order.
    pub members: Vec<Member>,
    timeout: Duration,
    retries: AtomicU64,
}

impl TeacherPool {
    /// Builds lazily connecting clients for every replica (a replica that is down at start
    /// does not stop the run).
    pub fn new(
        members: &[MemberConfig],
        timeout: Duration,
        max_message_bytes: usize,
    ) -> Result<Self> {
        let members = members
            .iter()
            .map(|m| {
                let replicas = m
                    .endpoints
                    .iter()
                    .map(|e| {
                        let ep = Endpoint::from_shared(e.clone())
                            .map_err(|err| {
                                Error::Config(format!("member `{}`: endpoint `{e}`: {err}", m.name))
                            })?
                            .connect_timeout(Duration::from_secs(5))
                            .http2_adaptive_window(true)
                            .timeout(timeout);
                        let client = TeacherClient::new(ep.connect_lazy())
                            .max_decoding_message_size(max_message_bytes)
                            .max_encoding_message_size(max_message_bytes);
                        Ok(Replica {
                            endpoint: e.clone(),
                            client,
                            outstanding: AtomicUsize::new(0),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Member {
                    name: m.name.clone(),
                    weight: m.weight,
                    replicas,
                    stats: Mutex::new(MemberStats {
                        member: m.name.clone(),
                        ..Default::default()
                    }),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            members,
            timeout,
            retries: AtomicU64::new(0),
        })
    }

    /// Asks every replica what it serves and checks it fits the data: `row_len` input values
    /// and `classes` logits. A replica that does not answer is only logged (it may come up
    /// later); one that serves a model of another shape, or other weights than another replica
    /// of the same member, is an error. Returns each member's weights digest (None when no
    /// replica answered).
    pub async fn check_models(
        &self,
        row_len: usize,
        classes: usize,
    ) -> Result<Vec<Option<String>>> {
        let mut digests = Vec::with_capacity(self.members.len());
        for m in &self.members {
            let mut digest: Option<String> = None;
            for r in &m.replicas {
                let d = tokio::time::timeout(
                    self.timeout,
                    r.client.clone().describe(DescribeRequest {}),
                )
                .await;
                match d {
                    Ok(Ok(d)) => {
                        let d = d.into_inner();
                        let inputs: u64 = d.input_shape.iter().product();
                        if inputs != row_len as u64 || d.num_classes as usize != classes {
                            return Err(Error::Config(format!(
                                "member `{}` replica {} serves {} ({} inputs, {} classes) but the data has rows of {row_len} values and {classes} classes",
                                m.name, r.endpoint, d.model_id, inputs, d.num_classes
                            )));
                        }
                        match &digest {
                            Some(other) if *other != d.weights_digest => {
                                return Err(Error::Config(format!(
                                    "member `{}`: replica {} serves weights {} but another replica serves {other}; replicas of a member must serve the same model",
                                    m.name, r.endpoint, d.weights_digest
                                )));
                            }
                            _ => digest = Some(d.weights_digest.clone()),
                        }
                        tracing::info!(member = %m.name, replica = %r.endpoint, model = %d.model_id, "teacher replica ready");
                    }
                    Ok(Err(status)) => {
                        tracing::warn!(member = %m.name, replica = %r.endpoint, %status, "teacher replica not ready")
                    }
                    Err(_) => {
                        tracing::warn!(member = %m.name, replica = %r.endpoint, "teacher replica did not answer Describe")
                    }
                }
            }
            digests.push(digest);
        }
        Ok(digests)
    }

    /// Requests retried on another replica so far.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Statistics of every member.
    pub fn stats(&self) -> Vec<MemberStats> {
        self.members
            .iter()
            .map(|m| m.stats.lock().map(|s| s.clone()).unwrap_or_default())
            .collect()
    }

    /// Tempered logits z/T (`rows × classes`, f32) of member `member` for `inputs`.
    pub async fn infer(
        &self,
        member: usize,
        inputs: &HostTensor,
        temperature: f32,
    ) -> Result<Vec<f32>> {
        let m = &self.members[member];
        let attempts = 2 * m.replicas.len();
        let mut backoff = Duration::from_millis(20);
        let mut last_err = String::new();
        for attempt in 0..attempts {
            // Least outstanding first; ties go round-robin by attempt.
            let (ri, r) = m
                .replicas
                .iter()
                .enumerate()
                .min_by_key(|(i, r)| {
                    (
                        r.outstanding.load(Ordering::Relaxed),
                        (i + attempt) % m.replicas.len(),
                    )
                })
                .ok_or_else(|| Error::Internal(format!("member `{}` has no replicas", m.name)))?;
            r.outstanding.fetch_add(1, Ordering::Relaxed);
            let started = Instant::now();
            let req = InferRequest {
                request_id: 0,
                inputs: Some(inputs.clone().into()),
                temperature,
                output_dtype: distill_proto::pb::DType::from(DType::F32) as i32,
            };
            let result = tokio::time::timeout(self.timeout, r.client.clone().infer(req)).await;
            r.outstanding.fetch_sub(1, Ordering::Relaxed);
            let err = match result {
                Ok(Ok(resp)) => {
                    let resp = resp.into_inner();
                    match resp.logits.map(HostTensor::try_from) {
                        Some(Ok(t))
                            if t.dtype() == DType::F32
                                && t.shape().first() == inputs.shape().first() =>
                        {
                            let secs = started.elapsed().as_secs_f64();
                            if let Ok(mut s) = m.stats.lock() {
                                s.requests += 1;
                                s.total_latency_secs += secs;
                                s.max_latency_secs = s.max_latency_secs.max(secs);
                            }
                            return Ok(t.to_f32_vec());
                        }
                        other => format!("malformed reply from {}: {other:?}", r.endpoint),
                    }
                }
                Ok(Err(status)) if is_rejection(status.code()) => {
                    // The teacher refused the request itself: another replica of the same model
                    // would refuse it too, so retrying (or waiting) cannot help.
                    return Err(Error::TeacherRejected {
                        member: m.name.clone(),
                        msg: format!("{}: {}: {}", r.endpoint, status.code(), status.message()),
                    });
                }
                Ok(Err(status)) => {
                    format!("{}: {}: {}", r.endpoint, status.code(), status.message())
                }
                Err(_) => format!("{}: no answer within {:?}", r.endpoint, self.timeout),
            };
            if let Ok(mut s) = m.stats.lock() {
                s.failures += 1;
            }
            tracing::warn!(member = %m.name, replica = ri, attempt, error = %err, "teacher request failed; retrying");
            last_err = err;
            if attempt + 1 < attempts {
                self.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(jitter(backoff)).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
        Err(Error::Teacher {
            member: m.name.clone(),
            msg: format!("every replica failed; last error: {last_err}"),
        })
    }
}

/// `d` scaled by a pseudo-random factor in [0.5, 1.5), so replicas that failed together are not
/// retried in lockstep.
fn jitter(d: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.as_nanos()),
    );
    let f = 0.5 + (h.finish() % 1000) as f64 / 1000.0;
    d.mul_f64(f)
}
