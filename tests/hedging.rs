//! The coordinator's teacher pool choosing replicas, against real teacher servers on loopback:
//! straggler avoidance and hedged requests (one replica answers at once, the other takes 1.5 s
//! per pass), and the load replicas report in heartbeats.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

/// Each test fails at this deadline instead of hanging the suite.
const TEST_DEADLINE: std::time::Duration = std::time::Duration::from_secs(300);

use std::time::Duration;

use coordinator::config::MembershipSettings;
use coordinator::domain::membership::{Claim, ModelIdentity, ReplicaView};
use coordinator::teachers::TeacherPool;
use distill_proto::HostTensor;
use tokio_util::sync::CancellationToken;

const SLOW: Duration = Duration::from_millis(1500);
const REQUESTS: u64 = 100;

/// A teacher server whose every forward pass takes at least `latency`.
async fn teacher(latency: Duration, shutdown: &CancellationToken) -> String {
    let opts = teacher_server::ServeOptions {
        member: "t".into(),
        simulate_latency: latency,
        ..Default::default()
    };
    let ck = common::random_checkpoint("mlp:784-16-10", 1);
    common::serve_teacher(&ck, &opts, shutdown).await.1
}

/// One member `t` over `endpoints`; registrations enter rotation at once (no prober runs
/// here to hold their canary trials).
fn pool(endpoints: &[String], hedge: bool) -> TeacherPool {
    let settings = MembershipSettings {
        hedge,
        canary: false,
        ..Default::default()
    };
    common::teacher_pool(endpoints, settings)
}

/// The membership's view of each replica, in `endpoints` order.
fn views(pool: &TeacherPool, endpoints: &[String]) -> Vec<ReplicaView> {
    let m = pool.membership().lock().unwrap();
    let views = m.replicas("t");
    endpoints
        .iter()
        .map(|e| {
            let e = coordinator::domain::membership::normalize_address(e).unwrap();
            views.iter().find(|v| v.address == e).unwrap().clone()
        })
        .collect()
}

/// Requests answered by each replica, in `endpoints` order.
fn answered(pool: &TeacherPool, endpoints: &[String]) -> Vec<u64> {
    views(pool, endpoints).iter().map(|v| v.answered).collect()
}

/// `REQUESTS` requests one after another; returns (answered per replica, member statistics).
async fn run(hedge: bool) -> (Vec<u64>, coordinator::teachers::MemberStats) {
    let shutdown = CancellationToken::new();
    let endpoints = vec![
        teacher(SLOW, &shutdown).await,
        teacher(Duration::ZERO, &shutdown).await,
    ];
    let pool = pool(&endpoints, hedge);
    let rows = HostTensor::from_f32(vec![4, 784], &[0.5; 4 * 784]).unwrap();
    for _ in 0..REQUESTS {
        let logits = pool.infer(0, &rows, 2.0).await.unwrap();
        assert_eq!(logits.len(), 4 * 10);
    }
    let counts = answered(&pool, &endpoints);
    let stats = pool.stats().remove(0);
    eprintln!("hedge = {hedge}: answered per replica (slow, fast) {counts:?}; {stats:?}");
    shutdown.cancel();
    (counts, stats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_replica_is_avoided_and_its_requests_are_hedged() {
    common::within(
        TEST_DEADLINE,
        "a_slow_replica_is_avoided_and_its_requests_are_hedged",
        async move {
            let (counts, stats) = run(true).await;
            // Every request got exactly one answer (a hedge's loser is cancelled, not answered).
            assert_eq!(stats.requests, REQUESTS, "{stats:?}");
            assert_eq!(counts.iter().sum::<u64>(), REQUESTS, "{counts:?}");
            // The slow replica answered only while it was untimed (it counts as fast until then);
            // afterwards it is chosen only to refresh its estimate (every 32 requests), and each of
            // those requests is hedged on the fast replica, which answers first.
            assert!(
                counts[0] <= 2,
                "the slow replica answered {counts:?}; {stats:?}"
            );
            assert!(stats.hedged_requests >= 2, "{stats:?}");
            assert!(stats.hedge_wins >= 2, "{stats:?}");
            assert_eq!(stats.failures, 0, "{stats:?}");
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_hedging_the_refresh_requests_wait_for_the_slow_replica() {
    common::within(
        TEST_DEADLINE,
        "without_hedging_the_refresh_requests_wait_for_the_slow_replica",
        async move {
            let (counts, stats) = run(false).await;
            assert_eq!(stats.requests, REQUESTS, "{stats:?}");
            assert_eq!(stats.hedged_requests, 0, "{stats:?}");
            // Chosen once untimed and once per 32 requests after that, and each time answered by it.
            assert!(counts[0] >= 3, "{counts:?}");
            assert!(counts[0] <= 2 + REQUESTS / 32, "{counts:?}");
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_replicas_report_steers_requests() {
    common::within(
        TEST_DEADLINE,
        "the_load_replicas_report_steers_requests",
        async move {
            use coordinator::domain::membership::Load;
            let shutdown = CancellationToken::new();
            let endpoints = vec![
                teacher(Duration::ZERO, &shutdown).await,
                teacher(Duration::ZERO, &shutdown).await,
            ];
            // Loads come only from registered replicas' heartbeats, which carry their lease
            // secret: nobody can state a static replica's load.
            let pool = pool(&[], false);
            let ck = common::random_checkpoint("mlp:784-16-10", 1);
            let secrets: Vec<String> = (0..endpoints.len())
                .map(|i| i.to_string().repeat(64))
                .collect();
            for (e, secret) in endpoints.iter().zip(&secrets) {
                let identity = ModelIdentity {
                    model_id: ck.model_id(),
                    weights_digest: ck.digest(),
                    input_shape: vec![784],
                    classes: 10,
                    max_batch: 1024,
                    sequence: None,
                };
                let claim = Claim {
                    presented: String::new(),
                    fresh: secret.clone(),
                };
                pool.membership()
                    .update(|m| {
                        let out = m.register("t", e, identity, claim, std::time::Instant::now());
                        (out.value, out.events)
                    })
                    .unwrap()
                    .unwrap();
            }
            let ids: Vec<_> = views(&pool, &endpoints).iter().map(|v| v.id).collect();
            // A heartbeat from replica `i`.
            let report = |i: usize, in_flight: u32, max_in_flight: u32| {
                let mut m = pool.membership().lock().unwrap();
                let load = Load {
                    in_flight,
                    max_in_flight,
                };
                let now = std::time::Instant::now();
                let hb = m.heartbeat(ids[i], &endpoints[i], &secrets[i], load, now);
                assert!(hb.value);
            };
            let rows = HostTensor::from_f32(vec![2, 784], &[0.25; 2 * 784]).unwrap();
            // Replica 0 is busy with 50 requests from elsewhere: everything goes to replica 1.
            report(0, 50, 0);
            for _ in 0..20 {
                pool.infer(0, &rows, 1.0).await.unwrap();
            }
            assert_eq!(answered(&pool, &endpoints), [0, 20]);
            // Replica 1 is at its stated limit: replica 0 takes the requests, busy as it is.
            report(1, 8, 8);
            for _ in 0..10 {
                pool.infer(0, &rows, 1.0).await.unwrap();
            }
            assert_eq!(answered(&pool, &endpoints), [10, 20]);
            shutdown.cancel();
        },
    )
    .await
}
