//! `TenantService`: tenants, their LINE channels, and the channel registry
//! stream the gateway and delivery keep in memory.
//!
//! Channel secrets and access tokens are write-only: `PutChannel` stores
//! them, the read RPCs only say whether they are set, and only
//! `WatchChannels` (service tokens only) returns them. They never reach a log
//! line, a span or an error message.

use std::collections::HashSet;
use std::pin::Pin;

use chrono::{DateTime, Utc};
use hibiki_proto::common::v1::PageResponse;
use hibiki_proto::contacts::v1::tenant_service_server::TenantService;
use hibiki_proto::contacts::v1::{
    Channel, ChannelCredentials, ChannelRegistryEvent, CreateTenantRequest, DeleteChannelRequest,
    DeleteChannelResponse, GetChannelRequest, GetTenantRequest, ListChannelsRequest,
    ListChannelsResponse, ListTenantsRequest, ListTenantsResponse, PutChannelRequest, Synced,
    Tenant, UpdateTenantRequest, WatchChannelsRequest, channel_registry_event,
};
use hibiki_runtime::timestamp::to_proto;
use hibiki_runtime::{Caller, Shutdown};
use sqlx::PgPool;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::error::{Error, Result, is_foreign_key_violation, is_unique_violation};
use crate::page;
use crate::registry::{Registry, RegistryChange};
use crate::validate;

/// The time zone of a tenant created without one.
pub const DEFAULT_TIME_ZONE: &str = "Asia/Tokyo";

/// Implements `hibiki.contacts.v1.TenantService`.
#[derive(Clone)]
pub struct Tenants {
    pool: PgPool,
    registry: Registry,
    shutdown: Shutdown,
}

impl Tenants {
    /// The service over `pool`, publishing channel changes through `registry`.
    pub fn new(pool: PgPool, registry: Registry, shutdown: Shutdown) -> Self {
        Self {
            pool,
            registry,
            shutdown,
        }
    }
}

#[derive(sqlx::FromRow)]
struct TenantRow {
    tenant_id: String,
    display_name: String,
    time_zone: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<TenantRow> for Tenant {
    fn from(r: TenantRow) -> Self {
        Tenant {
            tenant_id: r.tenant_id,
            display_name: r.display_name,
            time_zone: r.time_zone,
            created_at: Some(to_proto(r.created_at)),
            updated_at: Some(to_proto(r.updated_at)),
        }
    }
}

#[derive(sqlx::FromRow)]
struct ChannelRow {
    tenant_id: String,
    channel_id: String,
    display_name: String,
    bot_user_id: String,
    has_secret: bool,
    has_access_token: bool,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<ChannelRow> for Channel {
    fn from(r: ChannelRow) -> Self {
        Channel {
            tenant_id: r.tenant_id,
            channel_id: r.channel_id,
            display_name: r.display_name,
            bot_user_id: r.bot_user_id,
            has_secret: r.has_secret,
            has_access_token: r.has_access_token,
            created_at: Some(to_proto(r.created_at)),
            updated_at: Some(to_proto(r.updated_at)),
        }
    }
}

const TENANT_COLUMNS: &str = "tenant_id, display_name, time_zone, created_at, updated_at";
const CHANNEL_COLUMNS: &str = "tenant_id, channel_id, display_name, bot_user_id, \
     channel_secret <> '' AS has_secret, access_token <> '' AS has_access_token, \
     created_at, updated_at";

/// INVALID_ARGUMENT unless `zone` is an IANA time zone PostgreSQL knows.
async fn check_time_zone(pool: &PgPool, zone: &str) -> Result<()> {
    let known: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = $1)")
            .bind(zone)
            .fetch_one(pool)
            .await?;
    if known {
        Ok(())
    } else {
        Err(Error::invalid(
            "time_zone",
            format!("{zone:?} is not an IANA time zone (e.g. \"Asia/Tokyo\")"),
        ))
    }
}

async fn fetch_tenant(pool: &PgPool, tenant_id: &str) -> Result<Tenant> {
    let sql = format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE tenant_id = $1");
    sqlx::query_as::<_, TenantRow>(sqlx::AssertSqlSafe(sql))
        .bind(tenant_id)
        .fetch_optional(pool)
        .await?
        .map(Tenant::from)
        .ok_or_else(|| Error::NotFound(format!("tenant {tenant_id:?} does not exist")))
}

/// NOT_FOUND unless the tenant exists.
pub async fn require_tenant(pool: &PgPool, tenant_id: &str) -> Result<()> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM tenants WHERE tenant_id = $1)")
            .bind(tenant_id)
            .fetch_one(pool)
            .await?;
    if exists {
        Ok(())
    } else {
        Err(Error::NotFound(format!(
            "tenant {tenant_id:?} does not exist"
        )))
    }
}

/// Every channel with its credentials.
async fn all_credentials(pool: &PgPool) -> Result<Vec<ChannelCredentials>> {
    let rows: Vec<(String, String, String, String, String, i64)> = sqlx::query_as(
        "SELECT tenant_id, channel_id, channel_secret, access_token, bot_user_id, revision \
         FROM channels ORDER BY channel_id",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(credentials).collect())
}

/// One channel with its credentials; `None` when it does not exist.
async fn one_credentials(pool: &PgPool, channel_id: &str) -> Result<Option<ChannelCredentials>> {
    let row: Option<(String, String, String, String, String, i64)> = sqlx::query_as(
        "SELECT tenant_id, channel_id, channel_secret, access_token, bot_user_id, revision \
         FROM channels WHERE channel_id = $1",
    )
    .bind(channel_id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(credentials))
}

fn credentials(
    (tenant_id, channel_id, channel_secret, access_token, bot_user_id, revision): (
        String,
        String,
        String,
        String,
        String,
        i64,
    ),
) -> ChannelCredentials {
    ChannelCredentials {
        tenant_id,
        channel_id,
        channel_secret,
        access_token,
        bot_user_id,
        revision,
    }
}

fn upsert(c: ChannelCredentials) -> ChannelRegistryEvent {
    ChannelRegistryEvent {
        event: Some(channel_registry_event::Event::Upsert(c)),
    }
}

fn removed(channel_id: String) -> ChannelRegistryEvent {
    ChannelRegistryEvent {
        event: Some(channel_registry_event::Event::RemovedChannelId(channel_id)),
    }
}

/// Streams the registry to one watcher: the full state, `synced`, then
/// changes. Resends the full state (with removals of channels that vanished
/// meanwhile) whenever notifications may have been missed.
async fn watch(
    pool: PgPool,
    mut changes: broadcast::Receiver<RegistryChange>,
    tx: mpsc::Sender<Result<ChannelRegistryEvent, Status>>,
    shutdown: Shutdown,
) -> Result<()> {
    let mut known: HashSet<String> = HashSet::new();
    let mut first = true;
    loop {
        // (Re)send the full state. Subscribed before reading, so no change
        // committed after this read can be missed.
        let state = all_credentials(&pool).await?;
        let now: HashSet<String> = state.iter().map(|c| c.channel_id.clone()).collect();
        for gone in known.difference(&now) {
            if tx.send(Ok(removed(gone.clone()))).await.is_err() {
                return Ok(());
            }
        }
        let count = state.len() as u32;
        for c in state {
            if tx.send(Ok(upsert(c))).await.is_err() {
                return Ok(());
            }
        }
        known = now;
        if first {
            let synced = ChannelRegistryEvent {
                event: Some(channel_registry_event::Event::Synced(Synced {
                    channel_count: count,
                })),
            };
            if tx.send(Ok(synced)).await.is_err() {
                return Ok(());
            }
            first = false;
        }
        // Then follow changes until a resync is needed.
        loop {
            let change = tokio::select! {
                () = shutdown.cancelled() => {
                    let _ = tx.send(Err(Status::unavailable("contacts is shutting down"))).await;
                    return Ok(());
                }
                () = tx.closed() => return Ok(()),
                change = changes.recv() => change,
            };
            match change {
                Ok(RegistryChange::Channel(channel_id)) => {
                    let event = match one_credentials(&pool, &channel_id).await? {
                        Some(c) => {
                            known.insert(c.channel_id.clone());
                            upsert(c)
                        }
                        None if known.remove(&channel_id) => removed(channel_id),
                        None => continue,
                    };
                    if tx.send(Ok(event)).await.is_err() {
                        return Ok(());
                    }
                }
                Ok(RegistryChange::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                Err(broadcast::error::RecvError::Closed) => {
                    let _ = tx
                        .send(Err(Status::unavailable("contacts is shutting down")))
                        .await;
                    return Ok(());
                }
            }
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<ChannelRegistryEvent, Status>> + Send>>;

#[tonic::async_trait]
impl TenantService for Tenants {
    #[tracing::instrument(name = "contacts.create_tenant", skip_all, fields(tenant_id = %request.get_ref().tenant_id))]
    async fn create_tenant(
        &self,
        request: Request<CreateTenantRequest>,
    ) -> Result<Response<Tenant>, Status> {
        Caller::of(&request)?.require_service()?;
        let r = request.into_inner();
        validate::tenant_id("tenant_id", &r.tenant_id)?;
        validate::display_name("display_name", &r.display_name, 200)?;
        let display_name = if r.display_name.is_empty() {
            r.tenant_id.clone()
        } else {
            r.display_name
        };
        let time_zone = if r.time_zone.is_empty() {
            DEFAULT_TIME_ZONE.to_owned()
        } else {
            r.time_zone
        };
        check_time_zone(&self.pool, &time_zone).await?;
        let sql = format!(
            "INSERT INTO tenants (tenant_id, display_name, time_zone) VALUES ($1, $2, $3) \
             RETURNING {TENANT_COLUMNS}"
        );
        let row = sqlx::query_as::<_, TenantRow>(sqlx::AssertSqlSafe(sql))
            .bind(&r.tenant_id)
            .bind(&display_name)
            .bind(&time_zone)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| {
                if is_unique_violation(&e) {
                    Error::AlreadyExists(format!("tenant {:?} already exists", r.tenant_id))
                } else {
                    e.into()
                }
            })?;
        tracing::info!(tenant_id = %row.tenant_id, "tenant created");
        Ok(Response::new(row.into()))
    }

    #[tracing::instrument(name = "contacts.update_tenant", skip_all, fields(tenant_id = %request.get_ref().tenant_id))]
    async fn update_tenant(
        &self,
        request: Request<UpdateTenantRequest>,
    ) -> Result<Response<Tenant>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        caller.authorize_tenant(&r.tenant_id)?;
        validate::display_name("display_name", &r.display_name, 200)?;
        if !r.time_zone.is_empty() {
            check_time_zone(&self.pool, &r.time_zone).await?;
        }
        let sql = format!(
            "UPDATE tenants SET \
               display_name = COALESCE(NULLIF($2, ''), display_name), \
               time_zone = COALESCE(NULLIF($3, ''), time_zone), \
               updated_at = now() \
             WHERE tenant_id = $1 RETURNING {TENANT_COLUMNS}"
        );
        let row = sqlx::query_as::<_, TenantRow>(sqlx::AssertSqlSafe(sql))
            .bind(&r.tenant_id)
            .bind(&r.display_name)
            .bind(&r.time_zone)
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::from)?
            .ok_or_else(|| Error::NotFound(format!("tenant {:?} does not exist", r.tenant_id)))?;
        Ok(Response::new(row.into()))
    }

    async fn get_tenant(
        &self,
        request: Request<GetTenantRequest>,
    ) -> Result<Response<Tenant>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        caller.authorize_tenant(&r.tenant_id)?;
        Ok(Response::new(fetch_tenant(&self.pool, &r.tenant_id).await?))
    }

    async fn list_tenants(
        &self,
        request: Request<ListTenantsRequest>,
    ) -> Result<Response<ListTenantsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let page = page::Page::from_request(request.into_inner().page.as_ref(), "page")?;
        let only = match &caller {
            Caller::Operator { tenant_id } => Some(tenant_id.clone()),
            _ => None,
        };
        let sql = format!(
            "SELECT {TENANT_COLUMNS} FROM tenants \
             WHERE tenant_id > $1 AND ($2::text IS NULL OR tenant_id = $2) \
             ORDER BY tenant_id LIMIT $3"
        );
        let rows = sqlx::query_as::<_, TenantRow>(sqlx::AssertSqlSafe(sql))
            .bind(page.after())
            .bind(only)
            .bind(page.fetch_limit())
            .fetch_all(&self.pool)
            .await
            .map_err(Error::from)?;
        let (rows, next) = page.split(rows, |r| r.tenant_id.clone());
        Ok(Response::new(ListTenantsResponse {
            tenants: rows.into_iter().map(Tenant::from).collect(),
            page: Some(PageResponse {
                next_page_token: next,
            }),
        }))
    }

    #[tracing::instrument(name = "contacts.put_channel", skip_all, fields(tenant_id = %request.get_ref().tenant_id, channel_id = %request.get_ref().channel_id))]
    async fn put_channel(
        &self,
        request: Request<PutChannelRequest>,
    ) -> Result<Response<Channel>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        caller.authorize_tenant(&r.tenant_id)?;
        validate::channel_id("channel_id", &r.channel_id)?;
        validate::display_name("display_name", &r.display_name, 200)?;
        validate::display_name("bot_user_id", &r.bot_user_id, 64)?;
        validate::secret("channel_secret", &r.channel_secret)?;
        validate::secret("access_token", &r.access_token)?;
        let display_name = if r.display_name.is_empty() {
            r.channel_id.clone()
        } else {
            r.display_name
        };
        // The ON CONFLICT target is the channel id alone: a channel id
        // registered to another tenant is not updated (the WHERE fails), and
        // the empty result is reported as ALREADY_EXISTS.
        let sql = format!(
            "INSERT INTO channels (tenant_id, channel_id, display_name, bot_user_id, channel_secret, access_token) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (channel_id) DO UPDATE SET \
               display_name = EXCLUDED.display_name, bot_user_id = EXCLUDED.bot_user_id, \
               channel_secret = EXCLUDED.channel_secret, access_token = EXCLUDED.access_token, \
               revision = nextval('channel_revisions'), updated_at = now() \
             WHERE channels.tenant_id = EXCLUDED.tenant_id \
             RETURNING {CHANNEL_COLUMNS}"
        );
        let row = sqlx::query_as::<_, ChannelRow>(sqlx::AssertSqlSafe(sql))
            .bind(&r.tenant_id)
            .bind(&r.channel_id)
            .bind(&display_name)
            .bind(&r.bot_user_id)
            .bind(&r.channel_secret)
            .bind(&r.access_token)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| {
                if is_foreign_key_violation(&e) {
                    Error::NotFound(format!("tenant {:?} does not exist", r.tenant_id))
                } else {
                    e.into()
                }
            })?
            .ok_or_else(|| {
                Error::AlreadyExists(format!(
                    "channel {:?} is registered to another tenant",
                    r.channel_id
                ))
            })?;
        tracing::info!("channel stored");
        Ok(Response::new(row.into()))
    }

    async fn get_channel(
        &self,
        request: Request<GetChannelRequest>,
    ) -> Result<Response<Channel>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        caller.authorize_tenant(&r.tenant_id)?;
        let sql = format!(
            "SELECT {CHANNEL_COLUMNS} FROM channels WHERE tenant_id = $1 AND channel_id = $2"
        );
        let row = sqlx::query_as::<_, ChannelRow>(sqlx::AssertSqlSafe(sql))
            .bind(&r.tenant_id)
            .bind(&r.channel_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::from)?
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "channel {:?} does not exist for tenant {:?}",
                    r.channel_id, r.tenant_id
                ))
            })?;
        Ok(Response::new(row.into()))
    }

    async fn list_channels(
        &self,
        request: Request<ListChannelsRequest>,
    ) -> Result<Response<ListChannelsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        caller.authorize_tenant(&r.tenant_id)?;
        require_tenant(&self.pool, &r.tenant_id).await?;
        let sql = format!(
            "SELECT {CHANNEL_COLUMNS} FROM channels WHERE tenant_id = $1 ORDER BY channel_id"
        );
        let rows = sqlx::query_as::<_, ChannelRow>(sqlx::AssertSqlSafe(sql))
            .bind(&r.tenant_id)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(ListChannelsResponse {
            channels: rows.into_iter().map(Channel::from).collect(),
        }))
    }

    #[tracing::instrument(name = "contacts.delete_channel", skip_all, fields(tenant_id = %request.get_ref().tenant_id, channel_id = %request.get_ref().channel_id))]
    async fn delete_channel(
        &self,
        request: Request<DeleteChannelRequest>,
    ) -> Result<Response<DeleteChannelResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        caller.authorize_tenant(&r.tenant_id)?;
        let deleted = sqlx::query("DELETE FROM channels WHERE tenant_id = $1 AND channel_id = $2")
            .bind(&r.tenant_id)
            .bind(&r.channel_id)
            .execute(&self.pool)
            .await
            .map_err(Error::from)?
            .rows_affected();
        if deleted == 0 {
            return Err(Error::NotFound(format!(
                "channel {:?} does not exist for tenant {:?}",
                r.channel_id, r.tenant_id
            ))
            .into());
        }
        tracing::info!("channel deleted");
        Ok(Response::new(DeleteChannelResponse {}))
    }

    type WatchChannelsStream = WatchStream;

    async fn watch_channels(
        &self,
        request: Request<WatchChannelsRequest>,
    ) -> Result<Response<Self::WatchChannelsStream>, Status> {
        Caller::of(&request)?.require_service()?;
        let changes = self.registry.subscribe();
        let (tx, rx) = mpsc::channel(256);
        let pool = self.pool.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let errors = tx.clone();
            if let Err(e) = watch(pool, changes, tx, shutdown).await {
                let _ = errors.send(Err(e.into())).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
