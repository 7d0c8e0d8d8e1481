//! The endpoint file `sluice up` writes, so other commands run in the same
//! directory find the embedded server without configuration.

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
    /// The embedded server's admin credential (a 0600 file under the home):
    /// commands run here read it rather than this file holding a secret.
    #[serde(default)]
    pub(crate) nats_credentials_file: Option<PathBuf>,
}

pub(crate) fn path(home: &Path) -> PathBuf {
    home.join("endpoint.json")
}

pub(crate) fn write(home: &Path, endpoint: &Endpoint) -> anyhow::Result<()> {
    std::fs::create_dir_all(home).with_context(|| format!("creating {}", home.display()))?;
    let tmp = home.join("endpoint.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(endpoint)?)?;
    std::fs::rename(&tmp, path(home))?;
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

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
