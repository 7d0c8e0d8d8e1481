//! Real nats-server processes for tests.

use std::path::PathBuf;

use sluice_events::{
    ConnectConfig, Credentials, EmbeddedAuth, EmbeddedConfig, EmbeddedServer, EventStore,
    StoreConfig, SyncInterval,
};
use tempfile::TempDir;

/// One nats-server 2.12+ with a private temp store, killed on drop. Like
/// `sluice up`'s, it refuses anonymous clients: [`NatsServer::url`] carries
/// the generated admin credential.
#[derive(Debug)]
pub struct NatsServer {
    server: EmbeddedServer,
    // Declared after `server` so the process dies before its files go.
    _dir: TempDir,
}

impl NatsServer {
    /// Starts a server with `sync_interval: always` (the embedded default).
    pub fn start() -> Self {
        Self::start_with(SyncInterval::Always)
    }

    /// Starts a server with the given fsync policy.
    pub fn start_with(sync: SyncInterval) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("sluice-nats-")
            .tempdir()
            .expect("create temp dir for nats-server");
        let mut config = EmbeddedConfig::new(dir.path());
        config.sync = sync;
        let server = EmbeddedServer::start(config)
            .unwrap_or_else(|e| panic!("cannot start nats-server for tests: {e}"));
        Self { server, _dir: dir }
    }

    /// `nats://admin:<password>@127.0.0.1:<port>`: what `EventStore::connect`,
    /// `ConnectConfig` and `sluice --nats-url` / `SLUICE_NATS_URL` take.
    /// (A raw `async_nats::connect` ignores credentials in URLs: use
    /// [`NatsServer::client`].)
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// `nats://127.0.0.1:<port>` without the credential: the server refuses it.
    pub fn anonymous_url(&self) -> String {
        self.server.anonymous_url()
    }

    /// The admin credential the server asks for.
    pub fn credentials(&self) -> &Credentials {
        self.server
            .credentials()
            .expect("the test server always has a credential")
    }

    /// A raw, authenticated `async_nats` client (for publishing what
    /// another NATS client would).
    pub async fn client(&self) -> async_nats::Client {
        ConnectConfig::new(self.url())
            .connect()
            .await
            .unwrap_or_else(|e| panic!("cannot connect to the test nats-server: {e}"))
    }

    /// kill -9, no restart.
    pub fn kill(&mut self) {
        self.server.kill();
    }

    /// kill -9 and start again on the same port and store.
    pub fn restart(&mut self) {
        self.server
            .restart()
            .unwrap_or_else(|e| panic!("cannot restart nats-server: {e}"));
    }

    /// SIGTERM (the server flushes its state), then start again on the same
    /// port and store: what a restarted `sluice up` does to the nats-server
    /// its killed predecessor left running.
    pub fn restart_gracefully(&mut self) {
        self.server.stop(std::time::Duration::from_secs(10));
        self.restart();
    }

    /// The store directory.
    pub fn dir(&self) -> PathBuf {
        self.server.config().dir.clone()
    }

    /// A connected event store with default settings.
    pub async fn store(&self) -> EventStore {
        self.store_with(StoreConfig::default()).await
    }

    /// A connected event store with the given settings.
    pub async fn store_with(&self, config: StoreConfig) -> EventStore {
        EventStore::connect(&self.url(), config)
            .await
            .unwrap_or_else(|e| panic!("cannot connect the event store: {e}"))
    }
}

/// Three clustered nats-servers on loopback ports.
#[derive(Debug)]
pub struct NatsCluster {
    /// The nodes, in start order.
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts a 3-node JetStream cluster and waits until it answers.
    pub fn start() -> Self {
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("free port")
        };
        let cluster_ports: Vec<u16> = (0..3).map(|_| free()).collect();
        // One credential for every node, so one URL list reaches them all.
        let credentials = Credentials::generate();
        let routes = cluster_ports
            .iter()
            .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let nodes = cluster_ports
            .iter()
            .enumerate()
            .map(|(i, port)| {
                let dir = tempfile::Builder::new()
                    .prefix("sluice-cluster-")
                    .tempdir()
                    .expect("temp dir");
                let mut config = EmbeddedConfig::new(dir.path());
                config.server_name = format!("n{i}");
                config.auth = EmbeddedAuth::Password(credentials.clone());
                config.extra_config = format!(
                    "cluster {{\n  name: sluice-test\n  listen: \"127.0.0.1:{port}\"\n  routes: [{routes}]\n}}\n"
                );
                let server = EmbeddedServer::start(config)
                    .unwrap_or_else(|e| panic!("cannot start cluster node {i}: {e}"));
                NatsServer { server, _dir: dir }
            })
            .collect();
        Self { nodes }
    }

    /// A client URL listing every node.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}
