//! HTTP routes. Handlers stay thin: authenticate, build the key, hand the body to the pipeline.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequestParts, MatchedPath, Path, Query, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use http::request::Parts;
use http::{StatusCode, header};
use http_body::Body as _;
use serde::{Deserialize, Serialize};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{
    MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::TraceLayer;

use crate::auth::{Verifier, bearer_token};
use crate::credentials::UserBuckets;
use crate::error::{Error, Result};
use crate::keys::{KeyLayout, UserSegment};
use crate::metrics::{HttpLabels, Metrics};
use crate::s3::{Bucket, ObjectMeta};
use crate::upload::{Target, Uploaded, Uploader};

/// Everything a request may need; cheap to clone.
#[derive(Clone)]
pub struct AppState(pub Arc<Inner>);

pub struct Inner {
    pub verifier: Verifier,
    pub keys: KeyLayout,
    /// The proxy's own view of the bucket (readiness checks).
    pub bucket: Bucket,
    /// The bucket as each user may see it (scoped credentials when a role is configured).
    pub users: UserBuckets,
    pub uploader: Uploader,
    pub metrics: Arc<Metrics>,
    pub registry: prometheus_client::registry::Registry,
    pub draining: AtomicBool,
    /// `x-api-key` required by the direct-mode routes, when configured.
    pub api_key: Option<crate::config::Secret>,
    pub tus: crate::tus::TusConfig,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

pub fn router(state: AppState) -> Router {
    let request_id = header::HeaderName::from_static("x-request-id");
    Router::new()
        .route("/", get(index))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/uploads", get(list_uploads))
        .route("/uploads/{*name}", put(put_upload))
        .merge(crate::direct::routes(state.clone()))
        .merge(crate::tus::router(&state))
        .fallback(|| async { Error::NotFound })
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
        .layer(CatchPanicLayer::new())
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            // The route template, never the raw path: paths carry user data.
            let endpoint = req
                .extensions()
                .get::<MatchedPath>()
                .map_or("-", MatchedPath::as_str);
            let id = req
                .extensions()
                .get::<RequestId>()
                .and_then(|id| id.header_value().to_str().ok())
                .unwrap_or("-");
            tracing::info_span!("request", method = %req.method(), endpoint, request_id = id)
        }))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
            header::HeaderName::from_static("x-api-key"),
        ]))
}

async fn count_requests(
    State(state): State<AppState>,
    path: Option<MatchedPath>,
    req: Request,
    next: Next,
) -> Response {
    let endpoint = endpoint_label(path.as_ref().map(MatchedPath::as_str));
    let response = next.run(req).await;
    let labels = HttpLabels {
        endpoint,
        status: response.status().as_u16(),
    };
    state.metrics.http_requests.get_or_create(&labels).inc();
    response
}

fn endpoint_label(path: Option<&str>) -> &'static str {
    match path {
        Some("/uploads/{*name}") => "put_upload",
        Some("/uploads") => "list_uploads",
        Some("/healthz") => "healthz",
        Some("/readyz") => "readyz",
        Some("/metrics") => "metrics",
        Some("/") => "index",
        Some(p) if p == "/sts" || p.starts_with("/s3/") => crate::direct::endpoint_label(p),
        // tus routes live under the configurable base path (src/tus).
        Some(p) if p.ends_with("/{id}") => "tus_upload",
        Some(p) if p.len() > 1 && p.ends_with('/') => "tus_create",
        _ => "other",
    }
}

/// The verified caller.
pub struct Principal {
    pub user: UserSegment,
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        let token = bearer_token(&parts.headers)?;
        let user = state.verifier.verify(token).await?;
        Ok(Principal {
            user: UserSegment::new(&user)?,
        })
    }
}

async fn index() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "service": "s3-upload-proxy", "version": env!("CARGO_PKG_VERSION") }))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.draining.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "draining" })),
        )
            .into_response();
    }
    match tokio::time::timeout(Duration::from_secs(3), state.bucket.head_bucket()).await {
        Ok(Ok(())) => Json(serde_json::json!({ "status": "ready" })).into_response(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: S3 check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({ "status": "s3_unavailable" })),
            )
                .into_response()
        }
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "s3_timeout" })),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> Result<Response> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &state.registry)
        .map_err(|e| Error::Internal(e.to_string()))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

#[derive(Deserialize)]
struct PutQuery {
    #[serde(default)]
    overwrite: bool,
}

async fn put_upload(
    State(state): State<AppState>,
    principal: Principal,
    Path(name): Path<String>,
    Query(query): Query<PutQuery>,
    req: Request,
) -> Result<(StatusCode, Json<Uploaded>)> {
    let key = state.keys.object_key(&principal.user, &name)?;
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body: Body = req.into_body();
    let declared = body.size_hint().exact();
    let target = Target {
        key,
        meta: ObjectMeta {
            content_type,
            ..ObjectMeta::default()
        },
        overwrite: query.overwrite,
    };
    let bucket = state.users.for_user(&principal.user).await?;
    let uploaded = state
        .uploader
        .upload(&bucket, target, body, declared)
        .await?;
    Ok((StatusCode::CREATED, Json(uploaded)))
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<i32>,
    cursor: Option<String>,
}

#[derive(Serialize)]
struct Listing {
    objects: Vec<ListedObject>,
    next_cursor: Option<String>,
}

#[derive(Serialize)]
struct ListedObject {
    name: String,
    key: String,
    size: u64,
    etag: Option<String>,
    last_modified: Option<String>,
}

async fn list_uploads(
    State(state): State<AppState>,
    principal: Principal,
    Query(q): Query<ListQuery>,
) -> Result<Json<Listing>> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Error::BadRequest("limit must be between 1 and 1000".into()));
    }
    let prefix = state.keys.user_prefix(&principal.user);
    let reserved = state.keys.reserved_prefix(&principal.user);
    let bucket = state.users.for_user(&principal.user).await?;
    let (objects, next_cursor) = bucket.list(&prefix, q.cursor, limit).await?;
    let objects = objects
        .into_iter()
        .filter(|o| !o.key.starts_with(&reserved))
        .map(|o| ListedObject {
            name: o.key[prefix.len()..].to_owned(),
            key: o.key,
            size: o.size,
            etag: o.etag,
            last_modified: o.last_modified,
        })
        .collect();
    Ok(Json(Listing {
        objects,
        next_cursor,
    }))
}
