//! Expiration: every instance periodically removes expired uploads (aborts the multipart
//! upload, deletes state and tails).
//!
//! Finding them must not mean listing the bucket. Each upload writes one empty marker at
//! creation into an expiry index outside every user's prefix, `{before}.s3up/tus-expiry/
//! {unix expiry, 12 digits}/{user}/{id}` (with the default layout `uploads/.s3up/...`). Keys list
//! in time order, so a round lists only markers already due, plus one page. Uploads whose
//! expiry moved on (every PATCH extends it) get their marker moved when it comes due, instead
//! of costing each PATCH two extra requests. A bucket lifecycle rule (README) removes whatever a
//! crash leaves behind: incomplete multipart uploads after some days, and `.s3up/` objects.
//!
//! Index markers are written and listed with the proxy's own credentials: the index belongs to
//! no user. Upload state is read and removed with the owner's.

use std::sync::Arc;

use bytes::Bytes;

use super::patch::Ctx;
use super::state::{UploadState, now_secs};
use crate::api::AppState;
use crate::error::Result;
use crate::keys::UserSegment;
use crate::s3::Write;

fn marker(state: &AppState, expires: u64, user: &str, id: &str) -> String {
    format!(
        "{}tus-expiry/{expires:012}/{user}/{id}",
        state.keys.index_prefix()
    )
}

/// Files an upload in the expiry index.
pub async fn index(state: &AppState, user: &UserSegment, st: &UploadState) -> Result<()> {
    state
        .bucket
        .put_small(
            &marker(state, st.expires, user.as_str(), &st.id),
            Bytes::new(),
            "application/octet-stream",
            Write::Create,
        )
        .await
        .map(drop)
        .or_else(|e| match e {
            // Already filed (same second, same id): fine.
            crate::error::Error::Conflict(_) => Ok(()),
            e => Err(e),
        })
}

/// Termination (DELETE) and expiry: abort an unfinished multipart upload, remove the
/// upload's directory.
pub async fn remove(ctx: &Ctx, st: &UploadState) -> Result<()> {
    if st.completed.is_none()
        && let Some(upload_id) = &st.multipart
        && let Err(e) = ctx.store.bucket.abort_multipart(&st.key, upload_id).await
    {
        // Already gone (aborted by a racing reaper, or never existed) is fine.
        if !matches!(&e, crate::error::Error::S3 { code, .. } if code == "NoSuchUpload") {
            return Err(e);
        }
    }
    if st.completed.is_none() && st.multipart.is_some() {
        ctx.uploader.metrics.multipart_aborted.inc();
    }
    ctx.store.remove_all(&st.id).await
}

pub fn spawn_reaper(state: &AppState) {
    let weak = Arc::downgrade(&state.0);
    let interval = state.tus.settings.reaper_interval;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            let Some(inner) = weak.upgrade() else {
                return;
            };
            let state = AppState(inner);
            match reap(&state).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "removed expired tus uploads"),
                Err(e) => tracing::warn!(error = %e, "tus reaper round failed"),
            }
        }
    });
}

/// One round; returns how many uploads it removed.
pub async fn reap(state: &AppState) -> Result<usize> {
    let prefix = format!("{}tus-expiry/", state.keys.index_prefix());
    let now = now_secs();
    let mut removed = 0;
    let mut token = None;
    loop {
        let (markers, next) = state.bucket.list(&prefix, token, 1000).await?;
        for m in markers {
            let rest = &m.key[prefix.len()..];
            let mut fields = rest.splitn(3, '/');
            let (Some(due), Some(user), Some(id)) = (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let Ok(due) = due.parse::<u64>() else {
                continue;
            };
            if due > now {
                return Ok(removed);
            }
            match reap_one(state, &m.key, user, id).await {
                Ok(true) => removed += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, upload = id, "could not reap a tus upload"),
            }
        }
        match next {
            Some(t) => token = Some(t),
            None => return Ok(removed),
        }
    }
}

async fn reap_one(state: &AppState, marker_key: &str, user: &str, id: &str) -> Result<bool> {
    let marker_keys = [marker_key.to_owned()];
    let drop_marker = || state.bucket.delete_keys(&marker_keys);
    let Some(user) = UserSegment::from_escaped(user) else {
        drop_marker().await?;
        return Ok(false);
    };
    let ctx = super::ctx(state, &user).await?;
    let Some((st, _)) = ctx.store.load(id).await? else {
        drop_marker().await?;
        return Ok(false);
    };
    if !st.expired() {
        index(state, &user, &st).await?;
        drop_marker().await?;
        return Ok(false);
    }
    if st.foreign_lease(None).is_some() {
        return Ok(false);
    }
    remove(&ctx, &st).await?;
    drop_marker().await?;
    Ok(true)
}
