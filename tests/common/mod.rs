//! Helpers of the end-to-end tests that run the built `distill` binary as real processes.

#![allow(dead_code)] // each test file uses its own subset
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::io::{BufRead, BufReader};
use std::ops::ControlFlow;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use candle_core::Device;
use distill_core::data::Dataset;
use distill_core::optim::OptimConfig;
use distill_core::spec::{Arch, ModelSpec};
use distill_core::train::{CrossEntropy, TrainConfig, Trainer};

/// A child process that is killed and reaped when dropped, also when the test fails.
pub struct Proc(Option<Child>);

impl Proc {
    /// Takes the child out of the guard (the caller now owns killing it).
    pub fn into_child(mut self) -> Child {
        self.0.take().expect("a guarded child")
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

pub fn distill() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_distill"));
    c.env("RUST_LOG", "warn").env("RAYON_NUM_THREADS", "1");
    c
}

/// Starts `cmd`, returns the address from its first stdout line `listening on ADDR`.
pub fn start(procs: &mut Procs, mut cmd: Command, log: &Path) -> String {
    let stderr = std::fs::File::create(log).unwrap();
    let mut child = cmd.stdout(Stdio::piped()).stderr(stderr).spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    procs.0.push(child.into());
    // The first line, read on a helper thread so a process that never prints fails the test
    // (the child is in `procs`, killed when the test unwinds).
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let read = out.read_line(&mut line).map(|_| line);
        let _ = tx.send(read);
        // Keep reading so the process can print its summary at the end.
        let _ = std::io::copy(&mut out, &mut std::io::sink());
    });
    let line = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(read) => read.unwrap(),
        Err(_) => panic!("no `listening on` line within 120 s; see {}", log.display()),
    };
    line.trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}; see {}", log.display()))
        .to_string()
}

pub fn train_teacher(data: &Dataset, arch: &str, seed: u64, path: &Path) {
    let cfg = TrainConfig {
        epochs: 2,
        seed,
        optim: OptimConfig::adamw(1e-3, 0.0),
        eval_every_epoch: false,
        ..Default::default()
    };
    let mut t = Trainer::new(
        ModelSpec::new(Arch::parse(arch).unwrap()),
        cfg,
        &Device::Cpu,
    )
    .unwrap();
    t.run(data, &mut CrossEntropy, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    t.checkpoint().unwrap().save(path).unwrap();
}

/// Waits for a child to exit, with a deadline (the wait runs on a helper thread); kills it at
/// the deadline.
pub fn wait_with_deadline(
    child: impl Into<Proc>,
    deadline: Duration,
    what: &str,
) -> std::process::ExitStatus {
    let mut child = child.into().into_child();
    let (tx, rx) = mpsc::channel();
    let pid = child.id();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    match rx.recv_timeout(deadline) {
        Ok(status) => status.unwrap(),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("{what} did not finish within {deadline:?}");
        }
    }
}

/// The coordinator's `RunStatus` (None while it does not answer).
pub fn run_status(addr: &str) -> Option<distill_proto::pb::RunStatusResponse> {
    use distill_proto::pb::coordinator_client::CoordinatorClient;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Bounded: a coordinator that accepts but never answers reads as not answering, so the
        // caller's deadline fails the test instead of hanging it.
        let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .ok()?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10));
        let mut c = CoordinatorClient::new(ep.connect().await.ok()?);
        c.run_status(distill_proto::pb::RunStatusRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
    })
}

/// Polls `cond` until it holds; panics at the deadline. (A condition on another process's
/// state: nothing else to wait on.)
pub fn wait_until<T>(deadline: Duration, what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
    let end = std::time::Instant::now() + deadline;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(
            std::time::Instant::now() < end,
            "{what}: not reached within {deadline:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads a run's `report.json`.
/// The unsigned integer `k` of a report (or any JSON object); panics naming it and the object.
pub fn count(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("{k}: {v}"))
}

pub fn read_report(run_dir: &Path) -> serde_json::Value {
    let p = run_dir.join("report.json");
    serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
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
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join(format!("{id}.log"))).unwrap())
        .spawn()
        .unwrap()
        .into()
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

/// Runs `test` with a deadline: a hang fails the test with `what` instead of blocking the suite.
pub async fn within<T>(
    limit: Duration,
    what: &str,
    test: impl std::future::Future<Output = T>,
) -> T {
    match tokio::time::timeout(limit, test).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: not finished within {limit:?}"),
    }
}

/// A loopback port held for the whole test: bound with `SO_REUSEADDR` but not listening. Nothing
/// else is given the port (so it cannot be taken between a kill and a restart), a connection to
/// it is refused while nobody listens, and a server of ours may listen on it at any time
/// (tokio's `TcpListener::bind` sets `SO_REUSEADDR`; Linux refuses such a bind only while
/// another socket *listens* on the address).
pub struct PortReservation {
    _socket: tokio::net::TcpSocket,
    /// The reserved address.
    pub addr: std::net::SocketAddr,
}

/// Reserves a free loopback port ([`PortReservation`]).
pub fn reserve_port() -> PortReservation {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    PortReservation {
        _socket: socket,
        addr,
    }
}

/// A checkpoint of `arch` with the random initial weights of `seed` (no training).
pub fn random_checkpoint(arch: &str, seed: u64) -> distill_core::checkpoint::Checkpoint {
    let spec = ModelSpec::new(Arch::parse(arch).unwrap());
    let m = distill_core::model::TrainableModel::init(spec.clone(), seed, &Device::Cpu).unwrap();
    distill_core::checkpoint::Checkpoint::from_tensors(spec, &m.named_tensors().unwrap()).unwrap()
}

/// Serves `ck` in-process with `opts` on `listener` until `shutdown`; returns the service (a
/// clone shares its counters) and its URL.
pub fn serve_teacher_on(
    ck: &distill_core::checkpoint::Checkpoint,
    opts: &teacher_server::ServeOptions,
    listener: tokio::net::TcpListener,
    shutdown: &tokio_util::sync::CancellationToken,
) -> (teacher_server::TeacherService, String) {
    let svc = teacher_server::build_service(ck, &Device::Cpu, opts).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(teacher_server::serve(
        svc.clone(),
        listener,
        64 << 20,
        shutdown.clone(),
    ));
    (svc, url)
}

/// [`serve_teacher_on`] a fresh loopback port.
pub async fn serve_teacher(
    ck: &distill_core::checkpoint::Checkpoint,
    opts: &teacher_server::ServeOptions,
    shutdown: &tokio_util::sync::CancellationToken,
) -> (teacher_server::TeacherService, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    serve_teacher_on(ck, opts, listener, shutdown)
}

/// Starts a coordinator process on `listen` (log in `d/log`); returns it and its address.
pub fn coordinator(
    procs: &mut Procs,
    d: &Path,
    cfg: &Path,
    listen: &str,
    log: &str,
) -> (Proc, String) {
    let mut cmd = distill();
    cmd.arg("coordinator")
        .arg("--config")
        .arg(cfg)
        .args(["--listen", listen]);
    let addr = start(procs, cmd, &d.join(log));
    (procs.0.pop().unwrap(), addr)
}

/// Trains a small teacher on the synthetic set and serves it from a teacher-server process;
/// returns its address.
pub fn trained_teacher(procs: &mut Procs, d: &Path) -> String {
    let data = Dataset::load("synthetic:0").unwrap();
    train_teacher(&data, "mlp:784-64-10", 1, &d.join("teacher.safetensors"));
    let mut cmd = distill();
    cmd.arg("teacher-server")
        .arg("--model")
        .arg(d.join("teacher.safetensors"))
        .args(["--listen", "127.0.0.1:0", "--member", "t"]);
    format!("http://{}", start(procs, cmd, &d.join("teacher.log")))
}

/// Sends `sig` (`-STOP`, `-CONT`, …) to process `pid`.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// Joins as worker `id` and opens its batch stream with `credits` batches of credit; returns
/// the sender of its messages and the coordinator's replies (a hand-driven worker).
pub async fn open_stream(
    client: &mut distill_proto::pb::coordinator_client::CoordinatorClient<
        tonic::transport::Channel,
    >,
    id: &str,
    credits: u32,
) -> (
    tokio::sync::mpsc::Sender<distill_proto::pb::WorkerMessage>,
    tonic::Streaming<distill_proto::pb::CoordinatorMessage>,
) {
    use distill_proto::pb;
    let j = client
        .join(pb::JoinRequest {
            worker_id: id.into(),
            resume_step: 0,
            session_secret: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tx.send(pb::WorkerMessage {
        kind: Some(pb::worker_message::Kind::Hello(pb::Hello {
            worker_id: j.worker_id,
            incarnation: j.incarnation,
            credits,
            session_secret: j.session_secret,
        })),
    })
    .await
    .unwrap();
    let inbound = client
        .batches(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, inbound)
}
