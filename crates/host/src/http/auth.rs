//! Bearer tokens: the API token and scoped named tokens, which routes need which scope.

use super::*;

/// Reads the API token from `path`, creating a random one (mode 0600) when
/// the file does not exist, so a new user is never locked out nor left open.
pub fn load_or_create_token(path: &Path) -> anyhow::Result<(String, bool)> {
    if path.exists() {
        let token = std::fs::read_to_string(path)
            .with_context(|| format!("reading the API token {}", path.display()))?
            .trim()
            .to_owned();
        anyhow::ensure!(
            token.len() >= 16,
            "the API token in {} is shorter than 16 characters",
            path.display()
        );
        return Ok((token, false));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let token = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating the API token {}", path.display()))?;
    std::io::Write::write_all(&mut f, token.as_bytes())?;
    Ok((token, true))
}

/// The credentials of an `Authorization: Bearer <token>` header. The scheme
/// is case-insensitive (RFC 9110 section 11.1), the token is not.
pub(super) fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start())
}

/// The scope a request needs: operator actions (dead letters, replay,
/// rebuild, void, forget, pausing consumers) `operate`, other changes `write`, reads `read`.
pub(super) fn required_scope(method: &Method, path: &str) -> Scope {
    let operator = path.starts_with("/v1/dlq")
        || [
            "/void", "/forget", "/replay", "/rebuild", "/pause", "/resume",
        ]
        .iter()
        .any(|s| path.ends_with(s));
    if operator {
        Scope::Operate
    } else if method == Method::GET || method == Method::HEAD {
        Scope::Read
    } else {
        Scope::Write
    }
}

/// The scopes of the request's bearer token; `None` without a known token.
pub(super) fn token_scopes(ctx: &Ctx, req: &Request) -> Option<Vec<Scope>> {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)?;
    // Constant time, so the comparison does not leak the token's prefix.
    if bool::from(given.as_bytes().ct_eq(ctx.token.as_bytes())) {
        return Some(ALL_SCOPES.to_vec());
    }
    ctx.tokens.as_ref()?.scopes_of(given)
}

/// Lets the request through if its token has the scope it needs: 401
/// without a known token, 403 with one that lacks the scope.
pub(super) async fn authorize(ctx: &Ctx, req: Request, next: Next) -> Response {
    let needed = required_scope(req.method(), req.uri().path());
    match token_scopes(ctx, &req) {
        Some(scopes) if scopes.contains(&needed) => next.run(req).await,
        Some(_) => {
            let name = format!("{needed:?}").to_lowercase();
            problem(
                StatusCode::FORBIDDEN,
                "forbidden",
                "Forbidden",
                format!(
                    "this token lacks the `{name}` scope this request needs: use a token created with `sluice token create <name> --scope {name}`"
                ),
            )
        }
        None => unauthorized(),
    }
}

/// For a module's routes: reads pass (the read-token layer, when reads
/// are not open, has checked them), anything else needs the token.
pub(super) async fn require_token_for_writes(
    State(ctx): State<Ctx>,
    req: Request,
    next: Next,
) -> Response {
    if req.method() == Method::GET || req.method() == Method::HEAD {
        return next.run(req).await;
    }
    authorize(&ctx, req, next).await
}

pub(super) async fn require_token(State(ctx): State<Ctx>, req: Request, next: Next) -> Response {
    authorize(&ctx, req, next).await
}

/// What stays open when reads need a token.
#[derive(Debug, Clone, Copy)]
pub(super) struct ReadExempt {
    pub(super) metrics: bool,
}

/// Reads need a `read` token (production): all but the probes, and
/// `/metrics` when configured open. Writes and operator routes are left to
/// their own route layer.
pub(super) async fn require_read_token(
    State((ctx, exempt)): State<(Ctx, ReadExempt)>,
    req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path();
    let open = matches!(path, "/healthz" | "/readyz") || (exempt.metrics && path == "/metrics");
    if open || required_scope(req.method(), path) != Scope::Read {
        return next.run(req).await;
    }
    authorize(&ctx, req, next).await
}

pub(super) fn unauthorized() -> Response {
    let mut resp = problem(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "Unauthorized",
        "this endpoint needs `Authorization: Bearer <token>`; `sluice up` writes the token to .sluice/token",
    );
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}
