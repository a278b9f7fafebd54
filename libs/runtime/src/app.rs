//! The shape every service's `Application` has, and the `main` that runs
//! one, so the five binaries share one start-up and shutdown sequence:
//! telemetry → config (a bad value prints what is wrong and exits 64 before
//! anything binds) → build (binds, connects lazily) → serve until SIGTERM /
//! SIGINT → drain → flush telemetry.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;

use crate::config::{ConfigError, Env, ProcessEnv, ServiceDefaults, TelemetryConfig};
use crate::host::HostError;
use crate::shutdown::Shutdown;
use crate::telemetry;

/// Exit code for a configuration error: 64 (EX_USAGE), as the README
/// documents.
pub const EXIT_CONFIG: u8 = 64;

/// A hibiki service: built from its config, run until shutdown.
pub trait Service: Sized + Send + 'static {
    /// The service's settings.
    type Config: Send + 'static;

    /// The service's name and default ports.
    const DEFAULTS: ServiceDefaults;

    /// Reads the settings from `env`.
    fn config_from_env(env: &dyn Env) -> Result<Self::Config, ConfigError>;

    /// Binds listeners and prepares stores; does not wait for the stores.
    fn build(config: Self::Config) -> impl Future<Output = Result<Self, HostError>> + Send;

    /// The bound gRPC address.
    fn grpc_addr(&self) -> SocketAddr;

    /// The bound metrics address.
    fn metrics_addr(&self) -> SocketAddr;

    /// Serves until `shutdown` is triggered, then drains.
    fn run_until_stopped(
        self,
        shutdown: Shutdown,
    ) -> impl Future<Output = Result<(), HostError>> + Send;
}

/// The whole `main` of a service binary.
pub fn main<S: Service>() -> ExitCode {
    let telemetry_config =
        match TelemetryConfig::from_env(&ProcessEnv, &format!("hibiki-{}", S::DEFAULTS.name)) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("hibiki-{}: invalid configuration: {e}", S::DEFAULTS.name);
                return ExitCode::from(EXIT_CONFIG);
            }
        };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    runtime.block_on(async move {
        let guard = match telemetry::init(&telemetry_config) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("hibiki-{}: {e}", S::DEFAULTS.name);
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        let service = S::DEFAULTS.name;
        let config = match S::config_from_env(&ProcessEnv) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(service, variable = %e.var, reason = %e.reason, "invalid configuration");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        let app = match S::build(config).await {
            Ok(app) => app,
            Err(e) => {
                tracing::error!(service, error = %e, "cannot start");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(service, grpc = %app.grpc_addr(), metrics = %app.metrics_addr(), "listening");
        let shutdown = Shutdown::new();
        shutdown.trigger_on_signals();
        let result = app.run_until_stopped(shutdown).await;
        let code = match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(service, error = %e, "stopped with an error");
                ExitCode::FAILURE
            }
        };
        guard.shutdown();
        code
    })
}
