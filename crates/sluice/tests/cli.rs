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
        .env_remove("SLUICE_DATABASE_URL")
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
    // One model: `sluice dlq redrive` of a projection's consumer applies
    // them into the projection from the log, the same as its own redrive.
    let o = sluice(
        h,
        &[
            "dlq",
            "redrive",
            "--consumer",
            "projection-account_balances",
        ],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains("redriven into projection account_balances") && out.contains("1 still dead"),
        "{out}"
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

    // `sluice projection dlq ... discard` settles record and copy alike.
    let o = sluice(
        h,
        &[
            "projection",
            "dlq",
            "account_balances",
            "discard",
            "2",
            "--reason",
            "never opened",
        ],
    );
    assert!(o.status.success(), "{:?}", text(&o));
    let o = sluice(
        h,
        &["projection", "dlq", "account_balances", "list", "--json"],
    );
    assert_eq!(text(&o).0.trim(), "", "{:?}", text(&o));
    let o = sluice(
        h,
        &[
            "dlq",
            "list",
            "--consumer",
            "projection-account_balances",
            "--json",
        ],
    );
    assert_eq!(text(&o).0.trim(), "", "{:?}", text(&o));
    let o = sluice(
        h,
        &[
            "projection",
            "dlq",
            "account_balances",
            "discard",
            "2",
            "--reason",
            "again",
        ],
    );
    assert!(!o.status.success(), "{:?}", text(&o));
}

/// A fresh PostgreSQL database for one test, dropped afterwards.
struct Db {
    rt: tokio::runtime::Runtime,
    db: sluice_testkit::TestDatabase,
}

impl Db {
    fn create() -> Db {
        use sqlx::Connection;
        let rt = tokio::runtime::Runtime::new().unwrap();
        let db = sluice_testkit::TestDatabase::fresh("sluice_cli");
        rt.block_on(async {
            let mut admin = sqlx::PgConnection::connect(&sluice_testkit::TestDatabase::admin_url())
                .await
                .expect("PostgreSQL on 127.0.0.1:5432 (run scripts/setup.sh)");
            sqlx::query(&format!("CREATE DATABASE \"{}\"", db.name))
                .execute(&mut admin)
                .await
                .unwrap();
        });
        Db { rt, db }
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        use sqlx::Connection;
        let name = self.db.name.clone();
        self.rt.block_on(async {
            if let Ok(mut admin) =
                sqlx::PgConnection::connect(&sluice_testkit::TestDatabase::admin_url()).await
            {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut admin)
                    .await;
            }
        });
    }
}

/// `up --database-url postgres://...`: `query`, `projection list` and
/// `replay` run in the same directory use that read store (they used to
/// open an empty SQLite file next to it and answer from it), the endpoint
/// file is private and keeps no password, and an explicit flag still wins.
#[test]
fn operator_commands_use_the_read_store_up_records() {
    use std::os::unix::fs::PermissionsExt;
    let db = Db::create();
    // Trust authentication ignores the password; it must still stay secret.
    let url = db
        .db
        .url
        .replacen("postgres@", "postgres:not-a-secret-pw@", 1);
    assert!(url.contains(":not-a-secret-pw@"), "{url}");
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let _up = support::start_up(BIN, h, |c| {
        c.args(["--database-url", &url]);
    });
    for (stream, event_type, data) in [
        (
            "account/acc-1",
            "ledger.account.opened.v1",
            r#"{"owner":"ann","currency":"EUR"}"#,
        ),
        (
            "account/acc-1",
            "ledger.account.deposited.v1",
            r#"{"amount":5}"#,
        ),
    ] {
        let o = sluice(
            h,
            &["publish", stream, "--type", event_type, "--data", data],
        );
        assert!(o.status.success(), "{:?}", text(&o));
    }
    let out = wait_query(h, &["account_balances", "acc-1"], |o| {
        o.contains("\"balance\":5")
    });
    assert!(out.contains("ann"), "{out}");

    let o = sluice(h, &["projection", "list", "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let balances: serde_json::Value = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["name"] == "account_balances")
        .expect("account_balances listed");
    assert!(
        balances["checkpoint"].as_u64().unwrap() >= 2,
        "the checkpoint in PostgreSQL, not an empty file's 0: {out}"
    );
    let o = sluice(
        h,
        &[
            "replay",
            "--projection",
            "account_activity",
            "--from",
            "1",
            "--json",
        ],
    );
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(
        std::fs::read_dir(h).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("read.db")),
        "no stray read.db beside a PostgreSQL read store"
    );

    let file = h.join("endpoint.json");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "endpoint file mode {mode:o}");
    let recorded: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(recorded["database_url"], db.db.url, "{recorded}");
    assert_eq!(recorded["database_password_removed"], true);
    assert!(
        !std::fs::read_to_string(&file)
            .unwrap()
            .contains("not-a-secret-pw")
    );

    // An explicit flag wins over the endpoint file.
    let other = h.join("other.db");
    let other_url = format!("sqlite://{}", other.display());
    let o = sluice(
        h,
        &[
            "query",
            "account_balances",
            "acc-1",
            "--database-url",
            &other_url,
        ],
    );
    assert!(
        !o.status.success(),
        "acc-1 is not in the other store: {:?}",
        text(&o)
    );
    assert!(other.exists(), "the flag's store was opened");
}

/// Runs `sluice <args>` with `envs`, killing it after 60 s.
fn run_bounded(home: &Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("SLUICE_HOME", home)
        .env_remove("SLUICE_NATS_URL")
        .env_remove("SLUICE_DATABASE_URL")
        .env_remove("SLUICE_HTTP_ADDR")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("sluice {args:?} did not stop on a taken port");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// A taken HTTP port stops `up` and `serve` with "already in use" and what
/// to do, not "channel closed".
#[test]
fn a_taken_http_port_is_reported_as_in_use_with_the_way_out() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let home = tempfile::tempdir().unwrap();
    let check = |what: &str, o: &Output| {
        let (out, err) = text(o);
        assert_eq!(o.status.code(), Some(1), "{what}: {out}{err}");
        assert!(
            err.contains(&format!("the HTTP address {addr} is already in use"))
                && err.contains("--http")
                && err.contains("SLUICE_HTTP_ADDR"),
            "{what}: {err}"
        );
        assert!(!err.contains("channel closed"), "{what}: {err}");
    };
    let o = run_bounded(home.path(), &["up", "--http", &addr], &[]);
    check("up", &o);
    assert!(
        !home.path().join("endpoint.json").exists(),
        "a failed start leaves no endpoint file"
    );
    let nats = sluice_testkit::NatsServer::start();
    let db = format!("sqlite://{}", home.path().join("serve.db").display());
    let o = run_bounded(
        home.path(),
        &[
            "serve",
            "--role",
            "api",
            "--nats-url",
            &nats.url(),
            "--http",
            &addr,
            "--database-url",
            &db,
        ],
        &[],
    );
    check("serve", &o);
    drop(taken);
}

/// Every command that takes an id refuses an invalid one as a usage error
/// (exit 2), before connecting to anything.
#[test]
fn every_command_taking_an_id_refuses_an_invalid_one_with_exit_2() {
    let home = tempfile::tempdir().unwrap();
    let long = "x".repeat(129);
    for bad in ["acc.1", "*", ">", "a b", "", long.as_str()] {
        let stream = format!("account/{bad}");
        let commands: Vec<Vec<&str>> = vec![
            vec!["publish", &stream, "--type", "t.v1", "--data", "{}"],
            vec!["read", &stream],
            vec!["ledger", "open", bad, "--owner", "ann"],
            vec!["ledger", "deposit", bad, "5"],
            vec!["ledger", "withdraw", bad, "5"],
            vec!["ledger", "show", bad],
            vec!["transfer", bad, "acc-2", "5"],
            vec!["transfer", "acc-1", bad, "5"],
            vec!["transfer", "acc-1", "acc-2", "5", "--id", bad],
            vec!["saga", "show", bad],
            vec!["saga", "retry", bad, "--note", "n"],
            vec!["consumer", "pause", bad],
            vec!["consumer", "resume", bad],
            vec!["dlq", "show", bad],
            vec!["dlq", "discard", bad, "--reason", "r"],
            vec!["dlq", "redrive", bad],
            vec!["query", bad],
            vec!["replay", "--projection", bad, "--from", "1"],
        ];
        for args in commands {
            let o = sluice(home.path(), &args);
            assert_eq!(o.status.code(), Some(2), "{args:?}: {:?}", text(&o));
        }
    }
    for bad in ["", long.as_str()] {
        let o = sluice(
            home.path(),
            &[
                "publish",
                "account/acc-1",
                "--type",
                "t.v1",
                "--data",
                "{}",
                "--id",
                bad,
            ],
        );
        assert_eq!(o.status.code(), Some(2), "--id {bad:?}: {:?}", text(&o));
    }
}

/// Dead-letter ids of `consumer`, by original stream sequence.
fn dlq_ids(home: &Path, consumer: &str) -> std::collections::BTreeMap<u64, u64> {
    let o = sluice(home, &["dlq", "list", "--consumer", consumer, "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    out.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["sequence"].as_u64().unwrap(), v["id"].as_u64().unwrap())
        })
        .collect()
}

/// The `sluice_dlq_depth` of `consumer`'s `account` dead letters in a scrape.
fn dlq_depth(scrape: &str, consumer: &str) -> Option<f64> {
    scrape
        .lines()
        .filter(|l| l.starts_with("sluice_dlq_depth{"))
        .filter(|l| {
            l.contains(&format!("consumer=\"{consumer}\"")) && l.contains("category=\"account\"")
        })
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// What `sluice projection list` says of account_balances: (dead letters, parked).
fn balances_counts(home: &Path) -> (u64, u64) {
    let o = sluice(home, &["projection", "list", "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["name"] == "account_balances")
        .unwrap_or_else(|| panic!("{out}"));
    (
        v["dead_letters"].as_u64().unwrap(),
        v["parked_aggregates"].as_u64().unwrap(),
    )
}

/// One dead-letter model: discard and redrive of a projection's dead letter,
/// with `sluice dlq` and over HTTP, settle the projection's own record and
/// parking too (the parked account is released and its later events
/// apply), every count agrees, and `sluice_dlq_depth` returns to 0.
#[test]
fn dlq_discard_and_redrive_settle_a_projections_dead_letters() {
    let home = tempfile::tempdir().unwrap();
    let _up = start_up(home.path());
    let h = home.path();
    let endpoint: serde_json::Value =
        serde_json::from_slice(&std::fs::read(h.join("endpoint.json")).unwrap()).unwrap();
    let addr = endpoint["http_addr"].as_str().unwrap().to_owned();
    let token = std::fs::read_to_string(h.join("token")).unwrap();
    let auth = format!("Authorization: Bearer {}\r\n", token.trim());
    let publish = |stream: &str, event_type: &str, data: &str| {
        let o = sluice(
            h,
            &["publish", stream, "--type", event_type, "--data", data],
        );
        assert!(o.status.success(), "{:?}", text(&o));
    };
    let opened = r#"{"owner":"ann","currency":"EUR"}"#;
    // Per account: a deposit before the account exists (rejected), then
    // the opening and a deposit (parked behind it).
    for account in ["account/cli-1", "account/http-1"] {
        publish(account, "ledger.account.deposited.v1", r#"{"amount":5}"#);
        publish(account, "ledger.account.opened.v1", opened);
        publish(account, "ledger.account.deposited.v1", r#"{"amount":7}"#);
    }
    let consumer = "projection-account_balances";
    let deadline = Instant::now() + Duration::from_secs(30);
    while dlq_ids(h, consumer).len() < 6 {
        assert!(Instant::now() < deadline, "{:?}", dlq_ids(h, consumer));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(balances_counts(h), (6, 2));
    let ids = dlq_ids(h, consumer);
    let id = |seq: u64| ids[&seq].to_string();
    let (status, body) = http_get(&addr, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(dlq_depth(&body, consumer), Some(6.0), "{body}");

    // CLI: the parked one is not the head; the head is discarded, then the
    // new head is redriven: both apply and the account is released.
    let o = sluice(h, &["dlq", "redrive", &id(2)]);
    assert!(!o.status.success(), "{:?}", text(&o));
    assert!(text(&o).1.contains("parked behind"), "{:?}", text(&o));
    let o = sluice(
        h,
        &[
            "dlq",
            "discard",
            &id(1),
            "--reason",
            "sent before the account opened",
        ],
    );
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(balances_counts(h), (5, 2));
    let o = sluice(
        h,
        &["projection", "dlq", "account_balances", "list", "--json"],
    );
    assert!(!text(&o).0.contains("\"position\":1,"), "{:?}", text(&o));
    let o = sluice(h, &["dlq", "redrive", &id(2)]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(
        out.contains("applied 2 event(s), released 1 aggregate(s), 0 still dead"),
        "{out}"
    );
    wait_query(h, &["account_balances", "cli-1"], |o| {
        o.contains("\"balance\":7")
    });
    assert_eq!(balances_counts(h), (3, 1));

    // HTTP: the same answers.
    let post = |path: String, body: &str| http_call(&addr, "POST", &path, &auth, body);
    let (status, body) = post(format!("/v1/dlq/{}/redrive", id(5)), "");
    assert_eq!(status, 409, "{body}");
    let (status, body) = post(
        format!("/v1/dlq/{}/discard", id(4)),
        r#"{"reason":"sent before the account opened"}"#,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(balances_counts(h), (2, 1));
    let (status, body) = post(format!("/v1/dlq/{}/redrive", id(5)), "");
    assert_eq!(status, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["applied"], serde_json::json!([5, 6]), "{body}");
    assert_eq!(
        report["released"],
        serde_json::json!(["account/http-1"]),
        "{body}"
    );
    // A second redrive of the same dead letter applies nothing twice.
    let (status, body) = post(format!("/v1/dlq/{}/redrive", id(5)), "");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(&format!("\"already_redriven\":[{}]", id(5))),
        "{body}"
    );
    wait_query(h, &["account_balances", "http-1"], |o| {
        o.contains("\"balance\":7")
    });

    // Everything agrees: no record, no parking, no DLQ copy, depth 0.
    assert_eq!(balances_counts(h), (0, 0));
    assert!(dlq_ids(h, consumer).is_empty());
    let (_, body) = http_get(&addr, "/metrics");
    assert_eq!(dlq_depth(&body, consumer), Some(0.0), "{body}");
    // Released: later events of both accounts apply at once.
    publish(
        "account/cli-1",
        "ledger.account.deposited.v1",
        r#"{"amount":1}"#,
    );
    publish(
        "account/http-1",
        "ledger.account.deposited.v1",
        r#"{"amount":2}"#,
    );
    wait_query(h, &["account_balances", "cli-1"], |o| {
        o.contains("\"balance\":8")
    });
    wait_query(h, &["account_balances", "http-1"], |o| {
        o.contains("\"balance\":9")
    });
}

/// `sluice up`'s nats-server asks who you are: anonymous clients are
/// refused, and commands run in the home authenticate through the endpoint
/// file and the 0600 credential (tests/security.rs checks that a home from
/// before authorization gets one on its next start).
#[test]
fn up_refuses_anonymous_nats_clients_and_commands_authenticate_by_themselves() {
    use std::os::unix::fs::PermissionsExt;
    let home = tempfile::tempdir().unwrap();
    let creds = home.path().join("nats-credentials.json");
    let up = start_up(home.path());
    let endpoint_text = std::fs::read_to_string(home.path().join("endpoint.json")).unwrap();
    let endpoint: serde_json::Value = serde_json::from_str(&endpoint_text).unwrap();
    let url = endpoint["nats_url"].as_str().unwrap().to_owned();
    assert_eq!(
        endpoint["nats_credentials_file"].as_str(),
        Some(creds.to_str().unwrap())
    );
    let mode = std::fs::metadata(&creds).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let secret: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&creds).unwrap()).unwrap();
    let password = secret["password"].as_str().unwrap();
    assert!(password.len() >= 32);
    assert!(
        !endpoint_text.contains(password),
        "the endpoint file holds the password"
    );

    // Anonymous: refused.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let refused = rt.block_on(async {
        let mut c = sluice_events::ConnectConfig::new(&url);
        c.connect_timeout = Duration::from_secs(2);
        c.connect().await.is_err()
    });
    assert!(
        refused,
        "an anonymous client got into sluice up's nats-server"
    );

    // The CLI in this home: authenticated through the endpoint file, and
    // with the URL as `sluice up` prints it.
    let o = sluice(
        home.path(),
        &[
            "publish",
            "account/sec-1",
            "--type",
            "ledger.account.opened.v1",
            "--data",
            r#"{"owner":"sec","currency":"EUR"}"#,
        ],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    let o = sluice(home.path(), &["--nats-url", &url, "status", "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["security"]["auth_required"], true, "{s}");
    assert!(!out.contains(password) && !err.contains(password));
    drop(up);
}

/// Runs `sluice <args>` and asserts its exit code; returns (stdout, stderr).
fn expect_code(home: &Path, args: &[&str], code: i32) -> (String, String) {
    let o = sluice(home, args);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(code), "sluice {args:?}:\n{out}{err}");
    (out, err)
}

/// Polls `sluice saga show <id> --json` until the transfer is in `state`.
fn wait_transfer(home: &Path, id: &str, state: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = sluice(home, &["saga", "show", id, "--json"]);
        let (out, _) = text(&o);
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(out.trim())
            && v["transfer"]["state"] == state
        {
            return v;
        }
        assert!(Instant::now() < deadline, "{id} never got {state}: {out}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn balance_of(home: &Path, account: &str) -> i64 {
    let (out, _) = expect_code(home, &["ledger", "show", account, "--json"], 0);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    v["balance"].as_i64().unwrap()
}

/// `transfer --wait` exits 0 only for a completed transfer (1 compensated
/// or needing attention, 4 still pending); `saga retry|resolve|abandon`
/// act only on a transfer that needs attention (exit 1 naming the state
/// otherwise, and for an unknown id); unknown filter values are usage
/// errors (exit 2) listing the valid ones.
#[test]
fn transfer_wait_exit_codes_and_saga_operator_commands() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let _up = start_up(home);
    for (id, owner, deposit) in [
        ("acc-1", "ann", "100"),
        ("acc-2", "bob", ""),
        ("acc-3", "cid", "50"),
    ] {
        expect_code(home, &["ledger", "open", id, "--owner", owner], 0);
        if !deposit.is_empty() {
            expect_code(home, &["ledger", "deposit", id, deposit], 0);
        }
    }
    let wait = |id: &str, from: &str, to: &str, amount: &str, secs: &str, code: i32| {
        expect_code(
            home,
            &["transfer", from, to, amount, "--id", id, "--wait", secs],
            code,
        )
    };
    wait("t-ok", "acc-1", "acc-2", "10", "30", 0);
    let (_, err) = wait("t-comp", "acc-1", "nobody", "5", "30", 1);
    assert!(err.contains("compensated"), "{err}");
    // The account handler paused (kill switch): still pending when the wait
    // runs out.
    expect_code(
        home,
        &[
            "consumer",
            "pause",
            "ledger-account-commands",
            "--for",
            "1m",
        ],
        0,
    );
    let (_, err) = wait("t-pend", "acc-1", "acc-2", "7", "1", 4);
    assert!(err.contains("still pending"), "{err}");
    expect_code(home, &["consumer", "resume", "ledger-account-commands"], 0);
    wait_transfer(home, "t-pend", "completed");

    // A malformed command on acc-3's command subject (any raw NATS client
    // can publish one) parks acc-3: its transfers' debits are dead-lettered
    // behind it and the transfers need attention.
    let url = support::admin_nats_url(home);
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = sluice_events::EventStore::connect(&url, sluice_events::StoreConfig::default())
            .await
            .unwrap();
        store
            .append(
                &sluice_events::StreamId::new("cmd-account", "acc-3").unwrap(),
                sluice_events::ExpectedVersion::Any,
                vec![sluice_events::NewEvent::new(
                    sluice_sagas::COMMAND,
                    br#"{"not":"a command"}"#.to_vec(),
                )],
            )
            .await
            .unwrap();
    });
    let (_, err) = wait("t-att", "acc-3", "acc-2", "20", "30", 1);
    assert!(
        err.contains("needs_attention") && err.contains("dead-lettered"),
        "{err}"
    );
    wait("t-res", "acc-3", "acc-2", "30", "30", 1);
    let (out, _) = expect_code(
        home,
        &["saga", "list", "--state", "needs_attention", "--json"],
        0,
    );
    let ids: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(ids, ["t-att", "t-res"], "{out}");

    // Usage errors list the valid values.
    let (_, err) = expect_code(home, &["saga", "list", "--state", "bogus"], 2);
    assert!(
        err.contains("needs_attention") && err.contains("abandoned"),
        "{err}"
    );
    let (_, err) = expect_code(
        home,
        &[
            "saga",
            "resolve",
            "t-res",
            "--outcome",
            "bogus",
            "--note",
            "x",
        ],
        2,
    );
    assert!(err.contains("compensated"), "{err}");

    // Refused: an unknown id, a completed transfer.
    for args in [
        &["saga", "retry", "nope", "--note", "x"][..],
        &["saga", "abandon", "nope", "--note", "x"][..],
        &[
            "saga",
            "resolve",
            "nope",
            "--outcome",
            "completed",
            "--note",
            "x",
        ][..],
    ] {
        let (out, err) = expect_code(home, args, 1);
        assert!(
            out.is_empty() && err.contains("no transfer saga nope"),
            "{out}{err}"
        );
    }
    for args in [
        &["saga", "retry", "t-ok", "--note", "x"][..],
        &["saga", "abandon", "t-ok", "--note", "x"][..],
        &[
            "saga",
            "resolve",
            "t-ok",
            "--outcome",
            "compensated",
            "--note",
            "x",
        ][..],
    ] {
        let (out, err) = expect_code(home, args, 1);
        assert!(
            out.is_empty() && err.contains("t-ok is completed"),
            "{out}{err}"
        );
    }

    // Valid: a retry (acc-3 is still parked, so it needs attention again),
    // then abandon; resolve the other.
    let (out, _) = expect_code(home, &["saga", "retry", "t-att", "--note", "ops: retry"], 0);
    assert!(out.contains("retried"), "{out}");
    let h = wait_transfer(home, "t-att", "needs_attention");
    assert!(
        h["transfer"]["reason"]
            .as_str()
            .unwrap()
            .contains("t-att/debit/2"),
        "{h}"
    );
    expect_code(
        home,
        &["saga", "abandon", "t-att", "--note", "ops: by hand"],
        0,
    );
    let (_, err) = expect_code(home, &["saga", "retry", "t-att", "--note", "again"], 1);
    assert!(err.contains("is abandoned by an operator"), "{err}");
    expect_code(
        home,
        &[
            "saga",
            "resolve",
            "t-res",
            "--outcome",
            "compensated",
            "--note",
            "ops: checked",
        ],
        0,
    );
    let (out, _) = expect_code(home, &["saga", "show", "t-att"], 0);
    for needle in [
        "ledger-account-commands dead-lettered t-att/debit/1",
        "operator retry: ops: retry",
        "operator abandoned it: ops: by hand",
    ] {
        assert!(out.contains(needle), "{needle:?} not in:\n{out}");
    }
    let (out, _) = expect_code(home, &["saga", "show", "t-res"], 0);
    assert!(
        out.contains("operator resolved it as compensated: ops: checked"),
        "{out}"
    );
    // Money: nothing moved for the stuck ones, the rest once.
    assert_eq!(balance_of(home, "acc-3"), 50);
    assert_eq!(balance_of(home, "acc-1"), 100 - 10 - 7);
    assert_eq!(balance_of(home, "acc-2"), 10 + 7);
}

/// Findings 4 and 5 at the command line: a reused event id exits 3 and a
/// reused idempotency key exits 1, both naming the first use, instead of
/// "deduplicated"/"already done" with nothing written; true repeats still
/// succeed, also after nats-server restarted.
#[test]
fn reused_event_ids_and_idempotency_keys_are_refused_at_the_command_line() {
    let mut server = sluice_testkit::NatsServer::start();
    let home = tempfile::tempdir().unwrap();
    let url = server.url();
    let run = |args: &[&str]| {
        let mut all = vec!["--nats-url", url.as_str()];
        all.extend_from_slice(args);
        sluice(home.path(), &all)
    };
    let publish = |stream: &str, data: &str| {
        run(&[
            "publish",
            stream,
            "--type",
            "test.thing.v1",
            "--data",
            data,
            "--id",
            "same-id-1",
        ])
    };
    let o = publish("thing/t-10", r#"{"n":1}"#);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(!out.contains("deduplicated"), "{out}");

    let o = publish("thing/t-11", r#"{"n":2}"#);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(3), "{out}{err}");
    assert!(!out.contains("deduplicated"), "{out}");
    assert!(
        err.contains("already used") && err.contains("thing/t-10"),
        "{err}"
    );
    let o = run(&["read", "thing/t-11", "--json"]);
    assert_eq!(text(&o).0.trim(), "", "t-11 got nothing");

    let o = publish("thing/t-10", r#"{"n":1}"#);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("(already there: deduplicated)"), "{out}");

    for id in ["acc-7", "acc-3"] {
        let o = run(&["ledger", "open", id, "--owner", "ann"]);
        assert!(o.status.success(), "{:?}", text(&o));
    }
    let deposit = |id: &str| run(&["ledger", "deposit", id, "5", "--idempotency-key", "kk"]);
    let o = deposit("acc-7");
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("acc-7: done"), "{out}");
    let o = deposit("acc-3");
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(
        err.contains("already used for deposit on account/acc-7"),
        "{err}"
    );
    let balance = |id: &str| {
        let o = run(&["ledger", "show", id, "--json"]);
        let v: serde_json::Value = serde_json::from_str(text(&o).0.trim()).unwrap();
        v["balance"].as_i64().unwrap()
    };
    assert_eq!(balance("acc-3"), 0);

    // Durable: nats-server killed and restarted, a new process repeats.
    server.restart();
    let o = deposit("acc-7");
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("already done (same idempotency key)"), "{out}");
    assert_eq!(balance("acc-7"), 5);
    let o = run(&[
        "ledger",
        "deposit",
        "acc-3",
        "5",
        "--idempotency-key",
        "kk-3",
    ]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(balance("acc-3"), 5);
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
    let url = support::admin_nats_url(home);
    let (subject, event_type, data) = (subject.to_owned(), event_type.to_owned(), data.to_owned());
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let client = sluice_events::ConnectConfig::new(&url)
                .connect()
                .await
                .unwrap();
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
    // The debit is parked behind the malformed command, so the saga learns
    // it was dead-lettered and asks for help instead of waiting forever.
    assert!(
        show.contains(r#""state":"needs_attention""#) && show.contains("parked behind"),
        "the debit is dead-lettered behind the malformed command: {show}"
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
    // The void releases acc-1 (shortly: the worker hands its dead letter
    // back); the saga closed the dead-lettered debit, so an operator retries
    // it, again if a retry still met the parked account, until it goes
    // through.
    assert!(
        eventually(20, || {
            let o = sluice(home, &["saga", "show", "t-stuck", "--json"]);
            let (show, _) = text(&o);
            if show.contains(r#""state":"completed""#) {
                return true;
            }
            if show.contains(r#""state":"needs_attention""#) {
                let _ = sluice(
                    home,
                    &[
                        "saga",
                        "retry",
                        "t-stuck",
                        "--note",
                        "ops: voided the malformed command",
                    ],
                );
            }
            std::thread::sleep(Duration::from_millis(500));
            false
        }),
        "the retried debit runs once the malformed command is voided"
    );
    assert_eq!(
        balance_of(home, "acc-1"),
        1000 - 100,
        "debited once over the attempts"
    );
    let t = transfer_state(home, "acc-1", "acc-2", "t-after");
    assert_eq!(t["state"], "completed", "{t}");
}
