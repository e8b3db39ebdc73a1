//! The coordinator's teacher pool against replicas that misbehave, each next to a real teacher
//! server replica of the same member, all over gRPC on loopback. The misbehaving replicas are
//! a small `distill.v1.Teacher` implementation in this file: a hostile third party, not our
//! server. What must hold:
//!
//! - A reply with non-finite values or another shape than `[rows, classes]` is never returned:
//!   the request is answered by the good replica, and the bad one counts as failing and leaves
//!   rotation after `failure_threshold` such replies.
//! - A replica that refuses (`INVALID_ARGUMENT`) requests the good replica accepts is failing in
//!   the same way; only a request every replica in rotation refuses is `TeacherRejected`.
//! - A request tries a bounded number of replicas however many are in rotation.
//! - A replica out of rotation for bad replies is not put back by a probe while its replies
//!   stay bad (a good `Describe` is not enough).
//! - A `Describe` whose input shape overflows is an error, not a panic.
//! - A registration that claims the member's identity but answers other (finite, well-shaped)
//!   logits never enters rotation: its canary answers disagree with the static replica's, so it
//!   is removed, counted and refused for a while; an honest registration is admitted.
//! - The ensemble fan-out: `degrade` combines the members that answered; `wait` keeps their
//!   answers and asks only the member that is down again, at once when a replica of it joins;
//!   shutdown ends the wait.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

/// Each test fails at this deadline instead of hanging the suite.
const TEST_DEADLINE: std::time::Duration = std::time::Duration::from_secs(300);

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use coordinator::config::{MemberConfig, MembershipSettings};
use coordinator::domain::membership::{Health, Membership, ReplicaView, normalize_address};
use coordinator::membership::MembershipHandle;
use coordinator::teachers::{MAX_ATTEMPTS, TeacherPool};
use distill_proto::pb::teacher_client::TeacherClient;
use distill_proto::pb::teacher_server::{Teacher, TeacherServer};
use distill_proto::pb::{
    DescribeRequest, DescribeResponse, InferRequest, InferResponse, InferStreamResponse,
};
use distill_proto::{DType, HostTensor};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

const ROWS: usize = 4;
const CLASSES: usize = 10;
const REQUESTS: usize = 12;
/// `[membership] failure_threshold` by default.
const THRESHOLD: usize = 3;

/// A real teacher server for member `t` (random weights, seed 1); its address and identity.
async fn good_teacher(shutdown: &CancellationToken) -> (String, DescribeResponse) {
    let opts = teacher_server::ServeOptions {
        member: "t".into(),
        ..Default::default()
    };
    let ck = common::random_checkpoint("mlp:784-16-10", 1);
    let (svc, url) = common::serve_teacher(&ck, &opts, shutdown).await;
    let identity = svc
        .describe(Request::new(DescribeRequest {}))
        .await
        .unwrap()
        .into_inner();
    (url, identity)
}

/// How a hostile replica answers `Infer`.
#[derive(Clone, Copy, Debug)]
enum Misbehaviour {
    /// The right shape with one NaN.
    NaN,
    /// `[rows, classes + 1]`.
    ExtraClass,
    /// `[rows, classes - 1]`.
    MissingClass,
    /// `INVALID_ARGUMENT` to every request.
    Refuses,
    /// `UNAVAILABLE` to every request.
    Unavailable,
    /// Finite logits of the right shape, but not the model's.
    Wrong,
}

/// A replica that claims the good replica's identity and answers `Infer` as `mode` says.
#[derive(Clone)]
struct Hostile {
    identity: DescribeResponse,
    mode: Misbehaviour,
    calls: Arc<AtomicUsize>,
}

fn logits(rows: usize, classes: usize, poison: bool) -> HostTensor {
    let mut v: Vec<f32> = (0..rows * classes).map(|i| i as f32 * 0.01).collect();
    if poison {
        v[rows * classes / 2] = f32::NAN;
    }
    HostTensor::from_f32(vec![rows, classes], &v).unwrap()
}

#[tonic::async_trait]
impl Teacher for Hostile {
    async fn describe(
        &self,
        _req: Request<DescribeRequest>,
    ) -> Result<Response<DescribeResponse>, Status> {
        Ok(Response::new(self.identity.clone()))
    }

    async fn infer(&self, req: Request<InferRequest>) -> Result<Response<InferResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let inputs = HostTensor::try_from(req.into_inner().inputs.unwrap()).unwrap();
        let rows = inputs.shape()[0];
        let classes = self.identity.num_classes as usize;
        let t = match self.mode {
            Misbehaviour::NaN => logits(rows, classes, true),
            Misbehaviour::Wrong => logits(rows, classes, false),
            Misbehaviour::ExtraClass => logits(rows, classes + 1, false),
            Misbehaviour::MissingClass => logits(rows, classes - 1, false),
            Misbehaviour::Refuses => {
                return Err(Status::invalid_argument("inputs: not what I expected"));
            }
            Misbehaviour::Unavailable => return Err(Status::unavailable("overloaded, go away")),
        };
        Ok(Response::new(InferResponse {
            request_id: 0,
            logits: Some(t.into()),
            model_id: self.identity.model_id.clone(),
            ..Default::default()
        }))
    }

    type InferStreamStream = tokio_stream::Empty<Result<InferStreamResponse, Status>>;

    async fn infer_stream(
        &self,
        _req: Request<Streaming<InferRequest>>,
    ) -> Result<Response<Self::InferStreamStream>, Status> {
        Err(Status::unimplemented("InferStream"))
    }
}

/// Serves `hostile` on a port of its own; returns the address.
async fn serve_hostile(hostile: Hostile, shutdown: &CancellationToken) -> String {
    let tl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tl.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(TeacherServer::new(hostile))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(tl),
            shutdown.clone().cancelled_owned(),
        );
    tokio::spawn(server);
    format!("http://{addr}")
}

/// Serves a [`Hostile`] replica claiming `identity` and misbehaving as `mode`; returns its
/// address and its count of `Infer` calls.
async fn hostile(
    identity: DescribeResponse,
    mode: Misbehaviour,
    shutdown: &CancellationToken,
) -> (String, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let hostile = Hostile {
        identity,
        mode,
        calls: calls.clone(),
    };
    (serve_hostile(hostile, shutdown).await, calls)
}

/// A pool with one member `t` over `endpoints` (no prober runs: a replica out of rotation
/// stays out).
fn pool(endpoints: &[String]) -> TeacherPool {
    pool_with(
        endpoints,
        MembershipSettings {
            hedge: false,
            ..Default::default()
        },
    )
}

/// A pool with one member `t` over `endpoints` and the membership `settings`.
fn pool_with(endpoints: &[String], settings: MembershipSettings) -> TeacherPool {
    common::teacher_pool(endpoints, settings)
}

/// The membership's view of member `t`'s replica at `endpoint`.
fn view(pool: &TeacherPool, endpoint: &str) -> ReplicaView {
    view_of(pool, "t", endpoint)
}

fn inputs() -> HostTensor {
    // 784 = 8 (mod 97): every row differs.
    let v: Vec<f32> = (0..ROWS * 784).map(|i| (i % 97) as f32 / 97.0).collect();
    HostTensor::from_f32(vec![ROWS, 784], &v).unwrap()
}

/// What the good replica answers for `inputs()` at T = 2, asked directly.
async fn direct(endpoint: &str) -> Vec<f32> {
    let mut client = TeacherClient::connect(endpoint.to_string()).await.unwrap();
    let reply = client
        .infer(InferRequest {
            request_id: 0,
            inputs: Some(inputs().into()),
            temperature: 2.0,
            output_dtype: distill_proto::pb::DType::from(DType::F32) as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    HostTensor::try_from(reply.logits.unwrap())
        .unwrap()
        .to_f32_vec()
}

/// `REQUESTS` requests to a member of one hostile and one good replica: each is answered with
/// the good replica's logits, and the hostile one leaves rotation after `THRESHOLD` attempts.
async fn bad_replica_leaves_rotation(mode: Misbehaviour) {
    let shutdown = CancellationToken::new();
    let (good, identity) = good_teacher(&shutdown).await;
    let (bad, calls) = hostile(identity, mode, &shutdown).await;
    let want = direct(&good).await;
    assert_eq!(want.len(), ROWS * CLASSES);
    assert!(want.iter().all(|v| v.is_finite()));
    let pool = pool(&[bad.clone(), good.clone()]);
    for i in 0..REQUESTS {
        let got = pool.infer(0, &inputs(), 2.0).await;
        match got {
            Ok(got) => assert_eq!(got, want, "{mode:?}: request {i}"),
            Err(e) => panic!("{mode:?}: request {i}: {e}"),
        }
    }
    let bad_view = view(&pool, &bad);
    assert_eq!(
        bad_view.health,
        Health::OutOfRotation,
        "{mode:?}: {bad_view:?}"
    );
    assert_eq!(bad_view.answered, 0, "{mode:?}");
    assert_eq!(calls.load(Ordering::SeqCst), THRESHOLD, "{mode:?}");
    let good_view = view(&pool, &good);
    assert_eq!(good_view.health, Health::InRotation);
    assert_eq!(good_view.answered, REQUESTS as u64, "{mode:?}");
    let stats = pool.stats().remove(0);
    assert_eq!(stats.requests, REQUESTS as u64, "{mode:?}: {stats:?}");
    assert_eq!(stats.failures, THRESHOLD as u64, "{mode:?}: {stats:?}");
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nan_logits_are_never_returned_and_their_replica_leaves_rotation() {
    common::within(
        TEST_DEADLINE,
        "nan_logits_are_never_returned_and_their_replica_leaves_rotation",
        async move {
            bad_replica_leaves_rotation(Misbehaviour::NaN).await;
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logits_of_another_shape_are_never_returned_and_their_replica_leaves_rotation() {
    common::within(
        TEST_DEADLINE,
        "logits_of_another_shape_are_never_returned_and_their_replica_leaves_rotation",
        async move {
            bad_replica_leaves_rotation(Misbehaviour::ExtraClass).await;
            bad_replica_leaves_rotation(Misbehaviour::MissingClass).await;
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_refusing_what_another_accepts_is_failing() {
    common::within(
        TEST_DEADLINE,
        "a_replica_refusing_what_another_accepts_is_failing",
        async move {
            bad_replica_leaves_rotation(Misbehaviour::Refuses).await;
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_every_replica_refuses_is_rejected_and_nobody_leaves_rotation() {
    common::within(
        TEST_DEADLINE,
        "a_request_every_replica_refuses_is_rejected_and_nobody_leaves_rotation",
        async move {
            let shutdown = CancellationToken::new();
            let (a, _) = good_teacher(&shutdown).await;
            let (b, _) = good_teacher(&shutdown).await;
            let pool = pool(&[a.clone(), b.clone()]);
            // Rows of 100 values: a model of 784 inputs refuses them on every replica.
            let wrong = HostTensor::from_f32(vec![2, 100], &[0.5; 200]).unwrap();
            for _ in 0..4 {
                match pool.infer(0, &wrong, 1.0).await {
                    Err(coordinator::Error::TeacherRejected { member, msg }) => {
                        assert_eq!(member, "t");
                        assert!(
                            msg.contains("InvalidArgument") || msg.contains("invalid"),
                            "{msg}"
                        );
                    }
                    other => panic!("{other:?}"),
                }
            }
            for e in [&a, &b] {
                let v = view(&pool, e);
                assert_eq!(v.health, Health::InRotation, "{v:?}");
                assert_eq!(v.consecutive_failures, 0, "{v:?}");
            }
            assert_eq!(pool.stats().remove(0).failures, 0);
            // The same pool still answers valid requests.
            assert_eq!(
                pool.infer(0, &inputs(), 2.0).await.unwrap().len(),
                ROWS * CLASSES
            );
            shutdown.cancel();
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_tries_a_bounded_number_of_replicas() {
    common::within(
        TEST_DEADLINE,
        "a_request_tries_a_bounded_number_of_replicas",
        async move {
            let shutdown = CancellationToken::new();
            let (_, identity) = good_teacher(&shutdown).await;
            let calls = Arc::new(AtomicUsize::new(0));
            let mut endpoints = Vec::new();
            for _ in 0..12 {
                let hostile = Hostile {
                    identity: identity.clone(),
                    mode: Misbehaviour::Unavailable,
                    calls: calls.clone(),
                };
                endpoints.push(serve_hostile(hostile, &shutdown).await);
            }
            let pool = pool(&endpoints);
            match pool.infer(0, &inputs(), 2.0).await {
                Err(coordinator::Error::Teacher { member, msg }) => {
                    assert_eq!(member, "t");
                    assert!(msg.contains("overloaded, go away"), "{msg}");
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(calls.load(Ordering::SeqCst), MAX_ATTEMPTS);
            assert_eq!(pool.retries(), MAX_ATTEMPTS as u64 - 1);
            shutdown.cancel();
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_describe_with_an_overflowing_input_shape_is_an_error() {
    common::within(
        TEST_DEADLINE,
        "a_describe_with_an_overflowing_input_shape_is_an_error",
        async move {
            let shutdown = CancellationToken::new();
            let (_, mut identity) = good_teacher(&shutdown).await;
            identity.input_shape = vec![u64::MAX, 2];
            let bad = serve_hostile(
                Hostile {
                    identity,
                    mode: Misbehaviour::NaN,
                    calls: Arc::new(AtomicUsize::new(0)),
                },
                &shutdown,
            )
            .await;
            let pool = pool(std::slice::from_ref(&bad));
            match pool.check_models(784, CLASSES).await {
                Err(coordinator::Error::Config(msg)) => {
                    assert!(msg.contains("[18446744073709551615, 2]"), "{msg}");
                }
                other => panic!("{other:?}"),
            }
            shutdown.cancel();
        },
    )
    .await
}

/// Members `a` (the good replica at `a`) and `b` (no static replica: down until one joins).
fn two_member_pool(a: &str) -> TeacherPool {
    let settings = MembershipSettings::default();
    let mut membership = Membership::new(
        settings.to_config(1),
        [
            ("a".to_string(), vec![a.to_string()]),
            ("b".to_string(), vec![]),
        ],
    )
    .unwrap();
    membership.expect_model(784, CLASSES as u32);
    let members = [
        MemberConfig {
            name: "a".into(),
            endpoints: vec![a.to_string()],
            weight: 1.0,
            ..Default::default()
        },
        MemberConfig {
            name: "b".into(),
            endpoints: vec![],
            weight: 1.0,
            ..Default::default()
        },
    ];
    TeacherPool::new(
        &members,
        MembershipHandle::new(membership),
        Duration::from_secs(30),
        64 << 20,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ensemble_degrades_or_waits_for_a_member_that_is_down() {
    common::within(
        TEST_DEADLINE,
        "the_ensemble_degrades_or_waits_for_a_member_that_is_down",
        async move {
            use coordinator::config::TeacherPolicy;
            let shutdown = CancellationToken::new();
            let (a, _) = good_teacher(&shutdown).await;
            let want_a = direct(&a).await;
            let pool = Arc::new(two_member_pool(&a));
            let stop = CancellationToken::new();

            let degraded = pool
                .ensemble_logits(&inputs(), 2.0, TeacherPolicy::Degrade, &stop)
                .await
                .unwrap();
            assert_eq!(degraded.answered, vec![0]);
            assert_eq!(degraded.logits, vec![want_a.clone()]);

            // Under `wait`, the first round's answer of `a` is kept while `b` is waited for.
            let waiting = {
                let (pool, stop) = (pool.clone(), stop.clone());
                tokio::spawn(async move {
                    pool.ensemble_logits(&inputs(), 2.0, TeacherPolicy::Wait, &stop)
                        .await
                })
            };
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            // The first round of the wait is over once `a` answered (again) and `b` failed (again).
            while pool.stats()[0].requests < 2 || pool.stats()[1].failures < 2 {
                assert!(tokio::time::Instant::now() < deadline, "{:?}", pool.stats());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // A replica of `b` joins: the wait ends at once (no backoff to sit out).
            let (b, b_identity) = good_teacher(&shutdown).await;
            let want_b = direct(&b).await;
            let identity = coordinator::domain::membership::ModelIdentity {
                model_id: b_identity.model_id,
                weights_digest: b_identity.weights_digest,
                input_shape: b_identity.input_shape,
                classes: b_identity.num_classes,
                max_batch: b_identity.max_batch,
                sequence: None,
            };
            pool.membership()
                .update(|m| {
                    let claim = coordinator::domain::membership::Claim {
                        presented: String::new(),
                        fresh: "b".repeat(64),
                    };
                    let out = m.register("b", &b, identity, claim, std::time::Instant::now());
                    (out.value, out.events)
                })
                .unwrap()
                .unwrap();
            let answer = tokio::time::timeout(Duration::from_secs(20), waiting)
                .await
                .expect("the wait ended when `b` joined")
                .unwrap()
                .unwrap();
            assert_eq!(answer.answered, vec![0, 1]);
            assert_eq!(answer.logits, vec![want_a, want_b]);
            assert_eq!(pool.stats()[0].requests, 2, "`a` was not asked again");
            assert_eq!(pool.stats()[1].requests, 1);

            // With `b` gone again, a wait ends with the shutdown.
            let b_id = view_of(&pool, "b", &b).id;
            pool.membership()
                .update(|m| {
                    let out = m.deregister(b_id, &b, &"b".repeat(64));
                    (out.value, out.events)
                })
                .unwrap();
            let waiting = {
                let (pool, stop) = (pool.clone(), stop.clone());
                tokio::spawn(async move {
                    pool.ensemble_logits(&inputs(), 2.0, TeacherPolicy::Wait, &stop)
                        .await
                })
            };
            stop.cancel();
            let ended = tokio::time::timeout(Duration::from_secs(20), waiting)
                .await
                .expect("the wait ended with the shutdown")
                .unwrap();
            assert!(
                matches!(ended, Err(coordinator::Error::ShuttingDown)),
                "{ended:?}"
            );
            shutdown.cancel();
        },
    )
    .await
}

/// The membership's view of member `member`'s replica at `endpoint`.
fn view_of(pool: &TeacherPool, member: &str, endpoint: &str) -> ReplicaView {
    let address = normalize_address(endpoint).unwrap();
    pool.membership()
        .lock()
        .unwrap()
        .replicas(member)
        .into_iter()
        .find(|v| v.address == address)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_describes_itself_well_but_answers_nan_stays_out_of_rotation() {
    common::within(
        TEST_DEADLINE,
        "a_replica_that_describes_itself_well_but_answers_nan_stays_out_of_rotation",
        async move {
            let shutdown = CancellationToken::new();
            let (good, identity) = good_teacher(&shutdown).await;
            let (bad, calls) = hostile(identity, Misbehaviour::NaN, &shutdown).await;
            // Probes every 10 to 40 ms.
            let settings = MembershipSettings {
                hedge: false,
                probe_initial_secs: 0.01,
                probe_max_secs: 0.04,
                ..Default::default()
            };
            let pool = Arc::new(pool_with(&[bad.clone(), good.clone()], settings));
            while view(&pool, &bad).health == Health::InRotation {
                pool.infer(0, &inputs(), 2.0).await.unwrap();
            }
            assert_eq!(calls.load(Ordering::SeqCst), THRESHOLD);
            let stop = CancellationToken::new();
            let prober = {
                let (pool, stop) = (pool.clone(), stop.clone());
                tokio::spawn(async move { pool.run_prober(stop).await })
            };
            // Five probes reached the test request, and every one kept the replica out.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while calls.load(Ordering::SeqCst) < THRESHOLD + 5 {
                assert_eq!(view(&pool, &bad).health, Health::OutOfRotation);
                assert!(tokio::time::Instant::now() < deadline, "probes did not run");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(view(&pool, &bad).health, Health::OutOfRotation);
            stop.cancel();
            tokio::time::timeout(Duration::from_secs(20), prober)
                .await
                .expect("the prober stops")
                .unwrap();
            shutdown.cancel();
        },
    )
    .await
}

/// Registers `endpoint` for member `t` as `identity` says, directly with the membership.
fn register(
    pool: &TeacherPool,
    endpoint: &str,
    identity: &DescribeResponse,
) -> Result<u64, coordinator::domain::membership::MembershipError> {
    let identity = coordinator::domain::membership::ModelIdentity {
        model_id: identity.model_id.clone(),
        weights_digest: identity.weights_digest.clone(),
        input_shape: identity.input_shape.clone(),
        classes: identity.num_classes,
        max_batch: identity.max_batch,
        sequence: None,
    };
    let claim = coordinator::domain::membership::Claim::new("", "c".repeat(64));
    pool.membership()
        .update(|m| {
            let out = m.register("t", endpoint, identity, claim, std::time::Instant::now());
            (out.value.map(|r| r.replica), out.events)
        })
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_answering_other_logits_never_enters_rotation_and_an_honest_one_does() {
    common::within(
        TEST_DEADLINE,
        "a_registration_answering_other_logits_never_enters_rotation_and_an_honest_one_does",
        async move {
            let shutdown = CancellationToken::new();
            let (good, identity) = good_teacher(&shutdown).await;
            // Same checkpoint, same weights: an honest second replica.
            let (honest, honest_identity) = good_teacher(&shutdown).await;
            assert_eq!(honest_identity.weights_digest, identity.weights_digest);
            let (rogue, calls) = hostile(identity.clone(), Misbehaviour::Wrong, &shutdown).await;
            let settings = MembershipSettings {
                hedge: false,
                probe_initial_secs: 0.01,
                probe_max_secs: 5.0,
                ..Default::default()
            };
            let pool = Arc::new(pool_with(std::slice::from_ref(&good), settings));
            let stop = CancellationToken::new();
            let prober = {
                let (pool, stop) = (pool.clone(), stop.clone());
                tokio::spawn(async move { pool.run_prober(stop).await })
            };
            let rogue_id = register(&pool, &rogue, &identity).unwrap();
            let honest_id = register(&pool, &honest, &honest_identity).unwrap();
            // The rogue replica is refused and the honest one admitted, by the prober alone.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let (rogue_there, honest_health) = {
                    let m = pool.membership().lock().unwrap();
                    (
                        m.replica(rogue_id).is_some(),
                        m.replica(honest_id).map(|v| v.health),
                    )
                };
                if !rogue_there && honest_health == Some(Health::InRotation) {
                    break;
                }
                if rogue_there {
                    assert_eq!(view(&pool, &rogue).health, Health::OnTrial);
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no verdict: rogue present {rogue_there}, honest {honest_health:?}"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(
                calls.load(Ordering::SeqCst),
                1,
                "asked the canary rows only"
            );
            assert_eq!(pool.stats()[0].canary_refused, 1);
            // Registering again at once is refused.
            let again = register(&pool, &rogue, &identity).unwrap_err();
            assert!(again.to_string().contains("refused for"), "{again}");
            // Every request is answered with the model's logits, by the two honest replicas.
            let want = direct(&good).await;
            for _ in 0..REQUESTS {
                assert_eq!(pool.infer(0, &inputs(), 2.0).await.unwrap(), want);
            }
            assert_eq!(calls.load(Ordering::SeqCst), 1, "the rogue got no request");
            let answered_by = pool.stats()[0].answered_by.clone();
            assert!(
                !answered_by.contains_key(&normalize_address(&rogue).unwrap()),
                "{answered_by:?}"
            );
            assert_eq!(
                answered_by.values().sum::<u64>(),
                REQUESTS as u64,
                "{answered_by:?}"
            );
            stop.cancel();
            tokio::time::timeout(Duration::from_secs(20), prober)
                .await
                .expect("the prober stops")
                .unwrap();
            shutdown.cancel();
        },
    )
    .await
}
