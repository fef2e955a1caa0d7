//! A thin wrapper over aws-sdk-s3: one client per process, the calls the pipeline needs, and the
//! mapping of SDK errors to ours. The embedded store is reached through the same client over HTTP.

pub mod embedded;

use std::sync::Arc;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_credential_types::Credentials;
use aws_sdk_s3::Client;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::RequestId;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, ChecksumType, CompletedMultipartUpload, CompletedPart, Delete,
    ObjectIdentifier,
};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef;
use aws_smithy_runtime_api::client::retries::RequestAttempts;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use bytes::Bytes;
use http::StatusCode;

use crate::error::Error;
use crate::metrics::Metrics;
use crate::upload::part::Part;

/// How the client reaches S3.
#[derive(Clone)]
pub enum Endpoint {
    /// aws-config's default chain (env, profile, web identity, ECS/EKS, IMDS); a custom endpoint
    /// from `AWS_ENDPOINT_URL(_S3)` implies path-style addressing.
    Default {
        region: Option<String>,
        path_style: bool,
    },
    /// A known endpoint with static credentials (the embedded store).
    Static {
        url: String,
        access_key: String,
        secret_key: String,
    },
}

pub struct ClientSettings {
    pub max_attempts: u32,
    pub attempt_timeout: Duration,
}

pub async fn client(
    endpoint: Endpoint,
    settings: &ClientSettings,
    metrics: Arc<Metrics>,
) -> Client {
    let retry = RetryConfig::standard().with_max_attempts(settings.max_attempts);
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(5))
        .operation_attempt_timeout(settings.attempt_timeout)
        .build();
    let builder = match endpoint {
        Endpoint::Default { region, path_style } => {
            let mut loader = aws_config::defaults(BehaviorVersion::latest());
            if let Some(region) = region {
                loader = loader.region(aws_config::Region::new(region));
            }
            let shared = loader.load().await;
            aws_sdk_s3::config::Builder::from(&shared).force_path_style(path_style)
        }
        Endpoint::Static {
            url,
            access_key,
            secret_key,
        } => aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(url)
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(Credentials::new(
                access_key, secret_key, None, None, "embedded",
            ))
            .force_path_style(true),
    };
    let config = builder
        .retry_config(retry)
        .timeout_config(timeouts)
        .interceptor(CountRetries(metrics))
        .build();
    Client::from_conf(config)
}

/// Counts attempts beyond the first: the SDK retries with backoff, we only observe it.
#[derive(Debug)]
struct CountRetries(Arc<Metrics>);

impl Intercept for CountRetries {
    fn name(&self) -> &'static str {
        "CountRetries"
    }

    fn read_before_attempt(
        &self,
        _: &BeforeTransmitInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if cfg
            .load::<RequestAttempts>()
            .is_some_and(|a| a.attempts() > 1)
        {
            self.0.s3_retries.inc();
        }
        Ok(())
    }
}

/// One bucket, as seen by one set of credentials.
#[derive(Clone, Debug)]
pub struct Bucket {
    pub client: Client,
    pub name: Arc<str>,
}

/// What S3 reports about a stored object.
#[derive(Debug, Clone)]
pub struct Stored {
    pub etag: String,
}

#[derive(Debug, Clone)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

impl Bucket {
    /// Whether `key` exists, as far as these credentials can tell. A 403 counts as "no": S3
    /// answers HeadObject for a missing key with 403 unless the caller may `s3:ListBucket`
    /// without conditions, which per-user session policies deliberately do not allow. This
    /// check only saves a wasted upload; the conditional write (`If-None-Match`) is the guard.
    pub async fn exists(&self, key: &str) -> Result<bool, Error> {
        match self
            .client
            .head_object()
            .bucket(&*self.name)
            .key(key)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(SdkError::ServiceError(e)) if matches!(e.raw().status().as_u16(), 403 | 404) => {
                Ok(false)
            }
            Err(e) => Err(s3_error(e)),
        }
    }

    pub async fn head_bucket(&self) -> Result<(), Error> {
        self.client
            .head_bucket()
            .bucket(&*self.name)
            .send()
            .await
            .map(drop)
            .map_err(s3_error)
    }

    pub async fn put_object(
        &self,
        key: &str,
        part: Part,
        meta: &ObjectMeta,
        overwrite: bool,
    ) -> Result<Stored, Error> {
        let mut req = self
            .client
            .put_object()
            .bucket(&*self.name)
            .key(key)
            .content_length(part.content_length())
            .checksum_algorithm(ChecksumAlgorithm::Crc64Nvme)
            .checksum_crc64_nvme(part.crc64_base64())
            .set_content_type(meta.content_type.clone())
            .set_metadata(meta.user.clone())
            .body(ByteStream::new(part.sdk_body()));
        if !overwrite {
            req = req.if_none_match("*");
        }
        let out = req
            .customize()
            .disable_payload_signing()
            .send()
            .await
            .map_err(s3_error)?;
        Ok(Stored {
            etag: out.e_tag.unwrap_or_default(),
        })
    }

    pub async fn create_multipart(&self, key: &str, meta: &ObjectMeta) -> Result<String, Error> {
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&*self.name)
            .key(key)
            .checksum_algorithm(ChecksumAlgorithm::Crc64Nvme)
            .checksum_type(ChecksumType::FullObject)
            .set_content_type(meta.content_type.clone())
            .set_metadata(meta.user.clone())
            .send()
            .await
            .map_err(s3_error)?;
        out.upload_id
            .ok_or_else(|| Error::Internal("CreateMultipartUpload returned no upload id".into()))
    }

    pub async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        part: Part,
    ) -> Result<CompletedPart, Error> {
        let crc = part.crc64_base64();
        let out = self
            .client
            .upload_part()
            .bucket(&*self.name)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .content_length(part.content_length())
            .checksum_algorithm(ChecksumAlgorithm::Crc64Nvme)
            .checksum_crc64_nvme(&crc)
            .body(ByteStream::new(part.sdk_body()))
            .customize()
            .disable_payload_signing()
            .send()
            .await
            .map_err(s3_error)?;
        Ok(CompletedPart::builder()
            .part_number(number)
            .set_e_tag(out.e_tag)
            .checksum_crc64_nvme(crc)
            .build())
    }

    pub async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<CompletedPart>,
        full_crc64: &str,
        overwrite: bool,
    ) -> Result<Stored, Error> {
        let mut req = self
            .client
            .complete_multipart_upload()
            .bucket(&*self.name)
            .key(key)
            .upload_id(upload_id)
            .checksum_type(ChecksumType::FullObject)
            .checksum_crc64_nvme(full_crc64)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            );
        if !overwrite {
            req = req.if_none_match("*");
        }
        let out = req.send().await.map_err(s3_error)?;
        Ok(Stored {
            etag: out.e_tag.unwrap_or_default(),
        })
    }

    pub async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), Error> {
        self.client
            .abort_multipart_upload()
            .bucket(&*self.name)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
            .map(drop)
            .map_err(s3_error)
    }

    /// A small object (tus state) and its ETag; `None` when it does not exist.
    pub async fn get_small(&self, key: &str) -> Result<Option<(Bytes, String)>, Error> {
        let out = match self
            .client
            .get_object()
            .bucket(&*self.name)
            .key(key)
            .send()
            .await
        {
            Ok(out) => out,
            Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 404 => return Ok(None),
            Err(e) => return Err(s3_error(e)),
        };
        let etag = out.e_tag.clone().unwrap_or_default();
        let bytes = out
            .body
            .collect()
            .await
            .map_err(|e| Error::S3Unreachable(e.to_string()))?
            .into_bytes();
        Ok(Some((bytes, etag)))
    }

    /// Writes a small object under a condition; a lost race is `Error::Conflict`.
    pub async fn put_small(
        &self,
        key: &str,
        bytes: Bytes,
        content_type: &str,
        write: Write<'_>,
    ) -> Result<String, Error> {
        let req = self
            .client
            .put_object()
            .bucket(&*self.name)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(bytes));
        let req = match write {
            Write::Create => req.if_none_match("*"),
            Write::Replace(etag) => req.if_match(etag),
        };
        match req.send().await {
            Ok(out) => Ok(out.e_tag.unwrap_or_default()),
            // 412: the condition failed; 409: a concurrent conditional write; 404: If-Match on
            // an object that was deleted meanwhile.
            Err(SdkError::ServiceError(e))
                if matches!(e.raw().status().as_u16(), 404 | 409 | 412) =>
            {
                Err(Error::Conflict("the upload was changed by another request"))
            }
            Err(e) => Err(s3_error(e)),
        }
    }

    /// Streams an object's bytes.
    pub async fn get_stream(&self, key: &str) -> Result<ByteStream, Error> {
        let out = self
            .client
            .get_object()
            .bucket(&*self.name)
            .key(key)
            .send()
            .await
            .map_err(s3_error)?;
        Ok(out.body)
    }

    /// Deletes objects (missing ones are fine), up to 1,000 per request.
    pub async fn delete_keys(&self, keys: &[String]) -> Result<(), Error> {
        for chunk in keys.chunks(1000) {
            if let [key] = chunk {
                self.client
                    .delete_object()
                    .bucket(&*self.name)
                    .key(key)
                    .send()
                    .await
                    .map_err(s3_error)?;
                continue;
            }
            let objects = chunk
                .iter()
                .map(|k| ObjectIdentifier::builder().key(k).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Error::Internal(e.to_string()))?;
            let delete = Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
                .map_err(|e| Error::Internal(e.to_string()))?;
            let out = self
                .client
                .delete_objects()
                .bucket(&*self.name)
                .delete(delete)
                .send()
                .await
                .map_err(s3_error)?;
            if let Some(err) = out.errors().first() {
                return Err(Error::S3 {
                    status: StatusCode::BAD_GATEWAY,
                    code: err.code().unwrap_or("Unknown").to_owned(),
                    message: err.message().unwrap_or_default().to_owned(),
                    request_id: None,
                });
            }
        }
        Ok(())
    }

    /// Copies bytes `range` (inclusive, `bytes=a-b`) of `source` into part `number`.
    pub async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        source: &str,
        range: Option<(u64, u64)>,
    ) -> Result<CompletedPart, Error> {
        let out = self
            .client
            .upload_part_copy()
            .bucket(&*self.name)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .copy_source(format!("{}/{}", self.name, encode_copy_source(source)))
            .set_copy_source_range(range.map(|(a, b)| format!("bytes={a}-{b}")))
            .send()
            .await
            .map_err(s3_error)?;
        let etag = out.copy_part_result.and_then(|r| r.e_tag);
        Ok(CompletedPart::builder()
            .part_number(number)
            .set_e_tag(etag)
            .build())
    }

    /// One page of the objects under `prefix`.
    pub async fn list(
        &self,
        prefix: &str,
        token: Option<String>,
        limit: i32,
    ) -> Result<(Vec<Listed>, Option<String>), Error> {
        let out = self
            .client
            .list_objects_v2()
            .bucket(&*self.name)
            .prefix(prefix)
            .set_continuation_token(token)
            .max_keys(limit)
            .send()
            .await
            .map_err(s3_error)?;
        let objects = out
            .contents
            .unwrap_or_default()
            .into_iter()
            .filter_map(|o| {
                Some(Listed {
                    key: o.key?,
                    size: o.size.and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
                    etag: o.e_tag,
                    last_modified: o.last_modified.map(|t| t.to_string()),
                })
            })
            .collect();
        Ok((objects, out.next_continuation_token))
    }
}

/// Object attributes set at creation.
#[derive(Debug, Clone, Default)]
pub struct ObjectMeta {
    pub content_type: Option<String>,
    /// S3 user metadata (`x-amz-meta-*`), already sanitized.
    pub user: Option<std::collections::HashMap<String, String>>,
}

/// A condition on a small-object write (tus state): create only, or replace only this version.
#[derive(Debug, Clone)]
pub enum Write<'a> {
    Create,
    Replace(&'a str),
}

/// `x-amz-copy-source` is URL-encoded; `/` separates path segments and stays.
fn encode_copy_source(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Maps an SDK failure (after its retries) to ours, keeping S3's code and request id.
pub fn s3_error<E, R>(e: SdkError<E, R>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + 'static,
    SdkError<E, R>: ProvideErrorMetadata + RequestId,
{
    // The per-user credentials provider failed: report what STS said, not a client error.
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = source {
        if let Some(sts) = err.downcast_ref::<crate::credentials::StsError>() {
            return Error::Sts(sts.clone());
        }
        source = err.source();
    }
    match &e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => Error::S3Unreachable(
            aws_smithy_types::error::display::DisplayErrorContext(&e).to_string(),
        ),
        SdkError::ServiceError(_) | SdkError::ResponseError(_) => {
            let code = e.code().unwrap_or("Unknown").to_owned();
            let throttled = matches!(
                code.as_str(),
                "SlowDown" | "ServiceUnavailable" | "Throttling" | "RequestLimitExceeded"
            );
            Error::S3 {
                status: if throttled {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::BAD_GATEWAY
                },
                message: e.message().unwrap_or_default().to_owned(),
                request_id: e.request_id().map(str::to_owned),
                code,
            }
        }
        _ => Error::Internal(aws_smithy_types::error::display::DisplayErrorContext(&e).to_string()),
    }
}

/// True for the S3 answers to a failed `If-None-Match: *`.
pub fn is_precondition_failed(e: &Error) -> bool {
    matches!(e, Error::S3 { code, .. } if code == "PreconditionFailed" || code == "ConditionalRequestConflict")
}
