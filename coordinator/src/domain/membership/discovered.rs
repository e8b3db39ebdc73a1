//! Replicas found through DNS: a member's `dns://HOST:PORT` endpoint names a set of addresses
//! (a Kubernetes headless Service: one per ready pod), re-resolved by the driver
//! ([`crate::discovery`]), and each answer replaces the member's set of *discovered* replicas.
//!
//! Decided here:
//! - A discovered replica is trusted as a static one is (the operator's config named it), but
//!   enters **out of rotation with its probe due at once**: nothing is known of it until a
//!   health probe's Describe has checked its model against the member's, so a pod that serves
//!   other weights never takes a request.
//! - An address that leaves the answer is removed ([`RemovalReason::Undiscovered`]); its
//!   requests in flight finish or are retried elsewhere, as for any replica that leaves.
//! - An address already held by another replica (static, registered, or of another member)
//!   is left to it and not added again; past `max_replicas_per_member` the rest of an answer
//!   waits for a later one. Both are reported in [`Discovery`].
//! - A failed lookup is not an empty answer: the driver keeps the last set (see
//!   [`crate::discovery`]), so a DNS outage does not empty a member.

use std::collections::BTreeSet;
use std::time::Instant;

use super::{
    Event, Membership, MembershipError, Outcome, RemovalReason, Replica, ReplicaId, Source,
    normalize_address,
};

/// What one answer changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Discovery {
    /// Replicas added (each on its way to its first probe).
    pub added: Vec<ReplicaId>,
    /// Replicas removed.
    pub removed: Vec<ReplicaId>,
    /// Addresses of the answer held by another replica or member.
    pub held_elsewhere: Vec<String>,
    /// Addresses of the answer left out: the member has `max_replicas_per_member` replicas.
    pub over_limit: Vec<String>,
}

impl Membership {
    /// Makes `member`'s discovered replicas the `addresses` of a DNS answer for `server_name`
    /// (the TLS name to check their certificates against), as of `now`.
    pub fn discovered<I>(
        &mut self,
        member: &str,
        server_name: &str,
        addresses: I,
        now: Instant,
    ) -> Outcome<Result<Discovery, MembershipError>>
    where
        I: IntoIterator<Item = String>,
    {
        let mut events = Vec::new();
        let value = self.discovered_inner(member, server_name, addresses, now, &mut events);
        self.member_transitions(&mut events);
        Outcome { value, events }
    }

    fn discovered_inner<I>(
        &mut self,
        member: &str,
        server_name: &str,
        addresses: I,
        now: Instant,
        events: &mut Vec<Event>,
    ) -> Result<Discovery, MembershipError>
    where
        I: IntoIterator<Item = String>,
    {
        self.member_mut(member)?.rooted = true;
        let wanted: BTreeSet<String> = addresses
            .into_iter()
            .map(|a| normalize_address(&a))
            .collect::<Result<_, _>>()?;
        let mut d = Discovery::default();
        let gone: Vec<ReplicaId> = self
            .replicas
            .iter()
            .filter(|(_, r)| {
                r.member == member
                    && r.source == Source::Discovered
                    && r.server_name.as_deref() == Some(server_name)
                    && !wanted.contains(&r.address)
            })
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.remove(id, RemovalReason::Undiscovered, events);
            d.removed.push(id);
        }
        for address in wanted {
            if self.by_address(&address).is_some() {
                let same = self.replicas.values().any(|r| {
                    r.address == address
                        && r.member == member
                        && r.source == Source::Discovered
                        && r.server_name.as_deref() == Some(server_name)
                });
                if !same {
                    d.held_elsewhere.push(address);
                }
                continue;
            }
            let count = self
                .replicas
                .values()
                .filter(|r| r.member == member)
                .count();
            if count >= self.cfg.max_replicas_per_member {
                d.over_limit.push(address);
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            let mut r = Replica::new(member.into(), address.clone(), Source::Discovered, None);
            r.trusted = true;
            r.server_name = Some(server_name.to_string());
            r.health.take_out(0, now);
            self.replicas.insert(id, r);
            events.push(Event::Joined {
                member: member.into(),
                replica: id,
                address,
            });
            d.added.push(id);
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::*;
    use super::Discovery;

    fn addrs(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn an_answer_adds_replicas_out_of_rotation_until_a_probe_checks_them() {
        let mut m = membership();
        let t0 = std::time::Instant::now();
        let out = m.discovered(
            "b",
            "b.svc",
            addrs(&["http://10.0.0.1:5", "http://10.0.0.2:5"]),
            t0,
        );
        let d = out.value.unwrap();
        assert_eq!(d.added.len(), 2);
        assert!(!m.is_up("b"), "nothing in rotation before a probe");
        let due = m.due_probes(t0);
        let ids: Vec<ReplicaId> = due.iter().map(|p| p.replica).collect();
        assert_eq!(ids, d.added, "both probed at once");
        for p in &due {
            assert_eq!(p.kind, ProbeKind::Health);
        }
        let view = m.replica(d.added[0]).unwrap();
        assert_eq!((view.source, view.trusted), (Source::Discovered, true));
        assert_eq!(view.server_name.as_deref(), Some("b.svc"));
        m.probe_succeeded(d.added[0], Some(identity(DIGEST_A)), t0);
        assert!(m.is_up("b"));
        assert_eq!(m.rotation_len("b"), 1);
    }

    #[test]
    fn a_later_answer_removes_what_it_lost_and_keeps_what_it_kept() {
        let mut m = membership();
        let t0 = std::time::Instant::now();
        let first = m
            .discovered(
                "b",
                "b.svc",
                addrs(&["http://10.0.0.1:5", "http://10.0.0.2:5"]),
                t0,
            )
            .value
            .unwrap();
        let out = m.discovered(
            "b",
            "b.svc",
            addrs(&["http://10.0.0.2:5", "http://10.0.0.3:5"]),
            t0,
        );
        let d = out.value.unwrap();
        assert_eq!(d.removed, vec![first.added[0]]);
        assert_eq!(d.added.len(), 1);
        assert!(out.events.iter().any(|e| matches!(
            e,
            Event::Removed { reason: RemovalReason::Undiscovered, replica, .. } if *replica == first.added[0]
        )));
        let mut left: Vec<String> = m.replicas("b").into_iter().map(|r| r.address).collect();
        left.sort();
        assert_eq!(left, addrs(&["http://10.0.0.2:5", "http://10.0.0.3:5"]));
        // The same answer again changes nothing.
        let again = m
            .discovered(
                "b",
                "b.svc",
                addrs(&["http://10.0.0.3:5", "http://10.0.0.2:5"]),
                t0,
            )
            .value
            .unwrap();
        assert_eq!(again, Discovery::default());
        // An empty answer empties the member.
        let empty = m.discovered("b", "b.svc", Vec::new(), t0).value.unwrap();
        assert_eq!(empty.removed.len(), 2);
        assert!(m.replicas("b").is_empty());
    }

    #[test]
    fn addresses_of_other_replicas_and_the_replica_limit_are_respected() {
        let mut m = membership();
        let t0 = std::time::Instant::now();
        // `http://s1:1` is member a's static replica.
        let d = m
            .discovered(
                "b",
                "b.svc",
                addrs(&["http://s1:1", "http://10.0.0.9:5"]),
                t0,
            )
            .value
            .unwrap();
        assert_eq!(d.held_elsewhere, addrs(&["http://s1:1"]));
        assert_eq!(d.added.len(), 1);
        assert_eq!(m.replicas("a").len(), 1, "a's static replica is untouched");
        let limit = m.config().max_replicas_per_member;
        let many: Vec<String> = (0..limit + 3)
            .map(|i| format!("http://10.1.0.{i}:5"))
            .collect();
        let d = m.discovered("b", "b.svc", many, t0).value.unwrap();
        assert_eq!(m.replicas("b").len(), limit);
        assert_eq!(d.over_limit.len(), 3);
        assert!(m.discovered("nope", "x", Vec::new(), t0).value.is_err());
        assert!(
            m.discovered("b", "x", addrs(&["not an address"]), t0)
                .value
                .is_err()
        );
    }
}
