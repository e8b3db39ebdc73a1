//! The one owner of a run's teacher membership: the [`Membership`] state machine behind a mutex,
//! and the notification that it changed. The Registry service (registrations, heartbeats,
//! lease expiry), the teacher pool (request outcomes, probes) and the run (pinned digests,
//! waiting for a member to come back) all hold a clone of one [`MembershipHandle`]; none of
//! them holds another.
//!
//! The lock is held only for one state-machine call at a time, never across an `.await`, and
//! nothing else is locked while it is held.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::Notify;

use crate::domain::membership::{Event, Membership};
use crate::error::{Error, Result};

/// A shared handle on a run's membership and its change notification.
#[derive(Clone)]
pub struct MembershipHandle {
    state: Arc<Mutex<Membership>>,
    changed: Arc<Notify>,
}

impl MembershipHandle {
    /// The handle that owns `membership` from now on.
    pub fn new(membership: Membership) -> Self {
        Self {
            state: Arc::new(Mutex::new(membership)),
            changed: Arc::new(Notify::new()),
        }
    }

    /// The state machine, locked. Whoever changes it through this guard passes the events to
    /// [`MembershipHandle::publish`] after dropping the guard.
    pub fn lock(&self) -> Result<MutexGuard<'_, Membership>> {
        self.state
            .lock()
            .map_err(|_| Error::Internal("membership lock poisoned".into()))
    }

    /// Runs `f` on the locked state machine, then publishes the events it returned.
    pub fn update<T>(&self, f: impl FnOnce(&mut Membership) -> (T, Vec<Event>)) -> Result<T> {
        let (value, events) = f(&mut *self.lock()?);
        self.publish(&events);
        Ok(value)
    }

    /// Logs `events` and, if there are any, wakes the waiters of [`MembershipHandle::changed`].
    pub fn publish(&self, events: &[Event]) {
        for e in events {
            e.log();
        }
        if !events.is_empty() {
            self.changed.notify_waiters();
        }
    }

    /// Notified (`notify_waiters`) after every change that produced events; arm a
    /// `notified()` future before reading the state so a change in between is not missed.
    pub fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    /// Pins `member`'s weights digest (what the start-up check or the soft-target cache saw).
    pub fn pin_digest(&self, member: &str, digest: &str) -> Result<()> {
        self.lock()?
            .pin_digest(member, digest)
            .map_err(|e| Error::Config(e.to_string()))
    }

    /// Expires the leases that ended by `now` and publishes the events.
    pub fn tick(&self, now: Instant) -> Result<Vec<Event>> {
        self.update(|m| {
            let events = m.tick(now);
            (events.clone(), events)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::domain::membership::{MembershipConfig, ModelIdentity};

    #[tokio::test]
    async fn a_change_with_events_wakes_a_waiter_armed_before_it() {
        let m = Membership::new(
            MembershipConfig::default(),
            [("b".to_string(), Vec::<String>::new())],
        )
        .unwrap();
        let handle = MembershipHandle::new(m);
        let changed = handle.changed();
        let woken = changed.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let t0 = Instant::now();
        let identity = ModelIdentity {
            model_id: "mlp:784-10@0123456789abcdef".into(),
            weights_digest: "0123456789abcdef".repeat(4),
            input_shape: vec![784],
            classes: 10,
            max_batch: 0,
            sequence: None,
        };
        let id = handle
            .update(|m| {
                let claim = crate::domain::membership::Claim {
                    presented: String::new(),
                    fresh: "5".repeat(64),
                };
                let out = m.register("b", "http://h:1", identity, claim, t0);
                (out.value, out.events)
            })
            .unwrap()
            .unwrap()
            .replica;
        tokio::time::timeout(Duration::from_secs(5), woken)
            .await
            .expect("a registration wakes the waiters");
        assert!(handle.lock().unwrap().is_up("b"));
        let events = handle.tick(t0 + Duration::from_secs(10)).unwrap();
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(handle.lock().unwrap().replica(id).is_none());
        assert!(handle.pin_digest("zzz", "x").is_err());
    }
}
