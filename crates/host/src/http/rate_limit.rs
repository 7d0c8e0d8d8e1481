//! Per-client rate limits (behind trusted proxies only) and header limits.

use super::*;

/// The configured header limits (`http.max_header_bytes`,
/// `http.max_headers`).
#[derive(Debug, Clone, Copy)]
pub(super) struct HeaderLimits {
    pub(super) bytes: usize,
    pub(super) fields: usize,
}

/// Refuses requests whose headers exceed the configured limits with a 431
/// problem. hyper's own limits are [`conn::HARD_LIMIT_FACTOR`] times these,
/// so everything between reaches this layer and gets a body saying what to
/// fix; only beyond does hyper answer a bare 431 and close.
pub(super) async fn header_limits(
    State(limits): State<HeaderLimits>,
    req: Request,
    next: Next,
) -> Response {
    let headers = req.headers();
    // As on the wire: `name: value\r\n` per field, plus the request line.
    let bytes = req.method().as_str().len()
        + req.uri().to_string().len()
        + 12
        + headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if headers.len() > limits.fields || bytes > limits.bytes {
        return Problem::of(
            ProblemType::HeadersTooLarge,
            format!(
                "the request line and headers are {bytes} bytes in {} fields; the server takes at most {} bytes in {} fields (http.max_header_bytes, http.max_headers)",
                headers.len(),
                limits.bytes,
                limits.fields
            ),
        )
        .into_response();
    }
    next.run(req).await
}

/// Paths the rate limiter never throttles: probes and scrapes must see a
/// busy server as it is, not be refused by it.
pub(super) const UNLIMITED_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// The address the rate limiter keys on: the TCP peer, unless the peer is a
/// trusted proxy; then the rightmost `X-Forwarded-For` address that is not
/// a trusted proxy (each proxy appends the address it saw, so everything to
/// the left of the first untrusted hop may be forged by the client).
pub(super) fn client_address(
    peer: IpAddr,
    headers: &axum::http::HeaderMap,
    trusted: &[IpNet],
) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    // Several header lines are one list, in order (RFC 9110 section 5.3).
    let lines: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    for hop in lines.iter().rev().flat_map(|l| l.rsplit(',')) {
        let hop = hop.trim();
        let Some(ip) = hop
            .parse::<IpAddr>()
            .ok()
            .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
        else {
            // Not an address: the last trusted hop is all we know.
            return client;
        };
        client = ip;
        if !is_trusted(&ip) {
            return ip;
        }
    }
    client
}

pub(super) async fn rate_limit(State(ctx): State<Ctx>, req: Request, next: Next) -> Response {
    if UNLIMITED_PATHS.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let ip = client_address(peer, req.headers(), &ctx.trusted_proxies);
    match ctx.limiter.check_key(&ip) {
        Ok(()) => next.run(req).await,
        Err(not_until) => {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            let secs = wait.as_secs().max(1);
            Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                "Too many requests",
                format!("slow down: retry in {secs} s"),
            )
            .with_retry_after(secs)
            .into_response()
        }
    }
}
