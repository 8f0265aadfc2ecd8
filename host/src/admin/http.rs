//! The admin HTTP API: axum on tokio, served on [`AdminConfig::listen`]
//! (loopback by default).
//!
//! | method and path | what it does | answers |
//! |---|---|---|
//! | `GET /healthz` | liveness: the process serves | 200 |
//! | `GET /readyz` | readiness: the pipeline and its controller run | 200, 503 while starting or draining |
//! | `GET /metrics` | every metric, Prometheus text format 0.0.4 | 200 |
//! | `GET /modules` | every module with its state and figures ([`ModuleView`]) | 200 |
//! | `POST /modules?name=N&version=V[&option=k=v]...` | uploads a component (the raw `.wasm` as the body) | 201 + [`ModuleRecord`](super::ModuleRecord); 400, 409, 413, 415, 422 |
//! | `DELETE /modules/{key}` | removes an idle module (key: id, id prefix, `name@version`) | 200 + the record; 404, 409 |
//! | `GET /rollout` | the rollout ([`RolloutView`]) | 200 |
//! | `PUT /rollout` | `{"candidate": "name@version", "weight": 25}`: sets candidate and share of shards | 200 + [`RolloutView`]; 400, 404, 409 |
//! | `POST /rollout/promote` | the candidate becomes the incumbent everywhere | 200; 409 without a candidate |
//! | `POST /rollout/rollback` | optional `{"reason": "..."}`: the candidate leaves every shard | 200; 409 without a candidate |
//!
//! Every error is JSON, `{"error": "...", "status": N}`, with the status of
//! [`AdminError::status`] for refusals from the controller.
//!
//! # Authentication
//!
//! Every call that is not `GET`/`HEAD` needs `Authorization: Bearer
//! <token>` with the token of [`AdminConfig::token`] (or [`TOKEN_ENV`],
//! which wins: see [`configured_token`]). Both sides are hashed with SHA-256
//! and the digests compared in constant time, so neither the token's bytes
//! nor its length leak through timing. A missing or wrong token is
//! answered 401 with `WWW-Authenticate: Bearer`; with no token configured
//! every mutating call is refused with 403.
//!
//! Reads need no token: they carry module ids (content hashes), names,
//! versions, options and operational figures, nothing that grants access;
//! health probes and Prometheus scrapers must work without a secret; and
//! the API listens on loopback unless configured otherwise. An operator who
//! exposes it further should put it behind a network policy or a proxy.
//!
//! # Bodies
//!
//! A body larger than [`AdminConfig::max_body_bytes`] (64 KiB for the JSON
//! calls) is refused with 413 without being buffered: a `Content-Length`
//! over the limit is refused before a byte of the body is read, and a body
//! without one (chunked) is read only up to the limit. Handlers check
//! everything else first (token, query, content type), so a refused call
//! reads no body at all. Every answer to a call with a body says
//! `Connection: close`: the server drops a connection whose body it left
//! unread, and a client must not send its next call there.
//!
//! # Readiness
//!
//! The server starts before the pipeline (so `wagg run` fails fast when it
//! cannot listen): until [`AdminState::set_controller`] is called, and again
//! after [`AdminState::set_draining`], `/readyz` answers 503 and every call
//! that needs the controller is refused with 503.
//!
//! Changes run in a task of their own: a client that disconnects while a
//! rollout swaps shards does not cancel the swap halfway.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{AdminConfig, AdminError, Controller, ModuleView, RolloutView};
use crate::telemetry::Metrics;

/// Environment variable holding the admin token; it wins over
/// [`AdminConfig::token`].
pub const TOKEN_ENV: &str = "WAGG_ADMIN_TOKEN";

/// Content type of `/metrics`: the Prometheus text exposition format.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Largest body of the JSON calls (`PUT /rollout`, `POST
/// /rollout/rollback`), bytes.
pub const MAX_JSON_BODY_BYTES: usize = 64 << 10;

/// Reason recorded for a rollback requested without one.
const DEFAULT_ROLLBACK_REASON: &str = "rolled back by an operator";

/// The token mutating calls must carry: [`TOKEN_ENV`] if it is set and not
/// empty, else [`AdminConfig::token`] if not empty.
pub fn configured_token(config: &AdminConfig) -> Option<String> {
    std::env::var(TOKEN_ENV)
        .ok()
        .filter(|t| !t.is_empty())
        .or_else(|| config.token.clone().filter(|t| !t.is_empty()))
}

/// What the handlers share: the controller once it runs, the token's
/// digest, the body limit and the metrics. Cheap to clone.
#[derive(Clone)]
pub struct AdminState {
    inner: Arc<Inner>,
}

struct Inner {
    controller: OnceLock<Arc<Controller>>,
    draining: AtomicBool,
    /// SHA-256 of the token; `None`: mutating calls are refused.
    token: Option<[u8; 32]>,
    max_body_bytes: usize,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("ready", &self.is_ready())
            .field("token", &self.inner.token.map(|_| "<set>"))
            .field("max_body_bytes", &self.inner.max_body_bytes)
            .finish_non_exhaustive()
    }
}

impl AdminState {
    /// State for a server whose mutating calls need `token` (none: they are
    /// all refused; an empty token counts as none) and whose bodies may be
    /// `max_body_bytes` long. Not ready until
    /// [`set_controller`](Self::set_controller).
    ///
    /// `/metrics` serves `metrics` (the pipeline's, [`Metrics::render`]).
    ///
    /// `wagg run` passes [`configured_token`]; tests pass a token directly,
    /// so the environment cannot change what they check.
    pub fn new(token: Option<&str>, max_body_bytes: usize, metrics: Arc<Metrics>) -> Self {
        AdminState {
            inner: Arc::new(Inner {
                controller: OnceLock::new(),
                draining: AtomicBool::new(false),
                token: token
                    .filter(|t| !t.is_empty())
                    .map(|t| Sha256::digest(t.as_bytes()).into()),
                max_body_bytes,
                metrics,
            }),
        }
    }

    /// State from `[admin]`: [`configured_token`] and
    /// [`AdminConfig::max_body_bytes`].
    pub fn from_config(config: &AdminConfig, metrics: Arc<Metrics>) -> Self {
        Self::new(
            configured_token(config).as_deref(),
            config.max_body_bytes,
            metrics,
        )
    }

    /// The pipeline and its controller run: `/readyz` answers 200 and the
    /// module and rollout calls are served. A second call is ignored.
    pub fn set_controller(&self, controller: Arc<Controller>) {
        if self.inner.controller.set(controller).is_err() {
            tracing::warn!("The admin API already has a controller; ignoring the second one.");
        }
    }

    /// The host is shutting down: `/readyz` answers 503 again and changes
    /// are refused; reads still work.
    pub fn set_draining(&self) {
        self.inner.draining.store(true, Ordering::Relaxed);
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.inner.controller.get().is_some() && !self.inner.draining.load(Ordering::Relaxed)
    }

    fn controller(&self) -> Result<&Arc<Controller>, ApiError> {
        self.inner.controller.get().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the host is starting: the pipeline and its controller are not running yet",
            )
        })
    }

    /// The controller, for a change: refused while draining too.
    fn controller_for_change(&self) -> Result<Arc<Controller>, ApiError> {
        let controller = self.controller()?.clone();
        if self.inner.draining.load(Ordering::Relaxed) {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the host is shutting down; changes are refused",
            ));
        }
        Ok(controller)
    }

    /// Checks a mutating call's `Authorization` header.
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(expected) = &self.inner.token else {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "no admin token is configured, so changes are refused: set [admin] token in \
                     the configuration or {TOKEN_ENV} in wagg's environment"
                ),
            ));
        };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
        let Some(presented) = presented else {
            return Err(ApiError::unauthorized(
                "this call needs `Authorization: Bearer <token>`",
                r#"Bearer realm="wagg""#,
            ));
        };
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        if bool::from(digest.ct_eq(expected)) {
            Ok(())
        } else {
            Err(ApiError::unauthorized(
                "the bearer token is wrong",
                r#"Bearer realm="wagg", error="invalid_token""#,
            ))
        }
    }
}

/// A refused call: its status and message, sent as
/// `{"error": "...", "status": N}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    www_authenticate: Option<&'static str>,
}

/// The JSON body of every error.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub error: String,
    /// The HTTP status, repeated.
    pub status: u16,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            www_authenticate: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn unauthorized(message: &str, challenge: &'static str) -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
            www_authenticate: Some(challenge),
        }
    }

    fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than the limit of {limit} bytes ([admin] max_body_bytes)"),
        )
    }
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        ApiError::new(status, e.to_string())
    }
}

/// A refusal's message, kept on the response for the log line.
#[derive(Debug, Clone)]
struct Refusal(String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let refusal = Refusal(self.message.clone());
        let body = ErrorBody {
            error: self.message,
            status: self.status.as_u16(),
        };
        let mut response = (self.status, Json(body)).into_response();
        response.extensions_mut().insert(refusal);
        if let Some(challenge) = self.www_authenticate {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        response
    }
}

/// The admin API's routes on `state`, with authentication of mutating calls.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/modules", get(list_modules).post(upload_module))
        .route("/modules/{key}", delete(remove_module))
        .route("/rollout", get(show_rollout).put(set_rollout))
        .route("/rollout/promote", post(promote))
        .route("/rollout/rollback", post(rollback))
        .route(
            "/shadow",
            axum::routing::put(start_shadow).delete(stop_shadow),
        )
        .route("/ab", get(ab_report))
        .route("/flush", post(flush_open))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
}

/// Serves the admin API on `listener` until `shutdown` resolves, then
/// finishes the calls in flight.
///
/// # Errors
///
/// If the listener's address cannot be read or serving fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "Admin API listening.");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await?;
    tracing::debug!(%addr, "Admin API stopped.");
    Ok(())
}

/// Lets reads through; a mutating call needs the token. Logs every change
/// with its outcome.
async fn authenticate(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let method = request.method().clone();
    if matches!(method, Method::GET | Method::HEAD) {
        return next.run(request).await;
    }
    let path = request.uri().path().to_owned();
    let has_body = has_body(request.headers());
    let mut response = match state.authorize(request.headers()) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    };
    if has_body {
        // A refused call leaves its body unread, and the server then drops
        // the connection; without this header a client could send its next
        // call on that connection and lose it. Changes are rare: closing
        // after every call with a body costs nothing.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let status = response.status().as_u16();
    if response.status().is_success() {
        tracing::info!(%method, path, status, "Admin call done.");
    } else {
        let reason = response
            .extensions()
            .get::<Refusal>()
            .map_or("", |r| r.0.as_str());
        tracing::warn!(%method, path, status, reason, "Admin call refused.");
    }
    response
}

/// Whether a request comes with a body (declared length above 0, or
/// chunked).
fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(State(state): State<AdminState>) -> Result<Json<serde_json::Value>, ApiError> {
    if state.inner.draining.load(Ordering::Relaxed) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the host is shutting down",
        ));
    }
    state.controller()?;
    Ok(Json(serde_json::json!({ "status": "ready" })))
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let body = state.inner.metrics.render();
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(METRICS_CONTENT_TYPE),
        )],
        body,
    )
        .into_response()
}

async fn list_modules(State(state): State<AdminState>) -> Result<Json<Vec<ModuleView>>, ApiError> {
    Ok(Json(state.controller()?.list().await))
}

/// `POST /modules`' query: `name`, `version`, any number of `option=k=v`.
#[derive(Debug, PartialEq, Eq)]
struct UploadQuery {
    name: String,
    version: String,
    options: Vec<(String, String)>,
}

fn parse_upload_query(query: Option<&str>) -> Result<UploadQuery, ApiError> {
    let pairs: Vec<(String, String)> = query_pairs(query.unwrap_or(""))?;
    let (mut name, mut version, mut options) = (None, None, Vec::<(String, String)>::new());
    for (key, value) in pairs {
        match key.as_str() {
            "name" | "version" => {
                let slot = if key == "name" {
                    &mut name
                } else {
                    &mut version
                };
                if slot.replace(value).is_some() {
                    return Err(ApiError::bad_request(format!("`{key}` is given twice")));
                }
            }
            "option" => {
                let Some((k, v)) = value.split_once('=').filter(|(k, _)| !k.is_empty()) else {
                    return Err(ApiError::bad_request(format!(
                        "option `{value}` is not `key=value`"
                    )));
                };
                if options.iter().any(|(seen, _)| seen == k) {
                    return Err(ApiError::bad_request(format!(
                        "option `{k}` is given twice"
                    )));
                }
                options.push((k.to_owned(), v.to_owned()));
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter `{key}` (expected name, version, option)"
                )));
            }
        }
    }
    let missing = |field: &str| ApiError::bad_request(format!("the query needs `{field}=...`"));
    Ok(UploadQuery {
        name: name.ok_or_else(|| missing("name"))?,
        version: version.ok_or_else(|| missing("version"))?,
        options,
    })
}

/// `a=1&b=2` → pairs, percent-decoded.
fn query_pairs(query: &str) -> Result<Vec<(String, String)>, ApiError> {
    use axum::extract::Query;
    let uri: axum::http::Uri = format!("/?{query}")
        .parse()
        .map_err(|e| ApiError::bad_request(format!("bad query: {e}")))?;
    Query::<Vec<(String, String)>>::try_from_uri(&uri)
        .map(|q| q.0)
        .map_err(|e| ApiError::bad_request(format!("bad query: {}", e.body_text())))
}

/// Refuses a content type other than those in `accepted` (a missing one
/// is accepted).
fn check_content_type(headers: &HeaderMap, accepted: &[&str]) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = value
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if accepted.contains(&essence.as_str()) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "content type `{}` is not accepted here: send {}",
                value.to_str().unwrap_or("?"),
                accepted.join(" or ")
            ),
        ))
    }
}

/// Reads a body of at most `limit` bytes: refuses a larger
/// `Content-Length` before reading, and stops reading a body without one
/// as soon as it passes the limit.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let declared = match headers.get(header::CONTENT_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::bad_request("Content-Length is not a number"))?,
        ),
    };
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    let capacity = declared.map_or(0, |n| n as usize);
    let mut buf = Vec::with_capacity(capacity);
    let mut stream = body.into_data_stream();
    while let Some(chunk) =
        std::future::poll_fn(|cx| futures_core::Stream::poll_next(Pin::new(&mut stream), cx)).await
    {
        let chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("could not read the body: {e}")))?;
        if buf.len() + chunk.len() > limit {
            return Err(ApiError::too_large(limit));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

/// Reads a JSON body of type `T`; an empty body is `T::default()` when
/// `empty_ok`.
async fn read_json<T: DeserializeOwned + Default>(
    request: Request,
    empty_ok: bool,
) -> Result<T, ApiError> {
    let (parts, body) = request.into_parts();
    check_content_type(&parts.headers, &["application/json"])?;
    let bytes = read_body(&parts.headers, body, MAX_JSON_BODY_BYTES).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return if empty_ok {
            Ok(T::default())
        } else {
            Err(ApiError::bad_request("the body must be a JSON object"))
        };
    }
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("bad JSON body: {e}")))
}

/// Runs a change in a task of its own, so that a client disconnecting does
/// not cancel it halfway (a rollout between two shard swaps).
async fn run_change<T: Send + 'static>(
    change: impl Future<Output = Result<T, AdminError>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(change)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "An admin change panicked.");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the change failed: {e}"),
            )
        })?
        .map_err(ApiError::from)
}

async fn upload_module(
    State(state): State<AdminState>,
    request: Request,
) -> Result<(StatusCode, Json<super::ModuleRecord>), ApiError> {
    // Everything that can be checked without the body is checked first.
    let query = parse_upload_query(request.uri().query())?;
    check_content_type(
        request.headers(),
        &["application/wasm", "application/octet-stream"],
    )?;
    let controller = state.controller_for_change()?;
    let (parts, body) = request.into_parts();
    let bytes = read_body(&parts.headers, body, state.inner.max_body_bytes).await?;
    let size = bytes.len();
    let UploadQuery {
        name,
        version,
        options,
    } = query;
    let record = run_change(async move {
        controller
            .upload(bytes.to_vec(), name, version, options)
            .await
    })
    .await?;
    tracing::info!(module = %record.label(), id = %record.id, size, "Module uploaded.");
    Ok((StatusCode::CREATED, Json(record)))
}

async fn remove_module(
    State(state): State<AdminState>,
    Path(key): Path<String>,
) -> Result<Json<super::ModuleRecord>, ApiError> {
    let controller = state.controller_for_change()?;
    let record = run_change(async move { controller.remove(&key).await }).await?;
    tracing::info!(module = %record.label(), id = %record.id, "Module removed.");
    Ok(Json(record))
}

async fn show_rollout(State(state): State<AdminState>) -> Result<Json<RolloutView>, ApiError> {
    Ok(Json(state.controller()?.rollout().await))
}

/// `PUT /rollout`'s body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RolloutRequest {
    candidate: String,
    weight: u64,
}

async fn set_rollout(
    State(state): State<AdminState>,
    request: Request,
) -> Result<Json<RolloutView>, ApiError> {
    let controller = state.controller_for_change()?;
    let req: RolloutRequest = read_json(request, false).await?;
    let weight = u8::try_from(req.weight)
        .ok()
        .filter(|w| *w <= 100)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "weight {} is not a percentage (0..=100)",
                req.weight
            ))
        })?;
    let candidate = req.candidate;
    let view = run_change(async move { controller.set_rollout(&candidate, weight).await }).await?;
    Ok(Json(view))
}

/// `POST /flush`: every open bucket written now; answers the flushed
/// watermark.
async fn flush_open(State(state): State<AdminState>) -> Result<Json<serde_json::Value>, ApiError> {
    let controller = state.controller_for_change()?;
    let watermark = run_change(async move { controller.flush_open().await }).await?;
    Ok(Json(serde_json::json!({ "flushed_watermark": watermark })))
}

async fn promote(State(state): State<AdminState>) -> Result<Json<RolloutView>, ApiError> {
    let controller = state.controller_for_change()?;
    Ok(Json(
        run_change(async move { controller.promote().await }).await?,
    ))
}

/// `POST /rollout/rollback`'s optional body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackRequest {
    reason: Option<String>,
}

async fn rollback(
    State(state): State<AdminState>,
    request: Request,
) -> Result<Json<RolloutView>, ApiError> {
    let controller = state.controller_for_change()?;
    let req: RollbackRequest = read_json(request, true).await?;
    let reason = req
        .reason
        .filter(|r| !r.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_ROLLBACK_REASON.to_owned());
    Ok(Json(
        run_change(async move { controller.rollback(&reason).await }).await?,
    ))
}

/// `PUT /shadow`'s body: the module, and either the shards or a share.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShadowRequest {
    candidate: String,
    shards: Option<Vec<u32>>,
    share: Option<u8>,
}

async fn start_shadow(
    State(state): State<AdminState>,
    request: Request,
) -> Result<Json<serde_json::Value>, ApiError> {
    let controller = state.controller_for_change()?;
    let req: ShadowRequest = read_json(request, false).await?;
    let candidate = req.candidate.clone();
    let shards = run_change(async move {
        controller
            .start_shadow(&req.candidate, req.shards, req.share)
            .await
    })
    .await?;
    Ok(Json(
        serde_json::json!({ "shadow": candidate, "shards": shards }),
    ))
}

async fn stop_shadow(State(state): State<AdminState>) -> Result<Json<serde_json::Value>, ApiError> {
    let controller = state.controller_for_change()?;
    run_change(async move { controller.stop_shadow().await }).await?;
    Ok(Json(serde_json::json!({ "shadow": null })))
}

async fn ab_report(State(state): State<AdminState>) -> Result<Json<super::ab::AbReport>, ApiError> {
    Ok(Json(state.controller()?.ab_report().await?))
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {}", request.uri().path()),
    )
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_query_takes_name_version_and_repeated_options() {
        let q =
            parse_upload_query(Some("name=btree&version=2&option=a=1&option=b%3Dc=x%20y")).unwrap();
        assert_eq!(
            q,
            UploadQuery {
                name: "btree".into(),
                version: "2".into(),
                options: vec![("a".into(), "1".into()), ("b".into(), "c=x y".into())],
            }
        );
    }

    #[test]
    fn upload_query_refuses_unknown_missing_and_repeated_fields() {
        for bad in [
            None,
            Some("name=a"),
            Some("version=1"),
            Some("name=a&version=1&nmae=b"),
            Some("name=a&name=b&version=1"),
            Some("name=a&version=1&option=noequals"),
            Some("name=a&version=1&option==v"),
            Some("name=a&version=1&option=k=1&option=k=2"),
        ] {
            let e = parse_upload_query(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad:?}");
        }
    }

    #[test]
    fn tokens_compare_by_digest_and_scheme_is_case_insensitive() {
        let state = AdminState::new(Some("s3cret"), 1024, Metrics::new());
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            h
        };
        assert!(state.authorize(&with("Bearer s3cret")).is_ok());
        assert!(state.authorize(&with("bearer  s3cret ")).is_ok());
        for wrong in ["Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret"] {
            let e = state.authorize(&with(wrong)).unwrap_err();
            assert_eq!(e.status, StatusCode::UNAUTHORIZED, "{wrong}");
            assert!(e.www_authenticate.is_some());
        }
        assert_eq!(
            state.authorize(&HeaderMap::new()).unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
        for none in [None, Some("")] {
            let open = AdminState::new(none, 1024, Metrics::new());
            assert_eq!(
                open.authorize(&with("Bearer ")).unwrap_err().status,
                StatusCode::FORBIDDEN
            );
        }
    }
}
