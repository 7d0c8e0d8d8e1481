//! OpenTelemetry end to end: `sluice up` exports its spans over OTLP/HTTP to
//! a receiver this test runs on loopback, and one trace follows an HTTP
//! request into the projection that applied its event (and, for a transfer,
//! through the saga, the command handler and back). Also the saga-state gauge.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

mod support;

use support::{Up, http};

const BIN: &str = env!("CARGO_BIN_EXE_sluice");
/// A caller's trace context, as a client would send it.
const CALLER_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN: &str = "b7ad6b7169203331";

/// A span as received, with the resource's service name.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    span: Span,
}

impl Got {
    fn attr(&self, key: &str) -> Option<String> {
        self.span
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
            .map(|v| match v {
                AnyValue::StringValue(s) => s.clone(),
                AnyValue::IntValue(i) => i.to_string(),
                AnyValue::BoolValue(b) => b.to_string(),
                AnyValue::DoubleValue(d) => d.to_string(),
                other => format!("{other:?}"),
            })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A minimal OTLP/HTTP receiver: `POST /v1/traces` with a protobuf
/// `ExportTraceServiceRequest`, answered 200 (keep-alive aware).
fn receiver() -> (String, Arc<Mutex<Vec<Got>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let spans = Arc::new(Mutex::new(Vec::new()));
    let sink = spans.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { break };
            let sink = sink.clone();
            std::thread::spawn(move || serve_otlp(conn, &sink));
        }
    });
    (addr, spans)
}

fn serve_otlp(conn: TcpStream, sink: &Mutex<Vec<Got>>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split(' ').nth(1).unwrap_or("").to_owned();
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; len];
        reader.read_exact(&mut body).unwrap();
        assert_eq!(path, "/v1/traces", "spans go to the traces path");
        let req = ExportTraceServiceRequest::decode(body.as_slice()).expect("a valid OTLP body");
        let mut got = sink.lock().unwrap();
        for rs in req.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    AnyValue::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    got.push(Got {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        drop(got);
        let _ = out.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n",
        );
    }
}

fn start_up(home: &Path, otlp: &str) -> Up {
    support::start_up(BIN, home, |cmd| {
        cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}"))
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env_remove("OTEL_SERVICE_NAME")
            .env_remove("OTEL_TRACES_SAMPLER");
    })
}

/// Polls `GET path` until the body contains `want` (at most 30 s).
fn wait_for(addr: &str, path: &str, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = http(addr, "GET", path, "", "");
        if status == 200 && body.contains(want) {
            return body;
        }
        assert!(Instant::now() < deadline, "{path}: no {want:?} in {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn position(body: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["positions"][0]
        .as_u64()
        .unwrap_or_else(|| panic!("{body}"))
}

/// The spans from `span` up to the root, following parent ids.
fn ancestors<'a>(span: &'a Got, by_id: &'a HashMap<Vec<u8>, &'a Got>) -> Vec<&'a Got> {
    let mut chain = vec![span];
    let mut cur = span;
    while !cur.span.parent_span_id.is_empty() {
        match by_id.get(&cur.span.parent_span_id) {
            Some(p) => {
                chain.push(p);
                cur = p;
            }
            None => break,
        }
    }
    chain
}

#[test]
fn one_trace_from_the_http_request_to_the_projection_and_through_the_saga() {
    let (otlp, spans) = receiver();
    let home = tempfile::tempdir().unwrap();
    let mut up = start_up(home.path(), &otlp);
    let endpoint: serde_json::Value =
        serde_json::from_slice(&std::fs::read(home.path().join("endpoint.json")).unwrap()).unwrap();
    let api = endpoint["http_addr"].as_str().unwrap().to_owned();
    let token = std::fs::read_to_string(home.path().join("token")).unwrap();
    let auth = format!("Authorization: Bearer {}\r\n", token.trim());

    // 1. No traceparent header: the request starts a trace.
    let (status, body) = http(
        &api,
        "POST",
        "/v1/streams/account/acc-a",
        &auth,
        r#"{"expected_version":"none","events":[{"type":"ledger.account.opened.v1","data":{"owner":"ann","currency":"EUR"}}]}"#,
    );
    assert_eq!(status, 201, "{body}");
    let opened = position(&body);
    // 2. A caller's traceparent: the request continues the caller's trace.
    let caller = format!("traceparent: 00-{CALLER_TRACE}-{CALLER_SPAN}-01\r\n");
    let (status, body) = http(
        &api,
        "POST",
        "/v1/streams/account/acc-a",
        &format!("{auth}{caller}"),
        r#"{"events":[{"type":"ledger.account.deposited.v1","data":{"amount":100}}]}"#,
    );
    assert_eq!(status, 201, "{body}");
    let deposited = position(&body);
    // 3. A transfer: HTTP -> saga -> command -> account event -> reply.
    let (status, body) = http(
        &api,
        "POST",
        "/v1/accounts",
        &auth,
        r#"{"id":"acc-b","owner":"bob","currency":"EUR"}"#,
    );
    assert_eq!(status, 201, "{body}");
    let (status, body) = http(
        &api,
        "POST",
        "/v1/transfers",
        &auth,
        r#"{"from":"acc-a","to":"acc-b","amount":30,"id":"t-1"}"#,
    );
    assert_eq!(status, 202, "{body}");
    wait_for(&api, "/v1/transfers/t-1", "\"completed\"");
    wait_for(&api, "/v1/projections/transfers/rows/t-1", "\"completed\"");
    wait_for(
        &api,
        "/v1/projections/account_balances/rows/acc-b",
        "\"balance\":30",
    );

    // The saga-state gauge counts the transfer once, as completed.
    let (status, metrics) = http(&api, "GET", "/metrics", "", "");
    assert_eq!(status, 200);
    for (state, n) in [
        ("completed", 1),
        ("pending", 0),
        ("compensated", 0),
        ("needs_attention", 0),
    ] {
        let line = format!("sluice_sagas{{saga=\"transfer\",state=\"{state}\"}} {n}");
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing from:\n{metrics}"
        );
    }

    // Graceful shutdown flushes the spans still queued.
    let pid = up.0.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while up.0.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "sluice up did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let spans = spans.lock().unwrap().clone();
    assert!(!spans.is_empty(), "no spans were exported");
    assert!(spans.iter().all(|s| s.service == "sluice-up"));
    let by_id: HashMap<Vec<u8>, &Got> = spans.iter().map(|s| (s.span.span_id.clone(), s)).collect();
    let projection_span = |pos: u64| {
        spans
            .iter()
            .find(|s| {
                s.span.name == "projection.apply" && s.attr("position") == Some(pos.to_string())
            })
            .unwrap_or_else(|| panic!("no projection span for position {pos}"))
    };
    let http_ancestor = |s: &Got, route: &str| -> Got {
        let chain = ancestors(s, &by_id);
        chain
            .iter()
            .find(|a| a.span.name == format!("POST {route}"))
            .map(|a| (*a).clone())
            .unwrap_or_else(|| {
                panic!(
                    "the parent chain {:?} does not reach the HTTP span of {route}",
                    chain.iter().map(|a| &a.span.name).collect::<Vec<_>>()
                )
            })
    };

    // 1: same trace id in the HTTP span and the projection span of the event;
    // the HTTP span is the root of a new trace.
    let p = projection_span(opened);
    let h = http_ancestor(p, "/v1/streams/{category}/{id}");
    assert_eq!(hex(&p.span.trace_id), hex(&h.span.trace_id));
    assert!(
        h.span.parent_span_id.is_empty(),
        "a new trace starts at the request"
    );
    assert_eq!(h.attr("http.response.status_code").as_deref(), Some("201"));
    assert_eq!(p.attr("stream").as_deref(), Some("account/acc-a"));

    // 2: the caller's trace goes on, through the HTTP span, to the projection.
    let p = projection_span(deposited);
    assert_eq!(hex(&p.span.trace_id), CALLER_TRACE);
    let h = http_ancestor(p, "/v1/streams/{category}/{id}");
    assert_eq!(hex(&h.span.trace_id), CALLER_TRACE);
    assert_eq!(hex(&h.span.parent_span_id), CALLER_SPAN);

    // 3: the transfer's trace reaches the saga orchestrator, the account
    // command handler, and the projection of the credit to acc-b.
    let transfer_http = spans
        .iter()
        .find(|s| s.span.name == "POST /v1/transfers")
        .expect("the transfer's HTTP span");
    let trace = &transfer_http.span.trace_id;
    let in_trace: Vec<&Got> = spans.iter().filter(|s| &s.span.trace_id == trace).collect();
    let workers: std::collections::BTreeSet<String> = in_trace
        .iter()
        .filter(|s| s.span.name == "worker.handle")
        .filter_map(|s| s.attr("worker"))
        .collect();
    assert!(
        workers.len() >= 2,
        "the saga orchestrator and the command handler continue the trace: {workers:?}"
    );
    let credit = in_trace
        .iter()
        .find(|s| {
            s.span.name == "projection.apply"
                && s.attr("stream").as_deref() == Some("account/acc-b")
        })
        .expect("the credit to acc-b is projected in the transfer's trace");
    http_ancestor(credit, "/v1/transfers");
}

/// `sluice serve --role <roles>` with its own home, sharing NATS, the
/// SQLite read store and the OTLP receiver with the other roles.
fn serve(roles: &str, home: &Path, nats: &str, db: &str, otlp: &str) -> Up {
    let child = Command::new(BIN)
        .args(["serve", "--role", roles])
        .env("SLUICE_HOME", home)
        .env("SLUICE_NATS_URL", nats)
        .env("SLUICE_DATABASE_URL", db)
        .env("SLUICE_HTTP_ADDR", "127.0.0.1:0")
        // This test follows traces, not authorization: reads stay open.
        .env("SLUICE_HTTP_OPEN_READS", "true")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}"))
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env_remove("OTEL_SERVICE_NAME")
        .env_remove("OTEL_TRACES_SAMPLER")
        .env_remove("SLUICE_CONFIG")
        .env_remove("SLUICE_ROLES")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sluice serve");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !home.join("endpoint.json").exists() {
        assert!(
            Instant::now() < deadline,
            "sluice serve --role {roles} did not come up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Up(child)
}

fn stop(up: &mut Up) {
    let pid = up.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while up.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "sluice did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_trace_crosses_processes_in_ce_traceparent() {
    let (otlp, spans) = receiver();
    let nats = sluice_testkit::NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("read.db").display());
    // The projector first: it creates the read store the API then opens.
    let mut projector = serve("projector", &dir.path().join("p"), &nats.url(), &db, &otlp);
    let mut api = serve("api", &dir.path().join("a"), &nats.url(), &db, &otlp);
    let endpoint: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("a/endpoint.json")).unwrap())
            .unwrap();
    let addr = endpoint["http_addr"].as_str().unwrap().to_owned();
    let token = std::fs::read_to_string(dir.path().join("a/token")).unwrap();
    let auth = format!("Authorization: Bearer {}\r\n", token.trim());
    let (status, body) = http(
        &addr,
        "POST",
        "/v1/streams/account/acc-x",
        &auth,
        r#"{"events":[{"type":"ledger.account.opened.v1","data":{"owner":"xi","currency":"EUR"}}]}"#,
    );
    assert_eq!(status, 201, "{body}");
    let pos = position(&body);
    wait_for(
        &addr,
        "/v1/projections/account_balances/rows/acc-x",
        "\"owner\":\"xi\"",
    );
    stop(&mut api);
    stop(&mut projector);

    let spans = spans.lock().unwrap().clone();
    let p = spans
        .iter()
        .find(|s| s.span.name == "projection.apply" && s.attr("position") == Some(pos.to_string()))
        .expect("the projector's span for the event");
    let h = spans
        .iter()
        .find(|s| s.span.name == "POST /v1/streams/{category}/{id}")
        .expect("the API's span for the request");
    assert_eq!(p.service, "sluice-projector");
    assert_eq!(h.service, "sluice-api");
    assert_eq!(
        hex(&p.span.trace_id),
        hex(&h.span.trace_id),
        "one trace across both processes"
    );
    assert_eq!(
        p.span.parent_span_id, h.span.span_id,
        "the projection span is a child of the HTTP span, through ce-traceparent"
    );
}
