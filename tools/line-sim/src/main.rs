//! The `line-sim` binary: `line-sim serve` plays LINE's Messaging API (and
//! its admin API) until SIGTERM or Ctrl-C; `line-sim storm` posts signed
//! webhooks to a gateway. `line-sim --help` lists every setting.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use hibiki_line::api::{Endpoint, Limit};
use hibiki_line_sim::storm::{EventKind, StormReport, StormSpec};
use hibiki_line_sim::{Faults, LineSim, SimChannel, SimConfig};

/// A LINE Messaging API simulator for hibiki's development, tests and
/// benchmarks.
#[derive(Debug, Parser)]
#[command(name = "line-sim", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the Messaging API and the admin API.
    Serve(Serve),
    /// Post signed webhooks for many users to a gateway at a set rate.
    Storm(Storm),
}

#[derive(Debug, Args)]
struct Serve {
    /// Where the Messaging API listens (delivery's LINE base URL).
    #[arg(
        long,
        env = "HIBIKI_LINE_SIM_API_ADDR",
        default_value = "127.0.0.1:8090"
    )]
    api_addr: SocketAddr,
    /// Where the admin API listens.
    #[arg(
        long,
        env = "HIBIKI_LINE_SIM_ADMIN_ADDR",
        default_value = "127.0.0.1:8091"
    )]
    admin_addr: SocketAddr,
    /// A channel, as CHANNEL_ID:ACCESS_TOKEN:SECRET (repeatable; more can be
    /// added over the admin API).
    #[arg(long = "channel", value_parser = parse_channel)]
    channels: Vec<SimChannel>,
    /// A rate limit other than LINE's, as ENDPOINT=N/s or ENDPOINT=N/h, e.g.
    /// push=500/s (repeatable).
    #[arg(long = "limit", value_parser = hibiki_line::api::parse_limit)]
    limits: Vec<(Endpoint, Limit)>,
    /// Fraction of requests answered 500 or 503.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Fraction of requests never answered.
    #[arg(long, default_value_t = 0.0)]
    timeout_rate: f64,
    /// Fraction of faulted requests processed before the fault.
    #[arg(long, default_value_t = 0.5)]
    processed_rate: f64,
    /// Extra latency on every answer, as MIN-MAX milliseconds (uniform).
    #[arg(long, value_parser = parse_range)]
    latency_ms: Option<(u64, u64)>,
    /// How long an unanswered request is held before its connection is
    /// dropped, in milliseconds.
    #[arg(long, default_value_t = 60_000)]
    timeout_hold_ms: u64,
    /// Messages each channel may send a month (push and multicast
    /// recipients); unlimited when unset.
    #[arg(long)]
    monthly_quota: Option<u64>,
}

#[derive(Debug, Args)]
struct Storm {
    /// The gateway's webhook URL for the channel.
    #[arg(long, default_value = "http://127.0.0.1:8080/line/webhook/1000000001")]
    url: String,
    /// The channel the webhooks are for.
    #[arg(long, default_value = "1000000001")]
    channel_id: String,
    /// The channel secret to sign with (optional with --sim-admin: the
    /// simulator's own channel secret is used).
    #[arg(long, env = "HIBIKI_LINE_SIM_STORM_SECRET", default_value = "")]
    secret: String,
    /// How many users (one webhook each).
    #[arg(long, default_value_t = 1000)]
    users: u64,
    /// The first user's number (user n is U followed by n in 32 hex digits).
    #[arg(long, default_value_t = 0)]
    first_user: u64,
    /// Webhooks a second.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Event kinds, cycled over the users.
    #[arg(
        long = "kind",
        value_enum,
        value_delimiter = ',',
        default_value = "postback"
    )]
    kinds: Vec<EventKind>,
    /// A postback's data.
    #[arg(long, default_value = "action=join&campaign=spring")]
    postback_data: String,
    /// A text message's text.
    #[arg(long, default_value = "hello")]
    text: String,
    /// Webhooks in flight at most.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// A running line-sim's admin URL: the storm runs there, so its reply
    /// tokens are ones that simulator accepts.
    #[arg(long)]
    sim_admin: Option<String>,
}

fn parse_channel(s: &str) -> Result<SimChannel, String> {
    match s.splitn(3, ':').collect::<Vec<_>>()[..] {
        [id, token, secret] if !id.is_empty() && !token.is_empty() && !secret.is_empty() => {
            Ok(SimChannel {
                channel_id: id.into(),
                access_token: token.into(),
                secret: secret.into(),
            })
        }
        _ => Err("expected CHANNEL_ID:ACCESS_TOKEN:SECRET".into()),
    }
}

fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s.split_once('-').ok_or("expected MIN-MAX")?;
    let (a, b) = (
        a.parse().map_err(|_| "MIN: milliseconds")?,
        b.parse().map_err(|_| "MAX: milliseconds")?,
    );
    if a > b {
        return Err("MIN must not exceed MAX".into());
    }
    Ok((a, b))
}

async fn serve(args: Serve) -> Result<(), String> {
    let (latency_min_ms, latency_max_ms) = args.latency_ms.unwrap_or((0, 0));
    let faults = Faults {
        error_rate: args.error_rate,
        timeout_rate: args.timeout_rate,
        processed_rate: args.processed_rate,
        latency_min_ms,
        latency_max_ms,
        endpoints: Vec::new(),
    };
    faults.check()?;
    let config = SimConfig {
        channels: args.channels,
        limits: args.limits.into_iter().collect(),
        faults,
        timeout_hold: Duration::from_millis(args.timeout_hold_ms),
        monthly_quota: args.monthly_quota,
        ..SimConfig::default()
    };
    let sim = LineSim::start(config, args.api_addr, args.admin_addr)
        .await
        .map_err(|e| e.to_string())?;
    println!("line-sim: Messaging API at {}", sim.api_url());
    println!("line-sim: admin API at {}", sim.admin_url());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot watch SIGTERM: {e}"))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    sim.stop().await;
    Ok(())
}

async fn storm(args: Storm) -> Result<(), String> {
    let spec = StormSpec {
        url: args.url,
        channel_id: args.channel_id,
        secret: args.secret,
        users: args.users,
        first_user: args.first_user,
        rate: args.rate,
        kinds: args.kinds,
        postback_data: args.postback_data,
        text: args.text,
        connections: args.connections,
    };
    let report = match args.sim_admin {
        Some(admin) => storm_in_sim(&admin, &spec).await?,
        None => {
            // No simulator to honour them: reply tokens are random.
            let issue: Arc<dyn Fn(&str) -> String + Send + Sync> =
                Arc::new(|_: &str| hibiki_line_sim::storm::ulid());
            hibiki_line_sim::storm::run(spec, issue, Arc::new(|_: &str, _: u64| {})).await?
        }
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&report).expect("a report serialises")
    );
    if report.accepted == report.sent {
        Ok(())
    } else {
        Err(format!(
            "{} of {} webhooks were not accepted",
            report.sent - report.accepted,
            report.sent
        ))
    }
}

/// Runs the storm in the line-sim at `admin` and waits for its report.
async fn storm_in_sim(admin: &str, spec: &StormSpec) -> Result<StormReport, String> {
    let client = reqwest::Client::new();
    let admin = admin.trim_end_matches('/');
    let answer = client
        .post(format!("{admin}/storms"))
        .body(serde_json::to_vec(spec).expect("a storm serialises"))
        .send()
        .await
        .map_err(|e| format!("line-sim at {admin}: {e}"))?;
    let status = answer.status();
    let text = answer.text().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("line-sim refused the storm: {status} {text}"));
    }
    let started: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let id = started["storm_id"]
        .as_u64()
        .ok_or("line-sim gave no storm id")?;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let report: StormReport = client
            .get(format!("{admin}/storms/{id}"))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        if report.done {
            return Ok(report);
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HIBIKI_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let result = match Cli::parse().command {
        Command::Serve(args) => serve(args).await,
        Command::Storm(args) => storm(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("line-sim: {e}");
            ExitCode::FAILURE
        }
    }
}
