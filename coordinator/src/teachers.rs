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
//!
//! Stragglers are avoided two ways:
//! - **Choice by expected completion.** A request goes to the replica with the least
//!   `(outstanding + 1) × latency`, where `latency` is the replica's EWMA relative to the
//!   member's fastest (ratios under [`SIMILAR`] count as 1, so replicas of about the same speed
//!   share the load by outstanding requests, round-robin on ties). A replica three times slower
//!   gets a request only when the fast ones have three in flight each. `outstanding` is the
//!   larger of this coordinator's requests in flight and the count the replica last reported in
//!   a heartbeat (a teacher shared with other runs or production traffic is busier than our own
//!   count says), and a replica at its reported `max_in_flight` is chosen only when every
//!   replica is. A replica not timed yet
//!   counts as fast (so it is tried), and one not chosen for [`EXPLORE_EVERY`] requests of its
//!   member is chosen once, so a straggler that recovered is noticed.
//! - **Hedging.** A request still unanswered after the member's hedge delay
//!   ([`Membership::hedge_after`]: smoothed latency + 4 mean deviations, RFC 6298) is sent to a
//!   second replica as well; the first answer wins and the other request is cancelled. The
//!   loser's elapsed time is recorded as a lower bound of its latency
//!   ([`Membership::record_slow`]), so a replica that keeps losing is chosen less.
//!   `[membership] hedge = false` turns hedging off; `hedged_requests` and `hedge_wins` count
//!   it per member in `RunStatus` and `report.json`.

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

/// Latency ratios (to the member's fastest replica) below this count as equal when choosing.
pub const SIMILAR: f64 = 1.5;

/// A replica not chosen for this many requests of its member is chosen once (its latency
/// estimate may be stale).
pub const EXPLORE_EVERY: u64 = 32;

/// A replica's client, created on first use and kept while the replica is known.
struct Replica {
    address: String,
    client: TeacherClient<Channel>,
    outstanding: AtomicUsize,
    /// The member's pick number when this replica was last chosen.
    last_pick: AtomicU64,
}

/// One request in flight to a replica: its outstanding count goes down when the request ends,
/// also when it is cancelled (the loser of a hedge is dropped mid-flight).
struct InFlight<'a>(&'a Replica);

impl<'a> InFlight<'a> {
    fn start(r: &'a Replica) -> Self {
        r.outstanding.fetch_add(1, Ordering::Relaxed);
        Self(r)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How one request to one replica ended.
enum Outcome {
    /// Tempered logits.
    Answered(Vec<f32>),
    /// The teacher refused the request itself (no replica would take it).
    Rejected(String),
    /// An error or a timeout, already recorded; another replica may answer.
    Failed(String),
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
    /// Hedged copies sent (a request outlived the member's hedge delay).
    pub hedged_requests: u64,
    /// Hedged copies that answered before the original.
    pub hedge_wins: u64,
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
    /// Requests of this member so far (the round-robin and exploration clock).
    picks: AtomicU64,
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
                    picks: AtomicU64::new(0),
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
            last_pick: AtomicU64::new(0),
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

    /// Picks the replica for a request among those in rotation, other than `except` (None when
    /// there is no other): the least expected completion time, see the module docs.
    fn choose(
        &self,
        member: &Member,
        rotation: &[ReplicaView],
        except: Option<ReplicaId>,
    ) -> Result<Option<(ReplicaId, Arc<Replica>)>> {
        let pick = member.picks.fetch_add(1, Ordering::Relaxed) + 1;
        let candidates: Vec<(&ReplicaView, Arc<Replica>)> = rotation
            .iter()
            .filter(|v| Some(v.id) != except)
            .map(|v| Ok((v, self.client(v.id, &v.address)?)))
            .collect::<Result<_>>()?;
        let chosen = if except.is_none()
            && let Some((v, r)) = candidates
                .iter()
                .filter(|(v, r)| {
                    v.latency.is_some()
                        && pick.saturating_sub(r.last_pick.load(Ordering::Relaxed)) > EXPLORE_EVERY
                })
                .min_by_key(|(_, r)| r.last_pick.load(Ordering::Relaxed))
        {
            Some((v.id, r.clone()))
        } else {
            let fastest = candidates
                .iter()
                .filter_map(|(v, _)| v.latency)
                .min()
                .map(|d| d.as_secs_f64().max(1e-9));
            let n = candidates.len().max(1);
            candidates
                .iter()
                .enumerate()
                .map(|(i, (v, r))| {
                    let ratio = match (v.latency, fastest) {
                        (Some(l), Some(f)) => l.as_secs_f64() / f,
                        _ => 1.0,
                    };
                    let ratio = if ratio < SIMILAR { 1.0 } else { ratio };
                    // Requests in flight at the replica: ours, or what its last heartbeat
                    // reported (other runs and clients of a shared teacher), whichever is more.
                    let busy = r
                        .outstanding
                        .load(Ordering::Relaxed)
                        .max(v.in_flight.unwrap_or(0) as usize);
                    // A replica at its stated limit only when every replica is.
                    let full = v.max_in_flight > 0 && busy >= v.max_in_flight as usize;
                    let turn = (i + n - (pick as usize % n)) % n;
                    ((full, (busy + 1) as f64 * ratio, turn), v.id, r)
                })
                .min_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal))
                .map(|(_, id, r)| (id, r.clone()))
        };
        if let Some((_, r)) = &chosen {
            r.last_pick.store(pick, Ordering::Relaxed);
        }
        Ok(chosen)
    }

    /// Tempered logits z/T (`rows × classes`, f32) of member `member` for `inputs`, from the
    /// member's replicas in rotation now (registered ones included), hedged on a second replica
    /// when the first is slow. With none in rotation it fails at once with [`Error::Teacher`],
    /// so the run's policy decides.
    pub async fn infer(
        &self,
        member: usize,
        inputs: &HostTensor,
        temperature: f32,
    ) -> Result<Vec<f32>> {
        let m = &self.members[member];
        let req = InferRequest {
            request_id: 0,
            inputs: Some(inputs.clone().into()),
            temperature,
            output_dtype: distill_proto::pb::DType::from(DType::F32) as i32,
        };
        let rows = inputs.shape().first().copied();
        let mut attempts = None;
        let mut backoff = Duration::from_millis(20);
        let mut last_err = String::new();
        let mut attempt = 0;
        let mut failed: Option<ReplicaId> = None;
        loop {
            let rotation = self.membership()?.rotation(&m.name);
            // A retry goes to another replica than the one that just failed, when there is one.
            let except = failed.filter(|_| rotation.len() > 1);
            let chosen = if rotation.is_empty() {
                None
            } else {
                self.choose(m, &rotation, except)?
            };
            let Some((id, r)) = chosen else {
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
            };
            let attempts = *attempts.get_or_insert(2 * rotation.len());
            let hedge = match self.membership()?.hedge_after(&m.name) {
                Some(after) if after < self.timeout && rotation.len() > 1 => Some(after),
                _ => None,
            };
            let outcome = match hedge {
                Some(after) => {
                    self.hedged(m, (id, &r), after, &rotation, &req, rows)
                        .await?
                }
                None => self.call(m, id, &r, req.clone(), rows).await?,
            };
            match outcome {
                Outcome::Answered(logits) => return Ok(logits),
                Outcome::Rejected(msg) => {
                    return Err(Error::TeacherRejected {
                        member: m.name.clone(),
                        msg,
                    });
                }
                Outcome::Failed(err) => {
                    last_err = err;
                    failed = Some(id);
                }
            }
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

    /// [`Self::call`] to `first`; when it has not answered after `after`, the same request to
    /// the best other replica in rotation as well. The first answer (or rejection) wins and the
    /// other request is cancelled, its elapsed time recorded as a lower bound of its replica's
    /// latency; when one copy fails, the other is still awaited.
    async fn hedged(
        &self,
        m: &Member,
        first: (ReplicaId, &Arc<Replica>),
        after: Duration,
        rotation: &[ReplicaView],
        req: &InferRequest,
        rows: Option<usize>,
    ) -> Result<Outcome> {
        let (id, r) = first;
        let started = Instant::now();
        let primary = self.call(m, id, r, req.clone(), rows);
        tokio::pin!(primary);
        tokio::select! {
            o = &mut primary => return o,
            () = tokio::time::sleep(after) => {}
        }
        let Some((id2, r2)) = self.choose(m, rotation, Some(id))? else {
            return primary.await;
        };
        if let Ok(mut s) = m.stats.lock() {
            s.hedged_requests += 1;
        }
        tracing::debug!(member = %m.name, slow = id, hedge = id2, after_ms = after.as_secs_f64() * 1e3, "teacher request hedged");
        let started2 = Instant::now();
        let secondary = self.call(m, id2, &r2, req.clone(), rows);
        tokio::pin!(secondary);
        let (mut first_failed, mut second_failed) = (None, None);
        loop {
            tokio::select! {
                o = &mut primary, if first_failed.is_none() => match o? {
                    Outcome::Failed(e) => first_failed = Some(e),
                    done => {
                        if second_failed.is_none() {
                            self.membership()?.record_slow(id2, started2.elapsed());
                        }
                        return Ok(done);
                    }
                },
                o = &mut secondary, if second_failed.is_none() => match o? {
                    Outcome::Failed(e) => second_failed = Some(e),
                    done => {
                        if matches!(done, Outcome::Answered(_))
                            && let Ok(mut s) = m.stats.lock()
                        {
                            s.hedge_wins += 1;
                        }
                        if first_failed.is_none() {
                            self.membership()?.record_slow(id, started.elapsed());
                        }
                        return Ok(done);
                    }
                },
            }
            if let (Some(e), Some(_)) = (&first_failed, &second_failed) {
                return Ok(Outcome::Failed(e.clone()));
            }
        }
    }

    /// One request to one replica, with the request deadline. Records the outcome: latency and
    /// count on success, a failure in the member's statistics and (unless the replica was only
    /// busy) in the membership.
    async fn call(
        &self,
        m: &Member,
        id: ReplicaId,
        r: &Replica,
        req: InferRequest,
        rows: Option<usize>,
    ) -> Result<Outcome> {
        let _in_flight = InFlight::start(r);
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, r.client.clone().infer(req)).await;
        // Whether the failure says something about the replica's health (a busy replica is
        // retried elsewhere but stays in rotation).
        let mut unhealthy = true;
        let err = match result {
            Ok(Ok(resp)) => {
                let resp = resp.into_inner();
                match resp.logits.map(HostTensor::try_from) {
                    Some(Ok(t))
                        if t.dtype() == DType::F32 && t.shape().first() == rows.as_ref() =>
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
                        return Ok(Outcome::Answered(t.to_f32_vec()));
                    }
                    other => format!("malformed reply from {}: {other:?}", r.address),
                }
            }
            Ok(Err(status)) if is_rejection(status.code()) => {
                // The teacher refused the request itself: another replica of the same model
                // would refuse it too, so retrying (or waiting) cannot help. Not a failure of
                // the replica.
                return Ok(Outcome::Rejected(format!(
                    "{}: {}: {}",
                    r.address,
                    status.code(),
                    status.message()
                )));
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
        tracing::warn!(member = %m.name, replica = id, error = %err, "teacher request failed");
        Ok(Outcome::Failed(err))
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
