//! The query side of a table keyed by one column, described once: `get`
//! by key, `list` in key order with cursor paging, rows as JSON objects with
//! typed fields, and the by-aggregate rewind of rows keyed by aggregate id.

use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::{Map, Value};
use sluice_events::StreamId;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use crate::{Page, Projection, ReadModel, Tables};

/// How a column is read into its JSON field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ColumnType {
    /// `TEXT NOT NULL`: a string.
    Text,
    /// Nullable `TEXT`: a string or `null`.
    OptionalText,
    /// `BIGINT NOT NULL`: a number.
    Int,
    /// Nullable `BIGINT`: a number or `null`.
    OptionalInt,
    /// `TEXT` holding JSON: the parsed value (`null` when it does not parse).
    Json,
}

/// One column of a [`KeyedTable`] and the JSON field it becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    /// The SQL column.
    pub name: &'static str,
    /// The JSON field (the column's name unless [`Column::as_field`]).
    pub field: &'static str,
    /// How it is read.
    pub kind: ColumnType,
}

impl Column {
    /// A column of `kind`, shown under its own name.
    pub const fn new(name: &'static str, kind: ColumnType) -> Self {
        Self {
            name,
            field: name,
            kind,
        }
    }

    /// A [`ColumnType::Text`] column.
    pub const fn text(name: &'static str) -> Self {
        Self::new(name, ColumnType::Text)
    }

    /// A [`ColumnType::OptionalText`] column.
    pub const fn optional_text(name: &'static str) -> Self {
        Self::new(name, ColumnType::OptionalText)
    }

    /// A [`ColumnType::Int`] column.
    pub const fn int(name: &'static str) -> Self {
        Self::new(name, ColumnType::Int)
    }

    /// A [`ColumnType::OptionalInt`] column.
    pub const fn optional_int(name: &'static str) -> Self {
        Self::new(name, ColumnType::OptionalInt)
    }

    /// A [`ColumnType::Json`] column.
    pub const fn json(name: &'static str) -> Self {
        Self::new(name, ColumnType::Json)
    }

    /// The same column shown as JSON field `field`.
    pub const fn as_field(self, field: &'static str) -> Self {
        Self { field, ..self }
    }

    fn read(&self, row: &AnyRow, i: usize) -> Result<Value, sqlx::Error> {
        Ok(match self.kind {
            ColumnType::Text => Value::from(row.try_get::<String, _>(i)?),
            ColumnType::OptionalText => Value::from(row.try_get::<Option<String>, _>(i)?),
            ColumnType::Int => Value::from(row.try_get::<i64, _>(i)?),
            ColumnType::OptionalInt => Value::from(row.try_get::<Option<i64>, _>(i)?),
            ColumnType::Json => row
                .try_get::<Option<String>, _>(i)?
                .and_then(|s| serde_json::from_str(&s).ok())
                .unwrap_or(Value::Null),
        })
    }
}

/// A read model's table keyed by one column (text, or an integer such as a
/// position): what [`ReadModel`] needs, described once.
///
/// Rows come out as JSON objects, one field per column (the key's and the
/// others'); pages are in key order, and a full page's cursor is
/// its last key. Reads go to the live table.
///
/// ```
/// use sluice_projections::{Column, Database, KeyedTable};
///
/// static LEVELS: KeyedTable = KeyedTable {
///     table: "levels",
///     key: Column::text("sku"),
///     columns: &[Column::int("available"), Column::optional_text("note").as_field("why")],
///     category: Some("stock"),
/// };
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let db = Database::connect("sqlite::memory:").await.unwrap();
/// let mut conn = db.pool().acquire().await.unwrap();
/// sqlx::query("CREATE TABLE levels (sku TEXT PRIMARY KEY, available BIGINT NOT NULL, note TEXT)")
///     .execute(&mut *conn).await.unwrap();
/// for sku in ["apple", "kiwi", "pear"] {
///     sqlx::query("INSERT INTO levels VALUES ($1, 3, NULL)").bind(sku)
///         .execute(&mut *conn).await.unwrap();
/// }
/// let apple = LEVELS.get(&mut conn, "apple").await.unwrap().unwrap();
/// assert_eq!(apple, serde_json::json!({"sku": "apple", "available": 3, "why": null}));
/// let page = LEVELS.list(&mut conn, None, 2).await.unwrap();
/// assert_eq!((page.rows.len(), page.next.as_deref()), (2, Some("kiwi")));
/// let rest = LEVELS.list(&mut conn, page.next.as_deref(), 2).await.unwrap();
/// assert_eq!((rest.rows[0]["sku"].as_str(), rest.next), (Some("pear"), None));
/// # });
/// ```
#[derive(Debug, Clone, Copy)]
pub struct KeyedTable {
    /// The (live) table.
    pub table: &'static str,
    /// The key column: [`ColumnType::Text`] or [`ColumnType::Int`].
    pub key: Column,
    /// The other columns.
    pub columns: &'static [Column],
    /// The aggregate category a key is an id of, when rows are per
    /// aggregate ([`ReadModel::stream_of`]).
    pub category: Option<&'static str>,
}

/// A key or cursor as bound to the key column.
enum KeyValue<'a> {
    Text(&'a str),
    Int(i64),
}

impl KeyedTable {
    fn select(&self) -> String {
        let mut cols = vec![self.key.name];
        cols.extend(self.columns.iter().map(|c| c.name));
        format!("SELECT {} FROM {}", cols.join(", "), self.table)
    }

    /// `None` when `key` cannot be a key (not an integer for an integer key).
    fn key_value<'a>(&self, key: &'a str) -> Option<KeyValue<'a>> {
        match self.key.kind {
            ColumnType::Int | ColumnType::OptionalInt => key.parse().ok().map(KeyValue::Int),
            _ => Some(KeyValue::Text(key)),
        }
    }

    fn row_json(&self, row: &AnyRow) -> Result<Value, sqlx::Error> {
        let mut out = Map::with_capacity(self.columns.len() + 1);
        let key = std::iter::once(&self.key).chain(self.columns);
        for (i, c) in key.enumerate() {
            out.insert(c.field.to_owned(), c.read(row, i)?);
        }
        Ok(Value::Object(out))
    }

    /// The aggregate `key` is the id of, if rows are per aggregate.
    pub fn stream_of(&self, key: &str) -> Option<StreamId> {
        StreamId::new(self.category?, key).ok()
    }

    /// The row keyed `key`, as a JSON object.
    pub async fn get(
        &self,
        conn: &mut AnyConnection,
        key: &str,
    ) -> Result<Option<Value>, sqlx::Error> {
        let sql = format!("{} WHERE {} = $1", self.select(), self.key.name);
        let q = sqlx::query(&sql);
        let q = match self.key_value(key) {
            Some(KeyValue::Text(k)) => q.bind(k),
            Some(KeyValue::Int(k)) => q.bind(k),
            None => return Ok(None),
        };
        let row = q.fetch_optional(conn).await?;
        row.as_ref().map(|r| self.row_json(r)).transpose()
    }

    /// Up to `limit` rows with keys after `after` (from the first when
    /// `None` or not a key), in key order.
    pub async fn list(
        &self,
        conn: &mut AnyConnection,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Page, sqlx::Error> {
        let k = self.key.name;
        let sql = format!("{} WHERE {k} > $1 ORDER BY {k} LIMIT $2", self.select());
        let q = sqlx::query(&sql);
        let q = match self.key_value(after.unwrap_or("")) {
            Some(KeyValue::Text(a)) => q.bind(a),
            Some(KeyValue::Int(a)) => q.bind(a),
            None => q.bind(i64::MIN),
        };
        let rows = q.bind(i64::from(limit)).fetch_all(conn).await?;
        let rows = rows
            .iter()
            .map(|r| self.row_json(r))
            .collect::<Result<Vec<_>, _>>()?;
        let next = (rows.len() == limit as usize)
            .then(|| match rows.last().map(|r| &r[self.key.field]) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                _ => None,
            })
            .flatten();
        Ok(Page { rows, next })
    }

    /// Deletes the rows (of `tables`' copy of the table) keyed by the ids of
    /// `aggregates`: a [`RewindSupport::ByAggregate`] rewind for rows that
    /// are the fold of one aggregate's events each.
    ///
    /// [`RewindSupport::ByAggregate`]: crate::RewindSupport::ByAggregate
    pub async fn delete_aggregates(
        &self,
        conn: &mut AnyConnection,
        tables: &Tables,
        aggregates: &[StreamId],
    ) -> Result<(), sqlx::Error> {
        // Far below SQLite's and PostgreSQL's bind-parameter limits.
        const CHUNK: usize = 500;
        let table = tables.name(self.table);
        for chunk in aggregates.chunks(CHUNK) {
            let params: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let sql = format!(
                "DELETE FROM {table} WHERE {} IN ({})",
                self.key.name,
                params.join(",")
            );
            let mut q = sqlx::query(&sql);
            for s in chunk {
                q = q.bind(s.id());
            }
            q.execute(&mut *conn).await?;
        }
        Ok(())
    }
}

/// A projection whose query side is a [`KeyedTable`]: it is a
/// [`ReadModel`] under its projection's name, with nothing more to write.
///
/// ```
/// use sluice_projections::{Column, KeyedReadModel, KeyedTable, ReadModel};
/// # use sluice_projections::{ProjectedEvent, Projection, Rejection, Tables};
/// # struct Levels;
/// # impl Projection for Levels {
/// #     fn name(&self) -> &'static str { "levels" }
/// #     fn categories(&self) -> &'static [&'static str] { &["stock"] }
/// #     fn tables(&self) -> &'static [&'static str] { &["levels"] }
/// #     async fn apply(&self, _: &mut sqlx::AnyConnection, _: &Tables, _: &[ProjectedEvent])
/// #         -> Result<Vec<Rejection>, sqlx::Error> { Ok(vec![]) }
/// # }
/// impl KeyedReadModel for Levels {
///     const ROWS: KeyedTable = KeyedTable {
///         table: "levels",
///         key: Column::text("sku"),
///         columns: &[Column::int("available")],
///         category: Some("stock"),
///     };
/// }
///
/// assert_eq!(ReadModel::name(&Levels), "levels");
/// assert_eq!(Levels.stream_of("apple").unwrap().id(), "apple");
/// ```
pub trait KeyedReadModel: Projection {
    /// The table its rows are read from.
    const ROWS: KeyedTable;
}

impl<T: KeyedReadModel> ReadModel for T {
    fn name(&self) -> &'static str {
        Projection::name(self)
    }

    fn stream_of(&self, key: &str) -> Option<StreamId> {
        T::ROWS.stream_of(key)
    }

    fn get<'a>(
        &'a self,
        conn: &'a mut AnyConnection,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Value>, sqlx::Error>> {
        async move { T::ROWS.get(conn, key).await }.boxed()
    }

    fn list<'a>(
        &'a self,
        conn: &'a mut AnyConnection,
        after: Option<&'a str>,
        limit: u32,
    ) -> BoxFuture<'a, Result<Page, sqlx::Error>> {
        async move { T::ROWS.list(conn, after, limit).await }.boxed()
    }
}
