//! A nats-server child process: the embedded default of `sluice up`, and the
//! server the test harness starts. It never uses whatever `nats-server` is on
//! `PATH` (Debian ships 2.9, which Sluice refuses).

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::server::ServerVersion;

/// Environment variable naming the nats-server binary to run.
pub const NATS_SERVER_BIN_ENV: &str = "SLUICE_NATS_SERVER_BIN";
/// Where `scripts/setup.sh` installs the pinned nats-server.
const TOOLS_BIN: &str = ".tools/venv/bin/nats-server";

/// How often JetStream fsyncs its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncInterval {
    /// fsync after every write: nothing acknowledged is lost on machine crash.
    Always,
    /// The server default (2 minutes): fast, loses recent writes on power loss.
    ServerDefault,
}

/// How to start an embedded nats-server.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// Directory for the JetStream store, config and log.
    pub dir: PathBuf,
    /// Port on 127.0.0.1; `None` picks a free one.
    pub port: Option<u16>,
    /// fsync policy.
    pub sync: SyncInterval,
    /// The binary; `None` uses [`find_nats_server_bin`].
    pub bin: Option<PathBuf>,
    /// Extra nats-server configuration appended verbatim (cluster blocks, ...).
    pub extra_config: String,
    /// Name of the server (must be unique within a cluster).
    pub server_name: String,
    /// Environment for the server process (config files read `$VARS` from it,
    /// which keeps passwords out of files).
    pub env: Vec<(String, String)>,
    /// Who may connect. The default asks every client for a password.
    pub auth: EmbeddedAuth,
}

/// How clients authenticate to an embedded server.
///
/// An embedded server with no authorization lets any local process append
/// events or delete the `EVENTS` stream, bypassing the HTTP token: so the
/// default generates an admin password on first start and keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmbeddedAuth {
    /// One admin user whose password is generated on first start and kept
    /// in `file` (mode 0600; JSON `{"user": ..., "password": ...}`). A
    /// directory from before authorization gets the file on its next start.
    Generated {
        /// Where the credential lives.
        file: PathBuf,
    },
    /// One user with this password (a cluster whose nodes share it).
    Password(Credentials),
    /// No `authorization` block from Sluice: `extra_config` brings its own
    /// (accounts with per-role users), or the server is anonymous.
    FromExtraConfig,
}

/// A user and password for one embedded server.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Credentials {
    /// The user name.
    pub user: String,
    /// The password: URL-safe characters only, so it fits in a `nats://` URL.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"***")
            .finish()
    }
}

/// The user name of the generated embedded credential.
pub const EMBEDDED_ADMIN_USER: &str = "admin";

impl Credentials {
    /// A fresh admin credential with 244 random bits.
    pub fn generate() -> Self {
        Self {
            user: EMBEDDED_ADMIN_USER.to_owned(),
            password: format!(
                "{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            ),
        }
    }

    /// Reads the credential in `file`; `None` when there is no such file.
    pub fn load(file: &Path) -> Result<Option<Self>, Error> {
        let err = |e: &dyn std::fmt::Display| {
            Error::Embedded(format!("NATS credential {}: {e}", file.display()))
        };
        match std::fs::read(file) {
            Ok(bytes) => {
                let c: Credentials = serde_json::from_slice(&bytes).map_err(|e| {
                    err(&format_args!(
                        "{e}; delete the file to generate a new credential"
                    ))
                })?;
                c.validate().map_err(|e| err(&e))?;
                Ok(Some(c))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(err(&e)),
        }
    }

    /// Reads the credential in `file`, creating it (mode 0600) when missing.
    /// Returns whether it was created. Only the server's start creates one:
    /// a client that created its own would hold a password the server does
    /// not know.
    pub fn load_or_create(file: &Path) -> Result<(Self, bool), Error> {
        if let Some(c) = Self::load(file)? {
            return Ok((c, false));
        }
        let err = |e: &dyn std::fmt::Display| {
            Error::Embedded(format!("NATS credential {}: {e}", file.display()))
        };
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
        }
        let c = Self::generate();
        let text = serde_json::to_vec_pretty(&c).map_err(|e| err(&e))?;
        write_private(file, &text).map_err(|e| err(&e))?;
        Ok((c, true))
    }

    fn validate(&self) -> Result<(), String> {
        let safe = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b))
        };
        if !safe(&self.user) || !safe(&self.password) || self.password.len() < 16 {
            return Err(
                "user and password must be URL-safe (letters, digits, -_.~), the password at least 16 characters"
                    .into(),
            );
        }
        Ok(())
    }

    /// `url` (`nats://host:port`) with this user and password in it, the form
    /// [`crate::ConnectConfig`] takes credentials from.
    pub fn url_with(&self, url: &str) -> String {
        match url.split_once("://") {
            Some((scheme, rest)) => format!("{scheme}://{}:{}@{rest}", self.user, self.password),
            None => format!("nats://{}:{}@{url}", self.user, self.password),
        }
    }
}

/// Writes `bytes` to `path` readable by its owner only (also when the file
/// exists with a wider mode), through a temporary file and a rename.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

impl EmbeddedConfig {
    /// A single server with its store under `dir`, fsync always.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let dir: PathBuf = dir.into();
        Self {
            dir: dir.clone(),
            port: None,
            sync: SyncInterval::Always,
            bin: None,
            extra_config: String::new(),
            server_name: "sluice".to_owned(),
            env: Vec::new(),
            auth: EmbeddedAuth::Generated {
                file: dir.join("credentials.json"),
            },
        }
    }
}

/// Finds the nats-server to run: `$SLUICE_NATS_SERVER_BIN`, else the pinned one
/// installed by `scripts/setup.sh` in `.tools/` of this directory, one of its
/// parents, or a parent of the running executable.
pub fn find_nats_server_bin() -> Result<PathBuf, Error> {
    if let Some(bin) = std::env::var_os(NATS_SERVER_BIN_ENV) {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(Error::Embedded(format!(
                "{NATS_SERVER_BIN_ENV}={} does not exist",
                bin.display()
            )))
        };
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    roots
        .into_iter()
        .map(|r| r.join(TOOLS_BIN))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Embedded(format!(
                "no nats-server found: run scripts/setup.sh (installs 2.15.1 into .tools/) or set {NATS_SERVER_BIN_ENV}"
            ))
        })
}

/// Reads `nats-server --version` and refuses servers older than 2.12.
pub fn binary_version(bin: &Path) -> Result<ServerVersion, Error> {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .map_err(|e| Error::Embedded(format!("cannot run {}: {e}", bin.display())))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // Prints "nats-server: v2.15.1".
    let raw = text.trim().rsplit(' ').next().unwrap_or("").to_owned();
    let v = ServerVersion::parse(&raw).ok_or_else(|| {
        Error::Embedded(format!(
            "cannot read the version of {}: {text:?}",
            bin.display()
        ))
    })?;
    v.ensure_supported(&raw)
}

/// Whether `pid` is a process that has not exited (a zombie has).
fn process_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // "pid (comm) S ...": the state follows the last ')'.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// Whether a NUL-separated command line runs a `nats-server` binary with
/// `conf` among its arguments.
fn runs_config(cmdline: &[u8], conf: &Path) -> bool {
    let mut args = cmdline.split(|b| *b == 0);
    let is_nats_server = args.next().is_some_and(|bin| {
        Path::new(std::ffi::OsStr::from_bytes(bin))
            .file_name()
            .is_some_and(|name| name.as_bytes().starts_with(b"nats-server"))
    });
    is_nats_server && args.any(|arg| Path::new(std::ffi::OsStr::from_bytes(arg)) == conf)
}

fn free_port() -> Result<u16, Error> {
    let l = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::Embedded(format!("cannot find a free port: {e}")))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::Embedded(format!("cannot find a free port: {e}")))
}

/// A running nats-server child process; killed when dropped.
#[derive(Debug)]
pub struct EmbeddedServer {
    config: EmbeddedConfig,
    bin: PathBuf,
    port: u16,
    credentials: Option<Credentials>,
    child: Option<Child>,
}

impl EmbeddedServer {
    /// Starts the server and waits until it accepts connections. A
    /// nats-server an earlier start left running on this store (its parent
    /// killed with SIGKILL) is stopped first, with a warning: never two
    /// servers on one store.
    pub fn start(mut config: EmbeddedConfig) -> Result<Self, Error> {
        let bin = match config.bin.clone() {
            Some(b) => b,
            None => find_nats_server_bin()?,
        };
        binary_version(&bin)?;
        let port = match config.port {
            Some(p) => p,
            None => free_port()?,
        };
        config.port = Some(port);
        let credentials = match &config.auth {
            EmbeddedAuth::Generated { file } => {
                let (c, created) = Credentials::load_or_create(file)?;
                if created {
                    tracing::info!(file = %file.display(), "generated the embedded nats-server's admin credential");
                }
                Some(c)
            }
            EmbeddedAuth::Password(c) => {
                c.validate()
                    .map_err(|e| Error::Embedded(format!("embedded NATS credential: {e}")))?;
                Some(c.clone())
            }
            EmbeddedAuth::FromExtraConfig => None,
        };
        let mut server = Self {
            config,
            bin,
            port,
            credentials,
            child: None,
        };
        server.spawn()?;
        Ok(server)
    }

    fn write_config(&self) -> Result<PathBuf, Error> {
        let dir = &self.config.dir;
        let io = |e: std::io::Error| Error::Embedded(format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(dir.join("jetstream")).map_err(io)?;
        let sync = match self.config.sync {
            SyncInterval::Always => "  sync_interval: always\n",
            SyncInterval::ServerDefault => "",
        };
        // No anonymous access: one user, the password only in this file
        // (mode 0600) and the credential file beside it.
        let auth = match &self.credentials {
            Some(c) => format!(
                "authorization {{\n  user: \"{}\"\n  password: \"{}\"\n}}\n",
                c.user, c.password
            ),
            None => String::new(),
        };
        let text = format!(
            "# Written by Sluice; regenerated at every start.\nserver_name: \"{name}\"\n# Loopback only: nothing off this machine reaches it.\nlisten: \"127.0.0.1:{port}\"\nlog_file: \"{log}\"\npid_file: \"{pid}\"\n{auth}jetstream {{\n  store_dir: \"{store}\"\n{sync}}}\n{extra}\n",
            name = self.config.server_name,
            port = self.port,
            log = dir.join("nats-server.log").display(),
            pid = self.pid_path().display(),
            store = dir.join("jetstream").display(),
            extra = self.config.extra_config,
        );
        let path = dir.join("nats-server.conf");
        write_private(&path, text.as_bytes()).map_err(io)?;
        Ok(path)
    }

    fn spawn(&mut self) -> Result<(), Error> {
        self.stop_leftover()?;
        let conf = self.write_config()?;
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&conf)
            .envs(self.config.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Error::Embedded(format!("cannot start {}: {e}", self.bin.display())))?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(20))
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(Error::Embedded(format!(
                    "nats-server exited with {status} at start; see {}",
                    self.log_path().display()
                )));
            }
            if Instant::now() > deadline {
                return Err(Error::Embedded(format!(
                    "nats-server did not listen on 127.0.0.1:{} within {timeout:?}; see {}",
                    self.port,
                    self.log_path().display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid_path(&self) -> PathBuf {
        self.config.dir.join("nats-server.pid")
    }

    /// A server of this directory still running from an earlier start whose
    /// parent died without stopping it (`sluice up` killed with SIGKILL): two
    /// servers on one store would corrupt it, so stop that one first. It is
    /// found through the pid file its configuration names, and is ours only
    /// when `/proc/<pid>/cmdline` runs a `nats-server` with this directory's
    /// config (a recycled pid is left alone). SIGTERM, then SIGKILL after
    /// 10 s; an error if it still runs after that.
    fn stop_leftover(&self) -> Result<(), Error> {
        let Ok(text) = std::fs::read_to_string(self.pid_path()) else {
            return Ok(());
        };
        let Ok(pid) = text.trim().parse::<u32>() else {
            return Ok(());
        };
        let conf = self.config.dir.join("nats-server.conf");
        let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|cmdline| runs_config(&cmdline, &conf));
        if !ours || !process_running(pid) {
            return Ok(());
        }
        tracing::warn!(
            pid,
            dir = %self.config.dir.display(),
            "a nats-server from an earlier start still runs on this store (its parent was killed); stopping it before starting another"
        );
        let signal = |sig: &str| {
            let _ = Command::new("kill").arg(sig).arg(pid.to_string()).status();
        };
        let stopped_within = |timeout: Duration| {
            let deadline = Instant::now() + timeout;
            while process_running(pid) {
                if Instant::now() > deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            true
        };
        signal("-TERM");
        if stopped_within(Duration::from_secs(10)) {
            return Ok(());
        }
        tracing::warn!(
            pid,
            "the leftover nats-server did not stop in 10 s; killing it"
        );
        signal("-KILL");
        if stopped_within(Duration::from_secs(5)) {
            return Ok(());
        }
        Err(Error::Embedded(format!(
            "a nats-server (pid {pid}) from an earlier start still runs on {} and did not stop; stop it, then start again",
            self.config.dir.display()
        )))
    }

    /// The client URL with the credential in it,
    /// `nats://<user>:<password>@127.0.0.1:<port>` (or without one when the
    /// server has no Sluice credential). [`crate::ConnectConfig`] and
    /// [`crate::EventStore::connect`] authenticate with it; a raw
    /// `async_nats::connect` ignores credentials in URLs.
    pub fn url(&self) -> String {
        match &self.credentials {
            Some(c) => c.url_with(&self.anonymous_url()),
            None => self.anonymous_url(),
        }
    }

    /// `nats://127.0.0.1:<port>`, no credential: safe to print or store.
    pub fn anonymous_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The credential clients need, if the server asks for one.
    pub fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.config.dir.join("nats-server.log")
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &EmbeddedConfig {
        &self.config
    }

    /// kill -9: no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait (up to `timeout`, then kill -9): a clean shutdown.
    pub fn stop(&mut self, timeout: Duration) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            tracing::warn!(
                pid = child.id(),
                "nats-server did not stop in time; killing it"
            );
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store (after kill or stop).
    pub fn restart(&mut self) -> Result<(), Error> {
        self.kill();
        self.spawn()
    }
}

impl Drop for EmbeddedServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leftover_is_a_nats_server_on_this_config_only() {
        let conf = Path::new("/home/a/.sluice/nats/nats-server.conf");
        let cmdline = |args: &[&str]| args.join("\0").into_bytes();
        assert!(runs_config(
            &cmdline(&[
                "/opt/bin/nats-server",
                "-c",
                "/home/a/.sluice/nats/nats-server.conf"
            ]),
            conf
        ));
        // Another store, another program with the same argument, nothing.
        assert!(!runs_config(
            &cmdline(&[
                "/opt/bin/nats-server",
                "-c",
                "/home/b/.sluice/nats/nats-server.conf"
            ]),
            conf
        ));
        assert!(!runs_config(
            &cmdline(&["/usr/bin/vim", "/home/a/.sluice/nats/nats-server.conf"]),
            conf
        ));
        assert!(!runs_config(b"", conf));
    }
}
