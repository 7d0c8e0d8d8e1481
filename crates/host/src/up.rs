//! [`run`]: `up` and `serve` in-process, and the CLI's `up`/`serve` on top.
//!
//! `up` is the embedded default: every role in one process, a nats-server
//! child process (JetStream, fsync always, store under `.sluice/nats`) unless
//! a NATS URL is configured, and a SQLite read store under `.sluice/`.
//! `serve --role ...` runs any subset of roles against configured NATS and
//! database servers, for running roles as separate, horizontally scaled
//! services. [`run`] starts either and returns a [`Running`] handle; the
//! CLI commands parse their arguments into a [`RunConfig`], cancel the
//! shutdown token on Ctrl-C or SIGTERM and print what runs where.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sluice_events::{
    EmbeddedAuth, EmbeddedConfig, EmbeddedServer, EventStore, StoreConfig, SyncInterval, redact_url,
};
use sluice_projections::RunnerConfig;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Role};
use crate::endpoint::{self, Endpoint};
use crate::error::Error;
use crate::http;
use crate::module::{App, BoxError};

/// Options of `sluice up`.
#[derive(Debug, clap::Args)]
pub(crate) struct UpArgs {
    /// Port for the embedded nats-server on 127.0.0.1 (default: a free one).
    #[arg(long, env = "SLUICE_NATS_PORT")]
    nats_port: Option<u16>,
    #[command(flatten)]
    common: CommonArgs,
}

/// Options of `sluice serve`.
#[derive(Debug, clap::Args)]
pub(crate) struct ServeArgs {
    /// Roles to run, comma-separated (default: all, or `roles` in the config).
    #[arg(long = "role", value_delimiter = ',', value_enum)]
    roles: Vec<Role>,
    /// Create every stream and bucket the roles use (with `nats.replicas`),
    /// then exit; run once with the admin NATS user before the roles start.
    #[arg(long)]
    provision_only: bool,
    #[command(flatten)]
    common: CommonArgs,
}

impl ServeArgs {
    /// The default service name in traces: `<binary>-<role>[-<role>...]`, from
    /// `--role`, else the configuration (which `serve` validates later).
    pub(crate) fn service_name(&self, binary: &str) -> String {
        let roles = if self.roles.is_empty() {
            Config::load(self.common.config.as_deref())
                .map(|c| c.roles())
                .unwrap_or_else(|_| Role::ALL.to_vec())
        } else {
            self.roles.clone()
        };
        let names: Vec<String> = roles
            .iter()
            .map(|r| format!("{r:?}").to_lowercase())
            .collect();
        format!("{binary}-{}", names.join("-"))
    }
}

/// Options shared by `up` and `serve`.
#[derive(Debug, clap::Args)]
pub(crate) struct CommonArgs {
    /// Configuration file (TOML); `SLUICE_*` variables override it.
    #[arg(long, env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
    /// HTTP API address (default 127.0.0.1:8080; port 0 picks a free one).
    #[arg(long, env = "SLUICE_HTTP_ADDR")]
    http: Option<SocketAddr>,
    /// Read store: `sqlite://<file>` or `postgres://...` (default: SQLite
    /// under the home directory).
    #[arg(long, env = "SLUICE_DATABASE_URL")]
    database_url: Option<String>,
    /// Refuse to start when the event stream could lose acknowledged writes.
    #[arg(long, env = "SLUICE_STRICT")]
    strict: bool,
    /// How long Idempotency-Key records are kept, in seconds (default
    /// 86400 = 24 h, or `idempotency.retention_secs` in the config).
    #[arg(long, env = "SLUICE_IDEMPOTENCY_RETENTION_SECS")]
    idempotency_retention_secs: Option<u64>,
}

impl CommonArgs {
    /// The [`RunConfig`] these options describe, with the global options
    /// and the `SLUICE_*` environment as the CLI reads it.
    fn run_config(self, mode: Mode, nats_url: Option<String>, home: PathBuf) -> RunConfig {
        RunConfig {
            mode,
            home,
            nats_url,
            config_file: self.config,
            environment: true,
            http: self.http,
            database_url: self.database_url,
            strict: self.strict,
            idempotency_retention_secs: self.idempotency_retention_secs,
        }
    }
}

/// `<binary> up`: [`run`] with every role, until Ctrl-C or SIGTERM.
pub(crate) async fn up(
    app: &App,
    args: UpArgs,
    nats_url: Option<String>,
    home: PathBuf,
) -> anyhow::Result<()> {
    let mode = Mode::Up {
        nats_port: args.nats_port,
    };
    run_until_signal(app, args.common.run_config(mode, nats_url, home)).await
}

/// `<binary> serve`: [`run`] with the chosen roles until Ctrl-C or
/// SIGTERM, or `--provision-only`.
pub(crate) async fn serve(
    app: &App,
    args: ServeArgs,
    nats_url: Option<String>,
    home: PathBuf,
) -> anyhow::Result<()> {
    let mode = Mode::Serve { roles: args.roles };
    let run_config = args.common.run_config(mode, nats_url, home);
    if args.provision_only {
        let config = run_config.load()?;
        let url = serve_url(app, &config)?;
        return crate::provision::provision(app, &config, &url).await;
    }
    run_until_signal(app, run_config).await
}

/// The CLI's side of [`run`]: Ctrl-C or SIGTERM cancels the token, and
/// what runs where is printed for people.
async fn run_until_signal(app: &App, config: RunConfig) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let signals = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            shutdown.cancel();
        }
    });
    let running = match run(app, config, shutdown).await {
        Ok(running) => running,
        Err(e) => {
            signals.abort();
            return Err(e.into());
        }
    };
    print!("{}", running.banner());
    let result = running.wait().await;
    signals.abort();
    println!("{} stopped", app.name());
    Ok(result?)
}

/// What [`run`] runs: the two commands of the CLI, with the same names so
/// that the documentation of one is the documentation of the other.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// `up`: every role in this process, on an embedded nats-server (its
    /// store under `<home>/nats`) unless a NATS URL is configured.
    Up {
        /// Port of the embedded server on 127.0.0.1 (`None`: a free one).
        nats_port: Option<u16>,
    },
    /// `serve`: these roles (empty: `roles` in the configuration file, else
    /// all) against the configured NATS server, which it needs.
    Serve {
        /// The roles to run.
        roles: Vec<Role>,
    },
}

/// How [`run`] runs: what `up` and `serve` take from their options.
///
/// The fields are public and named like the CLI's options; build one with
/// [`RunConfig::up`] or [`RunConfig::serve`] and change what you need.
/// With [`RunConfig::environment`] off (the default here, on in the CLI)
/// the `SLUICE_*` variables are ignored, so a test or an embedding
/// program gets exactly what it wrote.
///
/// ```
/// use sluice_host::{Mode, RunConfig};
///
/// let mut config = RunConfig::up("/tmp/sluice-home");
/// config.http = Some("127.0.0.1:0".parse().unwrap());
/// assert_eq!(config.mode, Mode::Up { nats_port: None });
/// assert!(!config.environment);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RunConfig {
    /// `up` or `serve`.
    pub mode: Mode,
    /// The home directory (`--home`): the embedded server's store, the
    /// endpoint file, the API token, the default SQLite read store.
    pub home: PathBuf,
    /// The NATS server (`--nats-url`); for `up`, `None` starts the embedded
    /// one.
    pub nats_url: Option<String>,
    /// A TOML configuration file (`--config`); these fields override it.
    pub config_file: Option<PathBuf>,
    /// Whether the `SLUICE_*` environment variables override the file, as
    /// in the CLI.
    pub environment: bool,
    /// The HTTP API address (`--http`; port 0 picks a free one, which
    /// [`Running::http_addr`] tells).
    pub http: Option<SocketAddr>,
    /// The read store (`--database-url`): `sqlite://<file>` or
    /// `postgres://...`; `None`: SQLite under the home.
    pub database_url: Option<String>,
    /// Refuse to start when the event stream could lose acknowledged
    /// writes (`--strict`).
    pub strict: bool,
    /// How long Idempotency-Key records are kept, in seconds.
    pub idempotency_retention_secs: Option<u64>,
}

impl RunConfig {
    /// `up` in `home`: the embedded nats-server, SQLite, every role.
    pub fn up(home: impl Into<PathBuf>) -> Self {
        Self::new(Mode::Up { nats_port: None }, home.into(), None)
    }

    /// `serve` of `roles` (empty: all) against the NATS server at
    /// `nats_url`, with `home` for the token and the default read store.
    pub fn serve(home: impl Into<PathBuf>, nats_url: impl Into<String>, roles: Vec<Role>) -> Self {
        Self::new(Mode::Serve { roles }, home.into(), Some(nats_url.into()))
    }

    fn new(mode: Mode, home: PathBuf, nats_url: Option<String>) -> Self {
        Self {
            mode,
            home,
            nats_url,
            config_file: None,
            environment: false,
            http: None,
            database_url: None,
            strict: false,
            idempotency_retention_secs: None,
        }
    }

    /// The file, the environment (if asked) and these fields, validated.
    fn load(&self) -> Result<Config, Error> {
        let start = |source: anyhow::Error| Error::Start {
            what: "reading the configuration",
            source: source.into(),
        };
        let mut config = if self.environment {
            Config::load(self.config_file.as_deref())
        } else {
            Config::load_with(self.config_file.as_deref(), |_| None)
        }
        .map_err(start)?;
        if self.nats_url.is_some() {
            config.nats.url.clone_from(&self.nats_url);
        }
        if let Some(addr) = self.http {
            config.http.addr = Some(addr);
        }
        if let Some(db) = &self.database_url {
            config.database.url = Some(db.clone());
        }
        if let Some(secs) = self.idempotency_retention_secs {
            config.idempotency.retention_secs = Some(secs);
        }
        if let Mode::Serve { roles } = &self.mode
            && !roles.is_empty()
        {
            config.roles.clone_from(roles);
        }
        config.validate().map_err(start)?;
        Ok(config)
    }
}

/// The NATS URL `serve` needs.
fn serve_url(app: &App, config: &Config) -> Result<String, Error> {
    let name = app.name();
    config.nats.url.clone().ok_or_else(|| Error::Start {
        what: "reading the configuration",
        source: format!(
            "{name} serve needs a NATS server: set SLUICE_NATS_URL, --nats-url or nats.url (use `{name} up` for the embedded one)"
        )
        .into(),
    })
}

/// Where `sluice up` keeps the embedded server's admin credential (0600).
pub(crate) fn credentials_path(home: &Path) -> PathBuf {
    home.join("nats-credentials.json")
}

/// Runs `app` as `up` or `serve` in this process; returns once every role
/// has started (the HTTP API listens, the endpoint file is written), with
/// the [`Running`] handle that tells where things are. Cancelling
/// `shutdown` stops everything cleanly; [`Running::wait`] says how it
/// ended.
///
/// Why a token and a handle rather than a future that runs until the end:
/// the caller learns the addresses (port 0 picks free ones) before it
/// drives the API, stops it without signals (tests, an embedding program,
/// the CLI's Ctrl-C handler all cancel the same token), and still gets the
/// first role's failure from [`Running::wait`]. A role that fails, or
/// panics, stops the others too.
///
/// A start that fails leaves nothing running: the roles already started
/// are stopped and the embedded server too.
///
/// ```no_run
/// # async fn demo(app: sluice_host::App) -> Result<(), sluice_host::Error> {
/// use tokio_util::sync::CancellationToken;
///
/// let mut config = sluice_host::RunConfig::up(".sluice");
/// config.http = Some("127.0.0.1:0".parse().expect("an address"));
/// let shutdown = CancellationToken::new();
/// let running = sluice_host::run(&app, config, shutdown.clone()).await?;
/// println!("API on {:?}, NATS at {}", running.http_addr(), running.nats_url());
/// shutdown.cancel();
/// running.wait().await
/// # }
/// ```
pub async fn run(
    app: &App,
    config: RunConfig,
    shutdown: CancellationToken,
) -> Result<Running, Error> {
    let settings = config.load()?;
    let home = config.home.clone();
    let (url, roles, embedded) = match &config.mode {
        Mode::Up { nats_port } => match settings.nats.url.clone() {
            Some(url) => (url, Role::ALL.to_vec(), None),
            None => {
                let server = start_embedded(app, &home, *nats_port).await?;
                (server.url(), Role::ALL.to_vec(), Some(server))
            }
        },
        Mode::Serve { .. } => (serve_url(app, &settings)?, settings.roles(), None),
    };
    let embedded_url = embedded.as_ref().map(EmbeddedServer::anonymous_url);
    let stop = shutdown.child_token();
    let started = start(
        app,
        &settings,
        &url,
        &roles,
        &home,
        embedded_url.as_deref(),
        config.strict,
        &stop,
    )
    .await;
    let (banner, tasks) = match started {
        Ok(s) => s,
        Err(e) => {
            // Nothing stays running after a failed start.
            stop.cancel();
            if let Some(server) = embedded {
                stop_embedded(server).await;
            }
            return Err(e);
        }
    };
    let nats_url = embedded_url.unwrap_or_else(|| redact_url(&url));
    let supervisor = tokio::spawn(supervise(tasks, stop.clone(), embedded, home.clone()));
    Ok(Running {
        binary: app.name(),
        home,
        roles,
        nats_url,
        banner,
        supervisor,
    })
}

/// Starts the embedded nats-server of `home`, unless `up` already runs
/// there; a server left by a killed `up` is stopped first (see
/// [`EmbeddedServer::start`]).
async fn start_embedded(
    app: &App,
    home: &Path,
    nats_port: Option<u16>,
) -> Result<EmbeddedServer, Error> {
    if let Some(existing) = endpoint::read(home)
        && process_alive(existing.pid)
    {
        return Err(Error::AlreadyRunning {
            binary: app.name(),
            pid: existing.pid,
            nats_url: existing.nats_url,
        });
    }
    let mut ec = EmbeddedConfig::new(home.join("nats"));
    ec.port = nats_port;
    ec.sync = SyncInterval::Always;
    // The admin credential sits beside the API token; a home from before
    // authorization gets one now (the server config is rewritten at every
    // start).
    ec.auth = EmbeddedAuth::Generated {
        file: credentials_path(home),
    };
    let start = |source: BoxError| Error::Start {
        what: "starting the embedded nats-server",
        source,
    };
    // It waits for the child to listen (and for a leftover to stop).
    tokio::task::spawn_blocking(move || EmbeddedServer::start(ec))
        .await
        .map_err(|e| start(e.into()))?
        .map_err(|e| start(e.into()))
}

/// Stops the embedded server cleanly (SIGTERM, SIGKILL after 10 s).
async fn stop_embedded(mut server: EmbeddedServer) {
    let _ = tokio::task::spawn_blocking(move || server.stop(Duration::from_secs(10))).await;
}

/// A role's task, named for logs and errors.
type Task = (String, tokio::task::JoinHandle<Result<(), BoxError>>);

/// Spawns `task`; its failure (or panic) cancels `stop`, so the other
/// roles stop with it.
fn spawn_task<F>(tasks: &mut Vec<Task>, name: String, stop: &CancellationToken, task: F)
where
    F: std::future::Future<Output = Result<(), BoxError>> + Send + 'static,
{
    let guard = stop.clone().drop_guard();
    tasks.push((
        name,
        tokio::spawn(async move {
            let result = task.await;
            if result.is_ok() {
                guard.disarm();
            }
            result
        }),
    ));
}

/// Waits for `stop`, then for every task; stops the embedded server and
/// removes the endpoint file it wrote. The first failure is the result.
async fn supervise(
    tasks: Vec<Task>,
    stop: CancellationToken,
    embedded: Option<EmbeddedServer>,
    home: PathBuf,
) -> Result<(), Error> {
    stop.cancelled().await;
    tracing::info!("shutting down");
    let mut first_failure = None;
    for (task, handle) in tasks {
        let source: BoxError = match handle.await {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(e) => Box::new(e),
        };
        tracing::error!(task = %task, error = %source, "role stopped with an error");
        first_failure.get_or_insert(Error::Role { task, source });
    }
    if let Some(server) = embedded {
        stop_embedded(server).await;
        endpoint::remove(&home);
    }
    first_failure.map_or(Ok(()), Err)
}

/// A running [`run`]: where it listens, and its end. Dropping it does not
/// stop anything: cancel the shutdown token.
pub struct Running {
    binary: &'static str,
    home: PathBuf,
    roles: Vec<Role>,
    nats_url: String,
    banner: Banner,
    supervisor: tokio::task::JoinHandle<Result<(), Error>>,
}

/// What the CLI prints once it is up, found while starting.
struct Banner {
    /// A new API token was written there.
    token_created: Option<PathBuf>,
    token_file: Option<PathBuf>,
    open_reads: bool,
    http_addr: Option<SocketAddr>,
    http_scheme: &'static str,
    server_version: String,
    stream: String,
    messages: u64,
    last_position: u64,
    embedded: bool,
    /// The read store's URL, when the read side runs here (for the
    /// endpoint file, never printed).
    read_store: Option<String>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("binary", &self.binary)
            .field("home", &self.home)
            .field("roles", &self.roles)
            .field("nats_url", &self.nats_url)
            .field("http_addr", &self.banner.http_addr)
            .finish_non_exhaustive()
    }
}

impl Running {
    /// Where the HTTP API listens (the port chosen when it was 0); `None`
    /// without the `api` role.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.banner.http_addr
    }

    /// The NATS server, without credentials (safe to print): the embedded
    /// server's `nats://127.0.0.1:<port>`, whose admin credential is in
    /// `<home>/nats-credentials.json`, or the configured URL redacted.
    pub fn nats_url(&self) -> &str {
        &self.nats_url
    }

    /// The home directory.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// The roles running.
    pub fn roles(&self) -> &[Role] {
        &self.roles
    }

    /// Whether it runs on its own embedded nats-server.
    pub fn embedded(&self) -> bool {
        self.banner.embedded
    }

    /// Waits until it has stopped (the shutdown token cancelled, or a role
    /// failed): every role stopped, the embedded server stopped and the
    /// endpoint file removed. The first role's failure is the error.
    pub async fn wait(self) -> Result<(), Error> {
        self.supervisor.await.unwrap_or_else(|e| {
            Err(Error::Role {
                task: "the supervisor".to_owned(),
                source: Box::new(e),
            })
        })
    }

    /// The lines the CLI prints once it is up.
    fn banner(&self) -> String {
        use std::fmt::Write as _;
        let b = &self.banner;
        let mut out = String::new();
        // Writing to a String cannot fail.
        let mut line = |s: std::fmt::Arguments<'_>| {
            let _ = out.write_fmt(s);
            out.push('\n');
        };
        if let Some(path) = &b.token_created {
            line(format_args!(
                "  token:   a new API token was written to {} (mode 0600)",
                path.display()
            ));
        }
        line(format_args!("{} is up", self.binary));
        line(format_args!(
            "  roles:   {}",
            self.roles
                .iter()
                .map(|r| format!("{r:?}").to_lowercase())
                .collect::<Vec<_>>()
                .join(",")
        ));
        line(format_args!(
            "  nats:    {}  (nats-server {})",
            self.nats_url, b.server_version
        ));
        if let Some(addr) = b.http_addr {
            line(format_args!(
                "  http:    {}://{addr}/v1/projections  (openapi: /openapi.json, metrics: /metrics)",
                b.http_scheme
            ));
        }
        line(format_args!(
            "  stream:  {} ({} events, last position {})",
            b.stream, b.messages, b.last_position
        ));
        if let Some(t) = &b.token_file {
            line(format_args!(
                "  auth:    {} need Authorization: Bearer $(cat {}) (or a `{} token create` token)",
                if b.open_reads {
                    "appends and /v1/dlq"
                } else {
                    "all routes but /healthz and /readyz"
                },
                t.display(),
                self.binary
            ));
        }
        if b.embedded {
            line(format_args!("  data:    {}", self.home.display()));
            line(format_args!(
                "  connect: SLUICE_NATS_URL={}  (commands run in this directory find it by themselves)",
                self.nats_url
            ));
            line(format_args!(
                "  nats auth: user and password in {} (mode 0600); anonymous clients are refused",
                credentials_path(&self.home).display()
            ));
        }
        line(format_args!("Press Ctrl-C to stop."));
        out
    }
}

/// Connects, starts every role of `roles` under `stop` and writes the
/// endpoint file. `embedded_url`: the embedded server's URL without its
/// credential (what the endpoint file and the output show), when `url` is
/// that server.
#[allow(clippy::too_many_arguments)]
async fn start(
    app: &App,
    config: &Config,
    url: &str,
    roles: &[Role],
    home: &Path,
    embedded_url: Option<&str>,
    strict: bool,
    stop: &CancellationToken,
) -> Result<(Banner, Vec<Task>), Error> {
    let mut tasks = Vec::new();
    match start_roles(
        app,
        config,
        url,
        roles,
        home,
        embedded_url,
        strict,
        stop,
        &mut tasks,
    )
    .await
    {
        Ok(banner) => Ok((banner, tasks)),
        Err(e) => {
            // Stop what did start before saying why.
            stop.cancel();
            for (_, t) in tasks {
                let _ = t.await;
            }
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn start_roles(
    app: &App,
    config: &Config,
    url: &str,
    roles: &[Role],
    home: &Path,
    embedded_url: Option<&str>,
    strict: bool,
    stop: &CancellationToken,
    tasks: &mut Vec<Task>,
) -> Result<Banner, Error> {
    let starting = |source: anyhow::Error| Error::Start {
        what: "starting the roles",
        source: source.into(),
    };
    let embedded = embedded_url.is_some();
    let store = connect(config, url, roles, embedded)
        .await
        .map_err(starting)?;
    // The embedded server fsyncs every write; `serve` is production.
    let warnings = store.stream_state().await?.durability_warnings(
        embedded.then_some(true),
        !embedded,
        store.config().retry_horizon(),
    );
    for w in &warnings {
        tracing::warn!(warning = %w, "durability");
    }
    // What a client can tell about the server's protection (the routes
    // need `sluice status --monitor-url`); logged, never a reason to stop.
    let observed = crate::nats_lint::Observed::from_info(&store.server_info());
    for w in crate::nats_lint::security_warnings(&observed, None, !embedded) {
        tracing::warn!(warning = %w, "security");
    }
    if strict && !warnings.is_empty() {
        return Err(Error::Strict {
            warnings: warnings.join("; "),
        });
    }
    let mut banner = read_side(app, config, &store, roles, home, embedded, stop, tasks)
        .await
        .map_err(starting)?;
    // The modules' command handlers (worker) and orchestrators (saga).
    let role_ctx = crate::provision::role_context(config, &store, stop.clone(), embedded);
    for m in &app.modules {
        for t in m.roles(&role_ctx) {
            if !roles.contains(&t.role) {
                continue;
            }
            let (module, name) = (m.name(), t.name);
            tracing::info!(module, task = %name, role = ?t.role, "starting");
            spawn_task(tasks, format!("{module} {name}"), stop, t.task);
        }
    }
    write_endpoint(url, home, embedded_url, &banner).map_err(starting)?;
    let state = store.stream_state().await?;
    banner.server_version = store.server_version().to_string();
    banner.stream.clone_from(&store.config().stream);
    banner.messages = state.messages;
    banner.last_position = state.last_position;
    Ok(banner)
}

/// The event store on `url`.
async fn connect(
    config: &Config,
    url: &str,
    roles: &[Role],
    embedded: bool,
) -> anyhow::Result<EventStore> {
    let mut connect = config.connect(url)?;
    // A single-role process replies on its role's own inboxes: the
    // least-privilege users may subscribe to those only
    // (nats/permissions.conf), so no role reads another's replies.
    if let [role] = roles
        && connect.inbox_prefix.is_none()
        && !embedded
    {
        connect.inbox_prefix = Some(format!("_INBOX_{}", format!("{role:?}").to_lowercase()));
    }
    EventStore::connect_with(
        &connect,
        StoreConfig {
            replicas: config.nats.replicas.unwrap_or(1),
            ..StoreConfig::default()
        },
    )
    .await
    .context("connecting to NATS")
}

/// The read side: the projector and/or the API, when `roles` has them.
#[allow(clippy::too_many_arguments)]
async fn read_side(
    app: &App,
    config: &Config,
    store: &EventStore,
    roles: &[Role],
    home: &Path,
    embedded: bool,
    stop: &CancellationToken,
    tasks: &mut Vec<Task>,
) -> anyhow::Result<Banner> {
    let has = |r: Role| roles.contains(&r);
    let mut banner = Banner {
        token_created: None,
        token_file: None,
        open_reads: true,
        http_addr: None,
        http_scheme: "http",
        server_version: String::new(),
        stream: String::new(),
        messages: 0,
        last_position: 0,
        embedded,
        read_store: None,
    };
    if !has(Role::Api) && !has(Role::Projector) {
        return Ok(banner);
    }
    let db_url = config
        .database
        .url
        .clone()
        .unwrap_or_else(|| endpoint::default_database_url(home));
    std::fs::create_dir_all(home)?;
    let db = app
        .open_read_store(&db_url)
        .await
        .with_context(|| format!("opening the read store {}", endpoint::redacted(&db_url)))?;
    banner.read_store = Some(db_url);
    let projections = app.projections();
    // With a projector here the API shows its live status; API-only
    // replicas read checkpoints from the database.
    let projector = if has(Role::Projector) && !projections.is_empty() {
        Some(
            sluice_projections::spawn_group(
                projections.iter().map(|p| p.member().clone()).collect(),
                db.clone(),
                store.clone(),
                RunnerConfig::default(),
                stop.clone(),
            )
            .await?,
        )
    } else {
        None
    };
    let live: Vec<(&'static str, sluice_projections::LiveStatus)> = projector
        .iter()
        .flat_map(|g| g.projections.iter().map(|r| (r.name, r.live.clone())))
        .collect();
    if let Some(g) = projector {
        let sd = stop.clone();
        spawn_task(tasks, "the projector".to_owned(), stop, async move {
            sd.cancelled().await;
            let _ = g.task.await;
            Ok(())
        });
    }
    if has(Role::Api) {
        let token_path = config
            .http
            .token_file
            .clone()
            .unwrap_or_else(|| home.join("token"));
        let (token, created) = http::load_or_create_token(&token_path)?;
        if created {
            banner.token_created = Some(token_path.clone());
        }
        banner.token_file = Some(token_path);
        let mut opts = http::HttpOptions::with_token(token);
        opts.cors_origins = config.http.cors_origins.clone();
        opts.trusted_proxies = config.trusted_proxies()?;
        if let Some(r) = config.http.rate_per_sec {
            opts.rate_per_sec = r;
            opts.burst = r.saturating_mul(2);
        }
        opts.conn = config.conn_limits(opts.timeout);
        opts.tokens = Some(Arc::new(crate::tokens::TokenStore::new(
            crate::tokens::path(home),
        )));
        // `serve` is production: every route but the probes needs a token.
        // `up` on loopback keeps reads open for the laptop.
        opts.open_reads = config
            .http
            .open_reads
            .unwrap_or(embedded && config.http_addr().ip().is_loopback());
        opts.open_metrics = opts.open_reads || config.http.open_metrics.unwrap_or(false);
        // What the overview can say about durability: the embedded server
        // fsyncs every write; `serve` is production.
        opts.sync_always = embedded.then_some(true);
        opts.production = !embedded;
        banner.open_reads = opts.open_reads;
        let app_router = http::app_router(
            app,
            store.clone(),
            Some(db.clone()),
            live,
            config.nats.replicas.unwrap_or(1),
            config.idempotency_retention(),
            &opts,
        )
        .await?;
        // Read before binding, so a bad certificate stops the start.
        let tls = match (&config.http.tls_cert, &config.http.tls_key) {
            (Some(cert), Some(key)) => Some(http::tls_acceptor(cert, key)?),
            _ => None,
        };
        banner.http_scheme = if tls.is_some() { "https" } else { "http" };
        // Bound here, so a taken port stops the start with its reason.
        let listener = http::bind(config.http_addr()).await?;
        banner.http_addr = Some(listener.local_addr()?);
        let (sd, limits) = (stop.clone(), opts.conn.clone());
        spawn_task(tasks, "the HTTP API".to_owned(), stop, async move {
            http::serve(listener, app_router, limits, tls, sd)
                .await
                .map_err(Into::into)
        });
    }
    Ok(banner)
}

/// The endpoint file other commands find this process by (the embedded
/// server's `up` always writes its own; `serve` only where there is none).
fn write_endpoint(
    url: &str,
    home: &Path,
    embedded_url: Option<&str>,
    banner: &Banner,
) -> anyhow::Result<()> {
    let embedded = embedded_url.is_some();
    if !embedded && endpoint::read(home).is_some() {
        return Ok(());
    }
    let (database_url, database_password_removed) = match &banner.read_store {
        Some(u) => {
            let (u, removed) = endpoint::without_password(u);
            (Some(u), removed)
        }
        None => (None, false),
    };
    endpoint::write(
        home,
        &Endpoint {
            nats_url: embedded_url.unwrap_or(url).to_owned(),
            pid: std::process::id(),
            sync_always: embedded,
            http_addr: banner.http_addr.map(|a| a.to_string()),
            database_url,
            database_password_removed,
            nats_credentials_file: embedded.then(|| credentials_path(home)),
        },
    )
}

fn process_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}
