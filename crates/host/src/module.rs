//! The Module API: what a domain hands the host.
//!
//! A domain implements [`Module`] once; the host then gives it everything a
//! service on the platform has: its events checked against its schemas on
//! every public append, its projections run by the `projector` role and
//! served by the HTTP query API and `query`/`projection`/`replay`/`dlq`, its
//! command handlers and sagas run by the `worker` and `saga` roles, its
//! routes behind the host's authentication, rate limits and problem
//! documents, its paths in the OpenAPI document, its gauges on `/metrics`,
//! and its streams and buckets created by `serve --provision-only`.
//!
//! Why a trait and not a builder of closures: a domain is one value that
//! the host asks several questions at different times (at start-up, per
//! role, per request, per scrape), and a trait keeps the answers together,
//! documented, and checked by the compiler; every method but
//! [`Module::name`] has a default, so a module says only what it has.
//!
//! ```
//! use sluice_host::{App, Module};
//!
//! struct Inventory;
//!
//! impl Module for Inventory {
//!     fn name(&self) -> &'static str {
//!         "inventory"
//!     }
//! }
//!
//! let app = App::new("inventory-service").module(Inventory);
//! assert_eq!(app.module_names(), ["inventory"]);
//! ```

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;
use sluice_events::{Catalog, EventStore};
use sluice_projections::{Database, Member, Projection, ReadModel};
use sluice_workers::WorkerConfig;
use tokio_util::sync::CancellationToken;

pub use crate::config::Role;

/// Any error a module's task or set-up returns; the host logs it with the
/// module's name and stops the process.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Deadline of a saga step unless a module says otherwise: a standby worker
/// takes a dead one's commands over within half of it (the host refuses a
/// pin timeout longer than that).
pub const DEFAULT_STEP_DEADLINE: Duration = Duration::from_secs(30);

/// One of a module's projections: the runner's member and the read model
/// the query API serves for it (the same value).
#[derive(Clone)]
pub struct ModuleProjection {
    pub(crate) member: Member,
    pub(crate) read_model: Arc<dyn ReadModel>,
}

impl ModuleProjection {
    /// Wraps a projection that is also its read model.
    pub fn new<P: Projection + ReadModel>(projection: P) -> Self {
        let p = Arc::new(projection);
        Self {
            member: Member::from(p.clone()),
            read_model: p,
        }
    }

    /// Its constant name (the checkpoint key).
    pub fn name(&self) -> &'static str {
        self.member.name()
    }

    /// The runner's member.
    pub fn member(&self) -> &Member {
        &self.member
    }

    /// The read model.
    pub fn read_model(&self) -> &Arc<dyn ReadModel> {
        &self.read_model
    }
}

impl std::fmt::Debug for ModuleProjection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ModuleProjection")
            .field(&self.name())
            .finish()
    }
}

/// A long-running task of a role (a command handler, a saga
/// orchestrator); it ends when [`RoleContext::shutdown`] is cancelled.
pub struct RoleTask {
    /// The role that runs it.
    pub role: Role,
    /// What it is, for logs (e.g. `ledger-account-commands`).
    pub name: String,
    /// The task.
    pub task: BoxFuture<'static, Result<(), BoxError>>,
}

impl RoleTask {
    /// A task of `role` named `name`.
    pub fn new<F, E>(role: Role, name: impl Into<String>, task: F) -> Self
    where
        F: std::future::Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        Self {
            role,
            name: name.into(),
            task: Box::pin(async move { task.await.map_err(Into::into) }),
        }
    }
}

impl std::fmt::Debug for RoleTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoleTask")
            .field("role", &self.role)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// What the host tells a module when it starts its roles or provisions.
#[derive(Debug, Clone)]
pub struct RoleContext {
    /// The event log.
    pub store: EventStore,
    /// Cancelled when the process stops.
    pub shutdown: CancellationToken,
    pub(crate) replicas: usize,
    pub(crate) ack_wait: Duration,
    pub(crate) pin_timeout: Duration,
    pub(crate) take_over_on_start: bool,
    pub(crate) saga_deadline: Option<Duration>,
}

impl RoleContext {
    /// Replicas of every stream and bucket (as the event stream's).
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// `worker` with the deployment's settings: replicas, ack wait, pin
    /// timeout, retries that back off for less than the ack wait (so a
    /// retry never lets a later event of the aggregate through), and, on
    /// the embedded server where this process is the only consumer, taking
    /// a dead process's work over at start instead of after the pin
    /// timeout.
    pub fn worker(&self, mut worker: WorkerConfig) -> WorkerConfig {
        worker.replicas = self.replicas;
        worker.ack_wait = self.ack_wait;
        worker.pin_timeout = self.pin_timeout;
        worker.retry.cap = worker.retry.cap.min(self.ack_wait / 2);
        worker.retry.base = worker.retry.base.min(worker.retry.cap);
        worker.take_over_on_start = self.take_over_on_start;
        worker
    }

    /// The configured overall saga deadline (`[workers]
    /// saga_deadline_secs`), if any; a module uses its own default
    /// otherwise.
    pub fn saga_deadline(&self) -> Option<Duration> {
        self.saga_deadline
    }
}

/// What the host hands a module's HTTP routes.
#[derive(Debug, Clone)]
pub struct RouteContext {
    /// The event log.
    pub store: EventStore,
    /// The read store, when this process has one.
    pub db: Option<Database>,
    pub(crate) replicas: usize,
    pub(crate) idempotency_retention: Duration,
}

impl RouteContext {
    /// Replicas of every stream and bucket.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// How long Idempotency-Key records are kept (`[idempotency]
    /// retention_secs`).
    pub fn idempotency_retention(&self) -> Duration {
        self.idempotency_retention
    }
}

/// A domain on the platform. Every method but [`Module::name`] has a
/// default: a module says only what it has.
pub trait Module: Send + Sync + 'static {
    /// Its name, in logs and errors (e.g. `ledger`).
    fn name(&self) -> &'static str;

    /// The schemas of its events: the public append (HTTP and `publish`)
    /// refuses an event of one of its categories that does not match.
    fn catalog(&self) -> Result<Catalog, sluice_events::Error> {
        Ok(Catalog::new())
    }

    /// The migrations of its read models' tables (versions disjoint from
    /// every other module's and the platform's `1xxx`).
    fn migrator(&self) -> Option<&'static sqlx::migrate::Migrator> {
        None
    }

    /// Its projections, run as one group by the `projector` role.
    fn projections(&self) -> Vec<ModuleProjection> {
        Vec::new()
    }

    /// Its command handlers (`worker` role) and saga orchestrators (`saga`
    /// role); the host runs those of the roles this process has.
    fn roles(&self, _ctx: &RoleContext) -> Vec<RoleTask> {
        Vec::new()
    }

    /// Creates the streams, buckets and consumers its roles use (run by
    /// `serve --provision-only` with the admin user, and at every start);
    /// returns what it made sure of, for the operator.
    fn provision<'a>(
        &'a self,
        _ctx: &'a RoleContext,
    ) -> BoxFuture<'a, Result<Vec<String>, BoxError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Its HTTP routes. The host puts them behind its layers: `GET` needs
    /// the `read` scope (or nothing where reads are open), any other method
    /// the `write` scope, and paths ending in `/retry`, `/resolve`,
    /// `/abandon` the `operate` scope; errors leave as problem documents.
    fn routes<'a>(
        &'a self,
        _ctx: &'a RouteContext,
    ) -> BoxFuture<'a, Result<axum::Router, BoxError>> {
        Box::pin(async { Ok(axum::Router::new()) })
    }

    /// Adds its routes to the OpenAPI document (`paths`, `components`);
    /// the host then declares the answers of its own layers on them.
    fn openapi(&self, _doc: &mut Value) {}

    /// Sets its gauges (through the `metrics` facade) before each scrape
    /// of `/metrics`, e.g. sagas by state from its read model.
    fn refresh_metrics<'a>(&'a self, _db: &'a Database) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

/// The domain modules one binary hosts.
#[derive(Clone)]
pub struct App {
    pub(crate) name: &'static str,
    pub(crate) modules: Vec<Arc<dyn Module>>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("name", &self.name)
            .field("modules", &self.module_names())
            .finish()
    }
}

impl App {
    /// An app named like its binary (the name shows in service names of
    /// traces and in messages).
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            modules: Vec::new(),
        }
    }

    /// Adds a module.
    #[must_use]
    pub fn module(mut self, module: impl Module) -> Self {
        self.modules.push(Arc::new(module));
        self
    }

    /// The binary's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Its modules' names, in order.
    pub fn module_names(&self) -> Vec<&'static str> {
        self.modules.iter().map(|m| m.name()).collect()
    }

    /// Every module's projections, in order.
    pub fn projections(&self) -> Vec<ModuleProjection> {
        self.modules.iter().flat_map(|m| m.projections()).collect()
    }

    /// The projection named `name`, or a usage error naming the known ones.
    pub fn projection(&self, name: &str) -> Result<ModuleProjection, crate::Error> {
        let all = self.projections();
        all.iter()
            .find(|p| p.name() == name)
            .cloned()
            .ok_or_else(|| crate::Error::UnknownProjection {
                name: name.chars().take(64).collect(),
                known: all
                    .iter()
                    .map(ModuleProjection::name)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// What the public append accepts: the platform's reserved categories
    /// and every module's schemas.
    pub fn catalog(&self) -> Result<Catalog, sluice_events::Error> {
        let mut catalog = Catalog::platform();
        for m in &self.modules {
            catalog = catalog.merge(m.catalog()?)?;
        }
        Ok(catalog)
    }

    /// Connects the read store at `url` and applies the platform's and
    /// every module's migrations.
    pub async fn open_read_store(&self, url: &str) -> Result<Database, crate::Error> {
        let db = Database::connect(url).await?;
        for m in &self.modules {
            if let Some(migrator) = m.migrator() {
                db.migrate(migrator).await?;
            }
        }
        Ok(db)
    }
}
