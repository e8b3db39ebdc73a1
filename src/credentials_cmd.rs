//! `distill credentials --out DIR`: everything a run on a real network needs to start with
//! mutual TLS and a token per role, for trying it out or for a small cluster: a CA, a
//! certificate and key per role signed by it (valid as server and as client, for the hosts
//! given), and one random token per role. A production cluster would rather use its own CA;
//! the flags of every role take any PEM files.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// The roles that get a certificate.
const CERTIFIED: [&str; 3] = ["teacher", "coordinator", "worker"];

/// Flags of `distill credentials`.
#[derive(clap::Args, Debug)]
pub struct CredentialsArgs {
    /// Directory to write into (created; files already there are never overwritten).
    #[arg(long)]
    pub out: PathBuf,
    /// Host names and IP addresses the certificates are valid for (repeatable).
    #[arg(long = "host", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()])]
    pub hosts: Vec<String>,
    /// Days the certificates are valid.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
}

pub fn run(args: CredentialsArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let files = write_all(&args)?;
    println!("wrote into {}:", args.out.display());
    for f in files {
        println!("  {f}");
    }
    println!(
        "each role takes --tls-cert ROLE.pem --tls-key ROLE.key --tls-ca ca.pem, and its \
         tokens with --ROLE-token-file (see docs/security.md)"
    );
    Ok(())
}

fn write_all(args: &CredentialsArgs) -> anyhow::Result<Vec<String>> {
    if args.days == 0 || args.days > 3650 {
        bail!("--days must be 1 to 3650, got {}", args.days);
    }
    let mut names: Vec<String> = vec!["ca.pem".into(), "ca.key".into()];
    for role in CERTIFIED {
        names.push(format!("{role}.pem"));
        names.push(format!("{role}.key"));
    }
    for role in distill_transport::Role::ALL {
        names.push(format!("{}.token", role.name()));
    }
    if let Some(existing) = names.iter().find(|n| args.out.join(n).exists()) {
        bail!(
            "{} exists already; credentials are never overwritten (choose another --out)",
            args.out.join(existing).display()
        );
    }
    let now = time::OffsetDateTime::now_utc();
    let until = now + time::Duration::days(i64::from(args.days));

    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "distill run CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = now;
    ca.not_after = until;
    let ca_key = KeyPair::generate()?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca, ca_key)?;
    write(&args.out.join("ca.pem"), ca.pem().as_bytes(), false)?;
    write(&args.out.join("ca.key"), ca_key_pem.as_bytes(), true)?;

    for role in CERTIFIED {
        let mut leaf = CertificateParams::new(args.hosts.clone())
            .with_context(|| format!("--host {:?}", args.hosts))?;
        leaf.distinguished_name
            .push(DnType::CommonName, format!("distill {role}"));
        leaf.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        leaf.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        leaf.not_before = now;
        leaf.not_after = until;
        let key = KeyPair::generate()?;
        let cert = leaf.signed_by(&key, &ca)?;
        write(
            &args.out.join(format!("{role}.pem")),
            cert.pem().as_bytes(),
            false,
        )?;
        write(
            &args.out.join(format!("{role}.key")),
            key.serialize_pem().as_bytes(),
            true,
        )?;
    }
    for role in distill_transport::Role::ALL {
        let token = distill_transport::secret::random_hex(32);
        write(
            &args.out.join(format!("{}.token", role.name())),
            format!("{token}\n").as_bytes(),
            true,
        )?;
    }
    Ok(names)
}

/// Creates `path` (never replacing a file), readable by its owner only when `secret`.
fn write(path: &Path, bytes: &[u8], secret: bool) -> anyhow::Result<()> {
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}
