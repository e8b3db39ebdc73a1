//! Teacher membership: which replicas serve each ensemble member, whether each is in rotation,
//! and how fast each answers.
//!
//! A pure state machine (STYLE.md §7): every call that depends on time takes `now: Instant`,
//! nothing sleeps or does I/O, and calls return the [`Event`]s they caused so the driver can log
//! them ([`Event::log`]). The gRPC `Registry` service ([`crate::registry`]) and the teacher pool
//! drive it through [`crate::membership::MembershipHandle`]; tests drive it with chosen instants.
//!
//! The parts: [`replicas`] (who is a replica: registration, leases, identity), [`health`]
//! (failures, rotation, probes) and [`latency`] (EWMAs, the hedge delay, stragglers); this
//! module holds the types and the queries.
//!
//! Semantics, decided here:
//! - **Two sources of replicas.** *Static* replicas come from the run config's `endpoints`; they
//!   never expire and are never removed (a Deregister of one is a no-op). *Registered* replicas
//!   join through `Register` and hold a lease of `lease_ttl`; every heartbeat renews it to
//!   `now + lease_ttl`. A lease expires at `now ≥ deadline`: [`Membership::tick`] removes the
//!   replica ([`RemovalReason::Expired`]), and a heartbeat that arrives at or after the deadline
//!   finds it expired too (it must register again).
//! - **Identity of a replica is its address.** Addresses are normalised
//!   ([`crate::domain::address::normalize_address`]: `http(s)://host:port`, lowercase). Registering an address that is
//!   already registered for the same member is a *renewal*: the same [`ReplicaId`], a new lease,
//!   the health state kept (a replica out of rotation gets its next probe at once). Registering
//!   it for another member replaces the old replica (removed with [`RemovalReason::Replaced`]).
//!   Registering the address of a static replica of the same member returns the static
//!   replica's id (heartbeats then carry its load; it still never expires); of another member, is
//!   refused. Replica ids start at 1, grow, and are never reused within one coordinator;
//!   heartbeats carry the address too, so an id handed out by an earlier coordinator (which a
//!   restarted one may have given to another address) is unknown rather than misattributed.
//! - **Only the run's members.** Members are fixed by the run config (they define the ensemble
//!   and the soft-target cache key); a registration for another member is refused.
//! - **Same weights per member.** The first weights digest a member sees (from a registration,
//!   a static replica's Describe via [`Membership::record_identity`], or
//!   [`Membership::pin_digest`]) is pinned for the rest of the run, even when every replica has
//!   left: a replica serving other weights (or another input shape or class count than the data,
//!   see [`Membership::expect_model`]) is refused, and one already registered at that address is
//!   removed ([`RemovalReason::Refused`]), since it no longer serves the member's model.
//! - **Health.** `failure_threshold` consecutive failed requests take a replica out of rotation
//!   (a success resets the count). Out of rotation it is *probed*: [`Membership::due_probes`]
//!   lists replicas whose probe is due, the driver checks them (a Describe or gRPC health check)
//!   and reports [`Membership::probe_succeeded`] or [`Membership::probe_failed`]. Probe `n`
//!   (from 0) is due `min(probe_initial · 2ⁿ, probe_max) · (1 − probe_jitter · u)` after the
//!   previous failure, `u` in [0, 1) from a SplitMix64 generator seeded with `seed`, so tests are
//!   deterministic and replicas that failed together are not probed in lock step. A successful
//!   probe (or any successful request) puts the replica back in rotation. What counts as a
//!   failed request is the teacher pool's decision (`crate::teachers`): errors, timeouts, replies
//!   that are not `[rows, classes]` finite values, and refusals of requests that another replica
//!   of the member accepts.
//! - **Trials.** With `canary` on, a new registration is *on trial* ([`Health::OnTrial`]): out
//!   of rotation, its first probe due at once, and that probe ([`ProbeKind::Trial`]) compares
//!   its answers to canary rows with a *reference*'s. The reference is a trusted replica in
//!   rotation — static replicas and registrations at the member's trusted addresses
//!   ([`Membership::trust`]) — or, for a member with neither (not *rooted*), any admitted one.
//!   Agreement admits it ([`Event::Admitted`], and only then may its identity pin the digest,
//!   so a rogue first registration cannot lock the real replicas out); disagreement removes it
//!   ([`Membership::canary_disagreed`], [`RemovalReason::Disagreed`]), counts it, and refuses
//!   its address for `probe_max`; no reference, or no answer, retries with the probe backoff.
//!   A registration at a trusted address, or any with `canary` off, is in rotation at once. A
//!   member that is not rooted and has no admitted replica trusts its next registration as it
//!   is when `trust_first_registration` holds ([`Event::TrustedOnFirstUse`]), and refuses it
//!   otherwise ([`MembershipError::NoTrustedReplica`]).
//! - **Stated shapes are checked.** A model identity whose input shape's size overflows `u64`
//!   is refused ([`MembershipError::ShapeOverflow`]) like one that does not fit the data.
//! - **Member down.** A member is *up* while at least one of its replicas is in rotation, and
//!   *down* otherwise (all out of rotation, or none present). [`Event::MemberDown`] and
//!   [`Event::MemberUp`] mark the transitions; the run's `wait`/`degrade` policy acts on them.
//!   A member with no static replica starts down (without an event) until one registers.
//! - **Latency.** Each replica keeps an EWMA of its request latencies; each member keeps the
//!   smoothed latency and mean deviation of all its replicas' requests (Jacobson/Karels, as TCP's
//!   retransmission timer: `srtt += α(r − srtt)`, `rttvar += β(|r − srtt| − rttvar)`).
//!   [`Membership::hedge_after`] is `max(hedge_min, srtt + hedge_deviations · rttvar)` — a high
//!   percentile of the member's latency — once `hedge_min_samples` requests were timed and while
//!   another replica is in rotation to send the hedge to. [`Membership::is_straggler`] flags a
//!   replica whose EWMA exceeds `straggler_factor` × the fastest in-rotation replica's.

pub mod discovered;
pub mod health;
pub mod latency;
pub mod replicas;
#[cfg(test)]
mod testutil;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub use crate::domain::address::{BadAddress, normalize_address};
use crate::domain::choice::Candidate;
use health::{ProbeBackoff, ReplicaHealth};
use latency::{MemberLatency, ReplicaLatency};

/// A replica's id: unique within one coordinator's lifetime, never reused, never 0.
pub type ReplicaId = u64;

/// Tunables of the membership state machine.
#[derive(Debug, Clone, PartialEq)]
pub struct MembershipConfig {
    /// Lease length of a registered replica: removed after this long without a heartbeat.
    pub lease_ttl: Duration,
    /// How often registered replicas are asked to heartbeat (a fraction of `lease_ttl`).
    pub heartbeat_interval: Duration,
    /// Consecutive failed requests that take a replica out of rotation (at least 1).
    pub failure_threshold: u32,
    /// Delay before the first probe of a replica taken out of rotation.
    pub probe_initial: Duration,
    /// Longest delay between probes.
    pub probe_max: Duration,
    /// Fraction of each probe delay taken off at random, in [0, 1].
    pub probe_jitter: f64,
    /// Weight of a new sample in a replica's latency EWMA, and the `α` of the member's smoothed
    /// latency, in (0, 1].
    pub latency_alpha: f64,
    /// The `β` of the member's mean latency deviation, in (0, 1].
    pub deviation_beta: f64,
    /// Mean deviations above the smoothed latency after which a request is hedged.
    pub hedge_deviations: f64,
    /// Shortest hedge delay.
    pub hedge_min: Duration,
    /// Timed requests of a member before it hedges at all.
    pub hedge_min_samples: u64,
    /// A replica whose latency EWMA exceeds this multiple of the fastest one's is a straggler.
    pub straggler_factor: f64,
    /// Whether requests are hedged at all ([`Membership::hedge_after`] is None when not).
    pub hedge: bool,
    /// Seed of the probe jitter.
    pub seed: u64,
    /// Most replicas a member may have, static and registered together; a registration past
    /// it is refused.
    pub max_replicas_per_member: usize,
    /// Whether a new registration is on trial (its answers to canary rows compared with a
    /// trusted replica's) before it enters rotation.
    pub canary: bool,
    /// Largest difference allowed between a replica's logits and the reference's on the
    /// canary rows, each row shifted so its largest logit is 0 (softmax ignores the shift).
    pub canary_tolerance: f32,
    /// For a member with no static endpoint and no trusted address: whether the first
    /// registration (while no admitted replica of the member is present) is trusted as it is.
    pub trust_first_registration: bool,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(10),
            // Four heartbeats may be lost before the lease ends.
            heartbeat_interval: Duration::from_secs(2),
            failure_threshold: 3,
            probe_initial: Duration::from_millis(250),
            probe_max: Duration::from_secs(30),
            probe_jitter: 0.5,
            // TCP's retransmission-timer constants (RFC 6298): α = 1/8, β = 1/4, K = 4.
            latency_alpha: 0.125,
            deviation_beta: 0.25,
            hedge_deviations: 4.0,
            hedge_min: Duration::from_millis(5),
            hedge_min_samples: 8,
            straggler_factor: 3.0,
            hedge: true,
            seed: 0x5eed,
            max_replicas_per_member: 64,
            canary: true,
            // Logit units: well above what the same weights give on another device or batch
            // (~1e-4 in f32), well below what changes soft targets (e^0.05 ≈ 5 % in a ratio).
            canary_tolerance: 0.05,
            trust_first_registration: true,
        }
    }
}

/// A teacher model's identity as a replica states it (Register, or Describe).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelIdentity {
    /// `arch@digest16`.
    pub model_id: String,
    /// SHA-256 of the weights, lowercase hex.
    pub weights_digest: String,
    /// One input row's shape.
    pub input_shape: Vec<u64>,
    /// Logits per row.
    pub classes: u32,
    /// Most rows per request (0: not stated).
    pub max_batch: u32,
    /// What a sequence model (a language model) states besides; None for a classifier.
    pub sequence: Option<SequenceIdentity>,
}

/// What a sequence model's replica states beyond its vocabulary (`classes`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SequenceIdentity {
    /// SHA-256 of its tokenizer (`distill_core::tokenizer::digest`).
    pub tokenizer_digest: String,
    /// Most tokens one request may carry.
    pub max_tokens: u64,
    /// Longest sequence one request may carry.
    pub max_sequence_length: u32,
}

/// The token data of a run whose members are sequence models: every replica must have this
/// vocabulary and tokenizer, and take sequences of `seq_len` tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceData {
    /// Vocabulary size (the width of every distribution).
    pub vocab: u32,
    /// SHA-256 of the tokenizer the data were tokenized with.
    pub tokenizer_digest: String,
    /// Tokens per sequence the run sends.
    pub seq_len: u32,
}

impl ModelIdentity {
    /// Values per input row (the product of `input_shape`); None when it overflows.
    pub fn row_len(&self) -> Option<u64> {
        self.input_shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
    }
}

/// Where a replica came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The run config's endpoints: never expires.
    Static,
    /// A `Register` call: lives while its lease is renewed.
    Registered,
    /// An address a member's `dns://` endpoint resolved to: lives while the name resolves to
    /// it ([`discovered`]).
    Discovered,
}

/// Whether requests go to a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Requests go to it.
    InRotation,
    /// Taken out after failures; probed until a probe succeeds.
    OutOfRotation,
    /// Registered and not yet admitted: its answers to the canary rows must agree with a
    /// trusted replica's first.
    OnTrial,
}

/// Why a replica left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemovalReason {
    /// Its lease ran out without a heartbeat.
    Expired,
    /// It deregistered.
    Deregistered,
    /// Its address registered again for another member.
    Replaced,
    /// Its address registered again with a model the member does not serve.
    Refused,
    /// On trial, its answers to the canary rows disagreed with the trusted replica's.
    Disagreed,
    /// Its address left the answer of its member's DNS name.
    Undiscovered,
}

/// Something that happened to the membership, for logging and for the run's policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A replica joined (registered, or a static one at start-up is not reported).
    Joined {
        member: String,
        replica: ReplicaId,
        address: String,
    },
    /// A new registration is on trial: it enters rotation once its canary answers agree with
    /// a trusted replica's.
    OnTrial {
        member: String,
        replica: ReplicaId,
        address: String,
    },
    /// A replica on trial agreed with the trusted one and is in rotation.
    Admitted {
        member: String,
        replica: ReplicaId,
        address: String,
    },
    /// A member with nothing to compare with trusts its first registration as it is.
    TrustedOnFirstUse {
        member: String,
        replica: ReplicaId,
        address: String,
    },
    /// A replica on trial disagreed with the trusted one: it is removed (a [`Event::Removed`]
    /// follows) and its address refused for `banned_for`.
    CanaryRefused {
        member: String,
        replica: ReplicaId,
        address: String,
        detail: String,
        banned_for: Duration,
    },
    /// A known address registered again: same id, new lease.
    Renewed {
        member: String,
        replica: ReplicaId,
        address: String,
    },
    /// A replica left the membership.
    Removed {
        member: String,
        replica: ReplicaId,
        address: String,
        reason: RemovalReason,
    },
    /// Consecutive failures took a replica out of rotation.
    OutOfRotation {
        member: String,
        replica: ReplicaId,
        address: String,
        failures: u32,
        first_probe_in: Duration,
    },
    /// A probe of a replica out of rotation failed; the next one is due after `next_probe_in`.
    ProbeFailed {
        member: String,
        replica: ReplicaId,
        address: String,
        attempt: u32,
        next_probe_in: Duration,
        error: String,
    },
    /// A replica out of rotation answered again.
    BackInRotation {
        member: String,
        replica: ReplicaId,
        address: String,
    },
    /// No replica of the member is in rotation any more.
    MemberDown { member: String },
    /// A replica of a down member is in rotation again.
    MemberUp { member: String },
}

impl Event {
    /// Logs the event with `tracing` (problems as warnings).
    pub fn log(&self) {
        match self {
            Event::Joined {
                member,
                replica,
                address,
            } => tracing::info!(%member, replica, %address, "teacher replica joined"),
            Event::Renewed {
                member,
                replica,
                address,
            } => tracing::info!(%member, replica, %address, "teacher replica registered again"),
            Event::OnTrial {
                member,
                replica,
                address,
            } => tracing::info!(
                %member, replica, %address,
                "teacher replica on trial: checking its answers against a trusted replica"
            ),
            Event::Admitted {
                member,
                replica,
                address,
            } => tracing::info!(
                %member, replica, %address,
                "teacher replica agreed with the trusted replica and is in rotation"
            ),
            Event::TrustedOnFirstUse {
                member,
                replica,
                address,
            } => tracing::warn!(
                %member, replica, %address,
                "member has no static endpoint, no trusted address and no admitted replica: its \
                 first registration is trusted as it is (list trusted addresses under the member \
                 to check every registration)"
            ),
            Event::CanaryRefused {
                member,
                replica,
                address,
                detail,
                banned_for,
            } => tracing::warn!(
                %member, replica, %address, %detail, ?banned_for,
                "teacher replica refused: its answers disagree with the trusted replica's"
            ),
            Event::Removed {
                member,
                replica,
                address,
                reason,
            } => match reason {
                RemovalReason::Deregistered => {
                    tracing::info!(%member, replica, %address, "teacher replica deregistered")
                }
                // Logged with its reason by `CanaryRefused`.
                RemovalReason::Disagreed => {
                    tracing::debug!(%member, replica, %address, "teacher replica removed")
                }
                _ => {
                    tracing::warn!(%member, replica, %address, ?reason, "teacher replica removed")
                }
            },
            Event::OutOfRotation {
                member,
                replica,
                address,
                failures,
                first_probe_in,
            } => tracing::warn!(
                %member, replica, %address, failures, ?first_probe_in,
                "teacher replica out of rotation"
            ),
            Event::ProbeFailed {
                member,
                replica,
                address,
                attempt,
                next_probe_in,
                error,
            } => tracing::warn!(
                %member, replica, %address, attempt, ?next_probe_in, %error,
                "teacher replica probe failed"
            ),
            Event::BackInRotation {
                member,
                replica,
                address,
            } => tracing::info!(%member, replica, %address, "teacher replica back in rotation"),
            Event::MemberDown { member } => {
                tracing::warn!(%member, "teacher member down: no replica in rotation")
            }
            Event::MemberUp { member } => tracing::info!(%member, "teacher member up"),
        }
    }
}

/// A registration or identity that the membership refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    /// The member is not part of the run.
    #[error("member `{member}` is not part of this run (members: {known})")]
    UnknownMember { member: String, known: String },
    /// The replica serves other weights than the member's.
    #[error(
        "member `{member}`: replica {address} serves weights {got} but the member serves {expected}; replicas of a member must serve the same model"
    )]
    DigestMismatch {
        member: String,
        address: String,
        got: String,
        expected: String,
    },
    /// The replica's model does not fit the data or the member's other replicas.
    #[error(
        "member `{member}`: replica {address} serves a model with {got_inputs} inputs and {got_classes} classes, expected {expected_inputs} inputs and {expected_classes} classes"
    )]
    ShapeMismatch {
        member: String,
        address: String,
        got_inputs: u64,
        got_classes: u32,
        expected_inputs: u64,
        expected_classes: u32,
    },
    /// A sequence model where rows are trained, a classifier where sequences are, or a
    /// sequence model of another tokenizer, vocabulary or length.
    #[error("member `{member}`: replica {address} {problem}")]
    SequenceMismatch {
        member: String,
        address: String,
        problem: String,
    },
    /// The address is a static replica of another member.
    #[error(
        "address {address} is a static replica of member `{owner}` in the run config, not of `{member}`"
    )]
    AddressTaken {
        address: String,
        member: String,
        owner: String,
    },
    /// The same address appears twice among the static endpoints.
    #[error(
        "address {address} is listed twice in the run config (members `{first}` and `{second}`)"
    )]
    DuplicateStatic {
        address: String,
        first: String,
        second: String,
    },
    /// A stated input shape whose number of values overflows.
    #[error(
        "member `{member}`: replica {address} states input shape {shape:?}, whose size overflows"
    )]
    ShapeOverflow {
        member: String,
        address: String,
        shape: Vec<u64>,
    },
    /// An address that is not `http(s)://host:port`.
    #[error("{0}")]
    BadAddress(String),
    /// No replica with this id.
    #[error("no replica {0}")]
    UnknownReplica(ReplicaId),
    /// Another registration holds the address, and this one does not present its lease
    /// secret.
    #[error(
        "address {address} is registered already (replica {replica}); only the registered process, presenting its lease secret, may renew or change that registration (a restarted one registers again once the old lease ends)"
    )]
    AddressHeld { address: String, replica: ReplicaId },
    /// The member has as many replicas as a member may have.
    #[error("member `{member}` has {limit} replicas already, the most a member may have")]
    TooManyReplicas { member: String, limit: usize },
    /// Nothing trusted to check a registration against, and first use is not trusted.
    #[error(
        "member `{member}` has no trusted replica to check a registration against: give it a static endpoint or trusted addresses, or set `[membership] trust_first_registration = true`"
    )]
    NoTrustedReplica { member: String },
    /// The address's last replica disagreed with the trusted one on the canary rows.
    #[error(
        "address {address} served answers that disagree with member `{member}`'s trusted replica; it is refused for {secs} s more"
    )]
    Banned {
        address: String,
        member: String,
        secs: u64,
    },
}

pub use crate::domain::claim::Claim;
pub(crate) use distill_transport::secret::secrets_match;

/// A replica as the rest of the coordinator sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaView {
    /// Its id.
    pub id: ReplicaId,
    /// The member it serves.
    pub member: String,
    /// Normalised address to dial.
    pub address: String,
    /// Static or registered.
    pub source: Source,
    /// Whether its answers are the reference new replicas are checked against.
    pub trusted: bool,
    /// In or out of rotation.
    pub health: Health,
    /// Failed requests since the last success.
    pub consecutive_failures: u32,
    /// EWMA of its request latencies (None before the first timed request).
    pub latency: Option<Duration>,
    /// Requests it answered (timed).
    pub answered: u64,
    /// Requests in flight at its last heartbeat.
    pub in_flight: Option<u32>,
    /// Its stated in-flight limit (0: not stated).
    pub max_in_flight: u32,
    /// What it serves, once known.
    pub identity: Option<ModelIdentity>,
    /// A discovered replica's DNS name: the name its TLS certificate must carry (it is dialled
    /// by IP address).
    pub server_name: Option<String>,
    /// When its lease ends (registered replicas).
    pub lease_deadline: Option<Instant>,
}

/// A probe the driver should run now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// Which replica.
    pub replica: ReplicaId,
    /// Its member.
    pub member: String,
    /// Where to dial.
    pub address: String,
    /// What the probe must check.
    pub kind: ProbeKind,
}

/// What a probe checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeKind {
    /// A replica out of rotation: does it serve the member's model and answer well again?
    Health,
    /// A replica on trial: do its answers to the canary rows agree with `reference`'s (a
    /// trusted replica in rotation; None when the member has none now, and the probe fails)?
    Trial { reference: Option<ReplicaId> },
}

/// A successful registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The replica's id.
    pub replica: ReplicaId,
    /// Its normalised address (what heartbeats must carry).
    pub address: String,
    /// Lease length.
    pub lease_ttl: Duration,
    /// Heartbeat period to ask for.
    pub heartbeat_interval: Duration,
    /// True if the address was already known (same id, new lease).
    pub renewed: bool,
    /// The lease secret that Heartbeat and Deregister must present.
    pub secret: String,
}

/// What a replica reports with a heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// Requests in flight.
    pub in_flight: u32,
    /// Its in-flight limit (0: not stated).
    pub max_in_flight: u32,
}

/// The result of a call plus the events it caused.
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub struct Outcome<T> {
    /// The call's answer.
    pub value: T,
    /// What happened, in order.
    pub events: Vec<Event>,
}

impl From<BadAddress> for MembershipError {
    fn from(e: BadAddress) -> Self {
        MembershipError::BadAddress(e.0)
    }
}

#[derive(Debug, Clone)]
struct Replica {
    member: String,
    address: String,
    source: Source,
    lease_deadline: Option<Instant>,
    health: ReplicaHealth,
    latency: ReplicaLatency,
    load: Option<Load>,
    identity: Option<ModelIdentity>,
    /// A registered replica's lease secret (empty for a static one).
    secret: String,
    /// Static, at a trusted address, or trusted on first use.
    trusted: bool,
    /// Registered and not yet admitted (see [`Health::OnTrial`]).
    on_trial: bool,
    /// A discovered replica's DNS name.
    server_name: Option<String>,
}

#[derive(Debug, Clone, Default)]
struct MemberState {
    /// Pinned weights digest.
    digest: Option<String>,
    /// Input values per row and classes of the first identity seen.
    shape: Option<(u64, u32)>,
    up: bool,
    latency: MemberLatency,
    /// Addresses whose registrations are trusted as they are (the run config's `trusted`).
    trusted_addresses: std::collections::BTreeSet<String>,
    /// Whether its trust comes from the config (a static endpoint or a trusted address);
    /// otherwise from first use, and any admitted replica may be the reference.
    rooted: bool,
    /// Replicas refused because their canary answers disagreed.
    canary_refusals: u64,
}

/// The teacher membership of one run.
#[derive(Debug, Clone)]
pub struct Membership {
    cfg: MembershipConfig,
    members: BTreeMap<String, MemberState>,
    replicas: BTreeMap<ReplicaId, Replica>,
    next_id: ReplicaId,
    backoff: ProbeBackoff,
    /// Input values per row and classes of the data, if stated.
    data_shape: Option<(u64, u32)>,
    /// The token data, when the members are sequence models.
    sequences: Option<SequenceData>,
    /// Addresses refused until the instant: their replica disagreed on the canary rows.
    banned: BTreeMap<String, Instant>,
}

impl Membership {
    /// The members of the run, each with its static endpoints (possibly none), in config
    /// order. Static replicas get ids 1, 2, … in that order and start in rotation.
    pub fn new<M, E>(cfg: MembershipConfig, members: M) -> Result<Self, MembershipError>
    where
        M: IntoIterator<Item = (String, E)>,
        E: IntoIterator<Item = String>,
    {
        let mut m = Self {
            backoff: ProbeBackoff::new(&cfg),
            cfg,
            members: BTreeMap::new(),
            replicas: BTreeMap::new(),
            next_id: 1,
            data_shape: None,
            sequences: None,
            banned: BTreeMap::new(),
        };
        let mut owner: BTreeMap<String, String> = BTreeMap::new();
        for (name, endpoints) in members {
            let state = m.members.entry(name.clone()).or_default();
            for e in endpoints {
                state.rooted = true;
                let address = normalize_address(&e)?;
                if let Some(first) = owner.get(&address) {
                    return Err(MembershipError::DuplicateStatic {
                        address,
                        first: first.clone(),
                        second: name,
                    });
                }
                owner.insert(address.clone(), name.clone());
                let id = m.next_id;
                m.next_id += 1;
                let mut r = Replica::new(name.clone(), address, Source::Static, None);
                r.trusted = true;
                m.replicas.insert(id, r);
            }
        }
        let names: Vec<String> = m.members.keys().cloned().collect();
        for name in names {
            let up = m.member_is_up(&name);
            if let Some(s) = m.members.get_mut(&name) {
                s.up = up;
            }
        }
        Ok(m)
    }

    /// Trusts registrations of `member` at `addresses` (the run config's `trusted`): they
    /// enter rotation at once and are the reference that other registrations are checked
    /// against, as static replicas are.
    pub fn trust<I>(&mut self, member: &str, addresses: I) -> Result<(), MembershipError>
    where
        I: IntoIterator<Item = String>,
    {
        let state = self.member_mut(member)?;
        for a in addresses {
            state.trusted_addresses.insert(normalize_address(&a)?);
            state.rooted = true;
        }
        Ok(())
    }

    /// A member's state, to change; a member not in the run is an error naming the members.
    fn member_mut(&mut self, member: &str) -> Result<&mut MemberState, MembershipError> {
        let known = self.known_members();
        self.members
            .get_mut(member)
            .ok_or_else(|| MembershipError::UnknownMember {
                member: member.into(),
                known,
            })
    }

    /// Replicas of `member` refused because their canary answers disagreed.
    pub fn canary_refusals(&self, member: &str) -> u64 {
        self.members.get(member).map_or(0, |m| m.canary_refusals)
    }

    /// The tunables.
    pub fn config(&self) -> &MembershipConfig {
        &self.cfg
    }

    /// The data's values per row and classes, as [`Membership::expect_model`] stated them.
    pub fn expected_model(&self) -> Option<(u64, u32)> {
        self.data_shape
    }

    /// The token data, as [`Membership::expect_sequences`] stated them.
    pub fn expected_sequences(&self) -> Option<&SequenceData> {
        self.sequences.as_ref()
    }

    /// The earliest instant at which [`Membership::tick`] or [`Membership::due_probes`] has
    /// something to do (None: nothing scheduled).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.replicas
            .values()
            .flat_map(|r| [r.lease_deadline, r.health.next_probe()])
            .flatten()
            .min()
    }

    /// A request to replica `id` succeeded in `latency`: resets its failure count, updates its
    /// latency and its member's, and puts it back in rotation if it was out.
    pub fn record_success(&mut self, id: ReplicaId, latency: Duration) -> Vec<Event> {
        let mut events = Vec::new();
        let (alpha, beta) = (self.cfg.latency_alpha, self.cfg.deviation_beta);
        let secs = latency.as_secs_f64();
        let Some(r) = self.replicas.get_mut(&id) else {
            return events;
        };
        let back = r.answered(id);
        r.latency.observe(secs, alpha);
        if let Some(m) = self.members.get_mut(&r.member) {
            m.latency.observe(secs, alpha, beta);
        }
        // Only a replica coming back can change whether its member is up.
        if let Some(back) = back {
            events.push(back);
            self.member_transitions(&mut events);
        }
        events
    }

    /// Whether the member has a replica in rotation.
    pub fn is_up(&self, member: &str) -> bool {
        self.members.get(member).is_some_and(|m| m.up)
    }

    /// Members with no replica in rotation, in name order.
    pub fn down_members(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|(_, m)| !m.up)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Member names, in name order.
    pub fn members(&self) -> Vec<String> {
        self.members.keys().cloned().collect()
    }

    /// A member's pinned weights digest.
    pub fn digest(&self, member: &str) -> Option<&str> {
        self.members.get(member).and_then(|m| m.digest.as_deref())
    }

    /// One replica.
    pub fn replica(&self, id: ReplicaId) -> Option<ReplicaView> {
        self.replicas.get(&id).map(|r| r.view(id))
    }

    /// The address to dial replica `id` at.
    pub fn address(&self, id: ReplicaId) -> Option<&str> {
        self.replicas.get(&id).map(|r| r.address.as_str())
    }

    /// Every replica of a member (in or out of rotation), by id.
    pub fn replicas(&self, member: &str) -> Vec<ReplicaView> {
        self.replicas
            .iter()
            .filter(|(_, r)| r.member == member)
            .map(|(&id, r)| r.view(id))
            .collect()
    }

    /// The replicas of a member that requests may go to, by id.
    pub fn rotation(&self, member: &str) -> Vec<ReplicaView> {
        self.in_rotation(member)
            .map(|(&id, r)| r.view(id))
            .collect()
    }

    /// How many replicas of a member are in rotation.
    pub fn rotation_len(&self, member: &str) -> usize {
        self.in_rotation(member).count()
    }

    /// Replaces `out` with the replicas of a member in rotation, by id, as the replica choice
    /// sees them ([`crate::domain::choice`]); the pool's own fields (`outstanding`,
    /// `last_pick`) are left 0 for the caller. Copies no strings: it runs on every request.
    pub fn candidates(&self, member: &str, out: &mut Vec<Candidate>) {
        out.clear();
        out.extend(self.in_rotation(member).map(|(&id, r)| Candidate {
            id,
            latency: r.latency.ewma(),
            outstanding: 0,
            reported: r.load.map(|l| l.in_flight),
            max_in_flight: r.load.map_or(0, |l| l.max_in_flight),
            last_pick: 0,
        }));
    }

    fn in_rotation<'a>(
        &'a self,
        member: &'a str,
    ) -> impl Iterator<Item = (&'a ReplicaId, &'a Replica)> + 'a {
        self.replicas
            .iter()
            .filter(move |(_, r)| r.member == member && r.health.in_rotation())
    }

    fn member_is_up(&self, member: &str) -> bool {
        self.in_rotation(member).next().is_some()
    }

    /// Appends MemberDown/MemberUp for every member whose state changed.
    fn member_transitions(&mut self, events: &mut Vec<Event>) {
        let now_up: Vec<(String, bool)> = self
            .members
            .iter()
            .filter(|(n, s)| s.up != self.member_is_up(n))
            .map(|(n, s)| (n.clone(), !s.up))
            .collect();
        for (name, up) in now_up {
            if let Some(s) = self.members.get_mut(&name) {
                s.up = up;
            }
            events.push(if up {
                Event::MemberUp { member: name }
            } else {
                Event::MemberDown { member: name }
            });
        }
    }
}

impl Replica {
    fn new(member: String, address: String, source: Source, deadline: Option<Instant>) -> Self {
        Self {
            member,
            address,
            source,
            lease_deadline: deadline,
            health: ReplicaHealth::default(),
            latency: ReplicaLatency::default(),
            load: None,
            identity: None,
            secret: String::new(),
            trusted: false,
            on_trial: false,
            server_name: None,
        }
    }

    /// The replica (`id`) answered a request or a probe: its failure count restarts, and it
    /// is back in rotation if it was out (the event saying so).
    /// A replica on trial is admitted only by its trial ([`Membership::probe_succeeded`]).
    fn answered(&mut self, id: ReplicaId) -> Option<Event> {
        if self.on_trial {
            return None;
        }
        self.health.answered().then(|| Event::BackInRotation {
            member: self.member.clone(),
            replica: id,
            address: self.address.clone(),
        })
    }

    fn view(&self, id: ReplicaId) -> ReplicaView {
        ReplicaView {
            id,
            member: self.member.clone(),
            address: self.address.clone(),
            source: self.source,
            trusted: self.trusted,
            health: if self.on_trial {
                Health::OnTrial
            } else if self.health.in_rotation() {
                Health::InRotation
            } else {
                Health::OutOfRotation
            },
            consecutive_failures: self.health.failures(),
            latency: self.latency.ewma(),
            answered: self.latency.samples(),
            in_flight: self.load.map(|l| l.in_flight),
            max_in_flight: self.load.map_or(0, |l| l.max_in_flight),
            identity: self.identity.clone(),
            server_name: self.server_name.clone(),
            lease_deadline: self.lease_deadline,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::testutil::*;
    use super::*;

    #[test]
    fn candidates_are_the_rotation_with_its_latency_and_reported_load() {
        let mut m = membership();
        let t0 = Instant::now();
        let r1 = register(&mut m, "b", "http://h:1", t0).replica;
        let r2 = register(&mut m, "b", "http://h:2", t0).replica;
        let r3 = register(&mut m, "b", "http://h:3", t0).replica;
        let _ = m.record_success(r1, Duration::from_millis(8));
        let load = Load {
            in_flight: 4,
            max_in_flight: 16,
        };
        assert!(m.heartbeat(r2, "http://h:2", SECRET, load, t0).value);
        let _ = m.record_failure(r3, t0);
        let _ = m.record_failure(r3, t0);
        let mut out = vec![Candidate {
            id: 99,
            latency: None,
            outstanding: 7,
            reported: None,
            max_in_flight: 0,
            last_pick: 7,
        }];
        m.candidates("b", &mut out);
        let base = |id| Candidate {
            id,
            latency: None,
            outstanding: 0,
            reported: None,
            max_in_flight: 0,
            last_pick: 0,
        };
        assert_eq!(
            out,
            vec![
                Candidate {
                    latency: Some(Duration::from_millis(8)),
                    ..base(r1)
                },
                Candidate {
                    reported: Some(4),
                    max_in_flight: 16,
                    ..base(r2)
                },
            ]
        );
        assert_eq!(m.rotation_len("b"), 2);
        assert_eq!(m.rotation_len("zzz"), 0);
        assert_eq!(m.address(r3), Some("http://h:3"));
        assert_eq!(m.address(42), None);
        m.candidates("zzz", &mut out);
        assert!(out.is_empty());
    }
}
