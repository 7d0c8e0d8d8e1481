//! `status`: the event stream's state and the durability and security
//! warnings that apply to it.

use std::path::Path;

use serde_json::json;

use crate::endpoint;
use crate::stream_cmd::connect;

/// Options of `sluice status`.
#[derive(Debug, clap::Args)]
pub(crate) struct StatusArgs {
    /// Check as for production: warn on replicas < 3, a plaintext NATS
    /// client port and routes that are plaintext or do not verify peers
    /// (anonymous access is always a warning).
    #[arg(long, env = "SLUICE_PRODUCTION")]
    production: bool,
    /// The nats-server monitoring endpoint (`http://host:8222`): lets
    /// `--production` check the cluster routes, which clients cannot see.
    #[arg(long, env = "SLUICE_NATS_MONITOR_URL")]
    monitor_url: Option<String>,
    /// Exit with 1 when any durability warning applies.
    #[arg(long)]
    strict: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn status(
    args: StatusArgs,
    nats_url: Option<String>,
    home: &Path,
) -> anyhow::Result<()> {
    let embedded = if nats_url.is_none() {
        endpoint::read(home)
    } else {
        None
    };
    let store = connect(nats_url, home).await?;
    let state = store.stream_state().await?;
    let info = store.server_info();
    let sync_always = embedded.as_ref().map(|e| e.sync_always);
    let mut warnings =
        state.durability_warnings(sync_always, args.production, store.config().retry_horizon());
    let routes = match &args.monitor_url {
        Some(m) => crate::nats_lint::fetch_routes(m).await?,
        None => None,
    };
    let observed = crate::nats_lint::Observed::from_info(&info);
    warnings.extend(crate::nats_lint::security_warnings(
        &observed,
        routes,
        args.production,
    ));
    if args.json {
        println!(
            "{}",
            json!({
                "server": {"version": info.version, "name": info.server_name, "max_payload": info.max_payload},
                "stream": {
                    "name": store.config().stream,
                    "events": state.messages,
                    "bytes": state.bytes,
                    "first_position": state.first_position,
                    "last_position": state.last_position,
                    "aggregates": state.aggregates,
                    "replicas": state.replicas,
                },
                "sync_always": sync_always,
                "security": {
                    "auth_required": observed.auth_required,
                    "tls_required": observed.tls_required,
                    "clustered": observed.clustered,
                    "routes_tls_required": routes.map(|r| r.tls_required),
                    "routes_tls_verify": routes.map(|r| r.tls_verify),
                },
                "warnings": warnings,
            })
        );
    } else {
        println!(
            "server:      nats-server {} ({})",
            info.version, info.server_name
        );
        println!(
            "stream:      {}  events={} aggregates={} bytes={} positions={}..{} replicas={}",
            store.config().stream,
            state.messages,
            state.aggregates,
            state.bytes,
            state.first_position,
            state.last_position,
            state.replicas
        );
        println!(
            "durability:  sync_interval={}",
            match sync_always {
                Some(true) => "always",
                Some(false) => "default (2m)",
                None => "unknown",
            }
        );
        for w in &warnings {
            println!("warning:     {w}");
        }
    }
    if args.strict && !warnings.is_empty() {
        anyhow::bail!(
            "{} durability or security warning(s) with --strict",
            warnings.len()
        );
    }
    Ok(())
}
