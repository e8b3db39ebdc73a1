//! The coordinator's pure logic: state machines and decisions with no I/O, no sleeps and no
//! gRPC types; everything that depends on time takes an explicit `now: Instant`. Async drivers
//! elsewhere (the Registry service, the teacher pool, the prober) call into it and do the I/O.

pub mod address;
pub mod choice;
pub mod membership;
