//! The read side from the command line as library calls: what `query`
//! and `projection list|rebuild|reset|dlq` and `replay` print, over the
//! projections of an [`App`]'s modules. Output goes to the writer given;
//! progress of a rebuild goes to `progress` (stderr in the binary).

use std::io::Write;

use sluice_events::EventStore;
use sluice_projections::{Database, Member, RebuildProgress, RunnerConfig, projection_status};
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::module::App;

/// The event log and the read store of an app: what the read-side
/// commands work on.
#[derive(Debug, Clone)]
pub struct ReadSide {
    /// The app whose projections these are.
    pub app: App,
    /// The event log.
    pub store: EventStore,
    /// The read store (migrated).
    pub db: Database,
}

/// `value` as one line of JSON (the `--json` output of every command here).
fn json_line(out: &mut (dyn Write + Send), value: &impl serde::Serialize) -> Result<(), Error> {
    writeln!(
        out,
        "{}",
        serde_json::to_string(value).unwrap_or_else(|_| "{}".to_owned())
    )?;
    Ok(())
}

impl ReadSide {
    /// Opens the read store at `database_url` with every module's
    /// migrations applied.
    pub async fn open(app: App, store: EventStore, database_url: &str) -> Result<Self, Error> {
        let db = app.open_read_store(database_url).await?;
        Ok(Self { app, store, db })
    }

    fn member(&self, name: &str) -> Result<Member, Error> {
        Ok(self.app.projection(name)?.member)
    }
}

/// `query <projection> [<key>] [--after <key>] [--json]`: one row,
/// or a page of `limit` rows after the cursor `after` (JSON: one object per
/// line).
pub async fn query(
    side: &ReadSide,
    projection: &str,
    key: Option<&str>,
    after: Option<&str>,
    limit: u32,
    json: bool,
    out: &mut (dyn Write + Send),
) -> Result<(), Error> {
    let model = side.app.projection(projection)?.read_model;
    let mut conn = side
        .db
        .pool()
        .acquire()
        .await
        .map_err(sluice_projections::Error::from)?;
    let mut next = None;
    let rows = match key {
        Some(k) => match model
            .get(&mut conn, k)
            .await
            .map_err(sluice_projections::Error::from)?
        {
            Some(row) => vec![row],
            None => {
                return Err(Error::NotFound {
                    projection: projection.to_owned(),
                    key: k.to_owned(),
                });
            }
        },
        None => {
            let page = model
                .list(&mut conn, after, limit.clamp(1, 10_000))
                .await
                .map_err(sluice_projections::Error::from)?;
            next = page.next;
            page.rows
        }
    };
    if json {
        for row in rows {
            writeln!(out, "{row}")?;
        }
    } else {
        for row in rows {
            let fields: Vec<String> = row
                .as_object()
                .map(|o| o.iter().map(|(k, v)| format!("{k}={v}")).collect())
                .unwrap_or_default();
            writeln!(out, "{}", fields.join("  "))?;
        }
        if let Some(next) = next {
            writeln!(out, "(more: --after {next})")?;
        }
    }
    Ok(())
}

/// `projection list [--json]` (JSON: one object per line).
pub async fn list(side: &ReadSide, json: bool, out: &mut (dyn Write + Send)) -> Result<(), Error> {
    let mut all = Vec::new();
    for p in side.app.projections() {
        all.push(projection_status(&side.db, &side.store, p.name(), None).await?);
    }
    if json {
        for s in &all {
            json_line(out, s)?;
        }
        return Ok(());
    }
    writeln!(
        out,
        "{:<18} {:<10} {:>10} {:>10} {:>10} {:>8} {:>6}",
        "PROJECTION", "STATE", "CHECKPOINT", "LAG", "LAG (s)", "DEAD", "PARKED"
    )?;
    for s in all {
        let state = serde_json::to_value(s.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        writeln!(
            out,
            "{:<18} {:<10} {:>10} {:>10} {:>10.1} {:>8} {:>6}",
            s.name,
            state,
            s.checkpoint,
            s.lag_events,
            s.lag_seconds,
            s.dead_letters,
            s.parked_aggregates
        )?;
        if let Some(h) = s.halted {
            writeln!(out, "  halted at {}: {}", h.position, h.reason)?;
        }
    }
    Ok(())
}

/// `projection rebuild <name>`: blue/green, resumable; a progress
/// line (position/target, events/s, ETA) per report on `progress`. Returns
/// `false` when `shutdown` interrupted it (run again to resume).
pub async fn rebuild(
    side: &ReadSide,
    name: &str,
    progress: &mut (dyn Write + Send),
    shutdown: CancellationToken,
) -> Result<bool, Error> {
    rebuild_together(side, &[name], progress, shutdown).await
}

/// `projection rebuild <name>...`: several projections rebuilt with
/// one feed and switched in one transaction (e.g. the members of one projection group), so they go live
/// consistent with each other. Otherwise as [`rebuild`].
pub async fn rebuild_together(
    side: &ReadSide,
    names: &[&str],
    progress: &mut (dyn Write + Send),
    shutdown: CancellationToken,
) -> Result<bool, Error> {
    let mut members: Vec<Member> = Vec::with_capacity(names.len());
    for name in names {
        let m = side.member(name)?;
        if members.iter().all(|x| x.name() != m.name()) {
            members.push(m);
        }
    }
    let label = members
        .iter()
        .map(Member::name)
        .collect::<Vec<_>>()
        .join(",");
    let done = sluice_projections::rebuild_group(
        members,
        side.db.clone(),
        side.store.clone(),
        RunnerConfig::default(),
        |p: &RebuildProgress| {
            let pct = if p.target == 0 {
                100.0
            } else {
                100.0 * p.position as f64 / p.target as f64
            };
            let eta = p
                .eta_seconds
                .map_or_else(|| "?".to_owned(), |s| format!("{s:.0}s"));
            let _ = write!(
                progress,
                "\r{} {:>5.1}% {}/{}  {:.0} events/s  ETA {eta}   ",
                p.projection, pct, p.position, p.target, p.events_per_second
            );
            let _ = progress.flush();
        },
        shutdown,
    )
    .await?;
    match &done {
        Some(r) => writeln!(
            progress,
            "\n{label}: switched to the rebuilt tables at position {} ({:.0} events/s)",
            r.position, r.events_per_second
        )?,
        None => writeln!(progress, "\n{label}: interrupted; run it again to resume")?,
    }
    Ok(done.is_some())
}

/// `projection reset <name> --yes`: empty the tables and replay
/// from position 1 (a running projector follows at once).
pub async fn reset(side: &ReadSide, name: &str, confirmed: bool) -> Result<(), Error> {
    if !confirmed {
        return Err(Error::NotConfirmed(
            "reset empties the read model until it has replayed the log; pass --yes to confirm (or rebuild the projection instead, to stay online)",
        ));
    }
    sluice_projections::reset_member(&side.db, &side.member(name)?).await?;
    Ok(())
}

/// `replay --projection <name> --from <seq>`: undo the events from
/// `from` on and let the projector apply them again (exactly: refused for a
/// projection that cannot undo exactly).
pub async fn replay(
    side: &ReadSide,
    name: &str,
    from: u64,
    json: bool,
    out: &mut (dyn Write + Send),
) -> Result<(), Error> {
    let report = sluice_projections::replay(
        side.member(name)?,
        side.db.clone(),
        side.store.clone(),
        from,
    )
    .await?;
    if json {
        json_line(out, &report)?;
    } else {
        writeln!(
            out,
            "{name}: rewound to position {} (was {}); the projector applies {}..={} again{}",
            from - 1,
            report.previous_checkpoint,
            from,
            report.previous_checkpoint,
            if report.aggregates_refolded > 0 {
                format!(
                    " ({} aggregate(s) re-folded from their earlier events)",
                    report.aggregates_refolded
                )
            } else {
                String::new()
            }
        )?;
    }
    Ok(())
}

/// `projection dlq <name> list`: the events a projection did not
/// apply, oldest first.
pub async fn dead_letters(
    side: &ReadSide,
    name: &str,
    json: bool,
    out: &mut (dyn Write + Send),
) -> Result<(), Error> {
    let name = side.member(name)?.name();
    let records = sluice_projections::dead_letters(&side.db, name).await?;
    if json {
        for r in &records {
            json_line(out, r)?;
        }
        return Ok(());
    }
    if records.is_empty() {
        writeln!(out, "{name}: no dead letters")?;
        return Ok(());
    }
    writeln!(
        out,
        "{:>10}  {:<28}  {:<8}  REASON",
        "POSITION", "STREAM", "KIND"
    )?;
    for r in &records {
        writeln!(
            out,
            "{:>10}  {:<28}  {:<8}  {}",
            r.position, r.stream, r.kind, r.reason
        )?;
    }
    Ok(())
}

/// `projection dlq <name> redrive`: apply its dead letters now that
/// the cause is fixed, in order per aggregate, exactly once.
pub async fn redrive(
    side: &ReadSide,
    name: &str,
    json: bool,
    out: &mut (dyn Write + Send),
) -> Result<(), Error> {
    let report =
        sluice_projections::redrive(side.member(name)?, side.db.clone(), side.store.clone())
            .await?;
    if json {
        json_line(out, &report)?;
        return Ok(());
    }
    writeln!(
        out,
        "{name}: applied {} dead letter(s), released {} aggregate(s), {} still dead",
        report.applied.len(),
        report.released.len(),
        report.remaining.len()
    )?;
    for r in &report.remaining {
        writeln!(
            out,
            "  {} {} {}: {}",
            r.position, r.stream, r.kind, r.reason
        )?;
    }
    Ok(())
}
