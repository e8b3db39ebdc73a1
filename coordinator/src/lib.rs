//! The distill coordinator: membership, batch leasing, soft targets, run state.

pub mod ledger;
