//! Per-user credentials, cached until shortly before they expire.
//!
//! A bounded [`moka`] cache holds one entry per user. Reads of fresh credentials take no lock;
//! a missing or stale entry is replaced under moka's per-key lock, so a thousand concurrent
//! requests of one user cause one `AssumeRole` (single flight) and the others take its result.
//! A failure is remembered for [`FAILURE_TTL`] so that an STS outage is not multiplied by the
//! number of waiting requests; the SDK has already retried what was worth retrying.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use aws_credential_types::Credentials;
use futures_util::future::BoxFuture;
use moka::Expiry;
use moka::ops::compute::{CompResult, Op};

use super::StsError;
use crate::keys::UserSegment;

/// How long a failed `AssumeRole` is answered from the cache before STS is asked again.
pub const FAILURE_TTL: Duration = Duration::from_secs(2);
/// Users whose credentials are kept at once. An entry is ~1 KiB, so 10,000 users cost ~10 MiB;
/// beyond that the least recently used user pays one more `AssumeRole`.
pub const MAX_USERS: u64 = 10_000;

/// Where credentials come from (STS `AssumeRole` in production, a fake in tests).
pub trait Source: Send + Sync + 'static {
    fn assume<'a>(&'a self, user: &'a UserSegment) -> BoxFuture<'a, Result<Credentials, StsError>>;
}

/// The time the cache judges expiry by: the system clock plus an offset that tests advance.
#[derive(Debug, Default)]
pub struct Clock {
    offset_secs: AtomicU64,
}

impl Clock {
    pub fn now(&self) -> SystemTime {
        SystemTime::now() + Duration::from_secs(self.offset_secs.load(Ordering::Relaxed))
    }

    /// Moves this clock forward (tests: make cached credentials look old).
    pub fn advance(&self, by: Duration) {
        self.offset_secs.fetch_add(by.as_secs(), Ordering::Relaxed);
    }

    /// Back to the system clock.
    pub fn reset(&self) {
        self.offset_secs.store(0, Ordering::Relaxed);
    }
}

#[derive(Clone)]
enum Cached {
    Ready(Credentials),
    Failed { error: StsError, until: SystemTime },
}

pub struct CredentialCache {
    source: Box<dyn Source>,
    entries: moka::future::Cache<UserSegment, Cached>,
    margin: Duration,
    clock: Arc<Clock>,
}

impl std::fmt::Debug for CredentialCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialCache")
            .field("users", &self.entries.entry_count())
            .field("margin", &self.margin)
            .finish_non_exhaustive()
    }
}

/// Lets moka drop entries on its own (real) clock once they are due for refresh.
struct DueAt {
    margin: Duration,
}

impl DueAt {
    fn ttl(&self, value: &Cached) -> Option<Duration> {
        match value {
            Cached::Ready(c) => c.expiry().map(|expiry| {
                expiry
                    .checked_sub(self.margin)
                    .and_then(|due| due.duration_since(SystemTime::now()).ok())
                    .unwrap_or(Duration::ZERO)
            }),
            Cached::Failed { .. } => Some(FAILURE_TTL),
        }
    }
}

impl Expiry<UserSegment, Cached> for DueAt {
    fn expire_after_create(&self, _: &UserSegment, value: &Cached, _: Instant) -> Option<Duration> {
        self.ttl(value)
    }

    fn expire_after_update(
        &self,
        _: &UserSegment,
        value: &Cached,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        self.ttl(value)
    }
}

impl CredentialCache {
    /// Credentials are refreshed `margin` before they expire.
    pub fn new(source: impl Source, margin: Duration, capacity: u64) -> Self {
        Self {
            source: Box::new(source),
            entries: moka::future::Cache::builder()
                .max_capacity(capacity)
                .expire_after(DueAt { margin })
                .build(),
            margin,
            clock: Arc::default(),
        }
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub fn margin(&self) -> Duration {
        self.margin
    }

    /// Credentials for `user` that are valid for at least the refresh margin (or, right after a
    /// fetch, still valid at all).
    pub async fn get(&self, user: &UserSegment) -> Result<Credentials, StsError> {
        if let Some(cached) = self.entries.get(user).await
            && let Some(answer) = self.fresh(&cached)
        {
            return answer;
        }
        let result = self
            .entries
            .entry_by_ref(user)
            .and_compute_with(|current| async move {
                // Whoever held the key lock before us may have refreshed it already.
                if let Some(entry) = current
                    && self.fresh(entry.value()).is_some()
                {
                    return Op::Nop;
                }
                match self.source.assume(user).await {
                    Ok(credentials) => Op::Put(Cached::Ready(credentials)),
                    Err(error) => Op::Put(Cached::Failed {
                        error,
                        until: self.clock.now() + FAILURE_TTL,
                    }),
                }
            })
            .await;
        let entry = match result {
            CompResult::Inserted(e) | CompResult::ReplacedWith(e) | CompResult::Unchanged(e) => e,
            CompResult::StillNone(_) | CompResult::Removed(_) => {
                return Err(StsError::internal("credential cache lost its entry"));
            }
        };
        match entry.into_value() {
            Cached::Ready(c) if c.expiry().is_none_or(|e| e > self.clock.now()) => Ok(c),
            Cached::Ready(_) => Err(StsError::internal(
                "STS returned credentials that have already expired",
            )),
            Cached::Failed { error, .. } => Err(error),
        }
    }

    /// The cached answer if it may still be used, `None` when it is due for refresh.
    fn fresh(&self, cached: &Cached) -> Option<Result<Credentials, StsError>> {
        let now = self.clock.now();
        match cached {
            Cached::Ready(c) => c
                .expiry()
                .is_none_or(|e| e.checked_sub(self.margin).is_some_and(|due| due > now))
                .then(|| Ok(c.clone())),
            Cached::Failed { error, until } => (now < *until).then(|| Err(error.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// Hands out numbered credentials valid for `lifetime`, slowly, counting its calls.
    struct Counting {
        calls: Arc<AtomicUsize>,
        lifetime: Duration,
        fail: bool,
        clock: Arc<Clock>,
    }

    impl Source for Counting {
        fn assume<'a>(
            &'a self,
            user: &'a UserSegment,
        ) -> BoxFuture<'a, Result<Credentials, StsError>> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                if self.fail {
                    return Err(StsError::transient("Throttling", "slow down"));
                }
                Ok(Credentials::new(
                    format!("AKIA{n}-{}", user.as_str()),
                    "secret",
                    Some("token".into()),
                    Some(self.clock.now() + self.lifetime),
                    "test",
                ))
            })
        }
    }

    fn cache(
        lifetime: Duration,
        margin: Duration,
        fail: bool,
    ) -> (Arc<CredentialCache>, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let clock = Arc::new(Clock::default());
        let mut cache = CredentialCache::new(
            Counting {
                calls: Arc::clone(&calls),
                lifetime,
                fail,
                clock: Arc::clone(&clock),
            },
            margin,
            100,
        );
        cache.clock = clock;
        (Arc::new(cache), calls)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn one_assume_role_for_a_thousand_concurrent_requests() {
        let (cache, calls) = cache(Duration::from_secs(3600), Duration::from_secs(300), false);
        let alice = UserSegment::new("alice").unwrap();
        let tasks: Vec<_> = (0..1000)
            .map(|_| {
                let (cache, alice) = (Arc::clone(&cache), alice.clone());
                tokio::spawn(
                    async move { cache.get(&alice).await.unwrap().access_key_id().to_owned() },
                )
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), "AKIA1-alice");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Another user gets their own.
        let bob = UserSegment::new("bob").unwrap();
        assert_eq!(cache.get(&bob).await.unwrap().access_key_id(), "AKIA2-bob");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn refreshed_before_expiry() {
        let (cache, calls) = cache(Duration::from_secs(3600), Duration::from_secs(300), false);
        let alice = UserSegment::new("alice").unwrap();
        assert_eq!(
            cache.get(&alice).await.unwrap().access_key_id(),
            "AKIA1-alice"
        );
        cache.clock().advance(Duration::from_secs(3290));
        // Still more than the margin left: the same credentials.
        assert_eq!(
            cache.get(&alice).await.unwrap().access_key_id(),
            "AKIA1-alice"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Inside the margin (5 min before expiry): new ones, fetched once.
        cache.clock().advance(Duration::from_secs(20));
        let (a, b) = tokio::join!(cache.get(&alice), cache.get(&alice));
        assert_eq!(a.unwrap().access_key_id(), "AKIA2-alice");
        assert_eq!(b.unwrap().access_key_id(), "AKIA2-alice");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        let fresh = cache.get(&alice).await.unwrap();
        assert!(fresh.expiry().unwrap() > cache.clock().now() + Duration::from_secs(3000));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn failures_are_shared_briefly_then_retried() {
        let (cache, calls) = cache(Duration::from_secs(3600), Duration::from_secs(300), true);
        let alice = UserSegment::new("alice").unwrap();
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let (cache, alice) = (Arc::clone(&cache), alice.clone());
                tokio::spawn(async move { cache.get(&alice).await })
            })
            .collect();
        for task in tasks {
            let err = task.await.unwrap().unwrap_err();
            assert_eq!(err.code, "Throttling");
            assert!(err.transient);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        cache.clock().advance(FAILURE_TTL + Duration::from_secs(1));
        assert!(cache.get(&alice).await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn static_credentials_never_expire() {
        struct Static;
        impl Source for Static {
            fn assume<'a>(
                &'a self,
                _: &'a UserSegment,
            ) -> BoxFuture<'a, Result<Credentials, StsError>> {
                Box::pin(async { Ok(Credentials::new("a", "b", None, None, "static")) })
            }
        }
        let cache = CredentialCache::new(Static, Duration::from_secs(300), 10);
        let alice = UserSegment::new("alice").unwrap();
        cache.get(&alice).await.unwrap();
        cache.clock().advance(Duration::from_secs(100_000));
        assert_eq!(cache.get(&alice).await.unwrap().access_key_id(), "a");
    }
}
