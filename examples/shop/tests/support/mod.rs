//! Process-level helpers for the `shop` binary's tests: plain HTTP over
//! loopback and a running `shop up` (after `crates/sluice/tests/support`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a poll waits before the test fails.
pub(crate) const WAIT: Duration = Duration::from_secs(60);

/// Polls `check` until it gives a value; fails after [`WAIT`].
pub(crate) fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A plain HTTP/1.1 request over loopback with the bearer `token`:
/// (status, JSON body or `null`).
pub(crate) fn http(addr: &str, token: &str, method: &str, path: &str, body: &str) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw.split(' ').nth(1).and_then(|c| c.parse().ok());
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (
        status.unwrap_or(0),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

/// A running `shop up`: its HTTP address and API token; stopped (SIGTERM,
/// so it stops its nats-server) when dropped.
pub(crate) struct Up {
    child: Child,
    /// Where its HTTP API listens.
    pub(crate) addr: String,
    /// The API token it wrote to its home.
    pub(crate) token: String,
}

impl Up {
    /// Starts `bin up` in `home` (HTTP on a free port, the embedded
    /// nats-server and SQLite) and waits for its endpoint file.
    pub(crate) fn start(bin: &str, home: &Path) -> Self {
        let mut cmd = Command::new(bin);
        cmd.args(["up", "--home"])
            .arg(home)
            .args(["--http", "127.0.0.1:0"])
            .env_remove("SLUICE_HOME")
            .env_remove("SLUICE_HTTP_ADDR")
            .env_remove("SLUICE_DATABASE_URL")
            .env_remove("SLUICE_NATS_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().expect("spawn shop up");
        let pid = child.id();
        // A killed run leaves its endpoint file behind: wait for ours.
        let addr = wait_for("the endpoint file of shop up", || {
            let text = std::fs::read(home.join("endpoint.json")).ok()?;
            let e: Value = serde_json::from_slice(&text).ok()?;
            (e["pid"] == pid).then(|| e["http_addr"].as_str().map(str::to_owned))?
        });
        let token = std::fs::read_to_string(home.join("token")).unwrap();
        Self {
            child,
            addr,
            token: token.trim().to_owned(),
        }
    }

    /// `(status, body)` of a request to its API.
    pub(crate) fn call(&self, method: &str, path: &str, body: &str) -> (u16, Value) {
        http(&self.addr, &self.token, method, path, body)
    }

    /// SIGKILL, as a crash: nothing of it runs any more but the embedded
    /// nats-server it leaves behind (returned: its pid), which the next
    /// `shop up` on `home` has to stop before starting its own.
    pub(crate) fn crash(mut self, home: &Path) -> u32 {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        let orphans = nats_servers_on(home);
        assert_eq!(orphans.len(), 1, "the orphaned nats-server: {orphans:?}");
        orphans[0]
    }
}

/// The nats-server processes running on `home`'s embedded store (their
/// command line names its config file); zombies do not count.
pub(crate) fn nats_servers_on(home: &Path) -> Vec<u32> {
    let conf = home.join("nats").join("nats-server.conf");
    let conf = conf.as_os_str().as_encoded_bytes();
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            let running = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                s.rsplit_once(") ")
                    .is_some_and(|(_, r)| !r.starts_with('Z'))
            });
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let mut args = cmdline.split(|b| *b == 0);
            let is_nats = args.next().is_some_and(|bin| bin.ends_with(b"nats-server"));
            running && is_nats && args.any(|a| a == conf)
        })
        .collect();
    pids.sort_unstable();
    pids
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
