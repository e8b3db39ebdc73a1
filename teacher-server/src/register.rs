//! Registration with a coordinator (`--register URL`): elastic membership, teacher side.
//!
//! A background task registers this replica under its member with the coordinator's
//! `distill.v1.Registry`, then heartbeats at the interval the coordinator asks for, reporting
//! its requests in flight. It never gives up while the server runs:
//! - the coordinator unreachable, or a registration refused: try again after an exponential
//!   backoff (`backoff_initial` doubling to `backoff_max`, minus up to half at random so that
//!   many replicas do not retry in lock step);
//! - a heartbeat that fails: keep the registration and retry with the same backoff — if the
//!   lease ran out meanwhile, the coordinator answers `valid = false`;
//! - `valid = false` (the lease expired, or the coordinator restarted and knows nobody):
//!   register again at once.
//!
//! On shutdown (the token) it deregisters, best effort within `rpc_timeout`, so the coordinator
//! stops sending requests before the server drains. [`Registrar::state`] says where it stands.

use std::sync::Arc;
use std::time::Duration;

use distill_proto::pb::registry_client::RegistryClient;
use distill_proto::pb::{DeregisterRequest, HeartbeatRequest, RegisterRequest};
use distill_transport::{AuthChannel, ClientSecurity};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::service::ModelInfo;

/// How to register.
#[derive(Debug, Clone)]
pub struct RegisterOptions {
    /// The coordinator's URL, e.g. `http://coord:50050`.
    pub coordinator: String,
    /// The address the coordinator should dial this replica at, `http://HOST:PORT`.
    pub advertise: String,
    /// The model and member this replica serves.
    pub info: ModelInfo,
    /// This server's in-flight limit, reported with every heartbeat.
    pub max_in_flight: u32,
    /// First retry delay after a failure.
    pub backoff_initial: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Deadline of each call to the coordinator.
    pub rpc_timeout: Duration,
    /// TLS towards the coordinator, and the register credential presented.
    pub security: ClientSecurity,
}

impl RegisterOptions {
    /// Options with the default backoff (200 ms doubling to 10 s) and a 5 s call deadline.
    pub fn new(
        coordinator: String,
        advertise: String,
        info: ModelInfo,
        max_in_flight: u32,
    ) -> Self {
        Self {
            coordinator,
            advertise,
            info,
            max_in_flight,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            rpc_timeout: Duration::from_secs(5),
            security: ClientSecurity::plaintext(),
        }
    }
}

/// Where the registration stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrationState {
    /// Not registered (yet, or any more).
    Unregistered,
    /// Registered; heartbeats keep the lease.
    Registered {
        /// The id the coordinator gave.
        replica_id: u64,
        /// The address the coordinator dials.
        address: String,
    },
    /// Deregistered on shutdown; the task has ended.
    Stopped,
}

/// The running registration task.
pub struct Registrar {
    /// The task; it ends after deregistering once the shutdown token is cancelled.
    pub task: tokio::task::JoinHandle<()>,
    /// Where the registration stands.
    pub state: watch::Receiver<RegistrationState>,
}

/// Starts the registration task; `in_flight` reports the requests in flight at each heartbeat.
pub fn spawn(
    opts: RegisterOptions,
    in_flight: Arc<dyn Fn() -> u32 + Send + Sync>,
    shutdown: CancellationToken,
) -> Result<Registrar> {
    let url = opts.security.url(&opts.coordinator);
    let endpoint = opts
        .security
        .endpoint(&url)
        .map_err(|e| Error::InvalidArgument(format!("--register: {e}")))?
        .connect_timeout(opts.rpc_timeout)
        .timeout(opts.rpc_timeout);
    let client = RegistryClient::new(opts.security.channel(endpoint));
    let (tx, rx) = watch::channel(RegistrationState::Unregistered);
    let task = tokio::spawn(run(opts, client, in_flight, tx, shutdown));
    Ok(Registrar { task, state: rx })
}

/// Exponential backoff with jitter: `min(initial · 2^attempt, max) · (1 − u/2)`, u in [0, 1).
fn backoff(opts: &RegisterOptions, attempt: u32, rng: &mut u64) -> Duration {
    let base = opts
        .backoff_initial
        .saturating_mul(1u32 << attempt.min(20))
        .min(opts.backoff_max);
    base.mul_f64(1.0 - 0.5 * next_unit(rng))
}

/// A uniform draw in [0, 1) from SplitMix64.
fn next_unit(state: &mut u64) -> f64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// A registration held: what heartbeats and the deregistration carry.
#[derive(Clone)]
struct Lease {
    id: u64,
    address: String,
    /// Presented with every heartbeat and the deregistration; never logged.
    secret: String,
    interval: Duration,
}

/// Sleeps `d`; false if `shutdown` came first.
async fn pause(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

fn register_request(opts: &RegisterOptions) -> RegisterRequest {
    let info = &opts.info;
    RegisterRequest {
        member: info.member.clone(),
        address: opts.security.url(&opts.advertise),
        model_id: info.model_id.clone(),
        weights_digest: info.digest.clone(),
        input_shape: info.input_shape.iter().map(|&d| d as u64).collect(),
        num_classes: u32::try_from(info.classes).unwrap_or(u32::MAX),
        max_batch: u32::try_from(info.max_batch).unwrap_or(u32::MAX),
        // Registration starts afresh each time: a renewal happens only through heartbeats.
        lease_secret: String::new(),
    }
}

async fn run(
    opts: RegisterOptions,
    mut client: RegistryClient<AuthChannel>,
    in_flight: Arc<dyn Fn() -> u32 + Send + Sync>,
    state: watch::Sender<RegistrationState>,
    shutdown: CancellationToken,
) {
    // Jitter only needs to differ between replicas, not to be unpredictable.
    let mut rng = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id()).rotate_left(32);
    let mut failures: u32 = 0;
    let mut registered: Option<Lease> = None;
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        match registered.clone() {
            None => match client.register(register_request(&opts)).await {
                Ok(resp) => {
                    let r = resp.into_inner();
                    let interval = Duration::from_millis(r.heartbeat_interval_ms.max(1));
                    tracing::info!(
                        coordinator = %opts.coordinator, member = %opts.info.member,
                        replica = r.replica_id, address = %r.address,
                        lease_ttl_ms = r.lease_ttl_ms, "registered with the coordinator"
                    );
                    state.send_replace(RegistrationState::Registered {
                        replica_id: r.replica_id,
                        address: r.address.clone(),
                    });
                    registered = Some(Lease {
                        id: r.replica_id,
                        address: r.address,
                        secret: r.lease_secret,
                        interval,
                    });
                    failures = 0;
                }
                Err(status) => {
                    let wait = backoff(&opts, failures, &mut rng);
                    failures = failures.saturating_add(1);
                    tracing::warn!(
                        coordinator = %opts.coordinator, code = ?status.code(),
                        error = %status.message(), retry_in = ?wait,
                        "registration failed"
                    );
                    if !pause(wait, &shutdown).await {
                        break;
                    }
                }
            },
            Some(lease) => {
                let (id, interval) = (lease.id, lease.interval);
                if !pause(interval, &shutdown).await {
                    break;
                }
                let req = HeartbeatRequest {
                    replica_id: id,
                    address: lease.address.clone(),
                    in_flight: in_flight(),
                    max_in_flight: opts.max_in_flight,
                    lease_secret: lease.secret.clone(),
                };
                match client.heartbeat(req).await {
                    Ok(resp) => {
                        let r = resp.into_inner();
                        failures = 0;
                        if r.valid {
                            let interval = Duration::from_millis(r.heartbeat_interval_ms.max(1));
                            registered = Some(Lease { interval, ..lease });
                        } else {
                            tracing::warn!(
                                coordinator = %opts.coordinator, replica = id,
                                "the coordinator does not know this replica (lease expired or coordinator restarted); registering again"
                            );
                            state.send_replace(RegistrationState::Unregistered);
                            registered = None;
                        }
                    }
                    Err(status) => {
                        let wait = backoff(&opts, failures, &mut rng);
                        failures = failures.saturating_add(1);
                        tracing::warn!(
                            coordinator = %opts.coordinator, replica = id, code = ?status.code(),
                            error = %status.message(), retry_in = ?wait,
                            "heartbeat failed"
                        );
                        // The heartbeat loop waits `interval` first; wait the rest of the
                        // backoff here.
                        if !pause(wait.saturating_sub(interval), &shutdown).await {
                            break;
                        }
                    }
                }
            }
        }
    }
    if let Some(lease) = registered {
        let id = lease.id;
        let req = DeregisterRequest {
            replica_id: id,
            address: lease.address,
            lease_secret: lease.secret,
        };
        match tokio::time::timeout(opts.rpc_timeout, client.deregister(req)).await {
            Ok(Ok(_)) => tracing::info!(replica = id, "deregistered from the coordinator"),
            Ok(Err(status)) => {
                tracing::warn!(replica = id, %status, "deregistering failed; the lease will expire")
            }
            Err(_) => tracing::warn!(
                replica = id,
                "deregistering timed out; the lease will expire"
            ),
        }
    }
    state.send_replace(RegistrationState::Stopped);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> RegisterOptions {
        RegisterOptions::new(
            "coord:1".into(),
            "0.0.0.0:2".into(),
            ModelInfo {
                model_id: "mlp:4-2@0123456789abcdef".into(),
                member: "m".into(),
                input_shape: vec![4],
                classes: 2,
                digest: "0".repeat(64),
                arch: "mlp:4-2".into(),
                max_batch: 8,
                ..Default::default()
            },
            16,
        )
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_at_most_half_taken_off() {
        let o = opts();
        let mut rng = 1;
        for attempt in 0..12 {
            let base = (Duration::from_millis(200) * (1 << attempt)).min(Duration::from_secs(10));
            let d = backoff(&o, attempt, &mut rng);
            assert!(d > base / 2 && d <= base, "{attempt}: {d:?}");
        }
    }

    #[test]
    fn the_request_carries_the_model_and_a_dialable_address() {
        let r = register_request(&opts());
        assert_eq!(r.member, "m");
        assert_eq!(r.address, "http://0.0.0.0:2");
        assert_eq!(r.weights_digest, "0".repeat(64));
        assert_eq!((r.input_shape, r.num_classes, r.max_batch), (vec![4], 2, 8));
        assert_eq!(
            ClientSecurity::plaintext().url("https://x:1"),
            "https://x:1"
        );
    }
}
