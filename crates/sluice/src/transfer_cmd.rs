//! `sluice transfer` and `sluice saga list|show|retry`: the ledger's transfer
//! saga from the command line.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::json;
use sluice_events::{ConnectConfig, EventStore, StoreConfig};
use sluice_sagas::OperatorAction;

/// Options of `sluice transfer`.
#[derive(Debug, clap::Args)]
pub(crate) struct TransferArgs {
    /// Source account id.
    #[arg(value_parser = sluice_host::id_arg)]
    from: String,
    /// Target account id.
    #[arg(value_parser = sluice_host::id_arg)]
    to: String,
    /// Amount in minor units (> 0).
    amount: i64,
    /// Transfer id; also the idempotency key (default: a new UUIDv7).
    #[arg(long, value_parser = sluice_host::id_arg)]
    id: Option<String>,
    /// Wait up to this many seconds for the transfer to finish. Exit 0 only
    /// when it completed; 1 when it compensated, needs attention or was
    /// abandoned; 4 when it is still pending when the wait runs out.
    #[arg(long)]
    wait: Option<u64>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// `sluice saga ...` (the ledger's transfer saga).
#[derive(Debug, clap::Subcommand)]
pub(crate) enum SagaCommand {
    /// Transfers, optionally only those in one state.
    List {
        /// Only transfers in this state.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(sluice_ledger::TRANSFER_STATES))]
        state: Option<String>,
    },
    /// One transfer and every transition of its saga: time, cause (start,
    /// claim, reply, deadline, retry), resulting status, commands sent.
    Show {
        /// Transfer id.
        #[arg(value_parser = sluice_host::id_arg)]
        id: String,
    },
    /// Send the command a transfer that needs attention is stuck on again
    /// (the debit, the credit or the refund) as the next attempt, after
    /// fixing its cause. Money moves at most once per step in all.
    Retry {
        /// Transfer id.
        #[arg(value_parser = sluice_host::id_arg)]
        id: String,
        /// Who and why, kept in the saga's log.
        #[arg(long)]
        note: String,
    },
    /// State the outcome of a transfer that needs attention (after checking
    /// the accounts); nothing moves.
    Resolve {
        /// Transfer id.
        id: String,
        /// Where the money is: completed (debited and credited) or
        /// compensated (back on the source, or never debited).
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(["completed", "compensated"]))]
        outcome: String,
        /// Who and why, kept in the saga's log.
        #[arg(long)]
        note: String,
    },
    /// Stop a transfer that needs attention without acting (after fixing the
    /// money by hand); nothing moves.
    Abandon {
        /// Transfer id.
        id: String,
        /// Who and why, kept in the saga's log.
        #[arg(long)]
        note: String,
    },
}

/// Exit code of `transfer --wait` when the transfer is still pending as the
/// wait runs out (README, exit codes).
pub(crate) const EXIT_PENDING: u8 = 4;

async fn connect(url: &str) -> anyhow::Result<EventStore> {
    Ok(EventStore::connect_with(&ConnectConfig::from_env(url)?, StoreConfig::default()).await?)
}

/// The idempotency records as the service keeps them (a one-off command
/// never changes their retention).
async fn idempotency(store: &EventStore) -> anyhow::Result<sluice_ledger::Idempotency> {
    Ok(sluice_ledger::Idempotency::open_existing(
        store,
        sluice_ledger::IdempotencyConfig::default(),
    )
    .await?)
}

fn print_view(v: &sluice_ledger::TransferView, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(v)?);
    } else {
        println!(
            "{:<38} {:<12} {:<12} {:>10}  {:<16} {}",
            v.id,
            v.from,
            v.to,
            v.amount,
            v.state,
            v.reason.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

pub(crate) async fn transfer(args: TransferArgs, url: &str) -> anyhow::Result<ExitCode> {
    let store = connect(url).await?;
    let t = sluice_ledger::start_transfer(
        &store,
        args.id.as_deref(),
        &args.from,
        &args.to,
        args.amount,
    )
    .await?;
    let mut view = None;
    if let Some(secs) = args.wait {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let v = sluice_ledger::transfer_status(&store, &t.id).await?;
            let done = v.as_ref().is_some_and(|v| v.state != "pending");
            view = v;
            if done || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    if args.json {
        println!(
            "{}",
            json!({"id": t.id, "position": t.position, "created": t.created, "transfer": view})
        );
    } else {
        println!(
            "transfer {} {} at position {}",
            t.id,
            if t.created {
                "started"
            } else {
                "already existed"
            },
            t.position
        );
        if let Some(v) = &view {
            print_view(v, false)?;
        }
    }
    if args.wait.is_none() {
        return Ok(ExitCode::SUCCESS);
    }
    // `--wait` asks for the end state: only `completed` is success.
    Ok(match view.as_ref().map(|v| v.state) {
        Some("completed") => ExitCode::SUCCESS,
        Some("pending") | None => {
            eprintln!(
                "error: transfer {} is still pending after {} s; see `sluice saga show {}`",
                t.id,
                args.wait.unwrap_or(0),
                t.id
            );
            ExitCode::from(EXIT_PENDING)
        }
        Some(state) => {
            let reason = view
                .as_ref()
                .and_then(|v| v.reason.as_deref())
                .unwrap_or("");
            eprintln!("error: transfer {} {state}: {reason}", t.id);
            ExitCode::from(1)
        }
    })
}

/// Prints what an operator action did.
fn operated(v: &sluice_ledger::TransferView, what: &str, json: bool) -> anyhow::Result<()> {
    if json {
        return print_view(v, true);
    }
    println!(
        "transfer {}: {what} (recorded at position {}); now {}",
        v.id, v.version, v.state
    );
    Ok(())
}

fn print_history(
    view: &sluice_ledger::TransferView,
    transitions: &[sluice_sagas::Transition],
    json: bool,
) -> anyhow::Result<()> {
    if json {
        println!("{}", json!({"transfer": view, "transitions": transitions}));
        return Ok(());
    }
    print_view(view, false)?;
    for t in transitions {
        let kind = t
            .event_type
            .strip_prefix("sluice.saga.")
            .and_then(|k| k.strip_suffix(".v1"))
            .unwrap_or(t.event_type);
        println!(
            "  #{:<8} {:<32} {:<22} {}",
            t.position,
            t.time.as_deref().unwrap_or("-"),
            kind,
            t.cause
        );
        println!(
            "  {:<42} -> {}",
            "",
            sluice_ledger::describe_transfer_status(&t.status)
        );
        for c in &t.commands {
            let deadline = c
                .deadline_ms
                .map(|ms| format!(" (deadline {} s)", ms / 1000))
                .unwrap_or_default();
            println!(
                "  {:<42}    sent {} {} to {}{deadline}",
                "",
                c.command,
                c.id,
                c.target.as_deref().unwrap_or("?")
            );
        }
    }
    Ok(())
}

pub(crate) async fn saga(cmd: SagaCommand, url: &str, json: bool) -> anyhow::Result<ExitCode> {
    let store = connect(url).await?;
    match cmd {
        SagaCommand::List { state } => {
            let state = state
                .as_deref()
                .map(str::parse::<sluice_ledger::TransferState>)
                .transpose()?;
            for v in sluice_ledger::list_transfers(&store, state).await? {
                print_view(&v, json)?;
            }
        }
        SagaCommand::Show { id } => match sluice_ledger::transfer_history(&store, &id).await? {
            Some((view, transitions)) => print_history(&view, &transitions, json)?,
            None => anyhow::bail!("no transfer {id}"),
        },
        SagaCommand::Retry { id, note } => {
            let v =
                sluice_ledger::operate_transfer(&store, &id, OperatorAction::Retry, &note).await?;
            operated(
                &v,
                "retried: the command it was stuck on goes out again",
                json,
            )?;
        }
        SagaCommand::Resolve { id, outcome, note } => {
            let outcome: sluice_sagas::Outcome = outcome.parse()?;
            let action = OperatorAction::Resolve(outcome);
            let v = sluice_ledger::operate_transfer(&store, &id, action, &note).await?;
            operated(&v, "resolved", json)?;
        }
        SagaCommand::Abandon { id, note } => {
            let v = sluice_ledger::operate_transfer(&store, &id, OperatorAction::Abandon, &note)
                .await?;
            operated(&v, "abandoned", json)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `sluice ledger ...`: account commands, decided by the account aggregate.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum LedgerCommand {
    /// Open an account.
    Open {
        /// Account id.
        #[arg(value_parser = sluice_host::id_arg)]
        id: String,
        /// Owner.
        #[arg(long)]
        owner: String,
        /// Three-letter currency code.
        #[arg(long, default_value = "EUR")]
        currency: String,
    },
    /// Deposit minor units.
    Deposit {
        /// Account id.
        #[arg(value_parser = sluice_host::id_arg)]
        id: String,
        /// Minor units (> 0).
        amount: i64,
    },
    /// Withdraw minor units (never below zero).
    Withdraw {
        /// Account id.
        #[arg(value_parser = sluice_host::id_arg)]
        id: String,
        /// Minor units (> 0).
        amount: i64,
    },
    /// An account's balance and state, folded from its log.
    Show {
        /// Account id.
        #[arg(value_parser = sluice_host::id_arg)]
        id: String,
    },
}

pub(crate) async fn ledger(
    cmd: LedgerCommand,
    key: Option<String>,
    url: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use sluice_ledger::AccountCommand;
    let store = connect(url).await?;
    let (id, command) = match cmd {
        LedgerCommand::Show { id } => {
            let (account, version) = sluice_ledger::account_state(&store, &id).await?;
            if !account.exists() {
                anyhow::bail!("no account {id}");
            }
            let v = json!({
                "id": id,
                "balance": account.balance(),
                "currency": account.currency(),
                "open": account.is_open(),
                "version": version,
            });
            if json {
                println!("{v}");
            } else {
                println!(
                    "{id}: balance {} {} ({}), version {version}",
                    account.balance(),
                    account.currency().unwrap_or(""),
                    if account.is_open() { "open" } else { "closed" }
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        LedgerCommand::Open {
            id,
            owner,
            currency,
        } => (id, AccountCommand::Open { owner, currency }),
        LedgerCommand::Deposit { id, amount } => (
            id,
            AccountCommand::Deposit {
                amount,
                currency: None,
            },
        ),
        LedgerCommand::Withdraw { id, amount } => (
            id,
            AccountCommand::Withdraw {
                amount,
                currency: None,
            },
        ),
    };
    let keys = match &key {
        Some(k) => {
            // A bad key fails before anything is opened or written.
            sluice_ledger::validate_idempotency_key(k)?;
            Some(idempotency(&store).await?)
        }
        None => None,
    };
    let keyed = keys.as_ref().zip(key.as_deref());
    let o = sluice_ledger::execute_account_command(&store, &id, &command, keyed).await?;
    if json {
        println!("{}", serde_json::to_string(&o)?);
    } else {
        println!(
            "{}: {} at position {}",
            o.account,
            if o.replayed {
                "already done (same idempotency key)"
            } else {
                "done"
            },
            o.version
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Options of `sluice demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Transfers to run.
    #[arg(long, default_value_t = 20)]
    transfers: usize,
    /// Print one JSON summary object.
    #[arg(long)]
    json: bool,
}

/// Opens a few accounts and runs transfers between them, some of which must
/// compensate (other currency, unknown account), against a running
/// `sluice up`; prints where they ended and the balances.
pub(crate) async fn demo(args: DemoArgs, url: &str) -> anyhow::Result<ExitCode> {
    use sluice_ledger::AccountCommand;
    let store = connect(url).await?;
    let keys = idempotency(&store).await?;
    let accounts = [
        ("demo-ann", "EUR"),
        ("demo-bob", "EUR"),
        ("demo-cid", "EUR"),
        ("demo-dan", "USD"),
    ];
    for (id, currency) in accounts {
        let open = AccountCommand::Open {
            owner: id.trim_start_matches("demo-").into(),
            currency: currency.into(),
        };
        // Keys make a second demo run reuse the same accounts and deposits.
        let key = format!("{id}-open");
        sluice_ledger::execute_account_command(&store, id, &open, Some((&keys, &key))).await?;
        let deposit = AccountCommand::Deposit {
            amount: 10_000,
            currency: None,
        };
        let key = format!("{id}-seed");
        sluice_ledger::execute_account_command(&store, id, &deposit, Some((&keys, &key))).await?;
    }
    let targets = [
        "demo-ann",
        "demo-bob",
        "demo-cid",
        "demo-dan",
        "demo-nobody",
    ];
    let mut ids = Vec::new();
    for i in 0..args.transfers {
        let from = accounts[i % 3].0;
        let to = targets[(i * 7 + 1) % targets.len()];
        let to = if to == from {
            targets[(i + 2) % targets.len()]
        } else {
            to
        };
        let amount = 100 + (i as i64 * 37) % 900;
        ids.push(
            sluice_ledger::start_transfer(&store, None, from, to, amount)
                .await?
                .id,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut views = Vec::new();
    loop {
        views.clear();
        for id in &ids {
            if let Some(v) = sluice_ledger::transfer_status(&store, id).await? {
                views.push(v);
            }
        }
        let pending =
            views.iter().filter(|v| v.state == "pending").count() + ids.len() - views.len();
        if pending == 0 || Instant::now() > deadline {
            break;
        }
        if !args.json {
            eprintln!("{pending} transfer(s) still pending... (is `sluice up` running?)");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let count = |s: &str| views.iter().filter(|v| v.state == s).count();
    let mut balances = serde_json::Map::new();
    for (id, _) in accounts {
        let (a, _) = sluice_ledger::account_state(&store, id).await?;
        balances.insert(id.to_owned(), json!(a.balance()));
    }
    if args.json {
        println!(
            "{}",
            json!({
                "transfers": ids.len(),
                "completed": count("completed"),
                "compensated": count("compensated"),
                "pending": count("pending"),
                "needs_attention": count("needs_attention"),
                "balances": balances,
            })
        );
    } else {
        for v in &views {
            print_view(v, false)?;
        }
        println!(
            "\n{} transfers: {} completed, {} compensated (refunded), {} pending",
            ids.len(),
            count("completed"),
            count("compensated"),
            count("pending")
        );
        for (id, b) in &balances {
            println!("  {id:<10} {b}");
        }
        println!(
            "See them in the read models: sluice query transfers; sluice query account_balances"
        );
    }
    Ok(ExitCode::SUCCESS)
}
