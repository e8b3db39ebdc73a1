//! The distill coordinator: reads and shards the data, leases batches to student workers,
//! asks the teacher ensemble for soft targets ahead of need, and keeps the run's state and
//! report in its run directory.
//!
//! Layout (see `docs/architecture.md`): [`domain`] holds the pure state machines (the
//! [`domain::run_state::RunState`] with its ledger, rounds and worker table); [`driver`] is the
//! one task that owns that state and performs its decisions; [`teachers`] asks the ensemble;
//! [`store`] keeps the run state and the soft-target cache on disk; [`api`] assembles the server
//! and holds the thin gRPC handlers. The binary is thin: it parses flags, binds the listener and
//! calls [`serve`]; tests and `distill demo` call [`prepare`] and [`serve`] in-process.

pub mod api;
pub mod cli;
pub mod config;
pub mod discovery;
pub mod domain;
pub mod driver;
pub mod error;
pub mod fill;
pub mod membership;
pub mod registry;
pub mod report_html;
pub mod security;
pub mod store;
pub mod teachers;
pub mod telemetry;
pub mod transfer;

pub use api::serve;
pub use config::RunConfig;
pub use domain::report::RunReport;
pub use driver::context::Run;
pub use error::{Error, Result};
pub use registry::RegistryService;
pub use security::Security;
pub use store::cache;

/// [`prepare_with`] in plaintext with no credential (a trusted loopback: tests, the demo).
pub async fn prepare(cfg: RunConfig) -> Result<Run> {
    prepare_with(cfg, Security::plaintext()).await
}

/// Loads the run's data set (off the async threads), builds the run under `security`, asks
/// the teachers what they serve and opens the soft-target cache under the run's key.
pub async fn prepare_with(cfg: RunConfig, security: Security) -> Result<Run> {
    let (source, transfer, eval) = (cfg.data.clone(), cfg.transfer.clone(), cfg.eval.clone());
    let lm = cfg.lm_options();
    let data = tokio::task::spawn_blocking(move || match lm {
        Some(lm) => {
            let source: distill_core::data::DataSource = source
                .parse()
                .map_err(|e| Error::Config(format!("`data`: {e}")))?;
            Ok(source.load_with(&lm.token_options())?)
        }
        None => transfer::assemble(&source, transfer.as_ref(), eval.as_ref()),
    })
    .await
    .map_err(|e| Error::Internal(format!("data loading task: {e}")))??;
    tracing::info!(
        data = %data.source,
        train = data.train.len(),
        test = data.test.len(),
        classes = data.classes,
        "data loaded"
    );
    let mut run = Run::new(cfg, data, security)?;
    let ctx = run.ctx.clone();
    // A sequence member is described for the windows' inputs, L tokens.
    let row_len = match &ctx.data.tokens {
        Some(t) => t.seq_len,
        None => ctx.data.row_len(),
    };
    let digests = ctx.pool.check_models(row_len, ctx.data.classes).await?;
    // `check_models` pinned them as it recorded the replicas; pinned again here so that the
    // cache key and the membership can never disagree.
    ctx.pool.pin_digests(&digests)?;
    drop(ctx);
    tokio::task::spawn_blocking(move || run.open_cache(&digests).map(|()| run))
        .await
        .map_err(|e| Error::Internal(format!("cache task: {e}")))?
}
