//! `sluice`: the command line of the Sluice event-sourcing platform.
//!
//! Exit codes: 0 ok, 1 error, 2 usage, 3 optimistic-concurrency conflict or
//! an event id already used by another event, 4 `--wait` ran out before the
//! end state was reached.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench_alias;
mod commands;
mod config;
mod consumer_cmd;
mod dlq_cmd;
mod endpoint;
mod http;
mod nats_lint;
mod private_file;
mod projection_cmd;
mod provision;
mod telemetry;
mod tokens;
mod transfer_cmd;
mod up;

/// Exit code for an optimistic-concurrency conflict or a reused event id.
const EXIT_CONFLICT: u8 = 3;
/// Exit code for a usage mistake (e.g. an append the catalog refuses).
const EXIT_USAGE: u8 = 2;

/// The event store error behind `e`, also when wrapped (transparently) in
/// a ledger or saga error.
fn events_error(e: &anyhow::Error) -> Option<&sluice_events::Error> {
    e.chain().find_map(|c| {
        c.downcast_ref::<sluice_events::Error>()
            .or_else(|| match c.downcast_ref::<sluice_ledger::Error>() {
                Some(sluice_ledger::Error::Events(e)) => Some(e),
                _ => None,
            })
            .or_else(|| match c.downcast_ref::<sluice_sagas::SagaError>() {
                Some(sluice_sagas::SagaError::Events(e)) => Some(e),
                _ => None,
            })
    })
}

/// Sluice: an event log you can trust, on NATS JetStream.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about, propagate_version = true)]
struct Cli {
    /// NATS server URL(s), comma-separated; default: the server `sluice up`
    /// started in this directory.
    #[arg(long, global = true, env = "SLUICE_NATS_URL")]
    nats_url: Option<String>,
    /// Directory for the embedded server's data and endpoint file.
    #[arg(long, global = true, env = "SLUICE_HOME", default_value = ".sluice")]
    home: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run Sluice: the embedded nats-server (unless --nats-url) and every role.
    Up(up::UpArgs),
    /// Run chosen roles (`--role api,projector,worker,saga`) against
    /// configured NATS and database servers.
    Serve(up::ServeArgs),
    /// Append one event to an aggregate.
    Publish(commands::PublishArgs),
    /// Print an aggregate's events.
    Read(commands::ReadArgs),
    /// Events in the log: void a bad one.
    #[command(subcommand)]
    Event(commands::EventCommand),
    /// Follow events as they are appended.
    Tail(commands::TailArgs),
    /// Server version, stream state and a durability check.
    Status(commands::StatusArgs),
    /// Rows of a projection (one by key, or a page).
    Query(QueryCmd),
    /// Projections: list, rebuild (blue/green), reset, dead letters.
    Projection(ProjectionArgs),
    /// Apply a projection's events again from a position (partial recovery).
    Replay(projection_cmd::ReplayArgs),
    /// Open demo accounts and run transfers (some compensate) against `sluice up`.
    Demo(transfer_cmd::DemoArgs),
    /// Ledger accounts: open, deposit, withdraw, show.
    Ledger(LedgerArgs),
    /// Move money between two ledger accounts (a saga that undoes itself).
    Transfer(transfer_cmd::TransferArgs),
    /// Transfer sagas: list, show; retry, resolve or abandon one that needs attention.
    Saga(SagaArgs),
    /// Dead letters: list, show, redrive, discard.
    Dlq(DlqArgs),
    /// Durable consumers: list, pause (kill switch), resume.
    Consumer(ConsumerArgs),
    /// API tokens with scopes: create, list, revoke (stored hashed under the home).
    #[command(subcommand)]
    Token(tokens::TokenCommand),
    /// Benchmarks: runs the `sluice-bench` binary next to this one with these arguments.
    Bench(bench_alias::BenchArgs),
}

/// `sluice query ...`.
#[derive(Debug, clap::Args)]
struct QueryCmd {
    #[command(flatten)]
    args: projection_cmd::QueryArgs,
    /// Read store (default: the one `sluice up` here records, else SQLite
    /// under the home directory).
    #[arg(long, env = "SLUICE_DATABASE_URL")]
    database_url: Option<String>,
}

/// `sluice projection ...`.
#[derive(Debug, clap::Args)]
struct ProjectionArgs {
    #[command(subcommand)]
    cmd: projection_cmd::ProjectionCommand,
    /// One JSON object per line instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Read store (default: the one `sluice up` here records, else SQLite
    /// under the home directory).
    #[arg(long, global = true, env = "SLUICE_DATABASE_URL")]
    database_url: Option<String>,
}

/// `sluice ledger ...`.
#[derive(Debug, clap::Args)]
struct LedgerArgs {
    #[command(subcommand)]
    cmd: transfer_cmd::LedgerCommand,
    /// Idempotency key: the same key and command take effect once.
    #[arg(long, global = true)]
    idempotency_key: Option<String>,
    /// One JSON object instead of text.
    #[arg(long, global = true)]
    json: bool,
}

/// `sluice saga ...`.
#[derive(Debug, clap::Args)]
struct SagaArgs {
    #[command(subcommand)]
    cmd: transfer_cmd::SagaCommand,
    /// One JSON object per line instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

/// `sluice dlq ...`.
#[derive(Debug, clap::Args)]
struct DlqArgs {
    #[command(subcommand)]
    cmd: dlq_cmd::DlqCommand,
    /// One JSON object per line instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Read store, where a projection's dead letters are recorded (default:
    /// SQLite under the home directory); used only for those.
    #[arg(long, global = true, env = "SLUICE_DATABASE_URL")]
    database_url: Option<String>,
}

/// `sluice consumer ...`.
#[derive(Debug, clap::Args)]
struct ConsumerArgs {
    #[command(subcommand)]
    cmd: consumer_cmd::ConsumerCommand,
    /// One JSON object per line instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

/// mimalloc: Sluice's hot paths (envelopes, NATS headers, acks) allocate many
/// small, short-lived objects, which glibc's allocator handles poorly across
/// threads.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Only the long-running commands export traces (their spans are the
    // ones worth following); `up` runs every role in one process.
    let service = match &cli.command {
        Command::Up(_) => Some("sluice-up".to_owned()),
        Command::Serve(args) => Some(args.service_name()),
        _ => None,
    };
    let telemetry = telemetry::init(if service.is_some() { "info" } else { "warn" }, service);
    let result = match cli.command {
        Command::Up(args) => up::up(args, cli.nats_url, cli.home)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Serve(args) => up::serve(args, cli.nats_url, cli.home)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Publish(args) => commands::publish(args, cli.nats_url, &cli.home)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Event(cmd) => commands::event(cmd, cli.nats_url, &cli.home).await,
        Command::Read(args) => commands::read(args, cli.nats_url, &cli.home)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Tail(args) => commands::tail(args, cli.nats_url, &cli.home)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Status(args) => commands::status(args, cli.nats_url, &cli.home)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Bench(args) => bench_alias::exec(args),
        Command::Token(cmd) => tokens::run(cmd, &cli.home).map(|()| ExitCode::SUCCESS),
        Command::Query(q) => {
            projection_cmd::query(q.args, cli.nats_url, &cli.home, q.database_url).await
        }
        Command::Projection(p) => {
            projection_cmd::projection(p.cmd, p.json, cli.nats_url, &cli.home, p.database_url).await
        }
        Command::Replay(r) => projection_cmd::replay(r, cli.nats_url, &cli.home).await,
        Command::Demo(a) => match endpoint::resolve(cli.nats_url, &cli.home) {
            Ok(url) => transfer_cmd::demo(a, &url).await,
            Err(e) => Err(e),
        },
        Command::Ledger(a) => match endpoint::resolve(cli.nats_url, &cli.home) {
            Ok(url) => transfer_cmd::ledger(a.cmd, a.idempotency_key, &url, a.json).await,
            Err(e) => Err(e),
        },
        Command::Transfer(a) => match endpoint::resolve(cli.nats_url, &cli.home) {
            Ok(url) => transfer_cmd::transfer(a, &url).await,
            Err(e) => Err(e),
        },
        Command::Saga(a) => match endpoint::resolve(cli.nats_url, &cli.home) {
            Ok(url) => transfer_cmd::saga(a.cmd, &url, a.json).await,
            Err(e) => Err(e),
        },
        Command::Dlq(a) => match endpoint::resolve(cli.nats_url, &cli.home) {
            Ok(url) => dlq_cmd::run(a.cmd, &url, a.json, &cli.home, a.database_url).await,
            Err(e) => Err(e),
        },
        Command::Consumer(a) => match endpoint::resolve(cli.nats_url, &cli.home) {
            Ok(url) => consumer_cmd::run(a.cmd, &url, a.json).await,
            Err(e) => Err(e),
        },
    };
    telemetry.shutdown();
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line for people; the chain for the curious.
            let chain: Vec<String> = e.chain().map(ToString::to_string).collect();
            eprintln!("error: {}", chain.join(": "));
            if let Some(position) =
                events_error(&e).and_then(sluice_events::Error::stored_event_position)
            {
                eprintln!(
                    "hint: if that event is wrong, void it (every consumer then skips it): sluice event void {position} --reason \"...\""
                );
            }
            ExitCode::from(exit_code(&e))
        }
    }
}

/// Exit code usage for an error that reached `main`: 3 for a conflict, 2
/// for an invalid id found only at run time (the argument parsers catch
/// most before anything is sent), 1 otherwise; by kind, through the crates'
/// wrappers, never by text.
fn exit_code(e: &anyhow::Error) -> u8 {
    match events_error(e) {
        Some(ev) if ev.is_conflict() || ev.is_id_reused() => EXIT_CONFLICT,
        Some(ev) if ev.is_refused_by_catalog() => EXIT_USAGE,
        Some(
            sluice_events::Error::InvalidToken { .. } | sluice_events::Error::InvalidEventId(_),
        ) => EXIT_USAGE,
        _ => match e.downcast_ref::<sluice_ledger::Error>() {
            Some(l) => l.exit_code(),
            None => 1,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_kind_through_every_wrapper() {
        let conflict = || sluice_events::Error::Conflict {
            stream: "account.a".into(),
            expected: 1,
            actual: 2,
        };
        let bad_id = || sluice_events::validate_token("account id", "a.b").unwrap_err();
        let cases: Vec<(anyhow::Error, u8)> = vec![
            (conflict().into(), 3),
            (sluice_ledger::Error::Events(conflict()).into(), 3),
            (sluice_sagas::SagaError::Events(conflict()).into(), 3),
            (bad_id().into(), 2),
            (sluice_ledger::Error::Events(bad_id()).into(), 2),
            (sluice_sagas::SagaError::Events(bad_id()).into(), 2),
            (
                sluice_ledger::Error::UnknownProjection("x".into()).into(),
                2,
            ),
            (
                sluice_events::Error::Timeout(std::time::Duration::from_secs(1)).into(),
                1,
            ),
            (anyhow::anyhow!("anything else"), 1),
        ];
        for (e, want) in cases {
            assert_eq!(exit_code(&e), want, "{e:#}");
        }
    }
}
