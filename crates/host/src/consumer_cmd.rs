//! `sluice consumer ...`: the kill switch (pause/resume a worker's durable
//! consumers at the server) and the backlog of every consumer, through the
//! `sluice_workers::consumers` library API.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use sluice_events::{ConnectConfig, EventStore, StoreConfig};
use sluice_workers::consumers;

/// `sluice consumer` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum ConsumerCommand {
    /// Every durable consumer with pending, ack-pending, redeliveries and lag.
    List,
    /// Stop deliveries to a consumer, or to every consumer of a worker.
    Pause {
        /// Consumer or worker name.
        #[arg(value_parser = crate::id_arg)]
        name: String,
        /// How long the pause lasts unless resumed earlier: `30s`, `10m`, `2h`, `7d`.
        #[arg(long = "for", default_value = "1h", value_parser = parse_duration)]
        duration: Duration,
    },
    /// Resume deliveries to a consumer, or to every consumer of a worker.
    Resume {
        /// Consumer or worker name.
        #[arg(value_parser = crate::id_arg)]
        name: String,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration: use e.g. 30s, 10m, 2h, 7d"))?;
    let secs = match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => {
            return Err(format!(
                "{s:?} is not a duration: use e.g. 30s, 10m, 2h, 7d"
            ));
        }
    };
    Ok(Duration::from_secs(secs))
}

/// Runs one `sluice consumer` command against the server at `nats_url`.
/// `json` prints one JSON object per line instead of a human table.
pub(crate) async fn run(
    cmd: ConsumerCommand,
    nats_url: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let connect = ConnectConfig::from_env(nats_url)?;
    let store = EventStore::connect_with(&connect, StoreConfig::default())
        .await
        .with_context(|| {
            format!(
                "connecting to NATS at {}",
                sluice_events::redact_url(nats_url)
            )
        })?;
    match cmd {
        ConsumerCommand::List => {
            let list = consumers::list(&store).await?;
            if json {
                for c in &list {
                    println!("{}", serde_json::to_string(c)?);
                }
            } else if list.is_empty() {
                println!("no durable consumers");
            } else {
                println!(
                    "{:<12}  {:<32}  {:>9}  {:>11}  {:>11}  {:>9}  STATE",
                    "STREAM", "CONSUMER", "PENDING", "ACK-PENDING", "REDELIVERED", "LAG"
                );
                for c in &list {
                    let state = match (c.paused, c.pause_remaining_secs) {
                        (true, Some(s)) => format!("paused ({s}s left)"),
                        (true, None) => "paused".to_owned(),
                        (false, _) => "running".to_owned(),
                    };
                    println!(
                        "{:<12}  {:<32}  {:>9}  {:>11}  {:>11}  {:>9}  {state}",
                        c.stream, c.name, c.pending, c.ack_pending, c.redelivered, c.lag
                    );
                }
            }
        }
        ConsumerCommand::Pause { name, duration } => {
            let paused = consumers::pause(&store, &name, duration).await?;
            if json {
                println!(
                    "{}",
                    json!({ "paused": paused, "for_secs": duration.as_secs() })
                );
            } else {
                println!("paused for {}s: {}", duration.as_secs(), paused.join(", "));
            }
        }
        ConsumerCommand::Resume { name } => {
            let resumed = consumers::resume(&store, &name).await?;
            if json {
                println!("{}", json!({ "resumed": resumed }));
            } else {
                println!("resumed: {}", resumed.join(", "));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
