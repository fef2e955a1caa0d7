//! tus 1.0.0 resumable uploads with every extension (creation, creation-with-upload,
//! creation-defer-length, termination, expiration, checksum, checksum-trailer, concatenation,
//! concatenation-unfinished), served under `tus_base_path` (default `/files/`).
//!
//! All state lives in S3 under the caller's own prefix (`{user}/.s3up/tus/{id}/`), so any
//! instance serves any upload, and another user's upload URL simply finds nothing (404).
//! HEAD is one GET of the state object; a PATCH streams through the core pipeline.

mod checksum;
mod concat;
mod headers;
mod metadata;
mod patch;
mod reaper;
mod state;

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use http_body::Body as _;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::api::{AppState, Principal};
use crate::config::TusSettings;
use crate::error::{Error, Result};
use crate::keys::UserSegment;
use crate::upload::plan::PartPlan;
use headers::{ConcatHeader, TUS_VERSION};
use patch::Ctx;
use state::{Concat, Store, UploadState};

pub use reaper::spawn_reaper;

/// On a completed upload (HEAD, and the request that completed it): the object's key,
/// percent-encoded.
pub const KEY_HEADER: &str = "s3up-key";
/// Next to [`KEY_HEADER`]: the object's full-object CRC64NVME, base64 as S3 reports it.
pub const CHECKSUM_HEADER: &str = "s3up-checksum-crc64nvme";

/// What the tus endpoint needs beyond the app state.
#[derive(Debug, Clone)]
pub struct TusConfig {
    pub settings: TusSettings,
    /// Base URL for absolute `Location`s; else the request's `Host`.
    pub public_url: Option<String>,
    pub https: bool,
}

/// The tus routes, with their CORS and tus header layers.
pub fn router(state: &AppState) -> Router<AppState> {
    let base = state.tus.settings.base_path.clone();
    Router::new()
        .route(&base, post(create).options(options))
        .route(base.trim_end_matches('/'), post(create).options(options))
        .route(&format!("{base}{{id}}"), any(resource))
        .layer(middleware::from_fn(tus_headers))
        .layer(cors())
        .layer(middleware::from_fn_with_state(state.clone(), plain_options))
}

/// tower-http's CORS layer answers every OPTIONS as a preflight; a tus OPTIONS (no
/// `Access-Control-Request-Method`) is answered here, before it.
async fn plain_options(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if req.method() == Method::OPTIONS
        && !req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        return options(State(state)).await;
    }
    next.run(req).await
}

/// Browsers (tus-js-client, Uppy) call from other origins. Any origin may: the bearer token is
/// no ambient credential (no cookies), so a foreign page can do nothing its token can't.
fn cors() -> CorsLayer {
    let names = |list: &[&'static str]| {
        list.iter()
            .map(|n| HeaderName::from_static(n))
            .collect::<Vec<_>>()
    };
    let exposed = [
        "upload-offset",
        "location",
        "upload-length",
        "tus-version",
        "tus-resumable",
        "tus-max-size",
        "tus-extension",
        "upload-metadata",
        "upload-defer-length",
        "upload-concat",
        "upload-expires",
        "tus-checksum-algorithm",
        KEY_HEADER,
        CHECKSUM_HEADER,
    ];
    let mut allowed = names(&exposed);
    allowed.extend(names(&[
        "authorization",
        "content-type",
        "x-http-method-override",
        "upload-checksum",
        "x-requested-with",
    ]));
    CorsLayer::new()
        .allow_origin(AllowOrigin::any())
        .allow_methods([
            Method::POST,
            Method::GET,
            Method::HEAD,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers(allowed)
        .expose_headers(names(&exposed))
        .max_age(Duration::from_secs(86_400))
}

/// `Tus-Resumable: 1.0.0` is required on every request but OPTIONS (412 with `Tus-Version`
/// otherwise) and sent on every response but OPTIONS's.
async fn tus_headers(req: Request, next: Next) -> Response {
    let options = req.method() == Method::OPTIONS;
    let mut response = if options {
        next.run(req).await
    } else if req
        .headers()
        .get("tus-resumable")
        .map(HeaderValue::as_bytes)
        != Some(TUS_VERSION.as_bytes())
    {
        Error::PreconditionFailed("Tus-Resumable must be 1.0.0").into_response()
    } else {
        next.run(req).await
    };
    let h = response.headers_mut();
    if !options {
        h.insert("tus-resumable", HeaderValue::from_static(TUS_VERSION));
    }
    if response.status() == StatusCode::PRECONDITION_FAILED || options {
        response
            .headers_mut()
            .insert("tus-version", HeaderValue::from_static(TUS_VERSION));
    }
    response
}

/// `tus_max_size`, or less when the memory budget caps parts (10,000 of them must hold it).
fn max_size(state: &AppState) -> u64 {
    PartPlan::new(&state.uploader.settings, None)
        .map_or(0, |p| p.max_object())
        .min(state.tus.settings.max_size)
}

async fn options(State(state): State<AppState>) -> Response {
    let mut h = HeaderMap::new();
    h.insert("tus-version", HeaderValue::from_static(TUS_VERSION));
    h.insert(
        "tus-extension",
        HeaderValue::from_static(headers::EXTENSIONS),
    );
    h.insert("tus-max-size", HeaderValue::from(max_size(&state)));
    h.insert(
        "tus-checksum-algorithm",
        HeaderValue::from_static(checksum::ALGORITHMS),
    );
    (StatusCode::NO_CONTENT, h).into_response()
}

/// HEAD, PATCH, DELETE (and OPTIONS) on an upload URL; `X-HTTP-Method-Override` picks the
/// method, so it is dispatched here rather than by the router.
async fn resource(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response> {
    let method = headers::effective_method(req.method(), req.headers())?;
    if method == Method::OPTIONS {
        return Ok(options(State(state)).await);
    }
    let (mut parts, body) = req.into_parts();
    let principal = Principal::from_request_parts(&mut parts, &state).await?;
    if !headers::is_upload_id(&id) {
        return Err(Error::NotFound);
    }
    let ctx = ctx(&state, &principal.user).await?;
    match method {
        Method::HEAD | Method::GET => head(&state, &ctx, &id).await,
        Method::PATCH => patch(&state, &ctx, &id, &parts.headers, body).await,
        Method::DELETE => delete(&ctx, &id).await,
        _ => Err(Error::MethodNotAllowed),
    }
}

async fn ctx(state: &AppState, user: &UserSegment) -> Result<Ctx> {
    let bucket = state.users.for_user(user).await?;
    Ok(Ctx {
        uploader: state.uploader.clone(),
        store: Store::new(bucket, &state.keys, user),
        expiry_secs: state.tus.settings.expiry.as_secs().max(1),
        max_size: max_size(state),
    })
}

/// Loads an upload that is live: 404 unknown (or another user's), 410 expired.
async fn load_live(ctx: &Ctx, id: &str) -> Result<(UploadState, String)> {
    let (st, etag) = ctx.store.load(id).await?.ok_or(Error::NotFound)?;
    if st.expired() {
        return Err(Error::Gone("the upload expired"));
    }
    Ok((st, etag))
}

/// Waits (briefly) until no other request holds the upload's lease: a request whose client
/// went away finishes storing what it received within moments, and the next request must see
/// its result rather than race it.
async fn load_unleased(ctx: &Ctx, id: &str) -> Result<(UploadState, String)> {
    for attempt in 0..50u32 {
        let (st, etag) = load_live(ctx, id).await?;
        if st.foreign_lease(None).is_none() {
            return Ok((st, etag));
        }
        tokio::time::sleep(Duration::from_millis(50 + 10 * u64::from(attempt.min(20)))).await;
    }
    Err(Error::Locked(
        "another request is writing this upload; retry",
    ))
}

async fn head(state: &AppState, ctx: &Ctx, id: &str) -> Result<Response> {
    let (st, _) = load_live(ctx, id).await?;
    let mut h = HeaderMap::new();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    let base = &state.tus.settings.base_path;
    match &st.concat {
        Some(Concat::Final { partials }) => {
            let urls: Vec<String> = partials.iter().map(|p| format!("{base}{p}")).collect();
            h.insert(
                "upload-concat",
                value(&format!("final;{}", urls.join(" ")))?,
            );
            // Before it is assembled a final upload has no offset (the spec: SHOULD NOT).
            if st.completed.is_some() {
                h.insert("upload-offset", HeaderValue::from(st.offset));
            }
        }
        Some(Concat::Partial { .. }) => {
            h.insert("upload-concat", HeaderValue::from_static("partial"));
            h.insert("upload-offset", HeaderValue::from(st.offset));
        }
        None => {
            h.insert("upload-offset", HeaderValue::from(st.offset));
        }
    }
    match st.length {
        Some(len) => h.insert("upload-length", HeaderValue::from(len)),
        None => h.insert("upload-defer-length", HeaderValue::from_static("1")),
    };
    if let Some(m) = &st.metadata {
        h.insert("upload-metadata", value(m)?);
    }
    if st.completed.is_none() {
        h.insert("upload-expires", value(&headers::http_date(st.expires))?);
    }
    stored_object(&mut h, &st);
    Ok((StatusCode::OK, h).into_response())
}

/// Once an upload is complete: the object's key (percent-encoded, as keys may hold any UTF-8)
/// and full-object CRC64NVME (base64, as S3 reports it), so a client can say what it stored.
/// Not for partial uploads, whose objects are the proxy's own.
fn stored_object(h: &mut HeaderMap, st: &UploadState) {
    let Some(done) = &st.completed else {
        return;
    };
    if st.is_partial() {
        return;
    }
    let mut key = String::with_capacity(st.key.len());
    for &b in st.key.as_bytes() {
        if b.is_ascii_graphic() && b != b'%' {
            key.push(char::from(b));
        } else {
            key.push_str(&format!("%{b:02X}"));
        }
    }
    if let Ok(v) = HeaderValue::from_str(&key) {
        h.insert(KEY_HEADER, v);
    }
    if let Ok(v) = HeaderValue::from_str(&crate::upload::part::crc64_base64(done.crc64)) {
        h.insert(CHECKSUM_HEADER, v);
    }
}

fn value(s: &str) -> Result<HeaderValue> {
    HeaderValue::from_str(s).map_err(|_| Error::Internal("unrepresentable header value".into()))
}

async fn patch(
    state: &AppState,
    ctx: &Ctx,
    id: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response> {
    if !headers::is_offset_stream(headers) {
        return Err(Error::UnsupportedMediaType(
            "PATCH needs Content-Type: application/offset+octet-stream",
        ));
    }
    let offset = headers::upload_offset(headers)?;
    let expected = checksum::Expected::from_headers(headers)?;
    let length = headers::upload_length(headers)?;
    let (mut st, etag) = load_unleased(ctx, id).await?;
    if st.is_final() {
        return Err(Error::Forbidden("a final upload cannot be patched"));
    }
    if offset != st.offset {
        return Err(Error::OffsetMismatch(st.offset));
    }
    match (st.length, length) {
        (Some(a), Some(b)) if a != b => {
            return Err(Error::BadRequest("Upload-Length cannot change".into()));
        }
        (None, Some(len)) => {
            if len < st.offset {
                return Err(Error::BadRequest(
                    "Upload-Length is smaller than the upload's offset".into(),
                ));
            }
            if len > ctx.max_size {
                return Err(Error::TooLarge(format!(
                    "{len} bytes exceeds the maximum upload size of {} bytes",
                    ctx.max_size
                )));
            }
            st.length = Some(len);
        }
        _ => {}
    }
    if st.completed.is_some() {
        // Nothing left to write: an empty PATCH at the end is a no-op, anything else too long.
        if body.size_hint().exact() == Some(0) {
            return Ok(patched(&st));
        }
        return Err(Error::TooLarge("the upload is already complete".into()));
    }
    let (st, _) = write_detached(state, ctx, st, etag, body, expected, headers.clone()).await?;
    Ok(patched(&st))
}

fn patched(st: &UploadState) -> Response {
    let mut h = HeaderMap::new();
    h.insert("upload-offset", HeaderValue::from(st.offset));
    if let Ok(v) = value(&headers::http_date(st.expires)) {
        h.insert("upload-expires", v);
    }
    stored_object(&mut h, st);
    (StatusCode::NO_CONTENT, h).into_response()
}

/// Runs the write on its own task: if the client disconnects, the server drops this request's
/// future, but the write still stores what arrived and records it (the spec's "store as much of
/// the received data as possible"). Shutdown waits for it like for an abort.
async fn write_detached(
    state: &AppState,
    ctx: &Ctx,
    st: UploadState,
    etag: String,
    body: Body,
    expected: Option<checksum::Expected>,
    headers: HeaderMap,
) -> Result<(UploadState, String)> {
    let declared = body.size_hint().exact();
    let task_ctx = ctx.clone();
    let assemble = state.clone();
    let handle = state.uploader.cleanup.spawn(async move {
        let ctx = task_ctx;
        let done = patch::write(&ctx, st, etag, body, declared, expected, &headers).await?;
        if let (Some(_), Some(Concat::Partial { final_id: Some(f) })) =
            (&done.0.completed, &done.0.concat)
        {
            // The last partial of a waiting final upload: assemble it now.
            if let Err(e) = concat::assemble(&assemble, &ctx, f).await {
                tracing::warn!(error = %e, "could not assemble a final upload");
            }
        }
        Ok(done)
    });
    handle
        .await
        .map_err(|e| Error::Internal(format!("tus write task: {e}")))?
}

async fn delete(ctx: &Ctx, id: &str) -> Result<Response> {
    let (st, _) = ctx.store.load(id).await?.ok_or(Error::NotFound)?;
    reaper::remove(ctx, &st).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// POST to the base path: a new upload (creation, creation-defer-length, creation-with-upload,
/// concatenation).
async fn create(
    State(state): State<AppState>,
    principal: Principal,
    req: Request,
) -> Result<Response> {
    let (parts, body) = req.into_parts();
    let h = &parts.headers;
    let settings = &state.tus.settings;
    let concat = headers::upload_concat(h, &settings.base_path)?;
    let raw_meta = match h.get("upload-metadata") {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| Error::BadRequest("Upload-Metadata is not ASCII".into()))?
                .to_owned(),
        ),
        None => None,
    };
    let pairs = metadata::parse(raw_meta.as_deref().unwrap_or(""))?;
    let info = metadata::object_info(&pairs)?;
    let length = headers::upload_length(h)?;
    let deferred = headers::defer_length(h)?;
    let with_body = headers::is_offset_stream(h);
    let has_body = body.size_hint().exact() != Some(0);
    if has_body && !with_body {
        return Err(Error::UnsupportedMediaType(
            "a creation body needs Content-Type: application/offset+octet-stream",
        ));
    }
    let ctx = ctx(&state, &principal.user).await?;
    let id = uuid::Uuid::new_v4().simple().to_string();
    if let Some(ConcatHeader::Final(partials)) = concat {
        if length.is_some() || deferred {
            return Err(Error::BadRequest(
                "a final upload takes no Upload-Length".into(),
            ));
        }
        if has_body {
            return Err(Error::Forbidden("a final upload cannot take data"));
        }
        let st = concat::create_final(&state, &ctx, &principal.user, &id, partials, raw_meta, info)
            .await?;
        return Ok(created(&state, &parts, &st, None));
    }
    let length = match (length, deferred) {
        (Some(len), false) => Some(len),
        (None, true) => None,
        _ => {
            return Err(Error::BadRequest(
                "give either Upload-Length or Upload-Defer-Length: 1".into(),
            ));
        }
    };
    if let Some(len) = length
        && len > ctx.max_size
    {
        return Err(Error::TooLarge(format!(
            "{len} bytes exceeds the maximum upload size of {} bytes",
            ctx.max_size
        )));
    }
    let partial = matches!(concat, Some(ConcatHeader::Partial));
    let key = if partial {
        ctx.store.partial_object(&id)
    } else {
        object_key(&state, &ctx, &principal.user, &id, info.filename.as_deref()).await?
    };
    let mut st = UploadState::new(&id, &principal.user, key, length, info, ctx.expiry_secs);
    st.metadata = raw_meta;
    st.concat = partial.then_some(Concat::Partial { final_id: None });
    let etag = register(&state, &ctx, &principal.user, &st).await?;
    let expected = checksum::Expected::from_headers(h)?;
    let (st, wrote) = if with_body || length == Some(0) {
        match write_detached(
            &state,
            &ctx,
            st.clone(),
            etag,
            body,
            expected,
            parts.headers.clone(),
        )
        .await
        {
            Ok((st, _)) => (st, true),
            // The upload exists either way; its Location must reach the client.
            Err(e) => {
                tracing::info!(error = %e, "creation-with-upload stored no data");
                (st, true)
            }
        }
    } else {
        (st, false)
    };
    Ok(created(&state, &parts, &st, wrote.then_some(st.offset)))
}

/// Stores a new upload's state and files it in the expiry index.
async fn register(
    state: &AppState,
    ctx: &Ctx,
    user: &UserSegment,
    st: &UploadState,
) -> Result<String> {
    let etag = ctx.store.create(st).await?;
    reaper::index(state, user, st).await?;
    Ok(etag)
}

/// The object name: `filename` (sanitized) or the upload id. An existing object of that name
/// is kept: the new upload gets `name-<8 hex of the id>.ext` instead (what a person uploading
/// the same file twice expects: two files, nothing lost). Completion is conditional too, so an
/// object created with that name meanwhile is never overwritten (that upload then fails 409).
async fn object_key(
    state: &AppState,
    ctx: &Ctx,
    user: &UserSegment,
    id: &str,
    filename: Option<&str>,
) -> Result<String> {
    let name = filename.unwrap_or(id);
    let key = state.keys.object_key(user, name)?;
    if !ctx.store.bucket.exists(&key).await? {
        return Ok(key);
    }
    let suffix = &id[..8];
    let renamed = match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => format!("{stem}-{suffix}.{ext}"),
        _ => format!("{name}-{suffix}"),
    };
    Ok(state.keys.object_key(user, &renamed)?)
}

fn created(
    state: &AppState,
    req: &http::request::Parts,
    st: &UploadState,
    offset: Option<u64>,
) -> Response {
    let mut h = HeaderMap::new();
    if let Ok(v) = value(&location(state, req, &st.id)) {
        h.insert(header::LOCATION, v);
    }
    if let Some(offset) = offset {
        h.insert("upload-offset", HeaderValue::from(offset));
    }
    if st.completed.is_none()
        && let Ok(v) = value(&headers::http_date(st.expires))
    {
        h.insert("upload-expires", v);
    }
    stored_object(&mut h, st);
    (StatusCode::CREATED, h).into_response()
}

/// Absolute upload URL: `public_url` when configured (behind a load balancer), else the
/// request's own `Host`. Forwarded headers are not trusted: any client can set them.
fn location(state: &AppState, req: &http::request::Parts, id: &str) -> String {
    let base = &state.tus.settings.base_path;
    if let Some(url) = &state.tus.public_url {
        return format!("{url}{base}{id}");
    }
    let host = req
        .headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri.authority().map(http::uri::Authority::as_str))
        .filter(|h| {
            !h.is_empty()
                && h.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']')
                })
        })
        .unwrap_or("localhost");
    let scheme = if state.tus.https { "https" } else { "http" };
    format!("{scheme}://{host}{base}{id}")
}
