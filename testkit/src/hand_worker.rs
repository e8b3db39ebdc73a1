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
