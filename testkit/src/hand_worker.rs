//! A worker driven by hand over the coordinator's real gRPC API: the test decides every
//! message it sends.

use distill_proto::pb;
use distill_proto::pb::coordinator_client::CoordinatorClient;
use tokio::sync::mpsc::Sender;
use tonic::transport::Channel;

/// Joins as worker `id` and opens its batch stream with `credits` batches of credit; returns
/// the sender of its messages and the coordinator's replies.
pub async fn open_stream(
    client: &mut CoordinatorClient<Channel>,
    id: &str,
    credits: u32,
) -> (
    Sender<pb::WorkerMessage>,
    tonic::Streaming<pb::CoordinatorMessage>,
) {
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

/// Serves `run` in this process, opens one batch stream by hand and acks the first `n`
/// `TrainBatch`es as they come (each wait within `deadline`); then closes the stream, stops
/// the coordinator (which must end as stopped, releasing its soft-target cache) and returns
/// those batches, in order.
pub async fn collect_batches(
    run: coordinator::Run,
    n: usize,
    deadline: std::time::Duration,
) -> Vec<pb::TrainBatch> {
    use crate::within;
    let listener = within(
        deadline,
        "coordinator bind",
        tokio::net::TcpListener::bind("127.0.0.1:0"),
    )
    .await
    .unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let served = tokio::spawn(coordinator::serve(run, listener, stop.clone()));
    let mut client = within(
        deadline,
        "connect",
        CoordinatorClient::connect(format!("http://{addr}")),
    )
    .await
    .unwrap();
    let (tx, mut down) = within(
        deadline,
        "join and open the batch stream",
        open_stream(&mut client, "hand", 2),
    )
    .await;
    let mut batches = Vec::with_capacity(n);
    while batches.len() < n {
        let msg = within(deadline, "the next TrainBatch", down.message())
            .await
            .unwrap()
            .expect("the stream is open");
        let Some(pb::coordinator_message::Kind::Train(b)) = msg.kind else {
            continue; // the initial parameters
        };
        within(
            deadline,
            "ack",
            tx.send(pb::WorkerMessage {
                kind: Some(pb::worker_message::Kind::Ack(pb::Ack {
                    lease_id: b.lease_id,
                    ..Default::default()
                })),
            }),
        )
        .await
        .unwrap();
        batches.push(b);
    }
    drop((tx, down, client));
    stop.cancel();
    let outcome = within(deadline, "the coordinator stopping", served)
        .await
        .unwrap()
        .unwrap();
    assert!(outcome.is_none(), "the run was stopped, not completed");
    batches
}
