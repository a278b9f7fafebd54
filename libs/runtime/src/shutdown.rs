//! Graceful shutdown: one token per process (or per service in `hibiki dev`),
//! cancelled by SIGTERM / SIGINT or by a test. Tasks select on
//! [`Shutdown::cancelled`] and finish their current unit of work.

use tokio_util::sync::CancellationToken;

/// A cloneable shutdown signal.
#[derive(Debug, Clone, Default)]
pub struct Shutdown(CancellationToken);

impl Shutdown {
    /// A signal not yet triggered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Triggers shutdown.
    pub fn trigger(&self) {
        self.0.cancel();
    }

    /// Whether shutdown was triggered.
    pub fn is_triggered(&self) -> bool {
        self.0.is_cancelled()
    }

    /// Completes when shutdown is triggered.
    pub async fn cancelled(&self) {
        self.0.cancelled().await;
    }

    /// A child signal: triggered with this one, or on its own.
    pub fn child(&self) -> Self {
        Self(self.0.child_token())
    }

    /// Triggers `other` as soon as this signal is triggered: a service's
    /// own background tasks, started in `build` before the run's signal
    /// exists, stop with the run.
    pub fn forward_to(&self, other: &Shutdown) {
        let (this, other) = (self.clone(), other.clone());
        tokio::spawn(async move {
            this.cancelled().await;
            other.trigger();
        });
    }

    /// A `'static` future that completes on shutdown.
    pub fn wait(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.0.clone().cancelled_owned()
    }

    /// Triggers this signal on the first SIGTERM or SIGINT. Returns at once;
    /// the listener runs in the background.
    pub fn trigger_on_signals(&self) {
        let token = self.0.clone();
        tokio::spawn(async move {
            let signal = wait_for_signal().await;
            tracing::info!(signal, "shutdown requested");
            token.cancel();
        });
    }
}

/// Completes on SIGTERM (Kubernetes) or SIGINT (Ctrl-C), naming which.
pub async fn wait_for_signal() -> &'static str {
    let ctrl_c = async {
        tokio::signal::ctrl_c()
            .await
            .expect("installing the SIGINT handler");
    };
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => "SIGINT",
            _ = term.recv() => "SIGTERM",
        }
    }
    #[cfg(not(unix))]
    {
        ctrl_c.await;
        "SIGINT"
    }
}
