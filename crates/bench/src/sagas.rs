//! `sluice-bench sagas`: completed transfer sagas per second and request →
//! completed latency, with the server's default fsync and with fsync always.

use serde_json::json;
use sluice_events::{EmbeddedConfig, EmbeddedServer, EventStore, StoreConfig, SyncInterval};
use tokio_util::sync::CancellationToken;

/// Options of `sluice-bench sagas`.
#[derive(Debug, clap::Args)]
pub struct SagasArgs {
    /// Transfers per run.
    #[arg(long, default_value_t = 2_000)]
    transfers: usize,
    /// Accounts they move money between.
    #[arg(long, default_value_t = 200)]
    accounts: usize,
    /// Transfers in flight at once.
    #[arg(long, default_value_t = 256)]
    in_flight: usize,
    /// Lanes (aggregates handled at once) of the orchestrator and of the
    /// account command handler.
    #[arg(long, default_value_t = 64)]
    lanes: usize,
    /// Print one JSON summary object.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(args: SagasArgs) -> anyhow::Result<()> {
    let mut runs = Vec::new();
    for (name, sync) in [
        ("default", SyncInterval::ServerDefault),
        ("always", SyncInterval::Always),
    ] {
        let dir =
            std::env::temp_dir().join(format!("sluice-bench-sagas-{}-{name}", std::process::id()));
        let mut ec = EmbeddedConfig::new(&dir);
        ec.sync = sync;
        let server = EmbeddedServer::start(ec)?;
        let mut sc = StoreConfig::default();
        // As the store recommends: group commit pays off only when the
        // server fsyncs every write; with its default policy a shared batch
        // costs more than the single writes (measured: ~280 vs ~2,000 sagas/s).
        sc.group_commit.enabled = matches!(sync, SyncInterval::Always);
        let group_commit = sc.group_commit.enabled;
        let store = EventStore::connect(&server.url(), sc).await?;
        let mut config = sluice_ledger::TransferRoleConfig::default();
        config.orchestrator.worker.concurrency = args.lanes;
        config.handler.concurrency = args.lanes;
        let shutdown = CancellationToken::new();
        let (st, sd) = (store.clone(), shutdown.clone());
        let role =
            tokio::spawn(async move { sluice_ledger::run_transfer_role(&st, config, sd).await });
        let report = crate::bench_transfers(
            &store,
            &crate::SagaBenchConfig {
                transfers: args.transfers,
                accounts: args.accounts,
                in_flight: args.in_flight,
                prefix: "b".into(),
            },
        )
        .await;
        shutdown.cancel();
        let _ = role.await;
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
        let report = report?;
        runs.push(json!({"sync_interval": name, "group_commit": group_commit, "report": report}));
    }
    if args.json {
        println!(
            "{}",
            json!({"bench": "sagas", "target_sagas_per_s": 500, "runs": runs})
        );
        return Ok(());
    }
    println!(
        "sagas: {} transfers over {} accounts, {} in flight, {} lanes (each saga appends >= 5 events)",
        args.transfers, args.accounts, args.in_flight, args.lanes
    );
    for r in &runs {
        let rep = &r["report"];
        println!(
            "  sync_interval {:<8} group commit {:<5} {:>8.0} sagas/s   p50 {:.1} ms   p99 {:.1} ms   ({} completed)",
            r["sync_interval"].as_str().unwrap_or(""),
            if r["group_commit"].as_bool().unwrap_or(false) {
                "on"
            } else {
                "off"
            },
            rep["sagas_per_sec"].as_f64().unwrap_or(0.0),
            rep["p50_ms"].as_f64().unwrap_or(0.0),
            rep["p99_ms"].as_f64().unwrap_or(0.0),
            rep["completed"],
        );
    }
    println!("  target: >= 500 sagas/s with the default sync");
    Ok(())
}
