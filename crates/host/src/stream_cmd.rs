//! The event stream's commands: `publish`, `event`, `read` and `tail`, and
//! the id parsers their arguments share.

use std::io::Read as _;
use std::path::Path;

use anyhow::Context;
use futures::StreamExt;
use serde_json::json;
use sluice_events::{
    ConnectConfig, EventId, EventStore, ExpectedVersion, NewEvent, RecordedEvent, StoreConfig,
    StreamId, validate_token,
};

use crate::endpoint;

/// Options of `sluice publish`.
#[derive(Debug, clap::Args)]
pub(crate) struct PublishArgs {
    /// The aggregate, as `<category>/<id>` (e.g. `account/acc-42`).
    stream: StreamId,
    /// The event type (CloudEvents `type`), e.g. `ledger.account.opened.v1`.
    #[arg(long = "type")]
    event_type: String,
    /// Event data: JSON text, `@file` to read a file, or `-` for stdin.
    #[arg(long)]
    data: String,
    /// Expected version: a number, `none` (new aggregate) or `any`.
    #[arg(long, default_value = "any", value_parser = parse_expected)]
    expect: ExpectedVersion,
    /// CloudEvents `source`.
    #[arg(long, default_value = "urn:sluice:cli")]
    source: String,
    /// Event id, to make a retried publish idempotent (default: a new UUIDv7).
    #[arg(long, value_parser = event_id_arg)]
    id: Option<EventId>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Clap parser for an aggregate, account, transfer or consumer id: one
/// subject token (`[A-Za-z0-9_-]{1,128}`), so a bad id is a usage error
/// (exit 2) found before anything is sent.
///
/// ```
/// assert_eq!(sluice_host::id_arg("acc-1").unwrap(), "acc-1");
/// assert!(sluice_host::id_arg("acc.1").is_err());
/// ```
pub fn id_arg(s: &str) -> Result<String, String> {
    validate_token("id", s)
        .map(|()| s.to_owned())
        .map_err(|e| e.to_string())
}

/// Clap parser for an event id (1-128 printable ASCII characters).
fn event_id_arg(s: &str) -> Result<EventId, String> {
    EventId::parse(s).map_err(|e| e.to_string())
}

fn parse_expected(s: &str) -> Result<ExpectedVersion, String> {
    match s {
        "any" => Ok(ExpectedVersion::Any),
        "none" => Ok(ExpectedVersion::NoStream),
        n => n
            .parse::<u64>()
            .map(ExpectedVersion::from_version)
            .map_err(|_| format!("{n:?} is not a version: use a number, `none` or `any`")),
    }
}

/// The event store at `nats_url` (or the one `home`'s endpoint file names).
pub(crate) async fn connect(nats_url: Option<String>, home: &Path) -> anyhow::Result<EventStore> {
    let url = endpoint::resolve(nats_url, home)?;
    let connect = ConnectConfig::from_env(url)?;
    Ok(EventStore::connect_with(&connect, StoreConfig::default()).await?)
}

fn load_data(data: &str) -> anyhow::Result<Vec<u8>> {
    if data == "-" {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        Ok(buf)
    } else if let Some(file) = data.strip_prefix('@') {
        std::fs::read(file).with_context(|| format!("reading event data from {file}"))
    } else {
        Ok(data.as_bytes().to_vec())
    }
}

pub(crate) async fn publish(
    app: &crate::module::App,
    args: PublishArgs,
    nats_url: Option<String>,
    home: &Path,
) -> anyhow::Result<()> {
    let mut event = NewEvent::new(args.event_type, load_data(&args.data)?).with_source(args.source);
    if let Some(id) = args.id {
        event = event.with_id(id);
    }
    // Validate before connecting, so bad input fails fast and offline.
    event.validate(StoreConfig::default().max_payload)?;
    app.catalog()?.check(&args.stream, 0, &event)?;
    let store = connect(nats_url, home).await?;
    let r = store.append(&args.stream, args.expect, vec![event]).await?;
    if args.json {
        println!(
            "{}",
            json!({
                "stream": args.stream.to_string(),
                "position": r.positions[0],
                "version": r.version,
                "deduplicated": r.deduplicated,
            })
        );
    } else {
        println!(
            "appended to {}: position {}, version {}{}",
            args.stream,
            r.positions[0],
            r.version,
            if r.deduplicated {
                " (already there: deduplicated)"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// `sluice event ...`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum EventCommand {
    /// Void a bad event: every consumer skips it from now on (idempotent;
    /// audited as an event of its own on `sluice-void/<position>`).
    Void {
        /// The event's position in the log.
        position: u64,
        /// Why (kept for audit).
        #[arg(long)]
        reason: String,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) async fn event(
    cmd: EventCommand,
    nats_url: Option<String>,
    home: &Path,
) -> anyhow::Result<std::process::ExitCode> {
    match cmd {
        EventCommand::Void {
            position,
            reason,
            json,
        } => {
            if reason.trim().is_empty() {
                eprintln!("error: --reason must not be empty (it is kept for audit)");
                return Ok(std::process::ExitCode::from(2));
            }
            let store = connect(nats_url, home).await?;
            let v = match store.void(position, &reason).await {
                Ok(v) => v,
                Err(sluice_events::Error::NoSuchEvent(p)) => {
                    eprintln!("error: no event at position {p}");
                    return Ok(std::process::ExitCode::from(1));
                }
                Err(e) => return Err(e.into()),
            };
            if json {
                println!("{}", json!(v));
            } else {
                println!(
                    "voided position {} ({} on {}): {}; void record at position {}",
                    v.position,
                    v.event_type.as_deref().unwrap_or("no type"),
                    v.stream,
                    v.reason,
                    v.void_position
                );
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}

/// Options of `sluice read`.
#[derive(Debug, clap::Args)]
pub(crate) struct ReadArgs {
    /// The aggregate, as `<category>/<id>`.
    stream: StreamId,
    /// First position to print.
    #[arg(long, default_value_t = 1)]
    from: u64,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

fn event_json(e: &RecordedEvent) -> serde_json::Value {
    let data: serde_json::Value = serde_json::from_slice(&e.envelope.data)
        .unwrap_or_else(|_| json!(String::from_utf8_lossy(&e.envelope.data)));
    json!({
        "position": e.position,
        "stream": e.stream_id.to_string(),
        "id": e.envelope.id.to_string(),
        "type": e.envelope.event_type,
        "source": e.envelope.source,
        "time": e.envelope.time_rfc3339(),
        "correlationid": e.envelope.correlation_id,
        "causationid": e.envelope.causation_id,
        "data": data,
    })
}

fn print_header() {
    println!(
        "{:>10}  {:<24}  {:<32}  {:<24}  DATA",
        "POSITION", "STREAM", "TYPE", "TIME"
    );
}

fn print_row(e: &RecordedEvent) {
    let data = String::from_utf8_lossy(&e.envelope.data);
    let data: String = data.chars().take(60).collect();
    println!(
        "{:>10}  {:<24}  {:<32}  {:<24}  {}",
        e.position,
        e.stream_id.to_string(),
        e.envelope.event_type,
        e.envelope.time_rfc3339().unwrap_or_default(),
        data
    );
}

pub(crate) async fn read(
    args: ReadArgs,
    nats_url: Option<String>,
    home: &Path,
) -> anyhow::Result<()> {
    let store = connect(nats_url, home).await?;
    let mut events = store.read(&args.stream, args.from).await?;
    if !args.json {
        print_header();
    }
    let mut n = 0;
    while let Some(e) = events.next().await {
        let e = e?;
        n += 1;
        if args.json {
            println!("{}", event_json(&e));
        } else {
            print_row(&e);
        }
    }
    if !args.json && n == 0 {
        println!("(no events for {})", args.stream);
    }
    Ok(())
}

/// Options of `sluice tail`.
#[derive(Debug, clap::Args)]
pub(crate) struct TailArgs {
    /// What to follow: `<category>`, `<category>/<id>` or a subject filter
    /// such as `events.account.>` (default: everything).
    #[arg(long)]
    filter: Option<String>,
    /// Start at this position instead of only new events.
    #[arg(long)]
    from: Option<u64>,
    /// Stop after this many events.
    #[arg(long)]
    limit: Option<u64>,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

fn filter_subject(filter: Option<&str>) -> anyhow::Result<String> {
    let Some(f) = filter else {
        return Ok("events.>".to_owned());
    };
    if let Some(rest) = f.strip_prefix("events.") {
        for token in rest.split('.') {
            if token != "*" && token != ">" {
                validate_token("subject token", token)?;
            }
        }
        return Ok(f.to_owned());
    }
    if f.contains('/') {
        let id: StreamId = f.parse()?;
        return Ok(id.subject("events"));
    }
    validate_token("category", f)?;
    Ok(format!("events.{f}.>"))
}

pub(crate) async fn tail(
    args: TailArgs,
    nats_url: Option<String>,
    home: &Path,
) -> anyhow::Result<()> {
    let filter = filter_subject(args.filter.as_deref())?;
    let store = connect(nats_url, home).await?;
    let mut events = store.subscribe(&filter, args.from).await?;
    if !args.json {
        print_header();
    }
    let mut n = 0;
    loop {
        if args.limit.is_some_and(|l| n >= l) {
            return Ok(());
        }
        let next = tokio::select! {
            e = events.next() => e,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        match next {
            None => return Ok(()),
            Some(Ok(e)) => {
                n += 1;
                if args.json {
                    println!("{}", event_json(&e));
                } else {
                    print_row(&e);
                }
            }
            // A message that breaks the contract is shown, not hidden.
            Some(Err(e)) => {
                n += 1;
                eprintln!("warning: undecodable message: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_filters_are_safe_subjects() {
        assert_eq!(filter_subject(None).unwrap(), "events.>");
        assert_eq!(filter_subject(Some("account")).unwrap(), "events.account.>");
        assert_eq!(
            filter_subject(Some("account/a-1")).unwrap(),
            "events.account.a-1"
        );
        assert_eq!(
            filter_subject(Some("events.account.*")).unwrap(),
            "events.account.*"
        );
        assert!(filter_subject(Some("acc ount")).is_err());
        assert!(filter_subject(Some("events.a b.>")).is_err());
    }

    #[test]
    fn expected_versions_parse() {
        assert_eq!(parse_expected("any").unwrap(), ExpectedVersion::Any);
        assert_eq!(parse_expected("none").unwrap(), ExpectedVersion::NoStream);
        assert_eq!(parse_expected("0").unwrap(), ExpectedVersion::NoStream);
        assert_eq!(parse_expected("7").unwrap(), ExpectedVersion::Exact(7));
        assert!(parse_expected("seven").is_err());
    }
}
