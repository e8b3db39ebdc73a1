//! The Coordinator service in-process over loopback with a real teacher server: RunStatus,
//! Join, and the errors a misbehaving worker gets; then a real worker completes the run.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::time::Duration;

use candle_core::Device;
use coordinator::config::{MemberConfig, RunConfig, SoftTargetEncoding, StudentConfig};
use distill_core::checkpoint::Checkpoint;
use distill_core::kd::Combine;
use distill_core::model::TrainableModel;
use distill_core::optim::OptimConfig;
use distill_core::spec::{Arch, ModelSpec};
use distill_proto::pb::coordinator_client::CoordinatorClient;
use distill_proto::pb::{self, JoinRequest, RunStatusRequest, WorkerMessage, worker_message};
use tokio_util::sync::CancellationToken;

/// Starts one teacher (random weights are enough: the run's mechanics are under test).
async fn teacher(shutdown: &CancellationToken) -> String {
    teacher_at("127.0.0.1:0", shutdown).await
}

/// [`teacher`] listening on `addr`.
async fn teacher_at(addr: &str, shutdown: &CancellationToken) -> String {
    let spec = ModelSpec::new(Arch::parse("mlp:784-16-10").unwrap());
    let m = TrainableModel::init(spec.clone(), 1, &Device::Cpu).unwrap();
    let ck = Checkpoint::from_tensors(spec, &m.named_tensors().unwrap()).unwrap();
    let opts = teacher_server::ServeOptions {
        member: "t".into(),
        ..Default::default()
    };
    let svc = teacher_server::build_service(&ck, &Device::Cpu, &opts).unwrap();
    let tl = tokio::net::TcpListener::bind(addr).await.unwrap();
    let taddr = tl.local_addr().unwrap();
    tokio::spawn(teacher_server::serve(svc, tl, 64 << 20, shutdown.clone()));
    format!("http://{taddr}")
}

fn config(dir: &std::path::Path, endpoints: Vec<String>) -> RunConfig {
    RunConfig {
        data: "synthetic:5".into(),
        run_dir: dir.join("run"),
        epochs: 1,
        batch_size: 500,
        seed: 1,
        temperature: 3.0,
        alpha: 0.5,
        combine: Combine::MeanProb,
        soft_targets: SoftTargetEncoding::F16,
        checkpoint_every: 0,
        lease_timeout_secs: 30.0,
        prefetch: 2,
        teacher_timeout_secs: 10.0,
        teacher_policy: Default::default(),
        max_message_mb: 64,
        min_workers: 1,
        cache: None,
        sync: Default::default(),
        student: StudentConfig {
            arch: "mlp:784-16-10".into(),
            dropout: 0.0,
            input_dropout: 0.0,
            precision: Default::default(),
        },
        optim: OptimConfig::adamw(1e-3, 0.0),
        members: vec![MemberConfig {
            name: "t".into(),
            endpoints,
            weight: 1.0,
        }],
        membership: Default::default(),
    }
}

/// A real student worker in this process, run to the end.
async fn run_worker(
    coordinator: std::net::SocketAddr,
    dir: &std::path::Path,
    shutdown: &CancellationToken,
) -> student_worker::WorkerReport {
    student_worker::run(
        student_worker::WorkerConfig {
            coordinator: format!("http://{coordinator}"),
            work_dir: dir.join("worker"),
            connect_timeout: Duration::from_secs(10),
            ..Default::default()
        },
        shutdown.clone(),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn status_join_and_bad_streams_then_a_worker_completes_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let cfg = config(dir.path(), vec![teacher(&shutdown).await]);
    let run = coordinator::prepare(cfg).await.unwrap();
    let cl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let caddr = cl.local_addr().unwrap();
    let served = tokio::spawn(coordinator::serve(run, cl, shutdown.clone()));
    let mut client = CoordinatorClient::connect(format!("http://{caddr}"))
        .await
        .unwrap();

    let st = client
        .run_status(RunStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.batches_trained, 0);
    assert_eq!(st.batches_expected, 12_000u64.div_ceil(500));
    assert_eq!(st.epochs, 1);
    assert!(!st.done);
    assert_eq!(st.members.len(), 1);
    assert_eq!(st.members[0].member, "t");

    // Join hands out the settings; a second join of the same id is a new incarnation.
    let j = client
        .join(JoinRequest {
            worker_id: "w".into(),
            resume_step: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((j.worker_id.as_str(), j.incarnation), ("w", 1));
    let settings: distill_core::settings::StudentSettings =
        serde_json::from_str(&j.settings_json).unwrap();
    assert_eq!(settings.temperature, 3.0);
    assert_eq!(j.batches_per_epoch, 24);
    let j2 = client
        .join(JoinRequest {
            worker_id: "w".into(),
            resume_step: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(j2.incarnation, 2);

    // A stream from the replaced incarnation is fenced off; one without Hello is refused.
    let hello = |inc: u64, credits: u32| WorkerMessage {
        kind: Some(worker_message::Kind::Hello(pb::Hello {
            worker_id: "w".into(),
            incarnation: inc,
            credits,
        })),
    };
    let st = client
        .batches(tokio_stream::iter(vec![hello(1, 2)]))
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::FailedPrecondition, "{st:?}");
    let st = client
        .batches(tokio_stream::iter(vec![WorkerMessage {
            kind: Some(worker_message::Kind::Credits(3)),
        }]))
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
    let st = client
        .batches(tokio_stream::iter(vec![hello(2, 0)]))
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
    let unknown = WorkerMessage {
        kind: Some(worker_message::Kind::Hello(pb::Hello {
            worker_id: "nobody".into(),
            incarnation: 1,
            credits: 1,
        })),
    };
    let st = client
        .batches(tokio_stream::iter(vec![unknown]))
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::NotFound, "{st:?}");

    // A real worker trains the whole run (f16 soft targets) and the coordinator reports.
    let worker = run_worker(caddr, dir.path(), &shutdown).await;
    assert_eq!(worker.batches, 24);
    let report = served.await.unwrap().unwrap().expect("the run completed");
    assert_eq!(report.batches_trained, 24);
    assert_eq!(report.test_size, 2000);
    assert_eq!(report.student_test_errors, worker.test_errors);
    assert!(report.members[0].requests >= 24);
    shutdown.cancel();
}

#[tokio::test]
async fn a_failed_teacher_request_is_retried_on_another_replica() {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    // The first replica's port is closed (bound, then released): every request sent there
    // fails and must be retried on the live replica.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let cfg = config(dir.path(), vec![dead, teacher(&shutdown).await]);
    let run = coordinator::prepare(cfg).await.unwrap();
    let cl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let caddr = cl.local_addr().unwrap();
    let served = tokio::spawn(coordinator::serve(run, cl, shutdown.clone()));
    run_worker(caddr, dir.path(), &shutdown).await;
    let report = served.await.unwrap().unwrap().expect("the run completed");
    assert_eq!(report.batches_trained, report.batches_expected);
    assert!(report.retries >= 1, "no retry recorded: {report:?}");
    assert!(report.members[0].failures >= 1);
    assert!(report.members[0].requests >= report.batches_expected);
    shutdown.cancel();
}

/// Opens a batch stream for a fresh worker `id`; returns the sender of its messages and the
/// coordinator's replies.
async fn open_stream(
    client: &mut CoordinatorClient<tonic::transport::Channel>,
    id: &str,
) -> (
    tokio::sync::mpsc::Sender<WorkerMessage>,
    tonic::Streaming<pb::CoordinatorMessage>,
) {
    let j = client
        .join(JoinRequest {
            worker_id: id.into(),
            resume_step: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(WorkerMessage {
        kind: Some(worker_message::Kind::Hello(pb::Hello {
            worker_id: j.worker_id,
            incarnation: j.incarnation,
            credits: 1,
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

fn sync_up(params: &[distill_proto::params::Param], chunk_bytes: usize) -> Vec<WorkerMessage> {
    let groups =
        distill_proto::params::to_chunk_groups(params, distill_proto::DType::F32, chunk_bytes)
            .unwrap();
    let n = groups.len();
    groups
        .into_iter()
        .enumerate()
        .map(|(i, chunks)| WorkerMessage {
            kind: Some(worker_message::Kind::Sync(pb::SyncUp {
                base_version: 0,
                samples: 500,
                chunks,
                last: i + 1 == n,
                r#final: false,
            })),
        })
        .collect()
}

#[tokio::test]
async fn a_lone_contribution_is_kept_and_a_worker_joining_later_starts_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let mut cfg = config(dir.path(), vec![teacher(&shutdown).await]);
    cfg.sync.chunk_bytes = 4096; // several messages per parameter set
    let shapes = Arch::parse(&cfg.student.arch).unwrap().param_shapes();
    let run = coordinator::prepare(cfg).await.unwrap();
    let cl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let caddr = cl.local_addr().unwrap();
    tokio::spawn(coordinator::serve(run, cl, shutdown.clone()));
    let mut client = CoordinatorClient::connect(format!("http://{caddr}"))
        .await
        .unwrap();

    // Worker a: gets the seeded initial parameters (version 0) first, then a batch; it
    // contributes a parameter set in chunks; alone in the round, it is told to keep its own.
    let (a_tx, mut a_in) = open_stream(&mut client, "a").await;
    let init = distill_core::model::init_params(&Arch::parse("mlp:784-16-10").unwrap(), 1);
    let mut asm = distill_proto::params::ParamAssembler::new(shapes.clone());
    let first = loop {
        match a_in.message().await.unwrap().unwrap().kind {
            Some(pb::coordinator_message::Kind::Params(d)) => {
                assert_eq!(d.version, 0);
                for c in d.chunks {
                    asm.add(c).unwrap();
                }
            }
            other => break other,
        }
    };
    assert_eq!(asm.finish().unwrap(), init, "the seeded initial parameters");
    assert!(
        matches!(first, Some(pb::coordinator_message::Kind::Train(_))),
        "{first:?}"
    );
    let params: Vec<distill_proto::params::Param> = shapes
        .iter()
        .enumerate()
        .map(|(i, (n, s))| {
            (
                n.clone(),
                s.clone(),
                vec![i as f32 + 0.5; s.iter().product()],
            )
        })
        .collect();
    for m in sync_up(&params, 4096) {
        a_tx.send(m).await.unwrap();
    }
    let reply = loop {
        match a_in.message().await.unwrap().unwrap().kind {
            Some(pb::coordinator_message::Kind::Params(d)) => break d,
            Some(pb::coordinator_message::Kind::Train(_)) => continue,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(
        reply.unchanged && reply.last && reply.chunks.is_empty(),
        "{reply:?}"
    );
    assert_eq!((reply.version, reply.contributors), (1, 1));

    // Worker b joins mid-run: the first thing it gets is round 1's parameters, exactly.
    let (_b_tx, mut b_in) = open_stream(&mut client, "b").await;
    let mut asm = distill_proto::params::ParamAssembler::new(shapes.clone());
    let mut messages = 0;
    loop {
        match b_in.message().await.unwrap().unwrap().kind {
            Some(pb::coordinator_message::Kind::Params(d)) => {
                assert_eq!(d.version, 1);
                messages += 1;
                for c in d.chunks {
                    asm.add(c).unwrap();
                }
                if d.last {
                    break;
                }
            }
            other => panic!("a joining worker must get the average first, got {other:?}"),
        }
    }
    assert!(messages > 1, "chunked into {messages} message(s)");
    assert_eq!(asm.finish().unwrap(), params);
    let st = client
        .run_status(RunStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.sync_rounds, 1);

    // A malformed contribution (a parameter of the wrong shape) ends a's stream with
    // INVALID_ARGUMENT naming the parameter.
    let mut bad = params.clone();
    bad[0].1 = vec![1, bad[0].2.len()];
    for m in sync_up(&bad, 1 << 20) {
        let _ = a_tx.send(m).await;
    }
    let status = loop {
        match a_in.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without an error"),
            Err(s) => break s,
        }
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains(&shapes[0].0), "{status:?}");
    shutdown.cancel();
}

/// Runs `cfg` to the end with one real worker (work dir `work`); returns the report and the
/// final student's parameters.
async fn run_to_end(
    cfg: RunConfig,
    work: &std::path::Path,
    shutdown: &CancellationToken,
) -> (coordinator::RunReport, Vec<f32>) {
    let run = coordinator::prepare(cfg).await.unwrap();
    let cl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let caddr = cl.local_addr().unwrap();
    let stop = shutdown.child_token();
    let served = tokio::spawn(coordinator::serve(run, cl, stop.clone()));
    let worker = run_worker(caddr, work, &stop).await;
    let report = served.await.unwrap().unwrap().expect("the run completed");
    assert_eq!(report.student_test_errors, worker.test_errors);
    let ck = Checkpoint::read(&report.student_checkpoint).unwrap();
    (
        report,
        ck.params.into_iter().flat_map(|(_, _, v)| v).collect(),
    )
}

#[tokio::test]
async fn a_cached_run_asks_no_teacher_after_epoch_one_and_trains_the_same_student() {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let endpoints = vec![teacher(&shutdown).await];
    let cache = coordinator::cache::CacheConfig {
        dir: dir.path().join("cache"),
        mode: coordinator::cache::CacheMode::ReadWrite,
    };
    let base = |name: &str| {
        let mut c = config(&dir.path().join(name), endpoints.clone());
        c.epochs = 3;
        c
    };

    // With the cache: epoch 1 asks the teacher for every batch, later epochs never.
    let mut cfg = base("cached");
    cfg.cache = Some(cache.clone());
    let (cached, cached_student) = run_to_end(cfg, &dir.path().join("w1"), &shutdown).await;
    assert_eq!(cached.batches_trained, 3 * 24);
    assert_eq!(cached.teacher_batches_per_epoch, [24, 0, 0]);
    assert_eq!(cached.cached_batches_per_epoch, [0, 24, 24]);
    let c = cached.cache.as_ref().unwrap();
    assert_eq!((c.rows_written, c.hit_rows), (12_000, 24_000));

    // Without it: the same student, bit for bit (same seed, same soft targets).
    let (plain, plain_student) = run_to_end(base("plain"), &dir.path().join("w2"), &shutdown).await;
    assert!(plain.cache.is_none());
    assert_eq!(plain.teacher_batches_per_epoch, [24, 24, 24]);
    assert_eq!(cached_student, plain_student);

    // Offline, from the cache alone (no teachers at all): the same student again.
    let mut cfg = base("offline");
    cfg.members.clear();
    cfg.cache = Some(coordinator::cache::CacheConfig {
        mode: coordinator::cache::CacheMode::Offline,
        ..cache.clone()
    });
    let (offline, offline_student) = run_to_end(cfg, &dir.path().join("w3"), &shutdown).await;
    assert_eq!(offline.teacher_batches_per_epoch, [0, 0, 0]);
    assert!(offline.members.is_empty());
    assert_eq!(offline_student, plain_student);

    // Another temperature is another key: an offline run finds nothing and says so.
    let mut cfg = base("other-t");
    cfg.members.clear();
    cfg.temperature = 5.0;
    cfg.cache = Some(coordinator::cache::CacheConfig {
        mode: coordinator::cache::CacheMode::Offline,
        ..cache
    });
    let e = coordinator::prepare(cfg).await.err().unwrap().to_string();
    assert!(e.contains("holds no complete soft targets"), "{e}");
    shutdown.cancel();
}

#[tokio::test]
async fn top_k_soft_targets_travel_and_train() {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let mut cfg = config(dir.path(), vec![teacher(&shutdown).await]);
    cfg.soft_targets = "topk:3".parse().unwrap();
    cfg.epochs = 2;
    let (report, _) = run_to_end(cfg, &dir.path().join("w"), &shutdown).await;
    assert_eq!(report.batches_trained, 48);
    // Chance is 1800 errors of 2000; the teacher is random, the hard labels teach.
    assert!(
        report.student_test_errors < 1500,
        "{}",
        report.student_test_errors
    );
    let bad = "topk:11"
        .parse::<coordinator::config::SoftTargetEncoding>()
        .unwrap();
    let mut cfg = config(dir.path(), vec![teacher(&shutdown).await]);
    cfg.soft_targets = bad;
    let e = coordinator::prepare(cfg).await.err().unwrap().to_string();
    assert!(e.contains("soft_targets"), "{e}");
    shutdown.cancel();
}

#[tokio::test]
async fn under_degrade_a_member_that_is_down_is_left_out_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    // A port nobody listens on: member "gone" never answers.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut cfg = config(dir.path(), vec![teacher(&shutdown).await]);
    cfg.members.push(MemberConfig {
        name: "gone".into(),
        endpoints: vec![format!("http://{dead}")],
        weight: 3.0,
    });
    cfg.teacher_policy = coordinator::config::TeacherPolicy::Degrade;
    cfg.teacher_timeout_secs = 2.0;
    let (report, _) = run_to_end(cfg, &dir.path().join("w"), &shutdown).await;
    assert_eq!(report.batches_trained, 24);
    assert_eq!(
        report.degraded_batches, 24,
        "every batch lacked member `gone`"
    );
    let gone = report.members.iter().find(|m| m.member == "gone").unwrap();
    assert_eq!(gone.requests, 0);
    assert!(gone.failures >= 24, "{gone:?}");
    assert!(report.retries > 0);
    shutdown.cancel();
}

#[tokio::test]
async fn under_wait_the_run_pauses_for_a_member_that_is_down_and_resumes_when_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let late = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut cfg = config(dir.path(), vec![teacher(&shutdown).await]);
    cfg.members.push(MemberConfig {
        name: "late".into(),
        endpoints: vec![format!("http://{late}")],
        weight: 1.0,
    });
    cfg.teacher_timeout_secs = 2.0;
    let run = coordinator::prepare(cfg).await.unwrap();
    let cl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let caddr = cl.local_addr().unwrap();
    let served = tokio::spawn(coordinator::serve(run, cl, shutdown.clone()));
    let worker = {
        let (dir, shutdown) = (dir.path().to_path_buf(), shutdown.clone());
        tokio::spawn(async move { run_worker(caddr, &dir, &shutdown).await })
    };
    let mut client = CoordinatorClient::connect(format!("http://{caddr}"))
        .await
        .unwrap();
    // Wait (with a deadline) until the coordinator has found member `late` down.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let st = client
            .run_status(RunStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        let failures = st
            .members
            .iter()
            .find(|m| m.member == "late")
            .map_or(0, |m| m.failures);
        if failures >= 2 {
            assert_eq!(
                st.batches_trained, 0,
                "nothing trains while a member is down"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "member `late` never failed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // It comes up: the run resumes and completes with every member in every batch.
    teacher_at(&late.to_string(), &shutdown).await;
    worker.await.unwrap();
    let report = served.await.unwrap().unwrap().expect("the run completed");
    assert_eq!(report.batches_trained, 24);
    assert_eq!(report.degraded_batches, 0);
    let m = report.members.iter().find(|m| m.member == "late").unwrap();
    assert!(m.requests >= 24 && m.failures >= 2, "{m:?}");
    shutdown.cancel();
}

/// A run with a round after every update and student `arch`, built in this process with
/// `tweak` applied to its config; no teacher is asked (the tests drive the rounds directly).
fn run_with_rounds(
    dir: &std::path::Path,
    arch: &str,
    tweak: impl FnOnce(&mut RunConfig),
) -> (std::sync::Arc<coordinator::Run>, Arch) {
    let mut cfg = config(dir, vec!["http://127.0.0.1:1".into()]);
    cfg.sync.every = 1;
    cfg.student.arch = arch.into();
    tweak(&mut cfg);
    let data = distill_core::data::Dataset::load(&cfg.data).unwrap();
    (
        coordinator::Run::new(cfg, data).unwrap(),
        Arch::parse(arch).unwrap(),
    )
}

/// A contribution's header: 10 rows trained since round `base_version`.
fn header(base_version: u64) -> coordinator::run::ContributionHeader {
    coordinator::run::ContributionHeader {
        base_version,
        samples: 10,
        is_final: false,
        wire_bytes: 0,
    }
}

/// `RunStatus` polled while averaging rounds close must never deadlock: a closing round writes
/// the run state holding the ledger, the rounds and the statistics at once, and the status
/// reads the same locks (it once took the rounds while holding the statistics).
#[test]
fn run_status_while_rounds_close_does_not_deadlock() {
    let dir = tempfile::tempdir().unwrap();
    // Every round writes the run state.
    let (run, arch) = run_with_rounds(dir.path(), "mlp:784-4-10", |c| {
        c.sync.state_every_secs = 0.0
    });
    let w = run.join("w").unwrap();
    let (mut replies, _) = run.open_sync(&w).unwrap();
    let params = distill_core::model::init_params(&arch, 3);
    const ROUNDS: u64 = 400;
    let (tx, rx) = std::sync::mpsc::channel();
    let (r1, r2) = (run.clone(), run.clone());
    let poller = std::thread::spawn(move || {
        let mut polls = 0u64;
        while r2.status().unwrap().sync_rounds < ROUNDS {
            polls += 1;
        }
        polls
    });
    std::thread::spawn(move || {
        for v in 0..ROUNDS {
            r1.contribute(&w, header(v), params.clone()).unwrap();
            // A lone contributor's round closes at once and tells it to keep its parameters.
            let reply = replies.try_recv().unwrap();
            assert_eq!(reply.version, v + 1);
        }
        let _ = tx.send(poller.join().unwrap());
    });
    let polls = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("RunStatus and the closing rounds deadlocked");
    assert!(polls > 0);
    assert_eq!(run.status().unwrap().sync_rounds, ROUNDS);
}

/// `[sync] outer_lr` reaches the rounds: with two contributors the new parameters are the
/// previous ones plus `outer_lr` times the averaged change, and both workers receive them.
#[test]
fn the_outer_step_of_the_config_applies_to_rounds_with_several_contributors() {
    let dir = tempfile::tempdir().unwrap();
    let (run, arch) = run_with_rounds(dir.path(), "mlp:784-2-10", |c| c.sync.outer_lr = 3.0);
    let (w1, w2) = (run.join("a").unwrap(), run.join("b").unwrap());
    let (mut r1, _) = run.open_sync(&w1).unwrap();
    let (mut r2, _) = run.open_sync(&w2).unwrap();
    let shapes: Vec<(String, Vec<usize>)> = distill_core::model::init_params(&arch, 0)
        .into_iter()
        .map(|(n, s, _)| (n, s))
        .collect();
    // Every value of every parameter set to `x`.
    let filled = |x: f32| -> Vec<distill_proto::params::Param> {
        shapes
            .iter()
            .map(|(n, s)| (n.clone(), s.clone(), vec![x; s.iter().product()]))
            .collect()
    };
    let received = |rx: &mut tokio::sync::mpsc::UnboundedReceiver<coordinator::run::SyncReply>| {
        let reply = rx.try_recv().expect("a reply");
        let mut asm = distill_proto::params::ParamAssembler::new(shapes.clone());
        for group in reply.groups.expect("parameters").iter() {
            for chunk in group {
                asm.add(chunk.clone()).unwrap();
            }
        }
        let values: Vec<f32> = asm
            .finish()
            .unwrap()
            .into_iter()
            .flat_map(|(_, _, v)| v)
            .collect();
        (reply.version, values)
    };
    // Round 1 has no previous parameters: the plain average, 2.
    run.contribute(&w1, header(0), filled(1.0)).unwrap();
    run.contribute(&w2, header(0), filled(3.0)).unwrap();
    for rx in [&mut r1, &mut r2] {
        let (version, v) = received(rx);
        assert_eq!(version, 1);
        assert!(v.iter().all(|&x| x == 2.0));
    }
    // Round 2: average 2.5, change 0.5, three times that: 3.5.
    run.contribute(&w1, header(1), filled(2.0)).unwrap();
    run.contribute(&w2, header(1), filled(3.0)).unwrap();
    for rx in [&mut r1, &mut r2] {
        let (version, v) = received(rx);
        assert_eq!(version, 2);
        assert!(v.iter().all(|&x| x == 3.5), "{:?}", &v[..4]);
    }
}
