//! The teacher ensemble as the coordinator sees it: members, each with one or more replicas.
//!
//! The replicas come from the run's membership ([`MembershipHandle`]): the static endpoints of
//! the config and the replicas registered through the Registry service, used from their
//! registration on. Clients are created on a replica's first use and cached by its id.
//!
//! - **Choice.** A request goes to the replica in rotation of its member with the least
//!   expected completion time ([`crate::domain::choice`]: requests in flight, ours or as the
//!   replica reported, times its latency relative to the member's fastest; exploration of
//!   replicas not chosen for a while). One membership lock per pick, and no strings copied.
//! - **What a reply must be.** `[rows, classes]` finite F32 values ([`reply::checked_logits`]).
//!   Anything else is a *failed* attempt: it is never returned (so never combined, cached or
//!   sent), the replica is charged a failure like one that did not answer, and the request is
//!   retried on another replica.
//! - **Failures.** An error (other than the refusals below), a timeout or a bad reply is
//!   recorded with the membership (`record_failure`; RESOURCE_EXHAUSTED from a busy replica
//!   only in the member's statistics), which takes a replica that keeps failing out of
//!   rotation; the prober ([`TeacherPool::run_prober`]) probes it until it answers again: a
//!   `Describe` that must still state the member's model, and one request of a zero row whose
//!   reply must pass the same check as any other (a replica that describes itself well but
//!   answers garbage stays out). The retry goes to another replica than the one that just failed, after an
//!   exponential backoff with jitter.
//! - **Refusals.** INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE, UNIMPLEMENTED,
//!   UNAUTHENTICATED and PERMISSION_DENIED say "your request is bad"; they are retried at once
//!   on a replica of the member that has not refused it. If one accepts, every replica that
//!   refused is charged a failure (it refuses what its peers serve). Only when every replica in
//!   rotation refused, and none failed, is the request itself bad: [`Error::TeacherRejected`].
//! - **Bounded.** A request makes at most `min(2 × replicas in rotation, MAX_ATTEMPTS)`
//!   attempts; then the member counts as down for that request and the caller gets
//!   [`Error::Teacher`] — at once when no replica is in rotation.
//! - **Hedging.** A request still unanswered after the member's hedge delay
//!   ([`crate::domain::membership::Membership::hedge_after`]: smoothed latency + 4 mean
//!   deviations, RFC 6298) is sent to a second replica as well; the first accepted answer wins
//!   and the other request is cancelled. The loser's elapsed time is recorded as a lower bound
//!   of its latency (`record_slow`), so a replica that keeps losing is chosen less.
//!   `[membership] hedge = false` turns hedging off; `hedged_requests` and `hedge_wins` count
//!   it per member in `RunStatus` and `report.json`.
//!
//! The ensemble fan-out with the run's wait/degrade policy is [`TeacherPool::ensemble_logits`]
//! ([`ensemble`]).

pub mod ensemble;
mod prober;
pub mod reply;
pub mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use distill_proto::HostTensor;
use distill_transport::ClientSecurity;
use tokio::sync::Notify;

use crate::config::{MemberConfig, OipMember};
use crate::domain::choice::{self, Candidate};
use crate::domain::membership::ReplicaId;
use crate::error::{Error, Result};
use crate::membership::MembershipHandle;
pub use wire::TokenRequest;
use wire::{Client, Described, Failure};

pub use ensemble::Answer;

/// Most attempts one request makes across its member's replicas, however many are in rotation.
pub const MAX_ATTEMPTS: usize = 6;

/// First backoff after a failed attempt; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
/// Longest backoff between two attempts of one request.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// A replica's client, created on first use and kept while the replica is known.
struct Replica {
    address: String,
    client: Client,
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
    /// A checked reply.
    Answered(Reply),
    /// The replica refused the request itself; not recorded yet (whether that is the
    /// replica's fault depends on whether another replica accepts it).
    Refused(String),
    /// An error, a timeout or a bad reply, already recorded; another replica may answer.
    Failed(String),
}

/// One request, shared by its attempts (and a hedge's two copies).
#[derive(Clone, Copy)]
enum Request<'a> {
    /// Rows, answered with tempered logits.
    Rows {
        inputs: &'a HostTensor,
        temperature: f32,
    },
    /// Token sequences, answered with top-k rows per position.
    Tokens(&'a TokenRequest),
}

/// A checked reply of either kind of [`Request`].
enum Reply {
    /// `rows × classes` tempered logits.
    Logits(Vec<f32>),
    /// One top-k row per real position.
    TopK(distill_proto::pb::TopKTargets),
}

/// The replica chosen for an attempt.
struct Pick {
    id: ReplicaId,
    replica: Arc<Replica>,
    /// Replicas of the member in rotation when it was chosen.
    rotation: usize,
    /// The member's hedge delay then, if it hedges.
    hedge: Option<Duration>,
}

/// What the choice of a replica found.
enum Picked {
    /// A replica for the attempt.
    Replica(Pick),
    /// No replica of the member is in rotation.
    NoneInRotation,
    /// Every replica in rotation is excluded (each refused this request).
    AllExcluded,
}

/// Latency and count statistics of one member.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct MemberStats {
    /// Member name.
    pub member: String,
    /// Requests answered.
    pub requests: u64,
    /// Sum of latencies of answered requests, seconds.
    pub total_latency_secs: f64,
    /// Largest latency, seconds.
    pub max_latency_secs: f64,
    /// Failed attempts (errors, timeouts, bad replies, refusals of what another replica
    /// accepted; each retried elsewhere or given up), and requests given up at once because no
    /// replica of the member was in rotation.
    pub failures: u64,
    /// Hedged copies sent (a request outlived the member's hedge delay).
    pub hedged_requests: u64,
    /// Hedged copies that answered before the original.
    pub hedge_wins: u64,
    /// Requests answered, per replica address: how the member's load was shared.
    pub answered_by: std::collections::BTreeMap<String, u64>,
    /// Registrations refused because their answers to the canary rows disagreed with a
    /// trusted replica's.
    pub canary_refused: u64,
}

/// Whether a status says the request itself is bad (see the module docs).
fn refuses_request(code: tonic::Code) -> bool {
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
    /// The model of an OIP member (None: a native member).
    pub oip: Option<OipMember>,
    stats: Mutex<MemberStats>,
    /// Requests of this member so far (the round-robin and exploration clock).
    picks: AtomicU64,
}

impl Member {
    fn stats(&self, f: impl FnOnce(&mut MemberStats)) {
        if let Ok(mut s) = self.stats.lock() {
            f(&mut s);
        }
    }
}

/// Every member of the ensemble, over the run's membership (static and registered replicas).
pub struct TeacherPool {
    /// The members in config order.
    pub members: Vec<Member>,
    membership: MembershipHandle,
    clients: Mutex<HashMap<ReplicaId, Arc<Replica>>>,
    /// Values per input row: the data's row length (the prober's test row).
    row_len: usize,
    /// Logits per row of every reply: the data's classes (a sequence run's vocabulary).
    classes: usize,
    /// The members are sequence models, asked with [`TeacherPool::infer_tokens`] (stated by
    /// [`crate::domain::membership::Membership::expect_sequences`]).
    sequences: bool,
    timeout: Duration,
    max_message_bytes: usize,
    retries: AtomicU64,
    /// TLS and the infer credential towards the replicas.
    security: ClientSecurity,
    /// The rows a registration on trial and a trusted replica both answer.
    canary: HostTensor,
}

impl TeacherPool {
    /// A pool over `membership`, which must know every member of `members` and state the
    /// data's shape ([`crate::domain::membership::Membership::expect_model`], or
    /// `expect_sequences` for sequence members): replies are checked against its class count
    /// (the vocabulary). Clients connect lazily, on a replica's first request
    /// (a replica that is down at start does not stop the run).
    pub fn new(
        members: &[MemberConfig],
        membership: MembershipHandle,
        timeout: Duration,
        max_message_bytes: usize,
    ) -> Result<Self> {
        let (known, shape, sequences) = {
            let m = membership.lock()?;
            let seq = m
                .expected_sequences()
                .map(|d| (u64::from(d.seq_len), d.vocab));
            (m.members(), m.expected_model(), seq)
        };
        // Sequence members: a "row" is one sequence of the run's length, a class a token.
        let Some((row_len, classes)) = shape.or(sequences) else {
            return Err(Error::Internal(
                "the membership does not state the data's shape (Membership::expect_model)".into(),
            ));
        };
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
                    oip: m.oip(),
                    stats: Mutex::new(MemberStats {
                        member: m.name.clone(),
                        ..Default::default()
                    }),
                    picks: AtomicU64::new(0),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let row_len = usize::try_from(row_len)
            .map_err(|_| Error::Internal(format!("a row of {row_len} values")))?;
        Ok(Self {
            members,
            membership,
            clients: Mutex::new(HashMap::new()),
            canary: synthetic_canary(row_len)?,
            row_len,
            classes: classes as usize,
            sequences: sequences.is_some(),
            timeout,
            max_message_bytes,
            retries: AtomicU64::new(0),
            security: ClientSecurity::plaintext(),
        })
    }

    /// This pool checking registrations on trial with `rows` (rows of the data, as the teachers
    /// are sent them) instead of the synthetic rows it starts with.
    pub fn with_canary(mut self, rows: HostTensor) -> Self {
        self.canary = rows;
        self
    }

    /// This pool dialling its replicas under `security` (TLS, the infer credential).
    pub fn with_security(mut self, security: ClientSecurity) -> Self {
        self.security = security;
        self
    }

    /// The membership this pool sends requests by (build the Registry service from it).
    pub fn membership(&self) -> &MembershipHandle {
        &self.membership
    }

    /// Notified whenever the membership changed (a replica joined, left, or went out of or
    /// back into rotation).
    pub fn membership_changed(&self) -> Arc<Notify> {
        self.membership.changed()
    }

    /// Pins each member's weights digest (`digests` in member order; None: nothing to pin), so
    /// that the soft-target cache key and the membership cannot disagree.
    pub fn pin_digests(&self, digests: &[Option<String>]) -> Result<()> {
        for (m, d) in self.members.iter().zip(digests) {
            if let Some(d) = d {
                self.membership.pin_digest(&m.name, d)?;
            }
        }
        Ok(())
    }

    /// Requests retried on another replica so far.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Statistics of every member.
    pub fn stats(&self) -> Vec<MemberStats> {
        let refusals: Vec<u64> = match self.membership.lock() {
            Ok(ms) => self
                .members
                .iter()
                .map(|m| ms.canary_refusals(&m.name))
                .collect(),
            Err(_) => Vec::new(),
        };
        self.members
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let mut s = m.stats.lock().map(|s| s.clone()).unwrap_or_default();
                s.canary_refused = refusals.get(i).copied().unwrap_or(0);
                s
            })
            .collect()
    }

    fn clients(&self) -> Result<std::sync::MutexGuard<'_, HashMap<ReplicaId, Arc<Replica>>>> {
        self.clients
            .lock()
            .map_err(|_| Error::Internal("teacher client cache lock poisoned".into()))
    }

    /// The (cached) client of replica `id`; a new one asks the membership for the address.
    fn client(&self, id: ReplicaId) -> Result<Arc<Replica>> {
        if let Some(r) = self.clients()?.get(&id) {
            return Ok(r.clone());
        }
        let view = self
            .membership
            .lock()?
            .replica(id)
            .ok_or_else(|| Error::Internal(format!("replica {id} left the membership")))?;
        let address = view.address;
        let oip = self
            .members
            .iter()
            .find(|m| m.name == view.member)
            .and_then(|m| m.oip.as_ref());
        let ep = self
            .security
            .endpoint_named(&address, view.server_name.as_deref())
            .map_err(|err| Error::Internal(format!("replica {id}: {err}")))?
            .connect_timeout(Duration::from_secs(5))
            .http2_adaptive_window(true)
            .timeout(self.timeout);
        let client = Client::new(self.security.channel(ep), oip, self.max_message_bytes);
        let r = Arc::new(Replica {
            address,
            client,
            outstanding: AtomicUsize::new(0),
            last_pick: AtomicU64::new(0),
        });
        // Another request may have created it meanwhile: keep the first.
        Ok(self.clients()?.entry(id).or_insert(r).clone())
    }

    /// Drops the clients of replicas that left the membership.
    fn forget_removed(&self) -> Result<()> {
        let ids: Vec<ReplicaId> = self.clients()?.keys().copied().collect();
        let gone: Vec<ReplicaId> = {
            let m = self.membership.lock()?;
            ids.into_iter()
                .filter(|&id| m.replica(id).is_none())
                .collect()
        };
        if !gone.is_empty() {
            let mut clients = self.clients()?;
            for id in gone {
                clients.remove(&id);
            }
        }
        Ok(())
    }

    /// Asks every replica known now (the static ones, at start) what it serves and records it
    /// in the membership, which checks that it fits the data (see
    /// [`crate::domain::membership::Membership::expect_model`]) and pins each member's weights
    /// digest. A replica that does not answer is only logged (it may come up later); one that
    /// serves a model of another shape, or other weights than another replica of the same
    /// member, is an error. Returns each member's pinned weights digest (None when no replica
    /// told it).
    pub async fn check_models(
        &self,
        row_len: usize,
        classes: usize,
    ) -> Result<Vec<Option<String>>> {
        let mut digests = Vec::with_capacity(self.members.len());
        for m in &self.members {
            let replicas = self.membership.lock()?.replicas(&m.name);
            for r in replicas {
                let client = self.client(r.id)?;
                let d =
                    tokio::time::timeout(self.timeout, client.client.describe(row_len, classes))
                        .await;
                match d {
                    Ok(Described::Model(ident)) => {
                        let Some(inputs) = ident.row_len() else {
                            return Err(Error::Config(format!(
                                "member `{}` replica {} states input shape {:?}, whose size overflows",
                                m.name, r.address, ident.input_shape
                            )));
                        };
                        // A sequence model is checked by the membership (vocabulary,
                        // tokenizer, longest sequence) when its identity is recorded.
                        if !self.sequences
                            && (inputs != row_len as u64 || ident.classes as usize != classes)
                        {
                            return Err(Error::Config(format!(
                                "member `{}` replica {} serves {} ({} inputs, {} classes) but the data has rows of {row_len} values and {classes} classes",
                                m.name, r.address, ident.model_id, inputs, ident.classes
                            )));
                        }
                        let model = ident.model_id.clone();
                        self.membership
                            .lock()?
                            .record_identity(r.id, ident)
                            .map_err(|e| Error::Config(e.to_string()))?;
                        tracing::info!(member = %m.name, replica = %r.address, %model, "teacher replica ready");
                    }
                    Ok(Described::Mismatch(msg)) => {
                        return Err(Error::Config(format!(
                            "member `{}` replica {}: {msg}",
                            m.name, r.address
                        )));
                    }
                    Ok(Described::NotReady(status)) => {
                        tracing::warn!(member = %m.name, replica = %r.address, %status, "teacher replica not ready")
                    }
                    Err(_) => {
                        tracing::warn!(member = %m.name, replica = %r.address, "teacher replica did not answer Describe")
                    }
                }
            }
            digests.push(self.membership.lock()?.digest(&m.name).map(str::to_string));
        }
        Ok(digests)
    }

    /// The replica for the next attempt of a request to `m`: among those in rotation, not in
    /// `excluded`, and other than `avoid` when another remains; `retry` turns exploration off.
    /// One membership lock and one client-cache lock, no strings copied (a client is created,
    /// and its address copied, only on a replica's first use).
    fn pick(
        &self,
        m: &Member,
        excluded: &[ReplicaId],
        avoid: Option<ReplicaId>,
        retry: bool,
    ) -> Result<Picked> {
        let mut candidates: Vec<Candidate> = Vec::new();
        let hedge = {
            let ms = self.membership.lock()?;
            ms.candidates(&m.name, &mut candidates);
            ms.hedge_after(&m.name)
        };
        let rotation = candidates.len();
        if rotation == 0 {
            return Ok(Picked::NoneInRotation);
        }
        candidates.retain(|c| !excluded.contains(&c.id));
        if candidates.is_empty() {
            return Ok(Picked::AllExcluded);
        }
        if let Some(avoid) = avoid
            && candidates.iter().any(|c| c.id != avoid)
        {
            candidates.retain(|c| c.id != avoid);
        }
        {
            let clients = self.clients()?;
            for c in &mut candidates {
                if let Some(r) = clients.get(&c.id) {
                    c.outstanding = r.outstanding.load(Ordering::Relaxed);
                    c.last_pick = r.last_pick.load(Ordering::Relaxed);
                }
            }
        }
        let pick = m.picks.fetch_add(1, Ordering::Relaxed) + 1;
        let Some(i) = choice::choose(&candidates, pick, retry) else {
            return Ok(Picked::AllExcluded);
        };
        let id = candidates[i].id;
        let replica = self.client(id)?;
        replica.last_pick.store(pick, Ordering::Relaxed);
        Ok(Picked::Replica(Pick {
            id,
            replica,
            rotation,
            hedge,
        }))
    }

    /// Tempered logits z/T (`rows × classes`, f32, every value finite) of member `member` for
    /// `inputs`, from the member's replicas in rotation now (registered ones included), hedged
    /// on a second replica when the first is slow. With none in rotation it fails at once with
    /// [`Error::Teacher`], so the run's policy decides; see the module docs for retries and
    /// refusals.
    pub async fn infer(
        &self,
        member: usize,
        inputs: &HostTensor,
        temperature: f32,
    ) -> Result<Vec<f32>> {
        let req = Request::Rows {
            inputs,
            temperature,
        };
        match self.ask(member, req).await? {
            Reply::Logits(z) => Ok(z),
            Reply::TopK(_) => Err(Error::Internal("top-k rows answered rows".into())),
        }
    }

    /// The top-k rows (one per real position, sequence by sequence) of sequence member
    /// `member` for `req`, with the same choice of replica, retries, refusals and hedging as
    /// [`Self::infer`]; every row checked ([`reply::checked_topk`]) against the vocabulary
    /// the membership expects.
    pub async fn infer_tokens(
        &self,
        member: usize,
        req: &TokenRequest,
    ) -> Result<distill_proto::pb::TopKTargets> {
        match self.ask(member, Request::Tokens(req)).await? {
            Reply::TopK(t) => Ok(t),
            Reply::Logits(_) => Err(Error::Internal("logits answered token sequences".into())),
        }
    }

    /// [`Self::infer`] or [`Self::infer_tokens`]: the request's attempts on `member`'s replicas.
    async fn ask(&self, member: usize, req: Request<'_>) -> Result<Reply> {
        let m = self
            .members
            .get(member)
            .ok_or_else(|| Error::Internal(format!("no teacher member {member}")))?;
        let mut refused: Vec<(ReplicaId, String)> = Vec::new();
        let mut excluded: Vec<ReplicaId> = Vec::new();
        let mut last_failed: Option<ReplicaId> = None;
        let mut last_err = String::new();
        let mut failures = 0usize;
        let mut attempts = None;
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 0;
        loop {
            let pick = match self.pick(m, &excluded, last_failed, attempt > 0)? {
                Picked::Replica(p) => p,
                Picked::NoneInRotation => {
                    // A request given up: counted with the failed attempts.
                    m.stats(|s| s.failures += 1);
                    return Err(Error::Teacher {
                        member: m.name.clone(),
                        msg: if last_err.is_empty() {
                            "no replica in rotation".into()
                        } else {
                            format!("no replica in rotation; last error: {last_err}")
                        },
                    });
                }
                Picked::AllExcluded => break,
            };
            let attempts = *attempts.get_or_insert((2 * pick.rotation).min(MAX_ATTEMPTS));
            let outcomes = match pick.hedge.filter(|after| *after < self.timeout) {
                Some(after) => self.hedged(m, &pick, after, &excluded, req).await?,
                None => vec![(pick.id, self.call(m, &pick, req).await?)],
            };
            let mut failed_now = false;
            for (id, outcome) in outcomes {
                match outcome {
                    Outcome::Answered(reply) => {
                        self.charge_refusals(m, &refused)?;
                        return Ok(reply);
                    }
                    Outcome::Refused(msg) => {
                        excluded.push(id);
                        refused.push((id, msg));
                    }
                    Outcome::Failed(err) => {
                        last_err = err;
                        last_failed = Some(id);
                        failures += 1;
                        failed_now = true;
                    }
                }
            }
            attempt += 1;
            if attempt >= attempts {
                break;
            }
            self.retries.fetch_add(1, Ordering::Relaxed);
            // A refusal is retried at once: the next replica either accepts or refuses too.
            if failed_now {
                tokio::time::sleep(jitter(backoff)).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        if failures == 0 && !refused.is_empty() {
            return Err(Error::TeacherRejected {
                member: m.name.clone(),
                msg: refused
                    .iter()
                    .map(|(_, msg)| msg.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
            });
        }
        if !refused.is_empty() {
            last_err = format!(
                "{last_err}; {} replica(s) refused the request",
                refused.len()
            );
        }
        Err(Error::Teacher {
            member: m.name.clone(),
            msg: format!("every replica failed; last error: {last_err}"),
        })
    }

    /// Another replica accepted what the replicas in `refused` refused: each is charged a
    /// failed request.
    fn charge_refusals(&self, m: &Member, refused: &[(ReplicaId, String)]) -> Result<()> {
        if refused.is_empty() {
            return Ok(());
        }
        for (id, msg) in refused {
            tracing::warn!(member = %m.name, replica = id, error = %msg, "teacher replica refused a request another replica accepted");
        }
        m.stats(|s| s.failures += refused.len() as u64);
        let now = Instant::now();
        self.membership.update(|ms| {
            let events = refused
                .iter()
                .flat_map(|(id, _)| ms.record_failure(*id, now))
                .collect();
            ((), events)
        })
    }

    /// [`Self::call`] to `first`; when it has not answered after `after`, the same request to
    /// the best other replica in rotation (not in `excluded`) as well. The first answer wins
    /// and the other request is cancelled, its elapsed time recorded as a lower bound of its
    /// replica's latency; when one copy fails or is refused, the other is still awaited.
    /// Returns the outcomes in the order they came, an answer (if any) last.
    async fn hedged(
        &self,
        m: &Member,
        first: &Pick,
        after: Duration,
        excluded: &[ReplicaId],
        req: Request<'_>,
    ) -> Result<Vec<(ReplicaId, Outcome)>> {
        let id = first.id;
        let started = Instant::now();
        let primary = self.call(m, first, req);
        tokio::pin!(primary);
        tokio::select! {
            o = &mut primary => return Ok(vec![(id, o?)]),
            () = tokio::time::sleep(after) => {}
        }
        let mut others = excluded.to_vec();
        others.push(id);
        let Picked::Replica(second) = self.pick(m, &others, None, true)? else {
            return Ok(vec![(id, primary.await?)]);
        };
        let id2 = second.id;
        m.stats(|s| s.hedged_requests += 1);
        tracing::debug!(member = %m.name, slow = id, hedge = id2, after_ms = after.as_secs_f64() * 1e3, "teacher request hedged");
        let started2 = Instant::now();
        let secondary = self.call(m, &second, req);
        tokio::pin!(secondary);
        let mut done: Vec<(ReplicaId, Outcome)> = Vec::with_capacity(2);
        let (mut first_done, mut second_done) = (false, false);
        loop {
            tokio::select! {
                o = &mut primary, if !first_done => {
                    first_done = true;
                    let o = o?;
                    if let Outcome::Answered(_) = o {
                        if !second_done {
                            self.membership.lock()?.record_slow(id2, started2.elapsed());
                        }
                        done.push((id, o));
                        return Ok(done);
                    }
                    done.push((id, o));
                },
                o = &mut secondary, if !second_done => {
                    second_done = true;
                    let o = o?;
                    if let Outcome::Answered(_) = o {
                        m.stats(|s| s.hedge_wins += 1);
                        if !first_done {
                            self.membership.lock()?.record_slow(id, started.elapsed());
                        }
                        done.push((id2, o));
                        return Ok(done);
                    }
                    done.push((id2, o));
                },
            }
            if first_done && second_done {
                return Ok(done);
            }
        }
    }

    /// One request to the picked replica, with the request deadline, its reply checked.
    /// Records the outcome: latency and count on success; on a failure, the member's statistics
    /// and (unless the replica was only busy) the membership. A refusal is not recorded here.
    async fn call(&self, m: &Member, p: &Pick, req: Request<'_>) -> Result<Outcome> {
        let (id, r) = (p.id, &*p.replica);
        let _in_flight = InFlight::start(r);
        let started = Instant::now();
        let answer = async {
            match req {
                Request::Rows {
                    inputs,
                    temperature,
                } => r
                    .client
                    .infer(inputs, temperature, self.classes)
                    .await
                    .map(Reply::Logits),
                Request::Tokens(t) => r
                    .client
                    .infer_tokens(t, self.classes)
                    .await
                    .map(Reply::TopK),
            }
        };
        let result = tokio::time::timeout(self.timeout, answer).await;
        // Whether the failure says something about the replica's health (a busy replica is
        // retried elsewhere but stays in rotation).
        let mut unhealthy = true;
        let err = match result {
            Ok(Ok(reply)) => {
                let latency = started.elapsed();
                let secs = latency.as_secs_f64();
                m.stats(|s| {
                    s.requests += 1;
                    match s.answered_by.get_mut(&r.address) {
                        Some(n) => *n += 1,
                        None => {
                            s.answered_by.insert(r.address.clone(), 1);
                        }
                    }
                    s.total_latency_secs += secs;
                    s.max_latency_secs = s.max_latency_secs.max(secs);
                });
                crate::telemetry::member_answered(&m.name, secs);
                self.membership
                    .update(|ms| ((), ms.record_success(id, latency)))?;
                return Ok(Outcome::Answered(reply));
            }
            Ok(Err(Failure::BadReply(bad))) => format!("{}: bad reply: {bad}", r.address),
            Ok(Err(Failure::Unsendable(msg))) => {
                return Ok(Outcome::Refused(format!("{}: {msg}", r.address)));
            }
            Ok(Err(Failure::Status(status))) if refuses_request(status.code()) => {
                return Ok(Outcome::Refused(format!(
                    "{}: {}: {}",
                    r.address,
                    status.code(),
                    status.message()
                )));
            }
            Ok(Err(Failure::Status(status))) => {
                unhealthy = status.code() != tonic::Code::ResourceExhausted;
                format!("{}: {}: {}", r.address, status.code(), status.message())
            }
            Err(_) => format!("{}: no answer within {:?}", r.address, self.timeout),
        };
        m.stats(|s| s.failures += 1);
        if unhealthy {
            let now = Instant::now();
            self.membership
                .update(|ms| ((), ms.record_failure(id, now)))?;
        }
        tracing::warn!(member = %m.name, replica = id, error = %err, "teacher request failed");
        Ok(Outcome::Failed(err))
    }
}

/// Canary rows for a pool whose caller gave none ([`TeacherPool::with_canary`]): a few f32 rows
/// in [0, 1) from a fixed generator.
fn synthetic_canary(row_len: usize) -> Result<HostTensor> {
    const ROWS: usize = 4;
    let mut x: u32 = 0x9e37_79b9;
    let values: Vec<f32> = (0..ROWS.saturating_mul(row_len))
        .map(|_| {
            // xorshift32: any spread of values will do; the rows only have to be the same
            // for the replica on trial and the reference.
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as f32 / (1u32 << 24) as f32
        })
        .collect();
    HostTensor::from_f32(vec![ROWS, row_len], &values)
        .map_err(|e| Error::Internal(format!("canary rows: {e}")))
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
