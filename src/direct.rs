//! Direct mode: the bytes go from the client straight to S3, behind the same JWT auth.
//!
//! - `GET /sts` (and Companion's `GET /s3/sts`): the caller's scoped STS credentials, for
//!   clients that sign S3 requests themselves (Uppy's `getTemporarySecurityCredentials`).
//! - Companion-compatible presigning under `/s3/`, so Uppy's aws-s3 plugin works unchanged with
//!   `endpoint` pointing at us.
//!
//! Every key is created by us under the caller's prefix (`{uuid}-{filename}`, as Companion
//! does), and every key a client sends back is checked to be under that prefix before any S3
//! call. URLs are presigned with the caller's scoped credentials and never outlive them. When
//! `api_key` is configured, these routes also require `x-api-key` (else `403
//! {"message":"Forbidden"}`, as API Gateway answers).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use aws_sdk_s3::presigning::{PresignedRequest, PresigningConfig};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_smithy_types::date_time::Format;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use http::{StatusCode, header};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::api::{AppState, Principal};
use crate::error::{Error, Result};
use crate::keys::{UserSegment, check_name};
use crate::s3::{Bucket, s3_error};

/// Longest life of a presigned URL (Companion's default is 800 s). Uppy asks for each part's
/// URL just before sending it, so minutes are plenty; it is also capped by the credentials.
pub const PRESIGN_TTL: Duration = Duration::from_secs(15 * 60);
/// Bytes of the client's file name kept in the key.
const MAX_FILENAME_BYTES: usize = 200;
/// S3 allows 2 KiB of user metadata per object.
const MAX_METADATA_BYTES: usize = 2048;
/// Part URLs signed by one batch request.
const MAX_BATCH: usize = 1000;
/// ListParts pages of 1,000 parts: 10,000 parts at most.
const MAX_LIST_PAGES: usize = 10;

const NO_ROLE: &str = "no upload role (S3UP_STS_ROLE_ARN) is configured, so there are no scoped \
     credentials to hand out; use the presigned routes under /s3/ or PUT /uploads";

pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/sts", get(sts))
        .route("/s3/sts", get(sts))
        .route("/s3/params", get(params))
        .route("/s3/multipart", post(create))
        .route("/s3/multipart/{upload_id}", get(list_parts).delete(abort))
        .route("/s3/multipart/{upload_id}/batch", get(sign_batch))
        .route("/s3/multipart/{upload_id}/complete", post(complete))
        .route("/s3/multipart/{upload_id}/{part_number}", get(sign_part))
        .route_layer(middleware::from_fn_with_state(state, require_api_key))
}

/// Metric labels for these routes (never the raw path).
pub fn endpoint_label(route: &str) -> &'static str {
    match route {
        "/sts" => "sts",
        "/s3/sts" => "s3_sts",
        "/s3/params" => "s3_params",
        "/s3/multipart" => "s3_create_multipart",
        "/s3/multipart/{upload_id}" => "s3_multipart",
        "/s3/multipart/{upload_id}/batch" => "s3_sign_parts",
        "/s3/multipart/{upload_id}/complete" => "s3_complete_multipart",
        "/s3/multipart/{upload_id}/{part_number}" => "s3_sign_part",
        _ => "other",
    }
}

async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(expected) = &state.api_key {
        let given = req.headers().get("x-api-key").map(|v| v.as_bytes());
        if !given.is_some_and(|g| constant_time_eq(g, expected.0.as_bytes())) {
            return (
                StatusCode::FORBIDDEN,
                Json(json!({ "message": "Forbidden" })),
            )
                .into_response();
        }
    }
    next.run(req).await
}

/// Compares without an early exit, so timing does not tell how much of a key was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn sts(State(state): State<AppState>, principal: Principal) -> Result<Response> {
    let credentials = state
        .users
        .credentials(&principal.user)
        .await?
        .ok_or(Error::NotConfigured(NO_ROLE))?;
    let expiration = credentials
        .expiry()
        .map(|t| aws_smithy_types::DateTime::from(t).fmt(Format::DateTime))
        .transpose()
        .map_err(|e| Error::Internal(e.to_string()))?;
    let body = json!({
        "credentials": {
            "AccessKeyId": credentials.access_key_id(),
            "SecretAccessKey": credentials.secret_access_key(),
            "SessionToken": credentials.session_token(),
            "Expiration": expiration,
        },
        "bucket": &*state.bucket.name,
        "region": region(&state),
        "prefix": state.keys.user_prefix(&principal.user),
    });
    // Credentials: never stored by a browser or shared cache.
    Ok(([(header::CACHE_CONTROL, "private, no-store")], Json(body)).into_response())
}

fn region(state: &AppState) -> String {
    state
        .bucket
        .client
        .config()
        .region()
        .map_or_else(|| "us-east-1".to_owned(), ToString::to_string)
}

/// `GET /s3/params?filename&type&metadata[k]=v`: a presigned PUT for a whole file.
async fn params(
    State(state): State<AppState>,
    principal: Principal,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Json<Value>> {
    let mut filename = None;
    let mut content_type = None;
    let mut metadata = Vec::new();
    for (name, value) in query {
        match name.as_str() {
            "filename" => filename = Some(value),
            "type" => content_type = Some(value),
            _ => {
                if let Some(k) = name
                    .strip_prefix("metadata[")
                    .and_then(|k| k.strip_suffix(']'))
                {
                    metadata.push((k.to_owned(), value));
                }
            }
        }
    }
    let filename = filename.ok_or_else(|| Error::BadRequest("filename is required".into()))?;
    let key = new_key(&state, &principal.user, &filename)?;
    let metadata = s3_metadata(metadata)?;
    let (bucket, presigning, ttl) = signing(&state, &principal.user).await?;
    let presigned = bucket
        .client
        .put_object()
        .bucket(&*bucket.name)
        .key(&key)
        .set_content_type(content_type.filter(|t| !t.is_empty()))
        .set_metadata(metadata)
        .presigned(presigning)
        .await
        .map_err(s3_error)?;
    // The signed headers (content type, metadata) must be sent exactly so.
    let headers: BTreeMap<&str, &str> = presigned.headers().collect();
    Ok(Json(json!({
        "method": "PUT",
        "url": presigned.uri(),
        "fields": {},
        "headers": headers,
        "expires": ttl.as_secs(),
        "key": key,
        "bucket": &*bucket.name,
    })))
}

#[derive(Deserialize)]
struct CreateBody {
    filename: String,
    #[serde(rename = "type")]
    content_type: Option<String>,
    #[serde(default)]
    metadata: Map<String, Value>,
}

/// `POST /s3/multipart {filename, type, metadata}` → `{key, uploadId, bucket}`.
async fn create(
    State(state): State<AppState>,
    principal: Principal,
    body: std::result::Result<Json<CreateBody>, JsonRejection>,
) -> Result<Json<Value>> {
    let Json(body) = body.map_err(|e| Error::BadRequest(e.body_text()))?;
    let key = new_key(&state, &principal.user, &body.filename)?;
    let metadata = s3_metadata(body.metadata.into_iter().filter_map(|(k, v)| match v {
        Value::String(s) => Some((k, s)),
        Value::Number(n) => Some((k, n.to_string())),
        Value::Bool(b) => Some((k, b.to_string())),
        _ => None,
    }))?;
    let bucket = state.users.for_user(&principal.user).await?;
    let out = bucket
        .client
        .create_multipart_upload()
        .bucket(&*bucket.name)
        .key(&key)
        .set_content_type(body.content_type.filter(|t| !t.is_empty()))
        .set_metadata(metadata)
        .send()
        .await
        .map_err(s3_error)?;
    let upload_id = out
        .upload_id
        .ok_or_else(|| Error::Internal("CreateMultipartUpload returned no upload id".into()))?;
    Ok(Json(json!({
        "key": key,
        "uploadId": upload_id,
        "bucket": &*bucket.name,
    })))
}

#[derive(Deserialize)]
struct KeyQuery {
    key: Option<String>,
    #[serde(rename = "partNumbers")]
    part_numbers: Option<String>,
}

/// `GET /s3/multipart/{uploadId}?key` → `[{PartNumber, ETag, Size}]`.
async fn list_parts(
    State(state): State<AppState>,
    principal: Principal,
    Path(upload_id): Path<String>,
    Query(q): Query<KeyQuery>,
) -> Result<Json<Vec<Value>>> {
    let key = owned_key(&state, &principal.user, q.key)?;
    check_upload_id(&upload_id)?;
    let bucket = state.users.for_user(&principal.user).await?;
    let mut parts = Vec::new();
    let mut marker = None;
    for _ in 0..MAX_LIST_PAGES {
        let out = bucket
            .client
            .list_parts()
            .bucket(&*bucket.name)
            .key(&key)
            .upload_id(&upload_id)
            .set_part_number_marker(marker.take())
            .send()
            .await
            .map_err(s3_error)
            .map_err(no_such_upload)?;
        parts.extend(out.parts().iter().cloned());
        match (out.is_truncated, out.next_part_number_marker) {
            (Some(true), Some(next)) => marker = Some(next),
            _ => break,
        }
    }
    // S3 lists in order; not every S3-compatible store does, and Uppy resumes by number.
    parts.sort_by_key(|p| p.part_number);
    let parts = parts
        .into_iter()
        .map(|p| json!({ "PartNumber": p.part_number, "ETag": p.e_tag, "Size": p.size }))
        .collect();
    Ok(Json(parts))
}

/// `GET /s3/multipart/{uploadId}/{partNumber}?key` → `{url, expires}`.
async fn sign_part(
    State(state): State<AppState>,
    principal: Principal,
    Path((upload_id, part_number)): Path<(String, String)>,
    Query(q): Query<KeyQuery>,
) -> Result<Json<Value>> {
    let key = owned_key(&state, &principal.user, q.key)?;
    check_upload_id(&upload_id)?;
    let number = part_number_of(&part_number)?;
    let (bucket, presigning, ttl) = signing(&state, &principal.user).await?;
    let url = presign_part(&bucket, &key, &upload_id, number, presigning).await?;
    Ok(Json(json!({ "url": url.uri(), "expires": ttl.as_secs() })))
}

/// `GET /s3/multipart/{uploadId}/batch?key&partNumbers=1,2` → `{presignedUrls: {"1": url}}`.
async fn sign_batch(
    State(state): State<AppState>,
    principal: Principal,
    Path(upload_id): Path<String>,
    Query(q): Query<KeyQuery>,
) -> Result<Json<Value>> {
    let key = owned_key(&state, &principal.user, q.key)?;
    check_upload_id(&upload_id)?;
    let list = q.part_numbers.ok_or_else(|| {
        Error::BadRequest("partNumbers is required, e.g. ?partNumbers=1,2".into())
    })?;
    let numbers = list
        .split(',')
        .map(part_number_of)
        .collect::<Result<Vec<_>>>()?;
    if numbers.len() > MAX_BATCH {
        return Err(Error::BadRequest(format!(
            "at most {MAX_BATCH} part numbers per request"
        )));
    }
    let (bucket, presigning, _) = signing(&state, &principal.user).await?;
    let mut urls = Map::new();
    for number in numbers {
        let url = presign_part(&bucket, &key, &upload_id, number, presigning.clone()).await?;
        urls.insert(number.to_string(), url.uri().into());
    }
    Ok(Json(json!({ "presignedUrls": urls })))
}

#[derive(Deserialize)]
struct CompleteBody {
    parts: Vec<PartIn>,
}

#[derive(Deserialize)]
struct PartIn {
    #[serde(rename = "PartNumber")]
    part_number: i32,
    #[serde(rename = "ETag")]
    etag: String,
}

/// `POST /s3/multipart/{uploadId}/complete?key {parts}` → `{location, key, bucket}`.
async fn complete(
    State(state): State<AppState>,
    principal: Principal,
    Path(upload_id): Path<String>,
    Query(q): Query<KeyQuery>,
    body: std::result::Result<Json<CompleteBody>, JsonRejection>,
) -> Result<Json<Value>> {
    let key = owned_key(&state, &principal.user, q.key)?;
    check_upload_id(&upload_id)?;
    let Json(body) = body.map_err(|e| Error::BadRequest(e.body_text()))?;
    if body.parts.is_empty() || body.parts.len() > 10_000 {
        return Err(Error::BadRequest(
            "parts must list 1 to 10,000 parts".into(),
        ));
    }
    let parts = body
        .parts
        .into_iter()
        .map(|p| {
            CompletedPart::builder()
                .part_number(p.part_number)
                .e_tag(p.etag)
                .build()
        })
        .collect();
    let bucket = state.users.for_user(&principal.user).await?;
    let out = bucket
        .client
        .complete_multipart_upload()
        .bucket(&*bucket.name)
        .key(&key)
        .upload_id(&upload_id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build(),
        )
        .send()
        .await
        .map_err(s3_error)
        .map_err(no_such_upload)?;
    Ok(Json(json!({
        "location": out.location,
        "key": key,
        "bucket": &*bucket.name,
    })))
}

/// `DELETE /s3/multipart/{uploadId}?key` → `{}`.
async fn abort(
    State(state): State<AppState>,
    principal: Principal,
    Path(upload_id): Path<String>,
    Query(q): Query<KeyQuery>,
) -> Result<Json<Value>> {
    let key = owned_key(&state, &principal.user, q.key)?;
    check_upload_id(&upload_id)?;
    let bucket = state.users.for_user(&principal.user).await?;
    bucket
        .abort_multipart(&key, &upload_id)
        .await
        .map_err(no_such_upload)?;
    Ok(Json(json!({})))
}

/// The user's bucket, and a presigning window that ends before its credentials do.
async fn signing(
    state: &AppState,
    user: &UserSegment,
) -> Result<(Bucket, PresigningConfig, Duration)> {
    let bucket = state.users.for_user(user).await?;
    let ttl = state.users.presign_window(user, PRESIGN_TTL).await?;
    let config = PresigningConfig::builder()
        .start_time(state.users.now())
        .expires_in(ttl)
        .build()
        .map_err(|e| Error::Internal(e.to_string()))?;
    Ok((bucket, config, ttl))
}

async fn presign_part(
    bucket: &Bucket,
    key: &str,
    upload_id: &str,
    number: i32,
    presigning: PresigningConfig,
) -> Result<PresignedRequest> {
    bucket
        .client
        .upload_part()
        .bucket(&*bucket.name)
        .key(key)
        .upload_id(upload_id)
        .part_number(number)
        .presigned(presigning)
        .await
        .map_err(s3_error)
}

/// A key the client sent back: refused unless it lies under the caller's own prefix (and
/// outside the proxy's reserved state), before any S3 request.
fn owned_key(state: &AppState, user: &UserSegment, key: Option<String>) -> Result<String> {
    let key = key.ok_or_else(|| {
        Error::BadRequest(
            "the object key must be passed as a query parameter, e.g. ?key=...".into(),
        )
    })?;
    let prefix = state.keys.user_prefix(user);
    let Some(name) = key.strip_prefix(&prefix) else {
        return Err(Error::Forbidden("the key is not under your prefix"));
    };
    check_name(name).map_err(|_| Error::Forbidden("the key is not one of your uploads"))?;
    Ok(key)
}

fn check_upload_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 1024 || id.chars().any(char::is_control) {
        return Err(Error::BadRequest("invalid upload id".into()));
    }
    Ok(())
}

fn part_number_of(text: &str) -> Result<i32> {
    text.trim()
        .parse::<i32>()
        .ok()
        .filter(|n| (1..=10_000).contains(n))
        .ok_or_else(|| Error::BadRequest("part numbers are integers from 1 to 10,000".into()))
}

/// S3 answers an upload id that is not this key's (another user's, or finished) with
/// `NoSuchUpload`: for the client that is a 404, not a gateway failure.
fn no_such_upload(e: Error) -> Error {
    match &e {
        Error::S3 { code, .. } if code == "NoSuchUpload" => Error::NotFound,
        _ => e,
    }
}

/// `{prefix}{uuid}-{filename}`: a fresh key per upload, as Companion makes them, so uploads
/// never overwrite each other.
fn new_key(state: &AppState, user: &UserSegment, filename: &str) -> Result<String> {
    let name = format!("{}-{}", uuid::Uuid::new_v4(), sanitize_filename(filename));
    Ok(state.keys.object_key(user, &name)?)
}

/// The last path component of the client's file name, without control characters, trimmed and
/// cut to [`MAX_FILENAME_BYTES`]; `file` when nothing is left.
pub fn sanitize_filename(raw: &str) -> String {
    let base = raw.rsplit(['/', '\\']).next().unwrap_or_default();
    let cleaned: String = base.chars().filter(|c| !c.is_control()).collect();
    let mut out = String::new();
    for c in cleaned.trim().chars() {
        if out.len() + c.len_utf8() > MAX_FILENAME_BYTES {
            break;
        }
        out.push(c);
    }
    match out.trim_end() {
        "" | "." | ".." => "file".to_owned(),
        s => s.to_owned(),
    }
}

/// Client metadata as S3 user metadata: keys of `[A-Za-z0-9_-]` (others are dropped, as S3
/// could not carry them in a header name), lowercased; values that are not plain printable
/// ASCII are RFC 2047 encoded, as Companion does. More than 2 KiB in all is refused.
fn s3_metadata(
    pairs: impl IntoIterator<Item = (String, String)>,
) -> Result<Option<HashMap<String, String>>> {
    let mut out = HashMap::new();
    let mut total = 0;
    for (k, v) in pairs {
        let key_ok = !k.is_empty()
            && k.len() <= 128
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !key_ok {
            continue;
        }
        let plain = v.bytes().all(|b| (0x20..0x7f).contains(&b)) && v.trim() == v;
        let v = if plain {
            v
        } else {
            format!(
                "=?UTF-8?B?{}?=",
                base64::engine::general_purpose::STANDARD.encode(v)
            )
        };
        total += k.len() + v.len();
        out.insert(k.to_ascii_lowercase(), v);
    }
    if total > MAX_METADATA_BYTES {
        return Err(Error::BadRequest("metadata is larger than 2 KiB".into()));
    }
    Ok((!out.is_empty()).then_some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filenames_are_sanitized() {
        assert_eq!(sanitize_filename("clip.mp4"), "clip.mp4");
        assert_eq!(sanitize_filename("../../bob/x.bin"), "x.bin");
        assert_eq!(sanitize_filename("C:\\Users\\a\\b.txt"), "b.txt");
        assert_eq!(sanitize_filename("a\u{0}b\nc"), "abc");
        assert_eq!(sanitize_filename("  spaced name.txt "), "spaced name.txt");
        for empty in ["", "/", "..", ".", "dir/", "\u{7}"] {
            assert_eq!(sanitize_filename(empty), "file", "{empty:?}");
        }
        let long = sanitize_filename(&"é".repeat(300));
        assert!(long.len() <= MAX_FILENAME_BYTES && long.chars().all(|c| c == 'é'));
        assert_eq!(sanitize_filename("ünï.txt"), "ünï.txt");
    }

    #[test]
    fn metadata_is_made_header_safe() {
        let m = s3_metadata([
            ("Name".to_owned(), "clip.mp4".to_owned()),
            ("title".to_owned(), "Grüße".to_owned()),
            ("bad key".to_owned(), "x".to_owned()),
            ("x\r\nInjected".to_owned(), "y".to_owned()),
            ("pad".to_owned(), " x".to_owned()),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m["name"], "clip.mp4");
        assert_eq!(m["title"], "=?UTF-8?B?R3LDvMOfZQ==?=");
        assert!(m["pad"].starts_with("=?UTF-8?B?"));
        assert!(s3_metadata([("k".to_owned(), "v".repeat(3000))]).is_err());
        assert_eq!(s3_metadata([]).unwrap(), None);
    }

    #[test]
    fn part_numbers_and_upload_ids() {
        assert_eq!(part_number_of("1").unwrap(), 1);
        assert_eq!(part_number_of("10000").unwrap(), 10_000);
        for bad in ["0", "10001", "-1", "x", ""] {
            assert!(part_number_of(bad).is_err(), "{bad}");
        }
        assert!(check_upload_id("abc").is_ok());
        assert!(check_upload_id("").is_err());
        assert!(check_upload_id("a\nb").is_err());
    }

    #[test]
    fn api_keys_compare_exactly() {
        assert!(constant_time_eq(b"abcdef", b"abcdef"));
        assert!(!constant_time_eq(b"abcdef", b"abcdeg"));
        assert!(!constant_time_eq(b"abc", b"abcdef"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
