//! One error type and its one mapping to HTTP. Clients get a status, a stable code and a short
//! message; internals and secrets stay in the logs (5xx at warn, 4xx at debug).

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;

use crate::auth::AuthError;
use crate::keys::KeyError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unauthorized: {0}")]
    Unauthorized(#[from] AuthError),
    #[error("forbidden: {0}")]
    Forbidden(&'static str),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("not found")]
    NotFound,
    #[error("conflict: {0}")]
    Conflict(&'static str),
    #[error("payload too large: {0}")]
    TooLarge(String),
    /// The client went away or broke its own framing; nobody may be left to read the answer.
    #[error("request body: {0}")]
    Body(String),
    /// S3 answered with an error after our retries.
    #[error("s3 {code}: {message}")]
    S3 {
        status: StatusCode,
        code: String,
        message: String,
        request_id: Option<String>,
    },
    /// S3 could not be reached (connect, timeout) after our retries.
    #[error("s3 unreachable: {0}")]
    S3Unreachable(String),
    #[error("unavailable: {0}")]
    Unavailable(&'static str),
    // tus (src/tus): the protocol's own status codes.
    /// The upload expired (410).
    #[error("gone: {0}")]
    Gone(&'static str),
    /// Unsupported or missing `Tus-Resumable` (412; the tus layer adds `Tus-Version`).
    #[error("precondition failed: {0}")]
    PreconditionFailed(&'static str),
    #[error("unsupported media type: {0}")]
    UnsupportedMediaType(&'static str),
    /// The client's offset is not the upload's (409 with the current `Upload-Offset`).
    #[error("offset mismatch: the upload is at {0}")]
    OffsetMismatch(u64),
    /// `Upload-Checksum` did not match the body (tus: 460); nothing was stored.
    #[error("checksum mismatch")]
    ChecksumMismatch,
    /// Another request is writing this resource right now (423).
    #[error("locked: {0}")]
    Locked(&'static str),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("internal: {0}")]
    Internal(String),
    /// No per-user credentials could be had from STS (503 when worth retrying, else 502).
    #[error("sts: {0}")]
    Sts(#[from] crate::credentials::StsError),
    /// A feature this deployment has not configured.
    #[error("not configured: {0}")]
    NotConfigured(&'static str),
}

/// Seconds a client should wait after a 503 from STS throttling or an STS outage.
const STS_RETRY_AFTER: &str = "5";

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// tus's "460 Checksum Mismatch".
pub const CHECKSUM_MISMATCH: StatusCode = match StatusCode::from_u16(460) {
    Ok(s) => s,
    Err(_) => panic!("460 is a valid status code"),
};

impl From<KeyError> for Error {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::BadUser => Error::Forbidden("user id cannot be mapped to a key prefix"),
            KeyError::BadName(_) => Error::BadRequest(e.to_string()),
        }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    s3_request_id: Option<&'a str>,
}

impl Error {
    pub fn status(&self) -> StatusCode {
        match self {
            // Our identity provider is down: not the client's fault.
            Error::Unauthorized(AuthError::JwksUnavailable) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::BadRequest(_) | Error::Body(_) => StatusCode::BAD_REQUEST,
            Error::NotFound => StatusCode::NOT_FOUND,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::S3 { status, .. } => *status,
            Error::S3Unreachable(_) | Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Error::Sts(e) if e.transient => StatusCode::SERVICE_UNAVAILABLE,
            Error::Sts(_) => StatusCode::BAD_GATEWAY,
            Error::NotConfigured(_) => StatusCode::NOT_IMPLEMENTED,
            Error::Gone(_) => StatusCode::GONE,
            Error::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            Error::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::OffsetMismatch(_) => StatusCode::CONFLICT,
            Error::ChecksumMismatch => CHECKSUM_MISMATCH,
            Error::Locked(_) => StatusCode::LOCKED,
            Error::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    fn code(&self) -> &str {
        match self {
            Error::Unauthorized(AuthError::JwksUnavailable) => "unavailable",
            Error::Unauthorized(_) => "invalid_token",
            Error::Forbidden(_) => "forbidden",
            Error::BadRequest(_) => "bad_request",
            Error::Body(_) => "bad_body",
            Error::NotFound => "not_found",
            Error::Conflict(_) => "conflict",
            Error::TooLarge(_) => "too_large",
            Error::S3 { .. } => "s3_error",
            Error::S3Unreachable(_) => "s3_unreachable",
            Error::Unavailable(_) => "unavailable",
            Error::Internal(_) => "internal",
            Error::Sts(_) => "sts_error",
            Error::NotConfigured(_) => "not_configured",
            Error::Gone(_) => "gone",
            Error::PreconditionFailed(_) => "precondition_failed",
            Error::UnsupportedMediaType(_) => "unsupported_media_type",
            Error::OffsetMismatch(_) => "offset_mismatch",
            Error::ChecksumMismatch => "checksum_mismatch",
            Error::Locked(_) => "locked",
            Error::MethodNotAllowed => "method_not_allowed",
        }
    }

    /// What the client may read: never internals of a 500.
    fn public_message(&self) -> String {
        match self {
            Error::Unauthorized(e) => e.description().to_owned(),
            Error::S3 { code, message, .. } => format!("S3 refused the request: {code}: {message}"),
            Error::S3Unreachable(_) => "S3 is not reachable; try again later".to_owned(),
            Error::Internal(_) => "internal error".to_owned(),
            // STS messages name roles and accounts: the code is enough for the client.
            Error::Sts(e) => format!("could not obtain scoped S3 credentials: {}", e.code),
            other => other.to_string(),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error = %self, "request failed");
        } else {
            tracing::debug!(error = %self, "request refused");
        }
        let s3_request_id = match &self {
            Error::S3 { request_id, .. } => request_id.as_deref(),
            _ => None,
        };
        let body = Body {
            error: self.code(),
            message: self.public_message(),
            s3_request_id,
        };
        let mut response = (status, Json(body)).into_response();
        if matches!(&self, Error::Sts(e) if e.transient) {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(STS_RETRY_AFTER),
            );
        }
        if let Error::OffsetMismatch(offset) = &self {
            response
                .headers_mut()
                .insert("upload-offset", HeaderValue::from(*offset));
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
        }
        response
    }
}
