//! "One row per instance" projections: a state machine over an aggregate's
//! events (a saga's, typically) into a row `key, data..., state, reason,
//! <created_at>, updated_at, version`, and the event time every row shows.

use serde_json::Value;
use sqlx::AnyConnection;
use time::format_description::well_known::Rfc3339;

use crate::{ProjectedEvent, Rejection, Tables};

impl ProjectedEvent {
    /// When the event happened, as RFC 3339: its envelope's time, or when
    /// the server stored it if it has none.
    pub fn time_rfc3339(&self) -> String {
        let at = self.envelope.time.unwrap_or(self.appended_at);
        at.format(&Rfc3339).unwrap_or_default()
    }
}

/// What one event does to its instance's row (for [`StateRows::apply`]).
#[derive(Debug, Clone, PartialEq)]
pub enum RowChange {
    /// The instance starts: its row, with the values of
    /// [`StateRows::data`]'s columns in order (strings as text, integers as
    /// `BIGINT`, `null` as `NULL`, anything else as JSON text), in the
    /// initial state. A row that exists already is kept.
    Insert(Vec<Value>),
    /// A transition: the new state and the reason, where they change
    /// (`None` keeps the row's). `updated_at` and `version` move with it,
    /// unless the row is in a final state.
    Update(Option<&'static str>, Option<String>),
    /// Nothing to write.
    Unchanged,
}

/// A table of one row per instance (keyed by the aggregate's id), moved by
/// a state machine: the write side of projections such as "transfers" or
/// "orders". Once a row is in one of the `finals`, it stays as it is.
///
/// ```
/// use sluice_projections::StateRows;
///
/// static ORDERS: StateRows = StateRows {
///     table: "orders",
///     key: "id",
///     data: &["customer"],
///     created_at: "placed_at",
///     initial: "placed",
///     finals: &["confirmed", "cancelled"],
/// };
/// // In `Projection::apply`, with a pure `decide(&ProjectedEvent)`
/// // returning e.g. `RowChange::Insert(vec![json!("ann")])` for a start:
/// // ORDERS.apply(conn, tables, events, decide).await
/// assert_eq!(
///     ORDERS.insert_sql("orders"),
///     "INSERT INTO orders (id, customer, state, reason, placed_at, updated_at, version) \
///      VALUES ($1, $2, $3, NULL, $4, $4, $5) ON CONFLICT (id) DO NOTHING"
/// );
/// ```
#[derive(Debug, Clone, Copy)]
pub struct StateRows {
    /// The (live) table; writes go to `tables.name(table)`.
    pub table: &'static str,
    /// The key column (the aggregate's id).
    pub key: &'static str,
    /// The columns an [`RowChange::Insert`] sets, after the key.
    pub data: &'static [&'static str],
    /// The column holding the time the row was inserted.
    pub created_at: &'static str,
    /// The state a row starts in.
    pub initial: &'static str,
    /// The states a row never leaves (SQL literals: constants only).
    pub finals: &'static [&'static str],
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

fn bind_value(q: AnyQuery<'_>, v: Value) -> AnyQuery<'_> {
    match v {
        Value::String(s) => q.bind(s),
        Value::Number(n) => match n.as_i64() {
            Some(i) => q.bind(i),
            None => q.bind(n.as_f64()),
        },
        Value::Bool(b) => q.bind(b),
        Value::Null => q.bind(None::<String>),
        other => q.bind(other.to_string()),
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl StateRows {
    /// The insert of a starting instance into `table` (its physical name).
    pub fn insert_sql(&self, table: &str) -> String {
        let n = self.data.len();
        let params: Vec<String> = (2..n + 2).map(|i| format!("${i}")).collect();
        format!(
            "INSERT INTO {table} ({key}, {data}, state, reason, {created}, updated_at, version) \
             VALUES ($1, {params}, ${s}, NULL, ${t}, ${t}, ${v}) ON CONFLICT ({key}) DO NOTHING",
            key = self.key,
            data = self.data.join(", "),
            created = self.created_at,
            params = params.join(", "),
            s = n + 2,
            t = n + 3,
            v = n + 4,
        )
    }

    fn update_sql(&self, table: &str) -> String {
        let finals: Vec<String> = self.finals.iter().map(|s| format!("'{s}'")).collect();
        format!(
            "UPDATE {table} SET state = COALESCE($1, state), reason = COALESCE($2, reason), \
             updated_at = $3, version = $4 WHERE {} = $5 AND state NOT IN ({})",
            self.key,
            finals.join(", ")
        )
    }

    /// Applies a batch (a [`Projection::apply`](crate::Projection::apply)):
    /// `change` says what each event does, or why it is rejected; if any is,
    /// nothing is written and the rejections are returned. Row at a time:
    /// an instance has a handful of events, most of which change little.
    pub async fn apply(
        &self,
        conn: &mut AnyConnection,
        tables: &Tables,
        events: &[ProjectedEvent],
        change: impl Fn(&ProjectedEvent) -> Result<RowChange, String>,
    ) -> Result<Vec<Rejection>, sqlx::Error> {
        let (mut changes, mut rejected) = (Vec::with_capacity(events.len()), Vec::new());
        for e in events {
            match change(e) {
                Ok(c) => changes.push((e, c)),
                Err(reason) => rejected.push(Rejection::new(e.position, reason)),
            }
        }
        if !rejected.is_empty() {
            return Ok(rejected);
        }
        let table = tables.name(self.table);
        let (insert, update) = (self.insert_sql(&table), self.update_sql(&table));
        for (e, change) in changes {
            let (at, position) = (e.time_rfc3339(), to_i64(e.position));
            let q = match change {
                RowChange::Insert(values) => {
                    let q = sqlx::query(&insert).bind(e.stream_id.id());
                    let q = values.into_iter().fold(q, bind_value);
                    q.bind(self.initial).bind(at).bind(position)
                }
                RowChange::Update(state, reason) => sqlx::query(&update)
                    .bind(state)
                    .bind(reason)
                    .bind(at)
                    .bind(position)
                    .bind(e.stream_id.id()),
                RowChange::Unchanged => continue,
            };
            q.execute(&mut *conn).await?;
        }
        Ok(Vec::new())
    }
}
