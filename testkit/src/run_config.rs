//! Run configs for tests, built from the coordinator's own config types (so a renamed or
//! removed key breaks the build of the tests, not their meaning) and written as the TOML file
//! the `coordinator` process reads.

use std::path::{Path, PathBuf};

use coordinator::config::{MemberConfig, RunConfig};

/// The keys most tests share: `synthetic:0`, batches of 64, T = 4, alpha = 0.7, prefetch 4, a
/// 5 s teacher deadline, the `mlp:784-32-10` student with AdamW at lr 0.002. Everything else
/// is at its documented default.
const BASE: &str = r#"
data = "synthetic:0"
batch_size = 64
temperature = 4.0
alpha = 0.7
prefetch = 4
teacher_timeout_secs = 5.0
[student]
arch = "mlp:784-32-10"
[optim]
kind = "adamw"
lr = 0.002
"#;

/// The shared small run ([`BASE`]) with run directory `run_dir` (relative to the config file
/// it is written to) and no members; callers set what their test is about.
pub fn small_run(run_dir: impl Into<PathBuf>) -> RunConfig {
    let mut cfg: RunConfig = toml::from_str(BASE).unwrap();
    cfg.run_dir = run_dir.into();
    cfg
}

/// [`small_run`] made [`resumable`].
pub fn resumable_run(run_dir: impl Into<PathBuf>) -> RunConfig {
    let mut cfg = small_run(run_dir);
    resumable(&mut cfg);
    cfg
}

/// Synchronisation rounds every 5 updates (a 10 s timeout), each one a commit point of the run
/// state, and 30 s leases: what the tests that kill and restart a coordinator need.
pub fn resumable(cfg: &mut RunConfig) {
    cfg.lease_timeout_secs = 30.0;
    cfg.sync.every = 5;
    cfg.sync.round_timeout_secs = 10.0;
    cfg.sync.state_every_secs = 0.0;
}

/// Member `name` with these static endpoints, weight 1.
pub fn static_member(name: &str, endpoints: &[&str]) -> MemberConfig {
    MemberConfig {
        name: name.into(),
        endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
        weight: 1.0,
        ..Default::default()
    }
}

/// Writes `cfg` as `dir/name.toml` and returns the path; the file is checked to read back as
/// the same config.
pub fn write_config(dir: &Path, name: &str, cfg: &RunConfig) -> PathBuf {
    let text = toml::to_string(cfg).unwrap();
    let back: RunConfig = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(&back, cfg, "the config does not survive TOML:\n{text}");
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}
