//! The one shutdown path every distill server and worker shares: SIGINT or SIGTERM cancels a
//! root [`CancellationToken`].

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
