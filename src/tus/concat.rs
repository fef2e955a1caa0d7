//! The concatenation extensions. Partial uploads complete into hidden objects in their own
//! directory; a final upload is assembled from them once all are complete (at once, or when
//! the last partial completes: concatenation-unfinished). Assembly is server-side: S3
//! UploadPartCopy when every partial but the last is at least 5 MiB (no byte passes through
//! us), otherwise the partials are streamed from S3 through the core pipeline.

use std::collections::VecDeque;

use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use http_body::Frame;

use super::patch::Ctx;
use super::state::{Completed, Concat, UploadState, now_secs};
use super::{AppState, metadata, object_key};
use crate::config::{MAX_PART_SIZE, MAX_PARTS, MIN_PART_SIZE};
use crate::error::{Error, Result};
use crate::keys::UserSegment;
use crate::s3::Bucket;
use crate::upload::Multipart;
use crate::upload::part::{crc64_base64, crc64_combine};

pub async fn create_final(
    state: &AppState,
    ctx: &Ctx,
    user: &UserSegment,
    id: &str,
    partials: Vec<String>,
    raw_meta: Option<String>,
    info: metadata::ObjectInfo,
) -> Result<UploadState> {
    let mut length = Some(0u64);
    for pid in &partials {
        let (p, _) = ctx.store.load(pid).await?.ok_or_else(|| {
            Error::BadRequest(format!("Upload-Concat names an unknown upload {pid}"))
        })?;
        if !p.is_partial() {
            return Err(Error::BadRequest(format!(
                "Upload-Concat names {pid}, which is not a partial upload"
            )));
        }
        if p.expired() {
            return Err(Error::Gone("a partial upload expired"));
        }
        length = length.zip(p.length).map(|(a, b)| a + b);
    }
    if let Some(len) = length
        && len > ctx.max_size
    {
        return Err(Error::TooLarge(format!(
            "{len} bytes exceeds the maximum upload size of {} bytes",
            ctx.max_size
        )));
    }
    let key = object_key(state, ctx, user, id, info.filename.as_deref()).await?;
    let mut st = UploadState::new(id, user, key, length, info, ctx.expiry_secs);
    // A final upload's length is whatever its partials add up to, never deferred by itself.
    st.deferred = false;
    st.metadata = raw_meta;
    st.concat = Some(Concat::Final {
        partials: partials.clone(),
    });
    super::register(state, ctx, user, &st).await?;
    // Tell unfinished partials who waits for them (respecting a writer's lease, so a partial
    // completing right now is not overwritten).
    for pid in &partials {
        for attempt in 0..5 {
            let (mut p, etag) = super::load_unleased(ctx, pid).await?;
            if p.completed.is_some() {
                break;
            }
            p.concat = Some(Concat::Partial {
                final_id: Some(id.to_owned()),
            });
            match ctx.store.save(&p, &etag).await {
                Ok(_) => break,
                Err(Error::Conflict(_)) if attempt < 4 => continue,
                Err(e) => return Err(e),
            }
        }
    }
    assemble(state, ctx, id).await
}

/// Assembles final upload `id` if all its partials are complete; returns its state either way.
pub async fn assemble(state: &AppState, ctx: &Ctx, id: &str) -> Result<UploadState> {
    let (mut st, etag) = ctx.store.load(id).await?.ok_or(Error::NotFound)?;
    let Some(Concat::Final { partials }) = st.concat.clone() else {
        return Err(Error::Internal("not a final upload".into()));
    };
    if st.completed.is_some() {
        return Ok(st);
    }
    let mut sources = Vec::with_capacity(partials.len());
    for pid in &partials {
        let Some((p, _)) = ctx.store.load(pid).await? else {
            return Err(Error::Gone("a partial upload of this final upload is gone"));
        };
        let (Some(done), Some(len)) = (&p.completed, p.length) else {
            return Ok(st);
        };
        sources.push((p.key.clone(), len, done.crc64));
    }
    let total: u64 = sources.iter().map(|s| s.1).sum();
    let crc = sources
        .iter()
        .fold(0, |acc, &(_, len, crc)| crc64_combine(acc, crc, len));
    let target = ctx.target(&st);
    let bucket = &ctx.store.bucket;
    let pieces: u64 = sources
        .iter()
        .map(|s| s.1.div_ceil(MAX_PART_SIZE).max(1))
        .sum();
    let copyable = total > 0
        && pieces <= MAX_PARTS
        && sources[..sources.len() - 1]
            .iter()
            .all(|s| s.1 >= MIN_PART_SIZE);
    let etag_out = if copyable {
        copy_parts(ctx, bucket, &target, &sources, crc).await?
    } else {
        let body = concatenated(
            bucket.clone(),
            sources.iter().map(|s| s.0.clone()).collect(),
        );
        state
            .uploader
            .upload(bucket, target, body, Some(total))
            .await?
            .etag
    };
    st.completed = Some(Completed {
        etag: etag_out,
        crc64: crc,
    });
    st.offset = total;
    st.length = Some(total);
    st.expires = now_secs() + ctx.expiry_secs;
    ctx.store.save(&st, &etag).await?;
    // The partials served their purpose (the spec allows removing them now).
    for pid in &partials {
        if let Ok(Some((p, _))) = ctx.store.load(pid).await
            && let Err(e) = ctx.store.remove_all(&p.id).await
        {
            tracing::warn!(error = %e, "could not remove a partial upload; the reaper will");
        }
    }
    Ok(st)
}

/// UploadPartCopy of every partial (split at 5 GiB), then completion with the combined CRC.
async fn copy_parts(
    ctx: &Ctx,
    bucket: &Bucket,
    target: &crate::upload::Target,
    sources: &[(String, u64, u64)],
    crc: u64,
) -> Result<String> {
    let mut mp = Multipart::create(&ctx.uploader, bucket, target).await?;
    let upload_id = mp.upload_id().to_owned();
    let mut parts = Vec::new();
    let mut number = 1i32;
    for (key, len, _) in sources {
        let pieces = len.div_ceil(MAX_PART_SIZE).max(1);
        let size = len.div_ceil(pieces);
        let mut start = 0;
        while start < *len {
            let end = (start + size).min(*len) - 1;
            let range = (pieces > 1).then_some((start, end));
            parts.push(
                bucket
                    .upload_part_copy(&target.key, &upload_id, number, key, range)
                    .await?,
            );
            number += 1;
            start = end + 1;
        }
    }
    let stored = bucket
        .complete_multipart(&target.key, &upload_id, parts, &crc64_base64(crc), false)
        .await
        .map_err(super::patch::exists)?;
    mp.disarm();
    Ok(stored.etag)
}

type Frames = std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Frame<Bytes>>> + Send>>;

/// The objects `keys`, one after another, as one streaming body.
fn concatenated(bucket: Bucket, keys: VecDeque<String>) -> http_body_util::StreamBody<Frames> {
    struct Cat {
        bucket: Bucket,
        keys: VecDeque<String>,
        current: Option<ByteStream>,
    }
    let stream = futures_util::stream::try_unfold(
        Cat {
            bucket,
            keys,
            current: None,
        },
        |mut cat| async move {
            loop {
                if let Some(current) = &mut cat.current {
                    match current.next().await {
                        Some(Ok(bytes)) => return Ok(Some((Frame::data(bytes), cat))),
                        Some(Err(e)) => return Err(Error::S3Unreachable(e.to_string())),
                        None => cat.current = None,
                    }
                }
                let Some(key) = cat.keys.pop_front() else {
                    return Ok(None);
                };
                cat.current = Some(cat.bucket.get_stream(&key).await?);
            }
        },
    );
    http_body_util::StreamBody::new(Box::pin(stream))
}
