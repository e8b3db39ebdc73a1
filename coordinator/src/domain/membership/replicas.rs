//! Who is a replica: static endpoints and registrations, leases and heartbeats, and the model
//! each states (a member's replicas must serve the same weights, of the data's shape).

use std::time::Instant;

use super::{
    Claim, Event, Load, Membership, MembershipError, ModelIdentity, Outcome, Registration,
    RemovalReason, Replica, ReplicaId, SequenceData, SequenceIdentity, Source, normalize_address,
    secrets_match,
};

/// How a new registration enters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    /// At a trusted address: in rotation at once, a reference for others.
    Trusted,
    /// The first of a member that has nothing trusted: in rotation at once, trusted.
    FirstUse,
    /// On trial until its canary answers agree with a reference's.
    Trial,
    /// Canary checks are off: in rotation at once.
    Unchecked,
}

impl Membership {
    /// Requires every replica to take rows of `row_len` values and answer `classes` logits
    /// (the data's shape).
    pub fn expect_model(&mut self, row_len: u64, classes: u32) {
        self.data_shape = Some((row_len, classes));
        self.sequences = None;
    }

    /// Requires every replica to be a sequence model of `data`'s vocabulary and tokenizer that
    /// takes sequences of `data.seq_len` tokens (instead of [`Membership::expect_model`]).
    pub fn expect_sequences(&mut self, data: SequenceData) {
        self.data_shape = None;
        self.sequences = Some(data);
    }

    /// Pins a member's weights digest (e.g. what the start-up check or the soft-target cache
    /// saw). Fails if another digest is pinned already.
    pub fn pin_digest(&mut self, member: &str, digest: &str) -> Result<(), MembershipError> {
        let state = self.member_mut(member)?;
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

    /// A replica registers (or renews its registration) at `now`. An address that a
    /// registration holds can be renewed or moved to another member only with that
    /// registration's secret (`claim.presented`); a static replica's address cannot be
    /// registered at all.
    pub fn register(
        &mut self,
        member: &str,
        address: &str,
        identity: ModelIdentity,
        claim: Claim,
        now: Instant,
    ) -> Outcome<Result<Registration, MembershipError>> {
        let mut events = Vec::new();
        let value = self.register_inner(member, address, identity, claim, now, &mut events);
        self.member_transitions(&mut events);
        Outcome { value, events }
    }

    fn register_inner(
        &mut self,
        member: &str,
        address: &str,
        identity: ModelIdentity,
        claim: Claim,
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
        self.banned.retain(|_, until| now < *until);
        if let Some(until) = self.banned.get(&address) {
            return Err(MembershipError::Banned {
                address,
                member: member.into(),
                secs: until
                    .saturating_duration_since(now)
                    .as_secs()
                    .saturating_add(1),
            });
        }
        let existing = self.by_address(&address);
        if let Some(id) = existing {
            let r = &self.replicas[&id];
            if r.source != Source::Registered {
                return Err(MembershipError::AddressTaken {
                    address,
                    member: member.into(),
                    owner: r.member.clone(),
                });
            }
            // Only the process that holds the registration may renew or change it: anyone
            // else could otherwise evict a replica by registering its address.
            if !secrets_match(&r.secret, &claim.presented) {
                return Err(MembershipError::AddressHeld {
                    address,
                    replica: id,
                });
            }
            if r.member != member {
                // The process at this address now serves another member: the old replica is
                // gone, whether or not the new registration is accepted.
                self.remove(id, RemovalReason::Replaced, events);
            }
        }
        if self.by_address(&address).is_none() {
            let limit = self.cfg.max_replicas_per_member;
            if self
                .replicas
                .values()
                .filter(|r| r.member == member)
                .count()
                >= limit
            {
                return Err(MembershipError::TooManyReplicas {
                    member: member.into(),
                    limit,
                });
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
        // A replica on trial pins nothing: a rogue first registration of a member whose
        // trusted replicas have not told their digest yet must not lock them out.
        let deadline = now + self.cfg.lease_ttl;
        let (id, renewed, secret) = match self.by_address(&address) {
            Some(id) => {
                if self.replicas.get(&id).is_some_and(|r| !r.on_trial) {
                    self.pin_identity(member, &identity);
                }
                let mut secret = String::new();
                if let Some(r) = self.replicas.get_mut(&id) {
                    r.lease_deadline = Some(deadline);
                    r.identity = Some(identity);
                    secret = r.secret.clone();
                    // A (re)started process: check it at once instead of waiting out the
                    // backoff.
                    r.health.restart_probes(now);
                }
                events.push(Event::Renewed {
                    member: member.into(),
                    replica: id,
                    address: address.clone(),
                });
                (id, true, secret)
            }
            None => {
                let admission = self.admission(member, &address)?;
                if admission != Admission::Trial {
                    self.pin_identity(member, &identity);
                }
                let id = self.next_id;
                self.next_id += 1;
                let mut r = Replica::new(
                    member.into(),
                    address.clone(),
                    Source::Registered,
                    Some(deadline),
                );
                r.identity = Some(identity);
                r.secret = claim.fresh.clone();
                r.trusted = matches!(admission, Admission::Trusted | Admission::FirstUse);
                if admission == Admission::Trial {
                    // Out of rotation with its trial due at once.
                    r.on_trial = true;
                    r.health.take_out(0, now);
                }
                self.replicas.insert(id, r);
                let (member, address) = (member.to_string(), address.clone());
                events.push(Event::Joined {
                    member: member.clone(),
                    replica: id,
                    address: address.clone(),
                });
                match admission {
                    Admission::Trial => events.push(Event::OnTrial {
                        member,
                        replica: id,
                        address,
                    }),
                    Admission::FirstUse => events.push(Event::TrustedOnFirstUse {
                        member,
                        replica: id,
                        address,
                    }),
                    Admission::Trusted | Admission::Unchecked => {}
                }
                (id, false, claim.fresh)
            }
        };
        Ok(Registration {
            replica: id,
            address,
            lease_ttl: self.cfg.lease_ttl,
            heartbeat_interval: self.cfg.heartbeat_interval,
            renewed,
            secret,
        })
    }

    /// A heartbeat from replica `id` registered at `address` with lease secret `secret`:
    /// renews its lease and records its load. False means the replica is unknown (never
    /// registered here, expired — also when `now` is at or past its deadline and no tick
    /// removed it yet — or deregistered) and must register again; a heartbeat without the
    /// registration's secret is unknown too, and changes nothing.
    pub fn heartbeat(
        &mut self,
        id: ReplicaId,
        address: &str,
        secret: &str,
        load: Load,
        now: Instant,
    ) -> Outcome<bool> {
        let mut events = Vec::new();
        let address = normalize_address(address).unwrap_or_default();
        let ttl = self.cfg.lease_ttl;
        let value = match self.replicas.get_mut(&id) {
            Some(r) if r.address == address && secrets_match(&r.secret, secret) => {
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

    /// Replica `id` at `address`, presenting lease secret `secret`, leaves. True if a
    /// registered replica was removed; a static replica stays (false), and an unknown one or
    /// a wrong secret is a no-op (false).
    pub fn deregister(&mut self, id: ReplicaId, address: &str, secret: &str) -> Outcome<bool> {
        let mut events = Vec::new();
        let address = normalize_address(address).unwrap_or_default();
        let value = match self.replicas.get(&id) {
            Some(r)
                if r.address == address
                    && r.source == Source::Registered
                    && secrets_match(&r.secret, secret) =>
            {
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

    /// How a new registration of `member` at `address` enters (see [`Admission`]).
    fn admission(&self, member: &str, address: &str) -> Result<Admission, MembershipError> {
        let Some(state) = self.members.get(member) else {
            return Err(MembershipError::UnknownMember {
                member: member.into(),
                known: self.known_members(),
            });
        };
        if state.trusted_addresses.contains(address) {
            return Ok(Admission::Trusted);
        }
        if !self.cfg.canary {
            return Ok(Admission::Unchecked);
        }
        let admitted = self
            .replicas
            .values()
            .any(|r| r.member == member && !r.on_trial);
        if state.rooted || admitted {
            return Ok(Admission::Trial);
        }
        if self.cfg.trust_first_registration {
            Ok(Admission::FirstUse)
        } else {
            Err(MembershipError::NoTrustedReplica {
                member: member.into(),
            })
        }
    }

    /// The replica that a trial of `candidate` (of `member`) compares with: a trusted one in
    /// rotation — for a member trusted on first use, any admitted one in rotation — the
    /// lowest id first (static replicas, then the oldest registrations).
    pub(super) fn reference_for(&self, member: &str, candidate: ReplicaId) -> Option<ReplicaId> {
        let rooted = self.members.get(member).is_some_and(|m| m.rooted);
        self.replicas
            .iter()
            .find(|&(&id, r)| {
                id != candidate
                    && r.member == member
                    && !r.on_trial
                    && r.health.in_rotation()
                    && (r.trusted || !rooted)
            })
            .map(|(&id, _)| id)
    }

    pub(super) fn known_members(&self) -> String {
        self.members
            .keys()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub(super) fn by_address(&self, address: &str) -> Option<ReplicaId> {
        self.replicas
            .iter()
            .find(|(_, r)| r.address == address)
            .map(|(&id, _)| id)
    }

    pub(super) fn check_identity(
        &self,
        member: &str,
        address: &str,
        identity: &ModelIdentity,
    ) -> Result<(), MembershipError> {
        let Some(inputs) = identity.row_len() else {
            return Err(MembershipError::ShapeOverflow {
                member: member.into(),
                address: address.into(),
                shape: identity.input_shape.clone(),
            });
        };
        let state = self.members.get(member);
        let problem = match (&self.sequences, &identity.sequence) {
            (None, None) => None,
            (Some(want), Some(got)) => sequence_problem(want, identity.classes, got),
            (Some(want), None) => Some(format!(
                "serves a classifier ({} classes), but the run trains on token sequences \
                 (vocabulary {})",
                identity.classes, want.vocab
            )),
            (None, Some(_)) => Some(format!(
                "serves a sequence model (vocabulary {}), but the run trains on rows",
                identity.classes
            )),
        };
        if let Some(problem) = problem {
            return Err(MembershipError::SequenceMismatch {
                member: member.into(),
                address: address.into(),
                problem,
            });
        }
        // A sequence model's input shape is its longest sequence, not the data's: checked above.
        let expected = match self.sequences {
            Some(_) => None,
            None => self.data_shape.or(state.and_then(|s| s.shape)),
        };
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

    /// Pins the member's digest and shape to `identity`'s where none is yet (called after
    /// [`Membership::check_identity`] accepted it).
    pub(super) fn pin_identity(&mut self, member: &str, identity: &ModelIdentity) {
        if let Some(s) = self.members.get_mut(member) {
            s.digest
                .get_or_insert_with(|| identity.weights_digest.clone());
            if s.shape.is_none() {
                s.shape = identity.row_len().map(|n| (n, identity.classes));
            }
        }
    }

    pub(super) fn remove(&mut self, id: ReplicaId, reason: RemovalReason, events: &mut Vec<Event>) {
        if let Some(r) = self.replicas.remove(&id) {
            events.push(Event::Removed {
                member: r.member,
                replica: id,
                address: r.address,
                reason,
            });
        }
    }
}

/// Why a sequence model stating `got` (with vocabulary `vocab`) cannot serve `want`, if so.
fn sequence_problem(want: &SequenceData, vocab: u32, got: &SequenceIdentity) -> Option<String> {
    if vocab != want.vocab {
        return Some(format!(
            "serves a vocabulary of {vocab} tokens, but the data's tokenizer has {}",
            want.vocab
        ));
    }
    if got.tokenizer_digest != want.tokenizer_digest && got.tokenizer_digest.is_empty() {
        return Some(format!(
            "states no tokenizer, but the data were tokenized with {}; serve the model with \
             its tokenizer (tokenizer.json next to its weights, or a GGUF file that embeds one)",
            short(&want.tokenizer_digest)
        ));
    }
    if got.tokenizer_digest != want.tokenizer_digest {
        return Some(format!(
            "was trained with tokenizer {} but the data were tokenized with {}; teachers and \
             student must share one tokenizer",
            short(&got.tokenizer_digest),
            short(&want.tokenizer_digest)
        ));
    }
    if got.max_sequence_length < want.seq_len || got.max_tokens < u64::from(want.seq_len) {
        return Some(format!(
            "takes sequences of at most {} tokens ({} per request), but the run sends {}",
            got.max_sequence_length, got.max_tokens, want.seq_len
        ));
    }
    None
}

/// The first 16 characters of a digest, for messages.
fn short(digest: &str) -> &str {
    digest.get(..16).unwrap_or(digest)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::super::testutil::*;
    use super::super::*;

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
        let out = m.register(
            "b",
            "http://10.0.0.5:50051",
            identity(DIGEST_A),
            claim(),
            t0,
        );
        let reg = out.value.unwrap();
        assert_eq!(
            reg,
            Registration {
                replica: 2,
                address: "http://10.0.0.5:50051".into(),
                lease_ttl: secs(10),
                heartbeat_interval: secs(2),
                renewed: false,
                secret: SECRET.into(),
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
        let hb = m.heartbeat(id, "http://h:1", SECRET, load, t0 + secs(8));
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
        assert!(
            !m.heartbeat(id, "http://h:1", SECRET, load, t0 + secs(19))
                .value
        );
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
        let hb = m.heartbeat(id, "http://h:1", SECRET, Load::default(), t0 + secs(10));
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
        assert!(
            !m.heartbeat(id, "http://other:1", SECRET, Load::default(), t0)
                .value
        );
        assert!(
            !m.heartbeat(99, "http://h:1", SECRET, Load::default(), t0)
                .value
        );
        // The real one is untouched, and case or a trailing slash do not matter.
        assert!(
            m.heartbeat(id, "HTTP://H:1/", SECRET, Load::default(), t0 + secs(1))
                .value
        );
        assert_eq!(m.replica(id).unwrap().lease_deadline, Some(t0 + secs(11)));
    }

    #[test]
    fn registering_the_same_address_again_is_the_same_replica_with_a_new_lease() {
        let mut m = membership();
        let t0 = Instant::now();
        let first = register(&mut m, "b", "http://h:1", t0);
        let out = m.register(
            "b",
            "http://H:1/",
            identity(DIGEST_A),
            renewal(),
            t0 + secs(5),
        );
        let second = out.value.unwrap();
        assert_eq!(second.replica, first.replica);
        assert!(second.renewed);
        assert_eq!(second.secret, SECRET, "a renewal keeps the secret");
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
    fn static_replicas_never_expire_and_cannot_be_registered_heartbeated_or_deregistered() {
        let mut m = membership();
        let t0 = Instant::now();
        // A static replica is the operator's: nobody may register its address, even for its
        // own member (that would let a stranger restate its model).
        let err = m
            .register("a", "http://s1:1", identity(DIGEST_A), claim(), t0)
            .value
            .unwrap_err();
        assert!(matches!(err, MembershipError::AddressTaken { .. }), "{err}");
        assert_eq!(m.replica(1).unwrap().identity, None);
        assert!(m.tick(t0 + secs(1_000_000)).is_empty());
        let load = Load {
            in_flight: 64,
            max_in_flight: 64,
        };
        assert!(!m.heartbeat(1, "http://s1:1", "", load, t0).value);
        assert_eq!(m.replica(1).unwrap().in_flight, None);
        let out = m.deregister(1, "http://s1:1", "");
        assert!(!out.value);
        assert!(out.events.is_empty());
        assert!(m.is_up("a"));
        assert_eq!(m.replica(1).unwrap().source, Source::Static);
    }

    #[test]
    fn only_the_lease_secret_keeps_changes_or_ends_a_registration() {
        let mut m = Membership::new(
            cfg(),
            [("a".to_string(), vec![]), ("b".to_string(), vec![])],
        )
        .unwrap();
        let t0 = Instant::now();
        let id = register(&mut m, "b", "http://h:1", t0).replica;
        let forged = "f".repeat(64);
        // A forged heartbeat claiming a full replica neither renews the lease nor steers load.
        let full = Load {
            in_flight: 64,
            max_in_flight: 64,
        };
        assert!(
            !m.heartbeat(id, "http://h:1", &forged, full, t0 + secs(5))
                .value
        );
        assert!(!m.heartbeat(id, "http://h:1", "", full, t0 + secs(5)).value);
        let r = m.replica(id).unwrap();
        assert_eq!((r.in_flight, r.lease_deadline), (None, Some(t0 + secs(10))));
        // A forged deregistration removes nothing.
        assert!(!m.deregister(id, "http://h:1", &forged).value);
        assert!(m.replica(id).is_some());
        // Registering the address again without the secret (an eviction, or a takeover for
        // another member) is refused and leaves the replica as it was.
        for (member, digest) in [("b", DIGEST_A), ("b", DIGEST_B), ("a", DIGEST_B)] {
            let bad = Claim {
                presented: forged.clone(),
                fresh: "1".repeat(64),
            };
            let out = m.register(member, "http://h:1", identity(digest), bad, t0 + secs(6));
            assert_eq!(
                out.value.unwrap_err(),
                MembershipError::AddressHeld {
                    address: "http://h:1".into(),
                    replica: id,
                }
            );
            assert!(out.events.is_empty());
        }
        let r = m.replica(id).unwrap();
        assert_eq!(
            (r.member.as_str(), r.lease_deadline),
            ("b", Some(t0 + secs(10)))
        );
        assert_eq!(m.digest("b"), Some(DIGEST_A));
        // The holder's own secret works.
        assert!(
            m.heartbeat(id, "http://h:1", SECRET, full, t0 + secs(7))
                .value
        );
        assert!(m.deregister(id, "http://h:1", SECRET).value);
        // Once the registration is gone (deregistered, or its lease ended) the address is free.
        assert!(!register(&mut m, "b", "http://h:1", t0 + secs(8)).renewed);
    }

    #[test]
    fn a_member_takes_at_most_the_configured_number_of_replicas() {
        let mut m = Membership::new(
            MembershipConfig {
                max_replicas_per_member: 2,
                ..cfg()
            },
            [("a".to_string(), vec!["http://s1:1".to_string()])],
        )
        .unwrap();
        let t0 = Instant::now();
        register(&mut m, "a", "http://h:1", t0);
        let out = m.register("a", "http://h:2", identity(DIGEST_A), claim(), t0);
        assert_eq!(
            out.value.unwrap_err(),
            MembershipError::TooManyReplicas {
                member: "a".into(),
                limit: 2,
            }
        );
        // Renewing one it has is not a new replica.
        let out = m.register("a", "http://h:1", identity(DIGEST_A), renewal(), t0);
        assert!(out.value.unwrap().renewed);
    }

    #[test]
    fn deregister_removes_a_registered_replica_once() {
        let mut m = membership();
        let t0 = Instant::now();
        let id = register(&mut m, "b", "http://h:1", t0).replica;
        assert!(!m.deregister(id, "http://wrong:1", SECRET).value);
        let out = m.deregister(id, "http://h:1", SECRET);
        assert!(out.value);
        assert_eq!(
            removed(&out.events),
            vec![(id, RemovalReason::Deregistered)]
        );
        assert_eq!(
            out.events.last(),
            Some(&Event::MemberDown { member: "b".into() })
        );
        assert!(!m.deregister(id, "http://h:1", SECRET).value);
    }

    #[test]
    fn a_weights_digest_mismatch_between_replicas_of_a_member_is_refused() {
        let mut m = membership();
        let t0 = Instant::now();
        let id = register(&mut m, "b", "http://h:1", t0).replica;
        let out = m.register("b", "http://h:2", identity(DIGEST_B), claim(), t0);
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
        let out = m.register(
            "b",
            "http://h:1",
            identity(DIGEST_B),
            renewal(),
            t0 + secs(1),
        );
        assert!(out.value.is_err());
        assert_eq!(removed(&out.events), vec![(id, RemovalReason::Refused)]);
        assert!(
            out.events
                .contains(&Event::MemberDown { member: "b".into() })
        );
        // The pin holds with the member empty.
        assert!(
            m.register("b", "http://h:3", identity(DIGEST_B), claim(), t0)
                .value
                .is_err()
        );
        assert!(
            m.register("b", "http://h:3", identity(DIGEST_A), claim(), t0)
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
            .register("b", "http://h:1", wrong, claim(), Instant::now())
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
            m.register("b", "http://h:1", fits, claim(), Instant::now())
                .value
                .is_ok()
        );
    }

    #[test]
    fn unknown_members_bad_addresses_and_foreign_static_addresses_are_refused() {
        let mut m = membership();
        let t0 = Instant::now();
        let err = m
            .register("zzz", "http://h:1", identity(DIGEST_A), claim(), t0)
            .value
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "member `zzz` is not part of this run (members: `a`, `b`)"
        );
        let err = m
            .register("b", "http://s1:1", identity(DIGEST_A), claim(), t0)
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
                .register("b", addr, identity(DIGEST_A), claim(), t0)
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
        let out = m.register(
            "b",
            "http://h:1",
            identity(DIGEST_B),
            renewal(),
            t0 + secs(1),
        );
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
    fn a_stated_input_shape_whose_size_overflows_is_refused_not_a_panic() {
        let mut m = membership();
        let t0 = Instant::now();
        let mut huge = identity(DIGEST_A);
        huge.input_shape = vec![u64::MAX, 2];
        assert_eq!(huge.row_len(), None);
        let err = m.record_identity(1, huge.clone()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "member `a`: replica http://s1:1 states input shape [18446744073709551615, 2], whose size overflows"
        );
        assert_eq!(m.digest("a"), None, "nothing pinned");
        let err = m
            .register("b", "http://h:1", huge.clone(), claim(), t0)
            .value
            .unwrap_err();
        assert!(
            matches!(err, MembershipError::ShapeOverflow { .. }),
            "{err}"
        );
        let _ = m.record_failure(1, t0);
        let _ = m.record_failure(1, t0);
        let _ = m.due_probes(t0 + secs(1));
        let events = m.probe_succeeded(1, Some(huge), t0 + secs(1));
        assert!(
            matches!(events.as_slice(), [Event::ProbeFailed { error, .. }] if error.contains("whose size overflows")),
            "{events:?}"
        );
        assert_eq!(m.replica(1).unwrap().health, Health::OutOfRotation);
    }

    fn trial_membership() -> Membership {
        Membership::new(
            trial_cfg(),
            [
                ("a".to_string(), vec!["http://s1:1".to_string()]),
                ("b".to_string(), vec![]),
            ],
        )
        .unwrap()
    }

    fn kinds(m: &mut Membership, now: Instant) -> Vec<(ReplicaId, ProbeKind)> {
        m.due_probes(now)
            .into_iter()
            .map(|p| (p.replica, p.kind))
            .collect()
    }

    #[test]
    fn a_registration_is_on_trial_against_a_trusted_replica_until_it_agrees() {
        let mut m = trial_membership();
        let t0 = Instant::now();
        let out = m.register("a", "http://h:9", identity(DIGEST_A), claim(), t0);
        let id = out.value.unwrap().replica;
        assert!(
            out.events
                .iter()
                .any(|e| matches!(e, Event::OnTrial { replica, .. } if *replica == id)),
            "{:?}",
            out.events
        );
        let v = m.replica(id).unwrap();
        assert_eq!((v.health, v.trusted), (Health::OnTrial, false));
        assert_eq!(
            m.rotation("a").iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![1],
            "not in rotation"
        );
        // A request's success does not admit it; only its trial does.
        assert!(m.record_success(id, Duration::from_millis(1)).is_empty());
        assert_eq!(m.replica(id).unwrap().health, Health::OnTrial);
        // Its trial is due at once, against the static replica.
        assert_eq!(
            kinds(&mut m, t0),
            vec![(id, ProbeKind::Trial { reference: Some(1) })]
        );
        let events = m.probe_succeeded(id, Some(identity(DIGEST_A)), t0);
        assert!(
            matches!(events.as_slice(), [Event::Admitted { replica, .. }] if *replica == id),
            "{events:?}"
        );
        assert_eq!(m.rotation_len("a"), 2);
        assert!(!m.replica(id).unwrap().trusted);
        // Later trials still compare with the trusted replica, not with the admitted one.
        let next = register(&mut m, "a", "http://h:10", t0);
        assert_eq!(
            kinds(&mut m, t0),
            vec![(next.replica, ProbeKind::Trial { reference: Some(1) })]
        );
    }

    #[test]
    fn a_replica_that_disagrees_is_removed_counted_and_its_address_refused_for_a_while() {
        let mut m = trial_membership();
        let t0 = Instant::now();
        let id = register(&mut m, "a", "http://h:9", t0).replica;
        let _ = kinds(&mut m, t0);
        let events = m.canary_disagreed(id, "row 0 differs by 3", t0);
        assert!(
            matches!(events.first(), Some(Event::CanaryRefused { replica, detail, .. }) if *replica == id && detail == "row 0 differs by 3"),
            "{events:?}"
        );
        assert_eq!(removed(&events), vec![(id, RemovalReason::Disagreed)]);
        assert!(m.replica(id).is_none());
        assert_eq!((m.canary_refusals("a"), m.canary_refusals("b")), (1, 0));
        // Refused at once, and for probe_max (1 s).
        let again = m.register("a", "http://h:9", identity(DIGEST_A), claim(), t0 + secs(0));
        assert!(
            matches!(again.value, Err(MembershipError::Banned { .. })),
            "{:?}",
            again.value
        );
        let later = t0 + Duration::from_millis(1000);
        let id2 = m
            .register("a", "http://h:9", identity(DIGEST_A), claim(), later)
            .value
            .unwrap()
            .replica;
        assert_eq!(
            m.replica(id2).unwrap().health,
            Health::OnTrial,
            "on trial again"
        );
        // An admitted replica is never "disagreed" away (a stale report changes nothing).
        assert!(m.canary_disagreed(1, "stale", later).is_empty());
        assert!(m.replica(1).is_some());
    }

    #[test]
    fn a_trial_without_a_trusted_replica_in_rotation_waits() {
        let mut m = trial_membership();
        let t0 = Instant::now();
        // The static replica goes out of rotation (threshold 2).
        let _ = m.record_failure(1, t0);
        let _ = m.record_failure(1, t0);
        let id = register(&mut m, "a", "http://h:9", t0).replica;
        assert_eq!(
            kinds(&mut m, t0),
            vec![(id, ProbeKind::Trial { reference: None })]
        );
        let events = m.probe_failed(id, "no trusted replica", t0);
        assert!(
            matches!(events.as_slice(), [Event::ProbeFailed { .. }]),
            "{events:?}"
        );
        assert_eq!(m.replica(id).unwrap().health, Health::OnTrial);
        assert!(
            !m.is_up("a"),
            "a replica on trial does not bring its member up"
        );
    }

    #[test]
    fn trusted_addresses_enter_at_once_and_are_the_reference() {
        let mut m = trial_membership();
        let t0 = Instant::now();
        m.trust("b", ["HTTP://T:1".to_string()]).unwrap();
        assert!(matches!(
            m.trust("zzz", ["http://t:2".to_string()]),
            Err(MembershipError::UnknownMember { .. })
        ));
        // Before the trusted replica registers, a rogue one is on trial with nothing to
        // compare with, and it pins no digest: the trusted one, serving other weights than
        // the rogue claimed, still gets in.
        let rogue = m
            .register("b", "http://r:1", identity(DIGEST_B), claim(), t0)
            .value
            .unwrap()
            .replica;
        assert_eq!(m.digest("b"), None);
        let trusted = register(&mut m, "b", "http://t:1", t0).replica;
        let v = m.replica(trusted).unwrap();
        assert_eq!((v.health, v.trusted), (Health::InRotation, true));
        assert_eq!(m.digest("b"), Some(DIGEST_A));
        assert!(m.is_up("b"));
        assert_eq!(
            kinds(&mut m, t0),
            vec![(
                rogue,
                ProbeKind::Trial {
                    reference: Some(trusted)
                }
            )]
        );
    }

    #[test]
    fn a_member_with_nothing_trusted_trusts_its_first_registration_only_if_allowed() {
        let t0 = Instant::now();
        let mut strict = trial_membership();
        assert_eq!(
            strict
                .register("b", "http://h:1", identity(DIGEST_A), claim(), t0)
                .value,
            Err(MembershipError::NoTrustedReplica { member: "b".into() })
        );
        let mut m = Membership::new(
            MembershipConfig {
                trust_first_registration: true,
                ..trial_cfg()
            },
            [("b".to_string(), Vec::<String>::new())],
        )
        .unwrap();
        let first = m.register("b", "http://h:1", identity(DIGEST_A), claim(), t0);
        let first_id = first.value.unwrap().replica;
        assert!(
            first
                .events
                .iter()
                .any(|e| matches!(e, Event::TrustedOnFirstUse { .. })),
            "{:?}",
            first.events
        );
        assert_eq!(m.replica(first_id).unwrap().health, Health::InRotation);
        // The next one is checked against an admitted replica.
        let second = register(&mut m, "b", "http://h:2", t0).replica;
        assert_eq!(
            kinds(&mut m, t0),
            vec![(
                second,
                ProbeKind::Trial {
                    reference: Some(first_id)
                }
            )]
        );
        let _ = m.probe_succeeded(second, Some(identity(DIGEST_A)), t0);
        // With both gone, the next registration is trusted on first use again.
        let _ = m.tick(t0 + secs(10));
        assert!(m.replicas("b").is_empty());
        let third = m
            .register(
                "b",
                "http://h:3",
                identity(DIGEST_A),
                claim(),
                t0 + secs(10),
            )
            .value
            .unwrap()
            .replica;
        assert!(m.replica(third).unwrap().trusted);
    }

    /// A sequence model of vocabulary `vocab`, tokenizer `tok` and longest sequence `len`.
    fn lm(vocab: u32, tok: &str, len: u32) -> ModelIdentity {
        ModelIdentity {
            classes: vocab,
            input_shape: vec![u64::from(len)],
            sequence: Some(SequenceIdentity {
                tokenizer_digest: tok.into(),
                max_tokens: 4096,
                max_sequence_length: len,
            }),
            ..identity(DIGEST_A)
        }
    }

    #[test]
    fn sequence_members_must_share_the_data_s_tokenizer_vocabulary_and_length() {
        let tok = "ab".repeat(32);
        let mut m = membership();
        m.expect_sequences(SequenceData {
            vocab: 218,
            tokenizer_digest: tok.clone(),
            seq_len: 64,
        });
        let refused = |m: &mut Membership, ident: ModelIdentity, says: &str| match m
            .record_identity(1, ident)
        {
            Err(e @ MembershipError::SequenceMismatch { .. }) => {
                assert!(e.to_string().contains(says), "{e}")
            }
            other => panic!("{other:?}"),
        };
        refused(
            &mut m,
            identity(DIGEST_A),
            "serves a classifier (10 classes)",
        );
        refused(&mut m, lm(219, &tok, 64), "vocabulary of 219 tokens");
        refused(&mut m, lm(218, &"cd".repeat(32), 64), "share one tokenizer");
        refused(&mut m, lm(218, &tok, 32), "at most 32 tokens");
        refused(&mut m, lm(218, "", 64), "states no tokenizer");
        // Its input shape is its own longest sequence, not the data's: a longer one fits.
        m.record_identity(1, lm(218, &tok, 128)).unwrap();
        assert_eq!(m.digest("a"), Some(DIGEST_A));
        // A run on rows refuses a sequence model.
        let mut rows = membership();
        rows.expect_model(784, 10);
        match rows.record_identity(1, lm(10, &tok, 784)) {
            Err(e @ MembershipError::SequenceMismatch { .. }) => {
                assert!(e.to_string().contains("trains on rows"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }
}
