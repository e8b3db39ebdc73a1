//! `distill bench --only load`: many concurrent clients, each on its own connection, against a
//! teacher-server process and against a coordinator process's Registry on loopback, for a
//! bounded time and a bounded number of requests. What it shows: the servers keep answering,
//! their resident memory stays bounded (peak RSS from `/proc/PID/status`), and load beyond a
//! server's limits is refused with `RESOURCE_EXHAUSTED` at once instead of queueing (the
//! latency of refusals is reported next to that of answers).
//!
//! - teacher: unary `Infer` of 8 rows from every client; the server takes at most
//!   `--load-inflight` requests in flight.
//! - registry: every client registers its own (made-up) replica address, then heartbeats with
//!   its lease secret; past `max_replicas_per_member` (64) registrations are refused.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use distill_proto::HostTensor;
use distill_proto::pb::registry_client::RegistryClient;
use distill_proto::pb::teacher_client::TeacherClient;
use distill_proto::pb::{self, HeartbeatRequest, InferRequest, RegisterRequest};
use tonic::transport::{Channel, Endpoint};

use super::BenchArgs;
use super::stats::Summary;

/// A registration a client holds: replica id, address, lease secret.
type Lease = (u64, String, String);

/// One call's outcome: latency in seconds, and its code.
type Outcome = (f64, tonic::Code);

/// A server process of the bench, killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `distill ARGS`, returns it once it printed `listening on ADDR`.
fn spawn(args: &[String], log: &Path) -> anyhow::Result<Server> {
    use std::io::BufRead;
    let exe = std::env::current_exe().context("finding the distill binary")?;
    let mut child = Command::new(exe)
        .args(args)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .context("starting a server process")?;
    let out = child.stdout.take().context("no stdout")?;
    let mut line = String::new();
    std::io::BufReader::new(out).read_line(&mut line)?;
    let Some(addr) = line.trim().strip_prefix("listening on ") else {
        let _ = child.kill();
        bail!("the server did not start (see {})", log.display());
    };
    Ok(Server {
        addr: addr.to_string(),
        child,
    })
}

/// Resident and peak resident memory of process `pid`, in MiB.
fn rss_mib(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

async fn channel(addr: &str) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await?)
}

/// Runs `clients` tasks, each calling `call(client index, call index)` until the deadline or
/// until `max_requests` calls were made in all; returns every outcome.
async fn drive<F, Fut>(
    clients: usize,
    secs: f64,
    max_requests: u64,
    call: F,
) -> anyhow::Result<(Vec<Outcome>, f64)>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = tonic::Code> + Send,
{
    let call = Arc::new(call);
    let issued = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let (call, issued) = (call.clone(), issued.clone());
        tasks.spawn(async move {
            let mut out = Vec::new();
            let mut i = 0;
            while Instant::now() < end && issued.fetch_add(1, Ordering::Relaxed) < max_requests {
                let t = Instant::now();
                let code = call(c, i).await;
                out.push((t.elapsed().as_secs_f64(), code));
                i += 1;
            }
            out
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r?);
    }
    Ok((all, start.elapsed().as_secs_f64()))
}

/// Prints one target's figures.
fn print(what: &str, outcomes: &[Outcome], elapsed: f64, rss: (f64, f64, f64)) {
    let millis = |code: tonic::Code| -> Vec<f64> {
        outcomes
            .iter()
            .filter(|(_, c)| *c == code)
            .map(|(s, _)| s * 1000.0)
            .collect()
    };
    let (ok, refused) = (
        millis(tonic::Code::Ok),
        millis(tonic::Code::ResourceExhausted),
    );
    let other = outcomes.len() - ok.len() - refused.len();
    let q = |v: &[f64]| {
        Summary::of(v).map_or("-".to_string(), |s| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            let p99 = v[((v.len() - 1) as f64 * 0.99).round() as usize];
            format!("p50 {:.2} ms, p99 {:.2} ms", s.median, p99)
        })
    };
    println!(
        "  {what:<9} {:>7} calls in {elapsed:.1} s: {:>6} answered ({:.0}/s; {}), {:>6} RESOURCE_EXHAUSTED ({}), {} other errors; server RSS {:.0} MiB before, {:.0} MiB peak, {:.0} MiB after",
        outcomes.len(),
        ok.len(),
        ok.len() as f64 / elapsed.max(1e-9),
        q(&ok),
        refused.len(),
        q(&refused),
        other,
        rss.0,
        rss.1,
        rss.2,
    );
}

/// Runs the section.
pub fn run(a: &BenchArgs, rt: &tokio::runtime::Runtime, out: &Path) -> anyhow::Result<()> {
    println!();
    println!(
        "[load] {} clients, one connection each, for {:.0} s or {} requests per target",
        a.load_clients, a.load_secs, a.load_requests
    );
    let teacher_file = out.join("load-teacher.safetensors");
    super::random_teacher("mlp:784-64-10")?.save(&teacher_file)?;
    let teacher = spawn(
        &[
            "teacher-server".into(),
            "--model".into(),
            teacher_file.display().to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--max-inflight".into(),
            a.load_inflight.to_string(),
        ],
        &out.join("load-teacher.log"),
    )?;
    let pid = teacher.child.id();
    let before = rss_mib(pid).map_or(0.0, |r| r.0);
    let channels: Vec<Channel> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..a.load_clients {
            v.push(channel(&teacher.addr).await?);
        }
        anyhow::Ok(v)
    })?;
    let rows = HostTensor::from_f32(vec![8, 784], &[0.5; 8 * 784])?;
    let (outcomes, elapsed) = rt.block_on(drive(
        a.load_clients,
        a.load_secs,
        a.load_requests,
        move |c, i| {
            let mut client = TeacherClient::new(channels[c].clone());
            let req = InferRequest {
                request_id: i,
                inputs: Some(rows.clone().into()),
                temperature: 2.0,
                output_dtype: 0,
                ..Default::default()
            };
            async move {
                match client.infer(req).await {
                    Ok(_) => tonic::Code::Ok,
                    Err(s) => s.code(),
                }
            }
        },
    ))?;
    let (after, peak) = rss_mib(pid).unwrap_or((0.0, 0.0));
    print("teacher", &outcomes, elapsed, (before, peak, after));
    drop(teacher);

    let cfg = out.join("load-run.toml");
    std::fs::write(
        &cfg,
        format!(
            "data = \"synthetic\"\nrun_dir = \"{}\"\n[student]\narch = \"mlp:784-16-10\"\n[[members]]\nname = \"t\"\n",
            out.join("load-run").display()
        ),
    )?;
    let coordinator = spawn(
        &[
            "coordinator".into(),
            "--config".into(),
            cfg.display().to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ],
        &out.join("load-coordinator.log"),
    )?;
    let pid = coordinator.child.id();
    let before = rss_mib(pid).map_or(0.0, |r| r.0);
    let channels: Vec<Channel> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..a.load_clients {
            v.push(channel(&coordinator.addr).await?);
        }
        anyhow::Ok(v)
    })?;
    let digest = super::random_teacher("mlp:784-64-10")?.digest();
    let leases: Arc<Vec<std::sync::Mutex<Option<Lease>>>> = Arc::new(
        (0..a.load_clients)
            .map(|_| std::sync::Mutex::new(None))
            .collect(),
    );
    let (outcomes, elapsed) = rt.block_on(drive(
        a.load_clients,
        a.load_secs,
        a.load_requests,
        move |c, _| {
            let mut client = RegistryClient::new(channels[c].clone());
            let leases = leases.clone();
            let digest = digest.clone();
            async move {
                let held = leases[c].lock().ok().and_then(|l| l.clone());
                let result = match held {
                    Some((replica_id, address, lease_secret)) => client
                        .heartbeat(HeartbeatRequest {
                            replica_id,
                            address,
                            in_flight: 0,
                            max_in_flight: 0,
                            lease_secret,
                        })
                        .await
                        .map(|_| ()),
                    None => client
                        .register(RegisterRequest {
                            member: "t".into(),
                            address: format!("http://127.0.0.1:{}", 20_000 + c),
                            model_id: "mlp:784-64-10@load".into(),
                            weights_digest: digest,
                            input_shape: vec![784],
                            num_classes: 10,
                            max_batch: 0,
                            lease_secret: String::new(),
                        })
                        .await
                        .map(|r| {
                            let r: pb::RegisterResponse = r.into_inner();
                            if let Ok(mut l) = leases[c].lock() {
                                *l = Some((r.replica_id, r.address, r.lease_secret));
                            }
                        }),
                };
                match result {
                    Ok(()) => tonic::Code::Ok,
                    Err(s) => s.code(),
                }
            }
        },
    ))?;
    let (after, peak) = rss_mib(pid).unwrap_or((0.0, 0.0));
    print("registry", &outcomes, elapsed, (before, peak, after));
    Ok(())
}
