//! The production topology of docker-compose.yml, for real on loopback: three
//! nats-server processes running the repository's `nats/cluster/n{1,2,3}.conf`
//! (addresses overridden on the command line, stores in temporary working
//! directories), the streams provisioned R3 by the admin user, and the four
//! roles as separate `sluice serve --role <role>` processes, each with its
//! own least-privilege identity: a client certificate from
//! `nats/gen-certs.sh` that `nats/accounts-tls.conf` maps to the role
//! (TLS on client and route ports), sharing a fresh PostgreSQL database.
//! Driven over HTTP like a client would.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_testkit::TestDatabase;
use sqlx::Connection;

const BIN: &str = env!("CARGO_BIN_EXE_sluice");
const ROLES: [&str; 4] = ["api", "projector", "worker", "saga"];
const TOKEN: &str = "topology-token-0123456789abcdef";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The certificates of `nats/gen-certs.sh` in `<dir>/certs`.
fn gen_certs(dir: &Path) -> PathBuf {
    let certs = dir.join("certs");
    let out = Command::new("bash")
        .arg(repo().join("nats/gen-certs.sh"))
        .arg(&certs)
        .output()
        .expect("bash and openssl (scripts/setup.sh)");
    assert!(
        out.status.success(),
        "gen-certs.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    certs
}

/// `user`'s TLS identity for a `ConnectConfig`.
fn tls_identity(c: &mut sluice_events::ConnectConfig, certs: &Path, user: &str) {
    c.tls_ca_file = Some(certs.join("ca.pem"));
    c.tls_cert_file = Some(certs.join(format!("{user}.pem")));
    c.tls_key_file = Some(certs.join(format!("{user}-key.pem")));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A child process with its output in files; kill -9 on drop.
struct Proc {
    name: String,
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, logs: &Path) -> Proc {
        // Numbered, so a restarted process keeps its predecessor's logs.
        let n = (0..)
            .find(|i| !logs.join(format!("{name}.{i}.out")).exists())
            .unwrap_or(0);
        let out = logs.join(format!("{name}.{n}.out"));
        let err = logs.join(format!("{name}.{n}.err"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.to_owned(),
            child,
            out,
            err,
        }
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// The last lines of both outputs, for failure messages.
    fn tail(&self) -> String {
        let mut text = String::new();
        for f in [&self.out, &self.err] {
            let s = std::fs::read_to_string(f).unwrap_or_default();
            let lines: Vec<&str> = s.lines().collect();
            let from = lines.len().saturating_sub(15);
            text.push_str(&format!(
                "--- {} {}\n{}\n",
                self.name,
                f.display(),
                lines[from..].join("\n")
            ));
        }
        text
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A fresh PostgreSQL database, dropped afterwards.
struct Db {
    rt: tokio::runtime::Runtime,
    db: TestDatabase,
}

impl Db {
    fn create(rt: tokio::runtime::Runtime) -> Db {
        let db = TestDatabase::fresh("sluice_topology");
        rt.block_on(async {
            let mut admin = sqlx::PgConnection::connect(&TestDatabase::admin_url())
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
        let name = self.db.name.clone();
        self.rt.block_on(async {
            if let Ok(mut admin) = sqlx::PgConnection::connect(&TestDatabase::admin_url()).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut admin)
                    .await;
            }
        });
    }
}

// Fields drop in order: the roles, then the nodes, then their directory.
struct Topology {
    roles: Vec<Proc>,
    nodes: Vec<Proc>,
    nats_url: String,
    db_url: String,
    http: String,
    dir: tempfile::TempDir,
}

impl Topology {
    fn logs(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    /// Every process's recent output, for failure messages.
    fn diag(&self) -> String {
        self.nodes
            .iter()
            .chain(&self.roles)
            .map(Proc::tail)
            .collect()
    }

    /// `sluice` with a clean environment and `user`'s NATS certificate.
    fn sluice(&self, user: &str) -> Command {
        let certs = self.dir.path().join("certs");
        let mut cmd = Command::new(BIN);
        cmd.env_clear()
            .env("SLUICE_HOME", self.dir.path().join(format!("home-{user}")))
            .env("SLUICE_NATS_URL", &self.nats_url)
            .env("SLUICE_NATS_TLS_CA", certs.join("ca.pem"))
            .env("SLUICE_NATS_TLS_CERT", certs.join(format!("{user}.pem")))
            .env("SLUICE_NATS_TLS_KEY", certs.join(format!("{user}-key.pem")))
            .env("SLUICE_REPLICAS", "3")
            .env("SLUICE_DATABASE_URL", &self.db_url)
            // A dead replica's pin on the worker and saga consumers expires
            // after 5 s rather than 90, so a restart takes over in time.
            .env("SLUICE_WORKER_ACK_WAIT_SECS", "2")
            .env("SLUICE_WORKER_PIN_TIMEOUT_SECS", "5")
            .env("SLUICE_LOG", "info");
        cmd
    }

    /// Starts `sluice serve --role <role>` as the role's own NATS user and
    /// waits until it says it is up.
    fn start_role(&mut self, role: &str) {
        let mut cmd = self.sluice(role);
        cmd.args(["serve", "--role", role]);
        if role == "api" {
            cmd.env("SLUICE_HTTP_ADDR", &self.http)
                .env("SLUICE_HTTP_TOKEN_FILE", self.dir.path().join("token"));
        }
        let proc = Proc::spawn(role, cmd, &self.logs());
        self.roles.retain(|p| p.name != role);
        self.roles.push(proc);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let p = self.roles.last_mut().unwrap();
            if p.stdout().contains("sluice is up") {
                break;
            }
            let exited = p.child.try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "role {role} did not come up ({exited:?}):\n{}",
                self.diag()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill9_role(&mut self, role: &str) {
        let p = self.roles.iter_mut().find(|p| p.name == role).unwrap();
        p.kill9();
    }

    fn call(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, Value) {
        let headers: String = headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}\r\n"))
            .collect();
        let (status, text) = support::http(&self.http, method, path, &headers, body);
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, v)
    }

    fn post(&self, path: &str, key: Option<&str>, body: &str) -> (u16, Value) {
        let auth = format!("Bearer {TOKEN}");
        let mut headers = vec![("Authorization", auth.as_str())];
        if let Some(k) = key {
            headers.push(("Idempotency-Key", k));
        }
        self.call("POST", path, &headers, body)
    }

    /// `serve` is production: reads need a token too.
    fn get(&self, path: &str) -> (u16, Value) {
        let auth = format!("Bearer {TOKEN}");
        self.call("GET", path, &[("Authorization", auth.as_str())], "")
    }

    /// Polls `path` until `done` holds for its JSON (30 s at most).
    fn wait_for(&self, what: &str, path: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, v) = self.get(path);
            if status == 200 && done(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: GET {path} is still {status} {v}\n{}",
                self.diag()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn balance(&self, account: &str, expected: i64) {
        self.wait_for(
            &format!("balance of {account} = {expected}"),
            &format!("/v1/projections/account_balances/rows/{account}"),
            |v| v["balance"] == expected,
        );
    }
}

/// Starts the three nodes from `nats/cluster/n{1,2,3}.conf` (certificates
/// from `gen-certs.sh` in `<dir>/certs`, linked into each node's working
/// directory) and waits until JetStream has a meta leader (the admin
/// certificate can ask for account info).
fn start_cluster(dir: &Path, rt: &tokio::runtime::Runtime) -> (Vec<Proc>, String, String) {
    let certs = gen_certs(dir);
    // Node 1's monitoring port, for the route check of `status --production`.
    let monitor_port = free_port();
    let bin = sluice_events::find_nats_server_bin().expect("nats-server 2.15.1 (scripts/setup.sh)");
    let client_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let cluster_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let routes = cluster_ports
        .iter()
        .map(|p| format!("nats-route://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let nodes: Vec<Proc> = (0..3)
        .map(|i| {
            let name = format!("n{}", i + 1);
            // store_dir in the config is relative: it lands in this directory.
            let cwd = dir.join(&name);
            std::fs::create_dir_all(&cwd).unwrap();
            std::os::unix::fs::symlink(&certs, cwd.join("certs")).unwrap();
            let mut cmd = Command::new(&bin);
            cmd.current_dir(&cwd)
                .arg("-c")
                .arg(repo().join(format!("nats/cluster/{name}.conf")))
                .args(["-a", "127.0.0.1", "-p", &client_ports[i].to_string()])
                .args([
                    "--cluster",
                    &format!("nats://127.0.0.1:{}", cluster_ports[i]),
                ])
                .args(["--routes", &routes]);
            if i == 0 {
                cmd.args(["-m", &monitor_port.to_string()]);
            }
            Proc::spawn(&name, cmd, &logs)
        })
        .collect();
    let url = client_ports
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let ready = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut admin = sluice_events::ConnectConfig::new(&url);
            tls_identity(&mut admin, &certs, "admin");
            admin.connect_timeout = Duration::from_secs(2);
            if let Ok(client) = admin.connect().await {
                let mut js = async_nats::jetstream::new(client);
                js.set_timeout(Duration::from_secs(2));
                if js.query_account().await.is_ok() {
                    return true;
                }
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    if !ready {
        let text: String = nodes.iter().map(Proc::tail).collect();
        panic!("the cluster elected no JetStream meta leader in 30 s:\n{text}");
    }
    (nodes, url, format!("http://127.0.0.1:{monitor_port}"))
}

#[test]
fn roles_as_separate_processes_on_a_three_node_cluster_survive_kill_9() {
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::Builder::new()
        .prefix("sluice-topology-")
        .tempdir()
        .unwrap();
    let (nodes, nats_url, monitor) = start_cluster(dir.path(), &rt);
    let db = Db::create(rt);
    std::fs::write(dir.path().join("token"), TOKEN).unwrap();
    let mut topo = Topology {
        nats_url,
        db_url: db.db.url.clone(),
        http: format!("127.0.0.1:{}", free_port()),
        nodes,
        roles: Vec::new(),
        dir,
    };

    // No role may create streams: the admin user provisions them, R3.
    let out = topo
        .sluice("admin")
        .args(["serve", "--provision-only"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "provisioning failed: {text}");
    assert!(text.contains("EVENTS (replicas 3)"), "{text}");
    let status = topo
        .sluice("admin")
        .args(["status", "--production", "--json"])
        .output()
        .unwrap();
    let s: Value = serde_json::from_slice(&status.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json: {e}: {}",
            String::from_utf8_lossy(&status.stderr)
        )
    });
    assert_eq!(s["stream"]["replicas"], 3, "{s}");
    // The security lint sees credentials and TLS required; routes are not
    // visible to a client without the monitoring endpoint, and it says so.
    assert_eq!(s["security"]["auth_required"], true, "{s}");
    assert_eq!(s["security"]["tls_required"], true, "{s}");
    let warnings = s["warnings"].to_string();
    assert!(
        !warnings.contains("anonymous") && !warnings.contains("client port is plaintext"),
        "{s}"
    );
    assert!(warnings.contains("SLUICE_NATS_MONITOR_URL"), "{s}");
    // With node 1's monitoring endpoint it reads the routes: TLS, verified.
    let status = topo
        .sluice("admin")
        .args([
            "status",
            "--production",
            "--json",
            "--monitor-url",
            &monitor,
        ])
        .output()
        .unwrap();
    let s: Value = serde_json::from_slice(&status.stdout).unwrap_or_else(|e| {
        panic!(
            "status --monitor-url: {e}: {}",
            String::from_utf8_lossy(&status.stderr)
        )
    });
    assert_eq!(s["security"]["routes_tls_required"], true, "{s}");
    assert_eq!(s["security"]["routes_tls_verify"], true, "{s}");
    let warnings = s["warnings"].to_string();
    assert!(
        !warnings.contains("route") && !warnings.contains("anonymous"),
        "{s}"
    );

    for role in ROLES {
        topo.start_role(role);
    }
    // A role's own identity runs the compose healthcheck, replying on the
    // role's inbox prefix (the only one it may subscribe to).
    for role in ROLES {
        let out = topo
            .sluice(role)
            .env("SLUICE_NATS_INBOX_PREFIX", format!("_INBOX_{role}"))
            .args(["status", "--production"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "status as {role}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // A client's day: two accounts, a deposit (sent twice), a transfer.
    let (status, v) = topo.post(
        "/v1/accounts",
        Some("open-a"),
        r#"{"id":"a","owner":"ann","currency":"EUR"}"#,
    );
    assert_eq!(status, 201, "{v}\n{}", topo.diag());
    let (status, v) = topo.post(
        "/v1/accounts",
        Some("open-b"),
        r#"{"id":"b","owner":"bob","currency":"EUR"}"#,
    );
    assert_eq!(status, 201, "{v}");
    let (status, v) = topo.post(
        "/v1/accounts/a/deposits",
        Some("dep-a-1"),
        r#"{"amount":100}"#,
    );
    assert_eq!(status, 201, "{v}");
    let (status, v) = topo.post(
        "/v1/accounts/a/deposits",
        Some("dep-a-1"),
        r#"{"amount":100}"#,
    );
    // A repeat answers the first response (201) again, marked replayed.
    assert_eq!((status, &v["replayed"]), (201, &Value::Bool(true)), "{v}");
    // Without the token nothing moves.
    let (status, _) = topo.call(
        "POST",
        "/v1/transfers",
        &[],
        r#"{"from":"a","to":"b","amount":1}"#,
    );
    assert_eq!(status, 401);
    let (status, v) = topo.post(
        "/v1/transfers",
        None,
        r#"{"from":"a","to":"b","amount":30,"id":"t-0"}"#,
    );
    assert_eq!(status, 202, "{v}");
    topo.wait_for("transfer t-0 completes", "/v1/transfers/t-0", |v| {
        v["state"] == "completed"
    });
    topo.balance("a", 70);
    topo.balance("b", 30);

    // kill -9 the projector while transfers are in flight; the other roles
    // carry on (sagas complete), and the restarted projector catches up from
    // its checkpoint in PostgreSQL without applying anything twice.
    let transfers: Vec<String> = (1..=8).map(|i| format!("t-{i}")).collect();
    for (i, id) in transfers.iter().enumerate() {
        if i == 3 {
            topo.kill9_role("projector");
        }
        let body = format!(r#"{{"from":"a","to":"b","amount":5,"id":"{id}"}}"#);
        let (status, v) = topo.post("/v1/transfers", None, &body);
        assert_eq!(status, 202, "{id}: {v}");
    }
    for id in &transfers {
        topo.wait_for(
            &format!("{id} completes with the projector down"),
            &format!("/v1/transfers/{id}"),
            |v| v["state"] == "completed",
        );
    }
    // The API serves the projection's last committed state meanwhile.
    let (status, _) = topo.get("/v1/projections/account_balances/rows/a");
    assert_eq!(status, 200);
    let restarted = Instant::now();
    topo.start_role("projector");
    topo.balance("a", 30);
    topo.balance("b", 70);
    eprintln!(
        "projector restarted after kill -9: caught up {:.1} s later",
        restarted.elapsed().as_secs_f64()
    );
    let rows = topo.wait_for(
        "every transfer projected as completed",
        "/v1/projections/transfers/rows?limit=100",
        |v| {
            v["rows"]
                .as_array()
                .is_some_and(|r| r.len() == 9 && r.iter().all(|t| t["state"] == "completed"))
        },
    );
    assert_eq!(rows["rows"].as_array().unwrap().len(), 9);

    // kill -9 the worker and the saga role mid-flow: transfers sent while
    // they are down wait; restarted, they take over the pinned consumers,
    // finish every transfer, and no step is applied twice.
    let back: Vec<String> = (1..=6).map(|i| format!("r-{i}")).collect();
    for (i, id) in back.iter().enumerate() {
        if i == 2 {
            topo.kill9_role("saga");
            topo.kill9_role("worker");
        }
        let body = format!(r#"{{"from":"b","to":"a","amount":5,"id":"{id}"}}"#);
        let (status, v) = topo.post("/v1/transfers", None, &body);
        assert_eq!(status, 202, "{id}: {v}");
    }
    let (status, v) = topo.get("/v1/transfers/r-6");
    assert_eq!(
        (status, &v["state"]),
        (200, &Value::from("pending")),
        "no saga role runs: {v}"
    );
    let restarted = Instant::now();
    topo.start_role("worker");
    topo.start_role("saga");
    for id in &back {
        topo.wait_for(
            &format!("{id} completes after the restart"),
            &format!("/v1/transfers/{id}"),
            |v| v["state"] == "completed",
        );
    }
    eprintln!(
        "worker and saga restarted after kill -9: all transfers completed {:.1} s later",
        restarted.elapsed().as_secs_f64()
    );
    topo.balance("a", 60);
    topo.balance("b", 40);
    topo.wait_for(
        "all fifteen transfers projected as completed",
        "/v1/projections/transfers/rows?limit=100",
        |v| {
            v["rows"]
                .as_array()
                .is_some_and(|r| r.len() == 15 && r.iter().all(|t| t["state"] == "completed"))
        },
    );

    // Every command took effect once: one debit and one credit per transfer.
    let events = |account: &str| -> Vec<(String, String)> {
        let (status, v) = topo.get(&format!("/v1/streams/account/{account}"));
        assert_eq!(status, 200, "{v}");
        assert!(v["next"].is_null(), "one page: {v}");
        v["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["type"].as_str().unwrap().to_owned(),
                    e["id"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    for (account, deposits, withdrawals) in [("a", 7, 9), ("b", 9, 6)] {
        let evs = events(account);
        let count = |t: &str| evs.iter().filter(|(x, _)| x == t).count();
        assert_eq!(count("ledger.account.opened.v1"), 1, "{account}: {evs:?}");
        assert_eq!(
            count("ledger.account.deposited.v1"),
            deposits,
            "{account}: {evs:?}"
        );
        assert_eq!(
            count("ledger.account.withdrawn.v1"),
            withdrawals,
            "{account}: {evs:?}"
        );
        let mut ids: Vec<&str> = evs.iter().map(|(_, id)| id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), evs.len(), "an event stored twice: {evs:?}");
    }
    for id in transfers.iter().chain(&back) {
        let from = if id.starts_with('t') { "a" } else { "b" };
        let debits = events(from)
            .iter()
            .filter(|(t, eid)| {
                t == "ledger.account.withdrawn.v1" && eid.starts_with(&format!("{id}/"))
            })
            .count();
        assert_eq!(debits, 1, "{id} debited {debits} times");
    }
    assert!(
        topo.roles
            .iter_mut()
            .all(|p| p.child.try_wait().unwrap().is_none()),
        "a role exited:\n{}",
        topo.diag()
    );
    eprintln!(
        "topology test took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    drop(topo);
    drop(db);
}
