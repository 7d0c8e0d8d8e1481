//! Configuration of `sluice up` / `sluice serve`: a TOML file
//! (`--config` / `SLUICE_CONFIG`) overridden by `SLUICE_*` environment
//! variables, validated at start. Secrets come only from files or the
//! environment; a password in the file is refused.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;
use sluice_events::ConnectConfig;

/// A role a process runs; any subset, `sluice up` runs all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// HTTP API.
    Api,
    /// Projection runners.
    Projector,
    /// Durable consumers (command handlers).
    Worker,
    /// Saga orchestrators.
    Saga,
}

impl Role {
    pub(crate) const ALL: [Role; 4] = [Role::Api, Role::Projector, Role::Worker, Role::Saga];

    fn parse(s: &str) -> anyhow::Result<Role> {
        Ok(match s.trim() {
            "api" => Role::Api,
            "projector" => Role::Projector,
            "worker" => Role::Worker,
            "saga" => Role::Saga,
            other => bail!("unknown role {other:?}: use api, projector, worker or saga"),
        })
    }
}

/// NATS connection settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct NatsSection {
    /// Comma-separated URLs; empty = the embedded server (`sluice up` only).
    pub(crate) url: Option<String>,
    /// User for user/password authentication.
    pub(crate) user: Option<String>,
    /// File holding the password.
    pub(crate) password_file: Option<PathBuf>,
    /// File holding an nkey seed.
    pub(crate) nkey_seed_file: Option<PathBuf>,
    /// `.creds` file.
    pub(crate) creds_file: Option<PathBuf>,
    /// CA to verify the server with.
    pub(crate) tls_ca_file: Option<PathBuf>,
    /// Client certificate (mTLS).
    pub(crate) tls_cert_file: Option<PathBuf>,
    /// Client key (mTLS).
    pub(crate) tls_key_file: Option<PathBuf>,
    /// Stream replicas: 1 (embedded/dev) or 3/5 (cluster).
    pub(crate) replicas: Option<usize>,
}

/// Read-store settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct DatabaseSection {
    /// `sqlite://path` or `postgres://...`; default: SQLite under the home dir.
    pub(crate) url: Option<String>,
}

/// HTTP settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct HttpSection {
    /// Listen address; default 127.0.0.1:8080.
    pub(crate) addr: Option<SocketAddr>,
    /// File with the bearer token for mutating and admin endpoints; default
    /// `<home>/token`, created with a random token when missing.
    pub(crate) token_file: Option<PathBuf>,
    /// Origins allowed by CORS; empty (default) = CORS off.
    pub(crate) cors_origins: Vec<String>,
    /// Sustained requests per second per client address (default 200).
    pub(crate) rate_per_sec: Option<u32>,
    /// Reverse proxies (addresses or CIDRs, e.g. `10.0.0.0/8`) whose
    /// `X-Forwarded-For` the rate limiter believes; empty (default) = it
    /// keys on the TCP peer only.
    pub(crate) trusted_proxies: Vec<String>,
    /// Seconds a connection has to send a request's headers (default 10);
    /// also how long an HTTP/1.1 keep-alive connection may wait for its
    /// next request.
    pub(crate) header_read_timeout_secs: Option<u64>,
    /// Seconds a connection may be silent before it is closed (default 60).
    pub(crate) idle_timeout_secs: Option<u64>,
    /// Connections served at once (default 1,024, fewer when the
    /// descriptor limit minus 128 is lower); more are answered 503.
    pub(crate) max_connections: Option<usize>,
    /// Largest request line plus headers, in bytes (default 65,536).
    pub(crate) max_header_bytes: Option<usize>,
    /// Most request header fields (default 100).
    pub(crate) max_headers: Option<usize>,
    /// PEM certificate chain (leaf first): with `tls_key`, the API speaks
    /// HTTPS only.
    pub(crate) tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub(crate) tls_key: Option<PathBuf>,
    /// Serve reads (GET outside `/v1/dlq`) without a token. Default: yes
    /// for `sluice up` on a loopback address, no otherwise (`serve` is
    /// production).
    pub(crate) open_reads: Option<bool>,
    /// Serve `/metrics` without a token when reads need one (default no).
    pub(crate) open_metrics: Option<bool>,
}

/// How long an Idempotency-Key is remembered by default: a day, as payment
/// APIs do.
const DEFAULT_IDEMPOTENCY_RETENTION: std::time::Duration =
    std::time::Duration::from_secs(24 * 60 * 60);
/// Default ack wait of the modules' workers.
const DEFAULT_ACK_WAIT_SECS: u64 = 10;
/// Default pin timeout of the modules' workers (the roles' takeover time).
const DEFAULT_PIN_TIMEOUT_SECS: u64 = 15;

/// Durable worker settings (the worker and saga roles).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct WorkersSection {
    /// Seconds before an unacknowledged message is delivered again (default 10).
    pub(crate) ack_wait_secs: Option<u64>,
    /// Seconds a silent replica keeps its pin before another takes over
    /// (default 15): the takeover time after a replica dies. Must exceed
    /// `ack_wait_secs` and stay below half the transfer step deadline (30 s),
    /// so a takeover never makes a healthy transfer compensate.
    pub(crate) pin_timeout_secs: Option<u64>,
    /// Seconds a transfer may take overall, from its start and from each
    /// operator retry, before it compensates or asks for help (default 300).
    /// At least the step deadline (30 s): a shorter one would end transfers
    /// whose steps are merely slow.
    pub(crate) saga_deadline_secs: Option<u64>,
}

/// Idempotency-Key records (HTTP and `sluice ledger --idempotency-key`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct IdempotencySection {
    /// How long a key is remembered, in seconds (default 86400 = 24 h).
    pub(crate) retention_secs: Option<u64>,
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Config {
    pub(crate) nats: NatsSection,
    pub(crate) database: DatabaseSection,
    pub(crate) http: HttpSection,
    pub(crate) workers: WorkersSection,
    pub(crate) idempotency: IdempotencySection,
    /// Roles to run (`serve`); default all.
    pub(crate) roles: Vec<Role>,
}

impl Config {
    /// Reads the file (if any), applies `SLUICE_*` overrides, validates.
    pub(crate) fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self::load_with(file, env)
    }

    pub(crate) fn load_with(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Self> {
        let mut c = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                Self::parse(&text).with_context(|| format!("config file {}", path.display()))?
            }
            None => Config::default(),
        };
        if let Some(v) = env("SLUICE_NATS_URL") {
            c.nats.url = Some(v);
        }
        if let Some(v) = env("SLUICE_NATS_USER") {
            c.nats.user = Some(v);
        }
        if let Some(v) = env("SLUICE_NATS_PASSWORD_FILE") {
            c.nats.password_file = Some(v.into());
        }
        if let Some(v) = env("SLUICE_NATS_NKEY_FILE") {
            c.nats.nkey_seed_file = Some(v.into());
        }
        if let Some(v) = env("SLUICE_NATS_CREDS") {
            c.nats.creds_file = Some(v.into());
        }
        if let Some(v) = env("SLUICE_NATS_TLS_CA") {
            c.nats.tls_ca_file = Some(v.into());
        }
        if let Some(v) = env("SLUICE_NATS_TLS_CERT") {
            c.nats.tls_cert_file = Some(v.into());
        }
        if let Some(v) = env("SLUICE_NATS_TLS_KEY") {
            c.nats.tls_key_file = Some(v.into());
        }
        if let Some(v) = env("SLUICE_REPLICAS") {
            c.nats.replicas = Some(
                v.parse()
                    .with_context(|| format!("SLUICE_REPLICAS={v:?} is not a number"))?,
            );
        }
        if let Some(v) = env("SLUICE_DATABASE_URL") {
            c.database.url = Some(v);
        }
        if let Some(v) = env("SLUICE_HTTP_ADDR") {
            c.http.addr = Some(
                v.parse()
                    .with_context(|| format!("SLUICE_HTTP_ADDR={v:?} is not host:port"))?,
            );
        }
        if let Some(v) = env("SLUICE_HTTP_TOKEN_FILE") {
            c.http.token_file = Some(v.into());
        }
        if let Some(v) = env("SLUICE_HTTP_TLS_CERT") {
            c.http.tls_cert = Some(v.into());
        }
        if let Some(v) = env("SLUICE_HTTP_TLS_KEY") {
            c.http.tls_key = Some(v.into());
        }
        for (key, dst) in [
            ("SLUICE_HTTP_OPEN_READS", &mut c.http.open_reads),
            ("SLUICE_HTTP_OPEN_METRICS", &mut c.http.open_metrics),
        ] {
            if let Some(v) = env(key) {
                *dst = Some(
                    v.parse()
                        .with_context(|| format!("{key}={v:?}: use true or false"))?,
                );
            }
        }
        if let Some(v) = env("SLUICE_HTTP_TRUSTED_PROXIES") {
            c.http.trusted_proxies = v
                .split(',')
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty())
                .collect();
        }
        for (key, dst) in [
            (
                "SLUICE_IDEMPOTENCY_RETENTION_SECS",
                &mut c.idempotency.retention_secs,
            ),
            (
                "SLUICE_HTTP_HEADER_READ_TIMEOUT_SECS",
                &mut c.http.header_read_timeout_secs,
            ),
            (
                "SLUICE_HTTP_IDLE_TIMEOUT_SECS",
                &mut c.http.idle_timeout_secs,
            ),
            ("SLUICE_WORKER_ACK_WAIT_SECS", &mut c.workers.ack_wait_secs),
            (
                "SLUICE_WORKER_PIN_TIMEOUT_SECS",
                &mut c.workers.pin_timeout_secs,
            ),
            (
                "SLUICE_SAGA_DEADLINE_SECS",
                &mut c.workers.saga_deadline_secs,
            ),
        ] {
            if let Some(v) = env(key) {
                *dst =
                    Some(v.parse().with_context(|| {
                        format!("{key}={v:?} is not a whole number of seconds")
                    })?);
            }
        }
        for (key, dst) in [
            ("SLUICE_HTTP_MAX_CONNECTIONS", &mut c.http.max_connections),
            ("SLUICE_HTTP_MAX_HEADER_BYTES", &mut c.http.max_header_bytes),
            ("SLUICE_HTTP_MAX_HEADERS", &mut c.http.max_headers),
        ] {
            if let Some(v) = env(key) {
                *dst = Some(
                    v.parse()
                        .with_context(|| format!("{key}={v:?} is not a whole number"))?,
                );
            }
        }
        if let Some(v) = env("SLUICE_ROLES") {
            c.roles = v
                .split(',')
                .map(Role::parse)
                .collect::<anyhow::Result<_>>()?;
        }
        c.validate()?;
        Ok(c)
    }

    fn parse(text: &str) -> anyhow::Result<Self> {
        // A clearer word than serde's "unknown field" for the one mistake
        // that leaks secrets.
        if let Ok(table) = text.parse::<toml::Table>()
            && table
                .get("nats")
                .and_then(|n| n.as_table())
                .is_some_and(|n| n.contains_key("password"))
        {
            bail!(
                "nats.password is not allowed in a config file: use nats.password_file or SLUICE_NATS_PASSWORD"
            );
        }
        Ok(toml::from_str(text)?)
    }

    /// Checks values that parse but cannot work.
    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        if let Some(r) = self.nats.replicas
            && !matches!(r, 1 | 3 | 5)
        {
            bail!("nats.replicas = {r}: use 1 (single server), 3 or 5 (cluster)");
        }
        let (ack_wait, pin_timeout) = self.worker_timeouts();
        if ack_wait.is_zero() || pin_timeout <= ack_wait {
            bail!(
                "workers.pin_timeout_secs ({}) must exceed workers.ack_wait_secs ({}), which must be at least 1: a new replica could otherwise take over before a crashed one's messages come back",
                pin_timeout.as_secs(),
                ack_wait.as_secs()
            );
        }
        let deadline = crate::module::DEFAULT_STEP_DEADLINE;
        if pin_timeout * 2 > deadline {
            bail!(
                "workers.pin_timeout_secs ({}) must be at most half the transfer step deadline ({} s): a standby replica takes a dead one's in-flight commands over only after the pin timeout, and a later takeover would make healthy transfers compensate",
                pin_timeout.as_secs(),
                deadline.as_secs()
            );
        }
        if let Some(secs) = self.workers.saga_deadline_secs
            && std::time::Duration::from_secs(secs) < deadline
        {
            bail!(
                "workers.saga_deadline_secs ({secs}) must be at least the transfer step deadline ({} s): a shorter overall deadline would end transfers whose steps are only slow",
                deadline.as_secs()
            );
        }
        if self.idempotency.retention_secs == Some(0) {
            bail!(
                "idempotency.retention_secs = 0: keys must be kept for some time (default 86400, a day)"
            );
        }
        if let Some(url) = &self.database.url
            && !(url.starts_with("sqlite:")
                || url.starts_with("postgres://")
                || url.starts_with("postgresql://"))
        {
            bail!("database.url {url:?}: use sqlite://<file> or postgres://user@host/db");
        }
        if self.nats.user.is_some()
            && self.nats.password_file.is_none()
            && std::env::var("SLUICE_NATS_PASSWORD").is_err()
        {
            bail!(
                "nats.user is set but no password: set nats.password_file or SLUICE_NATS_PASSWORD"
            );
        }
        self.trusted_proxies()?;
        let h = &self.http;
        for (what, value, min) in [
            (
                "http.header_read_timeout_secs",
                h.header_read_timeout_secs.map(|v| v as usize),
                1,
            ),
            (
                "http.idle_timeout_secs",
                h.idle_timeout_secs.map(|v| v as usize),
                1,
            ),
            ("http.max_connections", h.max_connections, 1),
            ("http.max_header_bytes", h.max_header_bytes, 1024),
            ("http.max_headers", h.max_headers, 8),
        ] {
            if let Some(v) = value
                && v < min
            {
                bail!(
                    "{what} = {v} is too small: use at least {min}, or leave it out for the default"
                );
            }
        }
        if self.http.tls_cert.is_some() != self.http.tls_key.is_some() {
            bail!(
                "http.tls_cert and http.tls_key go together: set both (SLUICE_HTTP_TLS_CERT, SLUICE_HTTP_TLS_KEY) for HTTPS, or neither for plain HTTP"
            );
        }
        for (what, file) in [
            ("http.tls_cert", &self.http.tls_cert),
            ("http.tls_key", &self.http.tls_key),
            ("nats.password_file", &self.nats.password_file),
            ("nats.nkey_seed_file", &self.nats.nkey_seed_file),
            ("nats.creds_file", &self.nats.creds_file),
            ("nats.tls_ca_file", &self.nats.tls_ca_file),
            ("nats.tls_cert_file", &self.nats.tls_cert_file),
            ("nats.tls_key_file", &self.nats.tls_key_file),
        ] {
            if let Some(f) = file
                && !f.is_file()
            {
                bail!("{what} = {}: no such file", f.display());
            }
        }
        Ok(())
    }

    /// Roles to run: the configured ones, or all.
    pub(crate) fn roles(&self) -> Vec<Role> {
        if self.roles.is_empty() {
            Role::ALL.to_vec()
        } else {
            self.roles.clone()
        }
    }

    /// Durable workers' ack wait and pin timeout (defaults 10 s and 15 s): a
    /// standby replica takes a dead one's work over after the pin timeout.
    pub(crate) fn worker_timeouts(&self) -> (std::time::Duration, std::time::Duration) {
        let secs = std::time::Duration::from_secs;
        (
            secs(self.workers.ack_wait_secs.unwrap_or(DEFAULT_ACK_WAIT_SECS)),
            secs(
                self.workers
                    .pin_timeout_secs
                    .unwrap_or(DEFAULT_PIN_TIMEOUT_SECS),
            ),
        )
    }

    /// `http.trusted_proxies` parsed: a bare address is a network of one.
    pub(crate) fn trusted_proxies(&self) -> anyhow::Result<Vec<ipnet::IpNet>> {
        self.http
            .trusted_proxies
            .iter()
            .map(|p| {
                p.parse::<ipnet::IpNet>()
                    .or_else(|_| p.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "http.trusted_proxies entry {p:?} is not an IP address or CIDR like 10.0.0.0/8"
                        )
                    })
            })
            .collect()
    }

    /// The configured overall saga deadline, if any.
    pub(crate) fn saga_deadline(&self) -> Option<std::time::Duration> {
        self.workers
            .saga_deadline_secs
            .map(std::time::Duration::from_secs)
    }

    /// How long idempotency records are kept (default 24 h).
    pub(crate) fn idempotency_retention(&self) -> std::time::Duration {
        self.idempotency.retention_secs.map_or(
            DEFAULT_IDEMPOTENCY_RETENTION,
            std::time::Duration::from_secs,
        )
    }

    /// What one HTTP connection may hold: the configured limits over the
    /// safe defaults; `request_timeout` is the router's.
    pub(crate) fn conn_limits(&self, request_timeout: Duration) -> crate::http::ConnLimits {
        let mut l = crate::http::ConnLimits {
            request_timeout,
            ..Default::default()
        };
        let h = &self.http;
        if let Some(s) = h.header_read_timeout_secs {
            l.header_read_timeout = Duration::from_secs(s);
        }
        if let Some(s) = h.idle_timeout_secs {
            l.idle_timeout = Duration::from_secs(s);
        }
        if let Some(n) = h.max_connections {
            l.max_connections = n;
        }
        if let Some(n) = h.max_header_bytes {
            l.max_header_bytes = n;
        }
        if let Some(n) = h.max_headers {
            l.max_headers = n;
        }
        l
    }

    /// The HTTP listen address.
    pub(crate) fn http_addr(&self) -> SocketAddr {
        self.http
            .addr
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)))
    }

    /// NATS connection settings for `url`.
    pub(crate) fn connect(&self, url: &str) -> anyhow::Result<ConnectConfig> {
        let mut c = ConnectConfig::from_env(url)?;
        let n = &self.nats;
        if n.user.is_some() {
            c.user = n.user.clone();
        }
        if let Some(f) = &n.password_file {
            c.password = Some(
                std::fs::read_to_string(f)
                    .with_context(|| format!("reading {}", f.display()))?
                    .trim()
                    .to_owned(),
            );
        }
        for (dst, src) in [
            (&mut c.nkey_seed_file, &n.nkey_seed_file),
            (&mut c.creds_file, &n.creds_file),
            (&mut c.tls_ca_file, &n.tls_ca_file),
            (&mut c.tls_cert_file, &n.tls_cert_file),
            (&mut c.tls_key_file, &n.tls_key_file),
        ] {
            if src.is_some() {
                dst.clone_from(src);
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn file_then_env_then_validation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.toml");
        std::fs::write(
            &path,
            "roles = [\"api\", \"projector\"]\n[nats]\nurl = \"nats://10.0.0.1:4222\"\nreplicas = 3\n[database]\nurl = \"postgres://sluice@db/sluice\"\n[http]\naddr = \"0.0.0.0:9000\"\n",
        )
        .unwrap();
        let c = Config::load_with(Some(&path), none).unwrap();
        assert_eq!(c.roles(), vec![Role::Api, Role::Projector]);
        assert_eq!(c.nats.replicas, Some(3));
        assert_eq!(c.http_addr().port(), 9000);

        let env = |k: &str| match k {
            "SLUICE_DATABASE_URL" => Some("sqlite://x.db".to_owned()),
            "SLUICE_ROLES" => Some("worker,saga".to_owned()),
            _ => None,
        };
        let c = Config::load_with(Some(&path), env).unwrap();
        assert_eq!(c.database.url.as_deref(), Some("sqlite://x.db"));
        assert_eq!(c.roles(), vec![Role::Worker, Role::Saga]);
        assert_eq!(c.worker_timeouts().1.as_secs(), 15);
        assert_eq!(c.idempotency_retention().as_secs(), 86_400);
        // The sagas' overall deadline: each module's own unless configured.
        assert_eq!(c.saga_deadline(), None);
        std::fs::write(&path, "[workers]\nsaga_deadline_secs = 600\n").unwrap();
        let c = Config::load_with(Some(&path), none).unwrap();
        assert_eq!(c.saga_deadline().map(|d| d.as_secs()), Some(600));
        let env = |k: &str| (k == "SLUICE_SAGA_DEADLINE_SECS").then(|| "120".to_owned());
        let c = Config::load_with(None, env).unwrap();
        assert_eq!(c.saga_deadline().map(|d| d.as_secs()), Some(120));
        std::fs::write(&path, "[idempotency]\nretention_secs = 3600\n").unwrap();
        let c = Config::load_with(Some(&path), none).unwrap();
        assert_eq!(c.idempotency_retention().as_secs(), 3600);
        let env = |k: &str| (k == "SLUICE_IDEMPOTENCY_RETENTION_SECS").then(|| "60".to_owned());
        assert_eq!(
            Config::load_with(Some(&path), env)
                .unwrap()
                .idempotency_retention()
                .as_secs(),
            60
        );
        let env = |k: &str| match k {
            "SLUICE_WORKER_ACK_WAIT_SECS" => Some("2".to_owned()),
            "SLUICE_WORKER_PIN_TIMEOUT_SECS" => Some("5".to_owned()),
            _ => None,
        };
        let c = Config::load_with(None, env).unwrap();
        assert_eq!(
            (
                c.worker_timeouts().0.as_secs(),
                c.worker_timeouts().1.as_secs()
            ),
            (2, 5)
        );
        assert_eq!(
            Config::load_with(None, none).unwrap().roles(),
            Role::ALL.to_vec()
        );
    }

    #[test]
    fn trusted_proxies_take_addresses_and_networks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.toml");
        std::fs::write(
            &path,
            "[http]\ntrusted_proxies = [\"10.0.0.0/8\", \"192.168.1.5\", \"::1\"]\n",
        )
        .unwrap();
        let c = Config::load_with(Some(&path), none).unwrap();
        let nets = c.trusted_proxies().unwrap();
        assert_eq!(nets.len(), 3);
        assert!(nets[0].contains(&"10.9.8.7".parse::<std::net::IpAddr>().unwrap()));
        assert!(nets[1].contains(&"192.168.1.5".parse::<std::net::IpAddr>().unwrap()));
        assert!(!nets[1].contains(&"192.168.1.6".parse::<std::net::IpAddr>().unwrap()));
        let env = |k: &str| {
            (k == "SLUICE_HTTP_TRUSTED_PROXIES").then(|| "127.0.0.1, 10.1.0.0/16".to_owned())
        };
        let c = Config::load_with(None, env).unwrap();
        assert_eq!(c.trusted_proxies().unwrap().len(), 2);
    }

    #[test]
    fn http_connection_limits_come_from_the_file_and_the_environment() {
        let d = Config::load_with(None, none)
            .unwrap()
            .conn_limits(Duration::from_secs(30));
        assert_eq!(d.header_read_timeout, Duration::from_secs(10));
        assert_eq!(d.idle_timeout, Duration::from_secs(60));
        assert!(d.max_connections >= 16 && d.max_connections <= 1024);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.toml");
        std::fs::write(
            &path,
            "[http]\nheader_read_timeout_secs = 3\nmax_connections = 50\nmax_headers = 40\n",
        )
        .unwrap();
        let env = |k: &str| (k == "SLUICE_HTTP_IDLE_TIMEOUT_SECS").then(|| "7".to_owned());
        let l = Config::load_with(Some(&path), env)
            .unwrap()
            .conn_limits(Duration::from_secs(5));
        assert_eq!(
            (
                l.header_read_timeout,
                l.idle_timeout,
                l.max_connections,
                l.max_headers
            ),
            (Duration::from_secs(3), Duration::from_secs(7), 50, 40)
        );
        assert_eq!(l.request_timeout, Duration::from_secs(5));
    }

    #[test]
    fn bad_configs_say_what_to_fix() {
        let cases = [
            ("[nats]\npassword = \"hunter2\"\n", "password_file"),
            ("[nats]\nreplicas = 2\n", "use 1"),
            ("[database]\nurl = \"mysql://x\"\n", "sqlite://"),
            ("[nats]\ncreds_file = \"/nope.creds\"\n", "no such file"),
            ("[nats]\nuser = \"api\"\n", "no password"),
            ("colour = \"blue\"\n", "unknown field"),
            ("roles = [\"janitor\"]\n", "unknown variant"),
            (
                "[workers]\nack_wait_secs = 30\npin_timeout_secs = 20\n",
                "must exceed",
            ),
            ("[workers]\nack_wait_secs = 0\n", "at least 1"),
            (
                "[http]\ntrusted_proxies = [\"10.0.0.0/33\"]\n",
                "not an IP address or CIDR",
            ),
            (
                "[workers]\nack_wait_secs = 10\npin_timeout_secs = 20\n",
                "half the transfer step deadline",
            ),
            ("[idempotency]\nretention_secs = 0\n", "retention_secs = 0"),
            (
                "[workers]\nsaga_deadline_secs = 5\n",
                "at least the transfer step deadline",
            ),
            ("[http]\nheader_read_timeout_secs = 0\n", "at least 1"),
            ("[http]\nmax_header_bytes = 100\n", "at least 1024"),
            ("[http]\nmax_connections = 0\n", "too small"),
            ("[http]\ntls_cert = \"/nope.pem\"\n", "go together"),
            (
                "[http]\ntls_cert = \"/nope.pem\"\ntls_key = \"/nope.key\"\n",
                "no such file",
            ),
        ];
        let dir = tempfile::tempdir().unwrap();
        for (text, expected) in cases {
            let path = dir.path().join("c.toml");
            std::fs::write(&path, text).unwrap();
            let err = format!("{:#}", Config::load_with(Some(&path), none).unwrap_err());
            assert!(err.contains(expected), "{text:?}: {err}");
        }
        let env = |k: &str| (k == "SLUICE_ROLES").then(|| "api,janitor".to_owned());
        let err = Config::load_with(None, env).unwrap_err().to_string();
        assert!(err.contains("unknown role \"janitor\""), "{err}");
    }
}
