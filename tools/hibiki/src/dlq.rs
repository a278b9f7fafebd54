//! `hibiki dlq list` and `hibiki dlq replay`: a tenant's dead letters (LINE
//! calls that failed for good) and putting them back on their queues.
//!
//! ```text
//! hibiki dlq list --tenant demo [--channel 1000000001] [--limit 50]
//! hibiki dlq replay --tenant demo dl-3f2a… dl-9c1e…   # these
//! hibiki dlq replay --tenant demo --all [--channel …]  # every one
//! ```
//!
//! A replay sends each call again with its original retry key, so what LINE
//! had accepted is not sent twice.

use std::process::ExitCode;

use hibiki_proto::common::v1::PageRequest;
use hibiki_proto::delivery::v1::delivery_service_client::DeliveryServiceClient;
use hibiki_proto::delivery::v1::{DeadLetter, ListDeadLettersRequest, ReplayDeadLettersRequest};
use hibiki_runtime::config::{DEV_SERVICE_TOKEN, Secret};
use hibiki_runtime::grpc::{self, ClientInterceptor};

/// Options of `hibiki dlq`.
#[derive(Debug, clap::Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    command: DlqCommand,
    /// The delivery service.
    #[arg(
        long,
        global = true,
        env = "HIBIKI_DELIVERY_URL",
        default_value = "http://127.0.0.1:50054"
    )]
    delivery: String,
    /// Bearer token (an operator token of the tenant, or a service token).
    #[arg(long, global = true, env = "HIBIKI_TOKEN", default_value = DEV_SERVICE_TOKEN, hide_default_value = true)]
    token: String,
}

#[derive(Debug, clap::Subcommand)]
enum DlqCommand {
    /// List a tenant's dead letters, newest first.
    List {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// Only this channel's.
        #[arg(long)]
        channel: Option<String>,
        /// The most to list.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Put dead letters back on their queues (the ids given, or --all).
    Replay {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// Dead letter ids (from `hibiki dlq list`).
        ids: Vec<String>,
        /// Every dead letter of the tenant (of --channel when given).
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// With --all: only this channel's.
        #[arg(long, requires = "all")]
        channel: Option<String>,
    },
}

type Client = DeliveryServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, ClientInterceptor>,
>;

fn client(args: &DlqArgs) -> Result<Client, String> {
    let channel =
        grpc::channel(&args.delivery).map_err(|e| format!("--delivery {}: {e}", args.delivery))?;
    let interceptor = ClientInterceptor::new(&Secret::new(args.token.clone()))
        .map_err(|e| format!("--token: {e}"))?;
    Ok(DeliveryServiceClient::with_interceptor(
        channel,
        interceptor,
    ))
}

fn line(d: &DeadLetter) -> String {
    let at = d
        .dead_at
        .as_ref()
        .and_then(hibiki_runtime::timestamp::from_proto)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default();
    let body: String = d.line_body.chars().take(80).collect();
    format!(
        "{}  {at}  channel {}  {}  LINE {}  {} recipient(s)  {} attempt(s)  job {}\n    {body}",
        d.dead_letter_id,
        d.channel_id,
        d.endpoint,
        d.line_status,
        d.recipients,
        d.attempts.len(),
        d.job_id
    )
}

async fn list(
    client: &mut Client,
    tenant: &str,
    channel: Option<&str>,
    limit: usize,
) -> Result<(), tonic::Status> {
    let mut token = String::new();
    let mut shown = 0;
    loop {
        let page = client
            .list_dead_letters(ListDeadLettersRequest {
                tenant_id: tenant.into(),
                channel_id: channel.unwrap_or_default().into(),
                page: Some(PageRequest {
                    page_size: (limit - shown).min(1000) as u32,
                    page_token: token,
                }),
            })
            .await?
            .into_inner();
        for d in &page.dead_letters {
            println!("{}", line(d));
        }
        shown += page.dead_letters.len();
        token = page.page.map(|p| p.next_page_token).unwrap_or_default();
        if token.is_empty() || shown >= limit {
            break;
        }
    }
    if shown == 0 {
        println!("no dead letters for tenant {tenant:?}");
    } else if !token.is_empty() {
        println!("(more: raise --limit)");
    }
    Ok(())
}

pub async fn run(args: DlqArgs) -> ExitCode {
    let mut client = match client(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hibiki dlq: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match &args.command {
        DlqCommand::List {
            tenant,
            channel,
            limit,
        } => list(&mut client, tenant, channel.as_deref(), *limit).await,
        DlqCommand::Replay {
            tenant,
            ids,
            all,
            channel,
        } => {
            if ids.is_empty() && !all {
                eprintln!("hibiki dlq replay: name dead letter ids, or --all");
                return ExitCode::from(2);
            }
            client
                .replay_dead_letters(ReplayDeadLettersRequest {
                    tenant_id: tenant.clone(),
                    dead_letter_ids: ids.clone(),
                    channel_id: channel.clone().unwrap_or_default(),
                })
                .await
                .map(|r| println!("replayed {}", r.into_inner().replayed))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(status) => {
            eprintln!(
                "hibiki dlq: {:?}: {} (delivery at {})",
                status.code(),
                status.message(),
                args.delivery
            );
            ExitCode::FAILURE
        }
    }
}
