//! Teacher discovery through DNS: a member endpoint `dns://NAME:PORT` stands for every address
//! `NAME` resolves to, each a replica at `PORT`, resolved again every
//! `[membership] dns_refresh_secs` — on Kubernetes, a headless Service in front of a teacher
//! Deployment, so that scaling the Deployment adds and removes replicas during a run.
//!
//! This task only resolves; what an answer does to the membership (new replicas probed before
//! they take a request, lost ones removed) is decided by the state machine
//! ([`crate::domain::membership::discovered`]).
//!
//! - **Resolvers.** The system's (`getaddrinfo` through tokio), or, with
//!   `[membership] dns_hosts_file`, a file in `/etc/hosts` format read again at every refresh
//!   (air-gapped set-ups, and the tests, which point one name at several loopback addresses).
//! - **A failed lookup changes nothing**: the member keeps the replicas of the last answer
//!   (they still leave rotation if they stop answering). Only an answer removes replicas, so
//!   a DNS outage cannot empty the ensemble. A hosts file without the name is an empty answer.
//! - **Dialling.** A replica is dialled by IP address, with the scheme the teachers' TLS
//!   settings give (`http`, or `https`); with TLS its certificate must carry `NAME`, the name
//!   it was found under, not its address (pod addresses are not known when certificates are
//!   made).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::driver::context::RunContext;

/// A `dns://NAME:PORT` endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsName {
    /// The name to resolve (also the TLS server name of its replicas).
    pub host: String,
    /// The replicas' port.
    pub port: u16,
}

impl DnsName {
    /// `Some` for an endpoint in the `dns://` scheme (an error when the rest is not
    /// `NAME:PORT`), `None` for any other endpoint.
    pub fn parse(endpoint: &str) -> Option<Result<Self, String>> {
        let rest = endpoint.strip_prefix("dns://")?;
        let bad = |why: &str| Err(format!("`{endpoint}`: {why}; expected dns://name:port"));
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let Some((host, port)) = rest.rsplit_once(':') else {
            return Some(bad("no port"));
        };
        let Ok(port) = port.parse::<u16>() else {
            return Some(bad("the port is not a number from 1 to 65535"));
        };
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.';
        if host.is_empty() || !host.chars().all(valid) || port == 0 {
            return Some(bad(
                "the name must be a DNS name (letters, digits, `-`, `.`)",
            ));
        }
        Some(Ok(Self {
            host: host.to_ascii_lowercase(),
            port,
        }))
    }
}

/// Where names are resolved.
#[derive(Debug, Clone)]
pub enum Resolver {
    /// The system resolver.
    System,
    /// A hosts-format file, read at every lookup.
    HostsFile(PathBuf),
}

impl Resolver {
    /// The addresses of `name` at `port`, in a stable order.
    pub async fn resolve(&self, name: &DnsName) -> Result<Vec<SocketAddr>, String> {
        let mut out: Vec<SocketAddr> = match self {
            Resolver::System => tokio::net::lookup_host((name.host.as_str(), name.port))
                .await
                .map_err(|e| format!("resolving {}: {e}", name.host))?
                .collect(),
            Resolver::HostsFile(path) => {
                // A small local file: read in place rather than on the blocking pool.
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                hosts_lookup(&text, &name.host)
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, name.port))
                    .collect()
            }
        };
        out.sort();
        out.dedup();
        Ok(out)
    }
}

/// The addresses `host` has in a hosts-format `text` (comments and malformed lines skipped).
fn hosts_lookup(text: &str, host: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|line| {
            let line = line.split('#').next().unwrap_or("");
            let mut words = line.split_whitespace();
            let ip: IpAddr = words.next()?.parse().ok()?;
            words.any(|w| w.eq_ignore_ascii_case(host)).then_some(ip)
        })
        .collect()
}

/// Every `dns://` endpoint of the run, with its member.
fn names(ctx: &RunContext) -> Vec<(String, DnsName)> {
    ctx.cfg
        .members
        .iter()
        .flat_map(|m| {
            m.endpoints
                .iter()
                .filter_map(|e| DnsName::parse(e)?.ok())
                .map(|n| (m.name.clone(), n))
        })
        .collect()
}

/// Resolves every `dns://` endpoint now and every `dns_refresh_secs` until `stop`, handing
/// each answer to the membership. Returns at once when the run has none.
pub async fn run(ctx: Arc<RunContext>, stop: CancellationToken) {
    let names = names(&ctx);
    if names.is_empty() {
        return;
    }
    let ms = &ctx.cfg.membership;
    let resolver = match &ms.dns_hosts_file {
        Some(p) => Resolver::HostsFile(p.clone()),
        None => Resolver::System,
    };
    let period = Duration::from_secs_f64(ms.dns_refresh_secs);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for (member, name) in &names {
            refresh(&ctx, &resolver, member, name).await;
        }
    }
}

async fn refresh(ctx: &RunContext, resolver: &Resolver, member: &str, name: &DnsName) {
    let found = match resolver.resolve(name).await {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(%member, error = %e, "DNS lookup failed; the member keeps its replicas");
            return;
        }
    };
    let urls: Vec<String> = found
        .iter()
        .map(|a| ctx.security.teachers.url(&a.to_string()))
        .collect();
    let result = ctx.pool.membership().update(|m| {
        let out = m.discovered(member, &name.host, urls, Instant::now());
        (out.value, out.events)
    });
    match result {
        Ok(Ok(d)) => {
            if !d.held_elsewhere.is_empty() {
                tracing::warn!(%member, name = %name.host, addresses = ?d.held_elsewhere, "addresses already served by another replica are not added");
            }
            if !d.over_limit.is_empty() {
                tracing::warn!(%member, name = %name.host, addresses = ?d.over_limit, "more addresses than membership.max_replicas_per_member; the rest wait");
            }
        }
        Ok(Err(e)) => tracing::warn!(%member, error = %e, "DNS answer not applied"),
        Err(e) => tracing::error!(%member, error = %e, "DNS answer not applied"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_endpoints_parse_and_others_are_left_alone() {
        assert_eq!(
            DnsName::parse("dns://Teacher-Big.ns.svc:50051"),
            Some(Ok(DnsName {
                host: "teacher-big.ns.svc".into(),
                port: 50051
            }))
        );
        assert_eq!(DnsName::parse("http://h:1"), None);
        for bad in [
            "dns://h",
            "dns://h:0",
            "dns://h:x",
            "dns://:5",
            "dns://a b:5",
            "dns://h:70000",
        ] {
            let e = DnsName::parse(bad).unwrap().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn a_hosts_file_gives_every_address_of_a_name() {
        let text = "# comment\n127.0.0.2 t.test other\n::1 t.test\nnot-an-ip t.test\n127.0.0.3 T.TEST # tail\n127.0.0.9 u.test\n";
        let ips = hosts_lookup(text, "t.test");
        let want: Vec<IpAddr> = ["127.0.0.2", "::1", "127.0.0.3"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(ips, want);
        assert!(hosts_lookup(text, "v.test").is_empty());
    }
}
