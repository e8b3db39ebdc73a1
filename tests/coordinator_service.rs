//! The Coordinator service in-process over loopback with a real teacher server: RunStatus,
//! Join, and the errors a misbehaving worker gets; then a real worker completes the run.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

/// Each test fails at this deadline instead of hanging the suite.
const TEST_DEADLINE: std::time::Duration = std::time::Duration::from_secs(300);

use std::time::Duration;

use coordinator::config::{MemberConfig, RunConfig, SoftTargetEncoding};
use distill_core::checkpoint::Checkpoint;
use distill_core::kd::Combine;
use distill_core::optim::OptimConfig;
use distill_core::spec::Arch;
use distill_proto::pb::coordinator_client::CoordinatorClient;
use distill_proto::pb::{self, JoinRequest, RunStatusRequest, WorkerMessage, worker_message};
use tokio_util::sync::CancellationToken;

/// Starts one teacher (random weights are enough: the run's mechanics are under test).
async fn teacher(shutdown: &CancellationToken) -> String {
    teacher_at("127.0.0.1:0", shutdown).await
}

/// [`teacher`] listening on `addr`.
async fn teacher_at(addr: &str, shutdown: &CancellationToken) -> String {
    let opts = teacher_server::ServeOptions {
        member: "t".into(),
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    common::serve_teacher_on(
        &common::random_checkpoint("mlp:784-16-10", 1),
        &opts,
        listener,
        shutdown,
    )
    .1
}

/// One epoch of 500-row batches of `synthetic:5`, f16 soft targets, the small student, one
/// member `t` at `endpoints`; run dir `dir/run`.
fn config(dir: &std::path::Path, endpoints: Vec<String>) -> RunConfig {
    let mut cfg = common::small_run(dir.join("run"));
    cfg.data = "synthetic:5".into();
    cfg.epochs = 1;
    cfg.batch_size = 500;
    cfg.seed = 1;
    cfg.temperature = 3.0;
    cfg.alpha = 0.5;
    cfg.combine = Combine::MeanProb;
    cfg.soft_targets = SoftTargetEncoding::F16;
    cfg.lease_timeout_secs = 60.0;
    cfg.prefetch = 2;
    cfg.teacher_timeout_secs = 10.0;
    cfg.hello_timeout_secs = 10.0;
    cfg.stall_timeout_secs = 120.0;
    cfg.student.arch = "mlp:784-16-10".into();
    cfg.optim = OptimConfig::adamw(1e-3, 0.0);
    cfg.members = vec![MemberConfig {
        endpoints,
        ..common::static_member("t", &[])
    }];
    cfg
}

/// A real student worker in this process, run to the end.
async fn run_worker(
    coordinator: std::net::SocketAddr,
    dir: &std::path::Path,
    shutdown: &CancellationToken,
) -> student_worker::WorkerReport {
    common::spawn_worker(coordinator, dir, shutdown)
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn status_join_and_bad_streams_then_a_worker_completes_the_run() {
    common::within(
        TEST_DEADLINE,
        "status_join_and_bad_streams_then_a_worker_completes_the_run",
        async move {
            let dir = tempfile::tempdir().unwrap();
            let shutdown = CancellationToken::new();
            let cfg = config(dir.path(), vec![teacher(&shutdown).await]);
            let (caddr, served) = common::serve_run(cfg, &shutdown).await;
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

            // Join hands out the settings and a session secret.
            let join = |id: &str, secret: &str| JoinRequest {
                worker_id: id.into(),
                resume_step: 0,
                session_secret: secret.into(),
            };
            let j = client.join(join("w", "")).await.unwrap().into_inner();
            assert_eq!((j.worker_id.as_str(), j.incarnation), ("w", 1));
            assert_eq!(j.session_secret.len(), 64, "256 bits in hex");
            let settings: distill_core::settings::StudentSettings =
                serde_json::from_str(&j.settings_json).unwrap();
            assert_eq!(settings.temperature, 3.0);
            assert_eq!(j.batches_per_epoch, 24);
            // Another process cannot take the id while incarnation 1 holds it, with no secret
            // or a guessed one; the process holding the secret joins again as incarnation 2.
            for guess in ["", "0000", &"0".repeat(64)] {
                let st = client.join(join("w", guess)).await.unwrap_err();
                assert_eq!(st.code(), tonic::Code::PermissionDenied, "{st:?}");
                assert!(st.message().contains("session secret"), "{st:?}");
            }
            let j2 = client
                .join(join("w", &j.session_secret))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(j2.incarnation, 2);
            assert_ne!(j2.session_secret, j.session_secret);

            // A stream from the replaced incarnation is fenced off; one without Hello, or
            // without the incarnation's secret, is refused.
            let hello = |inc: u64, credits: u32, secret: &str| WorkerMessage {
                kind: Some(worker_message::Kind::Hello(pb::Hello {
                    worker_id: "w".into(),
                    incarnation: inc,
                    credits,
                    session_secret: secret.into(),
                })),
            };
            let st = client
                .batches(tokio_stream::iter(vec![hello(1, 2, &j.session_secret)]))
                .await
                .unwrap_err();
            assert_eq!(st.code(), tonic::Code::FailedPrecondition, "{st:?}");
            for secret in ["", j.session_secret.as_str()] {
                let st = client
                    .batches(tokio_stream::iter(vec![hello(2, 2, secret)]))
                    .await
                    .unwrap_err();
                assert_eq!(st.code(), tonic::Code::PermissionDenied, "{st:?}");
            }
            let st = client
                .batches(tokio_stream::iter(vec![WorkerMessage {
                    kind: Some(worker_message::Kind::Credits(3)),
                }]))
                .await
                .unwrap_err();
            assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
            let st = client
                .batches(tokio_stream::iter(vec![hello(2, 0, &j2.session_secret)]))
                .await
                .unwrap_err();
            assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
            let unknown = WorkerMessage {
                kind: Some(worker_message::Kind::Hello(pb::Hello {
                    worker_id: "nobody".into(),
                    incarnation: 1,
                    credits: 1,
                    session_secret: String::new(),
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
        },
    )
    .await
}

#[tokio::test]
async fn a_failed_teacher_request_is_retried_on_another_replica() {
    common::within(
        TEST_DEADLINE,
        "a_failed_teacher_request_is_retried_on_another_replica",
        async move {
            let dir = tempfile::tempdir().unwrap();
            let shutdown = CancellationToken::new();
            // The first replica's port is reserved and nobody listens on it: every request sent
            // there is refused and must be retried on the live replica.
            let dead_port = common::reserve_port();
            let dead = format!("http://{}", dead_port.addr);
            let cfg = config(dir.path(), vec![dead, teacher(&shutdown).await]);
            let (caddr, served) = common::serve_run(cfg, &shutdown).await;
            run_worker(caddr, dir.path(), &shutdown).await;
            let report = served.await.unwrap().unwrap().expect("the run completed");
            assert_eq!(report.batches_trained, report.batches_expected);
            assert!(report.retries >= 1, "no retry recorded: {report:?}");
            assert!(report.members[0].failures >= 1);
            assert!(report.members[0].requests >= report.batches_expected);
            shutdown.cancel();
        },
    )
    .await
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
                gradients: false,
            })),
        })
        .collect()
}

#[tokio::test]
async fn a_lone_contribution_is_kept_and_a_worker_joining_later_starts_from_it() {
    common::within(
        TEST_DEADLINE,
        "a_lone_contribution_is_kept_and_a_worker_joining_later_starts_from_it",
        async move {
            let dir = tempfile::tempdir().unwrap();
            let shutdown = CancellationToken::new();
            let mut cfg = config(dir.path(), vec![teacher(&shutdown).await]);
            cfg.sync.chunk_bytes = 4096; // several messages per parameter set
            let shapes = Arch::parse(&cfg.student.arch).unwrap().param_shapes();
            let (caddr, _served) = common::serve_run(cfg, &shutdown).await;
            let mut client = CoordinatorClient::connect(format!("http://{caddr}"))
                .await
                .unwrap();

            // Worker a: gets the seeded initial parameters (version 0) first, then a batch; it
            // contributes a parameter set in chunks; alone in the round, it is told to keep its own.
            let (a_tx, mut a_in) = common::open_stream(&mut client, "a", 1).await;
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
            let (_b_tx, mut b_in) = common::open_stream(&mut client, "b", 1).await;
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
        },
    )
    .await
}

/// Runs `cfg` to the end with one real worker (work dir `work`); returns the report and the
/// final student's parameters.
async fn run_to_end(
    cfg: RunConfig,
    work: &std::path::Path,
    shutdown: &CancellationToken,
) -> (coordinator::RunReport, Vec<f32>) {
    let stop = shutdown.child_token();
    let (caddr, served) = common::serve_run(cfg, &stop).await;
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
    common::within(
        TEST_DEADLINE,
        "a_cached_run_asks_no_teacher_after_epoch_one_and_trains_the_same_student",
        async move {
            let dir = tempfile::tempdir().unwrap();
            let shutdown = CancellationToken::new();
            let endpoints = vec![teacher(&shutdown).await];
            let cache = coordinator::cache::CacheConfig {
                dir: dir.path().join("cache"),
                mode: coordinator::cache::CacheMode::ReadWrite,
                record: None,
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
            let (plain, plain_student) =
                run_to_end(base("plain"), &dir.path().join("w2"), &shutdown).await;
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
            let (offline, offline_student) =
                run_to_end(cfg, &dir.path().join("w3"), &shutdown).await;
            assert_eq!(offline.teacher_batches_per_epoch, [0, 0, 0]);
            assert!(offline.members.is_empty());
            assert_eq!(offline_student, plain_student);

            // Another temperature is served from the same member record, rescaled: still no
            // teacher, and another student (the soft targets changed with T).
            let mut cfg = base("other-t");
            cfg.members.clear();
            cfg.temperature = 5.0;
            cfg.cache = Some(coordinator::cache::CacheConfig {
                mode: coordinator::cache::CacheMode::Offline,
                ..cache.clone()
            });
            let (other_t, other_t_student) =
                run_to_end(cfg, &dir.path().join("w4"), &shutdown).await;
            assert_eq!(other_t.teacher_batches_per_epoch, [0, 0, 0]);
            assert_eq!(other_t.batches_trained, 3 * 24);
            assert_ne!(other_t_student, plain_student);

            // An empty cache has nothing to serve: an offline run says so before it starts.
            let mut cfg = base("empty");
            cfg.members.clear();
            let empty = dir.path().join("empty-cache");
            drop(coordinator::cache::SoftTargetCache::open(&empty).unwrap());
            cfg.cache = Some(coordinator::cache::CacheConfig {
                dir: empty,
                mode: coordinator::cache::CacheMode::Offline,
                record: None,
            });
            let e = coordinator::prepare(cfg).await.err().unwrap().to_string();
            assert!(e.contains("holds no complete soft targets"), "{e}");
            shutdown.cancel();
        },
    )
    .await
}

#[tokio::test]
async fn top_k_soft_targets_travel_and_train() {
    common::within(
        TEST_DEADLINE,
        "top_k_soft_targets_travel_and_train",
        async move {
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
        },
    )
    .await
}

#[tokio::test]
async fn under_degrade_a_member_that_is_down_is_left_out_and_counted() {
    common::within(
        TEST_DEADLINE,
        "under_degrade_a_member_that_is_down_is_left_out_and_counted",
        async move {
            let dir = tempfile::tempdir().unwrap();
            let shutdown = CancellationToken::new();
            // A reserved port nobody listens on: member "gone" never answers.
            let dead_port = common::reserve_port();
            let dead = dead_port.addr;
            let mut cfg = config(dir.path(), vec![teacher(&shutdown).await]);
            cfg.members.push(MemberConfig {
                name: "gone".into(),
                endpoints: vec![format!("http://{dead}")],
                weight: 3.0,
                ..Default::default()
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
        },
    )
    .await
}

#[tokio::test]
async fn under_wait_the_run_pauses_for_a_member_that_is_down_and_resumes_when_it_is_back() {
    common::within(
        TEST_DEADLINE,
        "under_wait_the_run_pauses_for_a_member_that_is_down_and_resumes_when_it_is_back",
        async move {
            let dir = tempfile::tempdir().unwrap();
            let shutdown = CancellationToken::new();
            // Reserved for the whole test: member `late` comes up on it later, and nothing else can
            // take it meanwhile.
            let late_port = common::reserve_port();
            let late = late_port.addr;
            let mut cfg = config(dir.path(), vec![teacher(&shutdown).await]);
            cfg.members.push(MemberConfig {
                name: "late".into(),
                endpoints: vec![format!("http://{late}")],
                weight: 1.0,
                ..Default::default()
            });
            cfg.teacher_timeout_secs = 2.0;
            let (caddr, served) = common::serve_run(cfg, &shutdown).await;
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
        },
    )
    .await
}

/// A run with a round after every update and student `arch`, served in this process with
/// `tweak` applied to its config; its one teacher never answers (the tests drive the rounds by
/// hand over the wire, and no batch is ever ready).
async fn serve_with_rounds(
    dir: &std::path::Path,
    arch: &str,
    tweak: impl FnOnce(&mut RunConfig),
    shutdown: &CancellationToken,
) -> (CoordinatorClient<tonic::transport::Channel>, Arch) {
    let mut cfg = config(dir, vec!["http://127.0.0.1:1".into()]);
    cfg.sync.every = 1;
    cfg.student.arch = arch.into();
    tweak(&mut cfg);
    let (caddr, _served) = common::serve_run(cfg, shutdown).await;
    let client = CoordinatorClient::connect(format!("http://{caddr}"))
        .await
        .unwrap();
    (client, Arch::parse(arch).unwrap())
}

/// A worker driven by hand: its batch stream, and what it sends and reads.
struct HandWorker {
    up: tokio::sync::mpsc::Sender<WorkerMessage>,
    down: tonic::Streaming<pb::CoordinatorMessage>,
    shapes: Vec<(String, Vec<usize>)>,
}

impl HandWorker {
    async fn join(
        client: &mut CoordinatorClient<tonic::transport::Channel>,
        id: &str,
        arch: &Arch,
    ) -> Self {
        let (up, down) = common::open_stream(client, id, 1).await;
        let shapes = distill_core::model::init_params(arch, 0)
            .into_iter()
            .map(|(n, s, _)| (n, s))
            .collect();
        let mut w = Self { up, down, shapes };
        // Every stream of a run with rounds starts from the run's parameters.
        assert_eq!(w.params().await.0, 0);
        w
    }

    /// Every parameter set to `x`.
    fn filled(&self, x: f32) -> Vec<distill_proto::params::Param> {
        self.shapes
            .iter()
            .map(|(n, s)| (n.clone(), s.clone(), vec![x; s.iter().product()]))
            .collect()
    }

    /// Sends a contribution of every parameter at `x` on top of round `base`, claiming
    /// `samples` rows.
    async fn contribute(&self, base: u64, x: f32, samples: u64) {
        let groups = distill_proto::params::to_chunk_groups(
            &self.filled(x),
            distill_proto::DType::F32,
            1 << 20,
        )
        .unwrap();
        let n = groups.len();
        for (i, chunks) in groups.into_iter().enumerate() {
            self.up
                .send(WorkerMessage {
                    kind: Some(worker_message::Kind::Sync(pb::SyncUp {
                        base_version: base,
                        samples,
                        chunks,
                        last: i + 1 == n,
                        r#final: false,
                        gradients: false,
                    })),
                })
                .await
                .unwrap();
        }
    }

    /// The next parameters the coordinator sends: their version and values.
    async fn params(&mut self) -> (u64, Vec<f32>) {
        let mut asm = distill_proto::params::ParamAssembler::new(self.shapes.clone());
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(30), self.down.message())
                .await
                .expect("parameters within 30 s")
                .unwrap()
                .expect("the stream is open");
            if let Some(pb::coordinator_message::Kind::Params(d)) = msg.kind {
                if d.unchanged {
                    return (d.version, Vec::new());
                }
                for c in d.chunks {
                    asm.add(c).unwrap();
                }
                if d.last {
                    let values = asm
                        .finish()
                        .unwrap()
                        .into_iter()
                        .flat_map(|(_, _, v)| v)
                        .collect();
                    return (d.version, values);
                }
            }
        }
    }
}

/// `RunStatus` polled while averaging rounds close must always answer: a closing round writes
/// the run state, and the status reads the same state (it once deadlocked against it).
#[tokio::test]
async fn run_status_while_rounds_close_always_answers() {
    common::within(
        TEST_DEADLINE,
        "run_status_while_rounds_close_always_answers",
        async move {
            let dir = tempfile::tempdir().unwrap();
            let shutdown = CancellationToken::new();
            // Every round writes the run state.
            let (mut client, arch) = serve_with_rounds(
                dir.path(),
                "mlp:784-4-10",
                |c| c.sync.state_every_secs = 0.0,
                &shutdown,
            )
            .await;
            let mut w = HandWorker::join(&mut client, "w", &arch).await;
            const ROUNDS: u64 = 200;
            let mut poller = client.clone();
            let polls = tokio::spawn(async move {
                let mut polls = 0u64;
                loop {
                    let st = tokio::time::timeout(
                        Duration::from_secs(10),
                        poller.run_status(RunStatusRequest {}),
                    )
                    .await
                    .expect("RunStatus answered within 10 s while rounds close")
                    .unwrap()
                    .into_inner();
                    polls += 1;
                    if st.sync_rounds >= ROUNDS {
                        return polls;
                    }
                }
            });
            for v in 0..ROUNDS {
                w.contribute(v, 1.0, 10).await;
                // A lone contributor's round closes at once and tells it to keep its parameters.
                let (version, values) = w.params().await;
                assert_eq!(version, v + 1);
                assert!(values.is_empty() || values.iter().all(|&x| x == 1.0));
            }
            let polls = tokio::time::timeout(Duration::from_secs(60), polls)
                .await
                .expect("the poller saw every round")
                .unwrap();
            assert!(polls > 0);
            shutdown.cancel();
        },
    )
    .await
}

/// `[sync] outer_lr` reaches the rounds: with two contributors the new parameters are the
/// previous ones plus `outer_lr` times the averaged change, and both workers receive them. The
/// rows the workers claim (1 and 1000) are not their weights: neither trained a batch, so the
/// rounds are plain means.
#[tokio::test]
async fn the_outer_step_of_the_config_applies_to_rounds_with_several_contributors() {
    common::within(
        TEST_DEADLINE,
        "the_outer_step_of_the_config_applies_to_rounds_with_several_contributors",
        async move {
            let dir = tempfile::tempdir().unwrap();
            let shutdown = CancellationToken::new();
            let (mut client, arch) = serve_with_rounds(
                dir.path(),
                "mlp:784-2-10",
                |c| {
                    c.sync.outer_lr = 3.0;
                    c.min_workers = 2;
                },
                &shutdown,
            )
            .await;
            let mut w1 = HandWorker::join(&mut client, "a", &arch).await;
            let mut w2 = HandWorker::join(&mut client, "b", &arch).await;
            // Round 1 has no previous parameters: the plain average, 2.
            w1.contribute(0, 1.0, 1).await;
            w2.contribute(0, 3.0, 1000).await;
            for w in [&mut w1, &mut w2] {
                let (version, v) = w.params().await;
                assert_eq!(version, 1);
                assert!(v.iter().all(|&x| x == 2.0), "{:?}", &v[..4]);
            }
            // Round 2: average 2.5, change 0.5, three times that: 3.5.
            w1.contribute(1, 2.0, 1).await;
            w2.contribute(1, 3.0, 1000).await;
            for w in [&mut w1, &mut w2] {
                let (version, v) = w.params().await;
                assert_eq!(version, 2);
                assert!(v.iter().all(|&x| x == 3.5), "{:?}", &v[..4]);
            }
            shutdown.cancel();
        },
    )
    .await
}

/// A batch that cannot be prepared (here the teacher refuses every 500-row request: it takes
/// at most 100 rows) ends the run with an error naming the batch and the cause. It used to
/// keep the worker's credit, so after `prefetch` refusals the run stalled for ever.
#[tokio::test]
async fn a_batch_that_keeps_failing_ends_the_run_with_an_error_instead_of_stalling_it() {
    common::within(
        TEST_DEADLINE,
        "a_batch_that_keeps_failing_ends_the_run_with_an_error_instead_of_stalling_it",
        async move {
            let dir = tempfile::tempdir().unwrap();
            let shutdown = CancellationToken::new();
            let opts = teacher_server::ServeOptions {
                member: "t".into(),
                max_batch: 100,
                ..Default::default()
            };
            let ck = common::random_checkpoint("mlp:784-16-10", 1);
            let (_, url) = common::serve_teacher(&ck, &opts, &shutdown).await;
            let cfg = config(dir.path(), vec![url]);
            let (caddr, served) = common::serve_run(cfg, &shutdown).await;
            let worker_stop = CancellationToken::new();
            let worker = common::spawn_worker(caddr, dir.path(), &worker_stop);
            let err = tokio::time::timeout(Duration::from_secs(120), served)
                .await
                .expect("the run ended instead of stalling")
                .unwrap()
                .expect_err("the run failed");
            let msg = err.to_string();
            assert!(
                msg.contains("could not be prepared") && msg.contains("epoch 0 batch"),
                "{msg}"
            );
            assert!(msg.contains("refused"), "{msg}");
            worker_stop.cancel();
            let _ = worker.await;
            shutdown.cancel();
        },
    )
    .await
}

/// Two coordinators on one run directory: the second is refused before it writes anything
/// (runs without rounds used to take no lock at all, and the config was overwritten first).
#[tokio::test]
async fn a_second_coordinator_on_the_same_run_directory_is_refused() {
    common::within(
        TEST_DEADLINE,
        "a_second_coordinator_on_the_same_run_directory_is_refused",
        async move {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = config(dir.path(), vec!["http://127.0.0.1:1".into()]);
            cfg.sync.every = 0;
            let first = coordinator::prepare(cfg.clone()).await.unwrap();
            let written = std::fs::read_to_string(dir.path().join("run/config.toml")).unwrap();
            let mut other = cfg.clone();
            other.seed = 99;
            let e = coordinator::prepare(other).await.err().unwrap().to_string();
            assert!(e.contains("in use by another coordinator"), "{e}");
            assert_eq!(
                std::fs::read_to_string(dir.path().join("run/config.toml")).unwrap(),
                written,
                "the refused coordinator wrote nothing"
            );
            drop(first);
            coordinator::prepare(cfg).await.unwrap();
        },
    )
    .await
}

/// A stream that never says `Hello` is closed with DEADLINE_EXCEEDED (it used to wait for
/// ever).
#[tokio::test]
async fn a_stream_without_hello_is_closed_at_its_deadline() {
    common::within(
        TEST_DEADLINE,
        "a_stream_without_hello_is_closed_at_its_deadline",
        async move {
            let dir = tempfile::tempdir().unwrap();
            let shutdown = CancellationToken::new();
            let mut cfg = config(dir.path(), vec!["http://127.0.0.1:1".into()]);
            cfg.hello_timeout_secs = 0.2;
            let (caddr, _served) = common::serve_run(cfg, &shutdown).await;
            let mut client = CoordinatorClient::connect(format!("http://{caddr}"))
                .await
                .unwrap();
            let (_tx, rx) = tokio::sync::mpsc::channel::<WorkerMessage>(1);
            let st = tokio::time::timeout(
                Duration::from_secs(30),
                client.batches(tokio_stream::wrappers::ReceiverStream::new(rx)),
            )
            .await
            .expect("an answer within 30 s")
            .unwrap_err();
            assert_eq!(st.code(), tonic::Code::DeadlineExceeded, "{st:?}");
            shutdown.cancel();
        },
    )
    .await
}

/// A report that cannot be written (here `report.json` is a directory) ends the run with an
/// error naming the file, and the stored state stays for a resume (a failed finish used to
/// leave a single-worker run hanging).
#[tokio::test]
async fn a_report_that_cannot_be_written_fails_the_run_and_names_the_file() {
    common::within(
        TEST_DEADLINE,
        "a_report_that_cannot_be_written_fails_the_run_and_names_the_file",
        async move {
            let dir = tempfile::tempdir().unwrap();
            let shutdown = CancellationToken::new();
            let mut cfg = config(dir.path(), vec![teacher(&shutdown).await]);
            cfg.batch_size = 1000;
            std::fs::create_dir_all(cfg.run_dir.join("report.json/blocked")).unwrap();
            let (caddr, served) = common::serve_run(cfg, &shutdown).await;
            let worker_stop = CancellationToken::new();
            let worker = common::spawn_worker(caddr, dir.path(), &worker_stop);
            let err = tokio::time::timeout(Duration::from_secs(120), served)
                .await
                .expect("the run ended instead of hanging")
                .unwrap()
                .expect_err("the run failed")
                .to_string();
            assert!(err.contains("report.json"), "{err}");
            assert!(dir.path().join("run/state.redb").exists());
            worker_stop.cancel();
            let _ = worker.await;
            shutdown.cancel();
        },
    )
    .await
}

/// A distributed run visits the batches in the order local training does for the same seed:
/// every `TrainBatch` of a one-worker run carries exactly the rows of the same batch of
/// `distill_core::data::shuffled_indices` (the order `distill train` uses), epoch after epoch.
#[tokio::test]
async fn a_run_visits_batches_in_the_order_local_training_does() {
    common::within(
        TEST_DEADLINE,
        "a_run_visits_batches_in_the_order_local_training_does",
        async move {
            let dir = tempfile::tempdir().unwrap();
            let shutdown = CancellationToken::new();
            let mut cfg = config(dir.path(), vec![teacher(&shutdown).await]);
            cfg.epochs = 2;
            cfg.batch_size = 1000;
            cfg.sync.every = 0;
            let (seed, bs) = (cfg.seed, cfg.batch_size);
            let data = distill_core::data::Dataset::load(&cfg.data).unwrap();
            let (caddr, _served) = common::serve_run(cfg, &shutdown).await;
            let mut client = CoordinatorClient::connect(format!("http://{caddr}"))
                .await
                .unwrap();
            let (tx, mut down) = common::open_stream(&mut client, "w", 1).await;
            let n = data.train.len();
            let per_epoch = n.div_ceil(bs);
            let mut seen = 0;
            while seen < 2 * per_epoch {
                let msg = tokio::time::timeout(Duration::from_secs(60), down.message())
                    .await
                    .expect("a batch within 60 s")
                    .unwrap()
                    .expect("the stream is open");
                let Some(pb::coordinator_message::Kind::Train(b)) = msg.kind else {
                    continue;
                };
                let order = distill_core::data::shuffled_indices(n, seed, u64::from(b.epoch));
                let i = b.index as usize;
                let idx = &order[i * bs..((i + 1) * bs).min(n)];
                let inputs = b.inputs.unwrap();
                assert_eq!(
                    inputs.data,
                    data.train.rows_u8(idx).unwrap(),
                    "epoch {} batch {i}: the run's rows are local training's",
                    b.epoch
                );
                assert_eq!(
                    (b.epoch as usize, i),
                    (seen / per_epoch, seen % per_epoch),
                    "batches come in index order"
                );
                seen += 1;
                tx.send(WorkerMessage {
                    kind: Some(worker_message::Kind::Ack(pb::Ack {
                        lease_id: b.lease_id,
                        ..Default::default()
                    })),
                })
                .await
                .unwrap();
            }
            shutdown.cancel();
        },
    )
    .await
}
