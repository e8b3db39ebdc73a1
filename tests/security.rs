//! A run on a network nobody is trusted on: every role a separate process over mutual TLS with
//! a token per role, made by `distill credentials`; and the attacks on it, over the same real
//! sockets, each failing with the status that says why.
//!
//! `a_full_run_over_mutual_tls_with_a_token_per_role_and_the_attacks_on_it_fail`: a static
//! teacher and a registered one (member `t`), a coordinator and two workers. Before the workers
//! come: plaintext and certificate-less clients get no answer; a missing token is
//! UNAUTHENTICATED and another role's token PERMISSION_DENIED (status, joining, registering,
//! inferring); health needs nothing. With the register token, evicting the registered replica
//! by registering its address, a forged heartbeat and a forged deregistration change nothing.
//! Then the run completes with both replicas answering.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    Procs, distill, logs, read_report, small_run, spawn_server, start, static_member,
    train_teacher, wait_with_deadline, write_config,
};
use distill_core::data::Dataset;
use distill_proto::pb;
use distill_proto::pb::coordinator_client::CoordinatorClient;
use distill_proto::pb::registry_client::RegistryClient;
use distill_proto::pb::teacher_client::TeacherClient;
use distill_transport::{ClientSecurity, TlsArgs, Token};
use tonic::Code;

/// How a test client dials: TLS or not, a client certificate or not, which role's token.
struct As<'a> {
    tls: bool,
    cert: bool,
    token: Option<&'a str>,
}

const NOBODY: As = As {
    tls: true,
    cert: true,
    token: None,
};

fn role(token: &str) -> As<'_> {
    As {
        tls: true,
        cert: true,
        token: Some(token),
    }
}

fn security(creds: &Path, who: &As) -> ClientSecurity {
    let tls = TlsArgs {
        tls_ca: who.tls.then(|| creds.join("ca.pem")),
        tls_cert: who.cert.then(|| creds.join("worker.pem")),
        tls_key: who.cert.then(|| creds.join("worker.key")),
    };
    let token = who
        .token
        .map(|r| Token::from_file(&creds.join(format!("{r}.token"))).unwrap());
    ClientSecurity::new(&tls, token.as_ref()).unwrap()
}

/// A channel to `addr` (HOST:PORT) as `who`; https when `who` uses TLS.
fn channel(creds: &Path, addr: &str, who: &As) -> distill_transport::AuthChannel {
    let sec = security(creds, who);
    let url = sec.url(addr);
    let ep = sec
        .endpoint(&url)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    sec.channel(ep)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The status code of `RunStatus` on `addr` as `who` (`Ok` when it answered).
fn status_code(creds: &Path, addr: &str, who: &As) -> Code {
    rt().block_on(async {
        let mut c = CoordinatorClient::new(channel(creds, addr, who));
        match c.run_status(pb::RunStatusRequest {}).await {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        }
    })
}

fn join_code(creds: &Path, addr: &str, who: &As) -> Code {
    rt().block_on(async {
        let mut c = CoordinatorClient::new(channel(creds, addr, who));
        let req = pb::JoinRequest {
            worker_id: "intruder".into(),
            ..Default::default()
        };
        match c.join(req).await {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        }
    })
}

fn describe_code(creds: &Path, addr: &str, who: &As) -> Code {
    rt().block_on(async {
        let mut c = TeacherClient::new(channel(creds, addr, who));
        match c.describe(pb::DescribeRequest {}).await {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        }
    })
}

fn config(d: &Path, teacher: &str) -> PathBuf {
    let mut cfg = small_run("run");
    cfg.epochs = 2;
    cfg.seed = 3;
    cfg.min_workers = 2;
    cfg.sync.every = 5;
    cfg.sync.state_every_secs = 0.0;
    cfg.members = vec![static_member("t", &[&format!("https://{teacher}")])];
    write_config(d, "run", &cfg)
}

/// The TLS flags of role `name`, and the token files given as `(flag, role)`.
fn flags(creds: &Path, name: &str, tokens: &[(&str, &str)]) -> Vec<String> {
    let p = |f: &str| creds.join(f).display().to_string();
    let mut v = vec![
        "--tls-cert".into(),
        p(&format!("{name}.pem")),
        "--tls-key".into(),
        p(&format!("{name}.key")),
        "--tls-ca".into(),
        p("ca.pem"),
    ];
    for (flag, role) in tokens {
        v.push(format!("--{flag}"));
        v.push(p(&format!("{role}.token")));
    }
    v
}

#[test]
fn a_full_run_over_mutual_tls_with_a_token_per_role_and_the_attacks_on_it_fail() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let creds = d.join("creds");
    let out = distill()
        .args(["credentials", "--out"])
        .arg(&creds)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for f in ["ca.key", "teacher.key", "worker.token", "infer.token"] {
            let mode = std::fs::metadata(creds.join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{f} is readable by others: {mode:o}");
        }
    }
    // Credentials are never overwritten.
    let again = distill()
        .args(["credentials", "--out"])
        .arg(&creds)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("never overwritten"));

    let data = Dataset::load("synthetic:0").unwrap();
    train_teacher(&data, "mlp:784-64-10", 1, &d.join("teacher.safetensors"));
    let mut procs = Procs(Vec::new());
    let teacher = |procs: &mut Procs, log: &str, extra: &[String]| {
        let mut cmd = distill();
        cmd.arg("teacher-server")
            .arg("--model")
            .arg(d.join("teacher.safetensors"))
            .args(["--listen", "127.0.0.1:0", "--member", "t"])
            .args(flags(&creds, "teacher", &[("infer-token-file", "infer")]))
            .args(extra);
        start(procs, cmd, &d.join(log))
    };
    let static_teacher = teacher(&mut procs, "teacher-1.log", &[]);

    // The teacher: only the infer token calls it.
    assert_eq!(
        describe_code(&creds, &static_teacher, &NOBODY),
        Code::Unauthenticated
    );
    assert_eq!(
        describe_code(&creds, &static_teacher, &role("worker")),
        Code::Unauthenticated,
        "a token of another server is no credential here"
    );
    assert_eq!(
        describe_code(&creds, &static_teacher, &role("infer")),
        Code::Ok
    );

    let cfg = config(d, &static_teacher);
    let mut cmd = distill();
    cmd.arg("coordinator")
        .arg("--config")
        .arg(&cfg)
        .args(["--listen", "127.0.0.1:0"])
        .args(flags(
            &creds,
            "coordinator",
            &[
                ("worker-token-file", "worker"),
                ("register-token-file", "register"),
                ("status-token-file", "status"),
                ("infer-token-file", "infer"),
            ],
        ));
    let (coordinator, coord) = spawn_server(cmd, &d.join("coordinator.log"));

    // Plaintext, and TLS without a client certificate: no call gets through.
    let plain = As {
        tls: false,
        cert: false,
        token: Some("status"),
    };
    assert_ne!(status_code(&creds, &coord, &plain), Code::Ok);
    let anonymous = As {
        tls: true,
        cert: false,
        token: Some("status"),
    };
    assert_ne!(status_code(&creds, &coord, &anonymous), Code::Ok);
    // Status: the status token only.
    assert_eq!(status_code(&creds, &coord, &NOBODY), Code::Unauthenticated);
    assert_eq!(
        status_code(&creds, &coord, &role("worker")),
        Code::PermissionDenied
    );
    assert_eq!(status_code(&creds, &coord, &role("status")), Code::Ok);
    // Joining: a stranger, and a replica's token, are refused.
    assert_eq!(join_code(&creds, &coord, &NOBODY), Code::Unauthenticated);
    assert_eq!(
        join_code(&creds, &coord, &role("register")),
        Code::PermissionDenied
    );
    // Health needs no credential (orchestrators probe it).
    rt().block_on(async {
        let mut h =
            tonic_health::pb::health_client::HealthClient::new(channel(&creds, &coord, &NOBODY));
        let r = h
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap();
        assert_eq!(r.into_inner().status, 1, "SERVING");
    });

    // A second replica registers itself over TLS with the register token.
    let reg_flags = vec![
        "--register".to_string(),
        coord.clone(),
        "--register-token-file".into(),
        creds.join("register.token").display().to_string(),
    ];
    let mut cmd = distill();
    cmd.env("RUST_LOG", "info")
        .arg("teacher-server")
        .arg("--model")
        .arg(d.join("teacher.safetensors"))
        .args(["--listen", "127.0.0.1:0", "--member", "t"])
        .args(flags(&creds, "teacher", &[("infer-token-file", "infer")]))
        .args(&reg_flags);
    let registered = start(&mut procs, cmd, &d.join("teacher-2.log"));
    let reg_log = d.join("teacher-2.log");
    let replica_id = common::wait_until(Duration::from_secs(60), "the registration", || {
        let log = std::fs::read_to_string(&reg_log).ok()?;
        let line = log
            .lines()
            .find(|l| l.contains("registered with the coordinator"))?;
        let id = line.split("replica=").nth(1)?.split_whitespace().next()?;
        id.parse::<u64>().ok()
    });
    let registered_url = format!("https://{registered}");
    rt().block_on(async {
        let register_req = || pb::RegisterRequest {
            member: "t".into(),
            address: registered_url.clone(),
            model_id: "mlp:784-64-10@0000000000000000".into(),
            weights_digest: "0".repeat(64),
            input_shape: vec![784],
            num_classes: 10,
            max_batch: 1024,
            lease_secret: String::new(),
        };
        // Registering needs the register token.
        let mut stranger = RegistryClient::new(channel(&creds, &coord, &role("worker")));
        let st = stranger.register(register_req()).await.unwrap_err();
        assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
        // Even with it, nobody can take over, keep or end another's registration.
        let mut insider = RegistryClient::new(channel(&creds, &coord, &role("register")));
        let st = insider.register(register_req()).await.unwrap_err();
        assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
        assert!(st.message().contains("registered already"), "{st:?}");
        let hb = insider
            .heartbeat(pb::HeartbeatRequest {
                replica_id,
                address: registered_url.clone(),
                in_flight: 1000,
                max_in_flight: 1000,
                lease_secret: "0".repeat(64),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!hb.valid, "a forged heartbeat was accepted");
        let gone = insider
            .deregister(pb::DeregisterRequest {
                replica_id,
                address: registered_url.clone(),
                lease_secret: "0".repeat(64),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!gone.removed, "a forged deregistration removed the replica");
    });

    let worker = |id: &str| {
        distill()
            .arg("student-worker")
            .args(["--coordinator", &coord])
            .args(["--worker-id", id])
            .args(flags(&creds, "worker", &[("worker-token-file", "worker")]))
            .arg("--work-dir")
            .arg(d.join(id))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(d.join(format!("{id}.log"))).unwrap())
            .spawn()
            .unwrap()
    };
    let (w1, w2) = (worker("w1"), worker("w2"));
    for (w, name) in [(w1, "w1"), (w2, "w2")] {
        let st = wait_with_deadline(w, Duration::from_secs(300), name);
        assert!(st.success(), "{name}: {st:?}\n{}", logs(d));
    }
    let st = wait_with_deadline(coordinator, Duration::from_secs(60), "the coordinator");
    assert!(st.success(), "coordinator: {st:?}\n{}", logs(d));

    let r = read_report(&d.join("run"));
    let n = |k: &str| common::count(&r, k);
    assert_eq!(n("batches_trained"), n("batches_expected"), "{r}");
    assert_eq!(n("degraded_batches"), 0, "{r}");
    // Both replicas served: the forged calls neither evicted the registered one nor kept it
    // out of rotation.
    let by = r["members"][0]["answered_by"].as_object().unwrap();
    assert_eq!(by.len(), 2, "{r}");
    assert!(
        by.keys().any(|a| a.contains(&registered)),
        "{r} (registered {registered})"
    );
    let log = std::fs::read_to_string(&reg_log).unwrap();
    assert!(
        !log.contains("registering again"),
        "the registered teacher lost its registration:\n{log}"
    );
}
