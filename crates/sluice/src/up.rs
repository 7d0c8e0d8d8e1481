//! `sluice up`: the embedded default. Starts nats-server as a child process
//! (JetStream, fsync always, store under `.sluice/nats`), ensures the streams,
//! and runs until Ctrl-C or SIGTERM, then stops the child cleanly.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use sluice_events::{
    ConnectConfig, EmbeddedConfig, EmbeddedServer, EventStore, StoreConfig, SyncInterval,
};
use tokio::signal::unix::{SignalKind, signal};

use crate::endpoint::{self, Endpoint};

/// Options of `sluice up`.
#[derive(Debug, clap::Args)]
pub(crate) struct UpArgs {
    /// Port for the embedded nats-server on 127.0.0.1 (default: a free one).
    #[arg(long, env = "SLUICE_NATS_PORT")]
    nats_port: Option<u16>,
    /// Stream replicas (1 for the embedded server; 3 on a production cluster).
    #[arg(long, env = "SLUICE_REPLICAS", default_value_t = 1)]
    replicas: usize,
}

pub(crate) async fn run(
    args: UpArgs,
    nats_url: Option<String>,
    home: PathBuf,
) -> anyhow::Result<()> {
    let mut embedded = None;
    let url = match nats_url {
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
            let mut config = EmbeddedConfig::new(home.join("nats"));
            config.port = args.nats_port;
            config.sync = SyncInterval::Always;
            let server =
                EmbeddedServer::start(config).context("starting the embedded nats-server")?;
            let url = server.url();
            embedded = Some(server);
            url
        }
    };
    let store = EventStore::connect_with(
        &ConnectConfig::from_env(url.clone())?,
        StoreConfig {
            replicas: args.replicas,
            ..StoreConfig::default()
        },
    )
    .await
    .context("connecting to NATS")?;
    endpoint::write(
        &home,
        &Endpoint {
            nats_url: url.clone(),
            pid: std::process::id(),
            sync_always: embedded.is_some(),
        },
    )?;
    let state = store.stream_state().await?;
    println!("sluice is up");
    println!("  nats:    {url}  (nats-server {})", store.server_version());
    if let Some(server) = &embedded {
        println!("  data:    {}", server.config().dir.display());
        println!("  log:     {}", server.log_path().display());
    }
    println!(
        "  stream:  {} ({} events, last position {})",
        store.config().stream,
        state.messages,
        state.last_position
    );
    println!(
        "  connect: SLUICE_NATS_URL={url}  (commands run in this directory find it by themselves)"
    );
    println!(
        "  try:     sluice publish account/acc-1 --type ledger.account.opened.v1 --data '{{\"owner\":\"ann\",\"currency\":\"EUR\"}}'"
    );
    println!("Press Ctrl-C to stop.");

    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    drop(store);
    endpoint::remove(&home);
    if let Some(mut server) = embedded {
        server.stop(Duration::from_secs(10));
    }
    println!("sluice stopped");
    Ok(())
}

fn process_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}
