//! The HTTP/JSON API: axum routes onto [`Orchestrator`] methods.
//!
//! | route | method | bearer | success |
//! |---|---|---|---|
//! | `/v1/vms` | POST | host credential | 201 `RegisterVmResponse` |
//! | `/v1/vms/{vm_id}` | DELETE | host credential | 204 |
//! | `/v1/vms/{vm_id}/acquire` | POST | the VM's token | 200 `AcquireJobResponse` (`job: null` when the wait expired) |
//! | `/v1/vms/{vm_id}/release` | POST | the VM's token | 200 `ReleaseVmResponse` (the job queued again, if its VM never started it) |
//! | `/v1/jobs` | POST | client credential | 201 `SubmitJobResponse` (JSON `SubmitJobRequest`, or a YAML spec with `Content-Type: application/yaml`) |
//! | `/v1/jobs/{job_id}` | GET | client credential or the job's VM token | 200 [`JobReport`] |
//! | `/v1/jobs/{job_id}/events?after=N&wait_secs=S` | GET | client credential | 200 `JobEventsPage` |
//! | `/v1/jobs/{job_id}/events` | POST | the job's VM token | 200 `PostJobEventsResponse` |
//! | `/v1/jobs/{job_id}/cancel` | POST | client credential | 200 [`JobReport`] |
//! | `/metrics` | GET | none | Prometheus text |
//!
//! Before any body is read, two layers run (outermost first):
//!
//! 1. **Authentication** ([`route_access`]): the bearer is checked against
//!    what the matched route needs, so a wrong credential is answered 401
//!    at once, without reading (or waiting for) a byte of a body of up to
//!    24 MiB. Every route has an entry in the table; one without would
//!    need at least some valid credential or VM token. The operations
//!    check again, exactly.
//! 2. **Concurrency**: at most `max_concurrent_requests` requests run at
//!    once; a request beyond that waits up to `request_queue_wait` (at most
//!    as many wait), then gets 503 with `Retry-After`. Long polls (acquire,
//!    log follows) hold their connection for up to a minute while doing
//!    nothing, so they do not count there: they have their own bound,
//!    `max_long_polls`, answered 503 at once beyond it (an acquire is also
//!    bounded by `max_waiting_vms`). Idle VMs and followers therefore can
//!    never starve event posts, and a flood of posts cannot stop VMs from
//!    polling.
//!
//! Errors carry an `ApiError` body (`{"error": "..."}`): 400 invalid body
//! or spec (the message names the field), 401 missing or wrong credential,
//! 404 unknown job or VM, 409 event gap (the body also has `next_seq`), a
//! second acquire by a token that already has a job (or was released),
//! release of a VM whose job started, or cancel of a finished job, 410 events for a job that is over (cancelled, timed out:
//! the message says why), 413 body too large, 503 a bound is reached or the
//! orchestrator is stopping, 500 storage failure.
//!
//! [`JobReport`]: crate::report::JobReport

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection, RawPathParamsRejection};
use axum::extract::{
    DefaultBodyLimit, FromRequestParts, MatchedPath, Path, Query, RawPathParams, Request, State,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use protocol::api::{
    AcquireJobRequest, AcquireJobResponse, CancelJobRequest, PostJobEventsRequest,
    PostJobEventsResponse, RegisterVmRequest, ReleaseVmResponse, SubmitJobRequest,
    SubmitJobResponse, VmId, routes,
};
use protocol::job::JobSpec;
use protocol::limits;
use protocol::message::{JobId, Secrets};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::auth::{Access, parse_bearer};
use crate::config::{EVENTS_BODY_LIMIT, SMALL_BODY_LIMIT, SUBMIT_BODY_LIMIT};
use crate::registry::RegistryError;
use crate::service::{Orchestrator, ServiceError};

type Service = Arc<Orchestrator>;

/// The API router over `service`.
pub fn router(service: Service) -> Router {
    let gate = Arc::new(Gate::new(service.limits()));
    Router::new()
        .route(routes::VMS, post(register_vm))
        .route(routes::VM, delete(deregister_vm))
        .route(routes::VM_ACQUIRE, post(acquire))
        .route(routes::VM_RELEASE, post(release_vm))
        .route(
            routes::JOBS,
            post(submit).layer(DefaultBodyLimit::max(SUBMIT_BODY_LIMIT)),
        )
        .route(routes::JOB, get(job_report))
        .route(
            routes::JOB_EVENTS,
            get(events_page)
                .post(post_events)
                .layer(DefaultBodyLimit::max(EVENTS_BODY_LIMIT)),
        )
        .route(routes::JOB_CANCEL, post(cancel))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(SMALL_BODY_LIMIT))
        // Layers run from the last added to the first: errors are counted,
        // then the credential is checked, then a concurrency slot taken,
        // and only then does the handler read the body.
        .layer(middleware::from_fn_with_state(gate, limit_concurrency))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&service),
            authenticate,
        ))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&service),
            count_errors,
        ))
        .with_state(service)
}

/// An error response: status and `ApiError`-shaped body.
#[derive(Debug)]
pub struct HttpError {
    status: StatusCode,
    message: String,
    next_seq: Option<u64>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_seq: Option<u64>,
}

impl HttpError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            next_seq: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: &self.message,
            next_seq: self.next_seq,
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<ServiceError> for HttpError {
    fn from(err: ServiceError) -> Self {
        let status = match &err {
            ServiceError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ServiceError::Invalid(_) | ServiceError::Spec(_) => StatusCode::BAD_REQUEST,
            ServiceError::JobNotFound(_) => StatusCode::NOT_FOUND,
            ServiceError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ServiceError::Registry(err) => match err {
                RegistryError::BadVmToken => StatusCode::UNAUTHORIZED,
                RegistryError::UnknownJob(_) | RegistryError::UnknownVm(_) => StatusCode::NOT_FOUND,
                RegistryError::AlreadyAcquired { .. }
                | RegistryError::JobStarted { .. }
                | RegistryError::Released(_)
                | RegistryError::Gap { .. }
                | RegistryError::AlreadyFinished(_) => StatusCode::CONFLICT,
                RegistryError::JobOver { .. } => StatusCode::GONE,
                RegistryError::InvalidEvents(_) | RegistryError::Invalid(_) => {
                    StatusCode::BAD_REQUEST
                }
                RegistryError::Full { .. } => StatusCode::SERVICE_UNAVAILABLE,
                RegistryError::Random(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
            ServiceError::EventLog(_)
            | ServiceError::Archive(_)
            | ServiceError::Random(_)
            | ServiceError::Task(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let next_seq = match &err {
            ServiceError::Registry(RegistryError::Gap { expected, .. }) => Some(*expected),
            _ => None,
        };
        let message = if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(%err, "internal error");
            "internal error; see the orchestrator's log".to_owned()
        } else {
            err.to_string()
        };
        Self {
            status,
            message,
            next_seq,
        }
    }
}

impl From<BytesRejection> for HttpError {
    fn from(rejection: BytesRejection) -> Self {
        Self::new(rejection.status(), rejection.body_text())
    }
}

impl From<QueryRejection> for HttpError {
    fn from(rejection: QueryRejection) -> Self {
        Self::bad_request(rejection.body_text())
    }
}

/// The bearer token of the request, if it has one.
struct Bearer(Option<String>);

impl Bearer {
    fn get(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Bearer {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(parse_bearer)
            .map(str::to_owned);
        Ok(Self(token))
    }
}

/// Parses a JSON body, naming the offending field on error. An empty body
/// reads as `default` when one is given.
fn parse_json<T: DeserializeOwned>(bytes: &[u8], default: Option<T>) -> Result<T, HttpError> {
    if bytes.iter().all(u8::is_ascii_whitespace)
        && let Some(default) = default
    {
        return Ok(default);
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        HttpError::bad_request(format!("invalid JSON body at {path}: {}", err.inner()))
    })?;
    de.end()
        .map_err(|err| HttpError::bad_request(format!("invalid JSON body: {err}")))?;
    Ok(value)
}

async fn register_vm(
    State(service): State<Service>,
    bearer: Bearer,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, HttpError> {
    let request: RegisterVmRequest = parse_json(&body?, None)?;
    let response = service.register_vm(bearer.get(), &request)?;
    Ok((StatusCode::CREATED, Json(response)))
}

async fn deregister_vm(
    State(service): State<Service>,
    bearer: Bearer,
    Path(vm_id): Path<String>,
) -> Result<StatusCode, HttpError> {
    service.deregister_vm(bearer.get(), &VmId(vm_id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn acquire(
    State(service): State<Service>,
    bearer: Bearer,
    Path(vm_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<AcquireJobResponse>, HttpError> {
    let request: AcquireJobRequest = parse_json(&body?, Some(AcquireJobRequest::default()))?;
    let job = service
        .acquire(bearer.get(), &VmId(vm_id), &request)
        .await?;
    Ok(Json(AcquireJobResponse { job }))
}

async fn release_vm(
    State(service): State<Service>,
    bearer: Bearer,
    Path(vm_id): Path<String>,
) -> Result<Json<ReleaseVmResponse>, HttpError> {
    let requeued = service.release_vm(bearer.get(), &VmId(vm_id)).await?;
    Ok(Json(ReleaseVmResponse { requeued }))
}

async fn post_events(
    State(service): State<Service>,
    bearer: Bearer,
    Path(job_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<PostJobEventsResponse>, HttpError> {
    let request: PostJobEventsRequest = parse_json(&body?, None)?;
    let next_seq = service
        .post_events(bearer.get(), &JobId(job_id), request)
        .await?;
    Ok(Json(PostJobEventsResponse { next_seq }))
}

fn is_yaml(headers: &HeaderMap) -> bool {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    ["application/yaml", "application/x-yaml", "text/yaml"]
        .iter()
        .any(|t| essence.eq_ignore_ascii_case(t))
}

async fn submit(
    State(service): State<Service>,
    bearer: Bearer,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, HttpError> {
    let body = body?;
    let request = if is_yaml(&headers) {
        if body.len() > limits::MAX_SPEC_BYTES {
            return Err(HttpError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("job spec larger than {} bytes", limits::MAX_SPEC_BYTES),
            ));
        }
        let text = std::str::from_utf8(&body)
            .map_err(|_| HttpError::bad_request("job spec is not UTF-8"))?;
        let spec =
            JobSpec::from_yaml(text).map_err(|err| HttpError::bad_request(err.to_string()))?;
        SubmitJobRequest {
            spec,
            secrets: Secrets::default(),
        }
    } else {
        parse_json(&body, None)?
    };
    let job_id = service.submit(bearer.get(), &request).await?;
    let location = HeaderValue::from_str(&routes::job(&job_id)).ok();
    let mut response = (StatusCode::CREATED, Json(SubmitJobResponse { job_id })).into_response();
    if let Some(location) = location {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

async fn job_report(
    State(service): State<Service>,
    bearer: Bearer,
    Path(job_id): Path<String>,
) -> Result<impl IntoResponse, HttpError> {
    Ok(Json(
        service.job_report(bearer.get(), &JobId(job_id)).await?,
    ))
}

/// Query of `GET /v1/jobs/{job_id}/events`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    #[serde(default)]
    after: u64,
    #[serde(default = "default_follow_wait")]
    wait_secs: u32,
}

fn default_follow_wait() -> u32 {
    limits::DEFAULT_LONG_POLL_SECS
}

async fn events_page(
    State(service): State<Service>,
    bearer: Bearer,
    Path(job_id): Path<String>,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<impl IntoResponse, HttpError> {
    let Query(query) = query?;
    if query.wait_secs > limits::MAX_LONG_POLL_SECS {
        return Err(HttpError::bad_request(format!(
            "wait_secs: is {}, more than the maximum of {}",
            query.wait_secs,
            limits::MAX_LONG_POLL_SECS
        )));
    }
    let page = service
        .events_page(bearer.get(), &JobId(job_id), query.after, query.wait_secs)
        .await?;
    Ok(Json(page))
}

async fn cancel(
    State(service): State<Service>,
    bearer: Bearer,
    Path(job_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, HttpError> {
    let request: CancelJobRequest = parse_json(&body?, Some(CancelJobRequest::default()))?;
    let report = service
        .cancel(bearer.get(), &JobId(job_id), &request)
        .await?;
    Ok(Json(report))
}

async fn metrics(State(service): State<Service>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        service.render_metrics(),
    )
}

async fn not_found() -> HttpError {
    HttpError::new(StatusCode::NOT_FOUND, "no such route")
}

async fn method_not_allowed() -> HttpError {
    HttpError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route",
    )
}

/// What the route `path` (as registered, e.g. `/v1/vms/{vm_id}`) needs
/// for `method`, given the request's path parameters. Routes not listed
/// need any valid credential or VM token.
pub fn route_access(method: &Method, path: &str, param: impl Fn(&str) -> Option<String>) -> Access {
    let vm = || param("vm_id").map(VmId);
    let job = || param("job_id").map(JobId);
    let access = match (method.as_str(), path) {
        ("GET", "/metrics") => Some(Access::Public),
        ("POST", routes::VMS) | ("DELETE", routes::VM) => Some(Access::Host),
        ("POST", routes::VM_ACQUIRE) | ("POST", routes::VM_RELEASE) => vm().map(Access::Vm),
        ("POST", routes::JOBS) | ("GET", routes::JOB_EVENTS) | ("POST", routes::JOB_CANCEL) => {
            Some(Access::Client)
        }
        ("GET", routes::JOB) => job().map(Access::ClientOrJobVm),
        ("POST", routes::JOB_EVENTS) => job().map(Access::JobVm),
        _ => None,
    };
    access.unwrap_or(Access::Any)
}

/// Whether a request to `path` with `method` is a long poll.
fn is_long_poll(method: &Method, path: &str) -> bool {
    matches!(
        (method.as_str(), path),
        ("POST", routes::VM_ACQUIRE) | ("GET", routes::JOB_EVENTS)
    )
}

/// Refuses a request whose bearer is not what its route needs, before
/// anything reads its body. Requests that matched no route pass (they
/// are answered 404 without reading a body).
async fn authenticate(
    State(service): State<Service>,
    params: Result<RawPathParams, RawPathParamsRejection>,
    bearer: Bearer,
    request: Request,
    next: Next,
) -> Response {
    let Some(matched) = request.extensions().get::<MatchedPath>().cloned() else {
        return next.run(request).await;
    };
    let param = |name: &str| {
        params.as_ref().ok().and_then(|params| {
            params
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.to_owned())
        })
    };
    let access = route_access(request.method(), matched.as_str(), param);
    match service.authorize(&access, bearer.get()) {
        Ok(()) => next.run(request).await,
        Err(err) => HttpError::from(err).into_response(),
    }
}

/// The concurrency bounds of the API (see the module docs).
#[derive(Debug)]
struct Gate {
    requests: Arc<Semaphore>,
    max_requests: usize,
    waiting: AtomicUsize,
    queue_wait: Duration,
    long_polls: Arc<Semaphore>,
    max_long_polls: usize,
}

impl Gate {
    fn new(limits: &crate::config::Limits) -> Self {
        Self {
            requests: Arc::new(Semaphore::new(limits.max_concurrent_requests)),
            max_requests: limits.max_concurrent_requests,
            waiting: AtomicUsize::new(0),
            queue_wait: limits.request_queue_wait,
            long_polls: Arc::new(Semaphore::new(limits.max_long_polls)),
            max_long_polls: limits.max_long_polls,
        }
    }

    fn busy(what: &str, max: usize) -> Response {
        let mut response = HttpError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the orchestrator is serving its maximum of {max} {what}; retry later"),
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        response
    }
}

/// Runs the request within the concurrency bounds, or answers 503.
async fn limit_concurrency(
    State(gate): State<Arc<Gate>>,
    request: Request,
    next: Next,
) -> Response {
    let long_poll = request
        .extensions()
        .get::<MatchedPath>()
        .is_some_and(|m| is_long_poll(request.method(), m.as_str()));
    if long_poll {
        let Ok(_permit) = Arc::clone(&gate.long_polls).try_acquire_owned() else {
            return Gate::busy("long polls", gate.max_long_polls);
        };
        return next.run(request).await;
    }
    let permit = match Arc::clone(&gate.requests).try_acquire_owned() {
        Ok(permit) => permit,
        Err(_) => {
            // Wait a little, but only as many as run: the queue is bounded.
            let queued = gate.waiting.fetch_add(1, Ordering::SeqCst);
            let waited = if queued < gate.max_requests {
                tokio::time::timeout(gate.queue_wait, Arc::clone(&gate.requests).acquire_owned())
                    .await
                    .ok()
                    .and_then(Result::ok)
            } else {
                None
            };
            gate.waiting.fetch_sub(1, Ordering::SeqCst);
            match waited {
                Some(permit) => permit,
                None => return Gate::busy("concurrent requests", gate.max_requests),
            }
        }
    };
    let response = next.run(request).await;
    drop(permit);
    response
}

async fn count_errors(State(service): State<Service>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    if status.is_client_error() || status.is_server_error() {
        service.count_api_error(status.as_u16());
    }
    response
}
