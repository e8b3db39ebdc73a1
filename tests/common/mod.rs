//! The end-to-end tests' helpers: the workspace's shared ones ([`distill_testkit`]) and those
//! that start this package's `distill` binary.

#![allow(dead_code)] // each test file uses its own subset
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::Path;
use std::process::{Command, Stdio};

pub use distill_testkit::*;

/// The `distill` binary, quiet and on one compute thread (the tests share the machine).
pub fn distill() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_distill"));
    c.env("RUST_LOG", "warn").env("RAYON_NUM_THREADS", "1");
    c
}

/// Starts a student-worker process with id `id`, work dir `d/id`, stderr in `d/id.log`, and
/// the extra flags `extra`.
pub fn worker(d: &Path, addr: &str, id: &str, extra: &[&str]) -> Proc {
    distill()
        .arg("student-worker")
        .args(["--coordinator", &format!("http://{addr}")])
        .args(["--worker-id", id])
        .args(extra)
        .arg("--work-dir")
        .arg(d.join(id))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join(format!("{id}.log"))).unwrap())
        .spawn()
        .unwrap()
        .into()
}

/// Starts a coordinator process of config `cfg` on `listen` (log in `d/log`); returns it and
/// its address.
pub fn coordinator(d: &Path, cfg: &Path, listen: &str, log: &str) -> (Proc, String) {
    let mut cmd = distill();
    cmd.arg("coordinator")
        .arg("--config")
        .arg(cfg)
        .args(["--listen", listen]);
    process::spawn_server(cmd, &d.join(log))
}

/// A teacher-server process of `model` for `member` on `listen` (log in `d/log`); returns it
/// and its URL.
pub fn teacher(d: &Path, model: &Path, member: &str, listen: &str, log: &str) -> (Proc, String) {
    let mut cmd = distill();
    cmd.arg("teacher-server")
        .arg("--model")
        .arg(model)
        .args(["--listen", listen, "--member", member]);
    let (p, addr) = process::spawn_server(cmd, &d.join(log));
    (p, format!("http://{addr}"))
}

/// Trains a small teacher on the synthetic set (`d/teacher.safetensors`) and serves it as
/// member `t` from a teacher-server process kept in `procs`; returns its URL.
pub fn trained_teacher(procs: &mut Procs, d: &Path) -> String {
    let data = distill_core::data::Dataset::load("synthetic:0").unwrap();
    train_teacher(&data, "mlp:784-64-10", 1, &d.join("teacher.safetensors"));
    let (p, url) = teacher(
        d,
        &d.join("teacher.safetensors"),
        "t",
        "127.0.0.1:0",
        "teacher.log",
    );
    procs.0.push(p);
    url
}

/// A test's directory, its processes and the URL of a small trained teacher (member `t`).
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub procs: Procs,
    pub teacher: String,
}

/// A fresh [`Setup`].
pub fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let mut procs = Procs(Vec::new());
    let teacher = trained_teacher(&mut procs, dir.path());
    Setup {
        dir,
        procs,
        teacher,
    }
}
