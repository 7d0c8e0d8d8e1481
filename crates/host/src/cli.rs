//! The operator command line every domain binary mounts.
//!
//! [`main`] parses the platform's commands (`up`, `serve`, `publish`,
//! `read`, `event`, `tail`, `status`, `query`, `projection`, `replay`,
//! `dlq`, `consumer`, `token`) plus the binary's own ([`DomainCommands`]),
//! runs one and maps its error to an exit code.
//!
//! Exit codes: 0 ok, 1 error, 2 usage, 3 optimistic-concurrency conflict or
//! an event id already used by another event, 4 `--wait` ran out before the
//! end state was reached.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use futures::future::BoxFuture;

use crate::module::App;
use crate::{
    consumer_cmd, dlq_cmd, endpoint, projection_cmd, status_cmd, stream_cmd, telemetry, tokens, up,
};

/// Exit code for an optimistic-concurrency conflict or a reused event id.
pub const EXIT_CONFLICT: u8 = 3;
/// Exit code for a usage mistake (e.g. an append the catalog refuses).
pub const EXIT_USAGE: u8 = 2;

/// Commands a domain binary adds to the platform's (e.g. the ledger's
/// `transfer`); `#[derive(clap::Subcommand)]` on an enum, then this.
pub trait DomainCommands: Subcommand + Send + 'static {
    /// Runs the command.
    fn run(self, ctx: CliContext) -> BoxFuture<'static, anyhow::Result<ExitCode>>;

    /// The exit code of one of this domain's errors, when it has its own
    /// (the platform's errors are mapped by the host).
    fn exit_code(_error: &anyhow::Error) -> Option<u8> {
        None
    }

    /// The event store error inside one of this domain's errors, so the
    /// host maps it (conflict, refused append) like its own.
    fn events_error(_error: &anyhow::Error) -> Option<&sluice_events::Error> {
        None
    }
}

/// A binary with no commands of its own.
#[derive(Debug, Clone, Copy, Subcommand)]
pub enum NoCommands {}

impl DomainCommands for NoCommands {
    fn run(self, _ctx: CliContext) -> BoxFuture<'static, anyhow::Result<ExitCode>> {
        match self {}
    }
}

/// Where a command runs: the global options.
#[derive(Debug, Clone)]
pub struct CliContext {
    nats_url: Option<String>,
    home: PathBuf,
}

impl CliContext {
    /// The Sluice home directory (`--home`, default `.sluice`).
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// The NATS URL to use: `--nats-url`/`SLUICE_NATS_URL`, else the
    /// server `up` started under the home directory.
    pub fn nats_url(&self) -> anyhow::Result<String> {
        endpoint::resolve(self.nats_url.clone(), &self.home)
    }
}

/// Global options and the command.
#[derive(Debug, Parser)]
#[command(version, propagate_version = true)]
struct Cli<E: DomainCommands> {
    /// NATS server URL(s), comma-separated; default: the server `up`
    /// started in this directory.
    #[arg(long, global = true, env = "SLUICE_NATS_URL")]
    nats_url: Option<String>,
    /// Directory for the embedded server's data and endpoint file.
    #[arg(long, global = true, env = "SLUICE_HOME", default_value = ".sluice")]
    home: PathBuf,
    #[command(subcommand)]
    command: Command<E>,
}

#[derive(Debug, Subcommand)]
enum Command<E: DomainCommands> {
    /// Run everything: the embedded nats-server (unless --nats-url) and every role.
    Up(up::UpArgs),
    /// Run chosen roles (`--role api,projector,worker,saga`) against
    /// configured NATS and database servers.
    Serve(up::ServeArgs),
    /// Append one event to an aggregate.
    Publish(stream_cmd::PublishArgs),
    /// Print an aggregate's events.
    Read(stream_cmd::ReadArgs),
    /// Events in the log: void a bad one.
    #[command(subcommand)]
    Event(stream_cmd::EventCommand),
    /// Follow events as they are appended.
    Tail(stream_cmd::TailArgs),
    /// Server version, stream state and a durability check.
    Status(status_cmd::StatusArgs),
    /// Rows of a projection (one by key, or a page).
    Query(QueryCmd),
    /// Projections: list, rebuild (blue/green), reset, dead letters.
    Projection(ProjectionArgs),
    /// Apply a projection's events again from a position (partial recovery).
    Replay(projection_cmd::ReplayArgs),
    /// Dead letters: list, show, redrive, discard.
    Dlq(DlqArgs),
    /// Durable consumers: list, pause (kill switch), resume.
    Consumer(ConsumerArgs),
    /// API tokens with scopes: create, list, revoke (stored hashed under the home).
    #[command(subcommand)]
    Token(tokens::TokenCommand),
    #[command(flatten)]
    Domain(E),
}

/// `query ...`.
#[derive(Debug, clap::Args)]
struct QueryCmd {
    #[command(flatten)]
    args: projection_cmd::QueryArgs,
    /// Read store (default: the one `up` here records, else SQLite
    /// under the home directory).
    #[arg(long, env = "SLUICE_DATABASE_URL")]
    database_url: Option<String>,
}

/// `projection ...`.
#[derive(Debug, clap::Args)]
struct ProjectionArgs {
    #[command(subcommand)]
    cmd: projection_cmd::ProjectionCommand,
    /// One JSON object per line instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Read store (default: the one `up` here records, else SQLite
    /// under the home directory).
    #[arg(long, global = true, env = "SLUICE_DATABASE_URL")]
    database_url: Option<String>,
}

/// `dlq ...`.
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

/// `consumer ...`.
#[derive(Debug, clap::Args)]
struct ConsumerArgs {
    #[command(subcommand)]
    cmd: consumer_cmd::ConsumerCommand,
    /// One JSON object per line instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

/// Parses the command line of the binary named like `app` (`about` is its
/// one-line description), runs the command and returns its exit code.
pub async fn main<E: DomainCommands>(app: App, about: &'static str) -> ExitCode {
    let name = app.name();
    let matches = Cli::<E>::command()
        .name(name)
        .bin_name(name)
        .about(about)
        .get_matches();
    let cli = match Cli::<E>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // Only the long-running commands export traces (their spans are the
    // ones worth following); `up` runs every role in one process.
    let service = match &cli.command {
        Command::Up(_) => Some(format!("{name}-up")),
        Command::Serve(args) => Some(args.service_name(name)),
        _ => None,
    };
    let telemetry = telemetry::init(if service.is_some() { "info" } else { "warn" }, service);
    let ctx = CliContext {
        nats_url: cli.nats_url,
        home: cli.home,
    };
    let result = run(app, cli.command, ctx).await;
    telemetry.shutdown();
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line for people; the chain for the curious.
            let chain: Vec<String> = e.chain().map(ToString::to_string).collect();
            eprintln!("error: {}", chain.join(": "));
            if let Some(position) =
                events_error::<E>(&e).and_then(sluice_events::Error::stored_event_position)
            {
                eprintln!(
                    "hint: if that event is wrong, void it (every consumer then skips it): {name} event void {position} --reason \"...\""
                );
            }
            ExitCode::from(exit_code::<E>(&e))
        }
    }
}

async fn run<E: DomainCommands>(
    app: App,
    command: Command<E>,
    ctx: CliContext,
) -> anyhow::Result<ExitCode> {
    let ok = |r: anyhow::Result<()>| r.map(|()| ExitCode::SUCCESS);
    let (nats_url, home) = (ctx.nats_url.clone(), ctx.home.clone());
    match command {
        Command::Up(args) => ok(up::up(&app, args, nats_url, home).await),
        Command::Serve(args) => ok(up::serve(&app, args, nats_url, home).await),
        Command::Publish(args) => ok(stream_cmd::publish(&app, args, nats_url, &home).await),
        Command::Event(cmd) => stream_cmd::event(cmd, nats_url, &home).await,
        Command::Read(args) => ok(stream_cmd::read(args, nats_url, &home).await),
        Command::Tail(args) => ok(stream_cmd::tail(args, nats_url, &home).await),
        Command::Status(args) => ok(status_cmd::status(args, nats_url, &home).await),
        Command::Token(cmd) => ok(tokens::run(cmd, &home)),
        Command::Query(q) => {
            projection_cmd::query(&app, q.args, nats_url, &home, q.database_url).await
        }
        Command::Projection(p) => {
            projection_cmd::projection(&app, p.cmd, p.json, nats_url, &home, p.database_url).await
        }
        Command::Replay(r) => projection_cmd::replay(&app, r, nats_url, &home).await,
        Command::Dlq(a) => {
            let url = ctx.nats_url()?;
            dlq_cmd::run(&app, a.cmd, &url, a.json, &home, a.database_url).await
        }
        Command::Consumer(a) => consumer_cmd::run(a.cmd, &ctx.nats_url()?, a.json).await,
        Command::Domain(cmd) => cmd.run(ctx).await,
    }
}

/// The event store error behind `e`, also when wrapped (transparently) in
/// a saga or a domain's error.
fn events_error<E: DomainCommands>(e: &anyhow::Error) -> Option<&sluice_events::Error> {
    e.chain()
        .find_map(|c| {
            c.downcast_ref::<sluice_events::Error>()
                .or_else(|| match c.downcast_ref::<crate::Error>() {
                    Some(crate::Error::Events(e)) => Some(e),
                    _ => None,
                })
                .or_else(|| match c.downcast_ref::<sluice_sagas::SagaError>() {
                    Some(sluice_sagas::SagaError::Events(e)) => Some(e),
                    _ => None,
                })
        })
        .or_else(|| E::events_error(e))
}

/// Exit code usage for an error that reached `main`: 3 for a conflict, 2
/// for an invalid id found only at run time (the argument parsers catch
/// most before anything is sent), 1 otherwise; by kind, through the crates'
/// wrappers, never by text.
fn exit_code<E: DomainCommands>(e: &anyhow::Error) -> u8 {
    match events_error::<E>(e) {
        Some(ev) if ev.is_conflict() || ev.is_id_reused() => EXIT_CONFLICT,
        Some(ev) if ev.is_refused_by_catalog() => EXIT_USAGE,
        Some(
            sluice_events::Error::InvalidToken { .. } | sluice_events::Error::InvalidEventId(_),
        ) => EXIT_USAGE,
        _ => match e.downcast_ref::<crate::Error>() {
            Some(h) => h.exit_code(),
            None => E::exit_code(e).unwrap_or(1),
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
            (sluice_sagas::SagaError::Events(conflict()).into(), 3),
            (bad_id().into(), 2),
            (sluice_sagas::SagaError::Events(bad_id()).into(), 2),
            (
                sluice_events::Error::Timeout(std::time::Duration::from_secs(1)).into(),
                1,
            ),
            (
                crate::Error::UnknownProjection {
                    name: "x".into(),
                    known: "a".into(),
                }
                .into(),
                2,
            ),
            (crate::Error::Events(conflict()).into(), 3),
            (anyhow::anyhow!("anything else"), 1),
        ];
        for (e, want) in cases {
            assert_eq!(exit_code::<NoCommands>(&e), want, "{e:#}");
        }
    }
}
