//! The pipeline: a request body becomes S3 parts on the fly. Three bounds keep memory flat: the
//! body is pulled only when a part buffer has been reserved from the global [`Budget`], at most
//! `parts_in_flight` parts of one upload are uploading at once, and a part holds only the body's
//! own frames. A drop guard aborts the multipart upload whenever the request does not complete.

pub mod budget;
pub mod part;
pub mod plan;

use std::sync::Arc;

use aws_sdk_s3::types::CompletedPart;
use bytes::Bytes;
use http_body::Body;
use http_body_util::BodyExt;
use serde::Serialize;
use tokio::task::JoinSet;
use tokio_util::task::TaskTracker;

use crate::config::UploadSettings;
use crate::error::{Error, Result};
use crate::metrics::{Metrics, UploadOutcome};
use crate::s3::{Bucket, ObjectMeta, is_precondition_failed};
use budget::{Budget, Reservation};
use part::{Part, PartBuf, crc64_base64, crc64_combine};
use plan::{PartPlan, too_large};

/// Where an upload goes.
#[derive(Debug, Clone)]
pub struct Target {
    pub key: String,
    pub meta: ObjectMeta,
    pub overwrite: bool,
}

/// The JSON answer for a stored object.
#[derive(Debug, Clone, Serialize)]
pub struct Uploaded {
    pub bucket: String,
    pub key: String,
    pub size: u64,
    pub etag: String,
    /// Full-object CRC64NVME, base64, as S3 reports it (`ChecksumCRC64NVME`).
    pub checksum: String,
    pub checksum_algorithm: &'static str,
}

#[derive(Clone, Debug)]
pub struct Uploader {
    pub budget: Budget,
    pub settings: UploadSettings,
    pub metrics: Arc<Metrics>,
    /// Abort requests spawned by drop guards; shutdown waits for them.
    pub cleanup: TaskTracker,
}

impl Uploader {
    /// Streams `body` to `target` in `bucket`. `declared` is the body's exact length when known.
    pub async fn upload<B>(
        &self,
        bucket: &Bucket,
        target: Target,
        body: B,
        declared: Option<u64>,
    ) -> Result<Uploaded>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let plan = PartPlan::new(&self.settings, declared)?;
        if !target.overwrite && bucket.exists(&target.key).await? {
            return Err(Error::Conflict(
                "object exists; add ?overwrite=true to replace it",
            ));
        }
        self.metrics.active_uploads.inc();
        let result = self
            .run(
                bucket,
                &plan,
                &target,
                BodyReader::new(body, declared, plan.max_object(), &self.metrics),
            )
            .await;
        self.metrics.active_uploads.dec();
        let outcome = if result.is_ok() {
            "completed"
        } else {
            "failed"
        };
        self.metrics
            .uploads
            .get_or_create(&UploadOutcome { outcome })
            .inc();
        result
    }

    async fn run<B>(
        &self,
        bucket: &Bucket,
        plan: &PartPlan,
        target: &Target,
        mut reader: BodyReader<'_, B>,
    ) -> Result<Uploaded>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let mut multipart: Option<Multipart> = None;
        let mut number = 1u32;
        loop {
            let size = plan
                .part_size(number)
                .ok_or_else(|| too_large(reader.total + 1, plan.max_object()))?;
            let want = reader.remaining().map_or(size, |r| size.min(r));
            let mut reservation = self.budget.reserve(want).await;
            let mut buf = self.budget.part_buf(want);
            let eof = reader.fill(&mut buf, want).await?;
            let part = buf.finish();
            reservation.shrink_to(part.len());

            if number == 1 && eof {
                // The whole body fit in one part: a single PutObject, no multipart round trips.
                let stored = bucket
                    .put_object(&target.key, part.clone(), &target.meta, target.overwrite)
                    .await;
                let stored = stored.map_err(conflict_if_exists)?;
                self.metrics.bytes_sent_s3.inc_by(part.len());
                return Ok(uploaded(
                    bucket,
                    target,
                    part.len(),
                    stored.etag,
                    part.crc64(),
                ));
            }
            let mp = match &mut multipart {
                Some(mp) => mp,
                None => multipart.insert(Multipart::create(self, bucket, target).await?),
            };
            if !part.is_empty() {
                mp.spawn(bucket, &self.metrics, number, part, reservation);
                mp.collect(self.settings.parts_in_flight).await?;
            }
            if eof {
                break;
            }
            number += 1;
        }
        let mp = multipart.expect("a multipart upload exists after the first full part");
        let (etag, crc) = mp.complete(bucket, target).await?;
        Ok(uploaded(bucket, target, reader.total, etag, crc))
    }
}

fn uploaded(bucket: &Bucket, target: &Target, size: u64, etag: String, crc: u64) -> Uploaded {
    Uploaded {
        bucket: bucket.name.to_string(),
        key: target.key.clone(),
        size,
        etag,
        checksum: crc64_base64(crc),
        checksum_algorithm: "CRC64NVME",
    }
}

fn conflict_if_exists(e: Error) -> Error {
    if is_precondition_failed(&e) {
        Error::Conflict("object exists; add ?overwrite=true to replace it")
    } else {
        e
    }
}

/// Pulls frames from the body into parts, splitting a frame at a part boundary (zero-copy).
pub(crate) struct BodyReader<'m, B> {
    body: B,
    carry: Option<Bytes>,
    /// Body bytes read so far (including a carried frame not yet placed in a part).
    pub(crate) total: u64,
    declared: Option<u64>,
    limit: u64,
    ended: bool,
    metrics: &'m Metrics,
}

impl<'m, B> BodyReader<'m, B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    pub(crate) fn new(body: B, declared: Option<u64>, limit: u64, metrics: &'m Metrics) -> Self {
        Self {
            body,
            carry: None,
            total: 0,
            declared,
            limit,
            ended: false,
            metrics,
        }
    }

    /// Declared bytes not yet placed in a part.
    pub(crate) fn remaining(&self) -> Option<u64> {
        let carried = self.carry.as_ref().map_or(0, |c| c.len() as u64);
        self.declared.map(|d| d - (self.total - carried))
    }

    /// Reads up to `want` more bytes into `buf`; true when the body has ended. On an error the
    /// bytes read so far stay in `buf`, so a caller can keep them (tus stores partial bodies).
    pub(crate) async fn fill(&mut self, buf: &mut PartBuf, want: u64) -> Result<bool> {
        let want = buf.len() + want;
        while buf.len() < want {
            let bytes = match self.carry.take() {
                Some(b) => b,
                None => match self.next_data().await? {
                    Some(b) => b,
                    None => break,
                },
            };
            let room = usize::try_from(want - buf.len()).unwrap_or(usize::MAX);
            if bytes.len() > room {
                buf.push(&bytes[..room]);
                self.carry = Some(bytes.slice(room..));
            } else {
                buf.push(&bytes);
            }
        }
        if self.declared.is_none() && self.carry.is_none() && !self.ended {
            // Unknown length and the part is full: look one frame ahead, so a body that ends
            // exactly here completes now (a single PutObject for the first part).
            self.carry = self.next_data().await?;
        }
        let eof = self.ended
            || (self.carry.is_none()
                && (self.body.is_end_stream() || self.declared == Some(self.total)));
        if eof
            && let Some(declared) = self.declared
            && self.total != declared
        {
            return Err(Error::Body(format!(
                "body ended after {} of {declared} declared bytes",
                self.total
            )));
        }
        Ok(eof)
    }

    async fn next_data(&mut self) -> Result<Option<Bytes>> {
        loop {
            let Some(frame) = self.body.frame().await else {
                self.ended = true;
                return Ok(None);
            };
            let frame = frame.map_err(|e| Error::Body(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            self.total += data.len() as u64;
            self.metrics.bytes_received.inc_by(data.len() as u64);
            if self.total > self.limit {
                return Err(too_large(self.total, self.limit));
            }
            if self.declared.is_some_and(|d| self.total > d) {
                return Err(Error::Body("body longer than its declared length".into()));
            }
            return Ok(Some(data));
        }
    }
}

/// An open multipart upload. Field order matters: in-flight parts are cancelled before the
/// guard sends the abort.
pub(crate) struct Multipart {
    in_flight: JoinSet<Result<(CompletedPart, u64, u64)>>,
    done: Vec<(CompletedPart, u64, u64)>,
    guard: AbortGuard,
}

impl Multipart {
    pub(crate) async fn create(up: &Uploader, bucket: &Bucket, target: &Target) -> Result<Self> {
        let upload_id = bucket.create_multipart(&target.key, &target.meta).await?;
        Ok(Self::open(up, bucket, &target.key, upload_id, true))
    }

    /// An upload that already exists (a tus upload continued by a later request). Its guard
    /// starts disarmed: the upload outlives a failed request.
    pub(crate) fn resume(up: &Uploader, bucket: &Bucket, key: &str, upload_id: String) -> Self {
        Self::open(up, bucket, key, upload_id, false)
    }

    fn open(up: &Uploader, bucket: &Bucket, key: &str, upload_id: String, armed: bool) -> Self {
        Self {
            in_flight: JoinSet::new(),
            done: Vec::new(),
            guard: AbortGuard {
                bucket: bucket.clone(),
                key: key.to_owned(),
                upload_id,
                armed,
                cleanup: up.cleanup.clone(),
                metrics: Arc::clone(&up.metrics),
            },
        }
    }

    pub(crate) fn upload_id(&self) -> &str {
        &self.guard.upload_id
    }

    /// From now on a failure leaves the upload in place (its id is recorded elsewhere).
    pub(crate) fn disarm(&mut self) {
        self.guard.armed = false;
    }

    /// Waits for every part in flight; returns the parts uploaded, in part-number order, as
    /// (part, length, CRC64NVME).
    pub(crate) async fn finish_parts(mut self) -> Result<Vec<(CompletedPart, u64, u64)>> {
        self.collect(1).await?;
        let mut done = std::mem::take(&mut self.done);
        done.sort_by_key(|(p, _, _)| p.part_number);
        Ok(done)
    }

    pub(crate) fn spawn(
        &mut self,
        bucket: &Bucket,
        metrics: &Arc<Metrics>,
        number: u32,
        part: Part,
        reservation: Reservation,
    ) {
        let bucket = bucket.clone();
        let metrics = Arc::clone(metrics);
        let (key, upload_id) = (self.guard.key.clone(), self.guard.upload_id.clone());
        self.in_flight.spawn(async move {
            let (len, crc) = (part.len(), part.crc64());
            let number = i32::try_from(number).expect("part numbers are at most 10,000");
            let done = bucket.upload_part(&key, &upload_id, number, part).await?;
            drop(reservation);
            metrics.parts_uploaded.inc();
            metrics.bytes_sent_s3.inc_by(len);
            Ok((done, len, crc))
        });
    }

    /// Waits until fewer than `limit` parts are in flight; surfaces the first failure.
    pub(crate) async fn collect(&mut self, limit: usize) -> Result<()> {
        while let Some(joined) = self.in_flight.try_join_next() {
            self.done
                .push(joined.map_err(|e| Error::Internal(e.to_string()))??);
        }
        while self.in_flight.len() >= limit {
            let joined = self
                .in_flight
                .join_next()
                .await
                .expect("in_flight is not empty");
            self.done
                .push(joined.map_err(|e| Error::Internal(e.to_string()))??);
        }
        Ok(())
    }

    /// Completes with the part list we kept (never one rebuilt from ListParts) and the
    /// full-object CRC64NVME combined from the parts', so S3 verifies the whole object.
    async fn complete(mut self, bucket: &Bucket, target: &Target) -> Result<(String, u64)> {
        self.collect(1).await?;
        self.done.sort_by_key(|(p, _, _)| p.part_number);
        let crc = self
            .done
            .iter()
            .fold(0, |acc, &(_, len, crc)| crc64_combine(acc, crc, len));
        let parts = self.done.into_iter().map(|(p, _, _)| p).collect();
        let guard = &mut self.guard;
        let stored = bucket
            .complete_multipart(
                &guard.key,
                &guard.upload_id,
                parts,
                &crc64_base64(crc),
                target.overwrite,
            )
            .await
            .map_err(conflict_if_exists)?;
        guard.armed = false;
        Ok((stored.etag, crc))
    }
}

/// Aborts the multipart upload unless it completed: on errors, client disconnects (the request
/// future is dropped) and shutdown alike.
struct AbortGuard {
    bucket: Bucket,
    key: String,
    upload_id: String,
    armed: bool,
    cleanup: TaskTracker,
    metrics: Arc<Metrics>,
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if tokio::runtime::Handle::try_current().is_err() {
            tracing::error!(upload_id = %self.upload_id, "no runtime left to abort a multipart upload");
            return;
        }
        let (bucket, key, upload_id) = (
            self.bucket.clone(),
            self.key.clone(),
            self.upload_id.clone(),
        );
        let metrics = Arc::clone(&self.metrics);
        self.cleanup.spawn(async move {
            match bucket.abort_multipart(&key, &upload_id).await {
                Ok(()) => {
                    metrics.multipart_aborted.inc();
                    tracing::info!(%upload_id, "aborted incomplete multipart upload");
                }
                Err(e) => {
                    tracing::warn!(%upload_id, error = %e, "could not abort multipart upload")
                }
            }
        });
    }
}
