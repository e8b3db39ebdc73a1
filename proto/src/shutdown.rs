//! Kept only so `coordinator/src/cli.rs` compiles until it calls [`distill_shutdown::on_signal`]
//! directly; the shutdown path is not protocol code and lives in `distill-shutdown`. Remove this
//! module (and the dependency) then.

pub use distill_shutdown::on_signal;
