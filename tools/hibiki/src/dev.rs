//! `hibiki dev`: the whole mesh in one process.
//!
//! Each service is the same `Application` a cluster runs, on its own gRPC and
//! metrics port, calling the others over real gRPC on loopback. Before
//! anything starts, PostgreSQL and Redis are checked; if one is missing the
//! command says which, where it looked, and the command that starts it.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use hibiki_runtime::app::{EXIT_CONFIG, Service};
use hibiki_runtime::config::{Overlay, PostgresConfig, ProcessEnv, RedisConfig, RuntimeConfig};
use hibiki_runtime::{HostError, Shutdown, grpc, postgres, redis, telemetry};
use tokio::task::JoinHandle;

/// Options of `hibiki dev`.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Address the services listen on.
    #[arg(long, default_value = "127.0.0.1", env = "HIBIKI_DEV_HOST")]
    host: std::net::IpAddr,
    /// First gRPC port: gateway, contacts, scenario, delivery, analytics and
    /// admin-bff take this one and the five after it.
    #[arg(long, default_value_t = 50051, env = "HIBIKI_DEV_GRPC_PORT")]
    grpc_port: u16,
    /// First metrics port, assigned in the same order.
    #[arg(long, default_value_t = 9101, env = "HIBIKI_DEV_METRICS_PORT")]
    metrics_port: u16,
    /// The gateway's webhook port: LINE (or line-sim) posts to
    /// http://<host>:<port>/line/webhook/<channel id>.
    #[arg(long, default_value_t = 8080, env = "HIBIKI_DEV_HTTP_PORT")]
    http_port: u16,
    /// line-sim's Messaging API port (delivery calls it instead of
    /// api.line.me); its admin API takes the port after it.
    #[arg(long, default_value_t = 8090, env = "HIBIKI_DEV_LINE_SIM_PORT")]
    line_sim_port: u16,
    /// The operators' dashboard (admin-bff) port.
    #[arg(long, default_value_t = 8070, env = "HIBIKI_DEV_DASHBOARD_PORT")]
    dashboard_port: u16,
}

/// The demo tenant's operator token, when `HIBIKI_OPERATOR_TOKENS` does not
/// name others: it signs in to the dashboard.
const DEMO_OPERATOR_TOKEN: &str = "hibiki-dev-demo-operator-token";

/// A service started by `hibiki dev`.
struct Running {
    name: &'static str,
    grpc: SocketAddr,
    metrics: SocketAddr,
    task: JoinHandle<Result<(), HostError>>,
}

/// Why `hibiki dev` cannot start.
#[derive(Debug, thiserror::Error)]
enum DevError {
    #[error("invalid configuration: {0}")]
    Config(#[from] hibiki_runtime::ConfigError),
    #[error("{0}")]
    Missing(String),
    #[error("{name}: {source}")]
    Start {
        name: &'static str,
        source: HostError,
    },
}

pub async fn run(args: DevArgs) -> ExitCode {
    let shared = match RuntimeConfig::from_env(&ProcessEnv, hibiki_gateway::DEFAULTS) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hibiki dev: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut telemetry_config = shared.telemetry.clone();
    telemetry_config.service_name = "hibiki-dev".into();
    let guard = match telemetry::init(&telemetry_config) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("hibiki dev: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let code = match start(&args, &shared).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(DevError::Missing(msg)) => {
            eprintln!("\n{msg}");
            ExitCode::from(69) // EX_UNAVAILABLE
        }
        Err(DevError::Config(e)) => {
            eprintln!("hibiki dev: invalid configuration: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("hibiki dev: {e}");
            ExitCode::FAILURE
        }
    };
    guard.shutdown();
    code
}

async fn start(args: &DevArgs, shared: &RuntimeConfig) -> Result<(), DevError> {
    check_postgres(&shared.postgres).await?;
    check_redis(&shared.redis).await?;

    let shutdown = Shutdown::new();
    shutdown.trigger_on_signals();
    let sim = start_line_sim(args).await?;
    let mut running = Vec::new();
    let line = sim.api_url();
    running.push(launch_apart::<hibiki_gateway::Application>(args, 0, &line, &shutdown).await?);
    running.push(launch::<hibiki_contacts::Application>(args, 1, &line, &shutdown).await?);
    running.push(launch::<hibiki_scenario::Application>(args, 2, &line, &shutdown).await?);
    running.push(launch::<hibiki_delivery::Application>(args, 3, &line, &shutdown).await?);
    running.push(launch::<hibiki_analytics::Application>(args, 4, &line, &shutdown).await?);
    running.push(launch::<hibiki_admin_bff::Application>(args, 5, &line, &shutdown).await?);

    println!("hibiki dev: the mesh runs in this process (Ctrl-C stops it)\n");
    println!("  {:<10} {:<24} {:<24}", "service", "gRPC", "metrics");
    for r in &running {
        println!(
            "  {:<10} {:<24} {:<24}",
            r.name,
            format!("http://{}", r.grpc),
            format!("http://{}/metrics", r.metrics)
        );
    }
    println!(
        "\n  LINE webhooks: http://{}/line/webhook/{{channel_id}}",
        SocketAddr::new(args.host, args.http_port)
    );
    let dashboard = SocketAddr::new(args.host, args.dashboard_port);
    match operator_tokens()
        .split(',')
        .find_map(|p| p.trim().strip_prefix("demo="))
    {
        Some(token) => {
            println!("  dashboard: http://{dashboard}/#tenant={DEMO_TENANT}&token={token}")
        }
        None => {
            println!("  dashboard: http://{dashboard}/ (sign in with a tenant's operator token)")
        }
    }
    println!(
        "  line-sim: Messaging API {}   admin {}",
        sim.api_url(),
        sim.admin_url()
    );
    println!(
        "  PostgreSQL {}   Redis {} (key prefix {:?})",
        postgres_location(&shared.postgres),
        redis_location(&shared.redis),
        shared.redis.key_prefix
    );

    for r in &running {
        let url = format!("http://{}", r.grpc);
        match grpc::wait_for_health(
            &url,
            tonic_health::ServingStatus::Serving,
            Duration::from_secs(30),
        )
        .await
        {
            Ok(()) => println!("  {:<10} SERVING", r.name),
            Err(e) => println!("  {:<10} not serving yet: {e}", r.name),
        }
    }
    match seed_demo(&running[1], shared).await {
        Ok(()) => println!(
            "\n  demo tenant {DEMO_TENANT:?}: channel {DEMO_CHANNEL} (secret {DEMO_SECRET:?}), segment {DEMO_SEGMENT:?}"
        ),
        Err(e) => println!("\n  demo tenant not seeded: {e}"),
    }
    match seed_scenarios(&running[2], shared).await {
        Ok(names) => println!("  demo scenarios (examples/): {}", names.join(", ")),
        Err(e) => println!("  demo scenarios not applied: {e}"),
    }
    println!("\nhibiki dev: ready");

    let mut failed = None;
    for r in running {
        match r.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                shutdown.trigger();
                failed.get_or_insert(DevError::Start {
                    name: r.name,
                    source: e,
                });
            }
            Err(e) => {
                shutdown.trigger();
                tracing::error!(service = r.name, error = %e, "service task panicked");
            }
        }
    }
    sim.stop().await;
    failed.map_or(Ok(()), Err)
}

/// line-sim, playing LINE for the demo channel, with the demo's two rich
/// menus (aliases `normal` and `campaign`).
async fn start_line_sim(args: &DevArgs) -> Result<hibiki_line_sim::LineSim, DevError> {
    let config = hibiki_line_sim::SimConfig {
        channels: vec![hibiki_line_sim::SimChannel {
            channel_id: DEMO_CHANNEL.into(),
            access_token: DEMO_ACCESS_TOKEN.into(),
            secret: DEMO_SECRET.into(),
        }],
        ..Default::default()
    };
    let api = SocketAddr::new(args.host, args.line_sim_port);
    let admin = SocketAddr::new(args.host, args.line_sim_port.saturating_add(1));
    let sim = hibiki_line_sim::LineSim::start(config, api, admin)
        .await
        .map_err(|e| {
            DevError::Missing(format!(
                "hibiki dev: {e}\n  Another program holds the port; pick others with --line-sim-port."
            ))
        })?;
    sim.sim()
        .create_rich_menu(DEMO_CHANNEL, "Demo menu", Some("normal"));
    sim.sim()
        .create_rich_menu(DEMO_CHANNEL, "Spring campaign menu", Some("campaign"));
    Ok(sim)
}

/// The demo tenant `hibiki dev` seeds.
const DEMO_TENANT: &str = "demo";
/// Its LINE channel.
const DEMO_CHANNEL: &str = "1000000001";
/// Its channel secret (signs the demo's webhooks).
const DEMO_SECRET: &str = "demo-channel-secret";
/// Its channel access token (what delivery sends to line-sim).
const DEMO_ACCESS_TOKEN: &str = "demo-access-token";
/// Its campaign segment.
const DEMO_SEGMENT: &str = "spring campaign";

/// Seeds the demo tenant, its channel and its campaign segment (each left
/// as it is when it exists).
async fn seed_demo(contacts: &Running, shared: &RuntimeConfig) -> Result<(), String> {
    use hibiki_proto::contacts::v1::segment_service_client::SegmentServiceClient;
    use hibiki_proto::contacts::v1::tenant_service_client::TenantServiceClient;
    use hibiki_proto::contacts::v1::{
        CreateSegmentRequest, CreateTenantRequest, HasTag, PutChannelRequest, SegmentRule,
        segment_rule::Node,
    };
    let url = format!("http://{}", contacts.grpc);
    let channel = grpc::channel(&url).map_err(|e| e.to_string())?;
    let interceptor = grpc::ClientInterceptor::new(shared.auth.outbound_service_token())
        .map_err(|e| e.to_string())?;
    let mut tenants = TenantServiceClient::with_interceptor(channel.clone(), interceptor.clone());
    let exists = |r: Result<(), tonic::Status>| match r {
        Err(s) if s.code() != tonic::Code::AlreadyExists => Err(s.message().to_owned()),
        _ => Ok(()),
    };
    exists(
        tenants
            .create_tenant(CreateTenantRequest {
                tenant_id: DEMO_TENANT.into(),
                display_name: "Demo Company".into(),
                time_zone: "Asia/Tokyo".into(),
            })
            .await
            .map(|_| ()),
    )?;
    tenants
        .put_channel(PutChannelRequest {
            tenant_id: DEMO_TENANT.into(),
            channel_id: DEMO_CHANNEL.into(),
            display_name: "Demo official account".into(),
            bot_user_id: String::new(),
            channel_secret: DEMO_SECRET.into(),
            access_token: DEMO_ACCESS_TOKEN.into(),
        })
        .await
        .map_err(|s| s.message().to_owned())?;
    let mut segments = SegmentServiceClient::with_interceptor(channel, interceptor);
    exists(
        segments
            .create_segment(CreateSegmentRequest {
                tenant_id: DEMO_TENANT.into(),
                name: DEMO_SEGMENT.into(),
                description: "Friends who joined the spring campaign".into(),
                rule: Some(SegmentRule {
                    node: Some(Node::HasTag(HasTag {
                        tag: "campaign:spring".into(),
                    })),
                }),
            })
            .await
            .map(|_| ()),
    )
}

/// The examples under `examples/`, applied to the demo tenant.
const DEMO_SCENARIOS: [&str; 3] = [
    include_str!("../../../examples/spring-campaign.yaml"),
    include_str!("../../../examples/welcome-sequence.yaml"),
    include_str!("../../../examples/keyword-reply.yaml"),
];

/// Applies the example scenarios to the demo tenant (an unchanged one keeps
/// its version); returns their names.
async fn seed_scenarios(scenario: &Running, shared: &RuntimeConfig) -> Result<Vec<String>, String> {
    use hibiki_proto::scenario::v1::scenario_service_client::ScenarioServiceClient;
    use hibiki_proto::scenario::v1::{ApplyRequest, apply_request};
    let channel = grpc::channel(&format!("http://{}", scenario.grpc)).map_err(|e| e.to_string())?;
    let interceptor = grpc::ClientInterceptor::new(shared.auth.outbound_service_token())
        .map_err(|e| e.to_string())?;
    let mut client = ScenarioServiceClient::with_interceptor(channel, interceptor);
    let mut names = Vec::new();
    for yaml in DEMO_SCENARIOS {
        let applied = client
            .apply(ApplyRequest {
                tenant_id: DEMO_TENANT.into(),
                source: Some(apply_request::Source::Yaml(yaml.into())),
                start_disabled: false,
            })
            .await
            .map_err(|s| s.message().to_owned())?
            .into_inner();
        names.push(applied.definition.map(|d| d.name).unwrap_or_default());
    }
    Ok(names)
}

/// The settings of service `S` on the `index`-th ports: over the process's
/// environment, its addresses and its peers' on their dev ports.
fn service_env<S: Service>(args: &DevArgs, index: u16, line_api_url: &str) -> Overlay<ProcessEnv> {
    let grpc = SocketAddr::new(args.host, args.grpc_port + index);
    let metrics = SocketAddr::new(args.host, args.metrics_port + index);
    // Each service finds the others on their dev ports.
    // The gateway takes LINE's webhooks on the HTTP port; admin-bff serves
    // the dashboard on its own.
    let http_port = if S::DEFAULTS.name == hibiki_admin_bff::DEFAULTS.name {
        args.dashboard_port
    } else {
        args.http_port
    };
    Overlay::new(ProcessEnv)
        .set("HIBIKI_GRPC_ADDR", grpc.to_string())
        .set("HIBIKI_METRICS_ADDR", metrics.to_string())
        .set(
            "HIBIKI_HTTP_ADDR",
            SocketAddr::new(args.host, http_port).to_string(),
        )
        .set("HIBIKI_OPERATOR_TOKENS", operator_tokens())
        .set(
            "HIBIKI_ANALYTICS_URL",
            format!("http://{}", SocketAddr::new(args.host, args.grpc_port + 4)),
        )
        .set(
            "HIBIKI_CONTACTS_URL",
            format!("http://{}", SocketAddr::new(args.host, args.grpc_port + 1)),
        )
        .set(
            "HIBIKI_SCENARIO_URL",
            format!("http://{}", SocketAddr::new(args.host, args.grpc_port + 2)),
        )
        .set(
            "HIBIKI_DELIVERY_URL",
            format!("http://{}", SocketAddr::new(args.host, args.grpc_port + 3)),
        )
        // delivery calls line-sim, not LINE.
        .set("HIBIKI_LINE_API_URL", line_api_url)
}

/// Builds service `S` on the `index`-th ports and runs it in the background.
async fn launch<S: Service>(
    args: &DevArgs,
    index: u16,
    line_api_url: &str,
    shutdown: &Shutdown,
) -> Result<Running, DevError> {
    let env = service_env::<S>(args, index, line_api_url);
    let config = S::config_from_env(&env)?;
    let name = S::DEFAULTS.name;
    let app = S::build(config)
        .await
        .map_err(|source| DevError::Start { name, source })?;
    let (grpc, metrics) = (app.grpc_addr(), app.metrics_addr());
    let task = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    Ok(Running {
        name,
        grpc,
        metrics,
        task,
    })
}

/// Worker threads of the runtime the gateway has to itself in `hibiki dev`.
const GATEWAY_THREADS: usize = 1;

/// [`launch`], on a runtime of the service's own ([`GATEWAY_THREADS`]
/// worker threads), as it runs in production: in a process of its own. The
/// gateway must answer LINE within 2 s whatever the rest of the mesh is
/// doing; on the mesh's shared runtime a webhook's task queued behind the
/// thousands of tasks a storm gives scenario and delivery.
async fn launch_apart<S: Service>(
    args: &DevArgs,
    index: u16,
    line_api_url: &str,
    shutdown: &Shutdown,
) -> Result<Running, DevError> {
    let env = service_env::<S>(args, index, line_api_url);
    let config = S::config_from_env(&env)?;
    let name = S::DEFAULTS.name;
    let (built, started) = tokio::sync::oneshot::channel();
    let (stopped, ended) = tokio::sync::oneshot::channel();
    let stop = shutdown.clone();
    std::thread::Builder::new()
        .name(format!("{name}-runtime"))
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(GATEWAY_THREADS)
                .thread_name(format!("{name}-worker"))
                .enable_all()
                .build()
                .expect("building the service's tokio runtime");
            runtime.block_on(async move {
                let app = match S::build(config).await {
                    Ok(app) => app,
                    Err(e) => {
                        let _ = built.send(Err(e));
                        return;
                    }
                };
                let _ = built.send(Ok((app.grpc_addr(), app.metrics_addr())));
                let _ = stopped.send(app.run_until_stopped(stop).await);
            });
        })
        .expect("starting the service's thread");
    let (grpc, metrics) = started
        .await
        .expect("the service's thread answers")
        .map_err(|source| DevError::Start { name, source })?;
    let task = tokio::spawn(async move { ended.await.unwrap_or(Ok(())) });
    Ok(Running {
        name,
        grpc,
        metrics,
        task,
    })
}

/// `HIBIKI_OPERATOR_TOKENS`, or the demo tenant's token when it is unset.
fn operator_tokens() -> String {
    std::env::var("HIBIKI_OPERATOR_TOKENS")
        .ok()
        .filter(|t| !t.trim().is_empty())
        .unwrap_or_else(|| format!("{DEMO_TENANT}={DEMO_OPERATOR_TOKEN}"))
}

fn postgres_location(config: &PostgresConfig) -> String {
    match postgres::connect_options(config) {
        Ok(o) => format!(
            "{}:{}/{}",
            o.get_host(),
            o.get_port(),
            o.get_database().unwrap_or("")
        ),
        Err(_) => "(unparsable HIBIKI_DATABASE_URL)".into(),
    }
}

/// The Redis URL without credentials.
fn redis_location(config: &RedisConfig) -> String {
    let url = config.url.expose();
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, host))) => format!("{scheme}://{host}"),
        _ => url.to_owned(),
    }
}

/// PostgreSQL answers and hibiki's database exists (created if missing).
async fn check_postgres(config: &PostgresConfig) -> Result<(), DevError> {
    let attempt =
        tokio::time::timeout(Duration::from_secs(5), postgres::ensure_database(config)).await;
    let error = match attempt {
        Ok(Ok(created)) => {
            if created {
                println!("hibiki dev: created database {}", postgres_location(config));
            }
            return Ok(());
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no answer within 5 s".into(),
    };
    Err(DevError::Missing(format!(
        "hibiki dev: PostgreSQL is not reachable at {} (HIBIKI_DATABASE_URL, default {}):\n  {error}\n\n\
         Start it with:\n    pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start\n\
         or, where PostgreSQL is not installed:\n    apt-get install -y postgresql && pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start\n\
         hibiki connects as user `root` with trust auth by default; set HIBIKI_DATABASE_URL to use another server.",
        postgres_location(config),
        hibiki_runtime::config::DEFAULT_DATABASE_URL,
    )))
}

/// Redis answers PING.
async fn check_redis(config: &RedisConfig) -> Result<(), DevError> {
    let error = match redis::Redis::connect_lazy(config) {
        Err(e) => e.to_string(),
        Ok(r) => match tokio::time::timeout(Duration::from_secs(5), r.ping()).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer within 5 s".into(),
        },
    };
    Err(DevError::Missing(format!(
        "hibiki dev: Redis is not reachable at {} (HIBIKI_REDIS_URL, default {}):\n  {error}\n\n\
         Start it with:\n    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save \"\" --appendonly no\n\
         or, where Redis is not installed:\n    apt-get install -y redis-server && redis-server --daemonize yes --bind 127.0.0.1 --port 6379",
        redis_location(config),
        hibiki_runtime::config::DEFAULT_REDIS_URL,
    )))
}
