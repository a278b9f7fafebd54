//! What delivery's integration tests share: contacts with two tenants and
//! their channels, line-sim playing LINE for both, and delivery started
//! against them.
#![allow(dead_code)] // each test file uses its own part

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hibiki_line::api::Endpoint;
use hibiki_line_sim::state::MenuChange;
use hibiki_line_sim::{LineSim, SimChannel, SimConfig};
use hibiki_proto::contacts::v1::tenant_service_client::TenantServiceClient;
use hibiki_proto::contacts::v1::{CreateTenantRequest, PutChannelRequest};
use hibiki_proto::delivery::v1::delivery_service_client::DeliveryServiceClient;
use hibiki_proto::delivery::v1::{GetJobRequest, Job, JobStatus, SendRequest, send_request};
use hibiki_runtime::Shutdown;
use hibiki_testkit::{
    SERVICE_TOKEN, TestDatabase, authorized, lifecycle, service_env, wait_for_health,
};
use tonic_health::ServingStatus;

pub type Client = DeliveryServiceClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        hibiki_runtime::grpc::ClientInterceptor,
    >,
>;

pub const ACME: &str = "acme";
pub const GLOBEX: &str = "globex";
pub const ACME_CHANNEL: &str = "1000000001";
pub const GLOBEX_CHANNEL: &str = "1000000002";

pub fn user(n: u64) -> String {
    format!("U{n:032x}")
}

pub fn text(t: &str) -> String {
    format!(r#"{{"type":"text","text":"{t}"}}"#)
}

/// contacts with two tenants and their channels, line-sim as LINE for both,
/// and delivery's settings pointing at them.
pub struct Mesh {
    _database: TestDatabase,
    pub contacts: String,
    contacts_stop: Shutdown,
    pub sim: LineSim,
    pub env: HashMap<String, String>,
    pub delivery: Option<(String, Shutdown)>,
}

impl Mesh {
    pub async fn start(sim_config: SimConfig, settings: &[(&str, &str)]) -> Self {
        let database = TestDatabase::create().await;
        let base = service_env(&database, None);
        let (contacts, contacts_stop, _task) =
            lifecycle::start::<hibiki_contacts::Application>(&base).await;
        wait_for_health(&contacts, ServingStatus::Serving).await;
        let mut tenants = TenantServiceClient::new(authorized(&contacts, SERVICE_TOKEN));
        for (tenant, channel, token) in [
            (ACME, ACME_CHANNEL, "token-a"),
            (GLOBEX, GLOBEX_CHANNEL, "token-b"),
        ] {
            tenants
                .create_tenant(CreateTenantRequest {
                    tenant_id: tenant.into(),
                    ..Default::default()
                })
                .await
                .expect("a tenant");
            tenants
                .put_channel(PutChannelRequest {
                    tenant_id: tenant.into(),
                    channel_id: channel.into(),
                    channel_secret: format!("secret-{tenant}"),
                    access_token: token.into(),
                    ..Default::default()
                })
                .await
                .expect("a channel");
        }
        let mut sim_config = sim_config;
        sim_config.channels = vec![
            SimChannel {
                channel_id: ACME_CHANNEL.into(),
                access_token: "token-a".into(),
                secret: "secret-acme".into(),
            },
            SimChannel {
                channel_id: GLOBEX_CHANNEL.into(),
                access_token: "token-b".into(),
                secret: "secret-globex".into(),
            },
        ];
        let loopback = "127.0.0.1:0".parse().unwrap();
        let sim = LineSim::start(sim_config, loopback, loopback)
            .await
            .expect("line-sim starts");
        let mut env = base;
        env.insert("HIBIKI_CONTACTS_URL".into(), contacts.clone());
        env.insert("HIBIKI_LINE_API_URL".into(), sim.api_url());
        env.insert("HIBIKI_LINE_TIMEOUT_MS".into(), "1000".into());
        env.insert("HIBIKI_DELIVERY_BACKOFF_MS".into(), "20".into());
        env.insert("HIBIKI_DELIVERY_BACKOFF_CAP_MS".into(), "200".into());
        env.insert("HIBIKI_DELIVERY_LEASE_MS".into(), "1000".into());
        env.insert("HIBIKI_DELIVERY_PAUSE_ON_429_MS".into(), "200".into());
        for (k, v) in settings {
            env.insert((*k).into(), (*v).into());
        }
        Self {
            _database: database,
            contacts,
            contacts_stop,
            sim,
            env,
            delivery: None,
        }
    }

    /// delivery in this process.
    pub async fn with_delivery(mut self) -> Self {
        let (url, stop, _task) = lifecycle::start::<hibiki_delivery::Application>(&self.env).await;
        wait_for_health(&url, ServingStatus::Serving).await;
        self.delivery = Some((url, stop));
        self
    }

    pub fn client(&self) -> Client {
        let (url, _) = self.delivery.as_ref().expect("delivery runs");
        DeliveryServiceClient::new(authorized(url, SERVICE_TOKEN))
    }

    /// Messages line-sim accepted, per recipient.
    pub fn sent(&self) -> Vec<hibiki_line_sim::state::SentMessage> {
        self.sim.sim().lock().sent.clone()
    }

    /// Waits for each (user, link job) to succeed at its first attempt,
    /// and checks that each job names the LINE request that linked its
    /// user. Returns line-sim's ledger of menu changes.
    pub async fn links_succeeded(
        &self,
        client: &mut Client,
        tenant: &str,
        jobs: &[(String, String)],
    ) -> Vec<MenuChange> {
        let mut done = Vec::new();
        for (u, id) in jobs {
            let job = finished(client, tenant, id, Duration::from_secs(30)).await;
            assert_eq!(job.status(), JobStatus::Succeeded, "{job:?}");
            assert_eq!((job.attempts, job.recipients_succeeded), (1, 1), "{job:?}");
            done.push((u, job));
        }
        let changes = self.sim.sim().lock().menu_changes.clone();
        let request_of: HashMap<&str, &str> = changes
            .iter()
            .map(|c| (c.user_id.as_str(), c.request_id.as_str()))
            .collect();
        for (u, job) in &done {
            assert_eq!(job.line_request_ids, vec![request_of[u.as_str()]], "{u}");
        }
        changes
    }

    pub fn count(&self, endpoint: Endpoint, status: u16) -> u64 {
        self.sim
            .sim()
            .lock()
            .counts
            .get(&endpoint)
            .and_then(|c| c.get(&status))
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if let Some((_, stop)) = &self.delivery {
            stop.trigger();
        }
        self.contacts_stop.trigger();
    }
}

pub fn push(tenant: &str, channel: &str, key: &str, to: &str, message: &str) -> SendRequest {
    SendRequest {
        tenant_id: tenant.into(),
        channel_id: channel.into(),
        idempotency_key: key.into(),
        target: Some(send_request::Target::PushTo(to.into())),
        messages_json: vec![text(message)],
        ..Default::default()
    }
}

/// Waits until the job is finished (succeeded, partial or failed).
pub async fn finished(client: &mut Client, tenant: &str, job_id: &str, within: Duration) -> Job {
    let deadline = Instant::now() + within;
    loop {
        let job = client
            .get_job(GetJobRequest {
                tenant_id: tenant.into(),
                job_id: job_id.into(),
            })
            .await
            .expect("the job exists")
            .into_inner();
        let status = job.status();
        if matches!(
            status,
            JobStatus::Succeeded | JobStatus::Partial | JobStatus::Failed
        ) {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job not finished in time: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
