//! `--direct`: scoped credentials from the proxy's `GET /sts`, then an aws-sdk-s3 upload
//! straight to S3 under the prefix those credentials allow: parallel parts, each with its
//! CRC64NVME, completed with the full-object CRC64NVME, aborted on failure.
//!
//! The credentials come through [`StsProvider`], a `ProvideCredentials` that asks `/sts` again
//! whenever the SDK's identity cache finds the current ones near expiry, so an upload that
//! outlives one set of credentials goes on with the next.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_credential_types::Credentials;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{self, ProvideCredentials};
use aws_sdk_s3::config::IdentityCache;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, ChecksumType, CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use futures_util::{StreamExt as _, TryStreamExt as _};
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use tokio::sync::Mutex;

use super::{Backoff, CliError, Ctx, Kind, LocalFile, Uploaded, describe, progress_bar, transport};
use crate::upload::part::{crc64_base64, crc64_combine};

const MIB: u64 = 1 << 20;
const MIN_PART: u64 = 5 * MIB;
const MAX_PART: u64 = 5 * 1024 * MIB;
const MAX_PARTS: u64 = 10_000;
/// The SDK's identity cache asks for new credentials between this long and half this long
/// before the current ones expire (it jitters the point). The proxy hands out credentials valid
/// for at least its refresh margin (60 s or more), so this stays below it: fresh credentials
/// are never "about to expire" at once, which would mean a `/sts` call per request.
const REFRESH_BEFORE: Duration = Duration::from_secs(45);

/// The answer of `GET /sts`.
#[derive(Debug, Clone, Deserialize)]
pub struct StsAnswer {
    pub credentials: StsCredentials,
    pub bucket: String,
    #[serde(default)]
    pub region: String,
    pub prefix: String,
}

#[derive(Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct StsCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    pub expiration: String,
}

impl std::fmt::Debug for StsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StsCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("expiration", &self.expiration)
            .finish_non_exhaustive()
    }
}

impl StsCredentials {
    pub fn to_sdk(&self) -> Result<Credentials, CliError> {
        let expiry = aws_smithy_types::DateTime::from_str(
            &self.expiration,
            aws_smithy_types::date_time::Format::DateTime,
        )
        .ok()
        .and_then(|t| SystemTime::try_from(t).ok())
        .ok_or_else(|| {
            CliError::new(
                Kind::Unavailable,
                format!(
                    "/sts answered an unreadable Expiration {:?}",
                    self.expiration
                ),
            )
        })?;
        Ok(Credentials::new(
            &self.access_key_id,
            &self.secret_access_key,
            Some(self.session_token.clone()),
            Some(expiry),
            "s3-upload-proxy /sts",
        ))
    }
}

/// Credentials from `GET /sts`. The first answer (fetched for the bucket and prefix) is used
/// first; every later call fetches again: the SDK's identity cache calls only when the
/// credentials it holds are about to expire.
#[derive(Clone)]
pub struct StsProvider {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    url: Url,
    token: String,
    api_key: Option<String>,
    retries: u32,
    seed: Mutex<Option<Credentials>>,
    fetches: AtomicU64,
}

impl std::fmt::Debug for StsProvider {
    /// Never shows the token or the API key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StsProvider")
            .field("url", &self.inner.url.as_str())
            .finish_non_exhaustive()
    }
}

impl StsProvider {
    pub fn new(
        http: reqwest::Client,
        url: Url,
        token: String,
        api_key: Option<String>,
        retries: u32,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                http,
                url,
                token,
                api_key,
                retries,
                seed: Mutex::new(None),
                fetches: AtomicU64::new(0),
            }),
        }
    }

    /// How many times `/sts` was asked.
    pub fn fetches(&self) -> u64 {
        self.inner.fetches.load(Ordering::Relaxed)
    }

    /// `GET /sts`, retrying transient failures.
    pub async fn fetch(&self) -> Result<StsAnswer, CliError> {
        let mut backoff = Backoff::new(self.inner.retries);
        loop {
            let message = match self.fetch_once().await {
                Ok(answer) => return Ok(answer),
                Err(Fetch::Fatal(e)) => return Err(e),
                Err(Fetch::Transient(m)) => m,
            };
            tokio::time::sleep(backoff.fail(&message)?).await;
        }
    }

    async fn fetch_once(&self) -> Result<StsAnswer, Fetch> {
        self.inner.fetches.fetch_add(1, Ordering::Relaxed);
        let mut req = self
            .inner
            .http
            .get(self.inner.url.clone())
            .bearer_auth(&self.inner.token)
            .timeout(Duration::from_secs(60));
        if let Some(key) = &self.inner.api_key {
            req = req.header("x-api-key", key);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Fetch::Transient(format!("GET /sts: {}", transport(&e))))?;
        let status = resp.status();
        if status.is_success() {
            return resp.json::<StsAnswer>().await.map_err(|e| {
                Fetch::Fatal(CliError::new(
                    Kind::Unavailable,
                    format!("GET /sts answered something unexpected: {e}"),
                ))
            });
        }
        let message = format!("GET /sts: {}", describe(resp).await);
        let fatal = |kind| Err(Fetch::Fatal(CliError::new(kind, message.clone())));
        match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => fatal(Kind::Auth),
            // The proxy has no upload role: there are no scoped credentials to be had.
            StatusCode::NOT_IMPLEMENTED => Err(Fetch::Fatal(CliError::new(
                Kind::Invalid,
                format!(
                    "{message} (this server does not offer direct uploads; leave out --direct)"
                ),
            ))),
            s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                Err(Fetch::Transient(message))
            }
            _ => fatal(Kind::Invalid),
        }
    }

    /// Seeds the provider with credentials already fetched.
    pub async fn seed(&self, creds: Credentials) {
        *self.inner.seed.lock().await = Some(creds);
    }

    async fn credentials(&self) -> Result<Credentials, CliError> {
        if let Some(c) = self.inner.seed.lock().await.take() {
            let fresh = c
                .expiry()
                .is_none_or(|t| t > SystemTime::now() + REFRESH_BEFORE * 2);
            if fresh {
                return Ok(c);
            }
        }
        self.fetch().await?.credentials.to_sdk()
    }
}

enum Fetch {
    Fatal(CliError),
    Transient(String),
}

impl ProvideCredentials for StsProvider {
    fn provide_credentials<'a>(&'a self) -> provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        provider::future::ProvideCredentials::new(async move {
            self.credentials()
                .await
                .map_err(CredentialsError::provider_error)
        })
    }
}

/// An S3 client on `/sts` credentials, with the bucket and prefix they are good for.
pub struct Direct {
    pub client: aws_sdk_s3::Client,
    pub bucket: String,
    pub prefix: String,
    pub provider: StsProvider,
}

impl Direct {
    /// Fetches `/sts` and builds the client. S3's endpoint comes from the usual AWS
    /// configuration (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, profiles); a custom endpoint
    /// implies path-style addressing.
    pub async fn connect(ctx: &Ctx) -> Result<Self, CliError> {
        let provider = StsProvider::new(
            ctx.http.clone(),
            ctx.url("/sts")?,
            ctx.token.clone(),
            ctx.args.api_key.clone(),
            ctx.args.retries,
        );
        let answer = provider.fetch().await?;
        provider.seed(answer.credentials.to_sdk()?).await;
        let client = s3_client(provider.clone(), &answer.region, ctx.args.retries, None).await;
        Ok(Self {
            client,
            bucket: answer.bucket,
            prefix: answer.prefix,
            provider,
        })
    }

    /// The object key: the `/sts` prefix plus the file name made safe as the proxy makes
    /// names for direct uploads (last path component, no control characters, at most 200
    /// bytes), and then checked as the proxy checks names.
    pub fn key(&self, file: &LocalFile) -> Result<String, CliError> {
        let name = crate::direct::sanitize_filename(&file.name);
        crate::keys::check_name(&name).map_err(|e| {
            CliError::new(Kind::Invalid, format!("cannot use {name:?} as a key: {e}"))
        })?;
        Ok(format!("{}{name}", self.prefix))
    }

    pub async fn upload(&self, ctx: &Ctx, file: &LocalFile) -> Result<Uploaded, CliError> {
        let key = self.key(file)?;
        let part_size = part_size(file.size, ctx.args.part_size)?;
        let bar = progress_bar(file);
        let result = if file.size <= part_size {
            self.put(ctx, file, &key).await
        } else {
            self.multipart(ctx, file, &key, part_size, &bar).await
        };
        bar.finish_and_clear();
        let crc = result?;
        Ok(Uploaded {
            key,
            size: file.size,
            crc64nvme: crc,
        })
    }

    async fn put(&self, ctx: &Ctx, file: &LocalFile, key: &str) -> Result<String, CliError> {
        let (bytes, crc) = read_part(file, 0, file.size).await?;
        file.check_unchanged()?;
        let crc = crc64_base64(crc);
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(&file.content_type)
            .content_length(to_i64(file.size)?)
            .checksum_algorithm(ChecksumAlgorithm::Crc64Nvme)
            .checksum_crc64_nvme(&crc)
            .body(ByteStream::from(bytes));
        if !ctx.args.overwrite {
            req = req.if_none_match("*");
        }
        let out = req.send().await.map_err(|e| sdk_error("PutObject", &e))?;
        confirm(out.checksum_crc64_nvme.as_deref(), crc)
    }

    async fn multipart(
        &self,
        ctx: &Ctx,
        file: &LocalFile,
        key: &str,
        part_size: u64,
        bar: &indicatif::ProgressBar,
    ) -> Result<String, CliError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .content_type(&file.content_type)
            .checksum_algorithm(ChecksumAlgorithm::Crc64Nvme)
            .checksum_type(ChecksumType::FullObject)
            .send()
            .await
            .map_err(|e| sdk_error("CreateMultipartUpload", &e))?;
        let upload_id = created.upload_id.ok_or_else(|| {
            CliError::new(
                Kind::Unavailable,
                "CreateMultipartUpload returned no upload id",
            )
        })?;
        let result = self
            .parts_and_complete(ctx, file, key, &upload_id, part_size, bar)
            .await;
        if result.is_err() {
            // Best effort: a lifecycle rule cleans up what this cannot.
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        result
    }

    async fn parts_and_complete(
        &self,
        ctx: &Ctx,
        file: &LocalFile,
        key: &str,
        upload_id: &str,
        part_size: u64,
        bar: &indicatif::ProgressBar,
    ) -> Result<String, CliError> {
        let count = file.size.div_ceil(part_size);
        let mut parts: Vec<(CompletedPart, u64, u64)> = futures_util::stream::iter(1..=count)
            .map(|n| {
                let offset = (n - 1) * part_size;
                let len = part_size.min(file.size - offset);
                async move {
                    let (bytes, crc) = read_part(file, offset, len).await?;
                    let crc_b64 = crc64_base64(crc);
                    let number = i32::try_from(n)
                        .map_err(|_| CliError::new(Kind::Invalid, "more parts than S3 allows"))?;
                    let out = self
                        .client
                        .upload_part()
                        .bucket(&self.bucket)
                        .key(key)
                        .upload_id(upload_id)
                        .part_number(number)
                        .content_length(to_i64(len)?)
                        .checksum_algorithm(ChecksumAlgorithm::Crc64Nvme)
                        .checksum_crc64_nvme(&crc_b64)
                        .body(ByteStream::from(bytes))
                        .send()
                        .await
                        .map_err(|e| sdk_error("UploadPart", &e))?;
                    bar.inc(len);
                    let part = CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(out.e_tag)
                        .checksum_crc64_nvme(crc_b64)
                        .build();
                    Ok::<_, CliError>((part, crc, len))
                }
            })
            .buffer_unordered(ctx.args.parallel as usize)
            .try_collect()
            .await?;
        parts.sort_by_key(|(p, _, _)| p.part_number);
        let full = parts
            .iter()
            .fold(0, |acc, &(_, crc, len)| crc64_combine(acc, crc, len));
        let full = crc64_base64(full);
        // The parts were read over a while: a file changed meanwhile must not be completed.
        file.check_unchanged()?;
        let mut req = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .checksum_type(ChecksumType::FullObject)
            .checksum_crc64_nvme(&full)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts.into_iter().map(|(p, _, _)| p).collect()))
                    .build(),
            );
        if !ctx.args.overwrite {
            req = req.if_none_match("*");
        }
        let out = req
            .send()
            .await
            .map_err(|e| sdk_error("CompleteMultipartUpload", &e))?;
        confirm(out.checksum_crc64_nvme.as_deref(), full)
    }
}

/// The S3 client for `/sts` credentials: the SDK's identity cache asks `provider` again
/// [`REFRESH_BEFORE`] (plus jitter) before the credentials it holds expire. `endpoint` overrides
/// the endpoint aws-config finds (tests).
pub async fn s3_client(
    provider: StsProvider,
    region: &str,
    retries: u32,
    endpoint: Option<&str>,
) -> aws_sdk_s3::Client {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .credentials_provider(provider)
        .identity_cache(
            IdentityCache::lazy()
                .buffer_time(REFRESH_BEFORE)
                .load_timeout(Duration::from_secs(120))
                .build(),
        );
    if !region.is_empty() {
        loader = loader.region(aws_config::Region::new(region.to_owned()));
    }
    if let Some(url) = endpoint {
        loader = loader.endpoint_url(url);
    }
    let shared = loader.load().await;
    let custom_endpoint = endpoint.is_some()
        || ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"]
            .iter()
            .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()));
    let config = aws_sdk_s3::config::Builder::from(&shared)
        .force_path_style(custom_endpoint)
        .retry_config(RetryConfig::standard().with_max_attempts(retries.saturating_add(1)))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(15))
                .operation_attempt_timeout(Duration::from_secs(600))
                .build(),
        )
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// S3's full-object checksum must be ours (when it reports one).
fn confirm(stored: Option<&str>, ours: String) -> Result<String, CliError> {
    match stored {
        Some(s) if s != ours => Err(CliError::new(
            Kind::Unavailable,
            format!("S3 stored CRC64NVME {s}, the file has {ours}"),
        )),
        _ => Ok(ours),
    }
}

/// The part size for a file: at least `wanted` and 5 MiB, and large enough (in whole MiB) for
/// 10,000 parts to hold the file.
pub fn part_size(size: u64, wanted: u64) -> Result<u64, CliError> {
    let needed = size.div_ceil(MAX_PARTS).div_ceil(MIB) * MIB;
    let part = wanted.max(MIN_PART).max(needed);
    if part > MAX_PART {
        return Err(CliError::new(
            Kind::Invalid,
            format!("{size} bytes is more than S3 takes in one object"),
        ));
    }
    Ok(part)
}

fn to_i64(n: u64) -> Result<i64, CliError> {
    i64::try_from(n).map_err(|_| CliError::new(Kind::Invalid, "size out of range"))
}

/// Reads `[offset, offset + len)` into memory on a blocking thread, with its CRC64NVME.
async fn read_part(file: &LocalFile, offset: u64, len: u64) -> Result<(Bytes, u64), CliError> {
    let path = file.absolute.clone();
    let read = tokio::task::spawn_blocking(move || -> std::io::Result<(Bytes, u64)> {
        use std::os::unix::fs::FileExt as _;
        let f = std::fs::File::open(&path)?;
        let mut buf = vec![0; usize::try_from(len).map_err(std::io::Error::other)?];
        f.read_exact_at(&mut buf, offset)?;
        let crc = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Nvme, &buf);
        Ok((Bytes::from(buf), crc))
    })
    .await;
    match read {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(CliError::new(
            Kind::Invalid,
            format!("reading the file: {e}"),
        )),
        Err(e) => Err(CliError::new(
            Kind::Invalid,
            format!("reading the file: {e}"),
        )),
    }
}

/// An SDK failure (after its retries) as one of ours.
fn sdk_error<E, R>(what: &str, e: &SdkError<E, R>) -> CliError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    // Our credentials provider failed: that error already says what and how bad.
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(ours) = err.downcast_ref::<CliError>() {
            return ours.clone();
        }
        source = err.source();
    }
    let detail = aws_smithy_types::error::display::DisplayErrorContext(e).to_string();
    match e {
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or("Unknown");
            let message = service.err().message().unwrap_or_default();
            let text = format!("{what}: S3 answered {code}: {message}");
            let kind = match code {
                "AccessDenied"
                | "InvalidAccessKeyId"
                | "SignatureDoesNotMatch"
                | "ExpiredToken"
                | "InvalidToken"
                | "TokenRefreshRequired" => Kind::Auth,
                "PreconditionFailed" => {
                    return CliError::new(
                        Kind::Invalid,
                        format!(
                            "{what}: the object already exists (add --overwrite to replace it)"
                        ),
                    );
                }
                "ConditionalRequestConflict"
                | "EntityTooLarge"
                | "KeyTooLongError"
                | "InvalidArgument"
                | "InvalidRequest" => Kind::Invalid,
                _ => Kind::Unavailable,
            };
            CliError::new(kind, text)
        }
        _ => CliError::new(Kind::Unavailable, format!("{what}: {detail}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_sizes_fit_s3_limits() {
        assert_eq!(part_size(0, 16 * MIB).unwrap(), 16 * MIB);
        assert_eq!(part_size(100, MIB).unwrap(), MIN_PART);
        // 1 TiB needs parts of at least 1 TiB / 10,000, rounded up to whole MiB.
        let tib = 1 << 40;
        let p = part_size(tib, 16 * MIB).unwrap();
        assert_eq!(p, 105 * MIB);
        assert!(tib.div_ceil(p) <= MAX_PARTS);
        assert!(part_size(MAX_PARTS * MAX_PART, MIB).is_ok());
        assert_eq!(
            part_size(MAX_PARTS * MAX_PART + 1, MIB).unwrap_err().kind,
            Kind::Invalid
        );
    }

    #[test]
    fn credentials_debug_hides_secrets() {
        let c = StsCredentials {
            access_key_id: "ASIAXXX".into(),
            secret_access_key: "very-secret".into(),
            session_token: "session-secret".into(),
            expiration: "2030-01-01T00:00:00Z".into(),
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains("secret"), "{shown}");
        let sdk = c.to_sdk().unwrap();
        assert_eq!(sdk.session_token(), Some("session-secret"));
        assert!(sdk.expiry().is_some());
        let bad = StsCredentials {
            expiration: "tomorrow".into(),
            ..c
        };
        assert_eq!(bad.to_sdk().unwrap_err().kind, Kind::Unavailable);
    }

    /// A fake proxy `/sts` that counts calls and hands out credentials expiring `ttl` from now,
    /// and a fake S3 that records the access key id each request was signed with.
    async fn fake_sts(ttl: Duration) -> (Url, Arc<AtomicU64>) {
        let (url, calls, _) = fake(ttl).await;
        (url.join("/sts").unwrap(), calls)
    }

    async fn fake(ttl: Duration) -> (Url, Arc<AtomicU64>, Arc<std::sync::Mutex<Vec<String>>>) {
        use axum::routing::{get, put};
        let calls = Arc::new(AtomicU64::new(0));
        let keys = Arc::new(std::sync::Mutex::new(Vec::new()));
        let counter = Arc::clone(&calls);
        let seen = Arc::clone(&keys);
        let app = axum::Router::new()
            .route(
                "/sts",
                get(move |headers: http::HeaderMap| {
                    let counter = Arc::clone(&counter);
                    async move {
                        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                        if headers.get("authorization").and_then(|v| v.to_str().ok())
                            != Some("Bearer tok")
                        {
                            return (StatusCode::UNAUTHORIZED, "{}".to_owned());
                        }
                        let expiry = aws_smithy_types::DateTime::from(SystemTime::now() + ttl)
                            .fmt(aws_smithy_types::date_time::Format::DateTime)
                            .unwrap();
                        let body = serde_json::json!({
                            "credentials": {"AccessKeyId": format!("AK{n}"), "SecretAccessKey": "s",
                                            "SessionToken": "t", "Expiration": expiry},
                            "bucket": "b", "region": "us-east-1", "prefix": "uploads/alice/"});
                        (StatusCode::OK, body.to_string())
                    }
                }),
            )
            .route(
                "/b/{*key}",
                put(move |headers: http::HeaderMap| {
                    let seen = Arc::clone(&seen);
                    async move {
                        let auth = headers["authorization"].to_str().unwrap().to_owned();
                        let key = auth
                            .split("Credential=")
                            .nth(1)
                            .and_then(|c| c.split('/').next())
                            .unwrap()
                            .to_owned();
                        seen.lock().unwrap().push(key);
                        (StatusCode::OK, [("etag", "\"e\"")])
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (Url::parse(&format!("http://{addr}")).unwrap(), calls, keys)
    }

    /// Through the client `--direct` uses: requests are signed with the seed while it is
    /// fresh, and with newly fetched credentials once the ones held near expiry.
    #[tokio::test]
    async fn s3_requests_use_fresh_credentials_as_they_near_expiry() {
        for (ttl, expected) in [
            (Duration::from_secs(3600), ["AK1", "AK1", "AK1"]),
            // Within the refresh window from the start (less than half of it, whatever the
            // jitter): every request fetches anew.
            (Duration::from_secs(20), ["AK2", "AK3", "AK4"]),
        ] {
            let (base, _, keys) = fake(ttl).await;
            let provider = StsProvider::new(
                reqwest::Client::new(),
                base.join("/sts").unwrap(),
                "tok".into(),
                None,
                0,
            );
            let first = provider.fetch().await.unwrap();
            provider.seed(first.credentials.to_sdk().unwrap()).await;
            let client = s3_client(provider.clone(), "us-east-1", 0, Some(base.as_str())).await;
            for _ in 0..3 {
                client
                    .put_object()
                    .bucket("b")
                    .key("uploads/alice/x")
                    .body(ByteStream::from_static(b"x"))
                    .send()
                    .await
                    .unwrap();
            }
            assert_eq!(*keys.lock().unwrap(), expected, "ttl {ttl:?}");
        }
    }

    #[tokio::test]
    async fn provider_refetches_credentials_near_expiry() {
        // Long-lived credentials: the seed serves the first call, later calls fetch anew (the
        // SDK's cache only calls again when it finds its credentials near expiry).
        let (url, calls) = fake_sts(Duration::from_secs(3600)).await;
        let p = StsProvider::new(reqwest::Client::new(), url, "tok".into(), None, 0);
        let first = p.fetch().await.unwrap();
        assert_eq!(first.prefix, "uploads/alice/");
        p.seed(first.credentials.to_sdk().unwrap()).await;
        let c1 = p.provide_credentials().await.unwrap();
        assert_eq!(c1.access_key_id(), "AK1");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let c2 = p.provide_credentials().await.unwrap();
        assert_eq!(c2.access_key_id(), "AK2");
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        // A seed about to expire is not handed out: it is replaced at once.
        let (url, calls) = fake_sts(Duration::from_secs(30)).await;
        let p = StsProvider::new(reqwest::Client::new(), url, "tok".into(), None, 0);
        let first = p.fetch().await.unwrap();
        p.seed(first.credentials.to_sdk().unwrap()).await;
        let c = p.provide_credentials().await.unwrap();
        assert_eq!(c.access_key_id(), "AK2");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(p.fetches(), 2);
    }

    #[tokio::test]
    async fn refused_token_is_an_auth_failure() {
        let (url, _) = fake_sts(Duration::from_secs(3600)).await;
        let p = StsProvider::new(reqwest::Client::new(), url, "wrong".into(), None, 3);
        let e = p.fetch().await.unwrap_err();
        assert_eq!(e.kind, Kind::Auth);
        // Not retried: one call.
        assert_eq!(p.fetches(), 1);
        // And as a credentials provider error, still recognisable for the exit code.
        let err = p.provide_credentials().await.unwrap_err();
        let ours = std::error::Error::source(&err)
            .and_then(|s| s.downcast_ref::<CliError>())
            .unwrap();
        assert_eq!(ours.kind, Kind::Auth);
    }
}
