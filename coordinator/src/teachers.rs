//! The teacher ensemble as the coordinator sees it: members, each with one or more replicas.
//!
//! The replicas come from the run's [`Membership`]: the static endpoints of the config and the
//! replicas registered through the Registry service, used from their registration on. A request
//! goes to the replica in rotation of its member with the fewest requests outstanding
//! (least-outstanding-requests balancing); clients are created on a replica's first use and
//! cached by its id. Each attempt is reported to the membership (`record_success` /
//! `record_failure`; a rejection of the request itself, or a busy replica, says nothing about
//! its health), which takes a replica that keeps failing out of rotation; [`TeacherPool::run_prober`]
//! probes those (`Describe`) until they answer again. A failed or timed-out request is retried
//! on another replica of the same member, with exponential backoff and jitter, up to
//! `2 × replicas in rotation` attempts; then the member counts as down for that request and the
//! caller gets [`Error::Teacher`] — at once when no replica is in rotation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use distill_proto::pb::teacher_client::TeacherClient;
use distill_proto::pb::{DescribeRequest, DescribeResponse, InferRequest};
use distill_proto::{DType, HostTensor};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::config::MemberConfig;
use crate::error::{Error, Result};
use crate::membership::{Membership, ModelIdentity, ReplicaId, ReplicaView};
use crate::registry::RegistryService;

/// A replica's client, created on first use and kept while the replica is known.
struct Replica {
    address: String,
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
    /// Failed attempts (each retried elsewhere or given up), and requests given up at once
    /// because no replica of the member was in rotation.
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

/// What a Describe says, as the membership records it.
fn identity(d: &DescribeResponse) -> ModelIdentity {
    ModelIdentity {
        model_id: d.model_id.clone(),
        weights_digest: d.weights_digest.clone(),
        input_shape: d.input_shape.clone(),
        classes: d.num_classes,
        max_batch: d.max_batch,
    }
}

/// One ensemble member.
pub struct Member {
    /// Member name.
    pub name: String,
    /// Combination weight.
    pub weight: f32,
    stats: Mutex<MemberStats>,
}

/// Every member of the ensemble, over the run's membership (static and registered replicas).
pub struct TeacherPool {
    /// The members in config order.
    pub members: Vec<Member>,
    registry: RegistryService,
    clients: Mutex<HashMap<ReplicaId, Arc<Replica>>>,
    timeout: Duration,
    max_message_bytes: usize,
    retries: AtomicU64,
}

impl TeacherPool {
    /// A pool over `registry`'s membership (which must know every member of `members`).
    /// Clients connect lazily, on a replica's first request (a replica that is down at start
    /// does not stop the run).
    pub fn new(
        members: &[MemberConfig],
        registry: RegistryService,
        timeout: Duration,
        max_message_bytes: usize,
    ) -> Result<Self> {
        let known = lock_membership(&registry)?.members();
        let members = members
            .iter()
            .map(|m| {
                if !known.contains(&m.name) {
                    return Err(Error::Internal(format!(
                        "member `{}` is not in the membership",
                        m.name
                    )));
                }
                Ok(Member {
                    name: m.name.clone(),
                    weight: m.weight,
                    stats: Mutex::new(MemberStats {
                        member: m.name.clone(),
                        ..Default::default()
                    }),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            members,
            registry,
            clients: Mutex::new(HashMap::new()),
            timeout,
            max_message_bytes,
            retries: AtomicU64::new(0),
        })
    }

    /// The Registry service over this pool's membership.
    pub fn registry(&self) -> &RegistryService {
        &self.registry
    }

    fn membership(&self) -> Result<MutexGuard<'_, Membership>> {
        lock_membership(&self.registry)
    }

    /// The (cached) client of a replica.
    fn client(&self, id: ReplicaId, address: &str) -> Result<Arc<Replica>> {
        let mut clients = self
            .clients
            .lock()
            .map_err(|_| Error::Internal("teacher client cache lock poisoned".into()))?;
        if let Some(r) = clients.get(&id)
            && r.address == address
        {
            return Ok(r.clone());
        }
        let ep = Endpoint::from_shared(address.to_string())
            .map_err(|err| Error::Internal(format!("replica {id}: address `{address}`: {err}")))?
            .connect_timeout(Duration::from_secs(5))
            .http2_adaptive_window(true)
            .timeout(self.timeout);
        let client = TeacherClient::new(ep.connect_lazy())
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes);
        let r = Arc::new(Replica {
            address: address.to_string(),
            client,
            outstanding: AtomicUsize::new(0),
        });
        clients.insert(id, r.clone());
        Ok(r)
    }

    /// Asks every replica known now (the static ones, at start) what it serves and records it
    /// in the membership, which checks that it fits the data (see
    /// [`Membership::expect_model`]) and pins each member's weights digest. A replica that does
    /// not answer is only logged (it may come up later); one that serves a model of another
    /// shape, or other weights than another replica of the same member, is an error. Returns
    /// each member's pinned weights digest (None when no replica told it).
    pub async fn check_models(
        &self,
        row_len: usize,
        classes: usize,
    ) -> Result<Vec<Option<String>>> {
        let mut digests = Vec::with_capacity(self.members.len());
        for m in &self.members {
            let replicas = self.membership()?.replicas(&m.name);
            for r in replicas {
                let client = self.client(r.id, &r.address)?;
                let d = tokio::time::timeout(
                    self.timeout,
                    client.client.clone().describe(DescribeRequest {}),
                )
                .await;
                match d {
                    Ok(Ok(d)) => {
                        let d = d.into_inner();
                        let inputs: u64 = d.input_shape.iter().product();
                        if inputs != row_len as u64 || d.num_classes as usize != classes {
                            return Err(Error::Config(format!(
                                "member `{}` replica {} serves {} ({} inputs, {} classes) but the data has rows of {row_len} values and {classes} classes",
                                m.name, r.address, d.model_id, inputs, d.num_classes
                            )));
                        }
                        self.membership()?
                            .record_identity(r.id, identity(&d))
                            .map_err(|e| Error::Config(e.to_string()))?;
                        tracing::info!(member = %m.name, replica = %r.address, model = %d.model_id, "teacher replica ready");
                    }
                    Ok(Err(status)) => {
                        tracing::warn!(member = %m.name, replica = %r.address, %status, "teacher replica not ready")
                    }
                    Err(_) => {
                        tracing::warn!(member = %m.name, replica = %r.address, "teacher replica did not answer Describe")
                    }
                }
            }
            digests.push(self.membership()?.digest(&m.name).map(str::to_string));
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

    /// Probes the replicas out of rotation whose probe is due (a `Describe` within the request
    /// deadline), reports the results to the membership and logs the events, until `stop`.
    pub async fn run_prober(&self, stop: CancellationToken) {
        const MAX_PAUSE: Duration = Duration::from_millis(250);
        let changed = self.registry.changed();
        loop {
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (due, next) = match self.membership() {
                Ok(mut m) => (m.due_probes(Instant::now()), m.next_deadline()),
                Err(e) => {
                    tracing::error!(error = %e, "replica probes stopped");
                    return;
                }
            };
            self.forget_removed();
            let probes = due.into_iter().map(|p| async move {
                let result = match self.client(p.replica, &p.address) {
                    Ok(c) => {
                        match tokio::time::timeout(
                            self.timeout,
                            c.client.clone().describe(DescribeRequest {}),
                        )
                        .await
                        {
                            Ok(Ok(d)) => Ok(identity(&d.into_inner())),
                            Ok(Err(status)) => {
                                Err(format!("{}: {}", status.code(), status.message()))
                            }
                            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
                        }
                    }
                    Err(e) => Err(e.to_string()),
                };
                let now = Instant::now();
                let events = match self.membership() {
                    Ok(mut m) => match result {
                        Ok(id) => m.probe_succeeded(p.replica, Some(id), now),
                        Err(e) => m.probe_failed(p.replica, &e, now),
                    },
                    Err(_) => Vec::new(),
                };
                self.registry.publish(&events);
            });
            futures::future::join_all(probes).await;
            let pause = next
                .map(|d| d.saturating_duration_since(Instant::now()))
                .unwrap_or(MAX_PAUSE)
                .clamp(Duration::from_millis(5), MAX_PAUSE);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
                _ = notified => {}
            }
        }
    }

    /// Drops the clients of replicas that left the membership.
    fn forget_removed(&self) {
        let Ok(m) = self.membership() else { return };
        if let Ok(mut clients) = self.clients.lock() {
            clients.retain(|&id, _| m.replica(id).is_some());
        }
    }

    /// Picks the replica for an attempt among those in rotation: fewest requests outstanding,
    /// ties round-robin by attempt.
    fn choose(
        &self,
        rotation: &[ReplicaView],
        attempt: usize,
    ) -> Result<(ReplicaId, Arc<Replica>)> {
        let mut best: Option<((usize, usize), ReplicaId, Arc<Replica>)> = None;
        for (i, v) in rotation.iter().enumerate() {
            let r = self.client(v.id, &v.address)?;
            let key = (
                r.outstanding.load(Ordering::Relaxed),
                (i + attempt) % rotation.len(),
            );
            if best.as_ref().is_none_or(|(k, _, _)| key < *k) {
                best = Some((key, v.id, r));
            }
        }
        best.map(|(_, id, r)| (id, r))
            .ok_or_else(|| Error::Internal("no replica to choose from".into()))
    }

    /// Tempered logits z/T (`rows × classes`, f32) of member `member` for `inputs`, from the
    /// member's replicas in rotation now (registered ones included). With none in rotation it
    /// fails at once with [`Error::Teacher`], so the run's policy decides.
    pub async fn infer(
        &self,
        member: usize,
        inputs: &HostTensor,
        temperature: f32,
    ) -> Result<Vec<f32>> {
        let m = &self.members[member];
        let mut attempts = None;
        let mut backoff = Duration::from_millis(20);
        let mut last_err = String::new();
        let mut attempt = 0;
        loop {
            let rotation = self.membership()?.rotation(&m.name);
            if rotation.is_empty() {
                // A request given up: counted with the failed attempts.
                if let Ok(mut s) = m.stats.lock() {
                    s.failures += 1;
                }
                return Err(Error::Teacher {
                    member: m.name.clone(),
                    msg: if last_err.is_empty() {
                        "no replica in rotation".into()
                    } else {
                        format!("no replica in rotation; last error: {last_err}")
                    },
                });
            }
            let attempts = *attempts.get_or_insert(2 * rotation.len());
            let (id, r) = self.choose(&rotation, attempt)?;
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
            // Whether the failure says something about the replica's health (a busy replica
            // is retried elsewhere but stays in rotation).
            let mut unhealthy = true;
            let err = match result {
                Ok(Ok(resp)) => {
                    let resp = resp.into_inner();
                    match resp.logits.map(HostTensor::try_from) {
                        Some(Ok(t))
                            if t.dtype() == DType::F32
                                && t.shape().first() == inputs.shape().first() =>
                        {
                            let latency = started.elapsed();
                            let secs = latency.as_secs_f64();
                            if let Ok(mut s) = m.stats.lock() {
                                s.requests += 1;
                                s.total_latency_secs += secs;
                                s.max_latency_secs = s.max_latency_secs.max(secs);
                            }
                            let events = self.membership()?.record_success(id, latency);
                            self.registry.publish(&events);
                            return Ok(t.to_f32_vec());
                        }
                        other => format!("malformed reply from {}: {other:?}", r.address),
                    }
                }
                Ok(Err(status)) if is_rejection(status.code()) => {
                    // The teacher refused the request itself: another replica of the same model
                    // would refuse it too, so retrying (or waiting) cannot help. Not a failure
                    // of the replica.
                    return Err(Error::TeacherRejected {
                        member: m.name.clone(),
                        msg: format!("{}: {}: {}", r.address, status.code(), status.message()),
                    });
                }
                Ok(Err(status)) => {
                    unhealthy = status.code() != tonic::Code::ResourceExhausted;
                    format!("{}: {}: {}", r.address, status.code(), status.message())
                }
                Err(_) => format!("{}: no answer within {:?}", r.address, self.timeout),
            };
            if let Ok(mut s) = m.stats.lock() {
                s.failures += 1;
            }
            if unhealthy {
                let events = self.membership()?.record_failure(id, Instant::now());
                self.registry.publish(&events);
            }
            tracing::warn!(member = %m.name, replica = id, attempt, error = %err, "teacher request failed; retrying");
            last_err = err;
            attempt += 1;
            if attempt >= attempts {
                break;
            }
            self.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(jitter(backoff)).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
        Err(Error::Teacher {
            member: m.name.clone(),
            msg: format!("every replica failed; last error: {last_err}"),
        })
    }
}

fn lock_membership(registry: &RegistryService) -> Result<MutexGuard<'_, Membership>> {
    registry
        .membership()
        .lock()
        .map_err(|_| Error::Internal("membership lock poisoned".into()))
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
