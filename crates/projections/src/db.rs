//! The read store: one sqlx `Any` pool over SQLite (embedded default, WAL) or
//! PostgreSQL, with the bookkeeping schema migrated on connect.

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Executor};

use crate::error::Error;

/// Schema of the runtime's own tables (checkpoints, parked, dead letters).
static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Which SQL engine is behind the pool (one code path; this only picks
/// connection settings and the rare statement that differs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite, in WAL mode.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// A connection pool to the read store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Database {
    pool: AnyPool,
    backend: Backend,
}

impl Database {
    /// Connects to `url` (`sqlite://path`, created if missing, or
    /// `postgres://...`) and applies the runtime's migrations.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        sqlx::any::install_default_drivers();
        let (backend, url) = normalize_url(url)?;
        let options = AnyConnectOptions::from_str(&url)?;
        let pool = AnyPoolOptions::new()
            // SQLite has one writer at a time; a few readers serve queries.
            .max_connections(match backend {
                Backend::Sqlite => 4,
                Backend::Postgres => 8,
            })
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL lets queries read while the projector writes;
                        // NORMAL sync is durable across process crashes, and
                        // the checkpoint shares each transaction with its rows,
                        // so a lost tail after a power cut is simply re-applied.
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = NORMAL").await?;
                        conn.execute("PRAGMA busy_timeout = 5000").await?;
                    } else {
                        // A transaction abandoned mid-flight (a runner task
                        // aborted inside a query, a client that hung) would
                        // hold the checkpoint row lock and block every other
                        // writer forever: let the server end such sessions.
                        // Our own transactions never idle this long; if one
                        // did, its commit fails and the batch is retried.
                        conn.execute("SET idle_in_transaction_session_timeout = '15s'")
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        let db = Self { pool, backend };
        db.migrate(&MIGRATOR).await?;
        Ok(db)
    }

    /// Applies a crate's migrations (each crate numbers its own, disjoint
    /// versions, so the others' applied versions are not "missing").
    pub async fn migrate(&self, migrator: &Migrator) -> Result<(), Error> {
        let migrator = Migrator {
            migrations: migrator.migrations.clone(),
            ignore_missing: true,
            locking: migrator.locking,
            no_tx: migrator.no_tx,
        };
        migrator.run(&self.pool).await?;
        Ok(())
    }

    /// The pool.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The engine behind the pool.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Closes every connection.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Tells the backend from the URL scheme and makes SQLite create its file.
fn normalize_url(url: &str) -> Result<(Backend, String), Error> {
    if url.starts_with("sqlite:") {
        let url = if url.contains("mode=") {
            url.to_owned()
        } else if url.contains('?') {
            format!("{url}&mode=rwc")
        } else {
            format!("{url}?mode=rwc")
        };
        Ok((Backend::Sqlite, url))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok((Backend::Postgres, url.to_owned()))
    } else {
        // Never echo a URL that may hold a password: keep only the scheme.
        let scheme = url.split(':').next().unwrap_or("").to_owned();
        Err(Error::UnsupportedDatabaseUrl(format!("{scheme}:...")))
    }
}

/// True when a database error is not the event's fault: connection loss,
/// timeouts, lock contention, serialization failures, a schema being
/// changed under us. The runtime blocks and retries on these and never skips.
///
/// The projection runtime treats *every* database error as transient (see
/// the crate docs); this finer split is for logs and metrics.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // PostgreSQL: serialization failure, deadlock, connection
            // exceptions (08xxx), admin shutdown / cannot connect now (57Pxx),
            // insufficient resources (53xxx).
            Some(code)
                if code == "40001"
                    || code == "40P01"
                    || code.starts_with("08")
                    || code.starts_with("57P")
                    || code.starts_with("53") =>
            {
                true
            }
            // SQLite: BUSY (5) and LOCKED (6) and their extended codes.
            Some(code) => matches!(code.parse::<i32>().map(|c| c & 0xff), Ok(5 | 6)),
            None => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_pick_the_backend_and_sqlite_creates_its_file() {
        let (b, u) = normalize_url("sqlite:///tmp/x.db").expect("sqlite");
        assert_eq!(b, Backend::Sqlite);
        assert_eq!(u, "sqlite:///tmp/x.db?mode=rwc");
        let (b, _) = normalize_url("postgres://u@127.0.0.1/db").expect("pg");
        assert_eq!(b, Backend::Postgres);
        let err = normalize_url("mysql://root:secret@host/db").expect_err("mysql");
        assert!(!err.to_string().contains("secret"), "{err}");
    }
}
