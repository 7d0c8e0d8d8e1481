//! `serve --provision-only`: create every stream and bucket the roles use,
//! with the configured replicas, then exit.
//!
//! With least-privilege NATS users (nats/accounts.conf) no role may create
//! streams, so an operator runs this once with the admin user before the
//! roles start (docker-compose.yml's `provision` service does). Each role
//! still creates its own durable consumers: its user may, and the consumer
//! configuration stays next to the code that reads from it.

use anyhow::Context;
use sluice_events::{EventStore, StoreConfig};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::module::{App, RoleContext};

/// What the modules' roles are told: streams and buckets replicated like
/// the event stream (a DLQ or parked-aggregates bucket on one node would
/// make a single node loss stop every worker of an R3 cluster), and the
/// configured ack wait and pin timeout (how soon a replica takes over from
/// a dead one). `embedded`: this process is the only consumer there is.
pub(crate) fn role_context(
    config: &Config,
    store: &EventStore,
    shutdown: CancellationToken,
    embedded: bool,
) -> RoleContext {
    let (ack_wait, pin_timeout) = config.worker_timeouts();
    RoleContext {
        store: store.clone(),
        shutdown,
        replicas: config.nats.replicas.unwrap_or(1),
        ack_wait,
        pin_timeout,
        // `up` on its own nats-server is the only consumer there is: a
        // restart takes the dead process's pins and in-flight commands over
        // at once instead of after the pin timeout, so no saga step times
        // out because of the restart.
        take_over_on_start: embedded,
        saga_deadline: config.saga_deadline(),
    }
}

/// Creates `EVENTS` and whatever each module's roles use (its workers'
/// streams and consumers, saga timers, buckets); existing ones are left as
/// they are.
pub(crate) async fn provision(app: &App, config: &Config, url: &str) -> anyhow::Result<()> {
    let replicas = config.nats.replicas.unwrap_or(1);
    let store = EventStore::connect_with(
        &config.connect(url)?,
        StoreConfig {
            replicas,
            ..StoreConfig::default()
        },
    )
    .await
    .context("connecting to NATS and creating the event stream (this needs the admin user)")?;
    let ctx = role_context(config, &store, CancellationToken::new(), false);
    let mut made = Vec::new();
    for m in &app.modules {
        let names = m.provision(&ctx).await.map_err(|e| {
            anyhow::anyhow!(
                "module {}: creating its streams and buckets (this needs the admin user): {e}",
                m.name()
            )
        })?;
        made.extend(names);
    }
    let state = store.stream_state().await?;
    tracing::info!(
        stream = %store.config().stream,
        replicas = state.replicas,
        "provisioned streams and buckets"
    );
    println!(
        "provisioned: {} (replicas {}){}{}",
        store.config().stream,
        state.replicas,
        if made.is_empty() { "" } else { ", " },
        made.join(", ")
    );
    Ok(())
}
