//! The run's logic as pure state machines: no tokio, no tonic, no locks, no clock (every call
//! that depends on time takes `now`). The driver ([`crate::driver`]) owns one of each and
//! performs what they decide.

pub mod counters;
pub mod ledger;
pub mod report;
pub mod rounds;
pub mod run_state;
pub mod workers;
