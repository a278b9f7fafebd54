//! Fans committed channel changes out to every open `WatchChannels` stream
//! of this process. The `channels` table's trigger NOTIFYs on commit; one
//! LISTEN connection per process receives them. Notifications are transient:
//! whenever the connection was lost (and on the first connect), watchers are
//! told to resync from the table, so nothing committed meanwhile is missed.

use std::time::Duration;

use hibiki_runtime::Shutdown;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::broadcast;

/// The NOTIFY channel the `channels` trigger uses.
pub const NOTIFY_CHANNEL: &str = "hibiki_contacts_channels";

/// What a watcher must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryChange {
    /// This channel changed (created, updated or deleted): read it again.
    Channel(String),
    /// Changes may have been missed: read the whole registry again.
    Resync,
}

/// The process's channel change feed.
#[derive(Clone)]
pub struct Registry {
    tx: broadcast::Sender<RegistryChange>,
}

impl Registry {
    /// Starts listening on `pool`'s server until `shutdown`.
    pub fn start(pool: PgPool, shutdown: Shutdown) -> Self {
        // A watcher more than this many changes behind resyncs instead.
        let (tx, _) = broadcast::channel(1024);
        tokio::spawn(listen(pool, tx.clone(), shutdown));
        Self { tx }
    }

    /// A new subscription; changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<RegistryChange> {
        self.tx.subscribe()
    }
}

async fn listen(pool: PgPool, tx: broadcast::Sender<RegistryChange>, shutdown: Shutdown) {
    loop {
        let connected = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(NOTIFY_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            () = shutdown.cancelled() => return,
            l = connected => match l {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "channel change feed: cannot listen; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            },
        };
        // Anything committed before LISTEN took effect was not notified.
        let _ = tx.send(RegistryChange::Resync);
        loop {
            let received = tokio::select! {
                () = shutdown.cancelled() => return,
                r = listener.try_recv() => r,
            };
            match received {
                Ok(Some(n)) => {
                    let _ = tx.send(RegistryChange::Channel(n.payload().to_owned()));
                }
                // The connection was lost and will be re-established: resync
                // once it is (sent at the top of the loop).
                Ok(None) | Err(_) => break,
            }
        }
    }
}
