//! A part in memory, plus its CRC64NVME. Bytes are copied once from the body's frames into
//! 1 MiB blocks that are recycled through a [`BlockPool`] instead of being freed: a part pins only
//! its own blocks (never the connection read buffers its frames came from), and the memory a part
//! used is the memory the next part uses, so RSS follows the budget instead of the allocator's
//! habits (freed pages kept in RSS, fragmentation). Parts below one block are exact allocations.
//! Parts are joined without copying (a tus tail before new body bytes).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use aws_smithy_types::body::SdkBody;
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use crc_fast::{CrcAlgorithm, Digest};
use http_body::{Frame, SizeHint};

/// Block size: large enough that a part is a few dozen blocks, small enough that rounding a part
/// up to whole blocks wastes little.
pub const BLOCK: usize = 1 << 20;

/// Free blocks, shared by all uploads of one app. It only ever holds blocks that parts used, so
/// it never exceeds the largest amount of part memory in use at once (bounded by the budget).
#[derive(Clone, Debug, Default)]
pub struct BlockPool(Arc<Mutex<Vec<Box<[u8]>>>>);

impl BlockPool {
    fn take(&self) -> Box<[u8]> {
        let recycled = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        recycled.unwrap_or_else(|| vec![0; BLOCK].into_boxed_slice())
    }

    fn put(&self, block: Box<[u8]>) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(block);
    }

    /// Free blocks held (for tests and metrics).
    pub fn idle_blocks(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

/// A filled block; dropping the last `Bytes` that refers to it returns it to the pool.
struct Block {
    buf: Option<Box<[u8]>>,
    len: usize,
    pool: BlockPool,
}

impl AsRef<[u8]> for Block {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_deref().map_or(&[], |b| &b[..self.len])
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.pool.put(buf);
        }
    }
}

pub struct PartBuf {
    done: Vec<Bytes>,
    current: Option<(Box<[u8]>, usize)>,
    small: Option<BytesMut>,
    pool: BlockPool,
    len: u64,
    crc: Digest,
}

impl PartBuf {
    /// A buffer for about `capacity` bytes: pooled blocks from one block up, an exact
    /// allocation below that.
    pub fn new(pool: &BlockPool, capacity: u64) -> Self {
        let small = usize::try_from(capacity)
            .ok()
            .filter(|&c| c < BLOCK)
            .map(BytesMut::with_capacity);
        Self {
            done: Vec::new(),
            current: None,
            small,
            pool: pool.clone(),
            len: 0,
            crc: Digest::new(CrcAlgorithm::Crc64Nvme),
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn push(&mut self, mut bytes: &[u8]) {
        self.crc.update(bytes);
        self.len += bytes.len() as u64;
        if let Some(small) = &mut self.small {
            return small.extend_from_slice(bytes);
        }
        while !bytes.is_empty() {
            let (block, used) = self.current.get_or_insert_with(|| (self.pool.take(), 0));
            let n = bytes.len().min(BLOCK - *used);
            block[*used..*used + n].copy_from_slice(&bytes[..n]);
            *used += n;
            bytes = &bytes[n..];
            if *used == BLOCK {
                self.seal();
            }
        }
    }

    fn seal(&mut self) {
        if let Some((buf, len)) = self.current.take() {
            self.done.push(Bytes::from_owner(Block {
                buf: Some(buf),
                len,
                pool: self.pool.clone(),
            }));
        }
    }

    pub fn finish(mut self) -> Part {
        self.seal();
        if let Some(small) = self.small.take() {
            self.done.push(small.freeze());
        }
        Part {
            chunks: std::mem::take(&mut self.done).into(),
            len: self.len,
            crc64: self.crc.finalize(),
        }
    }
}

impl Drop for PartBuf {
    fn drop(&mut self) {
        // An unfinished buffer (an error mid-part) still gives its block back.
        if let Some((buf, _)) = self.current.take() {
            self.pool.put(buf);
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

    /// The length as S3's `Content-Length`; parts are at most 5 GiB, so it always fits.
    pub fn content_length(&self) -> i64 {
        i64::try_from(self.len).expect("a part is at most 5 GiB")
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
    async fn fills_pooled_blocks_joins_without_copying_and_replays() {
        let pool = BlockPool::default();
        let mut buf = PartBuf::new(&pool, 3 * BLOCK as u64);
        let mut expected = Vec::new();
        for i in 0..300u32 {
            let frame = vec![(i % 251) as u8; 10_007];
            buf.push(&frame);
            expected.extend_from_slice(&frame);
        }
        let part = buf.finish();
        assert_eq!(part.len(), expected.len() as u64);
        assert_eq!(part.chunks.len(), 3, "2 full blocks and a partial one");
        assert_eq!(part.crc64(), crc(&expected));

        let mut tail = PartBuf::new(&pool, 5);
        tail.push(b"tail!");
        let joined = tail.finish().concat(&part);
        assert_eq!(
            joined.chunks[1].as_ptr(),
            part.chunks[0].as_ptr(),
            "joined without copying"
        );
        let whole = [&b"tail!"[..], &expected].concat();
        assert_eq!(joined.crc64(), crc(&whole));

        for (p, bytes) in [(&part, &expected), (&joined, &whole)] {
            for _ in 0..2 {
                let body = p.sdk_body();
                assert_eq!(body.content_length(), Some(bytes.len() as u64));
                let replay = body
                    .try_clone()
                    .unwrap()
                    .collect()
                    .await
                    .unwrap()
                    .to_bytes();
                assert_eq!(&replay[..], &bytes[..]);
            }
        }
        // Dropping the parts gives every block back, and the next part reuses them.
        let blocks: Vec<*const u8> = part.chunks.iter().map(|c| c.as_ptr()).collect();
        drop((part, joined));
        assert_eq!(pool.idle_blocks(), 3);
        let mut again = PartBuf::new(&pool, BLOCK as u64);
        again.push(&[1]);
        drop(again);
        assert_eq!(pool.idle_blocks(), 3);
        let mut reuse = PartBuf::new(&pool, BLOCK as u64);
        reuse.push(&[2; 10]);
        let reused = reuse.finish();
        assert_eq!(pool.idle_blocks(), 2);
        assert!(
            blocks.contains(&reused.chunks[0].as_ptr()),
            "a recycled block, not a new one"
        );
        drop(reused);
        assert_eq!(pool.idle_blocks(), 3);
    }

    #[test]
    fn combine_matches_whole() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 256) as u8).collect();
        let (a, b) = data.split_at(3_333);
        assert_eq!(crc64_combine(crc(a), crc(b), b.len() as u64), crc(&data));
        assert_eq!(crc(b""), 0);
    }
}
