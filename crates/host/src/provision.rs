//! `sluice serve --provision-only`: create every stream and bucket the roles
//! use, with the configured replicas, then exit.
//!
//! With least-privilege NATS users (nats/accounts.conf) no role may create
//! streams, so an operator runs this once with the admin user before the
//! roles start (docker-compose.yml's `provision` service does). Each role
//! still creates its own durable consumers: its user may, and the consumer
//! configuration stays next to the code that reads from it.

use anyhow::Context;
use sluice_events::{EventStore, StoreConfig};
use sluice_ledger::TransferRoleConfig;

use crate::config::Config;

/// The ledger roles' settings: streams and buckets replicated like the event
/// stream (a DLQ or parked-aggregates bucket on one node would make a single
/// node loss stop every worker of an R3 cluster), and the configured ack
/// wait and pin timeout (how soon a replica takes over from a dead one).
pub(crate) fn role_config(config: &Config) -> TransferRoleConfig {
    let replicas = config.nats.replicas.unwrap_or(1);
    let (ack_wait, pin_timeout) = config.worker_timeouts();
    let mut c = TransferRoleConfig::default();
    if let Some(secs) = config.workers.saga_deadline_secs {
        c.saga_deadline = std::time::Duration::from_secs(secs);
    }
    c.orchestrator.replicas = replicas;
    for worker in [&mut c.handler, &mut c.orchestrator.worker] {
        worker.replicas = replicas;
        worker.ack_wait = ack_wait;
        worker.pin_timeout = pin_timeout;
        // Retries must back off for less than the ack wait (ordering).
        worker.retry.cap = worker.retry.cap.min(ack_wait / 2);
        worker.retry.base = worker.retry.base.min(worker.retry.cap);
    }
    c
}

/// Creates `EVENTS`, the workers' streams (`DLQ`, redrive, audit,
/// advisories), the parked-aggregates and idempotency buckets, the account
/// command handler's consumers and `SAGA_TIMERS`; existing ones are left as
/// they are (the idempotency retention is set to the configured one).
pub(crate) async fn provision(config: &Config, url: &str) -> anyhow::Result<()> {
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
    let roles = role_config(config);
    sluice_workers::ensure_consumers(store.jetstream(), &roles.handler)
        .await
        .context("creating the workers' streams and bucket (this needs the admin user)")?;
    sluice_sagas::ensure_timers_stream(store.jetstream(), roles.orchestrator.replicas)
        .await
        .context("creating the SAGA_TIMERS stream (this needs the admin user)")?;
    sluice_ledger::Idempotency::open(store.jetstream(), config.idempotency())
        .await
        .context("creating the idempotency bucket (this needs the admin user)")?;
    let state = store.stream_state().await?;
    tracing::info!(
        stream = %store.config().stream,
        replicas = state.replicas,
        "provisioned streams and buckets"
    );
    println!(
        "provisioned: {} (replicas {}), DLQ, redrive, audit, advisories, parked bucket, idempotency bucket, SAGA_TIMERS",
        store.config().stream,
        state.replicas
    );
    Ok(())
}
