//! The `shop` binary end to end: `shop up` (embedded nats-server, SQLite,
//! every role) driven over HTTP, killed with SIGKILL mid-order and started
//! again on the same home.

mod support;

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};
use support::{Up, wait_for};

const BIN: &str = env!("CARGO_BIN_EXE_shop");

fn receive(up: &Up, sku: &str, quantity: i64) {
    let body = json!({"quantity": quantity}).to_string();
    let (status, created) = up.call("POST", &format!("/v1/stock/{sku}/receipts"), &body);
    assert_eq!(status, 201, "{created}");
}

fn place(up: &Up, id: &str, sku: &str, quantity: i64) {
    let lines = json!([{"sku": sku, "quantity": quantity}]);
    let body = json!({"id": id, "customer": "ann", "lines": lines}).to_string();
    let (status, placed) = up.call("POST", "/v1/orders", &body);
    assert_eq!(status, 202, "{placed}");
}

/// The order's state once it is confirmed or cancelled.
fn ended(up: &Up, id: &str) -> String {
    wait_for(&format!("order {id} to end"), || {
        let (status, view) = up.call("GET", &format!("/v1/orders/{id}"), "");
        assert_eq!(status, 200, "{view}");
        let state = view["state"].as_str().unwrap().to_owned();
        (state != "placed").then_some(state)
    })
}

/// The `stock_levels` row of `sku` once it is `(available, reserved, sold)`.
fn wait_levels(up: &Up, sku: &str, want: (i64, i64, i64)) {
    let path = format!("/v1/projections/stock_levels/rows/{sku}");
    let mut last = Value::Null;
    let start = std::time::Instant::now();
    while start.elapsed() < support::WAIT {
        let (status, row) = up.call("GET", &path, "");
        let n = |f: &str| row[f].as_i64();
        if status == 200
            && (n("available"), n("reserved"), n("sold"))
                == (Some(want.0), Some(want.1), Some(want.2))
        {
            return;
        }
        last = row;
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("stock_levels of {sku} never became {want:?}: {last}");
}

/// Per order, the units of `sku` reserved and sold, from the stock's own
/// events: an effect applied twice would show as a second event.
fn effects(up: &Up, sku: &str) -> Vec<(String, String, i64)> {
    let (status, page) = up.call("GET", &format!("/v1/streams/stock/{sku}"), "");
    assert_eq!(status, 200, "{page}");
    assert!(page["next"].is_null(), "one page holds them all: {page}");
    let events = page["events"].as_array().unwrap();
    let mut out: Vec<_> = events
        .iter()
        .filter(|e| e["type"] != "shop.stock.received.v1")
        .map(|e| {
            let kind = e["type"].as_str().unwrap().split('.').nth(2).unwrap();
            let order = e["data"]["order"].as_str().unwrap().to_owned();
            (
                order,
                kind.to_owned(),
                e["data"]["quantity"].as_i64().unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

fn shop(home: &Path, args: &[&str]) -> String {
    let o = Command::new(BIN)
        .args(args)
        .arg("--home")
        .arg(home)
        .env_remove("SLUICE_HOME")
        .env_remove("SLUICE_NATS_URL")
        .env_remove("SLUICE_DATABASE_URL")
        .output()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "shop {args:?}: {out}{err}");
    out.into_owned()
}

#[test]
fn shop_up_serves_the_shop_alone_and_survives_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let up = Up::start(BIN, home);

    // 5 widgets; orders of 2, 2 and 4, one after the other.
    receive(&up, "widget", 5);
    for (id, quantity, state) in [
        ("o-1", 2, "confirmed"),
        ("o-2", 2, "confirmed"),
        ("o-3", 4, "cancelled"),
    ] {
        place(&up, id, "widget", quantity);
        assert_eq!(ended(&up, id), state, "order {id}");
    }
    wait_levels(&up, "widget", (1, 0, 4));

    // The document names the shop's routes and the platform's, nothing of
    // the ledger.
    let (status, doc) = up.call("GET", "/openapi.json", "");
    assert_eq!(status, 200);
    let paths: Vec<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for p in [
        "/v1/orders",
        "/v1/orders/{id}",
        "/v1/stock/{sku}/receipts",
        "/v1/streams/{category}/{id}",
        "/v1/dlq",
    ] {
        assert!(paths.contains(&p), "{p} missing from {paths:?}");
    }
    for p in ["/v1/accounts", "/v1/transfers", "/v1/sagas"] {
        assert!(!paths.iter().any(|q| q.starts_with(p)), "{p} in {paths:?}");
    }

    // The CLI finds the running process through the home.
    let listed = shop(home, &["projection", "list", "--json"]);
    let mut names: Vec<String> = listed
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["name"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    names.sort();
    assert_eq!(names, ["orders", "stock_levels"], "{listed}");

    // Two orders for the last widget, then a crash before they end.
    place(&up, "o-4", "widget", 1);
    place(&up, "o-5", "widget", 1);
    let orphan = up.crash(home);
    let up = Up::start(BIN, home);
    // The new start stopped the nats-server the killed one left running
    // on this store, and runs its own: one server, the data intact.
    let servers = support::nats_servers_on(home);
    assert_eq!(
        servers.len(),
        1,
        "one nats-server on the store: {servers:?}"
    );
    assert_ne!(servers[0], orphan, "the orphan still runs");

    // Both end by the rules: exactly one gets the widget.
    let mut states = [ended(&up, "o-4"), ended(&up, "o-5")];
    states.sort();
    assert_eq!(states, ["cancelled", "confirmed"]);
    wait_levels(&up, "widget", (0, 0, 5));
    // Each order reserved and sold once; the cancelled ones never held any.
    let winner = if ended(&up, "o-4") == "confirmed" {
        "o-4"
    } else {
        "o-5"
    };
    let mut want = vec![];
    for (order, quantity) in [("o-1", 2), ("o-2", 2), (winner, 1)] {
        want.push((order.to_owned(), "reserved".to_owned(), quantity));
        want.push((order.to_owned(), "sold".to_owned(), quantity));
    }
    want.sort();
    assert_eq!(effects(&up, "widget"), want);
    let listed = shop(home, &["projection", "list", "--json"]);
    assert_eq!(listed.lines().count(), 2, "{listed}");
}
