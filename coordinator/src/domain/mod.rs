//! The coordinator's pure logic: state machines and decisions with no I/O, no sleeps, no locks
//! and no gRPC types; everything that depends on time takes an explicit `now: Instant`. The
//! driver ([`crate::driver`]) owns the run's [`run_state::RunState`] and performs what it
//! decides; the Registry service, the teacher pool and the prober drive the membership.

pub mod address;
pub mod choice;
pub mod claim;
pub mod counters;
pub mod gradient_step;
pub mod ledger;
pub mod membership;
pub mod report;
pub mod rounds;
pub mod run_state;
pub mod schedule;
pub mod workers;
