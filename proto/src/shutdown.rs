//! The signal that starts a graceful stop.

/// Resolves on SIGTERM, which Kubernetes sends before it stops a pod, or on SIGINT (Ctrl-C).
///
/// # Panics
/// Panics when the signal handlers cannot be installed, which happens only at start-up.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        #[allow(clippy::expect_used)]
        let mut terminate = signal(SignalKind::terminate()).expect("install the SIGTERM handler");
        tokio::select! {
            _ = terminate.recv() => tracing::info!(signal = "SIGTERM", "shutdown requested"),
            _ = tokio::signal::ctrl_c() => tracing::info!(signal = "SIGINT", "shutdown requested"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!(signal = "ctrl-c", "shutdown requested");
    }
}
