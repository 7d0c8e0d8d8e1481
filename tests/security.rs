//! Zero-trust NATS: each role with its own credentials and least privilege
//! (nats/accounts.conf), and mutual TLS (nats/gen-certs.sh, nats/tls.conf).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use sluice_events::{
    ConnectConfig, EmbeddedConfig, EmbeddedServer, Error, EventStore, ExpectedVersion, NewEvent,
    StoreConfig, StreamId,
};

const ROLES: [&str; 6] = ["admin", "api", "projector", "worker", "saga", "sys"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn password(role: &str) -> String {
    format!("pw-{role}-{}", std::process::id())
}

/// A server with the project's accounts file and, optionally, mTLS.
fn secured_server(dir: &Path, tls: Option<&Path>) -> EmbeddedServer {
    let mut config = EmbeddedConfig::new(dir.join("nats"));
    // nats-server resolves includes relative to the including file only.
    std::fs::create_dir_all(dir.join("nats")).unwrap();
    std::fs::copy(
        repo().join("nats/accounts.conf"),
        dir.join("nats/accounts.conf"),
    )
    .unwrap();
    let mut extra = "include \"accounts.conf\"\n".to_owned();
    if let Some(certs) = tls {
        let tls_conf = std::fs::read_to_string(repo().join("nats/tls.conf"))
            .unwrap()
            .replace("./certs", &certs.display().to_string());
        extra.push_str(&tls_conf);
    }
    config.extra_config = extra;
    config.env = ROLES
        .iter()
        .map(|r| (format!("SLUICE_{}_PASSWORD", r.to_uppercase()), password(r)))
        .collect();
    EmbeddedServer::start(config).unwrap()
}

fn as_role(url: &str, role: &str) -> ConnectConfig {
    let mut c = ConnectConfig::new(url);
    c.user = Some(role.to_owned());
    c.password = Some(password(role));
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

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_valid_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let status = std::process::Command::new("bash")
        .arg(repo().join("nats/gen-certs.sh"))
        .arg(&certs)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let server = secured_server(dir.path(), Some(&certs));
    let url = server.url();

    let mut good = as_role(&url, "api");
    good.tls_ca_file = Some(certs.join("ca.pem"));
    good.tls_cert_file = Some(certs.join("api.pem"));
    good.tls_key_file = Some(certs.join("api-key.pem"));
    good.connect_timeout = Duration::from_secs(3);
    let client = good.connect().await.unwrap();
    assert!(client.server_info().tls_required);
    client.flush().await.unwrap();

    // No client certificate: refused by the verifying server.
    let mut no_cert = as_role(&url, "api");
    no_cert.tls_ca_file = Some(certs.join("ca.pem"));
    no_cert.connect_timeout = Duration::from_secs(2);
    let refused = match no_cert.connect().await {
        Err(_) => true,
        Ok(c) => {
            c.flush().await.is_err() || {
                tokio::time::sleep(Duration::from_millis(500)).await;
                c.connection_state() != async_nats::connection::State::Connected
            }
        }
    };
    assert!(refused, "a client without a certificate got in");

    // A certificate from another CA: refused too.
    let other = dir.path().join("other");
    std::process::Command::new("bash")
        .arg(repo().join("nats/gen-certs.sh"))
        .arg(&other)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    let mut forged = as_role(&url, "api");
    forged.tls_ca_file = Some(certs.join("ca.pem"));
    forged.tls_cert_file = Some(other.join("api.pem"));
    forged.tls_key_file = Some(other.join("api-key.pem"));
    forged.connect_timeout = Duration::from_secs(2);
    let refused = match forged.connect().await {
        Err(_) => true,
        Ok(c) => {
            c.flush().await.is_err() || {
                tokio::time::sleep(Duration::from_millis(500)).await;
                c.connection_state() != async_nats::connection::State::Connected
            }
        }
    };
    assert!(refused, "a certificate from a foreign CA got in");
}

#[test]
fn every_shipped_nats_config_is_valid() {
    let bin = sluice_events::find_nats_server_bin().unwrap();
    let nats = repo().join("nats");
    let files = [
        "dev.conf",
        "cluster/n1.conf",
        "cluster/n2.conf",
        "cluster/n3.conf",
        "cluster/compose.conf",
    ];
    for f in files {
        let out = std::process::Command::new(&bin)
            .args(["-t", "-c", f])
            .current_dir(&nats)
            .envs(
                ROLES
                    .iter()
                    .map(|r| (format!("SLUICE_{}_PASSWORD", r.to_uppercase()), password(r))),
            )
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("is valid"),
            "{f}: {text}"
        );
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
            compose.contains(&format!("SLUICE_NATS_USER: {role}")),
            "{role} without its own NATS user"
        );
    }
    // The roles' users cannot create streams: admin provisions them first.
    assert!(
        compose.contains(r#"command: ["serve", "--provision-only"]"#)
            && compose.contains("SLUICE_NATS_USER: admin")
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
