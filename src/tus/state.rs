//! Upload state: one JSON object per upload at `{user}/.s3up/tus/{id}/state.json`, next to the
//! upload's tail objects. Every write is conditional (create: `If-None-Match: *`, update:
//! `If-Match: <etag>`), so two instances, or a request still running for a client that gave up,
//! can never overwrite each other's progress: the loser gets a 409 and the client asks again.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::keys::{KeyLayout, UserSegment};
use crate::s3::{Bucket, Write};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UploadState {
    pub id: String,
    /// The escaped user id of the owner (also implied by where the state lives).
    pub owner: String,
    /// Where the upload completes: the user's object, or a hidden object for a partial upload.
    pub key: String,
    /// `None` while the length is deferred.
    pub length: Option<u64>,
    /// The length was deferred at creation: parts follow the growing schedule.
    pub deferred: bool,
    /// Bytes stored: committed parts plus tails.
    pub offset: u64,
    /// The `Upload-Metadata` header as received, echoed by HEAD.
    pub metadata: Option<String>,
    pub content_type: Option<String>,
    #[serde(default)]
    pub user_metadata: BTreeMap<String, String>,
    /// Unix seconds.
    pub created: u64,
    pub expires: u64,
    /// The S3 multipart upload, created when the first part is ready.
    pub multipart: Option<String>,
    #[serde(default)]
    pub parts: Vec<PartRecord>,
    /// Bytes after the last part, not yet a part: small objects under this upload's directory.
    #[serde(default)]
    pub tails: Vec<TailRecord>,
    pub concat: Option<Concat>,
    pub completed: Option<Completed>,
    /// Held by a request that is uploading parts (see `patch`): part numbers are not
    /// conditional in S3, so only the lease holder may write them.
    pub lease: Option<Lease>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PartRecord {
    pub number: u32,
    pub etag: String,
    pub size: u64,
    /// CRC64NVME of the part.
    pub crc64: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TailRecord {
    pub key: String,
    pub size: u64,
    pub crc64: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Concat {
    /// A partial upload; `final_id` names a final upload waiting for it.
    Partial {
        final_id: Option<String>,
    },
    Final {
        partials: Vec<String>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Completed {
    pub etag: String,
    /// Full-object CRC64NVME (a final upload combines its partials' from this).
    pub crc64: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Lease {
    pub token: String,
    /// Unix milliseconds.
    pub until: u64,
}

impl UploadState {
    /// A new, empty upload of `length` (`None`: deferred) expiring `expiry_secs` from now;
    /// callers set `metadata` and `concat`.
    pub fn new(
        id: &str,
        owner: &UserSegment,
        key: String,
        length: Option<u64>,
        info: super::metadata::ObjectInfo,
        expiry_secs: u64,
    ) -> Self {
        let now = now_secs();
        Self {
            id: id.to_owned(),
            owner: owner.as_str().to_owned(),
            key,
            length,
            deferred: length.is_none(),
            offset: 0,
            metadata: None,
            content_type: info.content_type,
            user_metadata: info.user,
            created: now,
            expires: now + expiry_secs,
            multipart: None,
            parts: Vec::new(),
            tails: Vec::new(),
            concat: None,
            completed: None,
            lease: None,
        }
    }

    pub fn is_partial(&self) -> bool {
        matches!(self.concat, Some(Concat::Partial { .. }))
    }

    pub fn is_final(&self) -> bool {
        matches!(self.concat, Some(Concat::Final { .. }))
    }

    pub fn expired(&self) -> bool {
        self.expires <= now_secs()
    }

    /// A lease another request holds right now.
    pub fn foreign_lease(&self, mine: Option<&str>) -> Option<&Lease> {
        self.lease
            .as_ref()
            .filter(|l| l.until > now_millis() && Some(l.token.as_str()) != mine)
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The state objects of one user, reached with that user's bucket handle.
#[derive(Clone, Debug)]
pub struct Store {
    pub bucket: Bucket,
    /// `uploads/alice/.s3up/tus/`
    prefix: String,
}

impl Store {
    pub fn new(bucket: Bucket, keys: &KeyLayout, user: &UserSegment) -> Self {
        Self {
            bucket,
            prefix: format!("{}tus/", keys.reserved_prefix(user)),
        }
    }

    /// Everything of one upload lives below this.
    pub fn dir(&self, id: &str) -> String {
        format!("{}{id}/", self.prefix)
    }

    fn state_key(&self, id: &str) -> String {
        format!("{}state.json", self.dir(id))
    }

    /// Where a partial upload completes (hidden from listings, never a user's name).
    pub fn partial_object(&self, id: &str) -> String {
        format!("{}object", self.dir(id))
    }

    /// A new tail object's key: unique, so a write that loses a race never clobbers one that
    /// was recorded.
    pub fn tail_key(&self, id: &str, offset: u64) -> String {
        format!(
            "{}tail-{offset:016}-{}",
            self.dir(id),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        )
    }

    /// One GET. `None` for an unknown id (or another user's: it lives under their prefix).
    /// A read that breaks off or does not parse is tried again: S3 itself replaces objects
    /// atomically, but a body can still break in transit, and the embedded store (s3s-fs)
    /// rewrites files in place, so a read racing a write can come back short.
    pub async fn load(&self, id: &str) -> Result<Option<(UploadState, String)>> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let err = match self.bucket.get_small(&self.state_key(id)).await {
                Ok(None) => return Ok(None),
                Ok(Some((bytes, etag))) => match serde_json::from_slice(&bytes) {
                    Ok(state) => return Ok(Some((state, etag))),
                    Err(e) => Error::Internal(format!("unreadable tus state {id}: {e}")),
                },
                Err(e @ Error::S3Unreachable(_)) => e,
                Err(e) => return Err(e),
            };
            if attempt == 3 {
                return Err(err);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20 * attempt)).await;
        }
    }

    pub async fn create(&self, state: &UploadState) -> Result<String> {
        self.write(state, Write::Create).await
    }

    /// Replaces the state only if it is still `etag`; a lost race is `Error::Conflict`.
    pub async fn save(&self, state: &UploadState, etag: &str) -> Result<String> {
        self.write(state, Write::Replace(etag)).await
    }

    async fn write(&self, state: &UploadState, write: Write<'_>) -> Result<String> {
        let json = serde_json::to_vec(state).map_err(|e| Error::Internal(e.to_string()))?;
        self.bucket
            .put_small(
                &self.state_key(&state.id),
                Bytes::from(json),
                "application/json",
                write,
            )
            .await
    }

    /// Removes everything in an upload's directory: state, tails (recorded or left by failed
    /// requests), a partial's hidden object. Never the user's object.
    pub async fn remove_all(&self, id: &str) -> Result<()> {
        let dir = self.dir(id);
        let mut token = None;
        loop {
            let (objects, next) = self.bucket.list(&dir, token, 1000).await?;
            let keys: Vec<String> = objects.into_iter().map(|o| o.key).collect();
            self.bucket.delete_keys(&keys).await?;
            match next {
                Some(t) => token = Some(t),
                None => return Ok(()),
            }
        }
    }
}
