//! Side-by-side benchmarks of Sluice against raw async-nats and raw SQL,
//! each against freshly started servers. Figures belong here, never in
//! timed tests; none of this is in the product binary (`sluice bench ...`
//! only hands over to the `sluice-bench` binary).
//!
//! Everything here uses only the public API of the Sluice crates.
#![warn(clippy::unwrap_used)]

mod append;
pub mod ledger_read_models;
mod projections;
mod sagas;
mod stats;
mod transfers;
mod workers;

pub use append::{AppendArgs, SyncChoice};
pub use projections::ProjectionsArgs;
pub use sagas::SagasArgs;
pub use transfers::{SagaBenchConfig, SagaBenchReport, bench_transfers};
pub use workers::WorkersArgs;

/// The benchmarks, one subcommand each.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Append throughput: raw async-nats pipelined publish vs Sluice `append`.
    Append(AppendArgs),
    /// Worker runtime throughput vs a raw JetStream consumer.
    Workers(WorkersArgs),
    /// Projection catch-up and rebuild vs raw batched upserts (SQLite, PostgreSQL).
    Projections(ProjectionsArgs),
    /// Transfer sagas per second and request-to-completed latency.
    Sagas(SagasArgs),
}

/// Runs one benchmark and prints its figures (a table, or one JSON object
/// with `--json`).
pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Append(args) => append::run(args).await,
        BenchCommand::Workers(args) => workers::run(args).await,
        BenchCommand::Projections(args) => projections::run(args).await,
        BenchCommand::Sagas(args) => sagas::run(args).await,
    }
}

/// The one error type of the bench library (the binary's commands report
/// through `anyhow`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The event store failed.
    #[error(transparent)]
    Events(#[from] sluice_events::Error),
    /// The projection runtime or its database failed.
    #[error(transparent)]
    Projections(#[from] sluice_projections::Error),
    /// The ledger failed (migrations, its read models).
    #[error(transparent)]
    Ledger(#[from] sluice_ledger::Error),
    /// Opening or funding the bench's accounts failed.
    #[error("bench set-up: {0}")]
    Setup(#[source] sluice_events::ExecuteError<sluice_ledger::AccountRejection>),
    /// No transfer completed for 30 s.
    #[error("bench stalled: {completed} of {total} transfers completed; is the saga role running?")]
    Stalled {
        /// Transfers completed so far.
        completed: usize,
        /// Transfers asked for.
        total: usize,
    },
}
