//! Fresh PostgreSQL databases for tests, dropped afterwards.

/// Environment variable with the admin URL of the test PostgreSQL.
pub const TEST_DATABASE_URL_ENV: &str = "SLUICE_TEST_DATABASE_URL";
const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A uniquely named database, created for one test.
#[derive(Debug)]
pub struct TestDatabase {
    /// The database's name.
    pub name: String,
    /// A URL connecting to it.
    pub url: String,
}

impl TestDatabase {
    /// The admin URL (`$SLUICE_TEST_DATABASE_URL` or the local default).
    pub fn admin_url() -> String {
        std::env::var(TEST_DATABASE_URL_ENV).unwrap_or_else(|_| DEFAULT_URL.to_owned())
    }

    /// Names a fresh database under the admin URL; the caller creates it with
    /// its own driver (`CREATE DATABASE`), so this crate needs no SQL driver.
    pub fn fresh(prefix: &str) -> Self {
        let name = format!(
            "{prefix}_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        let admin = Self::admin_url();
        let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
        Self {
            url: format!("{base}/{name}"),
            name,
        }
    }
}
