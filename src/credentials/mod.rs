//! Which S3 identity acts for a user. Without an upload role every request uses the proxy's own
//! credentials (per-user scoping is off, and we say so once at startup).

use crate::error::Error;
use crate::keys::UserSegment;
use crate::s3::Bucket;

#[derive(Clone, Debug)]
pub struct UserBuckets {
    shared: Bucket,
}

impl UserBuckets {
    pub fn shared(bucket: Bucket) -> Self {
        tracing::warn!(
            "no upload role configured: S3 requests use the proxy's own credentials, not per-user scoped ones"
        );
        Self { shared: bucket }
    }

    /// The bucket as user `user` may see it.
    pub async fn for_user(&self, _user: &UserSegment) -> Result<Bucket, Error> {
        Ok(self.shared.clone())
    }
}
