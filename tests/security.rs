//! Zero-trust NATS: the embedded server refuses anonymous clients; each
//! role has its own identity and least privilege (nats/permissions.conf,
//! with passwords in nats/accounts.conf or certificates in
//! nats/accounts-tls.conf); mutual TLS maps a certificate to its role
//! (nats/gen-certs.sh, nats/tls.conf); the shipped cluster configs let no
//! rogue server join; a deleted worker consumer comes back from its stored
//! position.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use sluice_events::{
    ConnectConfig, EmbeddedAuth, EmbeddedConfig, EmbeddedServer, Error, EventStore,
    ExpectedVersion, NewEvent, StoreConfig, StreamId,
};
use sluice_testkit::NatsServer;
use sluice_workers::{Delivery, HandlerError, WorkerConfig};
use tokio_util::sync::CancellationToken;

const ROLES: [&str; 7] = [
    "admin",
    "api",
    "projector",
    "worker",
    "saga",
    "producer",
    "sys",
];
/// The ledger's durable consumers, as named in nats/permissions.conf.
const WORKER_DURABLE: &str = "ledger-account-commands";
const SAGA_DURABLE: &str = "ledger-transfer-saga";
/// A worker of this file (its name is its consumers' identity).
const RECREATED: &str = "test-recreated";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn password(role: &str) -> String {
    format!("pw-{role}-{}", std::process::id())
}

/// Runs nats/gen-certs.sh into `out`.
fn gen_certs(out: &Path) {
    let o = Command::new("bash")
        .arg(repo().join("nats/gen-certs.sh"))
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A server with the project's accounts and permissions: password users
/// (accounts.conf), or with `tls` the certificate users (accounts-tls.conf)
/// behind tls.conf's mutual TLS.
fn secured_server(dir: &Path, tls: Option<&Path>) -> EmbeddedServer {
    let mut config = EmbeddedConfig::new(dir.join("nats"));
    config.auth = EmbeddedAuth::FromExtraConfig;
    // nats-server resolves includes relative to the including file only.
    std::fs::create_dir_all(dir.join("nats")).unwrap();
    for f in ["accounts.conf", "accounts-tls.conf", "permissions.conf"] {
        std::fs::copy(repo().join("nats").join(f), dir.join("nats").join(f)).unwrap();
    }
    let mut extra = String::new();
    match tls {
        None => extra.push_str("include \"accounts.conf\"\n"),
        Some(certs) => {
            extra.push_str("include \"accounts-tls.conf\"\n");
            let tls_conf = std::fs::read_to_string(repo().join("nats/tls.conf"))
                .unwrap()
                .replace("./certs", &certs.display().to_string());
            extra.push_str(&tls_conf);
        }
    }
    config.extra_config = extra;
    config.env = ROLES
        .iter()
        .map(|r| (format!("SLUICE_{}_PASSWORD", r.to_uppercase()), password(r)))
        .collect();
    EmbeddedServer::start(config).unwrap()
}

/// `role`'s own reply prefix, as `sluice serve --role <role>` sets it.
fn inbox(role: &str) -> Option<String> {
    (role != "admin").then(|| format!("_INBOX_{role}"))
}

fn as_role(url: &str, role: &str) -> ConnectConfig {
    let mut c = ConnectConfig::new(url);
    c.user = Some(role.to_owned());
    c.password = Some(password(role));
    c.inbox_prefix = inbox(role);
    c
}

fn quick() -> StoreConfig {
    StoreConfig {
        request_timeout: Duration::from_millis(500),
        max_attempts: 1,
        ..StoreConfig::default()
    }
}

#[tokio::test]
async fn each_role_works_with_its_own_credentials_and_no_more() {
    let dir = tempfile::tempdir().unwrap();
    let server = secured_server(dir.path(), None);
    let url = server.url();

    // Nobody gets in anonymously or with a wrong password, and it fails fast.
    let started = Instant::now();
    let err = EventStore::connect(&url, StoreConfig::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    let mut wrong = as_role(&url, "api");
    wrong.password = Some("guess".into());
    let err = EventStore::connect_with(&wrong, StoreConfig::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // admin sets the stream up; api appends and reads.
    let admin = EventStore::connect_with(&as_role(&url, "admin"), StoreConfig::default())
        .await
        .unwrap();
    let api = EventStore::connect_with(&as_role(&url, "api"), quick())
        .await
        .unwrap();
    let id = StreamId::new("account", "acc-1").unwrap();
    api.append(
        &id,
        ExpectedVersion::NoStream,
        vec![NewEvent::new("t.opened.v1", "{}")],
    )
    .await
    .unwrap();
    let read: Vec<_> = api.read(&id, 1).await.unwrap().try_collect().await.unwrap();
    assert_eq!(read.len(), 1);

    // The projector reads but may not append.
    let projector = EventStore::connect_with(&as_role(&url, "projector"), quick())
        .await
        .unwrap();
    let read: Vec<_> = projector
        .read(&id, 1)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(read.len(), 1);
    let err = projector
        .append(
            &id,
            ExpectedVersion::Any,
            vec![NewEvent::new("t.sneaky.v1", "{}")],
        )
        .await;
    assert!(err.is_err(), "the projector appended: {err:?}");
    assert_eq!(admin.stream_state().await.unwrap().messages, 1);

    // The api may not touch dead letters.
    let admin_js = admin.jetstream();
    admin_js
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: "DLQ".into(),
            subjects: vec!["dlq.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let api_client = as_role(&url, "api").connect().await.unwrap();
    let mut api_js = async_nats::jetstream::new(api_client);
    api_js.set_timeout(Duration::from_millis(500));
    assert!(api_js.get_stream("DLQ").await.is_err(), "api read DLQ info");
    let publish = api_js.publish("dlq.c.account", "{}".into()).await;
    let acked = match publish {
        Ok(f) => f.await.is_ok(),
        Err(_) => false,
    };
    assert!(!acked, "api wrote a dead letter");
    let mut dlq = admin_js.get_stream("DLQ").await.unwrap();
    assert_eq!(dlq.info().await.unwrap().state.messages, 0);

    // Stream management is the admin's alone.
    let projector_js = projector.jetstream();
    let r = projector_js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "ROGUE".into(),
            subjects: vec!["rogue.>".into()],
            ..Default::default()
        })
        .await;
    assert!(r.is_err(), "projector created a stream");
}

/// A TLS identity: `role`'s certificate from `certs` (the dev CA).
fn with_cert(url: &str, certs: &Path, role: &str) -> ConnectConfig {
    let mut c = ConnectConfig::new(url);
    c.tls_ca_file = Some(certs.join("ca.pem"));
    c.tls_cert_file = Some(certs.join(format!("{role}.pem")));
    c.tls_key_file = Some(certs.join(format!("{role}-key.pem")));
    c.connect_timeout = Duration::from_secs(2);
    c.inbox_prefix = inbox(role);
    c
}

/// Whether the server refuses this client (at connect, or right after).
async fn refused(c: &ConnectConfig) -> bool {
    match c.connect().await {
        Err(_) => true,
        Ok(c) => {
            c.flush().await.is_err() || {
                tokio::time::sleep(Duration::from_millis(500)).await;
                c.connection_state() != async_nats::connection::State::Connected
            }
        }
    }
}

#[tokio::test]
async fn mutual_tls_maps_each_certificate_to_its_role_and_refuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    gen_certs(&certs);
    let server = secured_server(dir.path(), Some(&certs));
    let url = server.url();

    // The api's certificate alone is the api user: it appends, and may not
    // manage streams.
    let api = with_cert(&url, &certs, "api");
    let client = api.connect().await.unwrap();
    assert!(client.server_info().tls_required);
    client.flush().await.unwrap();
    let admin = EventStore::connect_with(&with_cert(&url, &certs, "admin"), StoreConfig::default())
        .await
        .unwrap();
    let store = EventStore::connect_with(&api, quick()).await.unwrap();
    let id = StreamId::new("account", "tls-1").unwrap();
    store
        .append(
            &id,
            ExpectedVersion::NoStream,
            vec![NewEvent::new("t.opened.v1", "{}")],
        )
        .await
        .unwrap();
    let mut js = async_nats::jetstream::new(client);
    js.set_timeout(Duration::from_millis(500));
    assert!(
        js.delete_stream("EVENTS").await.is_err(),
        "the api certificate deleted the stream"
    );
    assert_eq!(admin.stream_state().await.unwrap().messages, 1);

    // The projector's certificate with the admin's password: refused (with
    // `verify: true` it was accepted as admin). The certificate is the
    // identity; no password can lift it to another role.
    for (cert, user) in [("projector", "admin"), ("api", "admin"), ("api", "worker")] {
        let mut c = with_cert(&url, &certs, cert);
        c.user = Some(user.to_owned());
        c.password = Some(password(user));
        assert!(refused(&c).await, "{cert}'s certificate got in as {user}");
    }

    // No client certificate: refused by the verifying server.
    let mut no_cert = ConnectConfig::new(&url);
    no_cert.tls_ca_file = Some(certs.join("ca.pem"));
    no_cert.connect_timeout = Duration::from_secs(2);
    assert!(
        refused(&no_cert).await,
        "a client without a certificate got in"
    );
    let mut no_cert = as_role(&url, "admin");
    no_cert.tls_ca_file = Some(certs.join("ca.pem"));
    no_cert.connect_timeout = Duration::from_secs(2);
    assert!(
        refused(&no_cert).await,
        "the admin password without a certificate got in"
    );

    // A certificate from another CA: refused too.
    let other = dir.path().join("other");
    gen_certs(&other);
    let mut forged = with_cert(&url, &certs, "admin");
    forged.tls_cert_file = Some(other.join("admin.pem"));
    forged.tls_key_file = Some(other.join("admin-key.pem"));
    assert!(
        refused(&forged).await,
        "a certificate from a foreign CA got in"
    );
}

#[test]
fn every_shipped_nats_config_is_valid() {
    let bin = sluice_events::find_nats_server_bin().unwrap();
    let nats = repo().join("nats");
    // The node configs name their certificates relative to the working
    // directory (n1-3) or at the compose mounts: give them real ones.
    let work = tempfile::tempdir().unwrap();
    gen_certs(&work.path().join("certs"));
    let compose = std::fs::read_to_string(nats.join("cluster/compose.conf"))
        .unwrap()
        .replace(
            "/etc/sluice-node",
            &work.path().join("certs/n1").display().to_string(),
        )
        .replace(
            "/etc/sluice-certs",
            &work.path().join("certs").display().to_string(),
        );
    assert!(!compose.contains("/etc/"), "{compose}");
    let compose_file = nats
        .join("cluster")
        .join(format!(".compose-test-{}.conf", std::process::id()));
    std::fs::write(&compose_file, compose).unwrap();
    let files = [
        (nats.join("dev.conf"), nats.clone()),
        (nats.join("cluster/n1.conf"), work.path().to_path_buf()),
        (nats.join("cluster/n2.conf"), work.path().to_path_buf()),
        (nats.join("cluster/n3.conf"), work.path().to_path_buf()),
        (compose_file.clone(), work.path().to_path_buf()),
    ];
    let mut failures = Vec::new();
    for (f, cwd) in &files {
        let out = std::process::Command::new(&bin)
            .arg("-t")
            .arg("-c")
            .arg(f)
            .current_dir(cwd)
            .envs(
                ROLES
                    .iter()
                    .map(|r| (format!("SLUICE_{}_PASSWORD", r.to_uppercase()), password(r))),
            )
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        if !(out.status.success() && text.contains("is valid")) {
            failures.push(format!("{}: {text}", f.display()));
        }
    }
    let _ = std::fs::remove_file(&compose_file);
    assert!(failures.is_empty(), "{failures:#?}");
    // Every cluster config speaks TLS on both ports and maps certificates.
    for f in [
        "cluster/n1.conf",
        "cluster/n2.conf",
        "cluster/n3.conf",
        "cluster/compose.conf",
    ] {
        let text = std::fs::read_to_string(nats.join(f)).unwrap();
        assert_eq!(
            text.matches("tls {").count(),
            2,
            "{f}: client and route TLS"
        );
        assert!(text.contains("verify_and_map: true"), "{f}");
        assert!(
            text.contains("route-ca.pem"),
            "{f}: routes have their own CA"
        );
        assert!(text.contains("include \"../accounts-tls.conf\""), "{f}");
        assert!(!text.contains("verify: false"), "{f}");
    }
}

/// Docker is not on the test machines: check the compose file and the
/// Dockerfile statically (the topology itself runs for real in
/// crates/sluice/tests/topology.rs, tests/failover.rs and this file's server
/// tests).
#[test]
fn compose_file_and_dockerfile_match_the_repository() {
    let compose = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    for service in [
        "nats-1:",
        "nats-2:",
        "nats-3:",
        "postgres:",
        "api:",
        "projector:",
        "worker:",
        "saga:",
    ] {
        assert!(
            compose.contains(&format!("\n  {service}")),
            "service {service} missing"
        );
    }
    for role in ["api", "projector", "worker", "saga"] {
        assert!(
            compose.contains(&format!(r#"command: ["serve", "--role", "{role}"]"#)),
            "{role} not run as its own service"
        );
        assert!(
            compose.contains(&format!(
                "SLUICE_NATS_TLS_CERT: /etc/sluice-certs/{role}.pem"
            )),
            "{role} without its own NATS certificate"
        );
        assert!(
            compose.contains(&format!("SLUICE_NATS_INBOX_PREFIX: _INBOX_{role}")),
            "{role}'s healthcheck would reply on an inbox it may not read"
        );
    }
    // The roles' users cannot create streams: admin provisions them first.
    assert!(
        compose.contains(r#"command: ["serve", "--provision-only"]"#)
            && compose.contains("SLUICE_NATS_TLS_CERT: /etc/sluice-certs/admin.pem")
            && compose.contains("condition: service_completed_successfully"),
        "no provisioning step before the roles"
    );
    assert!(compose.matches("healthcheck:").count() >= 3);
    // Every config path the compose file mounts or names exists.
    assert!(compose.contains("./nats:/etc/nats:ro"));
    for conf in compose.split('"').filter(|t| t.starts_with("/etc/nats/")) {
        let local = repo()
            .join("nats")
            .join(conf.trim_start_matches("/etc/nats/"));
        assert!(local.is_file(), "{conf} does not exist in nats/");
    }
    // Every node gets its own certificate directory; no NATS password.
    for i in 1..=3 {
        assert!(compose.contains(&format!("./.secrets/certs/n{i}:/etc/sluice-node:ro")));
    }
    assert!(
        !compose.contains("SLUICE_NATS_PASSWORD"),
        "a NATS password in the compose file"
    );
    // No secret in the file: passwords come from the environment.
    assert!(
        !compose.to_lowercase().contains("password: \""),
        "a literal password"
    );
    let docker = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    assert!(
        docker.matches("\nFROM ").count() + usize::from(docker.starts_with("FROM ")) >= 2,
        "multi-stage"
    );
    assert!(
        docker.contains("USER sluice") && docker.contains("--uid 10001"),
        "non-root"
    );
    assert!(docker.contains("--locked -p sluice"));
}

#[tokio::test]
async fn the_embedded_server_refuses_anonymous_clients() {
    let server = NatsServer::start();

    // Anonymous: refused at once, with an authorization error.
    let started = Instant::now();
    let mut anonymous = ConnectConfig::new(server.anonymous_url());
    anonymous.connect_timeout = Duration::from_secs(2);
    let err = anonymous.connect().await.unwrap_err();
    assert!(
        matches!(&err, Error::Connect { source, .. }
            if source.kind() == async_nats::ConnectErrorKind::AuthorizationViolation),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    // A wrong password too, and the error never shows the password.
    let wrong = server
        .url()
        .replace(&server.credentials().password, "not-the-password-0123");
    let err = EventStore::connect(&wrong, StoreConfig::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        !err.contains(&server.credentials().password) && !err.contains("not-the-password"),
        "{err}"
    );

    // With the generated credential: appends and reads.
    let store = server.store().await;
    let id = StreamId::new("account", "a-1").unwrap();
    store
        .append(
            &id,
            ExpectedVersion::NoStream,
            vec![NewEvent::new("t.v1", "{}")],
        )
        .await
        .unwrap();
    assert_eq!(store.stream_state().await.unwrap().messages, 1);

    // The credential and the config holding it are private; the server
    // listens on loopback only.
    use std::os::unix::fs::PermissionsExt;
    for f in ["credentials.json", "nats-server.conf"] {
        let mode = std::fs::metadata(server.dir().join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    let conf = std::fs::read_to_string(server.dir().join("nats-server.conf")).unwrap();
    assert!(conf.contains("listen: \"127.0.0.1:"), "{conf}");
    assert!(conf.contains("authorization {"), "{conf}");
    assert!(
        !conf.contains("http:") && !conf.contains("no_auth_user"),
        "{conf}"
    );
}

#[tokio::test]
async fn a_home_from_before_authorization_is_migrated_on_start() {
    let dir = tempfile::tempdir().unwrap();
    // The old embedded config: no authorization at all.
    let mut old = EmbeddedConfig::new(dir.path());
    old.auth = EmbeddedAuth::FromExtraConfig;
    let mut server = EmbeddedServer::start(old).unwrap();
    let url = server.anonymous_url();
    let store = EventStore::connect(&url, StoreConfig::default())
        .await
        .unwrap();
    let id = StreamId::new("account", "old-1").unwrap();
    store
        .append(
            &id,
            ExpectedVersion::NoStream,
            vec![NewEvent::new("t.v1", "{}")],
        )
        .await
        .unwrap();
    drop(store);
    server.stop(Duration::from_secs(5));
    assert!(!dir.path().join("credentials.json").exists());

    // The next start (the default config) creates the credential, rewrites
    // the server config, and keeps the data.
    let mut config = EmbeddedConfig::new(dir.path());
    config.port = Some(server.port());
    let server = EmbeddedServer::start(config).unwrap();
    assert!(dir.path().join("credentials.json").is_file());
    let mut anonymous = ConnectConfig::new(&url);
    anonymous.connect_timeout = Duration::from_secs(2);
    assert!(
        anonymous.connect().await.is_err(),
        "anonymous still gets in"
    );
    let store = EventStore::connect(&server.url(), StoreConfig::default())
        .await
        .unwrap();
    assert_eq!(store.stream_state().await.unwrap().messages, 1);
}

/// A nats-server process, killed on drop.
struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// Waits until a client can connect to `port` on loopback.
fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Receives what `sub` gets within `wait`.
async fn drain(sub: &mut async_nats::Subscriber, wait: Duration) -> Vec<String> {
    let mut got = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(wait, sub.next()).await {
        got.push(m.subject.to_string());
    }
    got
}

#[tokio::test]
async fn a_rogue_server_cannot_join_the_shipped_cluster() {
    let bin = sluice_events::find_nats_server_bin().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    gen_certs(&certs);
    let cluster_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let client_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let routes = cluster_ports
        .iter()
        .map(|p| format!("nats-route://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    // n1 and n2 from the shipped configs, as topology.rs runs them.
    let mut nodes = Vec::new();
    for i in 0..2 {
        let name = format!("n{}", i + 1);
        let cwd = dir.path().join(&name);
        std::fs::create_dir_all(&cwd).unwrap();
        std::os::unix::fs::symlink(&certs, cwd.join("certs")).unwrap();
        let child = Command::new(&bin)
            .current_dir(&cwd)
            .arg("-c")
            .arg(repo().join(format!("nats/cluster/{name}.conf")))
            .args(["-a", "127.0.0.1", "-p", &client_ports[i].to_string()])
            .args([
                "--cluster",
                &format!("nats://127.0.0.1:{}", cluster_ports[i]),
            ])
            .args(["--routes", &routes])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        nodes.push(Node(child));
        wait_listening(client_ports[i]);
    }
    // Rogue servers routing to n1: one in plaintext as the finding did, one
    // speaking TLS with a stolen role certificate and the route CA.
    let rogue_confs = [
        String::new(),
        format!(
            "  tls {{\n    cert_file: \"{c}/api.pem\"\n    key_file: \"{c}/api-key.pem\"\n    ca_file: \"{c}/route-ca.pem\"\n  }}\n",
            c = certs.display()
        ),
    ];
    let mut rogue_subs = Vec::new();
    for (i, tls) in rogue_confs.iter().enumerate() {
        let port = free_port();
        let conf = dir.path().join(format!("rogue-{i}.conf"));
        std::fs::write(
            &conf,
            format!(
                // The victim's account name, with a user of the rogue's own:
                // routed messages of that account reach it if it joins.
                "listen: \"127.0.0.1:{port}\"\naccounts {{ SLUICE {{ users: [{{ user: spy, password: spy-password }}] }} }}\ncluster {{\n  name: sluice\n  listen: \"127.0.0.1:{}\"\n{tls}  routes: [\"nats-route://127.0.0.1:{}\"]\n}}\n",
                free_port(),
                cluster_ports[0]
            ),
        )
        .unwrap();
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        nodes.push(Node(child));
        wait_listening(port);
        let client = ConnectConfig::new(format!("nats://spy:spy-password@127.0.0.1:{port}"))
            .connect()
            .await
            .unwrap();
        let sub = client.subscribe("events.>").await.unwrap();
        client.flush().await.unwrap();
        rogue_subs.push((client, sub));
    }

    // Positive control: a legitimate node (n2) does receive over the route.
    let url = |i: usize| format!("nats://127.0.0.1:{}", client_ports[i]);
    let n2 = with_cert(&url(1), &certs, "admin").connect().await.unwrap();
    let mut legit = n2.subscribe("events.>").await.unwrap();
    n2.flush().await.unwrap();
    let api = with_cert(&url(0), &certs, "api").connect().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        api.publish("events.account.probe", "p".into())
            .await
            .unwrap();
        api.flush().await.unwrap();
        if !drain(&mut legit, Duration::from_millis(200))
            .await
            .is_empty()
        {
            break;
        }
        assert!(Instant::now() < deadline, "n1 and n2 formed no route");
    }
    // The rogues had as long as n2 to join; give them a second more.
    tokio::time::sleep(Duration::from_secs(1)).await;
    drain(&mut legit, Duration::from_millis(100)).await;
    for i in 0..5 {
        api.publish(format!("events.account.secret-{i}"), "s".into())
            .await
            .unwrap();
    }
    api.flush().await.unwrap();
    let got = drain(&mut legit, Duration::from_millis(500)).await;
    assert_eq!(got.len(), 5, "{got:?}");
    for (i, (_, sub)) in rogue_subs.iter_mut().enumerate() {
        let got = drain(sub, Duration::from_millis(300)).await;
        assert!(
            got.is_empty(),
            "rogue server {i} joined and received {got:?}"
        );
    }
}

/// One operation a role tries.
#[derive(Debug, Clone)]
enum Op {
    /// A request (a JetStream publish, or a JetStream API call with `body`):
    /// allowed when anything answers, refused when the server drops it.
    Request(&'static str, &'static str),
    /// A subscription: allowed when it receives what the admin publishes.
    Subscribe(&'static str),
}

const CREATE_WORKER_DURABLE: &str = r#"{"stream_name":"EVENTS","config":{"durable_name":"ledger-account-commands","name":"ledger-account-commands","ack_policy":"explicit","filter_subject":"events.cmd-account.>","deliver_policy":"all"}}"#;
const CREATE_SAGA_DURABLE: &str = r#"{"stream_name":"EVENTS","config":{"durable_name":"ledger-transfer-saga","name":"ledger-transfer-saga","ack_policy":"explicit","filter_subject":"events.saga-transfer.>","deliver_policy":"all"}}"#;
const CREATE_EPHEMERAL: &str = r#"{"stream_name":"EVENTS","config":{"ack_policy":"none","deliver_policy":"all","inactive_threshold":5000000000}}"#;
const NEXT: &str = r#"{"batch":1,"no_wait":true}"#;

/// Every role's allowed (`true`) and refused (`false`) operations.
fn role_table() -> Vec<(&'static str, Op, bool)> {
    use Op::*;
    let mut t = Vec::new();
    let common_refusals = [
        "$JS.API.STREAM.DELETE.EVENTS",
        "$JS.API.STREAM.PURGE.EVENTS",
        "$JS.API.STREAM.UPDATE.EVENTS",
        "$JS.API.STREAM.CREATE.ROGUE",
        "$JS.API.STREAM.DELETE.DLQ",
        "$JS.API.STREAM.DELETE.SAGA_TIMERS",
        "$JS.API.STREAM.DELETE.KV_SLUICE_POSITIONS",
        "$JS.API.CONSUMER.DELETE.EVENTS.ledger-account-commands",
        "$JS.API.CONSUMER.DELETE.EVENTS.ledger-transfer-saga",
        "$JS.API.CONSUMER.DELETE.SAGA_TIMERS.ledger-transfer-saga-timers",
    ];
    for role in ["api", "projector", "worker", "saga", "producer"] {
        for s in common_refusals {
            t.push((role, Request(s, "{}"), false));
        }
        t.push((role, Request("$JS.API.STREAM.INFO.EVENTS", ""), true));
    }
    let worker_durable = |role, ok| {
        [
            (
                role,
                Request(
                    "$JS.API.CONSUMER.CREATE.EVENTS.ledger-account-commands.events.cmd-account.>",
                    CREATE_WORKER_DURABLE,
                ),
                ok,
            ),
            (
                role,
                Request(
                    "$JS.API.CONSUMER.CREATE.EVENTS.ledger-account-commands",
                    CREATE_WORKER_DURABLE,
                ),
                ok,
            ),
            (
                role,
                Request(
                    "$JS.API.CONSUMER.MSG.NEXT.EVENTS.ledger-account-commands",
                    NEXT,
                ),
                ok,
            ),
            (
                role,
                Request("$KV.SLUICE_POSITIONS.ledger-account-commands", "1"),
                ok,
            ),
            (
                role,
                Request("$KV.SLUICE_PARKED.ledger-account-commands.account.a", "{}"),
                ok,
            ),
            (
                role,
                Request("dlq.ledger-account-commands.account", "{}"),
                ok,
            ),
        ]
    };
    let saga_durable = |role, ok| {
        [
            (
                role,
                Request(
                    "$JS.API.CONSUMER.CREATE.EVENTS.ledger-transfer-saga.events.saga-transfer.>",
                    CREATE_SAGA_DURABLE,
                ),
                ok,
            ),
            (
                role,
                Request(
                    "$JS.API.CONSUMER.MSG.NEXT.EVENTS.ledger-transfer-saga",
                    NEXT,
                ),
                ok,
            ),
            (
                role,
                Request("$KV.SLUICE_POSITIONS.ledger-transfer-saga", "1"),
                ok,
            ),
            (
                role,
                Request(
                    "$KV.SLUICE_PARKED.ledger-transfer-saga.saga-transfer.t",
                    "{}",
                ),
                ok,
            ),
            (
                role,
                Request("dlq.ledger-transfer-saga.saga-transfer", "{}"),
                ok,
            ),
            (
                role,
                Request(
                    "$JS.API.CONSUMER.INFO.SAGA_TIMERS.ledger-transfer-saga-timers",
                    "",
                ),
                ok,
            ),
            (role, Request("sluice.saga.timers.fired.x", "{}"), ok),
        ]
    };
    // api: public appends and starting transfers; reads through ephemeral
    // consumers; no commands, no dead letters, nobody's durable.
    t.extend([
        ("api", Request("events.account.a", "{}"), true),
        ("api", Request("events.saga-transfer.t", "{}"), true),
        ("api", Request("events.cmd-account.a", "{}"), false),
        (
            "api",
            Request("$JS.API.CONSUMER.CREATE.EVENTS", CREATE_EPHEMERAL),
            true,
        ),
        (
            "api",
            Request("$JS.API.DIRECT.GET.EVENTS", r#"{"seq":1}"#),
            true,
        ),
        ("api", Subscribe("_INBOX_api.x"), true),
        ("api", Subscribe("_INBOX.>"), false),
        ("api", Subscribe("_INBOX_worker.>"), false),
        ("projector", Subscribe("_INBOX.>"), false),
        ("worker", Subscribe("_INBOX.>"), false),
        ("worker", Subscribe("_INBOX_saga.>"), false),
        ("saga", Subscribe("_INBOX.>"), false),
        ("producer", Subscribe("_INBOX.>"), false),
        ("producer", Subscribe("_INBOX_producer.x"), true),
        ("api", Subscribe("dlq.>"), false),
        ("api", Subscribe("events.>"), false),
    ]);
    t.extend(worker_durable("api", false));
    t.extend(saga_durable("api", false));
    // projector: reads, dead-letters its projections; never appends.
    t.extend([
        ("projector", Request("events.account.a", "{}"), false),
        ("projector", Request("events.cmd-account.a", "{}"), false),
        (
            "projector",
            Request("dlq.account_balances.account", "{}"),
            true,
        ),
        (
            "projector",
            Request("$JS.API.CONSUMER.CREATE.EVENTS", CREATE_EPHEMERAL),
            true,
        ),
        ("projector", Subscribe("events.>"), false),
    ]);
    t.extend(worker_durable("projector", false));
    t.extend(saga_durable("projector", false));
    // worker: its own consumers; results and replies, never commands.
    t.extend([
        ("worker", Request("events.account.a", "{}"), true),
        ("worker", Request("events.saga-transfer.t", "{}"), true),
        ("worker", Request("events.cmd-account.a", "{}"), false),
        (
            "worker",
            Request("dlq.account_balances.account", "{}"),
            false,
        ),
        (
            "worker",
            Subscribe("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.EVENTS.x"),
            true,
        ),
    ]);
    t.extend(worker_durable("worker", true));
    t.extend(saga_durable("worker", false));
    // saga: its own consumers; saga state and commands.
    t.extend([
        ("saga", Request("events.saga-transfer.t", "{}"), true),
        ("saga", Request("events.cmd-account.a", "{}"), true),
        ("saga", Request("events.account.a", "{}"), false),
    ]);
    t.extend(worker_durable("saga", false));
    t.extend(saga_durable("saga", true));
    // producer (any NATS client outside Sluice): public categories only.
    t.extend([
        ("producer", Request("events.account.a", "{}"), true),
        ("producer", Request("events.cmd-account.a", "{}"), false),
        ("producer", Request("events.saga-transfer.t", "{}"), false),
        ("producer", Request("dlq.x.account", "{}"), false),
        (
            "producer",
            Request("$JS.API.CONSUMER.CREATE.EVENTS", CREATE_EPHEMERAL),
            false,
        ),
        (
            "producer",
            Request("$JS.API.DIRECT.GET.EVENTS", r#"{"seq":1}"#),
            true,
        ),
    ]);
    t.extend(worker_durable("producer", false));
    t.extend(saga_durable("producer", false));
    // admin: everything, stream management included.
    t.extend([
        ("admin", Request("events.cmd-account.a", "{}"), true),
        (
            "admin",
            Request("$JS.API.STREAM.DELETE.SCRATCH", "{}"),
            true,
        ),
        ("admin", Subscribe("dlq.>"), true),
    ]);
    t
}

/// Tries `op` as `client`: whether the server let it through.
async fn allowed(client: &async_nats::Client, admin: &async_nats::Client, op: &Op) -> bool {
    match op {
        Op::Request(subject, body) => {
            let request = client.request(subject.to_string(), body.to_string().into());
            match tokio::time::timeout(Duration::from_millis(1500), request).await {
                Ok(Ok(_)) => true,
                Ok(Err(e)) => e.kind() == async_nats::RequestErrorKind::NoResponders,
                Err(_) => false,
            }
        }
        Op::Subscribe(subject) => {
            let Ok(mut sub) = client.subscribe(subject.to_string()).await else {
                return false;
            };
            let _ = client.flush().await;
            // Let the server process the subscription (or refuse it).
            tokio::time::sleep(Duration::from_millis(200)).await;
            let concrete = subject.replace(">", "x").replace('*', "x");
            admin.publish(concrete, "probe".into()).await.unwrap();
            admin.flush().await.unwrap();
            tokio::time::timeout(Duration::from_millis(1000), sub.next())
                .await
                .is_ok_and(|m| m.is_some())
        }
    }
}

/// The streams, bucket and durable consumers a real deployment has, made
/// by the admin as `sluice serve --provision-only` would.
async fn provision(url: &str) -> EventStore {
    let admin = EventStore::connect_with(&as_role(url, "admin"), StoreConfig::default())
        .await
        .unwrap();
    let js = admin.jetstream();
    let mut worker = WorkerConfig::new(WORKER_DURABLE);
    worker.filter_subjects = vec!["events.cmd-account.>".into()];
    sluice_workers::ensure_consumers(&admin, &worker)
        .await
        .unwrap();
    let mut saga = WorkerConfig::new(SAGA_DURABLE);
    saga.filter_subjects = vec!["events.saga-transfer.>".into()];
    sluice_workers::ensure_consumers(&admin, &saga)
        .await
        .unwrap();
    sluice_sagas::ensure_timers_stream(&admin, 1).await.unwrap();
    js.get_stream("SAGA_TIMERS")
        .await
        .unwrap()
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("ledger-transfer-saga-timers".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "SCRATCH".into(),
        subjects: vec!["scratch.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    admin
}

#[tokio::test]
async fn every_role_may_do_what_its_code_does_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let server = secured_server(dir.path(), None);
    let url = server.url();
    let admin_store = provision(&url).await;
    let admin = admin_store.client().clone();
    let before = admin_store
        .jetstream()
        .get_stream("EVENTS")
        .await
        .unwrap()
        .consumer_info(WORKER_DURABLE)
        .await
        .unwrap()
        .config;

    let mut clients = std::collections::HashMap::new();
    for role in ["admin", "api", "projector", "worker", "saga", "producer"] {
        clients.insert(role, as_role(&url, role).connect().await.unwrap());
    }
    let table = role_table();
    let results = futures::future::join_all(table.iter().map(|(role, op, _)| {
        let client = clients[role].clone();
        let admin = admin.clone();
        async move { allowed(&client, &admin, op).await }
    }))
    .await;
    let wrong: Vec<String> = table
        .iter()
        .zip(&results)
        .filter(|((_, _, want), got)| *want != **got)
        .map(|((role, op, want), _)| {
            format!(
                "{role} {op:?}: expected {}",
                if *want { "allowed" } else { "refused" }
            )
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} wrong:\n{}",
        wrong.len(),
        table.len(),
        wrong.join("\n")
    );

    // The worker's consumer is still there, configured as before (only
    // the worker itself re-created it, with the same settings).
    let mut events = admin_store.jetstream().get_stream("EVENTS").await.unwrap();
    let after = events.consumer_info(WORKER_DURABLE).await.unwrap().config;
    assert_eq!(after.filter_subject, before.filter_subject);
    assert_eq!(after.deliver_policy, before.deliver_policy);
    assert!(events.consumer_info(SAGA_DURABLE).await.is_ok());
    assert_eq!(events.info().await.unwrap().config.name, "EVENTS");
}

#[tokio::test]
async fn deleting_or_reconfiguring_another_roles_consumer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = secured_server(dir.path(), None);
    let url = server.url();
    let admin = provision(&url).await;
    for role in ["api", "projector", "saga", "producer"] {
        let client = as_role(&url, role).connect().await.unwrap();
        let mut js = async_nats::jetstream::new(client);
        js.set_timeout(Duration::from_millis(700));
        assert!(
            js.delete_consumer_from_stream(WORKER_DURABLE, "EVENTS")
                .await
                .is_err(),
            "{role} deleted the worker's consumer"
        );
        let rewired = js
            .create_consumer_on_stream(
                async_nats::jetstream::consumer::pull::Config {
                    durable_name: Some(WORKER_DURABLE.into()),
                    filter_subject: "events.>".into(),
                    ..Default::default()
                },
                "EVENTS",
            )
            .await;
        assert!(
            rewired.is_err(),
            "{role} reconfigured the worker's consumer"
        );
    }
    // Not even the worker deletes its own consumer: only the admin may.
    let worker = as_role(&url, "worker").connect().await.unwrap();
    let mut js = async_nats::jetstream::new(worker);
    js.set_timeout(Duration::from_millis(700));
    assert!(
        js.delete_consumer_from_stream(WORKER_DURABLE, "EVENTS")
            .await
            .is_err()
    );
    let events = admin.jetstream().get_stream("EVENTS").await.unwrap();
    let info = events.consumer_info(WORKER_DURABLE).await.unwrap();
    assert_eq!(info.config.filter_subject, "events.cmd-account.>");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_consumer_comes_back_from_its_stored_position_not_from_the_start() {
    let server = NatsServer::start();
    let store = server.store().await;
    let js = store.jetstream().clone();
    let id = StreamId::new("acct", "r-1").unwrap();
    let append = |n: usize| {
        let store = store.clone();
        let id = id.clone();
        async move {
            let events = (0..n)
                .map(|_| NewEvent::new("t.counted.v1", "{}"))
                .collect();
            store
                .append(&id, ExpectedVersion::Any, events)
                .await
                .unwrap()
        }
    };
    append(5).await;
    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let start = |seen: Arc<Mutex<Vec<u64>>>| {
        let cancel = CancellationToken::new();
        let (store, token) = (store.clone(), cancel.clone());
        let task = tokio::spawn(async move {
            sluice_workers::run(
                &store,
                WorkerConfig::new(RECREATED),
                move |d: Delivery| {
                    let seen = seen.clone();
                    async move {
                        seen.lock().unwrap().push(d.sequence);
                        Ok::<(), HandlerError>(())
                    }
                },
                token,
            )
            .await
            .unwrap();
        });
        (cancel, task)
    };
    let wait_seen = async |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(15);
        while seen.lock().unwrap().len() < n {
            assert!(
                Instant::now() < deadline,
                "handled {:?}",
                seen.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    };
    let (cancel, task) = start(seen.clone());
    wait_seen(5).await;
    // The running worker stores its position (about once a second).
    let positions = js.get_key_value("SLUICE_POSITIONS").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while positions.get(RECREATED).await.unwrap().as_deref() != Some(b"5".as_slice()) {
        assert!(Instant::now() < deadline, "position never stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cancel.cancel();
    task.await.unwrap();

    // Someone deletes the consumer; two more events arrive meanwhile.
    js.delete_consumer_from_stream(RECREATED, "EVENTS")
        .await
        .unwrap();
    append(2).await;
    let (cancel, task) = start(seen.clone());
    wait_seen(7).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    cancel.cancel();
    task.await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![1, 2, 3, 4, 5, 6, 7],
        "events handled again or skipped"
    );
    let info = js
        .get_stream("EVENTS")
        .await
        .unwrap()
        .consumer_info(RECREATED)
        .await
        .unwrap();
    assert_eq!(
        info.config.deliver_policy,
        async_nats::jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence: 6 }
    );
}
