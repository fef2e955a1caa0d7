//! The checksum and checksum-trailer extensions: a body wrapper hashes data frames as they pass
//! (no copy) and keeps the trailers, so the digest is checked once the body has ended.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use base64::Engine as _;
use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use md5::Digest as _;

use crate::error::{Error, Result};

pub const ALGORITHMS: &str = "sha1,md5,sha256,crc32";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Sha1,
    Md5,
    Sha256,
    Crc32,
}

/// A parsed `Upload-Checksum: <algorithm> <base64 digest>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub algorithm: Algorithm,
    pub digest: Vec<u8>,
}

impl Expected {
    /// Unknown algorithm or a malformed value: 400.
    pub fn parse(value: &str) -> Result<Self> {
        let bad = |m: &str| Error::BadRequest(format!("Upload-Checksum: {m}"));
        let (name, digest) = value
            .trim()
            .split_once(' ')
            .ok_or_else(|| bad("expected '<algorithm> <base64>'"))?;
        let algorithm = match name.to_ascii_lowercase().as_str() {
            "sha1" => Algorithm::Sha1,
            "md5" => Algorithm::Md5,
            "sha256" => Algorithm::Sha256,
            "crc32" => Algorithm::Crc32,
            _ => return Err(bad("unsupported algorithm")),
        };
        let digest = base64::engine::general_purpose::STANDARD
            .decode(digest.trim())
            .map_err(|_| bad("digest is not base64"))?;
        let want = match algorithm {
            Algorithm::Sha1 => 20,
            Algorithm::Md5 => 16,
            Algorithm::Sha256 => 32,
            Algorithm::Crc32 => 4,
        };
        if digest.len() != want {
            return Err(bad("digest has the wrong length for its algorithm"));
        }
        Ok(Self { algorithm, digest })
    }

    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Self>> {
        match headers.get("upload-checksum") {
            None => Ok(None),
            Some(v) => Self::parse(
                v.to_str()
                    .map_err(|_| Error::BadRequest("Upload-Checksum is not ASCII".into()))?,
            )
            .map(Some),
        }
    }
}

enum Hasher {
    Sha1(sha1::Sha1),
    Md5(md5::Md5),
    Sha256(sha2::Sha256),
    Crc32(crc32fast::Hasher),
}

impl Hasher {
    fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha1 => Self::Sha1(sha1::Sha1::new()),
            Algorithm::Md5 => Self::Md5(md5::Md5::new()),
            Algorithm::Sha256 => Self::Sha256(sha2::Sha256::new()),
            Algorithm::Crc32 => Self::Crc32(crc32fast::Hasher::new()),
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Self::Sha1(h) => h.update(data),
            Self::Md5(h) => h.update(data),
            Self::Sha256(h) => h.update(data),
            Self::Crc32(h) => h.update(data),
        }
    }

    fn finish(self) -> Vec<u8> {
        match self {
            Self::Sha1(h) => h.finalize().to_vec(),
            Self::Md5(h) => h.finalize().to_vec(),
            Self::Sha256(h) => h.finalize().to_vec(),
            Self::Crc32(h) => h.finalize().to_be_bytes().to_vec(),
        }
    }
}

/// What the wrapper saw: every hasher asked for, and the trailers.
#[derive(Default)]
struct Seen {
    hashers: Vec<(Algorithm, Hasher)>,
    trailers: Option<HeaderMap>,
}

/// Reads the outcome once the body is done.
#[derive(Clone, Default)]
pub struct Tap(Arc<Mutex<Seen>>);

impl Tap {
    /// Checks the header checksum, or the trailer one (checksum-trailer); `Ok(false)` on a
    /// mismatch. A trailer checksum with an unknown algorithm is a 400, as a header one is.
    pub fn verify(&self, header: Option<&Expected>) -> Result<bool> {
        let mut seen = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let expected = match header {
            Some(e) => e.clone(),
            None => match seen.trailers.as_ref().map(Expected::from_headers) {
                Some(Ok(Some(e))) => e,
                Some(Err(e)) => return Err(e),
                _ => return Ok(true),
            },
        };
        let Some(i) = seen
            .hashers
            .iter()
            .position(|(a, _)| *a == expected.algorithm)
        else {
            // A trailer naming an algorithm we did not hash for: every declared algorithm is
            // hashed (see `wrap`), so only an undeclared trailer lands here.
            return Err(Error::BadRequest(
                "Upload-Checksum trailer was not announced in the Trailer header".into(),
            ));
        };
        let (_, hasher) = seen.hashers.swap_remove(i);
        Ok(hasher.finish() == expected.digest)
    }
}

/// Hashes `body` for the header checksum, or, when the client announced an `Upload-Checksum`
/// trailer, for every supported algorithm (its name arrives only after the last byte).
pub fn wrap<B>(body: B, header: Option<&Expected>, headers: &HeaderMap) -> (ChecksumBody<B>, Tap) {
    let trailer_announced = headers
        .get_all(http::header::TRAILER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|n| n.trim().eq_ignore_ascii_case("upload-checksum"));
    let algorithms: &[Algorithm] = match header {
        Some(e) => &[e.algorithm][..],
        None if trailer_announced => &[
            Algorithm::Sha1,
            Algorithm::Md5,
            Algorithm::Sha256,
            Algorithm::Crc32,
        ],
        None => &[],
    };
    let tap = Tap(Arc::new(Mutex::new(Seen {
        hashers: algorithms.iter().map(|&a| (a, Hasher::new(a))).collect(),
        trailers: None,
    })));
    (
        ChecksumBody {
            inner: body,
            tap: tap.clone(),
        },
        tap,
    )
}

pub struct ChecksumBody<B> {
    inner: B,
    tap: Tap,
}

impl<B> Body for ChecksumBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            let mut seen = self.tap.0.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(data) = frame.data_ref() {
                for (_, h) in &mut seen.hashers {
                    h.update(data);
                }
            } else if let Some(trailers) = frame.trailers_ref() {
                seen.trailers = Some(trailers.clone());
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    fn b64(b: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(b)
    }

    #[tokio::test]
    async fn header_checksums_for_every_algorithm() {
        let data = b"hello tus";
        let digests = [
            ("sha1", sha1::Sha1::digest(data).to_vec()),
            ("md5", md5::Md5::digest(data).to_vec()),
            ("sha256", sha2::Sha256::digest(data).to_vec()),
            ("crc32", crc32fast::hash(data).to_be_bytes().to_vec()),
        ];
        for (name, digest) in digests {
            for (good, value) in [
                (true, digest.clone()),
                (false, {
                    let mut d = digest.clone();
                    d[0] ^= 1;
                    d
                }),
            ] {
                let expected = Expected::parse(&format!("{name} {}", b64(&value))).unwrap();
                let (body, tap) = wrap(
                    Full::new(Bytes::from_static(data)),
                    Some(&expected),
                    &HeaderMap::new(),
                );
                body.collect().await.unwrap();
                assert_eq!(tap.verify(Some(&expected)).unwrap(), good, "{name}");
            }
        }
        assert!(Expected::parse("sha512 AAAA").is_err());
        assert!(Expected::parse("sha1 !!").is_err());
        assert!(Expected::parse("sha1 AAAA").is_err());
    }

    #[tokio::test]
    async fn trailer_checksum() {
        let data = Bytes::from_static(b"trailing");
        let mut trailers = HeaderMap::new();
        trailers.insert(
            "upload-checksum",
            format!("sha256 {}", b64(&sha2::Sha256::digest(&data)))
                .parse()
                .unwrap(),
        );
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
            vec![Ok(Frame::data(data.clone())), Ok(Frame::trailers(trailers))];
        let mut headers = HeaderMap::new();
        headers.insert(http::header::TRAILER, "Upload-Checksum".parse().unwrap());
        let (body, tap) = wrap(
            StreamBody::new(futures_util::stream::iter(frames)),
            None,
            &headers,
        );
        body.collect().await.unwrap();
        assert!(tap.verify(None).unwrap());
    }
}
