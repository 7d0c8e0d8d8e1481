//! The security half of `sluice status --production`: what a client can
//! tell about the NATS server's protection. From the server's INFO (every
//! client gets it): whether it asks for credentials (`auth_required`) and
//! whether the client port speaks TLS only (`tls_required`). Route settings
//! are not in INFO: with the server's monitoring endpoint
//! (`SLUICE_NATS_MONITOR_URL`, `/varz`) it also checks that cluster routes
//! use TLS and verify the peer's certificate; without it, it says it could
//! not check.

use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the server's INFO says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Observed {
    /// The server asks every client for credentials.
    pub(crate) auth_required: bool,
    /// The client port accepts TLS connections only.
    pub(crate) tls_required: bool,
    /// The server is part of a cluster (INFO names one).
    pub(crate) clustered: bool,
}

impl Observed {
    pub(crate) fn from_info(info: &async_nats::ServerInfo) -> Self {
        Self {
            auth_required: info.auth_required,
            tls_required: info.tls_required,
            clustered: info.cluster.as_deref().is_some_and(|c| !c.is_empty()),
        }
    }
}

/// The route settings `/varz` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Routes {
    /// Routes speak TLS.
    pub(crate) tls_required: bool,
    /// Routes verify the peer's certificate (only holders of a certificate
    /// of the route CA may join).
    pub(crate) tls_verify: bool,
}

impl Routes {
    /// Reads the `cluster` section of a `/varz` document; `None` when the
    /// server has no cluster.
    pub(crate) fn from_varz(varz: &serde_json::Value) -> Option<Self> {
        let cluster = varz.get("cluster")?;
        cluster
            .get("cluster_port")
            .and_then(serde_json::Value::as_u64)
            .filter(|p| *p > 0)?;
        let flag = |k: &str| {
            cluster
                .get(k)
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false)
        };
        Some(Self {
            tls_required: flag("tls_required"),
            tls_verify: flag("tls_verify"),
        })
    }
}

/// Security warnings. `routes`: from the monitoring endpoint, when given;
/// `production` adds the checks a laptop does not need (TLS, routes).
pub(crate) fn security_warnings(
    observed: &Observed,
    routes: Option<Routes>,
    production: bool,
) -> Vec<String> {
    let mut w = Vec::new();
    if !observed.auth_required {
        w.push("the NATS server lets anonymous clients in: anyone who reaches it can append events or delete the EVENTS stream (enable authorization: nats/accounts-tls.conf)".to_owned());
    }
    if !production {
        return w;
    }
    if !observed.tls_required {
        w.push("the NATS client port is plaintext: credentials and events cross the network unencrypted (TLS with verify_and_map: nats/tls.conf)".to_owned());
    }
    match routes {
        Some(r) if !r.tls_required => w.push("the NATS cluster routes are plaintext, and any server that reaches a route port can join the cluster and receive every event (route TLS with verify: nats/cluster/n1.conf)".to_owned()),
        Some(r) if !r.tls_verify => w.push("the NATS cluster routes do not verify peer certificates: any server that reaches a route port can join the cluster and receive every event (set verify: true with a route CA)".to_owned()),
        Some(_) => {}
        None if observed.clustered => w.push("route security is not visible to clients: set SLUICE_NATS_MONITOR_URL to a node's monitoring endpoint so that sluice status can check that routes use TLS and verify peers".to_owned()),
        None => {}
    }
    w
}

/// GETs `<monitor>/varz` (plain HTTP, as nats-server serves it) and reads
/// the route settings.
pub(crate) async fn fetch_routes(monitor: &str) -> anyhow::Result<Option<Routes>> {
    let hostport = monitor
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    anyhow::ensure!(
        !monitor.starts_with("https://") && !hostport.contains('/'),
        "SLUICE_NATS_MONITOR_URL={monitor}: use http://host:port (the nats-server monitoring port)"
    );
    let fetch = async {
        let mut conn = tokio::net::TcpStream::connect(&hostport).await?;
        conn.write_all(format!("GET /varz HTTP/1.0\r\nHost: {hostport}\r\n\r\n").as_bytes())
            .await?;
        let mut body = Vec::new();
        conn.read_to_end(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    };
    let raw = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .with_context(|| format!("{monitor}/varz did not answer within 5 s"))?
        .with_context(|| format!("reading {monitor}/varz"))?;
    let text = String::from_utf8_lossy(&raw);
    let json = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .with_context(|| format!("{monitor}/varz: not an HTTP answer"))?;
    let varz: serde_json::Value =
        serde_json::from_str(json).with_context(|| format!("{monitor}/varz: not JSON"))?;
    Ok(Routes::from_varz(&varz))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECURE: Observed = Observed {
        auth_required: true,
        tls_required: true,
        clustered: true,
    };
    const VERIFIED: Routes = Routes {
        tls_required: true,
        tls_verify: true,
    };

    #[test]
    fn a_secure_cluster_gives_no_warning() {
        assert!(security_warnings(&SECURE, Some(VERIFIED), true).is_empty());
    }

    #[test]
    fn anonymous_access_is_always_a_warning_plaintext_only_in_production() {
        let open = Observed {
            auth_required: false,
            tls_required: false,
            clustered: false,
        };
        let w = security_warnings(&open, None, false);
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("anonymous"), "{w:?}");
        let w = security_warnings(&open, None, true);
        assert_eq!(w.len(), 2);
        assert!(w[1].contains("plaintext"), "{w:?}");
    }

    #[test]
    fn routes_must_use_tls_and_verify_or_be_checked() {
        let plain = Routes {
            tls_required: false,
            tls_verify: false,
        };
        let w = security_warnings(&SECURE, Some(plain), true);
        assert!(
            w.len() == 1 && w[0].contains("routes are plaintext"),
            "{w:?}"
        );
        let unverified = Routes {
            tls_required: true,
            tls_verify: false,
        };
        let w = security_warnings(&SECURE, Some(unverified), true);
        assert!(w.len() == 1 && w[0].contains("do not verify"), "{w:?}");
        let w = security_warnings(&SECURE, None, true);
        assert!(
            w.len() == 1 && w[0].contains("SLUICE_NATS_MONITOR_URL"),
            "{w:?}"
        );
    }

    #[test]
    fn varz_cluster_section_is_read() {
        let varz = serde_json::json!({"cluster": {"name": "sluice", "cluster_port": 6222, "tls_required": true, "tls_verify": true}});
        assert_eq!(Routes::from_varz(&varz), Some(VERIFIED));
        let single = serde_json::json!({"cluster": {}});
        assert_eq!(Routes::from_varz(&single), None);
    }
}
