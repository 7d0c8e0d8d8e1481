//! What a projection is: a constant name, the categories it reads, and a
//! batch handler that writes inside the runtime's transaction.

use std::future::Future;

use futures::future::BoxFuture;
use sluice_events::{Envelope, StreamId};
use sqlx::AnyConnection;
use time::OffsetDateTime;

/// One event handed to a projection: decoded, of one of its categories,
/// not parked.
#[derive(Debug, Clone)]
pub struct ProjectedEvent {
    /// The aggregate (`events.<category>.<id>`).
    pub stream_id: StreamId,
    /// Its stream sequence (global position).
    pub position: u64,
    /// The decoded CloudEvents envelope.
    pub envelope: Envelope,
    /// When the server stored it.
    pub appended_at: OffsetDateTime,
}

/// A projection's verdict that one event makes no sense for its read model
/// (a permanent failure: retrying cannot help).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Stream sequence of the rejected event.
    pub position: u64,
    /// Why, for the dead letter and the status (no secrets, no internals).
    pub reason: String,
}

impl Rejection {
    /// A rejection of the event at `position`.
    pub fn new(position: u64, reason: impl Into<String>) -> Self {
        Self {
            position,
            reason: reason.into(),
        }
    }
}

/// A read model fed by the log.
///
/// The runtime calls [`apply`](Projection::apply) with a batch of events in
/// log order inside one transaction that also advances the checkpoint, so
/// each event takes effect exactly once. The handler either applies every
/// event of the batch, or returns the ones it rejects: the runtime then rolls
/// the transaction back, dead-letters (or halts on) the rejected events,
/// holds back later events of the same aggregates, and calls it again with
/// the rest. A database error from the handler is treated as transient: the
/// batch is retried with backoff, never skipped.
pub trait Projection: Send + Sync + 'static {
    /// The constant name; also the checkpoint key. Renaming it rebuilds the
    /// read model from position 1.
    fn name(&self) -> &'static str;

    /// The event categories (`events.<category>.>`) it reads; events of other
    /// categories only move its checkpoint.
    fn categories(&self) -> &'static [&'static str];

    /// The tables it writes (their schema lives in migrations). A rebuild
    /// builds copies of them and swaps them in; [`Tables::name`] gives the
    /// physical name to write to.
    fn tables(&self) -> &'static [&'static str];

    /// Applies a batch in log order, or returns the events it rejects
    /// (writing nothing that must survive: the transaction is rolled back).
    /// Writes go to `tables.name(<table>)`, never to a fixed name.
    fn apply<'c>(
        &'c self,
        conn: &'c mut AnyConnection,
        tables: &'c Tables,
        events: &'c [ProjectedEvent],
    ) -> impl Future<Output = Result<Vec<Rejection>, sqlx::Error>> + Send + 'c;

    /// Whether, and how, [`rewind`](Projection::rewind) can remove exactly
    /// the effects of the events from a position on (what `sluice replay`
    /// needs). The default: it cannot, and replay refuses.
    fn rewind_support(&self) -> RewindSupport {
        RewindSupport::Unsupported
    }

    /// Removes effects from the read model, inside the transaction that also
    /// moves the checkpoint back to `from - 1`. With
    /// [`RewindSupport::ByPosition`]: exactly the effects of the events at
    /// positions `>= from`. With [`RewindSupport::ByAggregate`]: every row of
    /// `aggregates` (the ones with events `>= from`); the runtime then
    /// re-applies their events before `from`. Writes go to
    /// `tables.name(<table>)`.
    fn rewind<'c>(
        &'c self,
        conn: &'c mut AnyConnection,
        tables: &'c Tables,
        from: u64,
        aggregates: &'c [StreamId],
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send + 'c {
        let _ = (conn, tables, from, aggregates);
        async { Ok(()) }
    }
}

/// How a projection can undo the events from a position on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewindSupport {
    /// It cannot undo exactly (e.g. rows that accumulate with no way to
    /// tell which events touched them): only a rebuild from position 1 helps.
    Unsupported,
    /// Each event's effect is identifiable by its position (e.g. one row per
    /// event): `rewind` deletes the effects of positions `>= from`.
    ByPosition,
    /// Rows are per aggregate: `rewind` deletes the rows of the aggregates
    /// given, and the runtime re-applies their earlier events (the fold of
    /// an aggregate depends on nothing else).
    ByAggregate,
}

/// Suffix of the tables a rebuild writes before they replace the live ones.
pub const REBUILD_SUFFIX: &str = "__rebuild";

/// Which physical tables a batch is written to: the live ones, or the copies
/// a blue/green rebuild is building.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tables {
    rebuild: bool,
}

impl Tables {
    /// The live tables.
    pub const LIVE: Self = Self { rebuild: false };
    /// The tables of a rebuild in progress.
    pub const REBUILD: Self = Self { rebuild: true };

    /// The physical name of `table`.
    pub fn name(&self, table: &str) -> String {
        if self.rebuild {
            format!("{table}{REBUILD_SUFFIX}")
        } else {
            table.to_owned()
        }
    }
}

/// One page of rows of a read model.
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// The rows, as JSON objects, in key order.
    pub rows: Vec<serde_json::Value>,
    /// Cursor of the next page (the last row's key), when there may be more.
    pub next: Option<String>,
}

/// The query side of a projection, for the HTTP API and the CLI.
/// Object-safe, so one registry serves every projection.
pub trait ReadModel: Send + Sync + 'static {
    /// The projection's name (the checkpoint key).
    fn name(&self) -> &'static str;

    /// One row by key, as a JSON object.
    fn get<'a>(
        &'a self,
        conn: &'a mut AnyConnection,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<serde_json::Value>, sqlx::Error>>;

    /// The aggregate a row's `key` is folded from, when rows are per
    /// aggregate: lets a query say the row is stale because that aggregate
    /// is parked behind a dead letter. Default: none.
    fn stream_of(&self, key: &str) -> Option<StreamId> {
        let _ = key;
        None
    }

    /// Up to `limit` rows with keys after `after`, in key order.
    fn list<'a>(
        &'a self,
        conn: &'a mut AnyConnection,
        after: Option<&'a str>,
        limit: u32,
    ) -> BoxFuture<'a, Result<Page, sqlx::Error>>;
}
