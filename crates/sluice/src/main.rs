//! `sluice`: the Sluice platform's command line with the ledger domain.
//!
//! The platform's commands come from `sluice_host::cli`; this binary adds
//! the ledger's own (`ledger`, `transfer`, `saga`, `demo`) and the
//! benchmarks.

use std::process::ExitCode;

use clap::Subcommand;
use futures::future::BoxFuture;
use sluice_host::cli::{CliContext, DomainCommands};

mod bench;
mod bench_projections;
mod bench_sagas;
mod bench_workers;
mod transfer_cmd;

/// The ledger's commands, beside the platform's.
#[derive(Debug, Subcommand)]
enum LedgerCommands {
    /// Open demo accounts and run transfers (some compensate) against `sluice up`.
    Demo(transfer_cmd::DemoArgs),
    /// Ledger accounts: open, deposit, withdraw, show.
    Ledger(LedgerArgs),
    /// Move money between two ledger accounts (a saga that undoes itself).
    Transfer(transfer_cmd::TransferArgs),
    /// Transfer sagas: list, show; retry, resolve or abandon one that needs attention.
    Saga(SagaArgs),
    /// Benchmarks against a freshly started server.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
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

impl DomainCommands for LedgerCommands {
    fn run(self, ctx: CliContext) -> BoxFuture<'static, anyhow::Result<ExitCode>> {
        Box::pin(async move {
            match self {
                Self::Bench(cmd) => bench::run(cmd).await.map(|()| ExitCode::SUCCESS),
                Self::Demo(a) => transfer_cmd::demo(a, &ctx.nats_url()?).await,
                Self::Ledger(a) => {
                    transfer_cmd::ledger(a.cmd, a.idempotency_key, &ctx.nats_url()?, a.json).await
                }
                Self::Transfer(a) => transfer_cmd::transfer(a, &ctx.nats_url()?).await,
                Self::Saga(a) => transfer_cmd::saga(a.cmd, &ctx.nats_url()?, a.json).await,
            }
        })
    }

    fn events_error(e: &anyhow::Error) -> Option<&sluice_events::Error> {
        e.chain()
            .find_map(|c| match c.downcast_ref::<sluice_ledger::Error>() {
                Some(sluice_ledger::Error::Events(e)) => Some(e),
                _ => None,
            })
    }
}

/// mimalloc: Sluice's hot paths (envelopes, NATS headers, acks) allocate many
/// small, short-lived objects, which glibc's allocator handles poorly across
/// threads.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    sluice_host::cli::main::<LedgerCommands>(
        sluice_host::App::new("sluice").module(sluice_ledger::module()),
        "Sluice: an event log you can trust, on NATS JetStream.",
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_errors_keep_their_exit_codes() {
        let conflict = sluice_events::Error::Conflict {
            stream: "account.a".into(),
            expected: 1,
            actual: 2,
        };
        let bad_id = sluice_events::validate_token("account id", "a.b").unwrap_err();
        let events = |e: anyhow::Error| LedgerCommands::events_error(&e).is_some();
        assert!(events(sluice_ledger::Error::Events(conflict).into()));
        assert!(events(sluice_ledger::Error::Events(bad_id).into()));
        assert!(!events(anyhow::anyhow!("other")));
    }
}
