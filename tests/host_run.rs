//! The ledger app run in-process through `sluice_host::run`: the embedded
//! nats-server, SQLite and every role, driven over HTTP, then stopped by
//! cancelling its token (no signals, no child `sluice` process).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_host::{App, RunConfig, run};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// How long a poll waits before the test fails.
const WAIT: Duration = Duration::from_secs(60);

/// A plain HTTP/1.1 request over loopback with the bearer `token`:
/// (status, JSON body or `null`).
async fn http(addr: SocketAddr, token: &str, method: &str, path: &str, body: &str) -> (u16, Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(15), s.read_to_string(&mut raw))
        .await
        .expect("the API answers")
        .unwrap();
    let status = raw.split(' ').nth(1).and_then(|c| c.parse().ok());
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (
        status.unwrap_or(0),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

/// The `account_balances` row of `id` once its balance is `want`.
async fn wait_balance(addr: SocketAddr, token: &str, id: &str, want: i64) {
    let path = format!("/v1/projections/account_balances/rows/{id}");
    let start = Instant::now();
    loop {
        let (status, row) = http(addr, token, "GET", &path, "").await;
        if status == 200 && row["balance"].as_i64() == Some(want) {
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "the balance of {id} never became {want}: {status} {row}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_runs_in_process_and_stops_on_its_token() {
    let home = tempfile::tempdir().unwrap();
    let app = App::new("sluice").module(sluice_ledger::module());
    let mut config = RunConfig::up(home.path());
    config.http = Some("127.0.0.1:0".parse().unwrap());
    let shutdown = CancellationToken::new();
    let running = run(&app, config, shutdown.clone()).await.unwrap();

    // Started: where it runs is known without reading any output.
    let addr = running.http_addr().expect("the api role listens");
    assert_ne!(addr.port(), 0);
    assert!(running.embedded());
    assert!(
        running.nats_url().starts_with("nats://127.0.0.1:"),
        "{}",
        running.nats_url()
    );
    assert!(!running.nats_url().contains('@'), "no credential in it");
    assert_eq!(running.home(), home.path());
    let endpoint = home.path().join("endpoint.json");
    let written: Value = serde_json::from_slice(&std::fs::read(&endpoint).unwrap()).unwrap();
    assert_eq!(written["http_addr"], addr.to_string());
    let token = std::fs::read_to_string(home.path().join("token")).unwrap();
    let token = token.trim();

    // Two accounts, a deposit, a transfer through the saga.
    for (id, owner) in [("acc-1", "ann"), ("acc-2", "bob")] {
        let body = json!({"id": id, "owner": owner, "currency": "EUR"}).to_string();
        let (status, opened) = http(addr, token, "POST", "/v1/accounts", &body).await;
        assert_eq!(status, 201, "{opened}");
    }
    let body = json!({"amount": 100}).to_string();
    let (status, deposited) = http(addr, token, "POST", "/v1/accounts/acc-1/deposits", &body).await;
    assert_eq!(status, 201, "{deposited}");
    let body = json!({"id": "t-1", "from": "acc-1", "to": "acc-2", "amount": 30}).to_string();
    let (status, started) = http(addr, token, "POST", "/v1/transfers", &body).await;
    assert_eq!(status, 202, "{started}");
    let start = Instant::now();
    loop {
        let (status, t) = http(addr, token, "GET", "/v1/transfers/t-1", "").await;
        assert_eq!(status, 200, "{t}");
        match t["state"].as_str() {
            Some("completed") => break,
            Some("pending") => {}
            other => panic!("the transfer ended {other:?}: {t}"),
        }
        assert!(start.elapsed() < WAIT, "the transfer never completed: {t}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_balance(addr, token, "acc-1", 70).await;
    wait_balance(addr, token, "acc-2", 30).await;

    // The token stops it cleanly: every role, the server, the endpoint file.
    shutdown.cancel();
    tokio::time::timeout(WAIT, running.wait())
        .await
        .expect("it stops")
        .unwrap();
    assert!(!endpoint.exists(), "the endpoint file is removed");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the API no longer listens"
    );
}
