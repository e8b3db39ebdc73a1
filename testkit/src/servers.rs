//! Our own servers in the test's process, each on a real loopback socket: teacher servers,
//! a coordinator and student workers.

use std::net::SocketAddr;
use std::time::Duration;

use candle_core::Device;
use distill_core::checkpoint::Checkpoint;
use tokio_util::sync::CancellationToken;

/// Serves `ck` in-process with `opts` on `listener` until `shutdown`; returns the service (a
/// clone shares its counters) and its URL.
pub fn serve_teacher_on(
    ck: &Checkpoint,
    opts: &teacher_server::ServeOptions,
    listener: tokio::net::TcpListener,
    shutdown: &CancellationToken,
) -> (teacher_server::TeacherService, String) {
    let svc = teacher_server::build_service(ck, &Device::Cpu, opts).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(teacher_server::serve(
        svc.clone(),
        listener,
        opts.max_message_bytes,
        shutdown.clone(),
    ));
    (svc, url)
}

/// [`serve_teacher_on`] a fresh loopback port.
pub async fn serve_teacher(
    ck: &Checkpoint,
    opts: &teacher_server::ServeOptions,
    shutdown: &CancellationToken,
) -> (teacher_server::TeacherService, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    serve_teacher_on(ck, opts, listener, shutdown)
}

/// Serves the language model `lm` (a sequence teacher) in-process on a fresh loopback port
/// until `shutdown`; returns its URL.
pub async fn serve_sequence_teacher(
    lm: distill_core::lm::LanguageModel,
    shutdown: &CancellationToken,
) -> String {
    let opts = teacher_server::ServeOptions::default();
    let service = teacher_server::build_sequence_service(lm, &opts).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(teacher_server::serve(
        service,
        listener,
        opts.max_message_bytes,
        shutdown.clone(),
    ));
    url
}

/// Prepares `cfg` and serves it in this process on a fresh loopback port until it ends or
/// `shutdown`; returns the address and the server task.
pub async fn serve_run(
    cfg: coordinator::RunConfig,
    shutdown: &CancellationToken,
) -> (
    SocketAddr,
    tokio::task::JoinHandle<coordinator::Result<Option<coordinator::RunReport>>>,
) {
    let run = coordinator::prepare(cfg).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (
        addr,
        tokio::spawn(coordinator::serve(run, listener, shutdown.clone())),
    )
}

/// A real student worker in this process, in its own task (work dir `dir/worker`), stopped
/// by `stop`.
pub fn spawn_worker(
    coordinator: SocketAddr,
    dir: &std::path::Path,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<student_worker::Result<student_worker::WorkerReport>> {
    let cfg = student_worker::WorkerConfig {
        coordinator: format!("http://{coordinator}"),
        work_dir: dir.join("worker"),
        connect_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    tokio::spawn(student_worker::run(cfg, stop.clone()))
}

/// The coordinator's teacher pool over one member `t` (784 inputs, 10 classes) at `endpoints`,
/// with the membership `settings`, a 30 s request deadline and 64 MiB messages.
pub fn teacher_pool(
    endpoints: &[String],
    settings: coordinator::config::MembershipSettings,
) -> coordinator::teachers::TeacherPool {
    use coordinator::domain::membership::Membership;
    let mut membership = Membership::new(
        settings.to_config(1),
        [("t".to_string(), endpoints.to_vec())],
    )
    .unwrap();
    membership.expect_model(784, 10);
    let members = [coordinator::config::MemberConfig {
        name: "t".into(),
        endpoints: endpoints.to_vec(),
        weight: 1.0,
        ..Default::default()
    }];
    coordinator::teachers::TeacherPool::new(
        &members,
        coordinator::membership::MembershipHandle::new(membership),
        Duration::from_secs(30),
        64 << 20,
    )
    .unwrap()
}
