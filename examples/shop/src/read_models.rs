//! The shop's read models on the projection runtime (each event takes
//! effect exactly once):
//! - `stock_levels`: one row per SKU (available, reserved, sold), the sum
//!   of its events' deltas, folded per batch;
//! - `orders`: one row per order saga (customer, lines, state, reason),
//!   moved by [`order_transition`].

use std::collections::BTreeMap;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::{Value, json};
use sluice_events::StreamId;
use sluice_projections::{Page, ProjectedEvent, Projection, ReadModel, Rejection, Tables};
use sluice_sagas::{STARTED, SagaEvent};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};
use time::format_description::well_known::Rfc3339;

use crate::order::{Order, order_transition};
use crate::stock::{STOCK_CATEGORY, StockEvent};

/// Name (checkpoint key and table) of the stock levels projection.
pub const STOCK_LEVELS: &str = "stock_levels";
/// Name (checkpoint key and table) of the orders projection.
pub const ORDERS: &str = "orders";
/// The saga stream category `orders` reads (`saga-` + the saga's name).
const ORDER_STREAMS: &str = "saga-order";

/// One SKU's row change over a batch: deltas of (available, reserved,
/// sold), and the position and time of its last event.
type LevelDelta = ((i64, i64, i64), u64, String);

/// Sums `(sku, position, time, event)` (log order) into one delta per SKU.
/// Pure: the counts are sums, so any batching gives the same rows.
fn level_deltas<'a>(
    events: impl IntoIterator<Item = (&'a str, u64, String, StockEvent)>,
) -> BTreeMap<&'a str, LevelDelta> {
    let mut out: BTreeMap<&str, LevelDelta> = BTreeMap::new();
    for (sku, position, time, event) in events {
        let ((a, r, s), version, at) = out.entry(sku).or_default();
        let (da, dr, ds) = event.deltas();
        (*a, *r, *s) = (
            a.saturating_add(da),
            r.saturating_add(dr),
            s.saturating_add(ds),
        );
        (*version, *at) = (position, time);
    }
    out
}

fn time_of(e: &ProjectedEvent) -> String {
    let at = e.envelope.time.unwrap_or(e.appended_at);
    at.format(&Rfc3339).unwrap_or_default()
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// `stock_levels`: one row per SKU.
#[derive(Debug, Clone, Copy, Default)]
pub struct StockLevels;

impl Projection for StockLevels {
    fn name(&self) -> &'static str {
        STOCK_LEVELS
    }

    fn categories(&self) -> &'static [&'static str] {
        &[STOCK_CATEGORY]
    }

    fn tables(&self) -> &'static [&'static str] {
        &[STOCK_LEVELS]
    }

    async fn apply(
        &self,
        conn: &mut AnyConnection,
        tables: &Tables,
        events: &[ProjectedEvent],
    ) -> Result<Vec<Rejection>, sqlx::Error> {
        let (mut decoded, mut rejected) = (Vec::with_capacity(events.len()), Vec::new());
        for e in events {
            match StockEvent::decode(&e.envelope.event_type, &e.envelope.data) {
                Ok(ev) => decoded.push((e.stream_id.id(), e.position, time_of(e), ev)),
                Err(reason) => rejected.push(Rejection::new(e.position, reason)),
            }
        }
        if !rejected.is_empty() {
            return Ok(rejected);
        }
        let t = tables.name(STOCK_LEVELS);
        let sql = format!(
            "INSERT INTO {t} (sku, available, reserved, sold, version, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (sku) DO UPDATE SET \
             available = {t}.available + excluded.available, \
             reserved = {t}.reserved + excluded.reserved, sold = {t}.sold + excluded.sold, \
             version = excluded.version, updated_at = excluded.updated_at"
        );
        for (sku, ((available, reserved, sold), version, at)) in level_deltas(decoded) {
            sqlx::query(&sql)
                .bind(sku)
                .bind(available)
                .bind(reserved)
                .bind(sold)
                .bind(to_i64(version))
                .bind(at)
                .execute(&mut *conn)
                .await?;
        }
        Ok(Vec::new())
    }
}

/// `orders`: one row per order saga.
#[derive(Debug, Clone, Copy, Default)]
pub struct Orders;

enum Change {
    Place(Order),
    Move(Option<&'static str>, Option<String>),
}

fn decode_change(e: &ProjectedEvent) -> Result<Change, String> {
    if e.envelope.event_type == STARTED {
        let v: Value = serde_json::from_slice(&e.envelope.data)
            .map_err(|err| format!("malformed {STARTED} data: {err}"))?;
        let order = serde_json::from_value(v["data"].clone())
            .map_err(|err| format!("malformed order data: {err}"))?;
        return Ok(Change::Place(order));
    }
    let event: SagaEvent = serde_json::from_slice(&e.envelope.data)
        .map_err(|err| format!("malformed saga event: {err}"))?;
    let (state, reason) = order_transition(&event);
    Ok(Change::Move(state, reason))
}

impl Projection for Orders {
    fn name(&self) -> &'static str {
        ORDERS
    }

    fn categories(&self) -> &'static [&'static str] {
        &[ORDER_STREAMS]
    }

    fn tables(&self) -> &'static [&'static str] {
        &[ORDERS]
    }

    async fn apply(
        &self,
        conn: &mut AnyConnection,
        tables: &Tables,
        events: &[ProjectedEvent],
    ) -> Result<Vec<Rejection>, sqlx::Error> {
        let (mut changes, mut rejected) = (Vec::with_capacity(events.len()), Vec::new());
        for e in events {
            match decode_change(e) {
                Ok(c) => changes.push((e, c)),
                Err(reason) => rejected.push(Rejection::new(e.position, reason)),
            }
        }
        if !rejected.is_empty() {
            return Ok(rejected);
        }
        let t = tables.name(ORDERS);
        let insert = format!(
            "INSERT INTO {t} (id, customer, lines, state, reason, placed_at, updated_at, version) \
             VALUES ($1, $2, $3, 'placed', NULL, $4, $4, $5) ON CONFLICT (id) DO NOTHING"
        );
        // A confirmed or cancelled order stays so (`react` ignores whatever
        // arrives after an end).
        let update = format!(
            "UPDATE {t} SET state = COALESCE($1, state), reason = COALESCE($2, reason), \
             updated_at = $3, version = $4 \
             WHERE id = $5 AND state NOT IN ('confirmed', 'cancelled')"
        );
        // Row at a time: an order has a few dozen saga events, most of
        // which change nothing here.
        for (e, change) in changes {
            let (at, position) = (time_of(e), to_i64(e.position));
            let q = match change {
                Change::Place(o) => sqlx::query(&insert)
                    .bind(o.id)
                    .bind(o.customer)
                    .bind(serde_json::to_string(&o.lines).unwrap_or_default())
                    .bind(at)
                    .bind(position),
                Change::Move(None, None) => continue,
                Change::Move(state, reason) => sqlx::query(&update)
                    .bind(state)
                    .bind(reason)
                    .bind(at)
                    .bind(position)
                    .bind(e.stream_id.id()),
            };
            q.execute(&mut *conn).await?;
        }
        Ok(Vec::new())
    }
}

/// The query side of a table keyed by one text column: `get` by key,
/// `list` in key order, rows as JSON.
struct Keyed {
    name: &'static str,
    key: &'static str,
    columns: &'static str,
    /// The aggregate category a key is an id of (stale-row reports).
    category: &'static str,
    to_json: fn(&AnyRow) -> Result<Value, sqlx::Error>,
}

impl ReadModel for Keyed {
    fn name(&self) -> &'static str {
        self.name
    }

    fn stream_of(&self, key: &str) -> Option<StreamId> {
        StreamId::new(self.category, key).ok()
    }

    fn get<'a>(
        &'a self,
        conn: &'a mut AnyConnection,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Value>, sqlx::Error>> {
        let (c, t, k) = (self.columns, self.name, self.key);
        async move {
            let sql = format!("SELECT {c} FROM {t} WHERE {k} = $1");
            let row = sqlx::query(&sql).bind(key).fetch_optional(conn).await?;
            row.as_ref().map(self.to_json).transpose()
        }
        .boxed()
    }

    fn list<'a>(
        &'a self,
        conn: &'a mut AnyConnection,
        after: Option<&'a str>,
        limit: u32,
    ) -> BoxFuture<'a, Result<Page, sqlx::Error>> {
        let (c, t, k) = (self.columns, self.name, self.key);
        async move {
            let sql = format!("SELECT {c} FROM {t} WHERE {k} > $1 ORDER BY {k} LIMIT $2");
            let rows = sqlx::query(&sql)
                .bind(after.unwrap_or(""))
                .bind(i64::from(limit))
                .fetch_all(conn)
                .await?;
            let rows = rows
                .iter()
                .map(self.to_json)
                .collect::<Result<Vec<_>, _>>()?;
            let next = (rows.len() == limit as usize)
                .then(|| rows.last().and_then(|r| r[k].as_str().map(str::to_owned)))
                .flatten();
            Ok(Page { rows, next })
        }
        .boxed()
    }
}

/// `stock_levels` rows: `{sku, available, reserved, sold, version, updated_at}`.
static LEVEL_ROWS: Keyed = Keyed {
    name: STOCK_LEVELS,
    key: "sku",
    columns: "sku, available, reserved, sold, version, updated_at",
    category: STOCK_CATEGORY,
    to_json: |r| {
        Ok(json!({
            "sku": r.try_get::<String, _>(0)?,
            "available": r.try_get::<i64, _>(1)?,
            "reserved": r.try_get::<i64, _>(2)?,
            "sold": r.try_get::<i64, _>(3)?,
            "version": r.try_get::<i64, _>(4)?,
            "updated_at": r.try_get::<String, _>(5)?,
        }))
    },
};

/// `orders` rows: `{id, customer, lines, state, reason, placed_at,
/// updated_at, version}`.
static ORDER_ROWS: Keyed = Keyed {
    name: ORDERS,
    key: "id",
    columns: "id, customer, lines, state, reason, placed_at, updated_at, version",
    category: ORDER_STREAMS,
    to_json: |r| {
        let lines: String = r.try_get(2)?;
        Ok(json!({
            "id": r.try_get::<String, _>(0)?,
            "customer": r.try_get::<String, _>(1)?,
            "lines": serde_json::from_str::<Value>(&lines).unwrap_or(Value::Null),
            "state": r.try_get::<String, _>(3)?,
            "reason": r.try_get::<Option<String>, _>(4)?,
            "placed_at": r.try_get::<String, _>(5)?,
            "updated_at": r.try_get::<String, _>(6)?,
            "version": r.try_get::<i64, _>(7)?,
        }))
    },
};

/// A projection's query side: its [`Keyed`] rows.
macro_rules! rows_of {
    ($projection:ty, $rows:expr) => {
        impl ReadModel for $projection {
            fn name(&self) -> &'static str {
                $rows.name
            }

            fn stream_of(&self, key: &str) -> Option<StreamId> {
                $rows.stream_of(key)
            }

            fn get<'a>(
                &'a self,
                conn: &'a mut AnyConnection,
                key: &'a str,
            ) -> BoxFuture<'a, Result<Option<Value>, sqlx::Error>> {
                $rows.get(conn, key)
            }

            fn list<'a>(
                &'a self,
                conn: &'a mut AnyConnection,
                after: Option<&'a str>,
                limit: u32,
            ) -> BoxFuture<'a, Result<Page, sqlx::Error>> {
                $rows.list(conn, after, limit)
            }
        }
    };
}

rows_of!(StockLevels, LEVEL_ROWS);
rows_of!(Orders, ORDER_ROWS);

// The category is `saga-` + the saga's name; keep them in step.
const _: () = {
    let (a, p, n) = (
        ORDER_STREAMS.as_bytes(),
        b"saga-",
        crate::ORDER_SAGA.as_bytes(),
    );
    assert!(a.len() == p.len() + n.len());
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_sums_of_deltas_whatever_the_batches() {
        let order = || "o-1".to_owned();
        let events = [
            ("apple", 1, StockEvent::Received { quantity: 5 }),
            ("pear", 2, StockEvent::Received { quantity: 1 }),
            (
                "apple",
                3,
                StockEvent::Reserved {
                    order: order(),
                    quantity: 4,
                },
            ),
            (
                "apple",
                4,
                StockEvent::Released {
                    order: order(),
                    quantity: 1,
                },
            ),
            (
                "apple",
                5,
                StockEvent::Sold {
                    order: order(),
                    quantity: 3,
                },
            ),
        ];
        let input = |range: std::ops::Range<usize>| {
            events[range]
                .iter()
                .map(|(s, p, e)| (*s, *p, format!("t{p}"), e.clone()))
                .collect::<Vec<_>>()
        };
        let all = level_deltas(input(0..5));
        assert_eq!(all["apple"], ((2, 0, 3), 5, "t5".to_owned()));
        assert_eq!(all["pear"].0, (1, 0, 0));
        // Two batches add up to the same counts.
        let (a, b) = (level_deltas(input(0..3)), level_deltas(input(3..5)));
        let (x, y) = (a["apple"].0, b["apple"].0);
        assert_eq!((x.0 + y.0, x.1 + y.1, x.2 + y.2), (2, 0, 3));
    }
}
