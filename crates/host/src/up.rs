//! `sluice up` and `sluice serve`.
//!
//! `up` is the embedded default: every role in one process, a nats-server
//! child process (JetStream, fsync always, store under `.sluice/nats`) unless
//! a NATS URL is configured, and a SQLite read store under `.sluice/`.
//! `serve --role ...` runs any subset of roles against configured NATS and
//! database servers, for running roles as separate, horizontally scaled
//! services. Both stop cleanly on Ctrl-C or SIGTERM.

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
use crate::http;
use crate::module::App;

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

fn load_config(common: &CommonArgs, nats_url: Option<String>) -> anyhow::Result<Config> {
    let mut config = Config::load(common.config.as_deref())?;
    if nats_url.is_some() {
        config.nats.url = nats_url;
    }
    if let Some(addr) = common.http {
        config.http.addr = Some(addr);
    }
    if let Some(db) = &common.database_url {
        config.database.url = Some(db.clone());
    }
    if let Some(secs) = common.idempotency_retention_secs {
        config.idempotency.retention_secs = Some(secs);
    }
    config.validate()?;
    Ok(config)
}

pub(crate) async fn up(
    app: &App,
    args: UpArgs,
    nats_url: Option<String>,
    home: PathBuf,
) -> anyhow::Result<()> {
    let config = load_config(&args.common, nats_url)?;
    let mut embedded = None;
    let url = match config.nats.url.clone() {
        Some(url) => url,
        None => {
            if let Some(existing) = endpoint::read(&home)
                && process_alive(existing.pid)
            {
                anyhow::bail!(
                    "sluice up is already running here (pid {}, NATS at {}); stop it first or use another --home",
                    existing.pid,
                    existing.nats_url
                );
            }
            let mut ec = EmbeddedConfig::new(home.join("nats"));
            ec.port = args.nats_port;
            ec.sync = SyncInterval::Always;
            // The admin credential sits beside the API token; a home from
            // before authorization gets one now (the server config is
            // rewritten at every start).
            ec.auth = EmbeddedAuth::Generated {
                file: credentials_path(&home),
            };
            let server = EmbeddedServer::start(ec).context("starting the embedded nats-server")?;
            let url = server.url();
            embedded = Some(server);
            url
        }
    };
    let embedded_url = embedded.as_ref().map(EmbeddedServer::anonymous_url);
    let result = run(
        app,
        &config,
        &url,
        &Role::ALL,
        &home,
        embedded_url.as_deref(),
        args.common.strict,
    )
    .await;
    if let Some(mut server) = embedded {
        server.stop(Duration::from_secs(10));
    }
    result
}

pub(crate) async fn serve(
    app: &App,
    args: ServeArgs,
    nats_url: Option<String>,
    home: PathBuf,
) -> anyhow::Result<()> {
    let mut config = load_config(&args.common, nats_url)?;
    if !args.roles.is_empty() {
        config.roles = args.roles;
    }
    let url = config.nats.url.clone().context(
        "sluice serve needs a NATS server: set SLUICE_NATS_URL, --nats-url or nats.url (use `sluice up` for the embedded one)",
    )?;
    if args.provision_only {
        return crate::provision::provision(app, &config, &url).await;
    }
    let roles = config.roles();
    run(app, &config, &url, &roles, &home, None, args.common.strict).await
}

/// Where `sluice up` keeps the embedded server's admin credential (0600).
pub(crate) fn credentials_path(home: &Path) -> PathBuf {
    home.join("nats-credentials.json")
}

/// `embedded_url`: the embedded server's URL without its credential (what the
/// endpoint file and the output show), when `url` is that server.
async fn run(
    app: &App,
    config: &Config,
    url: &str,
    roles: &[Role],
    home: &Path,
    embedded_url: Option<&str>,
    strict: bool,
) -> anyhow::Result<()> {
    let embedded = embedded_url.is_some();
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
    let store = EventStore::connect_with(
        &connect,
        StoreConfig {
            replicas: config.nats.replicas.unwrap_or(1),
            ..StoreConfig::default()
        },
    )
    .await
    .context("connecting to NATS")?;
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
    let observed = crate::nats_lint::Observed::from_info(&store.client().server_info());
    for w in crate::nats_lint::security_warnings(&observed, None, !embedded) {
        tracing::warn!(warning = %w, "security");
    }
    if strict && !warnings.is_empty() {
        anyhow::bail!("refusing to start (--strict): {}", warnings.join("; "));
    }
    let shutdown = CancellationToken::new();
    let has = |r: Role| roles.contains(&r);

    // The read side: projector and/or API.
    let mut http_addr = None;
    let mut http_scheme = "http";
    let mut open_reads = true;
    let mut read_store: Option<String> = None;
    let mut token_file: Option<PathBuf> = None;
    let mut tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>> = Vec::new();
    if has(Role::Api) || has(Role::Projector) {
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
        read_store = Some(db_url);
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
                    shutdown.clone(),
                )
                .await?,
            )
        } else {
            None
        };
        if has(Role::Api) {
            let live: Vec<(&'static str, sluice_projections::LiveStatus)> = projector
                .iter()
                .flat_map(|g| g.projections.iter().map(|r| (r.name, r.live.clone())))
                .collect();
            let token_path = config
                .http
                .token_file
                .clone()
                .unwrap_or_else(|| home.join("token"));
            let (token, created) = http::load_or_create_token(&token_path)?;
            if created {
                println!(
                    "  token:   a new API token was written to {} (mode 0600)",
                    token_path.display()
                );
            }
            token_file = Some(token_path);
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
            // `serve` is production: every route but the probes needs a
            // token. `up` on loopback keeps reads open for the laptop.
            opts.open_reads = config
                .http
                .open_reads
                .unwrap_or(embedded && config.http_addr().ip().is_loopback());
            opts.open_metrics = opts.open_reads || config.http.open_metrics.unwrap_or(false);
            open_reads = opts.open_reads;
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
            http_scheme = if tls.is_some() { "https" } else { "http" };
            // Bound here, so a taken port stops the start with its reason.
            let listener = http::bind(config.http_addr()).await?;
            http_addr = Some(listener.local_addr()?);
            let (sd, limits) = (shutdown.clone(), opts.conn.clone());
            tasks.push(tokio::spawn(async move {
                http::serve(listener, app_router, limits, tls, sd).await
            }));
        }
        if let Some(g) = projector {
            let sd = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                sd.cancelled().await;
                let _ = g.task.await;
                Ok(())
            }));
        }
    }
    // The modules' command handlers (worker) and orchestrators (saga).
    let role_ctx = crate::provision::role_context(config, &store, shutdown.clone(), embedded);
    for m in &app.modules {
        for t in m.roles(&role_ctx) {
            if !has(t.role) {
                continue;
            }
            let (module, name, task) = (m.name(), t.name, t.task);
            tracing::info!(module, task = %name, role = ?t.role, "starting");
            tasks.push(tokio::spawn(async move {
                task.await
                    .map_err(|e| anyhow::anyhow!("{module} {name}: {e}"))
            }));
        }
    }

    if embedded || endpoint::read(home).is_none() {
        let (database_url, database_password_removed) = match &read_store {
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
                http_addr: http_addr.map(|a| a.to_string()),
                database_url,
                database_password_removed,
                nats_credentials_file: embedded.then(|| credentials_path(home)),
            },
        )?;
    }
    let state = store.stream_state().await?;
    println!("sluice is up");
    println!(
        "  roles:   {}",
        roles
            .iter()
            .map(|r| format!("{r:?}").to_lowercase())
            .collect::<Vec<_>>()
            .join(",")
    );
    let shown_url = embedded_url.map_or_else(|| redact_url(url), str::to_owned);
    println!(
        "  nats:    {shown_url}  (nats-server {})",
        store.server_version()
    );
    if let Some(addr) = http_addr {
        println!(
            "  http:    {http_scheme}://{addr}/v1/projections  (openapi: /openapi.json, metrics: /metrics)"
        );
    }
    println!(
        "  stream:  {} ({} events, last position {})",
        store.config().stream,
        state.messages,
        state.last_position
    );
    if let Some(t) = &token_file {
        println!(
            "  auth:    {} need Authorization: Bearer $(cat {}) (or a `sluice token create` token)",
            if open_reads {
                "appends and /v1/dlq"
            } else {
                "all routes but /healthz and /readyz"
            },
            t.display()
        );
    }
    if embedded {
        println!("  data:    {}", home.display());
        println!(
            "  connect: SLUICE_NATS_URL={shown_url}  (commands run in this directory find it by themselves)"
        );
        println!(
            "  nats auth: user and password in {} (mode 0600); anonymous clients are refused",
            credentials_path(home).display()
        );
    }
    println!("Press Ctrl-C to stop.");

    let mut term = signal(SignalKind::terminate())?;
    let mut first_failure = None;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        _ = shutdown.cancelled() => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
    for t in tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %format!("{e:#}"), "role stopped with an error");
                first_failure.get_or_insert(e);
            }
            Err(e) => {
                first_failure.get_or_insert(anyhow::anyhow!("a role panicked: {e}"));
            }
        }
    }
    if embedded {
        endpoint::remove(home);
    }
    println!("sluice stopped");
    first_failure.map_or(Ok(()), Err)
}

fn process_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}
