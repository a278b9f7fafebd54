//! `hibiki scenario`: a tenant's scenarios.
//!
//! ```text
//! hibiki scenario apply -f examples/spring-campaign.yaml --tenant demo [--disabled]
//! hibiki scenario list --tenant demo
//! hibiki scenario versions --tenant demo sc_3f2a…
//! hibiki scenario enable|disable --tenant demo sc_3f2a…
//! hibiki scenario dry-run --tenant demo --user U… --postback 'action=join&campaign=spring'
//! hibiki scenario dry-run --tenant demo --file webhook.json   # a LINE webhook body
//! ```
//!
//! `apply` prints the scenario's id and version (an unchanged definition
//! keeps its version); a bad definition is refused with the path of the bad
//! field, and the command exits 1.

use std::path::PathBuf;
use std::process::ExitCode;

use hibiki_proto::common::v1::PageRequest;
use hibiki_proto::scenario::v1::scenario_service_client::ScenarioServiceClient;
use hibiki_proto::scenario::v1::{
    ApplyRequest, DisableRequest, EnableRequest, ListScenariosRequest, ListVersionsRequest,
    Scenario, apply_request,
};
use hibiki_runtime::config::{DEV_SERVICE_TOKEN, Secret};
use hibiki_runtime::grpc::{self, ClientInterceptor};

/// Options of `hibiki scenario`.
#[derive(Debug, clap::Args)]
pub struct ScenarioArgs {
    #[command(subcommand)]
    command: ScenarioCommand,
    /// The scenario service.
    #[arg(
        long,
        global = true,
        env = "HIBIKI_SCENARIO_URL",
        default_value = "http://127.0.0.1:50053"
    )]
    scenario: String,
    /// Bearer token (an operator token of the tenant, or a service token).
    #[arg(long, global = true, env = "HIBIKI_TOKEN", default_value = DEV_SERVICE_TOKEN, hide_default_value = true)]
    token: String,
}

#[derive(Debug, clap::Subcommand)]
enum ScenarioCommand {
    /// Create a scenario, or a new version of it, from a YAML file.
    Apply {
        /// The YAML definition.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// Apply without enabling.
        #[arg(long)]
        disabled: bool,
    },
    /// List a tenant's scenarios.
    List {
        /// The tenant.
        #[arg(long)]
        tenant: String,
    },
    /// List a scenario's versions, newest first.
    Versions {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// The scenario id.
        scenario_id: String,
    },
    /// Let a scenario start runs again.
    Enable {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// The scenario id.
        scenario_id: String,
    },
    /// Show what an event would do, without doing it.
    DryRun {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// The channel the event comes in on.
        #[arg(long, default_value = "1000000001")]
        channel: String,
        /// Only this scenario (its id).
        #[arg(long)]
        scenario_id: Option<String>,
        /// A LINE webhook body (`{"destination", "events": [...]}`): its first event.
        #[arg(long, conflicts_with_all = ["postback", "text", "follow"])]
        file: Option<PathBuf>,
        /// The user the event is from (with --postback, --text or --follow).
        #[arg(long)]
        user: Option<String>,
        /// A tap with this postback data.
        #[arg(long)]
        postback: Option<String>,
        /// A text message.
        #[arg(long)]
        text: Option<String>,
        /// A follow.
        #[arg(long)]
        follow: bool,
    },
    /// Stop a scenario from starting runs.
    Disable {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// The scenario id.
        scenario_id: String,
    },
}

type Client = ScenarioServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, ClientInterceptor>,
>;

fn line(s: &Scenario) -> String {
    let name = s.definition.as_ref().map_or("", |d| d.name.as_str());
    let trigger = s
        .definition
        .as_ref()
        .and_then(|d| d.trigger.as_ref())
        .and_then(|t| t.kind.as_ref())
        .map(|k| format!("{k:?}"))
        .unwrap_or_default();
    let trigger = trigger.split('(').next().unwrap_or_default().to_lowercase();
    format!(
        "{}  v{}  {}  {name}  (trigger: {trigger})",
        s.scenario_id,
        s.version,
        if s.enabled { "enabled " } else { "disabled" },
    )
}

async fn run_command(client: &mut Client, command: &ScenarioCommand) -> Result<(), String> {
    let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    match command {
        ScenarioCommand::Apply {
            file,
            tenant,
            disabled,
        } => {
            let text =
                std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
            let s = client
                .apply(ApplyRequest {
                    tenant_id: tenant.clone(),
                    source: Some(apply_request::Source::Yaml(text)),
                    start_disabled: *disabled,
                })
                .await
                .map_err(|s| format!("{}: {}", file.display(), status(s)))?
                .into_inner();
            println!("applied {}", line(&s));
        }
        ScenarioCommand::List { tenant } => {
            let mut token = String::new();
            let mut any = false;
            loop {
                let page = client
                    .list_scenarios(ListScenariosRequest {
                        tenant_id: tenant.clone(),
                        page: Some(PageRequest {
                            page_size: 1000,
                            page_token: token,
                        }),
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                for s in &page.scenarios {
                    println!("{}", line(s));
                    any = true;
                }
                token = page.page.map(|p| p.next_page_token).unwrap_or_default();
                if token.is_empty() {
                    break;
                }
            }
            if !any {
                println!("no scenarios for tenant {tenant:?}");
            }
        }
        ScenarioCommand::Versions {
            tenant,
            scenario_id,
        } => {
            let versions = client
                .list_versions(ListVersionsRequest {
                    tenant_id: tenant.clone(),
                    scenario_id: scenario_id.clone(),
                })
                .await
                .map_err(status)?
                .into_inner()
                .versions;
            for v in &versions {
                let at = v
                    .created_at
                    .as_ref()
                    .and_then(hibiki_runtime::timestamp::from_proto)
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                    .unwrap_or_default();
                println!("v{}  {at}", v.version);
            }
        }
        ScenarioCommand::Enable {
            tenant,
            scenario_id,
        } => {
            let s = client
                .enable(EnableRequest {
                    tenant_id: tenant.clone(),
                    scenario_id: scenario_id.clone(),
                })
                .await
                .map_err(status)?
                .into_inner();
            println!("{}", line(&s));
        }
        ScenarioCommand::DryRun {
            tenant,
            channel,
            scenario_id,
            file,
            user,
            postback,
            text,
            follow,
        } => {
            let mut event = match file {
                Some(path) => {
                    let body =
                        std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
                    hibiki_gateway::line::parse(&body)
                        .map_err(|e| format!("{}: {e}", path.display()))?
                        .events
                        .into_iter()
                        .next()
                        .ok_or_else(|| format!("{}: no events", path.display()))?
                }
                None => dry_run_event(user.as_deref(), postback, text, *follow)?,
            };
            event.tenant_id = tenant.clone();
            event.channel_id = channel.clone();
            let plan = client
                .dry_run(hibiki_proto::scenario::v1::DryRunRequest {
                    tenant_id: tenant.clone(),
                    event: Some(event),
                    scenario_id: scenario_id.clone().unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            if plan.runs.is_empty() && plan.skipped.is_empty() {
                println!("no scenario of tenant {tenant:?} starts on this event");
            }
            for run in &plan.runs {
                println!("would start {} (v{}):", run.scenario_id, run.version);
                for step in &run.steps {
                    println!("  {}: {}", step.step_id, step.description);
                }
            }
            for skipped in &plan.skipped {
                println!(
                    "would not start {}: {}",
                    skipped.scenario_id, skipped.reason
                );
            }
        }
        ScenarioCommand::Disable {
            tenant,
            scenario_id,
        } => {
            let s = client
                .disable(DisableRequest {
                    tenant_id: tenant.clone(),
                    scenario_id: scenario_id.clone(),
                    stop_running: false,
                })
                .await
                .map_err(status)?
                .into_inner();
            println!("{}", line(&s));
        }
    }
    Ok(())
}

/// An event built from the dry-run flags.
fn dry_run_event(
    user: Option<&str>,
    postback: &Option<String>,
    text: &Option<String>,
    follow: bool,
) -> Result<hibiki_proto::common::v1::InboundEvent, String> {
    use hibiki_proto::common::v1::inbound_event::Payload;
    use hibiki_proto::common::v1::message_content::Content;
    use hibiki_proto::common::v1::{
        FollowEvent, InboundEvent, MessageContent, MessageEvent, PostbackEvent, Source, SourceType,
        TextMessage,
    };
    let user = user.ok_or("--user is needed with --postback, --text or --follow")?;
    let (kind, payload) = match (postback, text, follow) {
        (Some(data), None, false) => (
            "postback",
            Payload::Postback(PostbackEvent {
                data: data.clone(),
                ..Default::default()
            }),
        ),
        (None, Some(t), false) => (
            "message",
            Payload::Message(MessageEvent {
                message: Some(MessageContent {
                    content: Some(Content::Text(TextMessage {
                        text: t.clone(),
                        ..Default::default()
                    })),
                    ..Default::default()
                }),
            }),
        ),
        (None, None, true) => (
            "follow",
            Payload::Follow(FollowEvent {
                is_unblocked: false,
            }),
        ),
        _ => return Err("one of --file, --postback, --text or --follow".into()),
    };
    Ok(InboundEvent {
        webhook_event_id: format!("dry-run-{}", chrono::Utc::now().timestamp_micros()),
        r#type: kind.into(),
        timestamp_ms: chrono::Utc::now().timestamp_millis(),
        source: Some(Source {
            r#type: SourceType::User as i32,
            user_id: user.into(),
            ..Default::default()
        }),
        reply_token: "dry-run".into(),
        payload: Some(payload),
        ..Default::default()
    })
}

pub async fn run(args: ScenarioArgs) -> ExitCode {
    let channel = match grpc::channel(&args.scenario) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hibiki scenario: --scenario {}: {e}", args.scenario);
            return ExitCode::from(2);
        }
    };
    let interceptor = match ClientInterceptor::new(&Secret::new(args.token.clone())) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("hibiki scenario: --token: {e}");
            return ExitCode::from(2);
        }
    };
    let mut client = ScenarioServiceClient::with_interceptor(channel, interceptor);
    match run_command(&mut client, &args.command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hibiki scenario: {e}");
            ExitCode::FAILURE
        }
    }
}
