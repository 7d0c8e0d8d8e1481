//! How Sluice connects to NATS: one or more URLs, and any of user/password,
//! nkey seed, `.creds` file, TLS with a private CA and client certificates.
//! Secrets come from files or the environment, never from the repository.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::ConnectErrorKind;

use crate::error::Error;

/// Where and how to connect.
#[derive(Debug, Clone, Default)]
pub struct ConnectConfig {
    /// Comma-separated server URLs.
    pub url: String,
    /// Client name shown in the server's monitoring.
    pub name: Option<String>,
    /// User for user/password authentication.
    pub user: Option<String>,
    /// Password (read from `SLUICE_NATS_PASSWORD` or a file by [`ConnectConfig::from_env`]).
    pub password: Option<String>,
    /// File holding an nkey seed (`SU...`).
    pub nkey_seed_file: Option<PathBuf>,
    /// A `.creds` file (JWT + nkey seed).
    pub creds_file: Option<PathBuf>,
    /// CA certificate to verify the server with (enables TLS).
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate for mutual TLS.
    pub tls_cert_file: Option<PathBuf>,
    /// Client key for mutual TLS.
    pub tls_key_file: Option<PathBuf>,
    /// How long to keep trying while the server is not (yet) reachable.
    pub connect_timeout: Duration,
    /// Subject prefix of this client's reply inboxes (default `_INBOX`).
    /// Least-privilege users may subscribe to their own prefix only
    /// (`_INBOX_<role>.>`), so no role reads the replies sent to another.
    pub inbox_prefix: Option<String>,
}

impl ConnectConfig {
    /// Plain connection to `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            connect_timeout: Duration::from_secs(10),
            ..Self::default()
        }
    }

    /// `url` plus credentials and TLS from `SLUICE_NATS_USER`,
    /// `SLUICE_NATS_PASSWORD` / `SLUICE_NATS_PASSWORD_FILE`,
    /// `SLUICE_NATS_NKEY_FILE`, `SLUICE_NATS_CREDS`, `SLUICE_NATS_TLS_CA`,
    /// `SLUICE_NATS_TLS_CERT`, `SLUICE_NATS_TLS_KEY`, `SLUICE_NATS_INBOX_PREFIX`.
    pub fn from_env(url: impl Into<String>) -> Result<Self, Error> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let path = |name: &str| var(name).map(PathBuf::from);
        let password = match (
            var("SLUICE_NATS_PASSWORD"),
            path("SLUICE_NATS_PASSWORD_FILE"),
        ) {
            (Some(p), _) => Some(p),
            (None, Some(file)) => Some(
                std::fs::read_to_string(&file)
                    .map_err(|e| {
                        Error::Config(format!("SLUICE_NATS_PASSWORD_FILE={}: {e}", file.display()))
                    })?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        Ok(Self {
            user: var("SLUICE_NATS_USER"),
            password,
            nkey_seed_file: path("SLUICE_NATS_NKEY_FILE"),
            creds_file: path("SLUICE_NATS_CREDS"),
            tls_ca_file: path("SLUICE_NATS_TLS_CA"),
            tls_cert_file: path("SLUICE_NATS_TLS_CERT"),
            tls_key_file: path("SLUICE_NATS_TLS_KEY"),
            inbox_prefix: var("SLUICE_NATS_INBOX_PREFIX"),
            ..Self::new(url)
        })
    }

    /// Checks that the settings fit together and the files exist.
    pub fn validate(&self) -> Result<(), Error> {
        if self.user.is_some() != self.password.is_some() {
            return Err(Error::Config(
                "set both a NATS user and a password, or neither".into(),
            ));
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(Error::Config(
                "a TLS client certificate needs its key (and vice versa)".into(),
            ));
        }
        let methods = [
            self.user.is_some(),
            self.nkey_seed_file.is_some(),
            self.creds_file.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            return Err(Error::Config(
                "choose one NATS authentication: user/password, nkey seed or creds file".into(),
            ));
        }
        for file in [
            &self.nkey_seed_file,
            &self.creds_file,
            &self.tls_ca_file,
            &self.tls_cert_file,
            &self.tls_key_file,
        ]
        .into_iter()
        .flatten()
        {
            if !file.is_file() {
                return Err(Error::Config(format!("{} does not exist", file.display())));
            }
        }
        Ok(())
    }

    /// The user and password written into the URLs
    /// (`nats://user:pass@host:port`), which async-nats itself ignores.
    /// Every URL that carries one must carry the same.
    fn url_credentials(
        &self,
        addrs: &[async_nats::ServerAddr],
    ) -> Result<Option<(String, String)>, Error> {
        let mut found: Option<(String, String)> = None;
        for a in addrs {
            let Some(user) = a.username() else { continue };
            let pair = (user.to_owned(), a.password().unwrap_or_default().to_owned());
            match &found {
                Some(f) if *f != pair => {
                    return Err(Error::Config(format!(
                        "the NATS URLs {} carry different credentials: use one user and password for every server",
                        redact_url(&self.url)
                    )));
                }
                _ => found = Some(pair),
            }
        }
        Ok(found)
    }

    /// Connects, retrying while the server is unreachable (up to
    /// `connect_timeout`), failing at once on authentication or TLS errors.
    ///
    /// Credentials in the URLs (`nats://user:pass@host`) are used when no
    /// other authentication is configured; they are never logged.
    pub async fn connect(&self) -> Result<async_nats::Client, Error> {
        self.validate()?;
        let addrs = self
            .url
            .split(',')
            .map(|u| u.trim().parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Connect {
                url: redact_url(&self.url),
                source: e.into(),
            })?;
        let from_url = self.url_credentials(&addrs)?;
        let configured =
            self.user.is_some() || self.nkey_seed_file.is_some() || self.creds_file.is_some();
        let url_auth = from_url.filter(|_| !configured);
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        loop {
            let mut options = self.options().await?;
            if let Some((user, password)) = &url_auth {
                options = options.user_and_password(user.clone(), password.clone());
            }
            match options.connect(addrs.clone()).await {
                Ok(client) => return Ok(client),
                Err(e)
                    if matches!(e.kind(), ConnectErrorKind::Io | ConnectErrorKind::TimedOut)
                        && tokio::time::Instant::now() < deadline =>
                {
                    tracing::debug!(url = %redact_url(&self.url), error = %e, "NATS not reachable yet; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(source) => {
                    return Err(Error::Connect {
                        url: redact_url(&self.url),
                        source,
                    });
                }
            }
        }
    }

    async fn options(&self) -> Result<async_nats::ConnectOptions, Error> {
        let mut o = async_nats::ConnectOptions::new()
            .name(self.name.as_deref().unwrap_or("sluice"))
            .connection_timeout(Duration::from_secs(5))
            .event_callback(|event| async move {
                // Connection changes are rare and worth a log line and a metric.
                match &event {
                    async_nats::Event::Connected => {
                        metrics::counter!("sluice_nats_connects_total").increment(1);
                        tracing::info!("NATS connected");
                    }
                    async_nats::Event::Disconnected => {
                        metrics::counter!("sluice_nats_disconnects_total").increment(1);
                        tracing::warn!("NATS disconnected; reconnecting");
                    }
                    async_nats::Event::Closed => tracing::debug!("NATS connection closed"),
                    other => tracing::warn!(event = %other, "NATS client event"),
                }
            });
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            o = o.user_and_password(user.clone(), password.clone());
        }
        if let Some(prefix) = &self.inbox_prefix {
            o = o.custom_inbox_prefix(prefix);
        }
        if let Some(file) = &self.nkey_seed_file {
            let seed = std::fs::read_to_string(file)
                .map_err(|e| Error::Config(format!("{}: {e}", file.display())))?;
            o = o.nkey(seed.trim().to_owned());
        }
        if let Some(file) = &self.creds_file {
            o = o
                .credentials_file(file)
                .await
                .map_err(|e| Error::Config(format!("{}: {e}", file.display())))?;
        }
        if let Some(ca) = &self.tls_ca_file {
            o = o.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert_file, &self.tls_key_file) {
            o = o
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        Ok(o)
    }
}

/// `url` (one or a comma-separated list) with every password replaced by
/// `***`, for logs and error messages.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|u| {
            let Some((scheme, rest)) = u.split_once("://") else {
                return u.to_owned();
            };
            match rest.split_once('@') {
                Some((userinfo, host)) => {
                    let user = userinfo.split(':').next().unwrap_or_default();
                    format!("{scheme}://{user}:***@{host}")
                }
                None => u.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_are_redacted_and_must_agree() {
        assert_eq!(
            redact_url("nats://admin:s3cret@127.0.0.1:4222, nats://h:1"),
            "nats://admin:***@127.0.0.1:4222, nats://h:1"
        );
        let c = ConnectConfig::new("nats://a:p@127.0.0.1:1,nats://a:q@127.0.0.1:2");
        let addrs: Vec<async_nats::ServerAddr> =
            c.url.split(',').map(|u| u.parse().unwrap()).collect();
        let err = c.url_credentials(&addrs).unwrap_err().to_string();
        assert!(
            err.contains("different credentials") && !err.contains(":p@"),
            "{err}"
        );
        let c = ConnectConfig::new("nats://a:p@127.0.0.1:1,nats://127.0.0.1:2");
        let addrs: Vec<async_nats::ServerAddr> =
            c.url.split(',').map(|u| u.parse().unwrap()).collect();
        assert_eq!(
            c.url_credentials(&addrs).unwrap(),
            Some(("a".to_owned(), "p".to_owned()))
        );
    }

    #[test]
    fn settings_must_fit_together() {
        let mut c = ConnectConfig::new("nats://127.0.0.1:4222");
        assert!(c.validate().is_ok());
        c.user = Some("api".into());
        assert!(matches!(c.validate(), Err(Error::Config(_))));
        c.password = Some("secret".into());
        assert!(c.validate().is_ok());
        c.creds_file = Some("/nonexistent.creds".into());
        assert!(c.validate().unwrap_err().to_string().contains("choose one"));
        c.user = None;
        c.password = None;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("does not exist")
        );
        let mut c = ConnectConfig::new("nats://127.0.0.1:4222");
        c.tls_cert_file = Some("/x.pem".into());
        assert!(c.validate().unwrap_err().to_string().contains("key"));
    }
}
