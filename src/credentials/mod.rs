//! Which S3 identity acts for a user.
//!
//! With an upload role (`sts_role_arn`), every S3 request made for user U is signed with
//! credentials from `AssumeRole` whose inline session policy allows only U's prefix, so S3 itself
//! refuses anything else. Each user gets an S3 client built from the shared base configuration
//! (same HTTP connection pool, retries, interceptors) whose credentials provider reads through
//! the [`cache::CredentialCache`] on every request; the SDK's own identity cache is off, so an
//! upload that outlives one set of credentials signs its later parts with fresh ones.
//!
//! Without a role every request uses the proxy's own credentials (per-user scoping is off, and
//! we say so once at startup).

pub mod cache;
pub mod policy;
pub mod sts;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_credential_types::provider::{self, ProvideCredentials};
use aws_sdk_s3::config::IdentityCache;

use crate::config::Settings;
use crate::error::Error;
use crate::keys::UserSegment;
use crate::metrics::Metrics;
use crate::s3::Bucket;
pub use cache::{Clock, CredentialCache};
pub use sts::{StsError, StsSettings};

/// Per-user S3 clients are dropped after this long unused (the credentials cache is separate).
const CLIENT_IDLE: Duration = Duration::from_secs(30 * 60);

#[derive(Clone)]
pub struct UserBuckets {
    shared: Bucket,
    scoped: Option<Arc<Scoped>>,
}

struct Scoped {
    cache: Arc<CredentialCache>,
    clients: moka::future::Cache<UserSegment, Bucket>,
}

impl std::fmt::Debug for UserBuckets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserBuckets")
            .field("bucket", &self.shared.name)
            .field("scoped", &self.scoped.is_some())
            .finish()
    }
}

impl UserBuckets {
    /// Scoped when `settings.sts` and an STS client are given, shared otherwise.
    pub fn new(
        bucket: Bucket,
        settings: &Settings,
        sts: Option<aws_sdk_sts::Client>,
        metrics: &Arc<Metrics>,
    ) -> Self {
        match (&settings.sts, sts) {
            (Some(sts_settings), Some(client)) => {
                let source = sts::StsSource {
                    client,
                    settings: sts_settings.clone(),
                    bucket: Arc::clone(&bucket.name),
                    keys: settings.keys.clone(),
                    metrics: Arc::clone(metrics),
                };
                tracing::info!(
                    role = %sts_settings.role_arn,
                    "per-user scoping on: S3 requests use AssumeRole credentials limited to each user's prefix"
                );
                let cache =
                    CredentialCache::new(source, sts_settings.refresh_margin, cache::MAX_USERS);
                Self::scoped(bucket, Arc::new(cache))
            }
            _ => Self::shared(bucket),
        }
    }

    pub fn shared(bucket: Bucket) -> Self {
        tracing::warn!(
            "no upload role configured: S3 requests use the proxy's own credentials, not per-user scoped ones"
        );
        Self {
            shared: bucket,
            scoped: None,
        }
    }

    pub fn scoped(bucket: Bucket, cache: Arc<CredentialCache>) -> Self {
        let clients = moka::future::Cache::builder()
            .max_capacity(cache::MAX_USERS)
            .time_to_idle(CLIENT_IDLE)
            .build();
        Self {
            shared: bucket,
            scoped: Some(Arc::new(Scoped { cache, clients })),
        }
    }

    /// True when users get their own scoped credentials.
    pub fn is_scoped(&self) -> bool {
        self.scoped.is_some()
    }

    /// The credentials cache (tests use its clock).
    pub fn cache(&self) -> Option<&Arc<CredentialCache>> {
        self.scoped.as_ref().map(|s| &s.cache)
    }

    /// The bucket as user `user` may see it. With a role, credentials are obtained first, so an
    /// STS failure is answered (502/503) before any S3 request is made.
    pub async fn for_user(&self, user: &UserSegment) -> Result<Bucket, Error> {
        let Some(scoped) = &self.scoped else {
            return Ok(self.shared.clone());
        };
        scoped.cache.get(user).await?;
        let bucket = scoped
            .clients
            .get_with_by_ref(user, async {
                user_bucket(&self.shared, Arc::clone(&scoped.cache), user.clone())
            })
            .await;
        Ok(bucket)
    }

    /// The user's current scoped credentials; `None` without a role (there are none to give).
    pub async fn credentials(&self, user: &UserSegment) -> Result<Option<Credentials>, Error> {
        match &self.scoped {
            Some(scoped) => Ok(Some(scoped.cache.get(user).await?)),
            None => Ok(None),
        }
    }

    /// How long a URL presigned now for `user` may live: at most `max`, and never past the
    /// expiry of the credentials that sign it (less a minute for clock skew).
    pub async fn presign_window(
        &self,
        user: &UserSegment,
        max: Duration,
    ) -> Result<Duration, Error> {
        let Some(scoped) = &self.scoped else {
            return Ok(max);
        };
        let credentials = scoped.cache.get(user).await?;
        let Some(expiry) = credentials.expiry() else {
            return Ok(max);
        };
        let left = expiry
            .duration_since(scoped.cache.clock().now())
            .unwrap_or(Duration::ZERO)
            .saturating_sub(Duration::from_secs(60));
        if left < Duration::from_secs(1) {
            return Err(Error::Internal(
                "credentials expire too soon to presign".into(),
            ));
        }
        Ok(left.min(max))
    }

    /// The time the credentials cache judges expiry by (the system clock without a role).
    pub fn now(&self) -> SystemTime {
        self.scoped
            .as_ref()
            .map_or_else(SystemTime::now, |s| s.cache.clock().now())
    }
}

/// An S3 client for one user: the base configuration with a provider that reads the cache.
fn user_bucket(base: &Bucket, cache: Arc<CredentialCache>, user: UserSegment) -> Bucket {
    let config = base
        .client
        .config()
        .to_builder()
        .credentials_provider(UserProvider { cache, user })
        // Our cache decides when credentials are renewed; the SDK must not keep old ones.
        .identity_cache(IdentityCache::no_cache())
        .build();
    Bucket {
        client: aws_sdk_s3::Client::from_conf(config),
        name: Arc::clone(&base.name),
    }
}

#[derive(Debug)]
struct UserProvider {
    cache: Arc<CredentialCache>,
    user: UserSegment,
}

impl ProvideCredentials for UserProvider {
    fn provide_credentials<'a>(&'a self) -> provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        provider::future::ProvideCredentials::new(async move {
            self.cache
                .get(&self.user)
                .await
                .map_err(provider::error::CredentialsError::provider_error)
        })
    }
}

#[cfg(test)]
mod tests {
    use futures_util::future::BoxFuture;

    use super::*;

    struct Throttled;

    impl cache::Source for Throttled {
        fn assume<'a>(
            &'a self,
            _: &'a UserSegment,
        ) -> BoxFuture<'a, Result<Credentials, StsError>> {
            Box::pin(async { Err(StsError::transient("Throttling", "Rate exceeded")) })
        }
    }

    /// Credentials that fail to refresh in the middle of an upload are reported as the STS
    /// failure they are (503 with Retry-After), not as an internal error.
    #[tokio::test]
    async fn provider_failures_inside_the_sdk_are_reported_as_sts_errors() {
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .endpoint_url("http://127.0.0.1:9")
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .credentials_provider(Credentials::new("a", "b", None, None, "base"))
            .build();
        let base = Bucket {
            client: aws_sdk_s3::Client::from_conf(config),
            name: "b-1".into(),
        };
        let cache = Arc::new(CredentialCache::new(
            Throttled,
            Duration::from_secs(300),
            10,
        ));
        let bucket = user_bucket(&base, cache, UserSegment::new("alice").unwrap());
        let err = bucket.exists("uploads/alice/x").await.unwrap_err();
        assert!(
            matches!(&err, Error::Sts(e) if e.code == "Throttling" && e.transient),
            "{err:?}"
        );
        assert_eq!(err.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    }
}
