//! Real processes in tests: each one killed and reaped when the test ends, also when it fails,
//! and every wait on one bounded.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a server process may take to print its `listening on ADDR` line.
pub const START_LIMIT: Duration = Duration::from_secs(120);

/// A child process that is killed and reaped when dropped, also when the test fails.
pub struct Proc(Option<Child>);

impl Proc {
    /// Takes the child out of the guard (the caller now owns killing it).
    pub fn into_child(mut self) -> Child {
        self.0.take().expect("a guarded child")
    }

    /// The exit status, or a panic (and, through the drop, a kill) after `limit`.
    pub fn wait_within(&mut self, limit: Duration, what: &str) -> ExitStatus {
        let end = Instant::now() + limit;
        loop {
            if let Some(status) = self.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < end, "{what}: no exit within {limit:?}");
            // Polling an exit (std has no wait with a timeout), not a synchronisation sleep.
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl From<Child> for Proc {
    fn from(c: Child) -> Self {
        Self(Some(c))
    }
}

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.0.as_ref().expect("a guarded child")
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        self.0.as_mut().expect("a guarded child")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

/// The processes of a test, each killed when the test ends (also on failure).
pub struct Procs(pub Vec<Proc>);

/// Starts `cmd` (stderr into `log`) and returns it with the address from its first stdout line,
/// `listening on ADDR`; panics, killing it, when no such line comes within [`START_LIMIT`].
pub fn spawn_server(mut cmd: Command, log: &Path) -> (Proc, String) {
    let stderr = std::fs::File::create(log).unwrap();
    let mut child: Proc = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap()
        .into();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    // The first line, read on a helper thread so a process that never prints fails the test.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let read = out.read_line(&mut line).map(|_| line);
        let _ = tx.send(read);
        // Keep reading so the process can print its summary at the end.
        let _ = std::io::copy(&mut out, &mut std::io::sink());
    });
    let line = match rx.recv_timeout(START_LIMIT) {
        Ok(read) => read.unwrap(),
        Err(_) => panic!(
            "no `listening on` line within {START_LIMIT:?}; see {}",
            log.display()
        ),
    };
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}; see {}", log.display()))
        .to_string();
    (child, addr)
}

/// [`spawn_server`], the process kept in `procs`.
pub fn start(procs: &mut Procs, cmd: Command, log: &Path) -> String {
    let (child, addr) = spawn_server(cmd, log);
    procs.0.push(child);
    addr
}

/// Waits for a child to exit, with a deadline; kills it at the deadline.
pub fn wait_with_deadline(child: impl Into<Proc>, limit: Duration, what: &str) -> ExitStatus {
    child.into().wait_within(limit, what)
}

/// Runs `cmd` to completion within `limit` (killed if it overruns), its stdout and stderr
/// collected on helper threads so that a full pipe cannot stall it and a pipe held open by a
/// leftover grandchild cannot block the test.
pub fn output_within(cmd: &mut Command, limit: Duration, what: &str) -> Output {
    let mut child: Proc = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"))
        .into();
    let collect = |mut r: Box<dyn Read + Send>| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            let _ = tx.send(v);
        });
        rx
    };
    let out = collect(Box::new(child.stdout.take().unwrap()));
    let err = collect(Box::new(child.stderr.take().unwrap()));
    let status = child.wait_within(limit, what);
    Output {
        status,
        stdout: out
            .recv_timeout(limit)
            .unwrap_or_else(|_| panic!("{what}: stdout not closed within {limit:?}")),
        stderr: err
            .recv_timeout(limit)
            .unwrap_or_else(|_| panic!("{what}: stderr not closed within {limit:?}")),
    }
}

/// Sends `sig` (`-STOP`, `-CONT`, `-TERM`, …) to process `pid`.
pub fn signal(pid: u32, sig: &str) {
    let out = output_within(
        Command::new("kill").args([sig, &pid.to_string()]),
        Duration::from_secs(10),
        "kill",
    );
    assert!(out.status.success(), "kill {sig} {pid}: {out:?}");
}

/// Every `*.log` file in `d`, for a failure message.
pub fn logs(d: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(d).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "log") {
            out += &format!(
                "--- {}\n{}\n",
                p.display(),
                std::fs::read_to_string(&p).unwrap_or_default()
            );
        }
    }
    out
}

/// Waits for the workers (each within `worker_limit`), then the coordinator (60 s), to exit
/// successfully; a failure shows every log of `d`.
pub fn finish(d: &Path, coordinator: Proc, workers: Vec<Proc>, worker_limit: Duration) {
    for (i, w) in workers.into_iter().enumerate() {
        let st = wait_with_deadline(w, worker_limit, "a student worker");
        assert!(st.success(), "worker {i}: {st:?}\n{}", logs(d));
    }
    let st = wait_with_deadline(coordinator, Duration::from_secs(60), "the coordinator");
    assert!(st.success(), "coordinator: {st:?}\n{}", logs(d));
}
