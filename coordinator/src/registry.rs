//! The `distill.v1.Registry` gRPC service: teacher replicas register, heartbeat and deregister;
//! thin handlers (validate → convert → call [`Membership`] → map the error → reply) over a
//! membership shared with the teacher pool, plus the ticker that expires leases.
//!
//! - A registration whose address has an unspecified host (`0.0.0.0`, `[::]`: a teacher that
//!   advertises its listen address) gets the host the request came from, so
//!   `teacher-server --listen 0.0.0.0:50051 --register …` needs no `--advertise`.
//! - Every call that changed the membership logs its events and wakes the waiters of
//!   [`MembershipHandle::changed`] (e.g. a run paused because a member is down).
//! - Time is `Instant::now()` at the call; leases end only through
//!   [`Membership::tick`] (driven by [`run_ticker`]) or a late heartbeat.
//! - The service is built from the run's [`MembershipHandle`], which the teacher pool shares;
//!   the pool does not know this service.
//!
//! See `docs/membership.md` for the whole protocol.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use distill_proto::pb::registry_server::Registry;
use distill_proto::pb::{
    DeregisterRequest, DeregisterResponse, HeartbeatRequest, HeartbeatResponse, RegisterRequest,
    RegisterResponse,
};
use distill_transport::ClientSecurity;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::domain::membership::{
    Claim, Event, Load, Membership, MembershipError, ModelIdentity, normalize_address,
};
use crate::membership::MembershipHandle;

/// The Registry service over a run's membership.
#[derive(Clone)]
pub struct RegistryService {
    membership: MembershipHandle,
    /// How the registered replicas will be dialled: an address they cannot be dialled at
    /// (http:// under TLS, https:// without) is refused at registration.
    dialling: ClientSecurity,
}

impl RegistryService {
    /// A service over `membership` (shared with whoever sends requests to the replicas).
    pub fn new(membership: MembershipHandle) -> Self {
        Self {
            membership,
            dialling: ClientSecurity::plaintext(),
        }
    }

    /// This service refusing addresses that `dialling` cannot reach.
    pub fn dialling_with(mut self, dialling: ClientSecurity) -> Self {
        self.dialling = dialling;
        self
    }

    /// The membership it serves.
    pub fn membership(&self) -> &MembershipHandle {
        &self.membership
    }

    /// Notified (`notify_waiters`) after every call or tick that changed the membership.
    pub fn changed(&self) -> Arc<Notify> {
        self.membership.changed()
    }

    fn lock(&self) -> Result<MutexGuard<'_, Membership>, Status> {
        Ok(self.membership.lock()?)
    }

    fn publish(&self, events: &[Event]) {
        self.membership.publish(events);
    }
}

impl From<MembershipError> for Status {
    fn from(e: MembershipError) -> Self {
        let msg = e.to_string();
        match e {
            MembershipError::BadAddress(_) | MembershipError::ShapeOverflow { .. } => {
                Status::invalid_argument(msg)
            }
            MembershipError::UnknownMember { .. } | MembershipError::UnknownReplica(_) => {
                Status::not_found(msg)
            }
            MembershipError::DigestMismatch { .. }
            | MembershipError::ShapeMismatch { .. }
            | MembershipError::SequenceMismatch { .. }
            | MembershipError::AddressTaken { .. }
            | MembershipError::AddressHeld { .. }
            | MembershipError::NoTrustedReplica { .. } => Status::failed_precondition(msg),
            MembershipError::Banned { .. } => Status::permission_denied(msg),
            MembershipError::TooManyReplicas { .. } => Status::resource_exhausted(msg),
            // Only `Membership::new` returns it: a bug if it reaches a handler.
            MembershipError::DuplicateStatic { .. } => Status::internal(msg),
        }
    }
}

/// Normalises `address` (field `field` of a request) and puts the caller's IP in place of an
/// unspecified host.
pub fn resolve_address(
    field: &str,
    address: &str,
    peer: Option<SocketAddr>,
) -> Result<String, Status> {
    if address.trim().is_empty() {
        return Err(Status::invalid_argument(format!(
            "{field} is empty (expected http://HOST:PORT)"
        )));
    }
    let normalized = normalize_address(address)
        .map_err(|e| Status::invalid_argument(format!("{field}: {e}")))?;
    let Some((scheme, rest)) = normalized.split_once("://") else {
        return Ok(normalized);
    };
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Ok(normalized);
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let unspecified = bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_unspecified());
    if !unspecified {
        return Ok(normalized);
    }
    let Some(peer) = peer else {
        return Err(Status::invalid_argument(format!(
            "{field} `{address}` has an unspecified host and the caller's address is unknown; advertise a reachable host"
        )));
    };
    Ok(match peer.ip().to_canonical() {
        IpAddr::V4(ip) => format!("{scheme}://{ip}:{port}"),
        IpAddr::V6(ip) => format!("{scheme}://[{ip}]:{port}"),
    })
}

/// Longest member name, address, model id and lease secret a request may carry, and most
/// input dimensions: what the membership keeps per replica stays small.
const MAX_NAME: usize = 128;
const MAX_ADDRESS: usize = 512;
const MAX_MODEL_ID: usize = 256;
const MAX_SECRET: usize = 128;
const MAX_DIMS: usize = 8;

/// Refuses a string field longer than `max` bytes.
fn bounded(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes long; at most {max} are accepted",
            value.len()
        )));
    }
    Ok(())
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Checks a registration and converts it to (member, address, identity, presented secret).
fn validate_register(
    req: RegisterRequest,
    peer: Option<SocketAddr>,
) -> Result<(String, String, ModelIdentity, String), Status> {
    let RegisterRequest {
        member,
        address,
        model_id,
        weights_digest,
        input_shape,
        num_classes,
        max_batch,
        lease_secret,
    } = req;
    bounded("RegisterRequest.member", &member, MAX_NAME)?;
    bounded("RegisterRequest.address", &address, MAX_ADDRESS)?;
    bounded("RegisterRequest.model_id", &model_id, MAX_MODEL_ID)?;
    bounded("RegisterRequest.lease_secret", &lease_secret, MAX_SECRET)?;
    if input_shape.len() > MAX_DIMS {
        return Err(Status::invalid_argument(format!(
            "RegisterRequest.input_shape has {} dimensions; at most {MAX_DIMS} are accepted",
            input_shape.len()
        )));
    }
    if member.trim().is_empty() {
        return Err(Status::invalid_argument("RegisterRequest.member is empty"));
    }
    let address = resolve_address("RegisterRequest.address", &address, peer)?;
    if model_id.trim().is_empty() {
        return Err(Status::invalid_argument(
            "RegisterRequest.model_id is empty",
        ));
    }
    if !is_sha256_hex(&weights_digest) {
        return Err(Status::invalid_argument(format!(
            "RegisterRequest.weights_digest `{weights_digest}` is not a SHA-256 in lowercase hex (64 digits)"
        )));
    }
    if input_shape.is_empty() {
        return Err(Status::invalid_argument(
            "RegisterRequest.input_shape is empty",
        ));
    }
    if input_shape.contains(&0) {
        return Err(Status::invalid_argument(format!(
            "RegisterRequest.input_shape {input_shape:?} has a zero dimension"
        )));
    }
    if input_shape
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d))
        .is_none_or(|n| n > distill_proto::MAX_ELEMENTS)
    {
        return Err(Status::invalid_argument(format!(
            "RegisterRequest.input_shape {input_shape:?} is too large"
        )));
    }
    if num_classes == 0 {
        return Err(Status::invalid_argument("RegisterRequest.num_classes is 0"));
    }
    Ok((
        member,
        address,
        ModelIdentity {
            model_id,
            weights_digest,
            input_shape,
            classes: num_classes,
            max_batch,
            // Register states no tokenizer: a registered replica is a classifier.
            sequence: None,
        },
        lease_secret,
    ))
}

fn validate_id(field: &str, id: u64) -> Result<u64, Status> {
    if id == 0 {
        return Err(Status::invalid_argument(format!(
            "{field} is 0 (unset); call Register first"
        )));
    }
    Ok(id)
}

#[tonic::async_trait]
impl Registry for RegistryService {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let peer = req.remote_addr();
        let (member, address, identity, presented) = validate_register(req.into_inner(), peer)?;
        self.dialling
            .check_url(&address)
            .map_err(|e| Status::invalid_argument(format!("RegisterRequest.address: {e}")))?;
        let claim = Claim {
            presented,
            fresh: distill_transport::secret::fresh_secret(),
        };
        let out = self
            .lock()?
            .register(&member, &address, identity, claim, Instant::now());
        self.publish(&out.events);
        let reg = out.value.inspect_err(|e| {
            tracing::warn!(%member, %address, error = %e, "teacher registration refused");
        })?;
        Ok(Response::new(RegisterResponse {
            replica_id: reg.replica,
            lease_ttl_ms: millis(reg.lease_ttl),
            heartbeat_interval_ms: millis(reg.heartbeat_interval),
            address: reg.address,
            lease_secret: reg.secret,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let peer = req.remote_addr();
        let HeartbeatRequest {
            replica_id,
            address,
            in_flight,
            max_in_flight,
            lease_secret,
        } = req.into_inner();
        let id = validate_id("HeartbeatRequest.replica_id", replica_id)?;
        bounded("HeartbeatRequest.address", &address, MAX_ADDRESS)?;
        bounded("HeartbeatRequest.lease_secret", &lease_secret, MAX_SECRET)?;
        let address = resolve_address("HeartbeatRequest.address", &address, peer)?;
        let load = Load {
            in_flight,
            max_in_flight,
        };
        let (out, ttl, interval) = {
            let mut m = self.lock()?;
            let out = m.heartbeat(id, &address, &lease_secret, load, Instant::now());
            let cfg = m.config();
            (out, cfg.lease_ttl, cfg.heartbeat_interval)
        };
        self.publish(&out.events);
        if !out.value {
            tracing::info!(replica = id, %address, "heartbeat from an unknown replica: it must register again");
        }
        Ok(Response::new(HeartbeatResponse {
            valid: out.value,
            lease_ttl_ms: millis(ttl),
            heartbeat_interval_ms: millis(interval),
        }))
    }

    async fn deregister(
        &self,
        req: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        let peer = req.remote_addr();
        let DeregisterRequest {
            replica_id,
            address,
            lease_secret,
        } = req.into_inner();
        let id = validate_id("DeregisterRequest.replica_id", replica_id)?;
        bounded("DeregisterRequest.address", &address, MAX_ADDRESS)?;
        bounded("DeregisterRequest.lease_secret", &lease_secret, MAX_SECRET)?;
        let address = resolve_address("DeregisterRequest.address", &address, peer)?;
        let out = self.lock()?.deregister(id, &address, &lease_secret);
        self.publish(&out.events);
        Ok(Response::new(DeregisterResponse { removed: out.value }))
    }
}

/// Expires the leases that ended by `now`, logs the events and wakes the service's waiters.
pub fn tick(service: &RegistryService, now: Instant) -> Vec<Event> {
    service.membership.tick(now).unwrap_or_else(|e| {
        tracing::error!(error = %e, "leases are not expired");
        Vec::new()
    })
}

/// Calls [`tick`] every `every` until `shutdown` is cancelled (the lease-expiry driver).
pub async fn run_ticker(service: RegistryService, every: Duration, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = interval.tick() => {
                tick(&service, Instant::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::membership::MembershipConfig;

    const DIGEST: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn service() -> RegistryService {
        let m = Membership::new(
            MembershipConfig::default(),
            [("big".to_string(), Vec::<String>::new())],
        )
        .unwrap();
        RegistryService::new(MembershipHandle::new(m))
    }

    fn request() -> RegisterRequest {
        RegisterRequest {
            member: "big".into(),
            address: "http://10.0.0.5:50051".into(),
            model_id: "mlp:784-10@0123456789abcdef".into(),
            weights_digest: DIGEST.into(),
            input_shape: vec![784],
            num_classes: 10,
            max_batch: 1024,
            lease_secret: String::new(),
        }
    }

    async fn register_err(svc: &RegistryService, req: RegisterRequest) -> Status {
        svc.register(Request::new(req)).await.unwrap_err()
    }

    #[tokio::test]
    async fn register_heartbeat_deregister_through_the_handlers() {
        let svc = service();
        let reg = svc
            .register(Request::new(request()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reg.replica_id, 1);
        assert_eq!(reg.lease_ttl_ms, 10_000);
        assert_eq!(reg.heartbeat_interval_ms, 2_000);
        assert_eq!(reg.address, "http://10.0.0.5:50051");
        let hb = svc
            .heartbeat(Request::new(HeartbeatRequest {
                replica_id: 1,
                address: reg.address.clone(),
                in_flight: 2,
                max_in_flight: 64,
                lease_secret: reg.lease_secret.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(hb.valid);
        let r = svc.membership().lock().unwrap().replica(1).unwrap();
        assert_eq!(r.in_flight, Some(2));
        let gone = svc
            .deregister(Request::new(DeregisterRequest {
                replica_id: 1,
                address: reg.address.clone(),
                lease_secret: reg.lease_secret.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(gone.removed);
        let hb = svc
            .heartbeat(Request::new(HeartbeatRequest {
                replica_id: 1,
                address: reg.address,
                in_flight: 0,
                max_in_flight: 0,
                lease_secret: reg.lease_secret,
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(!hb.valid);
    }

    #[tokio::test]
    async fn malformed_registrations_are_invalid_argument_with_a_precise_message() {
        let svc = service();
        let cases: Vec<(RegisterRequest, &str)> = vec![
            (
                RegisterRequest {
                    member: " ".into(),
                    ..request()
                },
                "RegisterRequest.member is empty",
            ),
            (
                RegisterRequest {
                    address: "".into(),
                    ..request()
                },
                "RegisterRequest.address is empty (expected http://HOST:PORT)",
            ),
            (
                RegisterRequest {
                    address: "10.0.0.5:50051".into(),
                    ..request()
                },
                "RegisterRequest.address: address `10.0.0.5:50051` has no scheme",
            ),
            (
                RegisterRequest {
                    address: "http://10.0.0.5".into(),
                    ..request()
                },
                "RegisterRequest.address: address `http://10.0.0.5` has no port",
            ),
            (
                RegisterRequest {
                    address: "http://0.0.0.0:50051".into(),
                    ..request()
                },
                "RegisterRequest.address `http://0.0.0.0:50051` has an unspecified host and the caller's address is unknown",
            ),
            (
                RegisterRequest {
                    model_id: "".into(),
                    ..request()
                },
                "RegisterRequest.model_id is empty",
            ),
            (
                RegisterRequest {
                    weights_digest: "ABC".into(),
                    ..request()
                },
                "RegisterRequest.weights_digest `ABC` is not a SHA-256 in lowercase hex (64 digits)",
            ),
            (
                RegisterRequest {
                    input_shape: vec![],
                    ..request()
                },
                "RegisterRequest.input_shape is empty",
            ),
            (
                RegisterRequest {
                    input_shape: vec![1, 0],
                    ..request()
                },
                "RegisterRequest.input_shape [1, 0] has a zero dimension",
            ),
            (
                RegisterRequest {
                    input_shape: vec![u64::MAX, 2],
                    ..request()
                },
                "is too large",
            ),
            (
                RegisterRequest {
                    num_classes: 0,
                    ..request()
                },
                "RegisterRequest.num_classes is 0",
            ),
        ];
        for (req, want) in cases {
            let st = register_err(&svc, req).await;
            assert_eq!(st.code(), tonic::Code::InvalidArgument, "{want}: {st:?}");
            assert!(st.message().contains(want), "{want}: {}", st.message());
        }
        let st = svc
            .heartbeat(Request::new(HeartbeatRequest {
                replica_id: 0,
                address: "http://h:1".into(),
                in_flight: 0,
                max_in_flight: 0,
                lease_secret: String::new(),
            }))
            .await
            .unwrap_err();
        assert_eq!(st.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            st.message(),
            "HeartbeatRequest.replica_id is 0 (unset); call Register first"
        );
        let st = svc
            .deregister(Request::new(DeregisterRequest {
                replica_id: 3,
                address: "nope".into(),
                lease_secret: String::new(),
            }))
            .await
            .unwrap_err();
        assert_eq!(st.code(), tonic::Code::InvalidArgument);
        assert!(
            st.message().starts_with("DeregisterRequest.address: "),
            "{st:?}"
        );
        assert!(svc.membership().lock().unwrap().replicas("big").is_empty());
    }

    #[tokio::test]
    async fn refusals_map_to_not_found_and_failed_precondition() {
        let svc = service();
        let st = register_err(
            &svc,
            RegisterRequest {
                member: "small".into(),
                ..request()
            },
        )
        .await;
        assert_eq!(st.code(), tonic::Code::NotFound);
        assert_eq!(
            st.message(),
            "member `small` is not part of this run (members: `big`)"
        );
        svc.register(Request::new(request())).await.unwrap();
        let st = register_err(
            &svc,
            RegisterRequest {
                address: "http://10.0.0.6:50051".into(),
                weights_digest: DIGEST.replace('0', "f"),
                ..request()
            },
        )
        .await;
        assert_eq!(st.code(), tonic::Code::FailedPrecondition);
        assert!(st.message().contains("must serve the same model"), "{st:?}");
    }

    #[tokio::test]
    async fn lease_secrets_are_fresh_and_guard_the_address_and_oversized_fields_are_refused() {
        let svc = service();
        let a = svc
            .register(Request::new(request()))
            .await
            .unwrap()
            .into_inner();
        let b = svc
            .register(Request::new(RegisterRequest {
                address: "http://10.0.0.6:50051".into(),
                ..request()
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(is_sha256_hex(&a.lease_secret), "{}", a.lease_secret);
        assert_ne!(a.lease_secret, b.lease_secret);
        // Someone else registering a's address: refused, a untouched.
        let st = register_err(&svc, request()).await;
        assert_eq!(st.code(), tonic::Code::FailedPrecondition);
        assert!(st.message().contains("registered already"), "{st:?}");
        // a itself, with its secret, renews.
        let again = svc
            .register(Request::new(RegisterRequest {
                lease_secret: a.lease_secret.clone(),
                ..request()
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (again.replica_id, &again.lease_secret),
            (a.replica_id, &a.lease_secret)
        );
        let long = "x".repeat(MAX_ADDRESS + 1);
        for req in [
            RegisterRequest {
                member: long.clone(),
                ..request()
            },
            RegisterRequest {
                model_id: long.clone(),
                ..request()
            },
            RegisterRequest {
                address: format!("http://{long}:1"),
                ..request()
            },
            RegisterRequest {
                lease_secret: long.clone(),
                ..request()
            },
            RegisterRequest {
                input_shape: vec![1; MAX_DIMS + 1],
                ..request()
            },
        ] {
            let st = register_err(&svc, req).await;
            assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
            assert!(st.message().contains("at most"), "{st:?}");
        }
        assert_eq!(svc.membership().lock().unwrap().replicas("big").len(), 2);
    }

    #[test]
    fn an_unspecified_host_becomes_the_callers_address() {
        let peer: SocketAddr = "192.168.1.7:40000".parse().unwrap();
        assert_eq!(
            resolve_address("f", "http://0.0.0.0:50051", Some(peer)).unwrap(),
            "http://192.168.1.7:50051"
        );
        let peer6: SocketAddr = "[fe80::1]:40000".parse().unwrap();
        assert_eq!(
            resolve_address("f", "http://[::]:50051", Some(peer6)).unwrap(),
            "http://[fe80::1]:50051"
        );
        // An IPv4 caller seen through an IPv6 socket.
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:1".parse().unwrap();
        assert_eq!(
            resolve_address("f", "http://0.0.0.0:9", Some(mapped)).unwrap(),
            "http://10.1.2.3:9"
        );
        assert_eq!(
            resolve_address("f", "HTTP://Teacher-1:50051/", Some(peer)).unwrap(),
            "http://teacher-1:50051"
        );
    }

    #[test]
    fn the_reflection_descriptor_set_has_the_registry() {
        let fds = distill_proto::FILE_DESCRIPTOR_SET;
        let has = |needle: &[u8]| fds.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"distill/v1/registry.proto"));
        assert!(has(b"Registry"));
        assert!(has(b"HeartbeatRequest"));
    }

    #[tokio::test]
    async fn tick_expires_leases_and_wakes_waiters() {
        let svc = service();
        svc.register(Request::new(request())).await.unwrap();
        let changed = svc.changed();
        let woken = changed.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let events = tick(&svc, Instant::now() + Duration::from_secs(10));
        assert!(events.iter().any(|e| matches!(e, Event::Removed { .. })));
        // Already notified: completes without waiting.
        woken.await;
        assert!(!svc.membership().lock().unwrap().is_up("big"));
    }
}
