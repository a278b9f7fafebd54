//! The shape every service's `Application` has, and the `main` that runs
//! one, so the five binaries share one start-up and shutdown sequence:
//! telemetry → config (a bad value prints what is wrong and exits 64 before
//! anything binds) → build (binds, connects lazily) → serve until SIGTERM /
//! SIGINT → drain → flush telemetry.
//!
//! Every binary takes one optional command:
//! - none, or `serve`: the service, as above;
//! - `migrate`: apply the service's database migrations and exit (0 when
//!   applied, 1 when PostgreSQL refused); Kubernetes runs it as an init
//!   container, so a new version's schema is in place before its pods serve;
//! - `settings`: print the `HIBIKI_*` variables the service reads, one per
//!   line;
//! - `help`, `version`.
//!
//! A `HIBIKI_*` variable that is set but read by nothing is logged as a
//! warning at start: a misspelt name would otherwise leave its default in
//! force without a word.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;

use crate::config::{
    ConfigError, Env, ProcessEnv, Recording, RuntimeConfig, ServiceDefaults, TelemetryConfig,
};
use crate::host::{HostError, Needs};
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

    /// The stores the service needs, its schema and migrations among them.
    const NEEDS: Needs;

    /// Reads the settings from `env`.
    fn config_from_env(env: &dyn Env) -> Result<Self::Config, ConfigError>;

    /// The settings every service shares, within the service's own.
    fn runtime_config(config: &Self::Config) -> &RuntimeConfig;

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

/// What the binary was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Serve,
    Migrate,
    Settings,
    Help,
    Version,
}

impl Command {
    fn parse(args: &[String]) -> Result<Self, String> {
        match args {
            [] => Ok(Self::Serve),
            [one] => match one.as_str() {
                "serve" => Ok(Self::Serve),
                "migrate" => Ok(Self::Migrate),
                "settings" => Ok(Self::Settings),
                "help" | "-h" | "--help" => Ok(Self::Help),
                "version" | "-V" | "--version" => Ok(Self::Version),
                other => Err(format!("unknown command {other:?}")),
            },
            _ => Err("takes at most one command".to_owned()),
        }
    }
}

fn usage(name: &str) -> String {
    format!(
        "usage: hibiki-{name} [serve | migrate | settings | help | version]\n\n\
         \x20 serve     run the service until SIGTERM (the default)\n\
         \x20 migrate   apply the service's database migrations, then exit\n\
         \x20 settings  list the HIBIKI_* variables the service reads\n\n\
         Settings come from HIBIKI_* environment variables; see the README."
    )
}

/// The whole `main` of a service binary.
pub fn main<S: Service>() -> ExitCode {
    let name = S::DEFAULTS.name;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match Command::parse(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hibiki-{name}: {e}\n\n{}", usage(name));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match command {
        Command::Help => {
            println!("{}", usage(name));
            return ExitCode::SUCCESS;
        }
        Command::Version => {
            println!("hibiki-{name} {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Command::Settings => {
            // Read from an empty environment: every setting is asked for
            // with its default, so the list does not depend on what is set.
            let empty = std::collections::HashMap::<String, String>::new();
            let recording = Recording::new(&empty);
            let _ = TelemetryConfig::from_env(&recording, &format!("hibiki-{name}"));
            let _ = S::config_from_env(&recording);
            for setting in recording.asked() {
                println!("{setting}");
            }
            return ExitCode::SUCCESS;
        }
        Command::Serve | Command::Migrate => {}
    }
    let recording = Recording::new(&ProcessEnv);
    let telemetry_config =
        match TelemetryConfig::from_env(&recording, &format!("hibiki-{}", S::DEFAULTS.name)) {
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
        let config = match S::config_from_env(&recording) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(service, variable = %e.var, reason = %e.reason, "invalid configuration");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        let set: Vec<String> = std::env::vars_os()
            .filter_map(|(k, _)| k.into_string().ok())
            .collect();
        for variable in recording.unread(set.iter().map(String::as_str)) {
            tracing::warn!(
                service,
                variable,
                "set but not read by this service: misspelt, or another service's setting \
                 (`hibiki-{service} settings` lists the ones it reads)"
            );
        }
        if command == Command::Migrate {
            let code = migrate(S::NEEDS, S::runtime_config(&config)).await;
            guard.shutdown();
            return code;
        }
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

/// `migrate`: applies the service's migrations once and reports.
async fn migrate(needs: Needs, config: &RuntimeConfig) -> ExitCode {
    let service = config.service;
    let Some((schema, migrator)) = needs.postgres else {
        tracing::info!(service, "no database schema: nothing to migrate");
        return ExitCode::SUCCESS;
    };
    let applied = async {
        let pool = crate::postgres::connect_lazy(&config.postgres, schema)?;
        crate::postgres::migrate(&pool, schema, migrator).await?;
        pool.close().await;
        Ok::<_, crate::postgres::PostgresError>(())
    };
    match applied.await {
        Ok(()) => {
            tracing::info!(service, schema, "migrations applied");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(service, schema, error = %e, "migrations not applied");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Command;

    #[test]
    fn commands_parse_and_strangers_are_refused() {
        let parse = |args: &[&str]| {
            Command::parse(&args.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>())
        };
        assert_eq!(parse(&[]), Ok(Command::Serve));
        assert_eq!(parse(&["serve"]), Ok(Command::Serve));
        assert_eq!(parse(&["migrate"]), Ok(Command::Migrate));
        assert_eq!(parse(&["settings"]), Ok(Command::Settings));
        assert_eq!(parse(&["--help"]), Ok(Command::Help));
        assert_eq!(parse(&["--version"]), Ok(Command::Version));
        assert!(parse(&["migrat"]).unwrap_err().contains("\"migrat\""));
        assert!(parse(&["migrate", "now"]).is_err());
    }
}
