//! What the property tests ("fuzzing" inside `cargo test`) of every crate share: the number of
//! cases, and guards that fail when an input made the process allocate what it declared
//! rather than what it holds.

use proptest::test_runner::Config;

/// `PROPTEST_CASES` cases if that variable is set (proptest reads it), else `cases`.
pub fn cases(cases: u32) -> Config {
    if std::env::var_os("PROPTEST_CASES").is_some() {
        Config::default()
    } else {
        Config::with_cases(cases)
    }
}

/// A `/proc/self/status` field in bytes (Linux; None elsewhere).
pub fn proc_status(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// Fails if the process ever reserved more than 32 GiB of virtual memory (`VmPeak`, which
/// counts reservations whose pages are never touched, so an attempt to allocate what a hostile
/// header declares shows up even when the kernel lets it through lazily). The inputs of the
/// property tests are at most a few MiB; the margin is for the allocator's per-thread arenas
/// (64 MiB of address space each) on machines with many test threads.
pub fn vm_guard() {
    if let Some(peak) = proc_status("VmPeak:") {
        assert!(
            peak < 32 << 30,
            "peak virtual memory {peak} bytes: something allocated what an input declared"
        );
    }
}

/// Runs `f` and fails if the process's peak resident memory (`VmHWM`) grew by more than
/// `limit` bytes meanwhile: for readers that would fill (so touch) what they allocate. Resident
/// rather than virtual memory, so that other tests' threads starting their allocator arenas
/// meanwhile do not count.
pub fn within_memory<T>(limit: u64, f: impl FnOnce() -> T) -> T {
    let before = proc_status("VmHWM:");
    let out = f();
    if let (Some(b), Some(a)) = (before, proc_status("VmHWM:")) {
        assert!(
            a.saturating_sub(b) <= limit,
            "peak resident memory grew by {} bytes (limit {limit})",
            a - b
        );
    }
    out
}
