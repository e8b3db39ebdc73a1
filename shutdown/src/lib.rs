//! The one shutdown path every distill server and worker shares: SIGINT or SIGTERM cancels a
//! root [`CancellationToken`] (STYLE.md, "One shutdown path").
//!
//! Why a crate of its own: three role crates (teacher server, coordinator, student worker) and
//! the root CLI install it, so it needs one copy that all of them can depend on. It is not
//! protocol code, so it does not belong in `distill-proto`; `distill-core` must stay free of tokio;
//! the root crate depends on the roles, not the other way round. A five-line copy in each role
//! would drift (the SIGTERM fallback below is the part that differs between naive copies).

use tokio_util::sync::CancellationToken;
/// A token cancelled on the first SIGINT (Ctrl-C) or SIGTERM; must be called inside a tokio
/// runtime.
///
/// The handlers are registered before this returns, not in the spawned task: a process that
/// prints `listening on` after calling this can be stopped by a signal sent the moment that
/// line is read (otherwise the default action, termination without a clean shutdown, could win
/// the race).
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    tokio::spawn(wait_for_signal(Handlers::install(), token.clone()));
    token
}

struct Handlers {
    #[cfg(unix)]
    unix: std::io::Result<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Handlers {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let unix = signal(SignalKind::interrupt())
                .and_then(|int| Ok((int, signal(SignalKind::terminate())?)));
            Handlers { unix }
        }
        #[cfg(not(unix))]
        Handlers {}
    }
}

async fn wait_for_signal(handlers: Handlers, token: CancellationToken) {
    #[cfg(unix)]
    match handlers.unix {
        Ok((mut int, mut term)) => {
            tokio::select! {
                _ = int.recv() => {},
                _ = term.recv() => {},
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot install the SIGINT/SIGTERM handlers; only Ctrl-C stops this process");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    #[cfg(not(unix))]
    {
        let _ = handlers;
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown signal received");
    token.cancel();
}
