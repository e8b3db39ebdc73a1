//! Test helpers shared by the membership's unit tests.

use std::time::{Duration, Instant};

use super::*;

/// One weights digest.
pub const DIGEST_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
/// Another weights digest.
pub const DIGEST_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

/// Threshold 2, probes from 100 ms to 1 s with jitter 0.5, leases of 10 s; registrations enter
/// rotation at once (no canary trial: [`trial_cfg`] has one).
pub fn cfg() -> MembershipConfig {
    MembershipConfig {
        canary: false,
        lease_ttl: Duration::from_secs(10),
        heartbeat_interval: Duration::from_secs(2),
        failure_threshold: 2,
        probe_initial: Duration::from_millis(100),
        probe_max: Duration::from_millis(1000),
        probe_jitter: 0.5,
        ..MembershipConfig::default()
    }
}

/// [`cfg`] with canary trials, first registrations of an unrooted member not trusted.
pub fn trial_cfg() -> MembershipConfig {
    MembershipConfig {
        canary: true,
        trust_first_registration: false,
        ..cfg()
    }
}

/// An `mlp:784-10` with weights `digest`.
pub fn identity(digest: &str) -> ModelIdentity {
    ModelIdentity {
        model_id: format!("mlp:784-10@{}", &digest[..16]),
        weights_digest: digest.into(),
        input_shape: vec![784],
        classes: 10,
        max_batch: 1024,
        sequence: None,
    }
}

/// Members `a` (static replica http://s1:1) and `b` (no static replica).
pub fn membership() -> Membership {
    Membership::new(
        cfg(),
        [
            ("a".to_string(), vec!["http://s1:1".to_string()]),
            ("b".to_string(), vec![]),
        ],
    )
    .unwrap()
}

/// `s` seconds.
pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// The lease secret every test registration gets.
pub const SECRET: &str = "5ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2";

/// A new registration's claim: it presents nothing and gets [`SECRET`].
pub fn claim() -> Claim {
    Claim {
        presented: String::new(),
        fresh: SECRET.into(),
    }
}

/// A renewal's claim: it presents [`SECRET`].
pub fn renewal() -> Claim {
    Claim {
        presented: SECRET.into(),
        fresh: "0".repeat(64),
    }
}

/// Registers `addr` for `member` with weights [`DIGEST_A`]; must succeed.
pub fn register(m: &mut Membership, member: &str, addr: &str, now: Instant) -> Registration {
    m.register(member, addr, identity(DIGEST_A), claim(), now)
        .value
        .unwrap()
}

/// The removals among `events`.
pub fn removed(events: &[Event]) -> Vec<(ReplicaId, RemovalReason)> {
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
