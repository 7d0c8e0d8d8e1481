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
}

impl EmbeddedConfig {
    /// A single server with its store under `dir`, fsync always.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            port: None,
            sync: SyncInterval::Always,
            bin: None,
            extra_config: String::new(),
            server_name: "sluice".to_owned(),
            env: Vec::new(),
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
    child: Option<Child>,
}

impl EmbeddedServer {
    /// Starts the server and waits until it accepts connections.
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
        let mut server = Self {
            config,
            bin,
            port,
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
        let text = format!(
            "# Written by Sluice; regenerated at every start.\nserver_name: \"{name}\"\nlisten: \"127.0.0.1:{port}\"\nlog_file: \"{log}\"\npid_file: \"{pid}\"\njetstream {{\n  store_dir: \"{store}\"\n{sync}}}\n{extra}\n",
            name = self.config.server_name,
            port = self.port,
            log = dir.join("nats-server.log").display(),
            pid = self.pid_path().display(),
            store = dir.join("jetstream").display(),
            extra = self.config.extra_config,
        );
        let path = dir.join("nats-server.conf");
        let mut f = std::fs::File::create(&path).map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        Ok(path)
    }

    fn spawn(&mut self) -> Result<(), Error> {
        self.stop_leftover();
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
    /// servers on one store would corrupt it, so stop that one first.
    fn stop_leftover(&self) {
        let Ok(text) = std::fs::read_to_string(self.pid_path()) else {
            return;
        };
        let Ok(pid) = text.trim().parse::<u32>() else {
            return;
        };
        let conf = self.config.dir.join("nats-server.conf");
        let ours = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
            cmdline
                .split(|b| *b == 0)
                .any(|arg| Path::new(std::ffi::OsStr::from_bytes(arg)) == conf)
        });
        if !ours || !process_running(pid) {
            return;
        }
        tracing::warn!(pid, dir = %self.config.dir.display(), "a nats-server from an earlier start still runs on this store; stopping it");
        let signal = |sig: &str| {
            let _ = Command::new("kill").arg(sig).arg(pid.to_string()).status();
        };
        signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while process_running(pid) {
            if Instant::now() > deadline {
                signal("-KILL");
                std::thread::sleep(Duration::from_millis(200));
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The client URL, `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
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
