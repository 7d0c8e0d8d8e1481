//! The `sluice` binary end to end: `up` on the embedded default, then the
//! other commands finding it through the endpoint file.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

mod support;

use support::Up;

const BIN: &str = env!("CARGO_BIN_EXE_sluice");

fn sluice(home: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("SLUICE_HOME", home)
        .env_remove("SLUICE_NATS_URL")
        .output()
        .expect("run sluice")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A plain HTTP/1.1 GET over loopback: (status, body).
fn http_get(addr: &str, path: &str) -> (u16, String) {
    http_call(addr, "GET", path, "", "")
}

/// A plain HTTP/1.1 request over loopback: (status, body).
fn http_call(
    addr: &str,
    method: &str,
    path: &str,
    extra_headers: &str,
    body: &str,
) -> (u16, String) {
    support::http(addr, method, path, extra_headers, body)
}

fn start_up(home: &Path) -> Up {
    support::start_up(BIN, home, |_| {})
}

#[test]
fn up_publish_read_tail_status_and_clean_shutdown() {
    let home = tempfile::tempdir().unwrap();
    let mut up = start_up(home.path());
    let endpoint: serde_json::Value =
        serde_json::from_slice(&std::fs::read(home.path().join("endpoint.json")).unwrap()).unwrap();
    let url = endpoint["nats_url"].as_str().unwrap().to_owned();
    assert!(
        url.starts_with("nats://127.0.0.1:") && !url.ends_with(":4222"),
        "{url}"
    );
    assert_eq!(endpoint["sync_always"], true);

    let data = r#"{"owner":"ann","currency":"EUR"}"#;
    let o = sluice(
        home.path(),
        &[
            "publish",
            "account/acc-1",
            "--type",
            "ledger.account.opened.v1",
            "--data",
            data,
            "--expect",
            "none",
        ],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("position 1, version 1"), "{out}");

    // Same expectation again: a conflict, exit code 3, nothing written.
    let o = sluice(
        home.path(),
        &[
            "publish",
            "account/acc-1",
            "--type",
            "ledger.account.opened.v1",
            "--data",
            data,
            "--expect",
            "none",
        ],
    );
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains("conflict") && err.contains("expected version 0, actual 1"),
        "{err}"
    );

    // Retrying with the same id is idempotent.
    for _ in 0..2 {
        let o = sluice(
            home.path(),
            &[
                "publish",
                "account/acc-1",
                "--type",
                "ledger.account.deposited.v1",
                "--data",
                r#"{"amount":5}"#,
                "--id",
                "dep-1",
                "--json",
            ],
        );
        let (out, err) = text(&o);
        assert!(o.status.success(), "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["position"], 2);
    }

    // Bad input: usage errors exit 2, invalid data exits 1, nothing written.
    for bad in ["acc.1", "acc*", "account/a b", "account/", "account"] {
        let o = sluice(
            home.path(),
            &["publish", bad, "--type", "t.v1", "--data", "{}"],
        );
        assert_eq!(o.status.code(), Some(2), "{bad}: {:?}", text(&o));
    }
    let o = sluice(
        home.path(),
        &[
            "publish",
            "account/acc-2",
            "--type",
            "t.v1",
            "--data",
            "{nope",
        ],
    );
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("not valid JSON"), "{err}");

    let o = sluice(home.path(), &["read", "account/acc-1", "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["type"], "ledger.account.opened.v1");
    assert_eq!(lines[0]["data"]["owner"], "ann");
    assert_eq!(lines[1]["id"], "dep-1");

    let o = sluice(home.path(), &["read", "account/acc-1"]);
    let (out, _) = text(&o);
    assert!(
        out.contains("POSITION") && out.contains("ledger.account.deposited.v1"),
        "{out}"
    );

    let o = sluice(
        home.path(),
        &[
            "tail", "--from", "1", "--limit", "2", "--json", "--filter", "account",
        ],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(out.lines().count(), 2, "{out}");

    let o = sluice(home.path(), &["status", "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let s: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(s["server"]["version"], "2.15.1");
    assert_eq!(s["stream"]["events"], 2);
    assert_eq!(s["sync_always"], true);
    let o = sluice(home.path(), &["status", "--production"]);
    let (out, _) = text(&o);
    assert!(out.contains("production needs 3"), "{out}");
    let o = sluice(home.path(), &["status", "--production", "--strict"]);
    assert_eq!(o.status.code(), Some(1), "--strict must fail on warnings");
    let o = sluice(home.path(), &["status", "--strict"]);
    assert!(
        o.status.success(),
        "the embedded default has nothing to warn about: {:?}",
        text(&o)
    );

    // The HTTP API serves the read models, with read-your-writes.
    let http = endpoint["http_addr"].as_str().unwrap().to_owned();
    let (status, body) = http_get(
        &http,
        "/v1/projections/account_balances/rows/acc-1?min_position=2",
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"balance\":5") && body.contains("ann"),
        "{body}"
    );
    let (status, body) = http_get(&http, "/v1/projections");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("account_activity"), "{body}");

    // Appending over HTTP needs the token `sluice up` wrote.
    let token = std::fs::read_to_string(home.path().join("token")).unwrap();
    let deposit = r#"{"expected_version":2,"events":[{"type":"ledger.account.deposited.v1","data":{"amount":7}}]}"#;
    let (status, _) = http_call(&http, "POST", "/v1/streams/account/acc-1", "", deposit);
    assert_eq!(status, 401);
    let auth = format!("Authorization: Bearer {}\r\n", token.trim());
    let (status, body) = http_call(&http, "POST", "/v1/streams/account/acc-1", &auth, deposit);
    assert_eq!(status, 201, "{body}");
    let (status, body) = http_get(
        &http,
        "/v1/projections/account_balances/rows/acc-1?min_position=3",
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"balance\":12"), "{body}");

    // The read side from the command line.
    let o = sluice(
        home.path(),
        &["query", "account_balances", "acc-1", "--json"],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("\"balance\":12"), "{out}");
    let o = sluice(home.path(), &["projection", "list", "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(out.lines().count(), 3, "{out}");
    let o = sluice(
        home.path(),
        &["projection", "rebuild", "account_balances", "--json"],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("\"rebuilt\":true"), "{out}");
    let (status, body) = http_get(&http, "/v1/projections/account_balances/rows/acc-1");
    assert_eq!(status, 200);
    assert!(body.contains("\"balance\":12"), "after the switch: {body}");
    let o = sluice(home.path(), &["projection", "reset", "account_activity"]);
    assert_eq!(o.status.code(), Some(2), "reset without --yes must refuse");
    let o = sluice(home.path(), &["query", "no_such_projection"]);
    assert!(!o.status.success());

    // The operator commands reach the same server.
    for args in [
        &["dlq", "list", "--json"][..],
        &["dlq", "list"],
        &["consumer", "list", "--json"],
    ] {
        let o = sluice(home.path(), args);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{args:?}: {out}{err}");
    }
    let o = sluice(home.path(), &["dlq", "show", "no-such-id"]);
    assert!(
        !o.status.success(),
        "showing a missing dead letter must fail"
    );

    // SIGTERM: clean exit, endpoint removed, the nats-server child gone.
    let pid = up.0.id();
    Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = up.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "sluice up did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
    assert!(!home.path().join("endpoint.json").exists());
    let port = url.rsplit(':').next().unwrap();
    assert!(
        std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_err(),
        "nats-server still listening"
    );

    // Data survives: a new `up` on the same home sees the events, and a lost
    // read store is rebuilt from the log by itself.
    for entry in std::fs::read_dir(home.path()).unwrap() {
        let p = entry.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("read.db")
        {
            std::fs::remove_file(p).unwrap();
        }
    }
    let _up = start_up(home.path());
    let endpoint: serde_json::Value =
        serde_json::from_slice(&std::fs::read(home.path().join("endpoint.json")).unwrap()).unwrap();
    let http = endpoint["http_addr"].as_str().unwrap().to_owned();
    let (status, body) = http_get(
        &http,
        "/v1/projections/account_balances/rows/acc-1?min_position=3",
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"balance\":12"),
        "rebuilt from the log: {body}"
    );
    let o = sluice(home.path(), &["read", "account/acc-1", "--json"]);
    assert_eq!(text(&o).0.lines().count(), 3);

    // A transfer saga end to end through every role of `sluice up`.
    for _ in 0..2 {
        let o = sluice(
            home.path(),
            &[
                "ledger",
                "open",
                "acc-2",
                "--owner",
                "bob",
                "--idempotency-key",
                "open-2",
            ],
        );
        assert!(o.status.success(), "{:?}", text(&o));
    }
    let o = sluice(home.path(), &["ledger", "show", "acc-2", "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains("\"balance\":0") && out.contains("\"open\":true"),
        "{out}"
    );
    let o = sluice(
        home.path(),
        &[
            "transfer", "acc-1", "acc-2", "10", "--id", "t-1", "--wait", "30", "--json",
        ],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["transfer"]["state"], "completed", "{out}");
    let o = sluice(
        home.path(),
        &[
            "transfer", "acc-1", "nobody", "1", "--id", "t-2", "--wait", "30", "--json",
        ],
    );
    let (out, _) = text(&o);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["transfer"]["state"], "compensated", "{out}");
    // Its history: every transition with its time, cause and commands.
    let o = sluice(home.path(), &["saga", "show", "t-2", "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    let h: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let steps = h["transitions"].as_array().unwrap();
    let types: Vec<&str> = steps.iter().map(|t| t["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "sluice.saga.started.v1",
            "sluice.saga.step_claimed.v1",
            "sluice.saga.step_succeeded.v1",
            "sluice.saga.step_failed.v1",
            "sluice.saga.compensation_succeeded.v1",
        ],
        "{out}"
    );
    assert!(steps.iter().all(|t| t["time"].is_string()), "{out}");
    assert_eq!(steps[0]["commands"][0]["id"], "t-2/debit/1", "{out}");
    assert_eq!(steps[0]["commands"][0]["target"], "account.acc-1", "{out}");
    assert_eq!(steps[3]["command_id"], "t-2/credit/1", "{out}");
    assert_eq!(steps[3]["commands"][0]["id"], "t-2/debit/1/undo", "{out}");
    assert_eq!(steps[4]["status"]["status"], "compensated", "{out}");
    let o = sluice(home.path(), &["saga", "show", "t-2"]);
    let (out, _) = text(&o);
    for needle in [
        "start request",
        "sent ledger.account.withdraw t-2/debit/1 to account.acc-1",
        "reply to t-2/credit/1: refused: account does not exist",
        "sent ledger.account.deposit t-2/debit/1/undo to account.acc-1",
        "-> compensated: step credit failed",
    ] {
        assert!(out.contains(needle), "{needle:?} not in:\n{out}");
    }
    let head = sluice(home.path(), &["status", "--json"]);
    let s: serde_json::Value = serde_json::from_str(text(&head).0.trim()).unwrap();
    let last = s["stream"]["last_position"].as_u64().unwrap();
    let (status, body) = http_get(
        &http,
        &format!("/v1/projections/account_balances/rows/acc-1?min_position={last}"),
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"balance\":2,"),
        "12 - 10, the failed transfer refunded: {body}"
    );
    let (status, body) = http_get(&http, "/v1/projections/transfers/rows/t-2");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("compensated"), "{body}");
    let o = sluice(home.path(), &["saga", "list", "--json"]);
    assert_eq!(text(&o).0.lines().count(), 2);
    let token = std::fs::read_to_string(home.path().join("token")).unwrap();
    let auth = format!("Authorization: Bearer {}\r\n", token.trim());
    let (status, body) = http_call(
        &http,
        "POST",
        "/v1/transfers",
        &auth,
        r#"{"from":"acc-2","to":"acc-1","amount":1}"#,
    );
    assert_eq!(status, 202, "{body}");

    // The demo: transfers that complete and ones that compensate, money conserved.
    let o = sluice(home.path(), &["demo", "--transfers", "10", "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    let d: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(d["pending"], 0, "{out}");
    assert!(
        d["completed"].as_u64().unwrap() > 0 && d["compensated"].as_u64().unwrap() > 0,
        "{out}"
    );
    let total: i64 = d["balances"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_i64().unwrap())
        .sum();
    assert_eq!(
        total, 40_000,
        "money is conserved across the demo accounts: {out}"
    );
    let (status, body) = http_get(&http, "/metrics");
    assert_eq!(status, 200);
    for metric in [
        "sluice_handler_outcomes_total",
        "sluice_projection_lag_events",
        "sluice_projection_lag_seconds",
        "sluice_appends_total",
    ] {
        assert!(body.contains(metric), "{metric} missing from /metrics");
    }
}

#[test]
fn commands_without_a_server_say_how_to_get_one() {
    let home = tempfile::tempdir().unwrap();
    let o = sluice(home.path(), &["read", "account/acc-1"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("sluice up") && err.contains("SLUICE_NATS_URL"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one-line error: {err}");
}

/// Polls `sluice query <args> --json` until `done(stdout)`.
fn wait_query(home: &Path, args: &[&str], done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut all = vec!["query"];
        all.extend_from_slice(args);
        all.push("--json");
        let o = sluice(home, &all);
        let (out, _) = text(&o);
        if o.status.success() && done(&out) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "query {args:?} never got there: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `sluice replay`, `sluice projection dlq` and a group rebuild against a
/// running `sluice up`, and `sluice dlq redrive` pointing projections to
/// their own redrive.
#[test]
fn replay_projection_dead_letters_and_group_rebuild() {
    let home = tempfile::tempdir().unwrap();
    let _up = start_up(home.path());
    let h = home.path();
    for (stream, event_type, data) in [
        (
            "account/acc-1",
            "ledger.account.opened.v1",
            r#"{"owner":"ann","currency":"EUR"}"#,
        ),
        (
            "account/ghost",
            "ledger.account.deposited.v1",
            r#"{"amount":5}"#,
        ),
        (
            "account/acc-1",
            "ledger.account.deposited.v1",
            r#"{"amount":7}"#,
        ),
    ] {
        let o = sluice(
            h,
            &["publish", stream, "--type", event_type, "--data", data],
        );
        assert!(o.status.success(), "{:?}", text(&o));
    }
    wait_query(h, &["account_balances", "acc-1"], |o| {
        o.contains("\"balance\":7")
    });
    wait_query(h, &["account_activity"], |o| o.lines().count() == 3);

    // The deposit to an account nobody opened is balances' dead letter.
    let o = sluice(
        h,
        &["projection", "dlq", "account_balances", "list", "--json"],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let dead: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(dead.len(), 1, "{out}");
    assert_eq!(dead[0]["position"], 2);
    assert_eq!(dead[0]["kind"], "handler");
    // Its cause is not fixed: it stays.
    let o = sluice(h, &["projection", "dlq", "account_balances", "redrive"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains("applied 0 dead letter(s)") && out.contains("1 still dead"),
        "{out}"
    );
    // The workers' redrive would drop it: refused, with the way to go.
    let o = sluice(
        h,
        &[
            "dlq",
            "redrive",
            "--consumer",
            "projection-account_balances",
        ],
    );
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("sluice projection dlq account_balances redrive"),
        "{err}"
    );

    let o = sluice(
        h,
        &[
            "replay",
            "--projection",
            "account_activity",
            "--from",
            "2",
            "--json",
        ],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["from"], 2);
    assert_eq!(v["previous_checkpoint"], 3);
    let o = sluice(
        h,
        &["replay", "--projection", "account_balances", "--from", "3"],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(
        out.contains("rewound to position 2 (was 3)") && out.contains("re-folded"),
        "{out}"
    );
    let o = sluice(
        h,
        &["replay", "--projection", "account_balances", "--from", "99"],
    );
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("give a position from 1 to"), "{err}");
    wait_query(h, &["account_activity"], |o| {
        o.lines().count() == 3 && o.contains("\"position\":3")
    });
    wait_query(h, &["account_balances", "acc-1"], |o| {
        o.contains("\"balance\":7")
    });

    let o = sluice(
        h,
        &[
            "projection",
            "rebuild",
            "account_balances",
            "account_activity",
            "--json",
        ],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("\"rebuilt\":true"), "{out}");
    wait_query(h, &["account_balances", "acc-1"], |o| {
        o.contains("\"balance\":7")
    });
    wait_query(h, &["account_activity"], |o| o.lines().count() == 3);
}

/// The HTTP address and auth header of a running `sluice up`.
fn api(home: &Path) -> (String, String) {
    let endpoint: serde_json::Value =
        serde_json::from_slice(&std::fs::read(home.join("endpoint.json")).unwrap()).unwrap();
    let token = std::fs::read_to_string(home.join("token")).unwrap();
    (
        endpoint["http_addr"].as_str().unwrap().to_owned(),
        format!("Authorization: Bearer {}\r\n", token.trim()),
    )
}

/// Publishes straight to NATS, around every check (as any NATS client with
/// publish rights can): binary-mode CloudEvents headers, the given data.
/// Returns the position.
fn raw_publish(home: &Path, subject: &str, event_type: &str, data: &str) -> u64 {
    let endpoint: serde_json::Value =
        serde_json::from_slice(&std::fs::read(home.join("endpoint.json")).unwrap()).unwrap();
    let url = endpoint["nats_url"].as_str().unwrap().to_owned();
    let (subject, event_type, data) = (subject.to_owned(), event_type.to_owned(), data.to_owned());
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let client = async_nats::connect(url).await.unwrap();
            let js = async_nats::jetstream::new(client);
            let mut h = async_nats::HeaderMap::new();
            let id = format!("raw-{}", subject.replace('.', "-"));
            for (k, v) in [
                ("ce-specversion", "1.0"),
                ("ce-id", id.as_str()),
                ("ce-source", "urn:raw-client"),
                ("ce-type", event_type.as_str()),
                ("Content-Type", "application/json"),
            ] {
                h.insert(k, v);
            }
            js.publish_with_headers(subject, h, data.into_bytes().into())
                .await
                .unwrap()
                .await
                .unwrap()
                .sequence
        })
}

/// Polls `f` every 100 ms for up to `secs`; true once it held.
fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

fn ok(home: &Path, args: &[&str]) -> String {
    let o = sluice(home, args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{args:?}: {out}{err}");
    out
}

fn transfer_state(home: &Path, from: &str, to: &str, id: &str) -> serde_json::Value {
    let o = sluice(
        home,
        &[
            "transfer", from, to, "100", "--id", id, "--wait", "15", "--json",
        ],
    );
    let (out, err) = text(&o);
    let _ = err;
    let o = sluice(home, &["saga", "show", id, "--json"]);
    let (show, err) = text(&o);
    assert!(o.status.success(), "{out} {show} {err}");
    let v: serde_json::Value = serde_json::from_str(show.trim()).unwrap();
    v["transfer"].clone()
}

#[test]
fn the_public_append_refuses_bad_events_and_a_void_repairs_one_written_around_it() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let _up = start_up(home);
    ok(home, &["ledger", "open", "acc-1", "--owner", "ann"]);
    ok(home, &["ledger", "deposit", "acc-1", "1000"]);
    ok(home, &["ledger", "open", "acc-2", "--owner", "bob"]);
    let head = || {
        let out = ok(home, &["status", "--json"]);
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        v["stream"]["last_position"].as_u64().unwrap()
    };
    let before = head();

    // The public append refuses, exit 2, nothing written.
    for (stream, t, data, want) in [
        (
            "account/acc-2",
            "ledger.account.deposited.v1",
            r#"{"amount":-5}"#,
            "/amount",
        ),
        ("account/acc-2", "x.v1", "{}", "declares no event type"),
        (
            "cmd-account/acc-1",
            "sluice.saga.command.v1",
            "{}",
            "reserved",
        ),
        (
            "saga-transfer/t-1",
            "sluice.saga.started.v1",
            "{}",
            "reserved",
        ),
    ] {
        let o = sluice(home, &["publish", stream, "--type", t, "--data", data]);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{stream} {t}: {err}");
        assert!(err.contains(want), "{stream} {t}: {err}");
    }
    assert_eq!(head(), before, "nothing refused was written");

    // Finding 6: a raw client writes a negative deposit around the checks.
    let bad = raw_publish(
        home,
        "events.account.acc-2",
        "ledger.account.deposited.v1",
        r#"{"amount":-5}"#,
    );
    let advice = format!("sluice event void {bad}");
    let o = sluice(home, &["ledger", "show", "acc-2"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("event at position {bad}")) && err.contains("amount must be > 0"),
        "{err}"
    );
    assert!(err.contains(&advice), "{err}");
    assert!(!err.contains("not valid JSON"), "{err}");
    let o = sluice(home, &["ledger", "deposit", "acc-2", "5"]);
    let (_, err) = text(&o);
    assert!(
        !o.status.success() && err.contains(&format!("position {bad}")),
        "{err}"
    );
    // The read model says the row is parked behind it.
    let (http, auth) = api(home);
    assert!(
        eventually(10, || {
            let (_, headers, _) = support::http_full(
                &http,
                "GET",
                "/v1/projections/account_balances/rows/acc-2",
                "",
                "",
            );
            headers.contains(&format!("sluice-parked-behind: {bad}"))
        }),
        "the row of acc-2 says it is parked"
    );
    // A transfer to it is refused by the target and refunded.
    let t = transfer_state(home, "acc-1", "acc-2", "t-bad");
    assert_eq!(t["state"], "compensated", "{t}");
    assert!(t.to_string().contains(&format!("position {bad}")), "{t}");

    // Void it (twice: the same answer).
    let first = ok(
        home,
        &[
            "event",
            "void",
            &bad.to_string(),
            "--reason",
            "negative deposit",
            "--json",
        ],
    );
    let again = ok(
        home,
        &[
            "event",
            "void",
            &bad.to_string(),
            "--reason",
            "again",
            "--json",
        ],
    );
    assert_eq!(first, again);
    let v: serde_json::Value = serde_json::from_str(first.trim()).unwrap();
    assert_eq!(v["stream"], "account/acc-2");
    let o = sluice(home, &["event", "void", "999999", "--reason", "x"]);
    assert_eq!(o.status.code(), Some(1), "{:?}", text(&o));
    let void_record = v["void_position"].as_u64().unwrap().to_string();
    let o = sluice(home, &["event", "void", &void_record, "--reason", "x"]);
    assert_eq!(o.status.code(), Some(1), "{:?}", text(&o));
    let o = sluice(home, &["event", "void", "1", "--reason", " "]);
    assert_eq!(o.status.code(), Some(2), "{:?}", text(&o));

    // Everything works again.
    ok(home, &["ledger", "show", "acc-2"]);
    ok(home, &["ledger", "deposit", "acc-2", "5"]);
    assert!(
        eventually(10, || {
            let (status, headers, body) = support::http_full(
                &http,
                "GET",
                "/v1/projections/account_balances/rows/acc-2",
                "",
                "",
            );
            status == 200
                && !headers.contains("sluice-parked-behind")
                && body.contains(r#""balance":5"#)
        }),
        "the row of acc-2 catches up once the bad event is voided"
    );
    let t = transfer_state(home, "acc-1", "acc-2", "t-good");
    assert_eq!(t["state"], "completed", "{t}");
    let _ = auth;
}

#[test]
fn a_malformed_command_blocks_its_account_until_it_is_voided() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let _up = start_up(home);
    ok(home, &["ledger", "open", "acc-1", "--owner", "ann"]);
    ok(home, &["ledger", "deposit", "acc-1", "1000"]);
    ok(home, &["ledger", "open", "acc-2", "--owner", "bob"]);
    let bad = raw_publish(
        home,
        "events.cmd-account.acc-1",
        "sluice.saga.command.v1",
        r#"{"nope":1}"#,
    );
    // Give the worker time to dead-letter it and park acc-1's commands.
    std::thread::sleep(Duration::from_secs(2));
    let o = sluice(
        home,
        &[
            "transfer", "acc-1", "acc-2", "100", "--id", "t-stuck", "--wait", "3", "--json",
        ],
    );
    let _ = text(&o);
    let o = sluice(home, &["saga", "show", "t-stuck", "--json"]);
    let (show, _) = text(&o);
    assert!(
        show.contains(r#""state":"pending""#),
        "the debit waits behind the malformed command: {show}"
    );

    ok(
        home,
        &[
            "event",
            "void",
            &bad.to_string(),
            "--reason",
            "malformed command",
        ],
    );
    assert!(
        eventually(20, || {
            let o = sluice(home, &["saga", "show", "t-stuck", "--json"]);
            text(&o).0.contains(r#""state":"completed""#)
        }),
        "the parked debit runs once the malformed command is voided"
    );
    let t = transfer_state(home, "acc-1", "acc-2", "t-after");
    assert_eq!(t["state"], "completed", "{t}");
}
