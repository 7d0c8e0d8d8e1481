//! A fresh read store per test, on SQLite or PostgreSQL, for the test
//! targets that run the same test against both backends.

use std::time::{Duration, Instant};

use sluice_projections::{Database, read_checkpoint};
use sluice_testkit::TestDatabase;
use sqlx::AnyConnection;

/// Which database a test runs on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

/// A fresh read store; removed (file) or dropped (database) on drop.
pub(crate) struct Store {
    pub(crate) url: String,
    _dir: Option<tempfile::TempDir>,
    pg: Option<TestDatabase>,
}

/// A connection to the PostgreSQL server as its administrator.
pub(crate) async fn admin() -> AnyConnection {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    AnyConnection::connect(&TestDatabase::admin_url())
        .await
        .unwrap()
}

impl Store {
    /// A new SQLite file or PostgreSQL database (named after `prefix`).
    pub(crate) async fn fresh(backend: Backend, prefix: &str) -> Self {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}", dir.path().join("read.db").display());
                Store {
                    url,
                    _dir: Some(dir),
                    pg: None,
                }
            }
            Backend::Postgres => {
                let db = TestDatabase::fresh(prefix);
                sqlx::query(&format!("CREATE DATABASE \"{}\"", db.name))
                    .execute(&mut admin().await)
                    .await
                    .unwrap();
                Store {
                    url: db.url.clone(),
                    _dir: None,
                    pg: Some(db),
                }
            }
        }
    }

    /// A pool on the store with the ledger's migrations run.
    pub(crate) async fn connect(&self) -> Database {
        let db = Database::connect(&self.url).await.unwrap();
        sluice_ledger::migrate(&db).await.unwrap();
        db
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(db) = self.pg.take() {
            // Async work in Drop: a short-lived runtime on its own thread.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let _ = sqlx::query(&format!(
                        "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                        db.name
                    ))
                    .execute(&mut admin().await)
                    .await;
                });
            })
            .join();
        }
    }
}

/// One `sqlite::<test>` and one `postgres::<test>` per listed
/// `async fn <test>(Backend)` of the including file.
macro_rules! both_backends {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::Postgres).await;
                }
            )*
        }
    };
}

/// Waits until `name`'s checkpoint reaches `position`; fails after `timeout`.
pub(crate) async fn wait_checkpoint(db: &Database, name: &str, position: u64, timeout: Duration) {
    let start = Instant::now();
    loop {
        let cp = read_checkpoint(db, name).await.unwrap_or(0);
        if cp >= position {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "{name} stuck at {cp}, want {position}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
