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
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    tokio::spawn(wait_for_signal(token.clone()));
    token
}

async fn wait_for_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot install the SIGTERM handler; only Ctrl-C stops this process");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown signal received");
    token.cancel();
}
