//! `hibiki`: the operator's command line.
//!
//! - `hibiki dev` runs every service in one process, each on its own port,
//!   talking real gRPC over loopback, against the local PostgreSQL and Redis.
//! - `hibiki import contacts.csv --tenant T` streams a CSV into contacts.
//! - `hibiki dlq list|replay --tenant T` shows and replays dead letters.
//! - `hibiki scenario apply -f F --tenant T` applies a scenario; `list`,
//!   `versions`, `enable`, `disable`.
//! - `hibiki stats --tenant T` prints a tenant's live figures; `hibiki watch
//!   --tenant T` follows its segment counts.
//! - `hibiki storm --users N --rate R` runs the campaign storm against a
//!   running mesh and checks every friend.
//! - `hibiki trace collect` receives the mesh's spans over OTLP; `hibiki
//!   trace report FILE` says where the time of a run went.
#![forbid(unsafe_code)]

mod dev;
mod dlq;
mod import;
mod scenario;
mod stats;
mod storm;
mod trace;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// hibiki: LINE official-account marketing at high traffic.
#[derive(Debug, Parser)]
#[command(name = "hibiki", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole mesh in this process against local PostgreSQL and Redis.
    Dev(dev::DevArgs),
    /// Import contacts from a CSV file into a tenant (resumable).
    Import(import::ImportArgs),
    /// Dead letters: LINE calls that failed for good (list, replay).
    Dlq(dlq::DlqArgs),
    /// Scenarios: apply YAML definitions, list, enable, disable.
    Scenario(scenario::ScenarioArgs),
    /// A tenant's segment counts, event rates and deliveries (analytics).
    Stats(stats::StatsArgs),
    /// Follow a tenant's segment counts as they change (analytics).
    Watch(stats::WatchArgs),
    /// The campaign storm against a running mesh: taps from line-sim, then
    /// every friend checked.
    Storm(storm::StormArgs),
    /// Traces: collect the mesh's spans over OTLP, report where the time
    /// went.
    Trace(trace::TraceArgs),
}

/// The services' allocator, also when `hibiki dev` runs them in-process.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    runtime.block_on(async move {
        match cli.command {
            Command::Dev(args) => dev::run(args).await,
            Command::Import(args) => import::run(args).await,
            Command::Dlq(args) => dlq::run(args).await,
            Command::Scenario(args) => scenario::run(args).await,
            Command::Stats(args) => stats::run_stats(args).await,
            Command::Watch(args) => stats::run_watch(args).await,
            Command::Storm(args) => storm::run(args).await,
            Command::Trace(args) => trace::run(args).await,
        }
    })
}
