//! The HTTP API's accept loop: what a hostile or broken client can hold of
//! the server is bounded. A connection must send its request headers within
//! the header-read timeout and may sit silent for at most the idle timeout;
//! at most `max_connections` are served at once, and a connection over the
//! cap is answered `503` at once and closed instead of queueing; header
//! sizes are capped. hyper's defaults (what `axum::serve` runs) have none of
//! these: a half-sent request stays open for ever.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// How much of the server one client connection may hold, and for how long.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// Time a connection has to send a request's headers, from its accept
    /// or from the end of the previous response (HTTP/1.1 keep-alive).
    pub header_read_timeout: Duration,
    /// Time a connection may go without a byte read or written before it is
    /// closed (after the request in flight, if any, is answered).
    pub idle_timeout: Duration,
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Largest request line plus headers answered normally; larger gets a
    /// 431 problem (up to `HARD_LIMIT_FACTOR` times this, above which
    /// hyper closes the connection with a bare 431 before a handler runs).
    pub max_header_bytes: usize,
    /// Most request header fields answered normally; more gets a 431
    /// problem (hyper's bare 431 above `HARD_LIMIT_FACTOR` times this).
    pub max_headers: usize,
    /// Longest a request may take (the router's timeout): how long a closing
    /// connection's last request may still run.
    pub request_timeout: Duration,
}

/// The protocol parser's own limits are this multiple of the configured
/// ones: requests between the two get a problem body from the router; only
/// beyond it does hyper refuse with an empty 431 (it answers before any of
/// our code runs).
pub(crate) const HARD_LIMIT_FACTOR: usize = 4;

/// Descriptors kept free for everything that is not a client connection
/// (NATS, the read store, the listener, logs).
const RESERVED_FDS: u64 = 128;

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: default_max_connections(open_files_limit()),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// 1,024, or fewer when the descriptor limit would run out first: the cap
/// must bite before `accept` fails with "too many open files".
pub(crate) fn default_max_connections(open_files: Option<u64>) -> usize {
    let by_fds = open_files.map_or(1024, |n| n.saturating_sub(RESERVED_FDS).max(16));
    usize::try_from(by_fds.min(1024)).unwrap_or(1024)
}

/// The soft `RLIMIT_NOFILE` of this process (Linux: `/proc/self/limits`).
pub(crate) fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The answer to a connection over the cap, written straight to the socket
/// (no request has been read): a problem saying why, and to retry.
fn over_capacity_response() -> Vec<u8> {
    let body = format!(
        r#"{{"type":"{}unavailable","title":"Service unavailable","status":503,"detail":"the server is serving its maximum number of connections (http.max_connections); retry shortly"}}"#,
        super::problem::PROBLEM_BASE
    );
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: {}\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        super::problem::PROBLEM_JSON,
        body.len()
    )
    .into_bytes()
}

/// Serves `app` on `listener` until `shutdown`, over TLS when `tls` is
/// given; then stops accepting, lets each connection finish its request in
/// flight (bounded by the request timeout) and returns.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ConnLimits,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(limits.max_headers.saturating_mul(HARD_LIMIT_FACTOR))
        .max_buf_size(
            limits
                .max_header_bytes
                .saturating_mul(HARD_LIMIT_FACTOR)
                .max(8192),
        );
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(
            u32::try_from(limits.max_header_bytes.saturating_mul(HARD_LIMIT_FACTOR))
                .unwrap_or(u32::MAX),
        );
    let builder = Arc::new(builder);
    let max = limits.max_connections.max(1);
    let permits = Arc::new(Semaphore::new(max));
    let limits = Arc::new(limits);
    let mut refused_logged = Instant::now() - Duration::from_secs(60);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, or a connection reset before it
                    // was accepted: wait a little instead of spinning.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Over the cap: answer at once and close; a fresh socket's send
            // buffer takes the few bytes without blocking. A TLS client
            // cannot read plain text: it is only closed.
            if tls.is_none() {
                let _ = stream.try_write(&over_capacity_response());
            }
            if refused_logged.elapsed() > Duration::from_secs(10) {
                tracing::warn!(
                    max_connections = max,
                    "HTTP connection refused: at the connection cap"
                );
                refused_logged = Instant::now();
            }
            ::metrics::counter!("sluice_http_connections_refused_total").increment(1);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (app, builder, limits, shutdown, tls) = (
            app.clone(),
            builder.clone(),
            limits.clone(),
            shutdown.clone(),
            tls.clone(),
        );
        tokio::spawn(async move {
            let activity = Activity::new();
            let io = Tracked {
                inner: stream,
                activity: activity.clone(),
            };
            match tls {
                None => {
                    serve_connection(io, activity, peer, app, &builder, &limits, shutdown).await;
                }
                Some(tls) => {
                    // The handshake counts against the header read timeout.
                    match tokio::time::timeout(limits.header_read_timeout, tls.accept(io)).await {
                        Ok(Ok(io)) => {
                            serve_connection(io, activity, peer, app, &builder, &limits, shutdown)
                                .await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, %peer, "TLS handshake failed");
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            ::metrics::counter!("sluice_http_connections_timed_out_total")
                                .increment(1);
                        }
                    }
                }
            }
            drop(permit);
        });
    }
    // Every connection holds a permit: having them all back means every
    // connection is closed.
    let grace = limits.request_timeout + Duration::from_secs(1);
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    if tokio::time::timeout(grace, permits.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            grace_secs = grace.as_secs(),
            "HTTP connections still open after the shutdown grace period; closing them"
        );
    }
    Ok(())
}

/// One connection, closed when it has not sent a request's headers in
/// time, when it has been silent for the idle timeout, or at shutdown.
async fn serve_connection<I>(
    io: I,
    activity: Activity,
    peer: SocketAddr,
    app: Router,
    builder: &auto::Builder<TokioExecutor>,
    limits: &ConnLimits,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let requests = Arc::new(AtomicU64::new(0));
    let counted = requests.clone();
    let service = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
        counted.fetch_add(1, Ordering::Relaxed);
        req.extensions_mut().insert(ConnectInfo(peer));
        app.clone().oneshot(req)
    });
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let accepted = Instant::now();
    let tick =
        (limits.header_read_timeout.min(limits.idle_timeout) / 4).max(Duration::from_millis(50));
    let mut check = tokio::time::interval(tick);
    // Once closing, the request in flight gets until this deadline.
    let mut closing_until: Option<Instant> = None;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, %peer, "HTTP connection ended with an error");
                }
                return;
            }
            _ = shutdown.cancelled(), if closing_until.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing_until = Some(Instant::now() + limits.request_timeout);
            }
            _ = check.tick() => {
                if let Some(deadline) = closing_until {
                    if Instant::now() >= deadline {
                        tracing::debug!(%peer, "HTTP connection closed: it did not finish closing in time");
                        return;
                    }
                    continue;
                }
                // Before the first request, hyper's header clock may not run
                // yet (the protocol is still being sniffed): ours does.
                let no_request = requests.load(Ordering::Relaxed) == 0
                    && accepted.elapsed() >= limits.header_read_timeout;
                let idle = activity.idle_for() >= limits.idle_timeout;
                if no_request || idle {
                    tracing::debug!(%peer, no_request, idle, "HTTP connection closed: too slow or idle");
                    ::metrics::counter!("sluice_http_connections_timed_out_total").increment(1);
                    if no_request {
                        return;
                    }
                    conn.as_mut().graceful_shutdown();
                    closing_until = Some(Instant::now() + limits.request_timeout);
                }
            }
        }
    }
}

/// When a connection last moved a byte, in milliseconds since its start.
#[derive(Clone)]
struct Activity {
    start: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(now, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// A socket that records its activity.
struct Tracked<T> {
    inner: T,
    activity: Activity,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn read_all(s: &mut tokio::net::TcpStream) -> String {
        let mut raw = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw)).await;
        assert!(read.is_ok(), "the server did not close the connection");
        String::from_utf8_lossy(&raw).into_owned()
    }

    #[tokio::test]
    async fn over_the_cap_is_answered_503_at_once_and_shutdown_is_graceful() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/healthz", axum::routing::get(|| async { "ok" }));
        let limits = ConnLimits {
            header_read_timeout: Duration::from_secs(1),
            max_connections: 2,
            ..ConnLimits::default()
        };
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, app, limits, None, shutdown.clone()));

        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
            held.push(s);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        let answer = read_all(&mut third).await;
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(
            answer.contains("application/problem+json") && answer.contains("max_connections"),
            "{answer}"
        );

        // The stalled ones time out and free their places.
        for s in &mut held {
            read_all(s).await;
        }
        let mut fresh = tokio::net::TcpStream::connect(addr).await.unwrap();
        fresh
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        assert!(read_all(&mut fresh).await.starts_with("HTTP/1.1 200"));

        // Shutdown ends an idle keep-alive connection and returns.
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        assert!(idle.read(&mut buf).await.unwrap() > 0);
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve returned after shutdown")
            .unwrap()
            .unwrap();
        read_all(&mut idle).await;
    }

    #[test]
    fn the_connection_cap_leaves_descriptors_for_the_rest() {
        assert_eq!(default_max_connections(None), 1024);
        assert_eq!(default_max_connections(Some(1 << 20)), 1024);
        assert_eq!(default_max_connections(Some(1024)), 896);
        assert_eq!(default_max_connections(Some(300)), 172);
        assert_eq!(default_max_connections(Some(100)), 16);
        assert!(open_files_limit().is_some_and(|n| n > 0));
    }
}
