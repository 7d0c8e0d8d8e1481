//! The dashboard at `/ui` in a real browser: Debian's chromium driven by
//! playwright for Python (pinned in scripts/browser-requirements.txt,
//! installed by scripts/setup.sh into `.tools/browser-venv`), against a live
//! `sluice up`. A raw NATS client writes a deposit the ledger rejects; the
//! script sees it on `/ui/dlq`, voids it (reason, confirmation), watches the
//! parked projection catch up on `/ui/projections` and opens a transfer's
//! timeline, taking a screenshot of each page. `SLUICE_UI_SHOTS=<dir>`
//! keeps the screenshots (docs/img/ was made so), else they go to a
//! temporary directory.

mod support;

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_sluice");

fn post(addr: &str, token: &str, path: &str, body: &str) -> String {
    let (status, out) = support::http(
        addr,
        "POST",
        path,
        &format!("Authorization: Bearer {token}\r\n"),
        body,
    );
    assert!((200..300).contains(&status), "{path}: {status} {out}");
    out
}

#[test]
fn the_dashboard_voids_a_dead_letter_and_shows_a_saga() {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/browser-venv/bin/python");
    assert!(
        python.is_file() && Path::new("/usr/bin/chromium").is_file(),
        "{} or /usr/bin/chromium is missing: run scripts/setup.sh",
        python.display()
    );
    let home = tempfile::tempdir().unwrap();
    let _up = support::start_up(BIN, home.path(), |_| {});
    let endpoint: serde_json::Value =
        serde_json::from_slice(&std::fs::read(home.path().join("endpoint.json")).unwrap()).unwrap();
    let addr = endpoint["http_addr"].as_str().unwrap().to_owned();
    let token = std::fs::read_to_string(home.path().join("token")).unwrap();
    let token = token.trim();

    for (id, owner) in [("ui-acc-1", "ann"), ("ui-acc-2", "bob")] {
        post(
            &addr,
            token,
            "/v1/accounts",
            &format!(r#"{{"id":"{id}","owner":"{owner}","currency":"EUR"}}"#),
        );
    }
    post(
        &addr,
        token,
        "/v1/accounts/ui-acc-1/deposits",
        r#"{"amount":100}"#,
    );
    post(
        &addr,
        token,
        "/v1/transfers",
        r#"{"from":"ui-acc-1","to":"ui-acc-2","amount":10,"id":"ui-t-1"}"#,
    );

    // A raw client writes around the checks: a negative deposit, which the
    // projection rejects and parks the account behind.
    let url = support::admin_nats_url(home.path());
    let bad = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let client = sluice_events::ConnectConfig::new(&url)
                .connect()
                .await
                .unwrap();
            let js = async_nats::jetstream::new(client);
            let mut h = async_nats::HeaderMap::new();
            for (k, v) in [
                ("ce-specversion", "1.0"),
                ("ce-id", "raw-ui-1"),
                ("ce-source", "urn:raw-client"),
                ("ce-type", "ledger.account.deposited.v1"),
                ("Content-Type", "application/json"),
            ] {
                h.insert(k, v);
            }
            js.publish_with_headers(
                "events.account.ui-acc-2",
                h,
                br#"{"amount":-5}"#.to_vec().into(),
            )
            .await
            .unwrap()
            .await
            .unwrap()
            .sequence
        });

    let kept = std::env::var_os("SLUICE_UI_SHOTS");
    let tmp = tempfile::tempdir().unwrap();
    let shots = kept.as_deref().map_or(tmp.path(), Path::new);
    std::fs::create_dir_all(shots).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/dashboard.py");
    let ran = Command::new(&python)
        .arg(&script)
        .arg(format!("http://{addr}"))
        .arg(token)
        .arg(shots)
        .arg(bad.to_string())
        .arg("ui-t-1")
        .output()
        .unwrap();
    let log =
        String::from_utf8_lossy(&ran.stdout).into_owned() + &String::from_utf8_lossy(&ran.stderr);
    assert!(ran.status.success(), "the dashboard script failed: {log}");
    assert!(log.contains("dashboard ok"), "{log}");
    for page in ["overview", "dlq", "projections", "sagas", "saga", "events"] {
        assert!(
            shots.join(format!("{page}.png")).is_file(),
            "no screenshot of {page}"
        );
    }
}
