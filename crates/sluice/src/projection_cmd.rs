//! `sluice query` and `sluice projection list|rebuild|reset`: the read side
//! from the command line, straight against the read store and the log.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use serde_json::json;
use sluice_events::{ConnectConfig, EventStore, StoreConfig};
use sluice_ledger::{AccountActivity, AccountBalances, ReadSide};
use sluice_projections::{Projection, ReadModel, RunnerConfig, projection_status};
use tokio_util::sync::CancellationToken;

use crate::endpoint;

/// `sluice projection ...`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum ProjectionCommand {
    /// Every projection with checkpoint, lag and state.
    List,
    /// Blue/green rebuild from position 1: the old tables serve queries
    /// until the new ones have caught up, then they switch atomically.
    /// Resumable: run it again after an interruption.
    Rebuild {
        /// The projection.
        name: String,
    },
    /// Empty a projection and replay it from position 1 (queries see empty
    /// tables meanwhile; prefer `rebuild`).
    Reset {
        /// The projection.
        name: String,
        /// Confirm: the read model is emptied.
        #[arg(long)]
        yes: bool,
    },
}

/// Options of `sluice query`.
#[derive(Debug, clap::Args)]
pub(crate) struct QueryArgs {
    /// The projection, e.g. `account_balances`.
    projection: String,
    /// One row by key; without it, a page of rows.
    key: Option<String>,
    /// Rows per page.
    #[arg(long, default_value_t = 50)]
    limit: u32,
    /// Start after this key (the cursor printed with the previous page).
    #[arg(long)]
    after: Option<String>,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

const NAMES: [&str; 2] = [
    sluice_ledger::ACCOUNT_BALANCES,
    sluice_ledger::ACCOUNT_ACTIVITY,
];

fn model(name: &str) -> anyhow::Result<Arc<dyn ReadModel>> {
    Ok(match name {
        sluice_ledger::ACCOUNT_BALANCES => Arc::new(AccountBalances::new()),
        sluice_ledger::ACCOUNT_ACTIVITY => Arc::new(AccountActivity),
        other => bail!(
            "no projection {other:?}: known ones are {}",
            NAMES.join(", ")
        ),
    })
}

async fn connect(
    nats_url: Option<String>,
    home: &Path,
    database_url: Option<String>,
) -> anyhow::Result<ReadSide> {
    let url = endpoint::resolve(nats_url, home)?;
    let store =
        EventStore::connect_with(&ConnectConfig::from_env(url)?, StoreConfig::default()).await?;
    let db_url = database_url.unwrap_or_else(|| sluice_ledger::default_database_url(home));
    ReadSide::with_store(store, &db_url)
        .await
        .with_context(|| format!("opening the read store {db_url}"))
}

pub(crate) async fn query(
    args: QueryArgs,
    nats_url: Option<String>,
    home: &Path,
    database_url: Option<String>,
) -> anyhow::Result<()> {
    let model = model(&args.projection)?;
    let side = connect(nats_url, home, database_url).await?;
    let mut conn = side.db.pool().acquire().await?;
    match args.key {
        Some(key) => match model.get(&mut conn, &key).await? {
            Some(row) if args.json => println!("{row}"),
            Some(row) => println!("{}", serde_json::to_string_pretty(&row)?),
            None => bail!("no row {key:?} in {}", args.projection),
        },
        None => {
            let page = model
                .list(&mut conn, args.after.as_deref(), args.limit.clamp(1, 1000))
                .await?;
            for row in &page.rows {
                println!("{row}");
            }
            if let Some(next) = page.next
                && !args.json
            {
                println!("(more: --after {next})");
            }
        }
    }
    Ok(())
}

pub(crate) async fn projection(
    cmd: ProjectionCommand,
    json: bool,
    nats_url: Option<String>,
    home: &Path,
    database_url: Option<String>,
) -> anyhow::Result<()> {
    let side = connect(nats_url, home, database_url).await?;
    match cmd {
        ProjectionCommand::List => {
            if !json {
                println!(
                    "{:<20} {:>10} {:>10} {:>10} {:>9}  STATE",
                    "NAME", "CHECKPOINT", "HEAD", "LAG", "LAG s"
                );
            }
            for name in NAMES {
                let s = projection_status(&side.db, &side.store, name, None).await?;
                if json {
                    println!("{}", serde_json::to_string(&s)?);
                } else {
                    println!(
                        "{:<20} {:>10} {:>10} {:>10} {:>9.1}  {}",
                        s.name,
                        s.checkpoint,
                        s.stream_last_position,
                        s.lag_events,
                        s.lag_seconds,
                        serde_json::to_value(s.state)?.as_str().unwrap_or("")
                    );
                }
            }
        }
        ProjectionCommand::Rebuild { name } => match name.as_str() {
            sluice_ledger::ACCOUNT_BALANCES => {
                rebuild(Arc::new(AccountBalances::new()), &side, json).await?
            }
            sluice_ledger::ACCOUNT_ACTIVITY => {
                rebuild(Arc::new(AccountActivity), &side, json).await?
            }
            other => bail!(
                "no projection {other:?}: known ones are {}",
                NAMES.join(", ")
            ),
        },
        ProjectionCommand::Reset { name, yes } => {
            if !yes {
                bail!(
                    "reset empties {name} and replays it from position 1; add --yes to confirm (or use `sluice projection rebuild {name}` to stay online)"
                );
            }
            match name.as_str() {
                sluice_ledger::ACCOUNT_BALANCES => {
                    sluice_projections::reset(&side.db, &AccountBalances::new()).await?
                }
                sluice_ledger::ACCOUNT_ACTIVITY => {
                    sluice_projections::reset(&side.db, &AccountActivity).await?
                }
                other => bail!(
                    "no projection {other:?}: known ones are {}",
                    NAMES.join(", ")
                ),
            }
            if json {
                println!("{}", json!({"projection": name, "reset": true}));
            } else {
                println!("{name} reset: it replays from position 1 wherever its projector runs");
            }
        }
    }
    side.db.close().await;
    Ok(())
}

async fn rebuild<P: Projection>(
    projection: Arc<P>,
    side: &ReadSide,
    json: bool,
) -> anyhow::Result<()> {
    let name = projection.name();
    let bar = if json {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {pos}/{len} {per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(format!("rebuilding {name}"));
        bar
    };
    let shutdown = CancellationToken::new();
    let sd = shutdown.clone();
    let ctrl_c = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            sd.cancel();
        }
    });
    let b = bar.clone();
    let report = sluice_projections::rebuild(
        projection,
        side.db.clone(),
        side.store.clone(),
        RunnerConfig::default(),
        move |p| {
            b.set_length(p.target);
            b.set_position(p.position);
        },
        shutdown,
    )
    .await?;
    ctrl_c.abort();
    bar.finish_and_clear();
    match report {
        Some(r) if json => println!(
            "{}",
            json!({"projection": name, "position": r.position, "seconds": r.elapsed.as_secs_f64(), "events_per_second": r.events_per_second})
        ),
        Some(r) => println!(
            "{name} rebuilt up to position {} in {:.1} s ({:.0} events/s) and switched over",
            r.position,
            r.elapsed.as_secs_f64(),
            r.events_per_second
        ),
        None => println!("{name} rebuild interrupted; run the same command again to resume"),
    }
    Ok(())
}
