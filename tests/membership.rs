//! Elastic teacher membership over real gRPC: the coordinator's `Registry` service in-process on
//! 127.0.0.1:0 and the teacher server's registration task (`teacher-server --register`). The
//! first three tests need no teacher model (the task only states the model's identity); the
//! last runs a whole distillation with a registered teacher server.
//!
//! - `registers_heartbeats_and_expires_at_the_ttl_after_a_crash`: it registers (an unspecified
//!   advertised host becomes the caller's), heartbeats renew the lease and report the load; the
//!   task killed without deregistering, the lease ends exactly at its deadline.
//! - `a_clean_shutdown_deregisters`: cancelling the token removes the replica at once.
//! - `an_expired_lease_or_a_restarted_coordinator_makes_it_register_again`: the lease expired
//!   while the replica lives → it registers again; the coordinator stopped (unreachable) and
//!   started again on the same port knowing nobody → it registers with the new one.
//!
//! - `a_registered_replica_serves_a_member_without_static_endpoints`: a run whose member `b`
//!   has no static endpoint; a teacher server registers as `b` with the coordinator's Registry
//!   and a real student worker completes the run with `b`'s soft targets.
//!
//! Waits are on conditions with deadlines (watch channels, or polling the membership), never a
//! bare sleep.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

/// Each test fails at this deadline instead of hanging the suite.
const TEST_DEADLINE: std::time::Duration = std::time::Duration::from_secs(300);

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator::domain::membership::{
    Event, Health, Membership, MembershipConfig, RemovalReason, ReplicaView,
};
use coordinator::membership::MembershipHandle;
use coordinator::registry::{self, RegistryService};
use distill_proto::pb::registry_server::RegistryServer;
use teacher_server::ModelInfo;
use teacher_server::register::{self, RegisterOptions, Registrar, RegistrationState};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

/// Longest wait for anything in these tests.
const DEADLINE: Duration = Duration::from_secs(20);
/// What the replica advertises: its listen address, with an unspecified host.
const ADVERTISED: &str = "http://0.0.0.0:50777";
/// What the coordinator makes of it: the caller's host.
const RESOLVED: &str = "http://127.0.0.1:50777";

fn membership_config() -> MembershipConfig {
    MembershipConfig {
        lease_ttl: Duration::from_secs(5),
        heartbeat_interval: Duration::from_millis(30),
        ..MembershipConfig::default()
    }
}

struct Coordinator {
    addr: SocketAddr,
    svc: RegistryService,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Coordinator {
    async fn start(listener: TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let m = Membership::new(
            membership_config(),
            [("big".to_string(), Vec::<String>::new())],
        )
        .unwrap();
        let svc = RegistryService::new(MembershipHandle::new(m));
        let stop = CancellationToken::new();
        let server = tonic::transport::Server::builder()
            .add_service(RegistryServer::new(svc.clone()))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            );
        let task = tokio::spawn(async move {
            server.await.unwrap();
        });
        Self {
            addr,
            svc,
            stop,
            task,
        }
    }

    /// Stops serving: the listener closes and every connection is shut down (GOAWAY).
    async fn stop(self) -> SocketAddr {
        self.stop.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("the registry server did not stop")
            .unwrap();
        self.addr
    }

    fn replicas(&self) -> Vec<ReplicaView> {
        self.svc.membership().lock().unwrap().replicas("big")
    }

    /// Waits until `cond` holds for the replicas of member `big`.
    async fn wait_until(&self, what: &str, cond: impl Fn(&[ReplicaView]) -> bool) {
        let changed = self.svc.changed();
        let started = tokio::time::Instant::now();
        loop {
            // Registered before checking, so a change in between is not missed; heartbeats that
            // only renew a lease notify nobody, hence also the short re-check period.
            let notified = changed.notified();
            if cond(&self.replicas()) {
                return;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "timed out waiting until {what}; replicas: {:?}",
                self.replicas()
            );
            let _ = tokio::time::timeout(Duration::from_millis(20), notified).await;
        }
    }
}

fn info() -> ModelInfo {
    ModelInfo {
        model_id: "mlp:784-10@0123456789abcdef".into(),
        member: "big".into(),
        input_shape: vec![784],
        classes: 10,
        digest: "0123456789abcdef".repeat(4),
        arch: "mlp:784-10".into(),
        max_batch: 256,
        ..Default::default()
    }
}

fn start_registrar(coordinator: SocketAddr, shutdown: &CancellationToken) -> Registrar {
    let mut opts = RegisterOptions::new(
        format!("http://{coordinator}"),
        ADVERTISED.into(),
        info(),
        64,
    );
    opts.backoff_initial = Duration::from_millis(20);
    opts.backoff_max = Duration::from_millis(200);
    opts.rpc_timeout = Duration::from_secs(2);
    register::spawn(opts, Arc::new(|| 5), shutdown.clone()).unwrap()
}

/// Waits until the registration task is registered with an id `pred` accepts; returns the id.
async fn registered(r: &mut Registrar, pred: impl Fn(u64) -> bool) -> u64 {
    let state = tokio::time::timeout(
        DEADLINE,
        r.state.wait_for(|s| {
            matches!(s, RegistrationState::Registered { replica_id, address }
                if pred(*replica_id) && address == RESOLVED)
        }),
    )
    .await
    .expect("timed out waiting for the registration")
    .expect("the registration task ended")
    .clone();
    match state {
        RegistrationState::Registered { replica_id, .. } => replica_id,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn registers_heartbeats_and_expires_at_the_ttl_after_a_crash() {
    common::within(
        TEST_DEADLINE,
        "registers_heartbeats_and_expires_at_the_ttl_after_a_crash",
        async move {
            let coord = Coordinator::start(TcpListener::bind("127.0.0.1:0").await.unwrap()).await;
            let shutdown = CancellationToken::new();
            let mut reg = start_registrar(coord.addr, &shutdown);
            let id = registered(&mut reg, |_| true).await;

            let first = coord.replicas();
            assert_eq!(first.len(), 1);
            assert_eq!(first[0].id, id);
            assert_eq!(first[0].address, RESOLVED);
            assert_eq!(first[0].health, Health::InRotation);
            assert_eq!(
                first[0].identity.as_ref().map(|i| i.weights_digest.clone()),
                Some(info().digest)
            );
            assert!(coord.svc.membership().lock().unwrap().is_up("big"));

            // Heartbeats renew the lease and carry the load.
            let deadline0 = first[0].lease_deadline.unwrap();
            coord
                .wait_until("a heartbeat renewed the lease", |r| {
                    r.len() == 1
                        && r[0].lease_deadline.is_some_and(|d| d > deadline0)
                        && r[0].in_flight == Some(5)
                        && r[0].max_in_flight == 64
                })
                .await;

            // The replica dies without deregistering.
            reg.task.abort();
            let _ = reg.task.await;

            // Its lease ends exactly at its deadline (checked under one lock, so no heartbeat can slip
            // in between).
            {
                let mut m = coord.svc.membership().lock().unwrap();
                let deadline = m.replica(id).unwrap().lease_deadline.unwrap();
                assert!(m.tick(deadline - Duration::from_millis(1)).is_empty());
                let events = m.tick(deadline);
                assert_eq!(
                    events,
                    vec![
                        Event::Removed {
                            member: "big".into(),
                            replica: id,
                            address: RESOLVED.into(),
                            reason: RemovalReason::Expired,
                        },
                        Event::MemberDown {
                            member: "big".into()
                        },
                    ]
                );
                assert!(m.replicas("big").is_empty());
            }
            coord.stop().await;
        },
    )
    .await
}

#[tokio::test]
async fn a_clean_shutdown_deregisters() {
    common::within(TEST_DEADLINE, "a_clean_shutdown_deregisters", async move {
        let coord = Coordinator::start(TcpListener::bind("127.0.0.1:0").await.unwrap()).await;
        let shutdown = CancellationToken::new();
        let mut reg = start_registrar(coord.addr, &shutdown);
        registered(&mut reg, |_| true).await;
        assert_eq!(coord.replicas().len(), 1);

        shutdown.cancel();
        tokio::time::timeout(DEADLINE, reg.task)
            .await
            .expect("the registration task did not stop")
            .unwrap();
        assert_eq!(*reg.state.borrow(), RegistrationState::Stopped);
        // Deregistered before the task ended: no wait for the lease.
        assert!(coord.replicas().is_empty());
        assert!(!coord.svc.membership().lock().unwrap().is_up("big"));
        coord.stop().await;
    })
    .await
}

#[tokio::test]
async fn an_expired_lease_or_a_restarted_coordinator_makes_it_register_again() {
    common::within(
        TEST_DEADLINE,
        "an_expired_lease_or_a_restarted_coordinator_makes_it_register_again",
        async move {
            let coord = Coordinator::start(TcpListener::bind("127.0.0.1:0").await.unwrap()).await;
            let shutdown = CancellationToken::new();
            let mut reg = start_registrar(coord.addr, &shutdown);
            let first = registered(&mut reg, |_| true).await;

            // The lease expires (say the replica was partitioned away): its next heartbeat is told so
            // and it registers again, as a new replica.
            let events = registry::tick(
                &coord.svc,
                Instant::now() + membership_config().lease_ttl + Duration::from_secs(1),
            );
            assert!(
                events.iter().any(|e| matches!(
                    e,
                    Event::Removed {
                        reason: RemovalReason::Expired,
                        ..
                    }
                )),
                "{events:?}"
            );
            let second = registered(&mut reg, |id| id != first).await;
            coord
                .wait_until("the replica registered again", |r| {
                    r.len() == 1 && r[0].id == second
                })
                .await;

            // The coordinator goes away and comes back on the same address, knowing nobody: the
            // heartbeats fail meanwhile, then the new coordinator says the id is unknown.
            let addr = coord.stop().await;
            let coord = Coordinator::start(TcpListener::bind(addr).await.unwrap()).await;
            coord
                .wait_until(
                    "the replica registered with the restarted coordinator",
                    |r| r.len() == 1 && r[0].address == RESOLVED,
                )
                .await;
            // A new coordinator hands out ids from 1 again.
            let third = registered(&mut reg, |id| id == 1).await;
            assert_eq!(coord.replicas()[0].id, third);

            shutdown.cancel();
            tokio::time::timeout(DEADLINE, reg.task)
                .await
                .expect("the registration task did not stop")
                .unwrap();
            assert!(coord.replicas().is_empty());
            coord.stop().await;
        },
    )
    .await
}

/// A teacher server for member `member` in this process on 127.0.0.1:0 (random weights: the
/// run's mechanics are under test); returns its service (for its identity and load) and address.
async fn teacher(
    member: &str,
    seed: u64,
    shutdown: &CancellationToken,
) -> (teacher_server::TeacherService, SocketAddr) {
    let opts = teacher_server::ServeOptions {
        member: member.into(),
        ..Default::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ck = common::random_checkpoint("mlp:784-16-10", seed);
    let (svc, _) = common::serve_teacher_on(&ck, &opts, listener, shutdown);
    (svc, addr)
}

/// The whole path: a run whose member `b` has no static endpoint; a teacher server registers
/// as `b` with the coordinator's Registry (served next to the Coordinator service), the pool
/// sends it requests at once, and a real student worker completes the run.
#[tokio::test]
async fn a_registered_replica_serves_a_member_without_static_endpoints() {
    common::within(TEST_DEADLINE, "a_registered_replica_serves_a_member_without_static_endpoints", async move {
        let dir = tempfile::tempdir().unwrap();
        let shutdown = CancellationToken::new();
        let (_, a_addr) = teacher("a", 1, &shutdown).await;
        let (b_svc, b_addr) = teacher("b", 2, &shutdown).await;
        let toml = format!(
            r#"
    data = "synthetic:5"
    epochs = 1
    batch_size = 500
    seed = 1
    temperature = 3.0
    alpha = 0.5
    soft_targets = "f16"
    prefetch = 2
    teacher_timeout_secs = 10.0
    [student]
    arch = "mlp:784-16-10"
    [optim]
    kind = "adamw"
    lr = 0.001
    [[members]]
    name = "a"
    endpoints = ["http://{a_addr}"]
    [[members]]
    name = "b"
    [membership]
    lease_ttl_secs = 5.0
    heartbeat_secs = 0.1
    "#
        );
        let mut cfg = coordinator::RunConfig::from_toml(&toml).unwrap();
        assert!(cfg.members[1].endpoints.is_empty());
        cfg.run_dir = dir.path().join("run");
        let run = coordinator::prepare(cfg).await.unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let caddr = listener.local_addr().unwrap();
        let served = tokio::spawn(coordinator::serve(run, listener, shutdown.clone()));

        // `b` registers with the coordinator's address (the same port as the Coordinator service).
        let mut opts = RegisterOptions::new(
            format!("http://{caddr}"),
            format!("http://{b_addr}"),
            b_svc.info().clone(),
            64,
        );
        opts.backoff_initial = Duration::from_millis(20);
        opts.backoff_max = Duration::from_millis(200);
        let view = b_svc.clone();
        let in_flight = Arc::new(move || u32::try_from(view.inflight()).unwrap_or(u32::MAX));
        let registration_stop = CancellationToken::new();
        let mut reg = register::spawn(opts, in_flight, registration_stop.clone()).unwrap();
        let expected = format!("http://{b_addr}");
        tokio::time::timeout(
            DEADLINE,
            reg.state.wait_for(
                |s| matches!(s, RegistrationState::Registered { address, .. } if *address == expected),
            ),
        )
        .await
        .expect("timed out waiting for the registration")
        .expect("the registration task ended");

        let worker = tokio::time::timeout(
            Duration::from_secs(300),
            student_worker::run(
                student_worker::WorkerConfig {
                    coordinator: format!("http://{caddr}"),
                    work_dir: dir.path().join("worker"),
                    connect_timeout: Duration::from_secs(10),
                    ..Default::default()
                },
                shutdown.clone(),
            ),
        )
        .await
        .expect("the run did not complete in time")
        .unwrap();
        let report = tokio::time::timeout(DEADLINE, served)
            .await
            .expect("the coordinator did not stop")
            .unwrap()
            .unwrap()
            .expect("the run completed");
        assert_eq!(report.student_test_errors, worker.test_errors);
        assert_eq!(report.batches_trained, report.batches_expected);
        assert_eq!(report.batches_trained, 24);
        assert_eq!(report.degraded_batches, 0);
        let stats = |name: &str| {
            report
                .members
                .iter()
                .find(|m| m.member == name)
                .unwrap_or_else(|| panic!("no stats of member {name}: {:?}", report.members))
                .clone()
        };
        // Every batch asked both members (and the teacher evaluation asked them for the test split).
        assert!(stats("a").requests >= 24, "{:?}", report.members);
        assert!(stats("b").requests >= 24, "{:?}", report.members);
        assert!(
            report.teachers.iter().any(|t| t.member == "b"),
            "{:?}",
            report.teachers
        );

        // The coordinator is gone: the registration task gives up its lease and stops.
        registration_stop.cancel();
        tokio::time::timeout(DEADLINE, reg.task)
            .await
            .expect("the registration task did not stop")
            .unwrap();
        shutdown.cancel();
    })
    .await
}
