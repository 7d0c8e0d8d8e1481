//! `sluice query` and `sluice projection list|rebuild|reset`: the read side
//! from the command line, straight against the read store and the log (the
//! work is in `sluice_ledger::cli`; this maps arguments and exit codes).

use std::path::Path;

use crate::module::App;
use crate::projection_ops::{self as cli, ReadSide};
use anyhow::Context;
use serde_json::json;
use sluice_events::{ConnectConfig, EventStore, StoreConfig};
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
        /// The projection; several are rebuilt with one feed and switched
        /// in one transaction (e.g. the members of a projection group).
        #[arg(required = true, num_args = 1..)]
        names: Vec<String>,
    },
    /// A projection's own dead letters: list them, or apply them once their
    /// cause is fixed (`redrive`), releasing the aggregates parked behind.
    Dlq {
        /// The projection.
        name: String,
        #[command(subcommand)]
        cmd: DlqCommand,
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

/// `sluice projection dlq <name> ...`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum DlqCommand {
    /// Its dead letters, oldest first, with kind and reason.
    List,
    /// Apply them, in order per aggregate, exactly once; those it still
    /// rejects stay (with the new reason), holding their aggregate.
    Redrive,
    /// Drop one for good (its record, its DLQ copy; the aggregate's next
    /// dead letter becomes the head, or it is released). Same as `sluice dlq
    /// discard <id>` of its copy.
    Discard {
        /// Its position (stream sequence), as `list` shows it.
        position: u64,
        /// Why (required, kept for audit).
        #[arg(long)]
        reason: String,
    },
}

/// `sluice replay --projection <name> --from <seq>`: undo the projection's
/// events from `<seq>` on and let its projector apply them again. Safe while
/// the projector runs; refused for a projection that cannot undo exactly.
#[derive(Debug, clap::Args)]
pub(crate) struct ReplayArgs {
    /// The projection.
    #[arg(long, value_parser = crate::id_arg)]
    projection: String,
    /// First position (stream sequence) to apply again.
    #[arg(long)]
    from: u64,
    /// One JSON object instead of a sentence.
    #[arg(long)]
    json: bool,
    /// Read store (default: the one `sluice up` here records, else SQLite
    /// under the home directory).
    #[arg(long, env = "SLUICE_DATABASE_URL")]
    database_url: Option<String>,
}

/// Options of `sluice query`.
#[derive(Debug, clap::Args)]
pub(crate) struct QueryArgs {
    /// The projection, e.g. `account_balances`.
    #[arg(value_parser = crate::id_arg)]
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

/// The read side at `database_url` (or the default store under `home`).
pub(crate) async fn connect(
    app: &App,
    nats_url: Option<String>,
    home: &Path,
    database_url: Option<String>,
) -> anyhow::Result<ReadSide> {
    let url = endpoint::resolve(nats_url, home)?;
    let store =
        EventStore::connect_with(&ConnectConfig::from_env(url)?, StoreConfig::default()).await?;
    let db = endpoint::resolve_database(database_url, home)?;
    ReadSide::open(app.clone(), store, &db.url)
        .await
        .with_context(|| {
            format!(
                "opening the read store {} (from {})",
                endpoint::redacted(&db.url),
                db.origin
            )
        })
}

/// Usage mistakes (unknown projection, missing --yes) exit with 2.
fn exit(result: Result<(), crate::Error>) -> anyhow::Result<std::process::ExitCode> {
    match result {
        Ok(()) => Ok(std::process::ExitCode::SUCCESS),
        Err(e) if e.exit_code() == 2 => {
            eprintln!("error: {e}");
            Ok(std::process::ExitCode::from(2))
        }
        Err(e) => Err(e.into()),
    }
}

pub(crate) async fn query(
    app: &App,
    args: QueryArgs,
    nats_url: Option<String>,
    home: &Path,
    database_url: Option<String>,
) -> anyhow::Result<std::process::ExitCode> {
    let side = connect(app, nats_url, home, database_url).await?;
    let mut out = std::io::stdout();
    let r = cli::query(
        &side,
        &args.projection,
        args.key.as_deref(),
        args.after.as_deref(),
        args.limit,
        args.json,
        &mut out,
    )
    .await;
    side.db.close().await;
    exit(r)
}

pub(crate) async fn projection(
    app: &App,
    cmd: ProjectionCommand,
    json: bool,
    nats_url: Option<String>,
    home: &Path,
    database_url: Option<String>,
) -> anyhow::Result<std::process::ExitCode> {
    let side = connect(app, nats_url, home, database_url).await?;
    let mut out = std::io::stdout();
    let result = match cmd {
        ProjectionCommand::List => cli::list(&side, json, &mut out).await,
        ProjectionCommand::Rebuild { names } => {
            let shutdown = CancellationToken::new();
            let sd = shutdown.clone();
            let ctrl_c = tokio::spawn(async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    sd.cancel();
                }
            });
            // Progress goes to stderr, so --json output stays clean.
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let r = cli::rebuild_together(&side, &refs, &mut std::io::stderr(), shutdown).await;
            ctrl_c.abort();
            r.map(|done| {
                if json {
                    println!(
                        "{}",
                        json!({"projection": names.join(","), "rebuilt": done})
                    );
                }
            })
        }
        ProjectionCommand::Dlq { name, cmd } => match cmd {
            DlqCommand::List => cli::dead_letters(&side, &name, json, &mut out).await,
            DlqCommand::Redrive => cli::redrive(&side, &name, json, &mut out).await,
            DlqCommand::Discard { position, reason } => match app.projection(&name) {
                Err(e) => Err(e),
                Ok(member) => {
                    let found = sluice_projections::discard_position(
                        &side.db,
                        &side.store,
                        member.name(),
                        position,
                        &reason,
                    )
                    .await;
                    match found {
                        Ok(true) => {
                            if json {
                                println!(
                                    "{}",
                                    json!({"projection": name, "discarded": position, "reason": reason})
                                );
                            } else {
                                println!(
                                    "{name}: discarded the dead letter at position {position}; reason kept in the audit log"
                                );
                            }
                            Ok(())
                        }
                        Ok(false) => {
                            side.db.close().await;
                            anyhow::bail!(
                                "{name} has no dead letter at position {position}; see `{} projection dlq {name} list`",
                                app.name()
                            );
                        }
                        Err(e) => {
                            side.db.close().await;
                            return Err(e.into());
                        }
                    }
                }
            },
        },
        ProjectionCommand::Reset { name, yes } => cli::reset(&side, &name, yes).await.map(|()| {
            if json {
                println!("{}", json!({"projection": name, "reset": true}));
            } else {
                println!("{name} reset: it replays from position 1 wherever its projector runs");
            }
        }),
    };
    side.db.close().await;
    exit(result)
}

pub(crate) async fn replay(
    app: &App,
    args: ReplayArgs,
    nats_url: Option<String>,
    home: &Path,
) -> anyhow::Result<std::process::ExitCode> {
    let side = connect(app, nats_url, home, args.database_url).await?;
    let mut out = std::io::stdout();
    let r = cli::replay(&side, &args.projection, args.from, args.json, &mut out).await;
    side.db.close().await;
    exit(r)
}
