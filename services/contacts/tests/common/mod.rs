//! The contacts service under test: started in-process on its own database
//! and Redis prefix, reached over real gRPC.
#![allow(dead_code)] // each test file uses a part of this harness

use std::collections::HashMap;

use hibiki_contacts::Application;
use hibiki_proto::common::v1::{
    ContactRef, InboundEvent, Source, SourceType, inbound_event::Payload,
};
use hibiki_proto::contacts::v1::contact_service_client::ContactServiceClient;
use hibiki_proto::contacts::v1::segment_service_client::SegmentServiceClient;
use hibiki_proto::contacts::v1::tenant_service_client::TenantServiceClient;
use hibiki_proto::contacts::v1::{CreateTenantRequest, PutChannelRequest};
use hibiki_runtime::Shutdown;
use hibiki_runtime::grpc::ClientInterceptor;
use hibiki_testkit::{
    SERVICE_TOKEN, TestDatabase, authorized, lifecycle, operator_token, service_env,
};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub type Authorized = InterceptedService<Channel, ClientInterceptor>;

pub struct Contacts {
    pub url: String,
    pub shutdown: Shutdown,
    pub env: HashMap<String, String>,
    pub database: TestDatabase,
}

impl Drop for Contacts {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

impl Contacts {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts contacts with extra settings.
    pub async fn start_with(settings: &[(&str, &str)]) -> Self {
        let database = TestDatabase::create().await;
        let mut env = service_env(&database, None);
        for (k, v) in settings {
            env.insert((*k).into(), (*v).into());
        }
        let (url, shutdown, _task) = lifecycle::start::<Application>(&env).await;
        hibiki_testkit::wait_for_health(&url, tonic_health::ServingStatus::Serving).await;
        Self {
            url,
            shutdown,
            env,
            database,
        }
    }

    pub fn tenants(&self) -> TenantServiceClient<Authorized> {
        TenantServiceClient::new(authorized(&self.url, SERVICE_TOKEN))
    }

    pub fn contacts(&self) -> ContactServiceClient<Authorized> {
        ContactServiceClient::new(authorized(&self.url, SERVICE_TOKEN))
            .max_decoding_message_size(64 << 20)
    }

    pub fn segments(&self) -> SegmentServiceClient<Authorized> {
        SegmentServiceClient::new(authorized(&self.url, SERVICE_TOKEN))
    }

    pub fn tenants_as(&self, tenant: &str) -> TenantServiceClient<Authorized> {
        TenantServiceClient::new(authorized(&self.url, &operator_token(tenant)))
    }

    pub fn contacts_as(&self, tenant: &str) -> ContactServiceClient<Authorized> {
        ContactServiceClient::new(authorized(&self.url, &operator_token(tenant)))
    }

    pub fn segments_as(&self, tenant: &str) -> SegmentServiceClient<Authorized> {
        SegmentServiceClient::new(authorized(&self.url, &operator_token(tenant)))
    }

    /// A pool on the service's own database, for checks by recount.
    pub async fn pool(&self) -> sqlx::PgPool {
        sqlx::PgPool::connect(self.database.url()).await.unwrap()
    }

    /// Creates a tenant with one channel.
    pub async fn tenant(&self, tenant_id: &str) {
        let mut t = self.tenants();
        t.create_tenant(CreateTenantRequest {
            tenant_id: tenant_id.into(),
            ..Default::default()
        })
        .await
        .expect("the tenant is created");
    }

    /// Registers a channel for a tenant.
    pub async fn channel(&self, tenant_id: &str, channel_id: &str) {
        self.tenants()
            .put_channel(PutChannelRequest {
                tenant_id: tenant_id.into(),
                channel_id: channel_id.into(),
                channel_secret: "secret".into(),
                access_token: "token".into(),
                ..Default::default()
            })
            .await
            .expect("the channel is stored");
    }
}

/// The LINE user id of test user `n`.
pub fn user(n: u32) -> String {
    format!("U{n:032x}")
}

pub fn contact(tenant: &str, n: u32) -> Option<ContactRef> {
    Some(ContactRef {
        tenant_id: tenant.into(),
        line_user_id: user(n),
    })
}

/// An inbound event of `user` with `payload`.
pub fn event(
    tenant: &str,
    id: &str,
    user_n: u32,
    timestamp_ms: i64,
    payload: Payload,
) -> InboundEvent {
    let r#type = match &payload {
        Payload::Follow(_) => "follow",
        Payload::Unfollow(_) => "unfollow",
        Payload::Postback(_) => "postback",
        Payload::Message(_) => "message",
        _ => "other",
    };
    InboundEvent {
        tenant_id: tenant.into(),
        channel_id: "1000000001".into(),
        webhook_event_id: id.into(),
        r#type: r#type.into(),
        timestamp_ms,
        source: Some(Source {
            r#type: SourceType::User as i32,
            user_id: user(user_n),
            ..Default::default()
        }),
        payload: Some(payload),
        ..Default::default()
    }
}

/// A pool on `database` with contacts' migrations applied, for tests of the
/// service's internals without starting it.
pub async fn migrated_pool(database: &TestDatabase) -> sqlx::PgPool {
    let pool = hibiki_runtime::postgres::connect_lazy(
        &hibiki_runtime::config::PostgresConfig {
            url: hibiki_runtime::config::Secret::new(database.url()),
            max_connections: 4,
        },
        "contacts",
    )
    .expect("a valid database URL");
    hibiki_runtime::postgres::migrate(&pool, "contacts", &hibiki_contacts::MIGRATOR)
        .await
        .expect("contacts' migrations apply");
    pool
}
