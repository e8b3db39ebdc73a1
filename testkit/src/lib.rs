//! What every test suite of the workspace shares, so that each helper exists once: deadlines
//! for every wait ([`deadline`]), real processes that cannot outlive a failing test
//! ([`process`]), loopback ports that cannot be taken between a kill and a restart ([`net`]),
//! checkpoints ([`models`]), in-process teacher servers, coordinators and workers
//! ([`servers`]), run configs built from the real config types ([`run_config`]), report readers
//! ([`report`]), a worker driven by hand over the wire ([`hand_worker`]) and the memory guards
//! of the property tests ([`fuzz`]).
//!
//! Only integration tests (`tests/` of each crate) use it: it depends on the crates it helps
//! test, which Cargo allows for dev-dependencies, and their integration tests link the same
//! library it does.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly by design

pub mod deadline;
pub mod fuzz;
pub mod hand_worker;
pub mod models;
pub mod net;
pub mod process;
pub mod report;
pub mod run_config;
pub mod servers;

pub use deadline::{Deadline, block_within, until, wait_until, within};
pub use hand_worker::{collect_batches, open_stream};
pub use models::{random_checkpoint, train_teacher};
pub use net::{PortReservation, reserve_port};
pub use process::{
    Proc, Procs, finish, logs, output_within, signal, spawn_server, start, wait_with_deadline,
};
pub use report::{count, member, read_report, run_status};
pub use run_config::{resumable, resumable_run, small_run, static_member, write_config};
pub use servers::{
    serve_run, serve_sequence_teacher, serve_teacher, serve_teacher_on, spawn_worker, teacher_pool,
};
