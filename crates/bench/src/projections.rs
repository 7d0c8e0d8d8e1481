//! `sluice-bench projections`: (a) raw batched upserts of the ledger rows,
//! (b) catch-up of `account_balances` + `account_activity`, (c) blue/green
//! rebuild, (d) the two rebuilt together, (e) a replay of the last tenth of
//! the log, on SQLite and PostgreSQL, against a freshly started nats-server.

use anyhow::Context;
use serde_json::json;
use sluice_events::{EmbeddedConfig, EmbeddedServer, EventStore, StoreConfig};
use sluice_projections::Database;

/// Options of `sluice-bench projections`.
#[derive(Debug, clap::Args)]
pub struct ProjectionsArgs {
    /// Accounts in the workload.
    #[arg(long, default_value_t = 10_000)]
    accounts: usize,
    /// Events per account (total = accounts × this; 200,000 by default).
    #[arg(long, default_value_t = 20)]
    per_account: usize,
    /// PostgreSQL admin URL; a fresh database is created and dropped
    /// (default `$SLUICE_TEST_DATABASE_URL` or the local server).
    #[arg(
        long,
        env = "SLUICE_TEST_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    postgres: String,
    /// Skip PostgreSQL.
    #[arg(long, conflicts_with = "postgres_only")]
    sqlite_only: bool,
    /// Skip SQLite (e.g. for the 1,000,000-event rebuild figure).
    #[arg(long)]
    postgres_only: bool,
    /// Rounds of (a) and (b), interleaved; medians are reported, since a
    /// shared 2-core machine swings between runs.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Print one JSON summary object.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(args: ProjectionsArgs) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("sluice-bench-proj-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run_in(&args, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(args: &ProjectionsArgs, dir: &std::path::Path) -> anyhow::Result<()> {
    let server = EmbeddedServer::start(EmbeddedConfig::new(dir.join("nats")))?;
    let store = EventStore::connect(&server.url(), StoreConfig::default()).await?;
    let work = crate::ledger_read_models::workload(args.accounts, args.per_account);
    if !args.json {
        eprintln!("appending {} events...", args.accounts * args.per_account);
    }
    let last = crate::ledger_read_models::append(&store, &work).await?;
    let mut reports = Vec::new();

    if !args.postgres_only {
        let url = format!("sqlite://{}", dir.join("bench.db").display());
        let sqlite = Database::connect(&url).await?;
        reports
            .push(crate::ledger_read_models::run(&store, &sqlite, &work, last, args.reps).await?);
        sqlite.close().await;
    }

    if !args.sqlite_only {
        let admin = sqlx::PgPool::connect(&args.postgres)
            .await
            .with_context(|| {
                format!(
                    "connecting to PostgreSQL at {} (or pass --sqlite-only)",
                    args.postgres
                )
            })?;
        let name = format!("sluice_bench_{}", std::process::id());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await?;
        let base = args
            .postgres
            .rsplit_once('/')
            .map_or(args.postgres.as_str(), |(b, _)| b);
        let pg = Database::connect(&format!("{base}/{name}")).await?;
        let report = crate::ledger_read_models::run(&store, &pg, &work, last, args.reps).await;
        pg.close().await;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&admin)
            .await?;
        reports.push(report?);
    }

    if args.json {
        println!(
            "{}",
            json!({"bench": "projections", "events": last, "target_ratio": 0.7, "runs": reports})
        );
        return Ok(());
    }
    println!(
        "projections: {} events over {} accounts, fresh nats-server; (a) and (b) are medians of {} interleaved rounds",
        last,
        args.accounts,
        args.reps.max(1)
    );
    println!(
        "{:<10} {:>20} {:>20} {:>18} {:>16}",
        "backend", "(a) raw upserts/s", "(b) catch-up ev/s", "b/a (min-max)", "(c) rebuild ev/s"
    );
    for r in &reports {
        println!(
            "{:<10} {:>20.0} {:>20.0} {:>18} {:>16.0}",
            r.backend,
            r.raw_upsert_events_per_s,
            r.catch_up_events_per_s,
            format!(
                "{:.2} ({:.2}-{:.2})",
                r.catch_up_ratio, r.catch_up_ratio_min, r.catch_up_ratio_max
            ),
            r.rebuild_events_per_s
        );
    }
    for r in &reports {
        let rounds: Vec<String> = r
            .round_rates
            .iter()
            .map(|(a, b)| format!("{a:.0}/{b:.0}"))
            .collect();
        println!("{:<10} rounds (a/b): {}", r.backend, rounds.join("  "));
    }
    println!(
        "{:<10} {:>24} {:>8}   (e) replay of the last tenth",
        "backend", "(d) group rebuild ev/s", "d/c"
    );
    for r in &reports {
        println!(
            "{:<10} {:>24.0} {:>8.2}   {} ev: activity {:.2} s, balances {:.2} s ({} accounts re-folded)",
            r.backend,
            r.group_rebuild_events_per_s,
            r.group_rebuild_events_per_s / r.rebuild_events_per_s.max(1e-9),
            r.replay_tail_events,
            r.replay_activity_seconds,
            r.replay_balances_seconds,
            r.replay_accounts_refolded
        );
    }
    println!("target: b/a >= 0.7");
    Ok(())
}
