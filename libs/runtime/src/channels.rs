//! The LINE channels a service works for, with their secrets and access
//! tokens, kept in memory from contacts' `WatchChannels` stream (the gateway
//! checks webhook signatures with them, delivery calls LINE with them).
//!
//! - The stream sends every channel, then `Synced`, then each change as it
//!   commits, so a channel created in contacts is accepted here as soon as
//!   its change arrives (well within a second).
//! - When contacts is unreachable, the service keeps using the channels it
//!   knows and reconnects (every 100 ms at first, then at most every
//!   second). After a reconnect the new initial state replaces the old one
//!   whole, so channels deleted in between go away too.
//! - Before the first `Synced`, nothing is known ([`Lookup::NotLoaded`]):
//!   the gateway answers webhooks 503 (LINE redelivers), not 404, since a
//!   channel's absence cannot be told yet.
//!
//! Secrets and tokens are held as [`Secret`] and never logged. Metrics:
//! `hibiki_channels_known`, `hibiki_channel_registry_connected`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::grpc::{self, ClientInterceptor};
use crate::{Secret, Shutdown};
use hibiki_proto::contacts::v1::channel_registry_event::Event as RegistryEvent;
use hibiki_proto::contacts::v1::tenant_service_client::TenantServiceClient;
use hibiki_proto::contacts::v1::{ChannelCredentials, WatchChannelsRequest};

/// Where contacts listens by default (`HIBIKI_CONTACTS_URL`).
pub const DEFAULT_CONTACTS_URL: &str = "http://127.0.0.1:50052";

/// What is known of one channel.
#[derive(Debug)]
pub struct ChannelKeys {
    /// The tenant owning the channel.
    pub tenant_id: String,
    /// The channel secret that signs its webhooks.
    pub secret: Secret,
    /// The channel access token for the Messaging API.
    pub access_token: Secret,
}

/// The answer to "which channel is this?".
#[derive(Debug, Clone)]
pub enum Lookup {
    /// A known channel.
    Found(Arc<ChannelKeys>),
    /// The registry is loaded and has no such channel.
    Unknown,
    /// The registry has not been loaded from contacts yet.
    NotLoaded,
}

#[derive(Default)]
struct State {
    loaded: bool,
    channels: HashMap<String, Arc<ChannelKeys>>,
}

/// The in-memory channel registry, shared by every request.
#[derive(Clone, Default)]
pub struct Channels {
    state: Arc<RwLock<State>>,
}

/// The registry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// `HIBIKI_CONTACTS_URL` is not a usable URL.
    #[error("HIBIKI_CONTACTS_URL: {0}")]
    Url(#[from] tonic::transport::Error),
    /// The service token cannot be sent as a header.
    #[error("HIBIKI_SERVICE_TOKENS: {0}")]
    Token(#[from] tonic::metadata::errors::InvalidMetadataValue),
}

/// contacts' tenant service, called with the service's own token.
type Client = TenantServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, ClientInterceptor>,
>;

const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(1);

impl Channels {
    /// Follows contacts at `contacts_url` until `shutdown`, presenting
    /// `token`.
    pub fn watch(
        contacts_url: &str,
        token: &Secret,
        shutdown: Shutdown,
    ) -> Result<Self, RegistryError> {
        let channel = grpc::channel(contacts_url)?;
        let client = TenantServiceClient::with_interceptor(channel, ClientInterceptor::new(token)?);
        let channels = Self::default();
        tokio::spawn(channels.clone().follow_until(client, shutdown));
        Ok(channels)
    }

    /// Which channel `channel_id` is.
    pub fn lookup(&self, channel_id: &str) -> Lookup {
        let state = self.state.read().expect("registry lock");
        match state.channels.get(channel_id) {
            Some(keys) => Lookup::Found(keys.clone()),
            None if state.loaded => Lookup::Unknown,
            None => Lookup::NotLoaded,
        }
    }

    /// Whether the registry has been loaded at least once.
    pub fn is_loaded(&self) -> bool {
        self.state.read().expect("registry lock").loaded
    }

    async fn follow_until(self, mut client: Client, shutdown: Shutdown) {
        let mut retry = FIRST_RETRY;
        loop {
            let lost = tokio::select! {
                () = shutdown.cancelled() => return,
                status = self.follow(&mut client, &mut retry) => status,
            };
            metrics::gauge!("hibiki_channel_registry_connected").set(0.0);
            // Warn once per outage (the first failure after a good stream,
            // or at start); the retries after it are debug.
            if retry == FIRST_RETRY {
                tracing::warn!(
                    error = %lost.message(), code = ?lost.code(), known = self.len(),
                    "channel registry stream from contacts lost; serving the channels known, reconnecting"
                );
            } else {
                tracing::debug!(error = %lost.message(), "channel registry: contacts still unreachable");
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(retry) => {}
            }
            retry = (retry * 2).min(MAX_RETRY);
        }
    }

    fn len(&self) -> usize {
        self.state.read().expect("registry lock").channels.len()
    }

    /// Reads one `WatchChannels` stream until it fails. Resets `retry` once
    /// the stream has delivered its initial state.
    async fn follow(&self, client: &mut Client, retry: &mut Duration) -> tonic::Status {
        let mut stream = match client.watch_channels(WatchChannelsRequest {}).await {
            Ok(r) => r.into_inner(),
            Err(status) => return status,
        };
        let mut initial: Option<HashMap<String, Arc<ChannelKeys>>> = Some(HashMap::new());
        loop {
            let event = match stream.message().await {
                Ok(Some(m)) => m.event,
                Ok(None) => return tonic::Status::unavailable("contacts ended the stream"),
                Err(status) => return status,
            };
            match event {
                Some(RegistryEvent::Upsert(c)) => {
                    let (id, keys) = keys_of(c);
                    match initial.as_mut() {
                        Some(map) => {
                            map.insert(id, keys);
                        }
                        None => {
                            tracing::info!(channel = %id, tenant = %keys.tenant_id, "channel registered or changed");
                            self.state
                                .write()
                                .expect("registry lock")
                                .channels
                                .insert(id, keys);
                        }
                    }
                }
                Some(RegistryEvent::RemovedChannelId(id)) => match initial.as_mut() {
                    Some(map) => {
                        map.remove(&id);
                    }
                    None => {
                        tracing::info!(channel = %id, "channel removed");
                        self.state
                            .write()
                            .expect("registry lock")
                            .channels
                            .remove(&id);
                    }
                },
                Some(RegistryEvent::Synced(_)) => {
                    if let Some(map) = initial.take() {
                        let count = map.len();
                        {
                            let mut state = self.state.write().expect("registry lock");
                            state.channels = map;
                            state.loaded = true;
                        }
                        metrics::gauge!("hibiki_channel_registry_connected").set(1.0);
                        tracing::info!(channels = count, "channel registry loaded from contacts");
                        *retry = FIRST_RETRY;
                    }
                }
                None => {}
            }
            metrics::gauge!("hibiki_channels_known").set(self.len() as f64);
        }
    }
}

fn keys_of(c: ChannelCredentials) -> (String, Arc<ChannelKeys>) {
    (
        c.channel_id,
        Arc::new(ChannelKeys {
            tenant_id: c.tenant_id,
            secret: Secret::new(c.channel_secret),
            access_token: Secret::new(c.access_token),
        }),
    )
}
