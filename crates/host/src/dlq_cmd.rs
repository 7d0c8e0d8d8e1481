//! `sluice dlq ...`: inspect, redrive and discard dead letters, through the
//! `sluice_workers::dlq` library API (the HTTP API reuses the same calls).
//! A projection's dead letter is settled through `sluice_projections`, which
//! also updates the projection's own records and parking in the read store,
//! so `sluice dlq` and `sluice projection dlq` always agree.

use std::path::Path;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use sluice_events::{ConnectConfig, EventStore, StoreConfig};
use sluice_workers::dlq::{self, DeadLetter, Filter, RedriveTarget};

/// `sluice dlq` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum DlqCommand {
    /// List dead letters, oldest first, with counts and oldest age.
    List {
        /// Only this consumer (worker name).
        #[arg(long)]
        consumer: Option<String>,
        /// Only this aggregate category.
        #[arg(long)]
        category: Option<String>,
        /// Only reasons containing this text (case-insensitive).
        #[arg(long)]
        reason: Option<String>,
        /// Print counts and oldest age per consumer and category instead.
        #[arg(long)]
        summary: bool,
    },
    /// Show one dead letter: reason, headers and body.
    Show {
        /// Dead-letter id (its sequence in the DLQ stream).
        id: u64,
    },
    /// Hand dead letters back to the consumer that failed on them (never
    /// re-appends to EVENTS; running it twice hands nothing back twice).
    Redrive {
        /// One dead letter, with everything parked behind it.
        #[arg(required_unless_present = "consumer", conflicts_with = "consumer")]
        id: Option<u64>,
        /// Every dead letter of this consumer, in original order.
        #[arg(long)]
        consumer: Option<String>,
        /// With --consumer: only this aggregate category.
        #[arg(long, requires = "consumer")]
        category: Option<String>,
        /// With --consumer: at most this many.
        #[arg(long, requires = "consumer")]
        limit: Option<usize>,
    },
    /// Delete a dead letter for good; the reason is kept in the audit log.
    Discard {
        /// Dead-letter id.
        id: u64,
        /// Why (required, kept for audit).
        #[arg(long)]
        reason: String,
    },
}

/// Runs one `sluice dlq` command against the server at `nats_url`.
/// `json` prints one JSON object per line instead of a human table. The
/// read store (`database_url`, or the default under `home`) is opened only
/// for a projection's dead letters.
pub(crate) async fn run(
    app: &crate::module::App,
    cmd: DlqCommand,
    nats_url: &str,
    json: bool,
    home: &Path,
    database_url: Option<String>,
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
        DlqCommand::List {
            consumer,
            category,
            reason,
            summary,
        } => {
            let listing = dlq::list(
                &store,
                &Filter {
                    consumer,
                    category,
                    reason,
                },
            )
            .await?;
            if summary {
                if json {
                    for g in &listing.groups {
                        println!("{}", serde_json::to_string(g)?);
                    }
                } else {
                    print_groups(&listing);
                }
            } else if json {
                for e in &listing.entries {
                    println!("{}", summary_json(e));
                }
            } else {
                print_entries(&listing.entries);
                print_groups(&listing);
            }
        }
        DlqCommand::Show { id } => {
            let e = dlq::show(&store, id).await?;
            if json {
                println!("{}", serde_json::to_string(&e)?);
            } else {
                print_entry(&e);
            }
        }
        DlqCommand::Redrive {
            id,
            consumer,
            category,
            limit,
        } => {
            // A projection reads the log, not a redrive subject: its dead
            // letters are applied into it from the log, in order, exactly once.
            let projection = match (id, consumer.as_deref()) {
                (_, Some(c)) => sluice_projections::projection_of(c).map(str::to_owned),
                (Some(id), None) => match dlq::show(&store, id).await {
                    Ok(e) => sluice_projections::projection_of(&e.consumer).map(str::to_owned),
                    Err(_) => None,
                },
                (None, None) => None,
            };
            if let Some(name) = projection {
                let member = app.projection(&name)?.member().clone();
                let side = crate::projection_cmd::connect(
                    app,
                    Some(nats_url.to_owned()),
                    home,
                    database_url,
                )
                .await?;
                let report = match id {
                    Some(id) => {
                        sluice_projections::redrive_dead_letter(
                            member,
                            side.db.clone(),
                            side.store.clone(),
                            id,
                        )
                        .await
                    }
                    None => {
                        sluice_projections::redrive(member, side.db.clone(), side.store.clone())
                            .await
                    }
                };
                side.db.close().await;
                let report = report?;
                if json {
                    println!("{}", serde_json::to_string(&report)?);
                } else {
                    println!(
                        "redriven into projection {name}: applied {} event(s), released {} aggregate(s), {} still dead{}",
                        report.applied.len(),
                        report.released.len(),
                        report.remaining.len(),
                        ids_suffix(&report.redriven)
                    );
                    if !report.already_redriven.is_empty() {
                        println!(
                            "already redriven earlier (nothing applied twice):{}",
                            ids_suffix(&report.already_redriven)
                        );
                    }
                }
                return Ok(ExitCode::SUCCESS);
            }
            let target = match (id, consumer) {
                (Some(id), _) => RedriveTarget::Id(id),
                (None, Some(consumer)) => RedriveTarget::Consumer {
                    consumer,
                    category,
                    limit,
                },
                // clap requires one of the two.
                (None, None) => anyhow::bail!("give a dead-letter id or --consumer"),
            };
            let report = dlq::redrive(&store, target).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "redriven: {} dead letter(s){}",
                    report.redriven.len(),
                    ids_suffix(&report.redriven)
                );
                if !report.already_redriven.is_empty() {
                    println!(
                        "already redriven earlier (nothing handed back twice):{}",
                        ids_suffix(&report.already_redriven)
                    );
                }
            }
        }
        DlqCommand::Discard { id, reason } => {
            let projection = dlq::show(&store, id)
                .await
                .ok()
                .and_then(|e| sluice_projections::projection_of(&e.consumer).map(str::to_owned));
            let e = if projection.is_some() {
                // Its record and parking in the read store go with it.
                let side = crate::projection_cmd::connect(
                    app,
                    Some(nats_url.to_owned()),
                    home,
                    database_url,
                )
                .await?;
                let r = sluice_projections::discard(&side.db, &side.store, id, &reason).await;
                side.db.close().await;
                r?
            } else {
                dlq::discard(&store, id, &reason).await?
            };
            if json {
                println!(
                    "{}",
                    json!({
                        "discarded": e.id,
                        "consumer": e.consumer,
                        "subject": e.subject,
                        "sequence": e.sequence,
                        "reason": reason,
                    })
                );
            } else {
                println!(
                    "discarded {} ({} seq {} for {}); reason kept in the audit log",
                    e.id, e.subject, e.sequence, e.consumer
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn ids_suffix(ids: &[u64]) -> String {
    if ids.is_empty() {
        return String::new();
    }
    let shown: Vec<String> = ids.iter().take(20).map(u64::to_string).collect();
    let more = if ids.len() > 20 { " ..." } else { "" };
    format!(" [{}{more}]", shown.join(", "))
}

fn summary_json(e: &DeadLetter) -> serde_json::Value {
    json!({
        "id": e.id,
        "consumer": e.consumer,
        "category": e.category,
        "subject": e.subject,
        "stream": e.stream,
        "sequence": e.sequence,
        "kind": e.kind,
        "reason": e.reason,
        "deliveries": e.deliveries,
        "failed_at": e.failed_at,
        "parked_behind": e.parked_behind,
        "event_type": e.event_type,
        "event_id": e.event_id,
        "age_secs": e.age().as_secs(),
    })
}

/// `45s`, `3m12s`, `2h05m`, `3d04h`.
fn human_age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

fn print_entries(entries: &[DeadLetter]) {
    if entries.is_empty() {
        println!("no dead letters");
        return;
    }
    println!(
        "{:>8}  {:<20}  {:<28}  {:>10}  {:<9}  {:>7}  REASON",
        "ID", "CONSUMER", "SUBJECT", "SEQ", "KIND", "AGE"
    );
    for e in entries {
        println!(
            "{:>8}  {:<20}  {:<28}  {:>10}  {:<9}  {:>7}  {}",
            e.id,
            clip(&e.consumer, 20),
            clip(&e.subject, 28),
            e.sequence,
            e.kind,
            human_age(e.age()),
            clip(&e.reason, 80)
        );
    }
}

fn print_groups(listing: &dlq::Listing) {
    println!();
    println!(
        "{} dead letter(s){}",
        listing.count(),
        listing
            .oldest_age()
            .map(|a| format!(", oldest {}", human_age(a)))
            .unwrap_or_default()
    );
    for g in &listing.groups {
        println!(
            "  {:<20}  {:<20}  {:>6}  oldest {}",
            g.consumer,
            g.category,
            g.count,
            human_age(Duration::from_secs(g.oldest_age_secs))
        );
    }
}

fn print_entry(e: &DeadLetter) {
    println!("id:          {}", e.id);
    println!("consumer:    {}", e.consumer);
    println!("subject:     {}", e.subject);
    println!("stream:      {} seq {}", e.stream, e.sequence);
    println!("kind:        {}", e.kind);
    println!("reason:      {}", e.reason);
    println!("deliveries:  {}", e.deliveries);
    println!("failed at:   {} ({} ago)", e.failed_at, human_age(e.age()));
    if let Some(head) = e.parked_behind {
        println!("parked behind stream seq {head}");
    }
    println!("headers:");
    for (name, values) in &e.headers {
        for v in values {
            println!("  {name}: {v}");
        }
    }
    println!("body:");
    match serde_json::from_slice::<serde_json::Value>(&e.body) {
        Ok(v) => println!(
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string())
        ),
        Err(_) => println!("{}", String::from_utf8_lossy(&e.body)),
    }
}
