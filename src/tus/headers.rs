//! Parsing and validating the tus request headers. Every malformed value is a 400 that names the
//! header; nothing is guessed.

use std::time::{Duration, SystemTime};

use http::HeaderMap;

use crate::error::{Error, Result};

pub const TUS_VERSION: &str = "1.0.0";
pub const OFFSET_OCTET_STREAM: &str = "application/offset+octet-stream";
pub const EXTENSIONS: &str = "creation,creation-with-upload,creation-defer-length,termination,expiration,checksum,checksum-trailer,concatenation,concatenation-unfinished";

fn text<'h>(headers: &'h HeaderMap, name: &'static str) -> Result<Option<&'h str>> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Error::BadRequest(format!("{name} given more than once")));
    }
    value
        .to_str()
        .map(|v| Some(v.trim()))
        .map_err(|_| Error::BadRequest(format!("{name} is not ASCII")))
}

/// A non-negative decimal integer, digits only (no sign, no spaces inside).
fn number(name: &'static str, value: &str) -> Result<u64> {
    if value.is_empty() || value.len() > 20 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::BadRequest(format!(
            "{name} must be a non-negative integer"
        )));
    }
    value
        .parse()
        .map_err(|_| Error::BadRequest(format!("{name} is out of range")))
}

pub fn upload_offset(headers: &HeaderMap) -> Result<u64> {
    let value = text(headers, "upload-offset")?
        .ok_or_else(|| Error::BadRequest("Upload-Offset is required".into()))?;
    number("Upload-Offset", value)
}

pub fn upload_length(headers: &HeaderMap) -> Result<Option<u64>> {
    text(headers, "upload-length")?
        .map(|v| number("Upload-Length", v))
        .transpose()
}

/// `Upload-Defer-Length: 1`; any other value is a 400.
pub fn defer_length(headers: &HeaderMap) -> Result<bool> {
    match text(headers, "upload-defer-length")? {
        None => Ok(false),
        Some("1") => Ok(true),
        Some(_) => Err(Error::BadRequest("Upload-Defer-Length must be 1".into())),
    }
}

pub fn is_offset_stream(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(OFFSET_OCTET_STREAM))
}

/// The method a client means: `X-HTTP-Method-Override` for clients that can only send POST.
pub fn effective_method(method: &http::Method, headers: &HeaderMap) -> Result<http::Method> {
    match text(headers, "x-http-method-override")? {
        None => Ok(method.clone()),
        Some(m) => http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
            .map_err(|_| Error::BadRequest("invalid X-HTTP-Method-Override".into())),
    }
}

/// `Upload-Concat`: `partial`, or `final;<url> <url> ...` (absolute URLs or paths).
#[derive(Debug, PartialEq, Eq)]
pub enum ConcatHeader {
    Partial,
    Final(Vec<String>),
}

/// At most this many partial uploads in one final upload (each becomes at least one part).
pub const MAX_PARTIALS: usize = 1000;

pub fn upload_concat(headers: &HeaderMap, base_path: &str) -> Result<Option<ConcatHeader>> {
    let Some(value) = text(headers, "upload-concat")? else {
        return Ok(None);
    };
    if value == "partial" {
        return Ok(Some(ConcatHeader::Partial));
    }
    let Some(urls) = value.strip_prefix("final;") else {
        return Err(Error::BadRequest(
            "Upload-Concat must be partial or final;<urls>".into(),
        ));
    };
    let ids = urls
        .split(' ')
        .filter(|u| !u.is_empty())
        .map(|u| upload_id_from_url(u, base_path))
        .collect::<Result<Vec<_>>>()?;
    if ids.is_empty() || ids.len() > MAX_PARTIALS {
        return Err(Error::BadRequest(format!(
            "Upload-Concat final needs 1 to {MAX_PARTIALS} upload URLs"
        )));
    }
    Ok(Some(ConcatHeader::Final(ids)))
}

/// The id in `https://host/files/<id>` or `/files/<id>`.
fn upload_id_from_url(url: &str, base_path: &str) -> Result<String> {
    let path = match url.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("", |i| &rest[i..]),
        None => url,
    };
    path.strip_prefix(base_path)
        .filter(|id| is_upload_id(id))
        .map(str::to_owned)
        .ok_or_else(|| Error::BadRequest(format!("not an upload URL of this server: {url}")))
}

/// Upload ids are 32 lowercase hex digits (a random UUID v4, simple form).
pub fn is_upload_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// RFC 9110 IMF-fixdate, as `Upload-Expires` wants.
pub fn http_date(unix: u64) -> String {
    httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(unix))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn numbers_are_strict() {
        assert_eq!(
            upload_offset(&headers(&[("upload-offset", "42")])).unwrap(),
            42
        );
        for bad in ["", "-1", "+1", "1.0", "0x10", "1 2", "99999999999999999999"] {
            assert!(
                upload_offset(&headers(&[("upload-offset", bad)])).is_err(),
                "{bad:?}"
            );
        }
        assert!(upload_offset(&headers(&[])).is_err());
        assert!(
            upload_offset(&headers(&[("upload-offset", "1"), ("upload-offset", "1")])).is_err()
        );
        assert_eq!(upload_length(&headers(&[])).unwrap(), None);
        assert!(defer_length(&headers(&[("upload-defer-length", "1")])).unwrap());
        assert!(defer_length(&headers(&[("upload-defer-length", "0")])).is_err());
    }

    #[test]
    fn concat_urls() {
        let a = "0123456789abcdef0123456789abcdef";
        let b = "fedcba9876543210fedcba9876543210";
        let h = headers(&[(
            "upload-concat",
            &format!("final;https://x.example/files/{a} /files/{b}"),
        )]);
        assert_eq!(
            upload_concat(&h, "/files/").unwrap(),
            Some(ConcatHeader::Final(vec![a.into(), b.into()]))
        );
        let partial = headers(&[("upload-concat", "partial")]);
        assert_eq!(
            upload_concat(&partial, "/files/").unwrap(),
            Some(ConcatHeader::Partial)
        );
        for bad in [
            "final;",
            "final;/other/abc",
            "final;/files/../x",
            "whole",
            "final;/files/ABC",
        ] {
            assert!(
                upload_concat(&headers(&[("upload-concat", bad)]), "/files/").is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn dates_and_methods() {
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        let h = headers(&[("x-http-method-override", "patch")]);
        assert_eq!(
            effective_method(&http::Method::POST, &h).unwrap(),
            http::Method::PATCH
        );
        assert!(is_offset_stream(&headers(&[(
            "content-type",
            "application/offset+octet-stream; charset=x"
        )])));
        assert!(!is_offset_stream(&headers(&[(
            "content-type",
            "text/plain"
        )])));
    }
}
