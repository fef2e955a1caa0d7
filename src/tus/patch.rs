//! Writing bytes into a tus upload: a PATCH body (or the body of a creation-with-upload POST)
//! streams through the core pipeline (budget reserved before reading, parts in flight while
//! reading, per-part CRC64NVME, retries from the buffered part).
//!
//! Bytes that do not fill a part are kept, never dropped: at the end of a body, or when the
//! client goes away, what is left becomes a tail object under the upload's directory and counts
//! in the offset. Tails are chunks, one per request, so a client sending 1 MiB requests writes
//! each byte once as a tail and once as a part (about 2x, not the 3x of rewriting one growing
//! tail); once tails and new bytes reach the minimum part size they are folded into one part.
//!
//! Part numbers are not conditional in S3: two requests uploading part 7 would overwrite each
//! other's bytes. So a request takes a lease in the state (a conditional write) before it
//! uploads its first part or writes the final object, and renews it while it runs; a request
//! only writing a tail (unique key) needs none, its commit is conditional anyway. Nothing is
//! recorded before the body is complete and its checksum verified: parts of a failed request
//! are simply not in the state and are overwritten (or aborted with the upload) later.

use std::collections::HashMap;

use bytes::Bytes;
use http::HeaderMap;
use http_body::Body;

use super::checksum::{self, Expected};
use super::state::{
    Completed, Lease, PartRecord, Store, TailRecord, UploadState, now_millis, now_secs,
};
use crate::config::{MIN_PART_SIZE, UploadSettings};
use crate::error::{Error, Result};
use crate::s3::ObjectMeta;
use crate::upload::budget::Reservation;
use crate::upload::part::{Part, crc64_base64, crc64_combine};
use crate::upload::plan::{PartPlan, too_large};
use crate::upload::{BodyReader, Multipart, Target, Uploader};

/// A lease outlives its holder's death by at most this long; holders renew at half of it.
pub const LEASE_TTL_MS: u64 = 60_000;

/// What a write needs besides the upload itself.
#[derive(Clone)]
pub struct Ctx {
    pub uploader: Uploader,
    pub store: Store,
    pub expiry_secs: u64,
    pub max_size: u64,
}

impl Ctx {
    pub fn target(&self, st: &UploadState) -> Target {
        Target {
            key: st.key.clone(),
            meta: meta(st),
            overwrite: false,
        }
    }
}

pub fn meta(st: &UploadState) -> ObjectMeta {
    ObjectMeta {
        content_type: st.content_type.clone(),
        user: (!st.user_metadata.is_empty()).then(|| {
            st.user_metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<HashMap<_, _>>()
        }),
    }
}

/// Part sizes for an upload: parts are at least `min(n)` (so 10,000 parts always hold the
/// upload), and a streaming body fills parts of `target(n)`.
struct Sizes {
    target: PartPlan,
    min: PartPlan,
}

impl Sizes {
    fn new(settings: &UploadSettings, st: &UploadState) -> Result<Self> {
        let smallest = UploadSettings {
            part_size: MIN_PART_SIZE,
            ..*settings
        };
        // A deferred length keeps the growing schedule even once the length is known: the
        // parts already stored followed it.
        let length = if st.deferred { None } else { st.length };
        Ok(Self {
            target: PartPlan::new(settings, length)?,
            min: PartPlan::new(&smallest, length)?,
        })
    }

    fn get(&self, number: u32, total: u64) -> Result<(u64, u64)> {
        match (self.target.part_size(number), self.min.part_size(number)) {
            (Some(t), Some(m)) => Ok((t, m.min(t))),
            _ => Err(too_large(total, self.target.max_object())),
        }
    }
}

struct Writer<'a> {
    ctx: &'a Ctx,
    st: UploadState,
    etag: String,
    lease: Option<String>,
    mp: Option<Multipart>,
    /// Tails not yet folded into a part (the state's, then this request's).
    tails: Vec<TailRecord>,
    /// Tails folded into parts: deleted once the state no longer names them.
    folded: Vec<String>,
    /// Tails this request wrote: deleted if it fails.
    written_tails: Vec<String>,
    next_part: u32,
    /// Bytes of this request placed in parts or tails.
    placed: u64,
    completed: Option<Completed>,
}

/// Writes `body` at the upload's offset and commits the new state. On success returns the
/// committed state and its ETag. A body that breaks off is still committed up to where it
/// broke (unless a checksum was given: unverifiable bytes are discarded).
pub async fn write<B>(
    ctx: &Ctx,
    st: UploadState,
    etag: String,
    body: B,
    declared: Option<u64>,
    expected: Option<Expected>,
    headers: &HeaderMap,
) -> Result<(UploadState, String)>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let room = st.length.unwrap_or(ctx.max_size).saturating_sub(st.offset);
    if declared.is_some_and(|d| d > room) {
        return Err(Error::TooLarge(format!(
            "the body is longer than the {room} bytes left in this upload"
        )));
    }
    let sizes = Sizes::new(&ctx.uploader.settings, &st)?;
    let (body, tap) = checksum::wrap(body, expected.as_ref(), headers);
    let mut reader = BodyReader::new(body, declared, room, &ctx.uploader.metrics);
    let mut w = Writer {
        ctx,
        tails: st.tails.clone(),
        next_part: st.parts.last().map_or(1, |p| p.number + 1),
        st,
        etag,
        lease: None,
        mp: None,
        folded: Vec::new(),
        written_tails: Vec::new(),
        placed: 0,
        completed: None,
    };
    let result = w.run(&sizes, &mut reader, &tap, expected.as_ref()).await;
    match result {
        Ok(broken) => {
            let saved = w.commit().await;
            match (saved, broken) {
                (Ok(saved), None) => Ok(saved),
                (Ok(_), Some(e)) | (Err(e), _) => {
                    if !matches!(e, Error::Body(_)) {
                        w.fail().await;
                    }
                    Err(e)
                }
            }
        }
        Err(e) => {
            w.fail().await;
            Err(e)
        }
    }
}

impl Writer<'_> {
    fn tail_bytes(&self) -> u64 {
        self.tails.iter().map(|t| t.size).sum()
    }

    /// Streams the body into parts and tails. `Ok(Some(e))`: the body broke, what arrived is
    /// placed and must be committed.
    async fn run<B>(
        &mut self,
        sizes: &Sizes,
        reader: &mut BodyReader<'_, B>,
        tap: &checksum::Tap,
        expected: Option<&Expected>,
    ) -> Result<Option<Error>>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let up = self.ctx.uploader.clone();
        loop {
            let stored = self.st.offset + self.placed;
            let (target, min) = sizes.get(self.next_part, stored + 1)?;
            let tails = self.tail_bytes();
            // Tails are always below the minimum part size, so this is at least 1.
            let mut want = target.saturating_sub(tails).max(1);
            if let Some(r) = reader.remaining() {
                want = want.min(r);
            }
            let mut reservation = up.budget.reserve(tails + want).await;
            let mut buf = up.budget.part_buf(want);
            let (eof, broken) = match reader.fill(&mut buf, want).await {
                Ok(eof) => (eof, None),
                Err(e @ Error::Body(_)) => (true, Some(e)),
                Err(e) => return Err(e),
            };
            let body = buf.finish();
            reservation.shrink_to(tails + body.len());
            if eof {
                if broken.is_some() {
                    if expected.is_some() {
                        // Cannot verify what never fully arrived: keep nothing.
                        return Err(broken.unwrap_or(Error::ChecksumMismatch));
                    }
                } else if !tap.verify(expected)? {
                    return Err(Error::ChecksumMismatch);
                }
            }
            let after = stored + body.len();
            let complete = eof && broken.is_none() && self.st.length == Some(after);
            self.placed += body.len();
            if complete {
                self.finish(body, reservation).await?;
                return Ok(None);
            }
            let total = tails + body.len();
            if total >= min {
                self.ensure_lease(true).await?;
                let part = self.with_tails(body).await?;
                let mp = self
                    .mp
                    .as_mut()
                    .expect("the lease opened the multipart upload");
                mp.spawn(
                    &self.ctx.store.bucket,
                    &up.metrics,
                    self.next_part,
                    part,
                    reservation,
                );
                mp.collect(up.settings.parts_in_flight).await?;
                self.next_part += 1;
            } else if !body.is_empty() {
                self.put_tail(stored, body).await?;
            }
            if eof {
                return Ok(broken);
            }
        }
    }

    /// The last bytes: one object when nothing was uploaded as a part yet, else the last part
    /// and CompleteMultipartUpload with the part list from the state.
    async fn finish(&mut self, body: Part, reservation: Reservation) -> Result<()> {
        let bucket = self.ctx.store.bucket.clone();
        let up = self.ctx.uploader.clone();
        if self.st.parts.is_empty() && self.next_part == 1 {
            self.ensure_lease(false).await?;
            let part = self.with_tails(body).await?;
            let target = self.ctx.target(&self.st);
            let stored = bucket
                .put_object(&target.key, part.clone(), &target.meta, false)
                .await
                .map_err(exists)?;
            drop(reservation);
            up.metrics.bytes_sent_s3.inc_by(part.len());
            self.completed = Some(Completed {
                etag: stored.etag,
                crc64: part.crc64(),
            });
            return Ok(());
        }
        self.ensure_lease(true).await?;
        let last = self.with_tails(body).await?;
        let mp = self
            .mp
            .as_mut()
            .expect("the lease opened the multipart upload");
        if !last.is_empty() {
            mp.spawn(&bucket, &up.metrics, self.next_part, last, reservation);
            self.next_part += 1;
        }
        let mp = self.mp.take().expect("checked above");
        let upload_id = mp.upload_id().to_owned();
        for (p, size, crc) in mp.finish_parts().await? {
            self.st.parts.push(record(&p, size, crc)?);
        }
        let crc = self
            .st
            .parts
            .iter()
            .fold(0, |acc, p| crc64_combine(acc, p.crc64, p.size));
        let parts = self
            .st
            .parts
            .iter()
            .map(|p| {
                aws_sdk_s3::types::CompletedPart::builder()
                    .part_number(i32::try_from(p.number).unwrap_or(i32::MAX))
                    .e_tag(&p.etag)
                    .checksum_crc64_nvme(crc64_base64(p.crc64))
                    .build()
            })
            .collect();
        let stored = bucket
            .complete_multipart(&self.st.key, &upload_id, parts, &crc64_base64(crc), false)
            .await
            .map_err(exists)?;
        self.completed = Some(Completed {
            etag: stored.etag,
            crc64: crc,
        });
        Ok(())
    }

    /// Prepends the tails (streamed from S3, checked against their recorded CRCs) to `body`.
    async fn with_tails(&mut self, body: Part) -> Result<Part> {
        if self.tails.is_empty() {
            return Ok(body);
        }
        let mut buf = self.ctx.uploader.budget.part_buf(self.tail_bytes());
        let mut want = 0;
        for tail in &self.tails {
            let mut stream = self.ctx.store.bucket.get_stream(&tail.key).await?;
            while let Some(chunk) = stream.next().await {
                buf.push(&chunk.map_err(|e| Error::S3Unreachable(e.to_string()))?);
            }
            want = crc64_combine(want, tail.crc64, tail.size);
        }
        let tails = buf.finish();
        if tails.crc64() != want || tails.len() != self.tail_bytes() {
            return Err(Error::Internal(format!(
                "tail objects of upload {} do not match their recorded checksums",
                self.st.id
            )));
        }
        self.folded.extend(self.tails.drain(..).map(|t| t.key));
        Ok(tails.concat(&body))
    }

    async fn put_tail(&mut self, offset: u64, body: Part) -> Result<()> {
        let key = self.ctx.store.tail_key(&self.st.id, offset);
        self.written_tails.push(key.clone());
        self.ctx
            .store
            .bucket
            .put_object(&key, body.clone(), &ObjectMeta::default(), false)
            .await?;
        self.ctx.uploader.metrics.bytes_sent_s3.inc_by(body.len());
        self.tails.push(TailRecord {
            key,
            size: body.len(),
            crc64: body.crc64(),
        });
        Ok(())
    }

    /// Takes (or renews) the lease; with `open`, also opens the multipart upload, whose id is
    /// recorded in the same write, so a crash never leaves an upload nobody knows about.
    async fn ensure_lease(&mut self, open: bool) -> Result<()> {
        let now = now_millis();
        let fresh = self.lease.is_some()
            && self
                .st
                .lease
                .as_ref()
                .is_some_and(|l| l.until > now + LEASE_TTL_MS / 2);
        if open
            && self.mp.is_none()
            && let Some(id) = &self.st.multipart
        {
            let up = &self.ctx.uploader;
            self.mp = Some(Multipart::resume(
                up,
                &self.ctx.store.bucket,
                &self.st.key,
                id.clone(),
            ));
        }
        let create = open && self.mp.is_none();
        if fresh && !create {
            return Ok(());
        }
        if create {
            let target = self.ctx.target(&self.st);
            self.mp =
                Some(Multipart::create(&self.ctx.uploader, &self.ctx.store.bucket, &target).await?);
        }
        let token = self
            .lease
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        // The committed offset, parts and tails stay as they are: only the lease changes.
        let mut next = self.st.clone();
        next.lease = Some(Lease {
            token: token.clone(),
            until: now + LEASE_TTL_MS,
        });
        if let Some(mp) = &self.mp {
            next.multipart = Some(mp.upload_id().to_owned());
        }
        self.etag = self.ctx.store.save(&next, &self.etag).await?;
        if let Some(mp) = &mut self.mp {
            mp.disarm();
        }
        self.st.lease = next.lease;
        self.st.multipart = next.multipart;
        self.lease = Some(token);
        Ok(())
    }

    /// Records what this request stored: one conditional write.
    async fn commit(&mut self) -> Result<(UploadState, String)> {
        if let Some(mp) = self.mp.take() {
            for (p, size, crc) in mp.finish_parts().await? {
                self.st.parts.push(record(&p, size, crc)?);
            }
        }
        let mut next = self.st.clone();
        next.offset += self.placed;
        next.tails = self.tails.clone();
        next.lease = None;
        next.expires = now_secs() + self.ctx.expiry_secs;
        let mut stale = None;
        if let Some(done) = self.completed.take() {
            next.completed = Some(done);
            // A multipart upload opened by an earlier request that failed before its first
            // part was recorded, when the object then went up in one piece.
            if next.parts.is_empty() {
                stale = next.multipart.take();
            }
            next.multipart = None;
            next.parts.clear();
        }
        let etag = self.ctx.store.save(&next, &self.etag).await?;
        self.lease = None;
        self.written_tails.clear();
        if let Some(upload_id) = stale {
            let (bucket, key) = (self.ctx.store.bucket.clone(), next.key.clone());
            self.ctx.uploader.cleanup.spawn(async move {
                let _ = bucket.abort_multipart(&key, &upload_id).await;
            });
        }
        let folded = std::mem::take(&mut self.folded);
        if !folded.is_empty() {
            let bucket = self.ctx.store.bucket.clone();
            self.ctx.uploader.cleanup.spawn(async move {
                if let Err(e) = bucket.delete_keys(&folded).await {
                    tracing::warn!(error = %e, "could not delete folded tail objects; the reaper will");
                }
            });
        }
        self.st = next.clone();
        Ok((next, etag))
    }

    /// Undoes what a failed request left: its own tails, and its lease.
    async fn fail(&mut self) {
        self.mp = None;
        let tails = std::mem::take(&mut self.written_tails);
        if !tails.is_empty()
            && let Err(e) = self.ctx.store.bucket.delete_keys(&tails).await
        {
            tracing::warn!(error = %e, "could not delete tails of a failed request");
        }
        if self.lease.take().is_some() {
            let mut next = self.st.clone();
            next.lease = None;
            if let Err(e) = self.ctx.store.save(&next, &self.etag).await {
                tracing::info!(error = %e, "could not release a tus lease; it expires by itself");
            }
        }
    }
}

fn record(p: &aws_sdk_s3::types::CompletedPart, size: u64, crc64: u64) -> Result<PartRecord> {
    Ok(PartRecord {
        number: p
            .part_number
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| Error::Internal("part without a number".into()))?,
        etag: p.e_tag.clone().unwrap_or_default(),
        size,
        crc64,
    })
}

/// A conditional write of the user's object lost: someone created that name meanwhile.
pub fn exists(e: Error) -> Error {
    if crate::s3::is_precondition_failed(&e) {
        Error::Conflict("an object with this upload's name was created meanwhile")
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{GIB, MAX_OBJECT_SIZE, MAX_PARTS, MIB};

    fn state(length: Option<u64>, deferred: bool) -> UploadState {
        serde_json::from_value(serde_json::json!({
            "id": "x", "owner": "u", "key": "k", "length": length, "deferred": deferred,
            "offset": 0, "metadata": null, "content_type": null, "created": 0, "expires": 0,
            "multipart": null, "concat": null, "completed": null, "lease": null
        }))
        .unwrap()
    }

    #[test]
    fn parts_of_at_least_the_minimum_always_fit_in_10000() {
        let settings = UploadSettings {
            memory_budget: 1024 * GIB,
            part_size: 16 * MIB,
            parts_in_flight: 4,
            max_object_size: MAX_OBJECT_SIZE,
        };
        for len in [0, 1, 50 * MIB, 100 * GIB, 1024 * GIB, MAX_OBJECT_SIZE] {
            let sizes = Sizes::new(&settings, &state(Some(len), false)).unwrap();
            let (target, min) = sizes.get(1, 0).unwrap();
            assert!(min >= MIN_PART_SIZE && min <= target);
            // Every part but the last has at least `min` bytes.
            assert!(len.saturating_sub(1) / min < MAX_PARTS, "{len}");
        }
        // Small requests fold at 5 MiB, not at the configured 16 MiB part size.
        let sizes = Sizes::new(&settings, &state(Some(50 * MIB), false)).unwrap();
        assert_eq!(sizes.get(1, 0).unwrap(), (16 * MIB, 5 * MIB));
        // Deferred: the minimum grows like the streaming schedule, so 10,000 parts still hold
        // ~48 TB even when every request is small.
        let sizes = Sizes::new(&settings, &state(None, true)).unwrap();
        let capacity: u64 = (1..=10_000).map(|n| sizes.get(n, 0).unwrap().1).sum();
        assert!(capacity >= 47 * 1024 * GIB, "{capacity}");
        assert!(sizes.get(10_001, 0).is_err());
    }
}
