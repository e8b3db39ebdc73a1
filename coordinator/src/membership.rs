//! Teacher membership: which replicas serve each ensemble member, whether each is in rotation,
//! and how fast each answers.
//!
//! A pure state machine (STYLE.md §7): every call that depends on time takes `now: Instant`,
//! nothing sleeps or does I/O, and calls return the [`Event`]s they caused so the driver can log
//! them ([`Event::log`]). The gRPC `Registry` service ([`crate::registry`]) and the teacher pool
//! drive it; tests drive it with chosen instants.
//!
//! Semantics, decided here:
//! - **Two sources of replicas.** *Static* replicas come from the run config's `endpoints`; they
//!   never expire and are never removed (a Deregister of one is a no-op). *Registered* replicas
//!   join through `Register` and hold a lease of `lease_ttl`; every heartbeat renews it to
//!   `now + lease_ttl`. A lease expires at `now ≥ deadline`: [`Membership::tick`] removes the
//!   replica ([`RemovalReason::Expired`]), and a heartbeat that arrives at or after the deadline
//!   finds it expired too (it must register again).
//! - **Identity of a replica is its address.** Addresses are normalised
//!   ([`normalize_address`]: `http(s)://host:port`, lowercase). Registering an address that is
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
//!   probe (or any successful request) puts the replica back in rotation. A new registration is
//!   in rotation at once (the coordinator uses new replicas immediately).
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

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

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
        }
    }
}

/// A teacher model's identity as a replica states it (Register, or Describe).
#[derive(Debug, Clone, PartialEq, Eq)]
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
}

/// Where a replica came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The run config's endpoints: never expires.
    Static,
    /// A `Register` call: lives while its lease is renewed.
    Registered,
}

/// Whether requests go to a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Requests go to it.
    InRotation,
    /// Taken out after failures; probed until a probe succeeds.
    OutOfRotation,
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
            Event::Removed {
                member,
                replica,
                address,
                reason,
            } => match reason {
                RemovalReason::Deregistered => {
                    tracing::info!(%member, replica, %address, "teacher replica deregistered")
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
    /// An address that is not `http(s)://host:port`.
    #[error("{0}")]
    BadAddress(String),
    /// No replica with this id.
    #[error("no replica {0}")]
    UnknownReplica(ReplicaId),
}

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

#[derive(Debug, Clone)]
struct Probing {
    /// Failed probes so far.
    attempt: u32,
    next_due: Instant,
    /// Handed to the driver and not yet reported.
    in_flight: bool,
}

#[derive(Debug, Clone)]
struct Replica {
    member: String,
    address: String,
    source: Source,
    lease_deadline: Option<Instant>,
    failures: u32,
    /// `None`: in rotation.
    probing: Option<Probing>,
    latency_ewma: Option<f64>,
    samples: u64,
    load: Option<Load>,
    identity: Option<ModelIdentity>,
}

#[derive(Debug, Clone, Default)]
struct MemberState {
    /// Pinned weights digest.
    digest: Option<String>,
    /// Input values per row and classes of the first identity seen.
    shape: Option<(u64, u32)>,
    up: bool,
    /// Smoothed latency and mean deviation, seconds.
    srtt: Option<(f64, f64)>,
    samples: u64,
}

/// The teacher membership of one run.
#[derive(Debug, Clone)]
pub struct Membership {
    cfg: MembershipConfig,
    members: BTreeMap<String, MemberState>,
    replicas: BTreeMap<ReplicaId, Replica>,
    next_id: ReplicaId,
    rng: u64,
    /// Input values per row and classes of the data, if stated.
    data_shape: Option<(u64, u32)>,
}

/// Normalises a replica address to `scheme://host:port` (lowercase scheme and host): the
/// scheme must be `http` or `https`, the port explicit, and there must be no path or query.
pub fn normalize_address(address: &str) -> Result<String, MembershipError> {
    let bad = |why: &str| MembershipError::BadAddress(format!("address `{address}` {why}"));
    let trimmed = address.trim();
    if trimmed.is_empty() {
        return Err(MembershipError::BadAddress("address is empty".into()));
    }
    let uri: tonic::transport::Uri = trimmed
        .parse()
        .map_err(|e| bad(&format!("is not a URI ({e})")))?;
    let scheme = match uri.scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("http") => "http",
        Some(s) if s.eq_ignore_ascii_case("https") => "https",
        Some(s) => return Err(bad(&format!("has scheme `{s}`; expected http or https"))),
        None => {
            return Err(bad(
                "has no scheme; expected http://HOST:PORT or https://HOST:PORT",
            ));
        }
    };
    let host = match uri.host() {
        Some(h) if !h.is_empty() => h.to_ascii_lowercase(),
        _ => return Err(bad("has no host")),
    };
    let Some(port) = uri.port_u16() else {
        // `http` drops a port that does not fit in 16 bits: tell that apart from none.
        let authority = uri.authority().map_or("", |a| a.as_str());
        let host_end = authority.rfind(']').map_or(0, |i| i + 1);
        let has_port = authority.get(host_end..).is_some_and(|s| s.contains(':'));
        return Err(bad(if has_port {
            "has an invalid port"
        } else {
            "has no port"
        }));
    };
    if port == 0 {
        return Err(bad("has port 0"));
    }
    if uri.path() != "/" && !uri.path().is_empty() || uri.query().is_some() {
        return Err(bad(
            "has a path or query; expected only scheme, host and port",
        ));
    }
    Ok(format!("{scheme}://{host}:{port}"))
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
            rng: cfg.seed,
            cfg,
            members: BTreeMap::new(),
            replicas: BTreeMap::new(),
            next_id: 1,
            data_shape: None,
        };
        let mut owner: BTreeMap<String, String> = BTreeMap::new();
        for (name, endpoints) in members {
            m.members.entry(name.clone()).or_default();
            for e in endpoints {
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
                m.replicas.insert(
                    id,
                    Replica::new(name.clone(), address, Source::Static, None),
                );
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

    /// The tunables.
    pub fn config(&self) -> &MembershipConfig {
        &self.cfg
    }

    /// Requires every replica to take rows of `row_len` values and answer `classes` logits
    /// (the data's shape).
    pub fn expect_model(&mut self, row_len: u64, classes: u32) {
        self.data_shape = Some((row_len, classes));
    }

    /// Pins a member's weights digest (e.g. what the start-up check or the soft-target cache
    /// saw). Fails if another digest is pinned already.
    pub fn pin_digest(&mut self, member: &str, digest: &str) -> Result<(), MembershipError> {
        let known = self.known_members();
        let state = self
            .members
            .get_mut(member)
            .ok_or_else(|| MembershipError::UnknownMember {
                member: member.into(),
                known,
            })?;
        match &state.digest {
            Some(d) if d != digest => Err(MembershipError::DigestMismatch {
                member: member.into(),
                address: "(pinned)".into(),
                got: digest.into(),
                expected: d.clone(),
            }),
            _ => {
                state.digest = Some(digest.into());
                Ok(())
            }
        }
    }

    /// Records what a replica serves (a static replica's Describe at start-up), pinning the
    /// member's digest if none is yet.
    pub fn record_identity(
        &mut self,
        id: ReplicaId,
        identity: ModelIdentity,
    ) -> Result<(), MembershipError> {
        let r = self
            .replicas
            .get(&id)
            .ok_or(MembershipError::UnknownReplica(id))?;
        let (member, address) = (r.member.clone(), r.address.clone());
        self.check_identity(&member, &address, &identity)?;
        self.pin_identity(&member, &identity);
        if let Some(r) = self.replicas.get_mut(&id) {
            r.identity = Some(identity);
        }
        Ok(())
    }

    /// A replica registers (or renews its registration) at `now`.
    pub fn register(
        &mut self,
        member: &str,
        address: &str,
        identity: ModelIdentity,
        now: Instant,
    ) -> Outcome<Result<Registration, MembershipError>> {
        let mut events = Vec::new();
        let value = self.register_inner(member, address, identity, now, &mut events);
        self.member_transitions(&mut events);
        Outcome { value, events }
    }

    fn register_inner(
        &mut self,
        member: &str,
        address: &str,
        identity: ModelIdentity,
        now: Instant,
        events: &mut Vec<Event>,
    ) -> Result<Registration, MembershipError> {
        if !self.members.contains_key(member) {
            return Err(MembershipError::UnknownMember {
                member: member.into(),
                known: self.known_members(),
            });
        }
        let address = normalize_address(address)?;
        let existing = self.by_address(&address);
        if let Some(id) = existing {
            let r = &self.replicas[&id];
            if r.member != member {
                if r.source == Source::Static {
                    return Err(MembershipError::AddressTaken {
                        address,
                        member: member.into(),
                        owner: r.member.clone(),
                    });
                }
                // The process at this address now serves another member: the old replica is
                // gone, whether or not the new registration is accepted.
                self.remove(id, RemovalReason::Replaced, events);
            }
        }
        if let Err(e) = self.check_identity(member, &address, &identity) {
            if let Some(id) = self.by_address(&address)
                && self.replicas[&id].source == Source::Registered
            {
                // It answers at this address with a model the member does not serve.
                self.remove(id, RemovalReason::Refused, events);
            }
            return Err(e);
        }
        self.pin_identity(member, &identity);
        let deadline = now + self.cfg.lease_ttl;
        let (id, renewed) = match self.by_address(&address) {
            Some(id) => {
                if let Some(r) = self.replicas.get_mut(&id) {
                    if r.source == Source::Registered {
                        r.lease_deadline = Some(deadline);
                    }
                    r.identity = Some(identity);
                    if let Some(p) = r.probing.as_mut() {
                        // A (re)started process: check it at once instead of waiting out the
                        // backoff.
                        p.attempt = 0;
                        p.next_due = now;
                    }
                }
                events.push(Event::Renewed {
                    member: member.into(),
                    replica: id,
                    address: address.clone(),
                });
                (id, true)
            }
            None => {
                let id = self.next_id;
                self.next_id += 1;
                let mut r = Replica::new(
                    member.into(),
                    address.clone(),
                    Source::Registered,
                    Some(deadline),
                );
                r.identity = Some(identity);
                self.replicas.insert(id, r);
                events.push(Event::Joined {
                    member: member.into(),
                    replica: id,
                    address: address.clone(),
                });
                (id, false)
            }
        };
        Ok(Registration {
            replica: id,
            address,
            lease_ttl: self.cfg.lease_ttl,
            heartbeat_interval: self.cfg.heartbeat_interval,
            renewed,
        })
    }

    /// A heartbeat from replica `id` registered at `address`: renews its lease and records its
    /// load. False means the replica is unknown (never registered here, expired — also when
    /// `now` is at or past its deadline and no tick removed it yet — or deregistered) and must
    /// register again.
    pub fn heartbeat(
        &mut self,
        id: ReplicaId,
        address: &str,
        load: Load,
        now: Instant,
    ) -> Outcome<bool> {
        let mut events = Vec::new();
        let address = normalize_address(address).unwrap_or_default();
        let ttl = self.cfg.lease_ttl;
        let value = match self.replicas.get_mut(&id) {
            Some(r) if r.address == address => {
                if r.lease_deadline.is_some_and(|d| now >= d) {
                    self.remove(id, RemovalReason::Expired, &mut events);
                    false
                } else {
                    if r.lease_deadline.is_some() {
                        r.lease_deadline = Some(now + ttl);
                    }
                    r.load = Some(load);
                    true
                }
            }
            _ => false,
        };
        self.member_transitions(&mut events);
        Outcome { value, events }
    }

    /// Replica `id` at `address` leaves. True if a registered replica was removed; a static
    /// replica stays (false), and an unknown one is a no-op (false).
    pub fn deregister(&mut self, id: ReplicaId, address: &str) -> Outcome<bool> {
        let mut events = Vec::new();
        let address = normalize_address(address).unwrap_or_default();
        let value = match self.replicas.get(&id) {
            Some(r) if r.address == address && r.source == Source::Registered => {
                self.remove(id, RemovalReason::Deregistered, &mut events);
                true
            }
            _ => false,
        };
        self.member_transitions(&mut events);
        Outcome { value, events }
    }

    /// Removes every registered replica whose lease ended (`now ≥ deadline`).
    pub fn tick(&mut self, now: Instant) -> Vec<Event> {
        let mut events = Vec::new();
        let expired: Vec<ReplicaId> = self
            .replicas
            .iter()
            .filter(|(_, r)| r.lease_deadline.is_some_and(|d| now >= d))
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            self.remove(id, RemovalReason::Expired, &mut events);
        }
        self.member_transitions(&mut events);
        events
    }

    /// The earliest instant at which [`Membership::tick`] or [`Membership::due_probes`] has
    /// something to do (None: nothing scheduled).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.replicas
            .values()
            .flat_map(|r| {
                let probe = r
                    .probing
                    .as_ref()
                    .filter(|p| !p.in_flight)
                    .map(|p| p.next_due);
                [r.lease_deadline, probe]
            })
            .flatten()
            .min()
    }

    /// A request to replica `id` succeeded in `latency`: resets its failure count, updates its
    /// latency, and puts it back in rotation if it was out.
    pub fn record_success(&mut self, id: ReplicaId, latency: Duration) -> Vec<Event> {
        let mut events = Vec::new();
        let (alpha, beta) = (self.cfg.latency_alpha, self.cfg.deviation_beta);
        let secs = latency.as_secs_f64();
        let Some(r) = self.replicas.get_mut(&id) else {
            return events;
        };
        let back = r.answered(id);
        r.samples += 1;
        r.latency_ewma = Some(match r.latency_ewma {
            None => secs,
            Some(e) => e + alpha * (secs - e),
        });
        if let Some(m) = self.members.get_mut(&r.member) {
            m.samples += 1;
            m.srtt = Some(match m.srtt {
                // RFC 6298 §2.2: the first sample sets SRTT = R, RTTVAR = R/2.
                None => (secs, secs / 2.0),
                Some((srtt, var)) => {
                    let var = var + beta * ((srtt - secs).abs() - var);
                    (srtt + alpha * (secs - srtt), var)
                }
            });
        }
        events.extend(back);
        self.member_transitions(&mut events);
        events
    }

    /// A request to replica `id` was given up unanswered after `elapsed` because a hedged copy
    /// answered first: its latency is at least `elapsed`, so its EWMA moves up towards it (never
    /// down). Its failure count, its sample count and the member's smoothed latency are left
    /// alone (the request neither failed nor was timed to the end).
    pub fn record_slow(&mut self, id: ReplicaId, elapsed: Duration) {
        let (alpha, secs) = (self.cfg.latency_alpha, elapsed.as_secs_f64());
        if let Some(r) = self.replicas.get_mut(&id) {
            r.latency_ewma = Some(match r.latency_ewma {
                None => secs,
                Some(e) if secs > e => e + alpha * (secs - e),
                Some(e) => e,
            });
        }
    }

    /// A request to replica `id` failed at `now` (an error or a timeout; not a rejection of
    /// the request itself, which says nothing about the replica's health).
    pub fn record_failure(&mut self, id: ReplicaId, now: Instant) -> Vec<Event> {
        let mut events = Vec::new();
        let threshold = self.cfg.failure_threshold.max(1);
        let Some(r) = self.replicas.get_mut(&id) else {
            return events;
        };
        r.failures = r.failures.saturating_add(1);
        if r.probing.is_none() && r.failures >= threshold {
            let failures = r.failures;
            let delay = self.probe_delay(0);
            if let Some(r) = self.replicas.get_mut(&id) {
                r.probing = Some(Probing {
                    attempt: 0,
                    next_due: now + delay,
                    in_flight: false,
                });
                events.push(Event::OutOfRotation {
                    member: r.member.clone(),
                    replica: id,
                    address: r.address.clone(),
                    failures,
                    first_probe_in: delay,
                });
            }
        }
        self.member_transitions(&mut events);
        events
    }

    /// Replicas out of rotation whose probe is due at `now`; each is marked as being probed
    /// until the driver reports [`Membership::probe_succeeded`] or [`Membership::probe_failed`].
    pub fn due_probes(&mut self, now: Instant) -> Vec<Probe> {
        let mut due = Vec::new();
        for (&id, r) in self.replicas.iter_mut() {
            if let Some(p) = r.probing.as_mut()
                && !p.in_flight
                && now >= p.next_due
            {
                p.in_flight = true;
                due.push(Probe {
                    replica: id,
                    member: r.member.clone(),
                    address: r.address.clone(),
                });
            }
        }
        due
    }

    /// A probe of replica `id` answered; with `identity` (a Describe) it must still serve the
    /// member's model, or the probe counts as failed.
    pub fn probe_succeeded(
        &mut self,
        id: ReplicaId,
        identity: Option<ModelIdentity>,
        now: Instant,
    ) -> Vec<Event> {
        let Some(r) = self.replicas.get(&id) else {
            return Vec::new();
        };
        if let Some(identity) = identity {
            let (member, address) = (r.member.clone(), r.address.clone());
            if let Err(e) = self.check_identity(&member, &address, &identity) {
                return self.probe_failed(id, &e.to_string(), now);
            }
            if let Some(r) = self.replicas.get_mut(&id) {
                r.identity = Some(identity);
            }
        }
        let mut events: Vec<Event> = self
            .replicas
            .get_mut(&id)
            .and_then(|r| r.answered(id))
            .into_iter()
            .collect();
        self.member_transitions(&mut events);
        events
    }

    /// A probe of replica `id` failed at `now`; the next one is due after a longer delay.
    pub fn probe_failed(&mut self, id: ReplicaId, error: &str, now: Instant) -> Vec<Event> {
        let mut events = Vec::new();
        let attempt = match self.replicas.get(&id).and_then(|r| r.probing.as_ref()) {
            Some(p) => p.attempt.saturating_add(1),
            None => {
                // In rotation (a stale probe report, or an identity check of a healthy
                // replica failed): take it out now.
                0
            }
        };
        let delay = self.probe_delay(attempt);
        if let Some(r) = self.replicas.get_mut(&id) {
            let was_in = r.probing.is_none();
            r.probing = Some(Probing {
                attempt,
                next_due: now + delay,
                in_flight: false,
            });
            events.push(if was_in {
                Event::OutOfRotation {
                    member: r.member.clone(),
                    replica: id,
                    address: r.address.clone(),
                    failures: r.failures,
                    first_probe_in: delay,
                }
            } else {
                Event::ProbeFailed {
                    member: r.member.clone(),
                    replica: id,
                    address: r.address.clone(),
                    attempt,
                    next_probe_in: delay,
                    error: error.into(),
                }
            });
        }
        self.member_transitions(&mut events);
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
        self.replicas
            .iter()
            .filter(|(_, r)| r.member == member && r.probing.is_none())
            .map(|(&id, r)| r.view(id))
            .collect()
    }

    /// How long to wait for a request to `member` before sending a hedged copy to another
    /// replica (None: not enough samples yet, or no other replica to send it to).
    pub fn hedge_after(&self, member: &str) -> Option<Duration> {
        if !self.cfg.hedge {
            return None;
        }
        let m = self.members.get(member)?;
        let (srtt, var) = m.srtt?;
        if m.samples < self.cfg.hedge_min_samples || self.rotation(member).len() < 2 {
            return None;
        }
        let secs = srtt + self.cfg.hedge_deviations * var;
        let after = Duration::try_from_secs_f64(secs).unwrap_or(self.cfg.hedge_min);
        Some(after.max(self.cfg.hedge_min))
    }

    /// Whether replica `id` is much slower than the fastest in-rotation replica of its member
    /// (both with at least `hedge_min_samples` timed requests).
    pub fn is_straggler(&self, id: ReplicaId) -> bool {
        let Some(r) = self.replicas.get(&id) else {
            return false;
        };
        let min_samples = self.cfg.hedge_min_samples;
        let Some(mine) = r.latency_ewma.filter(|_| r.samples >= min_samples) else {
            return false;
        };
        let fastest = self
            .replicas
            .iter()
            .filter(|(other, o)| {
                **other != id
                    && o.member == r.member
                    && o.probing.is_none()
                    && o.samples >= min_samples
            })
            .filter_map(|(_, o)| o.latency_ewma)
            .fold(f64::INFINITY, f64::min);
        fastest.is_finite() && mine > self.cfg.straggler_factor * fastest
    }

    fn known_members(&self) -> String {
        self.members
            .keys()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn by_address(&self, address: &str) -> Option<ReplicaId> {
        self.replicas
            .iter()
            .find(|(_, r)| r.address == address)
            .map(|(&id, _)| id)
    }

    fn check_identity(
        &self,
        member: &str,
        address: &str,
        identity: &ModelIdentity,
    ) -> Result<(), MembershipError> {
        let inputs: u64 = identity.input_shape.iter().product();
        let state = self.members.get(member);
        let expected = self.data_shape.or(state.and_then(|s| s.shape));
        if let Some((expected_inputs, expected_classes)) = expected
            && (inputs != expected_inputs || identity.classes != expected_classes)
        {
            return Err(MembershipError::ShapeMismatch {
                member: member.into(),
                address: address.into(),
                got_inputs: inputs,
                got_classes: identity.classes,
                expected_inputs,
                expected_classes,
            });
        }
        if let Some(expected) = state.and_then(|s| s.digest.as_ref())
            && *expected != identity.weights_digest
        {
            return Err(MembershipError::DigestMismatch {
                member: member.into(),
                address: address.into(),
                got: identity.weights_digest.clone(),
                expected: expected.clone(),
            });
        }
        Ok(())
    }

    fn pin_identity(&mut self, member: &str, identity: &ModelIdentity) {
        if let Some(s) = self.members.get_mut(member) {
            s.digest
                .get_or_insert_with(|| identity.weights_digest.clone());
            s.shape
                .get_or_insert((identity.input_shape.iter().product(), identity.classes));
        }
    }

    fn remove(&mut self, id: ReplicaId, reason: RemovalReason, events: &mut Vec<Event>) {
        if let Some(r) = self.replicas.remove(&id) {
            events.push(Event::Removed {
                member: r.member,
                replica: id,
                address: r.address,
                reason,
            });
        }
    }

    fn member_is_up(&self, member: &str) -> bool {
        self.replicas
            .values()
            .any(|r| r.member == member && r.probing.is_none())
    }

    /// Appends MemberDown/MemberUp for every member whose state changed.
    fn member_transitions(&mut self, events: &mut Vec<Event>) {
        let now_up: Vec<(String, bool)> = self
            .members
            .keys()
            .map(|n| (n.clone(), self.member_is_up(n)))
            .collect();
        for (name, up) in now_up {
            if let Some(s) = self.members.get_mut(&name)
                && s.up != up
            {
                s.up = up;
                events.push(if up {
                    Event::MemberUp { member: name }
                } else {
                    Event::MemberDown { member: name }
                });
            }
        }
    }

    /// The delay before probe `attempt` (0 = the first probe), with jitter.
    fn probe_delay(&mut self, attempt: u32) -> Duration {
        let base = self
            .cfg
            .probe_initial
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.cfg.probe_max);
        let u = self.next_unit();
        let jitter = self.cfg.probe_jitter.clamp(0.0, 1.0);
        base.mul_f64(1.0 - jitter * u)
    }

    /// A uniform draw in [0, 1) from SplitMix64 (Steele, Lea & Flood 2014).
    fn next_unit(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Replica {
    fn new(member: String, address: String, source: Source, deadline: Option<Instant>) -> Self {
        Self {
            member,
            address,
            source,
            lease_deadline: deadline,
            failures: 0,
            probing: None,
            latency_ewma: None,
            samples: 0,
            load: None,
            identity: None,
        }
    }

    /// The replica (`id`) answered a request or a probe: its failure count restarts, and it
    /// is back in rotation if it was out (the event saying so).
    fn answered(&mut self, id: ReplicaId) -> Option<Event> {
        self.failures = 0;
        self.probing.take().map(|_| Event::BackInRotation {
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
            health: if self.probing.is_none() {
                Health::InRotation
            } else {
                Health::OutOfRotation
            },
            consecutive_failures: self.failures,
            latency: self.latency_ewma.map(Duration::from_secs_f64),
            answered: self.samples,
            in_flight: self.load.map(|l| l.in_flight),
            max_in_flight: self.load.map_or(0, |l| l.max_in_flight),
            identity: self.identity.clone(),
            lease_deadline: self.lease_deadline,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const DIGEST_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn cfg() -> MembershipConfig {
        MembershipConfig {
            lease_ttl: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(2),
            failure_threshold: 2,
            probe_initial: Duration::from_millis(100),
            probe_max: Duration::from_millis(1000),
            probe_jitter: 0.5,
            ..MembershipConfig::default()
        }
    }

    fn identity(digest: &str) -> ModelIdentity {
        ModelIdentity {
            model_id: format!("mlp:784-10@{}", &digest[..16]),
            weights_digest: digest.into(),
            input_shape: vec![784],
            classes: 10,
            max_batch: 1024,
        }
    }

    /// Members `a` (static replica http://s1:1) and `b` (no static replica).
    fn membership() -> Membership {
        Membership::new(
            cfg(),
            [
                ("a".to_string(), vec!["http://s1:1".to_string()]),
                ("b".to_string(), vec![]),
            ],
        )
        .unwrap()
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn register(m: &mut Membership, member: &str, addr: &str, now: Instant) -> Registration {
        m.register(member, addr, identity(DIGEST_A), now)
            .value
            .unwrap()
    }

    fn removed(events: &[Event]) -> Vec<(ReplicaId, RemovalReason)> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Removed {
                    replica, reason, ..
                } => Some((*replica, *reason)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn static_replicas_start_in_rotation_and_a_member_without_any_starts_down() {
        let m = membership();
        assert!(m.is_up("a"));
        assert!(!m.is_up("b"));
        assert_eq!(m.down_members(), vec!["b".to_string()]);
        let a = m.replicas("a");
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].id, 1);
        assert_eq!(a[0].source, Source::Static);
        assert_eq!(a[0].address, "http://s1:1");
        assert_eq!(a[0].lease_deadline, None);
        assert_eq!(m.next_deadline(), None);
    }

    #[test]
    fn registration_joins_at_once_and_brings_the_member_up() {
        let mut m = membership();
        let t0 = Instant::now();
        let out = m.register("b", "http://10.0.0.5:50051", identity(DIGEST_A), t0);
        let reg = out.value.unwrap();
        assert_eq!(
            reg,
            Registration {
                replica: 2,
                address: "http://10.0.0.5:50051".into(),
                lease_ttl: secs(10),
                heartbeat_interval: secs(2),
                renewed: false,
            }
        );
        assert_eq!(
            out.events,
            vec![
                Event::Joined {
                    member: "b".into(),
                    replica: 2,
                    address: "http://10.0.0.5:50051".into(),
                },
                Event::MemberUp { member: "b".into() },
            ]
        );
        assert!(m.is_up("b"));
        let r = m.replica(2).unwrap();
        assert_eq!(r.health, Health::InRotation);
        assert_eq!(r.lease_deadline, Some(t0 + secs(10)));
        assert_eq!(r.identity, Some(identity(DIGEST_A)));
        assert_eq!(m.rotation("b").len(), 1);
        assert_eq!(m.digest("b"), Some(DIGEST_A));
        assert_eq!(m.next_deadline(), Some(t0 + secs(10)));
    }

    #[test]
    fn heartbeats_extend_the_lease_and_expiry_is_at_the_deadline() {
        let mut m = membership();
        let t0 = Instant::now();
        let id = register(&mut m, "b", "http://h:1", t0).replica;
        let load = Load {
            in_flight: 3,
            max_in_flight: 64,
        };
        let hb = m.heartbeat(id, "http://h:1", load, t0 + secs(8));
        assert!(hb.value);
        assert!(hb.events.is_empty());
        let r = m.replica(id).unwrap();
        assert_eq!(r.lease_deadline, Some(t0 + secs(18)));
        assert_eq!((r.in_flight, r.max_in_flight), (Some(3), 64));
        // The old deadline passes without effect.
        assert!(m.tick(t0 + secs(10)).is_empty());
        assert!(m.tick(t0 + secs(18) - Duration::from_nanos(1)).is_empty());
        // Expiry at now == deadline.
        let events = m.tick(t0 + secs(18));
        assert_eq!(
            events,
            vec![
                Event::Removed {
                    member: "b".into(),
                    replica: id,
                    address: "http://h:1".into(),
                    reason: RemovalReason::Expired,
                },
                Event::MemberDown { member: "b".into() },
            ]
        );
        assert!(m.replica(id).is_none());
        assert!(!m.is_up("b"));
        // Its heartbeat is now unknown: it must register again, and gets a new id.
        assert!(!m.heartbeat(id, "http://h:1", load, t0 + secs(19)).value);
        let again = register(&mut m, "b", "http://h:1", t0 + secs(20));
        assert!(!again.renewed);
        assert_ne!(again.replica, id);
        // The pinned digest survives the member being empty.
        assert_eq!(m.digest("b"), Some(DIGEST_A));
    }

    #[test]
    fn a_heartbeat_at_or_after_the_deadline_finds_the_lease_expired_before_any_tick() {
        let mut m = membership();
        let t0 = Instant::now();
        let id = register(&mut m, "b", "http://h:1", t0).replica;
        let hb = m.heartbeat(id, "http://h:1", Load::default(), t0 + secs(10));
        assert!(!hb.value);
        assert_eq!(removed(&hb.events), vec![(id, RemovalReason::Expired)]);
        assert!(
            hb.events
                .contains(&Event::MemberDown { member: "b".into() })
        );
    }

    #[test]
    fn a_heartbeat_with_another_address_or_an_unknown_id_is_unknown() {
        let mut m = membership();
        let t0 = Instant::now();
        let id = register(&mut m, "b", "http://h:1", t0).replica;
        // An id handed out by an earlier coordinator to another address.
        assert!(!m.heartbeat(id, "http://other:1", Load::default(), t0).value);
        assert!(!m.heartbeat(99, "http://h:1", Load::default(), t0).value);
        // The real one is untouched, and case or a trailing slash do not matter.
        assert!(
            m.heartbeat(id, "HTTP://H:1/", Load::default(), t0 + secs(1))
                .value
        );
        assert_eq!(m.replica(id).unwrap().lease_deadline, Some(t0 + secs(11)));
    }

    #[test]
    fn registering_the_same_address_again_is_the_same_replica_with_a_new_lease() {
        let mut m = membership();
        let t0 = Instant::now();
        let first = register(&mut m, "b", "http://h:1", t0);
        let out = m.register("b", "http://H:1/", identity(DIGEST_A), t0 + secs(5));
        let second = out.value.unwrap();
        assert_eq!(second.replica, first.replica);
        assert!(second.renewed);
        assert_eq!(
            out.events,
            vec![Event::Renewed {
                member: "b".into(),
                replica: first.replica,
                address: "http://h:1".into(),
            }]
        );
        assert_eq!(m.replicas("b").len(), 1);
        assert_eq!(
            m.replica(first.replica).unwrap().lease_deadline,
            Some(t0 + secs(15))
        );
    }

    #[test]
    fn static_replicas_never_expire_and_cannot_be_deregistered() {
        let mut m = membership();
        let t0 = Instant::now();
        // Registering a static address returns the static replica; heartbeats carry its load.
        let reg = register(&mut m, "a", "http://s1:1", t0);
        assert_eq!(reg.replica, 1);
        assert!(reg.renewed);
        assert_eq!(m.replica(1).unwrap().lease_deadline, None);
        assert!(m.tick(t0 + secs(1_000_000)).is_empty());
        assert!(
            m.heartbeat(1, "http://s1:1", Load::default(), t0 + secs(1_000_000))
                .value
        );
        let out = m.deregister(1, "http://s1:1");
        assert!(!out.value);
        assert!(out.events.is_empty());
        assert!(m.is_up("a"));
        assert_eq!(m.replica(1).unwrap().source, Source::Static);
    }

    #[test]
    fn deregister_removes_a_registered_replica_once() {
        let mut m = membership();
        let t0 = Instant::now();
        let id = register(&mut m, "b", "http://h:1", t0).replica;
        assert!(!m.deregister(id, "http://wrong:1").value);
        let out = m.deregister(id, "http://h:1");
        assert!(out.value);
        assert_eq!(
            removed(&out.events),
            vec![(id, RemovalReason::Deregistered)]
        );
        assert_eq!(
            out.events.last(),
            Some(&Event::MemberDown { member: "b".into() })
        );
        assert!(!m.deregister(id, "http://h:1").value);
    }

    #[test]
    fn failures_take_a_replica_out_then_probes_with_backoff_until_one_succeeds() {
        let mut m = membership();
        let t0 = Instant::now();
        let id = register(&mut m, "b", "http://h:1", t0).replica;
        let other = register(&mut m, "b", "http://h:2", t0).replica;
        // A success in between resets the count.
        assert!(m.record_failure(id, t0).is_empty());
        assert!(m.record_success(id, Duration::from_millis(5)).is_empty());
        assert!(m.record_failure(id, t0).is_empty());
        assert_eq!(m.replica(id).unwrap().consecutive_failures, 1);
        // The second consecutive failure (threshold 2) takes it out.
        let events = m.record_failure(id, t0);
        let first_probe_in = match events.as_slice() {
            [
                Event::OutOfRotation {
                    replica,
                    failures: 2,
                    first_probe_in,
                    ..
                },
            ] if *replica == id => *first_probe_in,
            other => panic!("{other:?}"),
        };
        // probe_initial 100 ms, jitter 0.5: in (50 ms, 100 ms].
        assert!(
            first_probe_in > Duration::from_millis(50)
                && first_probe_in <= Duration::from_millis(100),
            "{first_probe_in:?}"
        );
        assert_eq!(m.replica(id).unwrap().health, Health::OutOfRotation);
        assert_eq!(
            m.rotation("b").iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![other]
        );
        assert!(m.is_up("b"), "the other replica is still in rotation");
        assert_eq!(m.next_deadline(), Some(t0 + first_probe_in));
        // Not due yet.
        assert!(
            m.due_probes(t0 + first_probe_in - Duration::from_nanos(1))
                .is_empty()
        );
        let mut now = t0 + first_probe_in;
        let mut delays = vec![first_probe_in];
        for attempt in 1..=6u32 {
            let due = m.due_probes(now);
            assert_eq!(
                due,
                vec![Probe {
                    replica: id,
                    member: "b".into(),
                    address: "http://h:1".into(),
                }]
            );
            // Handed out once until reported.
            assert!(m.due_probes(now + secs(100)).is_empty());
            let events = m.probe_failed(id, "connection refused", now);
            let next = match events.as_slice() {
                [
                    Event::ProbeFailed {
                        attempt: a,
                        next_probe_in,
                        error,
                        ..
                    },
                ] if *a == attempt && error == "connection refused" => *next_probe_in,
                other => panic!("{other:?}"),
            };
            let base = Duration::from_millis(100 * (1 << attempt)).min(Duration::from_millis(1000));
            assert!(
                next > base / 2 && next <= base,
                "attempt {attempt}: {next:?}"
            );
            delays.push(next);
            now += next;
        }
        // Capped at probe_max (with jitter) from attempt 4 on.
        assert!(
            delays[4..]
                .iter()
                .all(|d| *d <= Duration::from_millis(1000))
        );
        let due = m.due_probes(now);
        assert_eq!(due.len(), 1);
        let events = m.probe_succeeded(id, Some(identity(DIGEST_A)), now);
        assert_eq!(
            events,
            vec![Event::BackInRotation {
                member: "b".into(),
                replica: id,
                address: "http://h:1".into(),
            }]
        );
        let r = m.replica(id).unwrap();
        assert_eq!((r.health, r.consecutive_failures), (Health::InRotation, 0));
        assert_eq!(m.rotation("b").len(), 2);
        assert!(m.due_probes(now + secs(1000)).is_empty());
    }

    #[test]
    fn probe_delays_are_deterministic_for_a_seed() {
        let delays = |seed: u64| {
            let mut m = Membership::new(
                MembershipConfig { seed, ..cfg() },
                [("a".to_string(), vec!["http://s1:1".to_string()])],
            )
            .unwrap();
            let t0 = Instant::now();
            let _ = m.record_failure(1, t0);
            let _ = m.record_failure(1, t0);
            (0..5)
                .map(|_| {
                    m.probe_failed(1, "down", t0)
                        .into_iter()
                        .find_map(|e| match e {
                            Event::ProbeFailed { next_probe_in, .. } => Some(next_probe_in),
                            _ => None,
                        })
                        .unwrap()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(delays(7), delays(7));
        assert_ne!(delays(7), delays(8));
        // Without jitter the delays are exactly 200, 400, 800, 1000, 1000 ms.
        let mut m = Membership::new(
            MembershipConfig {
                probe_jitter: 0.0,
                ..cfg()
            },
            [("a".to_string(), vec!["http://s1:1".to_string()])],
        )
        .unwrap();
        let t0 = Instant::now();
        let _ = m.record_failure(1, t0);
        let out = m.record_failure(1, t0);
        assert!(matches!(
            out.as_slice(),
            [Event::OutOfRotation { first_probe_in, .. }, Event::MemberDown { .. }]
                if *first_probe_in == Duration::from_millis(100)
        ));
        let got: Vec<Duration> = (0..5)
            .map(|_| match m.probe_failed(1, "down", t0).as_slice() {
                [Event::ProbeFailed { next_probe_in, .. }] => *next_probe_in,
                other => panic!("{other:?}"),
            })
            .collect();
        let ms = |v: u64| Duration::from_millis(v);
        assert_eq!(got, vec![ms(200), ms(400), ms(800), ms(1000), ms(1000)]);
    }

    #[test]
    fn a_member_is_down_when_all_its_replicas_are_out_and_up_when_one_returns() {
        let mut m = membership();
        let t0 = Instant::now();
        let r1 = register(&mut m, "b", "http://h:1", t0).replica;
        let r2 = register(&mut m, "b", "http://h:2", t0).replica;
        for _ in 0..2 {
            let _ = m.record_failure(r1, t0);
        }
        assert!(m.is_up("b"));
        let _ = m.record_failure(r2, t0);
        let events = m.record_failure(r2, t0);
        assert_eq!(
            events.last(),
            Some(&Event::MemberDown { member: "b".into() })
        );
        assert!(!m.is_up("b"));
        assert!(m.rotation("b").is_empty());
        assert_eq!(m.replicas("b").len(), 2);
        // A late success of an in-flight request counts as a sign of life.
        let events = m.record_success(r2, Duration::from_millis(3));
        assert_eq!(
            events,
            vec![
                Event::BackInRotation {
                    member: "b".into(),
                    replica: r2,
                    address: "http://h:2".into(),
                },
                Event::MemberUp { member: "b".into() },
            ]
        );
        // The static member `a` was never affected.
        assert!(m.is_up("a"));
        // Expiry of the only replica in rotation takes the member down as well.
        let _ = m.heartbeat(r1, "http://h:1", Load::default(), t0 + secs(5));
        let events = m.tick(t0 + secs(10));
        assert_eq!(removed(&events), vec![(r2, RemovalReason::Expired)]);
        assert_eq!(
            events.last(),
            Some(&Event::MemberDown { member: "b".into() })
        );
        assert_eq!(
            m.replicas("b").len(),
            1,
            "r1 renewed its lease and stays, out of rotation"
        );
    }

    #[test]
    fn registering_an_address_that_is_out_of_rotation_makes_its_probe_due_at_once() {
        let mut m = membership();
        let t0 = Instant::now();
        let id = register(&mut m, "b", "http://h:1", t0).replica;
        let _ = m.record_failure(id, t0);
        let _ = m.record_failure(id, t0);
        let _ = m.due_probes(t0 + secs(1));
        let _ = m.probe_failed(id, "down", t0 + secs(1));
        // The second probe is due 100..=200 ms after the first failed.
        let t = t0 + Duration::from_millis(1001);
        assert!(m.due_probes(t).is_empty());
        let reg = register(&mut m, "b", "http://h:1", t);
        assert!(reg.renewed);
        assert_eq!(m.replica(id).unwrap().health, Health::OutOfRotation);
        assert_eq!(m.due_probes(t).len(), 1);
    }

    #[test]
    fn a_weights_digest_mismatch_between_replicas_of_a_member_is_refused() {
        let mut m = membership();
        let t0 = Instant::now();
        let id = register(&mut m, "b", "http://h:1", t0).replica;
        let out = m.register("b", "http://h:2", identity(DIGEST_B), t0);
        let err = out.value.unwrap_err();
        assert!(
            matches!(err, MembershipError::DigestMismatch { .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains(&format!(
                "replica http://h:2 serves weights {DIGEST_B} but the member serves {DIGEST_A}"
            )),
            "{err}"
        );
        assert!(out.events.is_empty());
        assert_eq!(m.replicas("b").len(), 1);
        // The registered replica's own address coming back with other weights: the process
        // there no longer serves the member's model, so the replica is removed too.
        let out = m.register("b", "http://h:1", identity(DIGEST_B), t0 + secs(1));
        assert!(out.value.is_err());
        assert_eq!(removed(&out.events), vec![(id, RemovalReason::Refused)]);
        assert!(
            out.events
                .contains(&Event::MemberDown { member: "b".into() })
        );
        // The pin holds with the member empty.
        assert!(
            m.register("b", "http://h:3", identity(DIGEST_B), t0)
                .value
                .is_err()
        );
        assert!(
            m.register("b", "http://h:3", identity(DIGEST_A), t0)
                .value
                .is_ok()
        );
    }

    #[test]
    fn a_static_replicas_identity_pins_the_digest_and_probes_check_it() {
        let mut m = membership();
        let t0 = Instant::now();
        m.record_identity(1, identity(DIGEST_A)).unwrap();
        assert_eq!(m.digest("a"), Some(DIGEST_A));
        assert!(matches!(
            m.record_identity(1, identity(DIGEST_B)),
            Err(MembershipError::DigestMismatch { .. })
        ));
        assert!(matches!(
            m.record_identity(42, identity(DIGEST_A)),
            Err(MembershipError::UnknownReplica(42))
        ));
        m.pin_digest("b", DIGEST_B).unwrap();
        assert!(m.pin_digest("b", DIGEST_A).is_err());
        assert!(m.pin_digest("zzz", DIGEST_A).is_err());
        // A probe that answers with other weights counts as failed.
        let _ = m.record_failure(1, t0);
        let _ = m.record_failure(1, t0);
        let _ = m.due_probes(t0 + secs(1));
        let events = m.probe_succeeded(1, Some(identity(DIGEST_B)), t0 + secs(1));
        assert!(
            matches!(events.as_slice(), [Event::ProbeFailed { error, .. }] if error.contains("serves weights")),
            "{events:?}"
        );
        assert_eq!(m.replica(1).unwrap().health, Health::OutOfRotation);
    }

    #[test]
    fn a_model_that_does_not_fit_the_data_is_refused() {
        let mut m = membership();
        m.expect_model(784, 10);
        let mut wrong = identity(DIGEST_A);
        wrong.input_shape = vec![1, 32, 32];
        let err = m
            .register("b", "http://h:1", wrong, Instant::now())
            .value
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "member `b`: replica http://h:1 serves a model with 1024 inputs and 10 classes, expected 784 inputs and 10 classes"
        );
        // [1, 28, 28] has the same 784 values per row.
        let mut fits = identity(DIGEST_A);
        fits.input_shape = vec![1, 28, 28];
        assert!(
            m.register("b", "http://h:1", fits, Instant::now())
                .value
                .is_ok()
        );
    }

    #[test]
    fn unknown_members_bad_addresses_and_foreign_static_addresses_are_refused() {
        let mut m = membership();
        let t0 = Instant::now();
        let err = m
            .register("zzz", "http://h:1", identity(DIGEST_A), t0)
            .value
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "member `zzz` is not part of this run (members: `a`, `b`)"
        );
        let err = m
            .register("b", "http://s1:1", identity(DIGEST_A), t0)
            .value
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "address http://s1:1 is a static replica of member `a` in the run config, not of `b`"
        );
        for (addr, why) in [
            ("", "address is empty"),
            ("h:1", "has no scheme"),
            ("ftp://h:1", "has scheme `ftp`"),
            ("http://h", "has no port"),
            ("http://h:0", "has port 0"),
            ("http://h:1/x", "has a path or query"),
            ("http://h:99999", "has an invalid port"),
            ("http://", "is not a URI"),
        ] {
            let err = m
                .register("b", addr, identity(DIGEST_A), t0)
                .value
                .unwrap_err();
            assert!(err.to_string().contains(why), "{addr}: {err}");
        }
        assert!(m.replicas("b").is_empty());
        assert!(matches!(
            Membership::new(
                cfg(),
                [
                    ("a".to_string(), vec!["http://x:1".to_string()]),
                    ("b".to_string(), vec!["http://X:1/".to_string()]),
                ],
            ),
            Err(MembershipError::DuplicateStatic { .. })
        ));
    }

    #[test]
    fn an_address_registering_for_another_member_replaces_its_old_replica() {
        let mut m = Membership::new(
            cfg(),
            [("a".to_string(), vec![]), ("b".to_string(), vec![])],
        )
        .unwrap();
        let t0 = Instant::now();
        let old = register(&mut m, "a", "http://h:1", t0).replica;
        let out = m.register("b", "http://h:1", identity(DIGEST_B), t0 + secs(1));
        let new = out.value.unwrap();
        assert!(!new.renewed);
        assert_ne!(new.replica, old);
        assert_eq!(removed(&out.events), vec![(old, RemovalReason::Replaced)]);
        assert!(
            out.events
                .contains(&Event::MemberDown { member: "a".into() })
        );
        assert!(out.events.contains(&Event::MemberUp { member: "b".into() }));
    }

    #[test]
    fn hedge_after_is_the_smoothed_latency_plus_four_deviations() {
        let mut m = membership();
        let t0 = Instant::now();
        let r1 = register(&mut m, "b", "http://h:1", t0).replica;
        assert_eq!(m.hedge_after("b"), None, "no samples");
        for _ in 0..8 {
            let _ = m.record_success(r1, Duration::from_millis(10));
        }
        assert_eq!(m.hedge_after("b"), None, "no other replica to hedge to");
        let _r2 = register(&mut m, "b", "http://h:2", t0).replica;
        // Computed by hand from RFC 6298: the first sample sets SRTT = 10 ms, RTTVAR = 5 ms;
        // each of the 7 equal samples after it leaves SRTT and multiplies RTTVAR by 3/4, so
        // RTTVAR = 5 ms · 0.75^7 = 0.66742 ms and SRTT + 4·RTTVAR = 12.66968 ms.
        let h = m.hedge_after("b").unwrap();
        let want = 0.010 + 4.0 * 0.005 * 0.75f64.powi(7);
        assert!((h.as_secs_f64() - want).abs() < 1e-9, "{h:?} vs {want}");
        assert_eq!(m.hedge_after("a"), None);
        assert_eq!(m.hedge_after("zzz"), None);
        // Never below hedge_min.
        let mut fast = membership();
        let f1 = register(&mut fast, "b", "http://h:1", t0).replica;
        let _ = register(&mut fast, "b", "http://h:2", t0);
        for _ in 0..8 {
            let _ = fast.record_success(f1, Duration::from_micros(10));
        }
        assert_eq!(fast.hedge_after("b"), Some(fast.config().hedge_min));
    }

    #[test]
    fn a_replica_much_slower_than_the_fastest_is_a_straggler() {
        let mut m = membership();
        let t0 = Instant::now();
        let fast = register(&mut m, "b", "http://h:1", t0).replica;
        let slow = register(&mut m, "b", "http://h:2", t0).replica;
        for _ in 0..8 {
            let _ = m.record_success(fast, Duration::from_millis(10));
            let _ = m.record_success(slow, Duration::from_millis(50));
        }
        assert!(m.is_straggler(slow));
        assert!(!m.is_straggler(fast));
        let ewma = m.replica(slow).unwrap().latency.unwrap();
        assert!((ewma.as_secs_f64() - 0.050).abs() < 1e-9);
        // With the fast one out of rotation there is nobody to compare with.
        let _ = m.record_failure(fast, t0);
        let _ = m.record_failure(fast, t0);
        assert!(!m.is_straggler(slow));
    }

    #[test]
    fn a_request_given_up_for_its_hedge_only_raises_the_latency_estimate() {
        let mut m = membership();
        let t0 = Instant::now();
        let r = register(&mut m, "b", "http://h:1", t0).replica;
        let _other = register(&mut m, "b", "http://h:2", t0);
        m.record_slow(r, Duration::from_millis(40));
        assert_eq!(
            m.replica(r).unwrap().latency,
            Some(Duration::from_millis(40))
        );
        for _ in 0..8 {
            let _ = m.record_success(r, Duration::from_millis(10));
        }
        let _ = m.record_failure(r, t0);
        let before = m.replica(r).unwrap();
        let hedge = m.hedge_after("b");
        // A shorter wait says nothing: the estimate stays.
        m.record_slow(r, Duration::from_millis(1));
        assert_eq!(m.replica(r).unwrap().latency, before.latency);
        // A longer one moves it up by α of the gap; failures, counts and the member's smoothed
        // latency (hence the hedge delay) are untouched.
        m.record_slow(r, Duration::from_millis(810));
        let after = m.replica(r).unwrap();
        let want = before.latency.unwrap().as_secs_f64()
            + 0.125 * (0.810 - before.latency.unwrap().as_secs_f64());
        assert!((after.latency.unwrap().as_secs_f64() - want).abs() < 1e-9);
        assert_eq!(after.consecutive_failures, 1);
        assert_eq!(after.answered, 8);
        assert_eq!(m.hedge_after("b"), hedge);
        m.record_slow(999, Duration::from_secs(1)); // unknown: ignored
    }

    #[test]
    fn hedging_can_be_turned_off() {
        let t0 = Instant::now();
        let mut m = Membership::new(
            MembershipConfig {
                hedge: false,
                ..cfg()
            },
            [("b".to_string(), vec![])],
        )
        .unwrap();
        let r1 = register(&mut m, "b", "http://h:1", t0).replica;
        let _ = register(&mut m, "b", "http://h:2", t0);
        for _ in 0..8 {
            let _ = m.record_success(r1, Duration::from_millis(10));
        }
        assert_eq!(m.hedge_after("b"), None);
    }
}
