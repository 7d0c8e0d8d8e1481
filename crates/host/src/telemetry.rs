//! Logs and traces: the `tracing` subscriber, and OpenTelemetry export over
//! OTLP (HTTP/protobuf) when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set. Without it no exporter and
//! no OpenTelemetry layer are installed, so spans cost what they cost before.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Keeps the exporter alive; [`Telemetry::shutdown`] flushes it.
pub(crate) struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still queued and stops the exporter (graceful
    /// shutdown; blocks for at most the exporter's timeout).
    pub(crate) fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "could not flush the last spans to the OTLP endpoint");
        }
    }
}

/// Whether an OTLP endpoint for traces is configured.
fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()))
}

/// `OTEL_SERVICE_NAME`, else `default`.
fn service_name(default: String) -> String {
    std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or(default)
}

/// Installs the subscriber: logs on stderr filtered by `SLUICE_LOG` (else
/// `default_filter`), JSON when `SLUICE_LOG_FORMAT=json`; plus span export
/// when `service` is given (the long-running commands) and an OTLP endpoint
/// is configured.
pub(crate) fn init(default_filter: &str, service: Option<String>) -> Telemetry {
    let filter =
        EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    let (provider, failure) = match service {
        Some(name) if otlp_configured() => match provider(service_name(name)) {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(e)),
        },
        _ => (None, None),
    };
    // Sluice's own spans at info and above, whatever the log filter says:
    // turning logs down must not cut traces, and the exporter's HTTP
    // client must not trace its own exports.
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("sluice"))
            .with_filter(Targets::new().with_target("sluice", LevelFilter::INFO))
    });
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if std::env::var("SLUICE_LOG_FORMAT").as_deref() == Ok("json") {
        fmt.json().with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    tracing_subscriber::registry().with(otel).with(fmt).init();
    if let Some(e) = failure {
        tracing::warn!(error = %e, "OTLP trace export is off: the exporter could not be built; check OTEL_EXPORTER_OTLP_ENDPOINT");
    }
    Telemetry { provider }
}

fn provider(service: String) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    // The exporter reads the endpoint, headers and timeout from the standard
    // OTEL_EXPORTER_OTLP_* variables; the provider reads the sampler and the
    // batch settings from OTEL_TRACES_SAMPLER and OTEL_BSP_*.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .build()?;
    Ok(SdkTracerProvider::builder()
        .with_resource(Resource::builder().with_service_name(service).build())
        .with_batch_exporter(exporter)
        .build())
}
