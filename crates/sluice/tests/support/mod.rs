//! Pieces the process-level test targets share. Each target uses a part of
//! them, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A plain HTTP/1.1 request over loopback: (status, body). `headers` is
/// zero or more `Name: value\r\n` lines.
pub(crate) fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String) {
    let (status, _, body) = http_full(addr, method, path, headers, body);
    (status, body)
}

/// [`http`] with the response's header block (lower-cased) too.
pub(crate) fn http_full(
    addr: &str,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{headers}\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw.as_str(), ""));
    (status, head.to_ascii_lowercase(), body.to_owned())
}

/// A running `sluice up`, stopped when dropped.
pub(crate) struct Up(pub(crate) Child);

impl Drop for Up {
    /// SIGTERM first, so `sluice up` stops the nats-server it started: a
    /// SIGKILL would leave that server running with nobody to stop it.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `sluice up` in `home` on the embedded default (any
/// `SLUICE_DATABASE_URL` / `SLUICE_NATS_URL` of the caller removed), with
/// `configure` adding to its environment, and waits for its endpoint file.
pub(crate) fn start_up(bin: &str, home: &Path, configure: impl FnOnce(&mut Command)) -> Up {
    let mut cmd = Command::new(bin);
    cmd.arg("up")
        .env("SLUICE_HOME", home)
        .env("SLUICE_HTTP_ADDR", "127.0.0.1:0")
        .env_remove("SLUICE_DATABASE_URL")
        .env_remove("SLUICE_NATS_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    configure(&mut cmd);
    let child = cmd.spawn().expect("spawn sluice up");
    let up = Up(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !home.join("endpoint.json").exists() {
        assert!(Instant::now() < deadline, "sluice up did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    up
}

/// The NATS URL of `sluice up`'s embedded server in `home`, with the admin
/// credential it generated (`nats://admin:<password>@...`): what a raw
/// client needs, since the embedded server refuses anonymous ones.
pub(crate) fn admin_nats_url(home: &Path) -> String {
    let endpoint: serde_json::Value =
        serde_json::from_slice(&std::fs::read(home.join("endpoint.json")).unwrap()).unwrap();
    let url = endpoint["nats_url"].as_str().unwrap();
    let creds: serde_json::Value =
        serde_json::from_slice(&std::fs::read(home.join("nats-credentials.json")).unwrap())
            .unwrap();
    let user = creds["user"].as_str().unwrap_or("admin");
    let password = creds["password"].as_str().unwrap();
    url.replacen("nats://", &format!("nats://{user}:{password}@"), 1)
}
