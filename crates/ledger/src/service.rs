//! Wiring for the binary: connect the read side, run the ledger projector,
//! build the HTTP state.

use std::sync::Arc;

use sluice_events::{EventStore, StoreConfig};
use sluice_host::http::AppState;
use sluice_projections::{Database, Member, RunnerConfig, RunningGroup};
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::read_models::{AccountActivity, AccountBalances};

/// Schema of the ledger read models.
pub(crate) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Applies the ledger's migrations (idempotent).
pub async fn migrate(db: &Database) -> Result<(), Error> {
    db.migrate(&MIGRATOR).await?;
    Ok(())
}

/// The event store and the migrated read store.
#[derive(Debug, Clone)]
pub struct ReadSide {
    /// The event log.
    pub store: EventStore,
    /// The read store.
    pub db: Database,
}

impl ReadSide {
    /// Connects to NATS (`nats_url`) and the read store (`database_url`:
    /// `sqlite://<file>` or `postgres://...`) and migrates it.
    pub async fn connect(nats_url: &str, database_url: &str) -> Result<Self, Error> {
        let store = EventStore::connect(nats_url, StoreConfig::default()).await?;
        Self::with_store(store, database_url).await
    }

    /// Uses an already connected event store (with the caller's NATS
    /// credentials, TLS and stream settings) and connects the read store.
    pub async fn with_store(store: EventStore, database_url: &str) -> Result<Self, Error> {
        let db = Database::connect(database_url).await?;
        migrate(&db).await?;
        Ok(Self { store, db })
    }
}

/// The ledger projections running in this process: `account_balances` and
/// `account_activity` as one group (one feed, one transaction per batch).
#[derive(Debug)]
pub struct Projector {
    /// The runner of the group.
    pub group: RunningGroup,
}

impl Projector {
    /// Starts `account_balances`, `account_activity` and `transfers`.
    pub async fn start(
        side: &ReadSide,
        config: RunnerConfig,
        shutdown: CancellationToken,
    ) -> Result<Self, Error> {
        let group = sluice_projections::spawn_group(
            vec![
                Member::from(Arc::new(AccountBalances::new())),
                Member::from(Arc::new(AccountActivity)),
                Member::from(Arc::new(crate::Transfers)),
            ],
            side.db.clone(),
            side.store.clone(),
            config,
            shutdown,
        )
        .await?;
        Ok(Self { group })
    }

    /// The HTTP state serving the ledger read models with this projector's
    /// live status.
    pub fn app_state(&self, side: &ReadSide) -> AppState {
        let live = |name: &str| {
            self.group
                .projections
                .iter()
                .find(|r| r.name == name)
                .map(|r| r.live.clone())
        };
        AppState::builder(side.store.clone(), side.db.clone())
            .read_model(
                Arc::new(AccountBalances::new()),
                live(crate::ACCOUNT_BALANCES),
            )
            .read_model(Arc::new(AccountActivity), live(crate::ACCOUNT_ACTIVITY))
            .read_model(Arc::new(crate::Transfers), live(crate::TRANSFERS))
            .build()
    }

    /// Waits for the runner to end (after shutdown).
    pub async fn join(self) {
        let _ = self.group.task.await;
    }
}

/// Environment variable choosing the read store (`sqlite://...` or
/// `postgres://...`).
pub const DATABASE_URL_ENV: &str = "SLUICE_DATABASE_URL";
/// Environment variable choosing the HTTP API address.
pub const HTTP_ADDR_ENV: &str = "SLUICE_HTTP_ADDR";
/// Default HTTP API address (loopback only).
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8080";

/// The embedded default read store: a SQLite file under the Sluice home.
pub fn default_database_url(home: &std::path::Path) -> String {
    format!("sqlite://{}", home.join("read.db").display())
}

/// Runs the whole read side until `shutdown`: connects NATS and the read
/// store, starts the ledger projector, serves the HTTP API on `addr`
/// (reporting the bound address through `bound`, useful with port 0), then
/// waits for the projections to stop.
pub async fn run_read_side(
    nats_url: &str,
    database_url: &str,
    addr: std::net::SocketAddr,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
) -> Result<(), Error> {
    let side = ReadSide::connect(nats_url, database_url).await?;
    serve_read_side(side, addr, shutdown, bound).await
}

/// [`run_read_side`] over an already connected [`ReadSide`] (e.g. from
/// [`ReadSide::with_store`] with the binary's own NATS connection).
pub async fn serve_read_side(
    side: ReadSide,
    addr: std::net::SocketAddr,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
) -> Result<(), Error> {
    let projector = Projector::start(&side, RunnerConfig::default(), shutdown.clone()).await?;
    let state = projector.app_state(&side);
    let served = sluice_host::http::serve_queries(addr, state, shutdown.clone(), bound).await;
    // Whatever ended the server, stop the projections with it.
    shutdown.cancel();
    projector.join().await;
    side.db.close().await;
    served?;
    Ok(())
}
