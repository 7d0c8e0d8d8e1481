//! The HTTP API against hostile clients, on the real binary: stalled
//! connections are closed in time and do not take the API down, oversized
//! headers are refused with a problem. Loopback only, bounded in count and
//! time.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

mod support;

const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// The address `sluice up` in `home` serves HTTP on.
fn http_addr(home: &Path) -> String {
    let endpoint: serde_json::Value =
        serde_json::from_slice(&std::fs::read(home.join("endpoint.json")).unwrap()).unwrap();
    endpoint["http_addr"].as_str().unwrap().to_owned()
}

/// `GET /healthz` on a fresh connection: (status, how long it took).
fn timed_healthz(addr: &str) -> (u16, Duration) {
    let started = Instant::now();
    let (status, _) = support::http(addr, "GET", "/healthz", "", "");
    (status, started.elapsed())
}

/// Whether the server has closed `s` (EOF or reset), without waiting.
fn closed_by_server(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 256];
    let mut reader = s;
    let closed = loop {
        match reader.read(&mut buf) {
            Ok(0) => break true,
            // hyper may answer a timed-out request before closing.
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
            Err(_) => break true,
        }
    };
    s.set_nonblocking(false).unwrap();
    closed
}

#[test]
fn slowloris_stalled_connections_are_closed_in_time_and_healthz_stays_answered() {
    let home = tempfile::tempdir().unwrap();
    const TIMEOUT: Duration = Duration::from_secs(2);
    // The real binary under a 1,024-descriptor limit, as a small server
    // would run; short timeouts so the test takes seconds.
    let up = support::start_up("prlimit", home.path(), |cmd| {
        let mut args: Vec<&str> = vec!["--nofile=1024:1024", "--", BIN];
        args.extend(cmd.get_args().map(|a| a.to_str().unwrap()));
        let mut replaced = std::process::Command::new("prlimit");
        replaced.args(args);
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => replaced.env(k, v),
                None => replaced.env_remove(k),
            };
        }
        replaced
            .env("SLUICE_HTTP_HEADER_READ_TIMEOUT_SECS", "2")
            .env("SLUICE_HTTP_IDLE_TIMEOUT_SECS", "2")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        *cmd = replaced;
    });
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", up.0.id())).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 1024 ")),
        "{limits}"
    );
    let addr = http_addr(home.path());
    assert_eq!(timed_healthz(&addr).0, 200);

    // 500 stalled connections: 400 stop in the middle of their headers,
    // 100 never send a byte.
    let opened = Instant::now();
    let stalled: Vec<TcpStream> = (0..500)
        .map(|i| {
            let mut s = TcpStream::connect(&addr).unwrap();
            if i % 5 != 0 {
                s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
                    .unwrap();
            }
            s
        })
        .collect();
    let all_open_after = opened.elapsed();

    // While they hang, the API answers at once.
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let (status, took) = timed_healthz(&addr);
        assert_eq!(status, 200);
        worst = worst.max(took);
    }
    assert!(
        worst < Duration::from_secs(1),
        "/healthz took {worst:?} with 500 stalled connections"
    );
    // They really were held: none closed before the timeout.
    if opened.elapsed() < TIMEOUT - Duration::from_millis(500) {
        let early = stalled.iter().filter(|s| closed_by_server(s)).count();
        assert_eq!(early, 0, "connections closed before the header timeout");
    }

    // And the server closes every one within the timeout (plus its check
    // interval and scheduling slack), counted from when the last opened.
    let deadline = opened + all_open_after + TIMEOUT + Duration::from_millis(1500);
    let mut open: Vec<&TcpStream> = stalled.iter().collect();
    while !open.is_empty() {
        open.retain(|s| !closed_by_server(s));
        assert!(
            Instant::now() < deadline || open.is_empty(),
            "{} of 500 stalled connections still open {:?} after they were opened",
            open.len(),
            opened.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(timed_healthz(&addr).0, 200);
}

/// Sends `GET /healthz` with `extra` header lines: (status, content type,
/// body).
fn get_with_headers(addr: &str, extra: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may refuse and close before it has read everything.
    let _ = write!(
        s,
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{extra}\r\n"
    );
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_owned)
        })
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

#[test]
fn oversized_request_headers_get_a_431_problem() {
    let home = tempfile::tempdir().unwrap();
    let _up = support::start_up(BIN, home.path(), |_| {});
    let addr = http_addr(home.path());

    let many: String = (0..300).map(|i| format!("X-H{i}: v\r\n")).collect();
    let big = format!("X-Big: {}\r\n", "a".repeat(100 * 1024));
    for (what, extra) in [("300 headers", many), ("a 100 KiB header", big)] {
        let (status, content_type, body) = get_with_headers(&addr, &extra);
        assert_eq!(status, 431, "{what}: {body}");
        assert_eq!(content_type, "application/problem+json", "{what}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(
            v["type"].as_str().unwrap().ends_with("/headers-too-large"),
            "{what}: {v}"
        );
        assert!(
            v["detail"]
                .as_str()
                .unwrap()
                .contains("http.max_header_bytes"),
            "{what}: {v}"
        );
    }
    // Far beyond the limit, the protocol parser refuses before any handler:
    // still 431, and the connection is closed.
    let huge = format!("X-Huge: {}\r\n", "a".repeat(1024 * 1024));
    assert_eq!(get_with_headers(&addr, &huge).0, 431);
    // Normal requests are untouched.
    assert_eq!(get_with_headers(&addr, "X-Ok: 1\r\n").0, 200);
}

#[test]
fn up_serves_https_with_the_configured_certificate() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls::pki_types::ServerName;
    use tokio_rustls::rustls::{ClientConfig, RootCertStore, crypto};

    let home = tempfile::tempdir().unwrap();
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert, key) = (home.path().join("api.pem"), home.path().join("api-key.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    let _up = support::start_up(BIN, home.path(), |cmd| {
        cmd.env("SLUICE_HTTP_TLS_CERT", &cert)
            .env("SLUICE_HTTP_TLS_KEY", &key);
    });
    let addr = http_addr(home.path());

    let mut roots = RootCertStore::empty();
    roots.add(made.cert.der().clone()).unwrap();
    let config =
        ClientConfig::builder_with_provider(std::sync::Arc::new(crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let raw = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let mut s = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut raw = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw)).await;
        String::from_utf8_lossy(&raw).into_owned()
    });
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    // Plain HTTP on the same port is not served.
    let mut plain = TcpStream::connect(&addr).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = plain.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(!answer.starts_with(b"HTTP/1.1 200"));
}

#[test]
fn a_certificate_without_its_key_stops_the_start() {
    let home = tempfile::tempdir().unwrap();
    let cert = home.path().join("api.pem");
    std::fs::write(&cert, "x").unwrap();
    let o = std::process::Command::new(BIN)
        .arg("up")
        .env("SLUICE_HOME", home.path())
        .env("SLUICE_HTTP_ADDR", "127.0.0.1:0")
        .env("SLUICE_HTTP_TLS_CERT", &cert)
        .env_remove("SLUICE_HTTP_TLS_KEY")
        .env_remove("SLUICE_NATS_URL")
        .env_remove("SLUICE_DATABASE_URL")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("go together"), "{err}");
}

fn sluice_token(home: &Path, args: &[&str]) -> String {
    let o = std::process::Command::new(BIN)
        .arg("token")
        .args(args)
        .env("SLUICE_HOME", home)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}\r\n")
}

#[test]
fn scoped_tokens_are_enforced_and_a_revoked_one_is_refused_at_once() {
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("sluice.toml");
    // Production-like: reads need a token too.
    std::fs::write(&config, "[http]\nopen_reads = false\n").unwrap();
    let _up = support::start_up(BIN, home.path(), |cmd| {
        cmd.env("SLUICE_CONFIG", &config);
    });
    let addr = http_addr(home.path());
    let reader = sluice_token(home.path(), &["create", "reader", "--scope", "read"]);
    let writer = sluice_token(home.path(), &["create", "writer", "--scope", "read,write"]);
    let listed = sluice_token(home.path(), &["list"]);
    assert!(
        listed.contains("reader\tread\t") && listed.contains("writer\tread,write\t"),
        "{listed}"
    );
    assert!(
        !std::fs::read_to_string(home.path().join("tokens.json"))
            .unwrap()
            .contains(&reader)
    );

    let append = r#"{"expected_version":"none","events":[{"type":"t.v1","data":{}}]}"#;
    let assert_problem = |(status, body): (u16, String), want: u16, slug: &str| {
        assert_eq!(status, want, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(v["type"].as_str().unwrap().ends_with(slug), "{v}");
    };
    // A read token may read, not append nor redrive.
    let (status, _) = support::http(&addr, "GET", "/v1/projections", &bearer(&reader), "");
    assert_eq!(status, 200);
    assert_problem(
        support::http(
            &addr,
            "POST",
            "/v1/streams/thing/t-1",
            &bearer(&reader),
            append,
        ),
        403,
        "/forbidden",
    );
    assert_problem(
        support::http(&addr, "POST", "/v1/dlq/1/redrive", &bearer(&reader), ""),
        403,
        "/forbidden",
    );
    assert_problem(
        support::http(&addr, "GET", "/v1/dlq", &bearer(&writer), ""),
        403,
        "/forbidden",
    );
    // Without a token, reads are refused; the probes are not.
    assert_problem(
        support::http(&addr, "GET", "/v1/projections", "", ""),
        401,
        "/unauthorized",
    );
    assert_eq!(support::http(&addr, "GET", "/healthz", "", "").0, 200);
    assert_eq!(support::http(&addr, "GET", "/metrics", "", "").0, 401);
    // The write token appends; the single legacy token may do everything.
    let (status, body) = support::http(
        &addr,
        "POST",
        "/v1/streams/thing/t-1",
        &bearer(&writer),
        append,
    );
    assert!(status == 200 || status == 201, "{status} {body}");
    let legacy = std::fs::read_to_string(home.path().join("token")).unwrap();
    assert_eq!(
        support::http(&addr, "GET", "/v1/dlq", &bearer(legacy.trim()), "").0,
        200
    );
    // Revoked: refused with the very next request, no restart.
    sluice_token(home.path(), &["revoke", "writer"]);
    assert_problem(
        support::http(
            &addr,
            "POST",
            "/v1/streams/thing/t-2",
            &bearer(&writer),
            append,
        ),
        401,
        "/unauthorized",
    );
    assert_eq!(
        support::http(&addr, "GET", "/v1/projections", &bearer(&reader), "").0,
        200
    );
}
