//! The endpoint file `sluice up` writes, so other commands run in the same
//! directory find the embedded server and the read store without
//! configuration.
//!
//! The file is private to its owner (mode 0600, like the API token beside
//! it) and never holds a database password: the read store's URL is kept
//! with the password removed, and operator commands take the password from
//! `PGPASSWORD` or `~/.pgpass` (libpq's conventions, which the driver
//! honours), or from a full `--database-url` / `SLUICE_DATABASE_URL`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// What a running `sluice up` tells other commands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Endpoint {
    /// NATS URL of the embedded server.
    pub(crate) nats_url: String,
    /// Process id of `sluice up`.
    pub(crate) pid: u32,
    /// Whether the embedded server fsyncs every write.
    pub(crate) sync_always: bool,
    /// Where the HTTP API listens, if this process serves it.
    #[serde(default)]
    pub(crate) http_addr: Option<String>,
    /// The read store this process projects into, password removed (see
    /// [`without_password`]); absent when it runs no read side.
    #[serde(default)]
    pub(crate) database_url: Option<String>,
    /// True when a password was removed from `database_url`.
    #[serde(default)]
    pub(crate) database_password_removed: bool,
    /// The embedded server's admin credential (a 0600 file under the home):
    /// commands run here read it rather than this file holding a secret.
    #[serde(default)]
    pub(crate) nats_credentials_file: Option<PathBuf>,
}

/// The embedded default read store: a SQLite file under the home.
pub(crate) fn default_database_url(home: &Path) -> String {
    format!("sqlite://{}", home.join("read.db").display())
}

pub(crate) fn path(home: &Path) -> PathBuf {
    home.join("endpoint.json")
}

/// Writes the file atomically, readable and writable by its owner only.
pub(crate) fn write(home: &Path, endpoint: &Endpoint) -> anyhow::Result<()> {
    crate::private_file::write_atomic(&path(home), &serde_json::to_vec_pretty(endpoint)?)
}

pub(crate) fn read(home: &Path) -> Option<Endpoint> {
    let text = std::fs::read(path(home)).ok()?;
    serde_json::from_slice(&text).ok()
}

pub(crate) fn remove(home: &Path) {
    let _ = std::fs::remove_file(path(home));
}

/// The NATS URL to use: the flag or `SLUICE_NATS_URL`, else the endpoint
/// file. The URL of this home's embedded server gets its credential
/// (`nats://admin:<password>@...`, which `ConnectConfig` authenticates with),
/// whether it came from the endpoint file or was pasted from `sluice up`'s
/// output.
pub(crate) fn resolve(nats_url: Option<String>, home: &Path) -> anyhow::Result<String> {
    let endpoint = read(home);
    let url = match nats_url {
        Some(url) => url,
        None => endpoint.as_ref().map(|e| e.nats_url.clone()).with_context(|| {
            format!(
                "no NATS server: start one with `sluice up` in this directory (no {} found) or set SLUICE_NATS_URL / --nats-url",
                path(home).display()
            )
        })?,
    };
    let Some(e) = endpoint else { return Ok(url) };
    match &e.nats_credentials_file {
        Some(file) if url.trim() == e.nats_url => {
            let credentials = sluice_events::Credentials::load(file)
                .with_context(|| {
                    format!(
                        "reading the embedded server's credential {}",
                        file.display()
                    )
                })?
                .with_context(|| {
                    format!(
                        "{} is missing: restart `sluice up` in this directory to create it",
                        file.display()
                    )
                })?;
            Ok(credentials.url_with(&e.nats_url))
        }
        _ => Ok(url),
    }
}

/// `url` with the password of its user info removed (`postgres://u:pw@h/db`
/// becomes `postgres://u@h/db`), and whether there was one.
pub(crate) fn without_password(url: &str) -> (String, bool) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_owned(), false);
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return (url.to_owned(), false);
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => (format!("{scheme}://{user}@{host}{tail}"), true),
        None => (url.to_owned(), false),
    }
}

/// `url` fit for messages and logs: the password replaced by `***`.
pub(crate) fn redacted(url: &str) -> String {
    match without_password(url) {
        (stripped, true) => stripped.replacen('@', ":***@", 1),
        (same, false) => same,
    }
}

/// The read store to use and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReadStore {
    /// The URL to connect to.
    pub(crate) url: String,
    /// Said when connecting fails, so the user knows which store was tried.
    pub(crate) origin: &'static str,
}

/// The read store: the flag or `SLUICE_DATABASE_URL`, else the one the
/// endpoint file records, else the SQLite file `sluice up` makes under the
/// home, which must exist (an operator command never creates an empty one
/// and reports it as the truth).
pub(crate) fn resolve_database(
    database_url: Option<String>,
    home: &Path,
) -> anyhow::Result<ReadStore> {
    if let Some(url) = database_url {
        return Ok(ReadStore {
            url,
            origin: "--database-url / SLUICE_DATABASE_URL",
        });
    }
    if let Some(Endpoint {
        database_url: Some(url),
        database_password_removed,
        ..
    }) = read(home)
    {
        return Ok(ReadStore {
            url,
            origin: if database_password_removed {
                "the endpoint file, which keeps no password: set PGPASSWORD or ~/.pgpass, or give the full URL with --database-url"
            } else {
                "the endpoint file"
            },
        });
    }
    let file = home.join("read.db");
    anyhow::ensure!(
        file.exists(),
        "no read store here: {} does not exist and no running `sluice up` records one in {}; run `sluice up` in this directory, or give --database-url / SLUICE_DATABASE_URL",
        file.display(),
        path(home).display()
    );
    Ok(ReadStore {
        url: default_database_url(home),
        origin: "the default SQLite file under the home",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_the_file_or_messages() {
        for (url, stripped, had) in [
            (
                "postgres://sluice:s3cr:et@db.internal:5432/read?sslmode=require",
                "postgres://sluice@db.internal:5432/read?sslmode=require",
                true,
            ),
            (
                "postgres://sluice@db/read",
                "postgres://sluice@db/read",
                false,
            ),
            ("postgres://db/read", "postgres://db/read", false),
            (
                "sqlite://.sluice/read.db",
                "sqlite://.sluice/read.db",
                false,
            ),
            ("postgres://u:p@h", "postgres://u@h", true),
        ] {
            assert_eq!(without_password(url), (stripped.to_owned(), had), "{url}");
        }
        assert_eq!(
            redacted("postgres://u:hunter2@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redacted("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[test]
    fn the_file_is_private_and_records_the_read_store() {
        use std::os::unix::fs::PermissionsExt;
        let home = tempfile::tempdir().unwrap();
        let err = resolve_database(None, home.path()).unwrap_err().to_string();
        assert!(err.contains("no read store here"), "{err}");
        assert!(!home.path().join("read.db").exists(), "no stray read.db");
        let (url, removed) = without_password("postgres://u:pw@127.0.0.1/db");
        write(
            home.path(),
            &Endpoint {
                nats_url: "nats://127.0.0.1:1".into(),
                pid: 1,
                sync_always: true,
                http_addr: None,
                database_url: Some(url),
                database_password_removed: removed,
                nats_credentials_file: None,
            },
        )
        .unwrap();
        let mode = std::fs::metadata(path(home.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(path(home.path())).unwrap();
        assert!(!text.contains("pw"), "{text}");
        let store = resolve_database(None, home.path()).unwrap();
        assert_eq!(store.url, "postgres://u@127.0.0.1/db");
        assert!(store.origin.contains("PGPASSWORD"), "{}", store.origin);
        let flag = resolve_database(Some("sqlite://x.db".into()), home.path()).unwrap();
        assert_eq!(flag.url, "sqlite://x.db", "an explicit flag wins");
    }

    #[test]
    fn only_this_homes_embedded_url_gets_its_credential() {
        let home = tempfile::tempdir().unwrap();
        let creds = home.path().join("nats-credentials.json");
        let (c, _) = sluice_events::Credentials::load_or_create(&creds).unwrap();
        write(
            home.path(),
            &Endpoint {
                nats_url: "nats://127.0.0.1:4999".into(),
                pid: 1,
                sync_always: true,
                http_addr: None,
                database_url: None,
                database_password_removed: false,
                nats_credentials_file: Some(creds.clone()),
            },
        )
        .unwrap();
        let with = format!("nats://admin:{}@127.0.0.1:4999", c.password);
        assert_eq!(resolve(None, home.path()).unwrap(), with);
        assert_eq!(
            resolve(Some("nats://127.0.0.1:4999".into()), home.path()).unwrap(),
            with
        );
        // Another server's URL never gets this home's password.
        let other = "nats://127.0.0.1:5000".to_owned();
        assert_eq!(resolve(Some(other.clone()), home.path()).unwrap(), other);
        // A missing credential is an error that says what to do, never a
        // new password the server does not know.
        std::fs::remove_file(&creds).unwrap();
        let err = format!("{:#}", resolve(None, home.path()).unwrap_err());
        assert!(err.contains("restart `sluice up`"), "{err}");
        assert!(!creds.exists());
    }
}
