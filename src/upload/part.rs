//! A part in memory: the body's own `Bytes` frames, kept without copying, plus their CRC64NVME.
//! Frames smaller than `COALESCE_BELOW` are copied into a shared block instead, so a stream of
//! tiny chunks cannot pin many mostly-empty read buffers beyond what the budget counts.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use aws_smithy_types::body::SdkBody;
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use crc_fast::{CrcAlgorithm, Digest};
use http_body::{Frame, SizeHint};

const COALESCE_BELOW: usize = 4 * 1024;
const COALESCE_BLOCK: usize = 64 * 1024;

pub struct PartBuf {
    chunks: Vec<Bytes>,
    small: BytesMut,
    len: u64,
    crc: Digest,
}

impl Default for PartBuf {
    fn default() -> Self {
        Self {
            chunks: Vec::new(),
            small: BytesMut::new(),
            len: 0,
            crc: Digest::new(CrcAlgorithm::Crc64Nvme),
        }
    }
}

impl PartBuf {
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn push(&mut self, bytes: Bytes) {
        self.crc.update(&bytes);
        self.len += bytes.len() as u64;
        if bytes.len() < COALESCE_BELOW {
            if self.small.capacity() - self.small.len() < bytes.len() {
                self.flush_small();
                self.small.reserve(COALESCE_BLOCK);
            }
            self.small.extend_from_slice(&bytes);
        } else {
            self.flush_small();
            self.chunks.push(bytes);
        }
    }

    fn flush_small(&mut self) {
        if !self.small.is_empty() {
            self.chunks.push(self.small.split().freeze());
        }
    }

    pub fn finish(mut self) -> Part {
        self.flush_small();
        Part {
            chunks: self.chunks.into(),
            len: self.len,
            crc64: self.crc.finalize(),
        }
    }
}

/// An immutable part: cheap to clone, so a retry resends the same buffers.
#[derive(Clone, Debug)]
pub struct Part {
    chunks: Arc<[Bytes]>,
    len: u64,
    crc64: u64,
}

impl Part {
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn crc64(&self) -> u64 {
        self.crc64
    }

    pub fn crc64_base64(&self) -> String {
        crc64_base64(self.crc64)
    }

    /// `self` followed by `other`, without copying bytes (a tus tail before new body bytes).
    pub fn concat(&self, other: &Part) -> Part {
        Part {
            chunks: self
                .chunks
                .iter()
                .chain(other.chunks.iter())
                .cloned()
                .collect(),
            len: self.len + other.len,
            crc64: crc64_combine(self.crc64, other.crc64, other.len),
        }
    }

    /// A body the SDK can replay on retry without copying the bytes.
    pub fn sdk_body(&self) -> SdkBody {
        let part = self.clone();
        SdkBody::retryable(move || {
            SdkBody::from_body_1_x(ChainBody {
                chunks: part.chunks.clone(),
                next: 0,
                remaining: part.len,
            })
        })
    }
}

/// S3's wire form of a CRC64NVME: base64 of the big-endian bytes.
pub fn crc64_base64(crc: u64) -> String {
    base64::engine::general_purpose::STANDARD.encode(crc.to_be_bytes())
}

/// The CRC64NVME of `a` followed by `b`, from their CRCs.
pub fn crc64_combine(a: u64, b: u64, b_len: u64) -> u64 {
    crc_fast::checksum_combine(CrcAlgorithm::Crc64Nvme, a, b, b_len)
}

struct ChainBody {
    chunks: Arc<[Bytes]>,
    next: usize,
    remaining: u64,
}

impl http_body::Body for ChainBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let Some(chunk) = self.chunks.get(self.next).cloned() else {
            return Poll::Ready(None);
        };
        self.next += 1;
        self.remaining -= chunk.len() as u64;
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn crc(data: &[u8]) -> u64 {
        let mut d = Digest::new(CrcAlgorithm::Crc64Nvme);
        d.update(data);
        d.finalize()
    }

    #[tokio::test]
    async fn keeps_large_frames_coalesces_small_ones_and_replays() {
        let mut buf = PartBuf::default();
        let big = Bytes::from(vec![7u8; 100_000]);
        buf.push(big.clone());
        for i in 0..1000u32 {
            buf.push(Bytes::from(vec![(i % 251) as u8; 3]));
        }
        let part = buf.finish();
        assert_eq!(part.len(), 103_000);
        // The big frame is the same allocation, not a copy; 1000 tiny frames became one block.
        assert_eq!(part.chunks[0].as_ptr(), big.as_ptr());
        assert_eq!(part.chunks.len(), 2);

        let mut expected = big.to_vec();
        for i in 0..1000u32 {
            expected.extend_from_slice(&[(i % 251) as u8; 3]);
        }
        assert_eq!(part.crc64(), crc(&expected));
        for _ in 0..2 {
            let body = part.sdk_body();
            assert_eq!(body.content_length(), Some(103_000));
            let replay = body
                .try_clone()
                .unwrap()
                .collect()
                .await
                .unwrap()
                .to_bytes();
            assert_eq!(&replay[..], &expected[..]);
        }
    }

    #[test]
    fn combine_matches_whole() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 256) as u8).collect();
        let (a, b) = data.split_at(3_333);
        assert_eq!(crc64_combine(crc(a), crc(b), b.len() as u64), crc(&data));
        assert_eq!(crc(b""), 0);
    }
}
