//! line-sim: the LINE platform as hibiki meets it, for development, tests
//! and benchmarks, since LINE itself is not reachable from them.
//!
//! Two HTTP listeners:
//! - **the Messaging API** (`api`), at LINE's paths, with LINE's bearer
//!   tokens, validation and error bodies, limits, retry keys and 429s, and
//!   injectable faults (5xx, no answer, latency, 429 bursts);
//! - **the admin API** (`admin`): channels, faults, limits, the ledger of
//!   everything accepted (messages per recipient, rich-menu changes, counts
//!   per endpoint and status), reply tokens, and webhook storms.
//!
//! [`LineSim::start`] runs both in the caller's process (tests, `hibiki
//! dev`); the `line-sim` binary runs them on their own.
#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod state;
pub mod storm;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use state::{Faults, SimChannel, SimConfig};

/// The simulator's shared state and its stop signal.
#[derive(Clone)]
pub struct Sim {
    state: Arc<Mutex<state::State>>,
    stop: CancellationToken,
}

impl Sim {
    /// A simulator with `config`, not yet listening.
    pub fn new(config: SimConfig) -> Self {
        Self {
            state: Arc::new(Mutex::new(state::State::new(config))),
            stop: CancellationToken::new(),
        }
    }

    /// The state, locked (never held across an await).
    pub fn lock(&self) -> MutexGuard<'_, state::State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates a rich menu for `channel_id` as LINE's create call would, with
    /// an alias when one is given; returns its id (for seeding `hibiki dev`
    /// and tests).
    pub fn create_rich_menu(&self, channel_id: &str, name: &str, alias: Option<&str>) -> String {
        let mut s = self.lock();
        let id = state::new_rich_menu_id();
        let menu = serde_json::json!({
            "richMenuId": id,
            "size": {"width": 2500, "height": 843},
            "selected": false,
            "name": name,
            "chatBarText": name,
            "areas": [],
        });
        s.rich_menus
            .entry(channel_id.to_owned())
            .or_default()
            .insert(id.clone(), menu);
        if let Some(alias) = alias {
            s.aliases
                .entry(channel_id.to_owned())
                .or_default()
                .insert(alias.to_owned(), id.clone());
        }
        id
    }

    /// Resolves when the simulator stops.
    pub async fn stopped(&self) {
        self.stop.cancelled().await;
    }
}

/// A running simulator: its addresses and a handle on its state. Dropping
/// it stops it.
pub struct LineSim {
    sim: Sim,
    api: SocketAddr,
    admin: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Why line-sim could not start.
#[derive(Debug, thiserror::Error)]
#[error("line-sim cannot listen on {addr}: {source}")]
pub struct StartError {
    addr: SocketAddr,
    source: std::io::Error,
}

impl LineSim {
    /// Starts the API on `api` and the admin API on `admin` (port 0 picks a
    /// free one).
    pub async fn start(
        config: SimConfig,
        api: SocketAddr,
        admin: SocketAddr,
    ) -> Result<Self, StartError> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError { addr, source })
        };
        let (api_listener, admin_listener) = (bind(api).await?, bind(admin).await?);
        let api = api_listener.local_addr().expect("a bound address");
        let admin = admin_listener.local_addr().expect("a bound address");
        let sim = Sim::new(config);
        let serve = |listener: TcpListener, router: axum::Router, stop: CancellationToken| {
            tokio::spawn(async move {
                use axum::serve::ListenerExt;
                let listener = listener.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                if let Err(e) = axum::serve(listener, router)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await
                {
                    tracing::error!(error = %e, "line-sim stopped serving");
                }
            })
        };
        let tasks = vec![
            serve(api_listener, api::router(sim.clone()), sim.stop.clone()),
            serve(admin_listener, admin::router(sim.clone()), sim.stop.clone()),
        ];
        tracing::info!(api = %format!("http://{api}"), admin = %format!("http://{admin}"), "line-sim listening");
        Ok(Self {
            sim,
            api,
            admin,
            tasks,
        })
    }

    /// The Messaging API's base URL (what delivery calls instead of
    /// `https://api.line.me`).
    pub fn api_url(&self) -> String {
        format!("http://{}", self.api)
    }

    /// The admin API's base URL.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// The simulator's state, for in-process callers.
    pub fn sim(&self) -> &Sim {
        &self.sim
    }

    /// Stops both listeners and waits until they are closed.
    pub async fn stop(mut self) {
        self.sim.stop.cancel();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

impl Drop for LineSim {
    fn drop(&mut self) {
        self.sim.stop.cancel();
    }
}
