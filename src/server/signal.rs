//! The signals that stop a server.

use std::future::Future;

/// Resolves on SIGTERM or Ctrl-C.
///
/// The SIGTERM handler is installed when this is called, not when the future is first
/// polled, so a SIGTERM that arrives before serving starts is still a graceful stop (the
/// default action would kill the process). Call it from within the runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send {
    #[cfg(unix)]
    let terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    async move {
        let ctrl_c = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        #[cfg(unix)]
        let terminate = async {
            match terminate {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(err) => {
                    tracing::error!(%err, "cannot listen for SIGTERM");
                    std::future::pending::<()>().await;
                }
            }
        };
        #[cfg(not(unix))]
        let terminate = std::future::pending::<()>();
        tokio::select! {
            () = ctrl_c => {},
            () = terminate => {},
        }
        tracing::info!("shutdown requested; draining in-flight calls");
    }
}
