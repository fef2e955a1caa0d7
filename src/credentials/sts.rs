//! STS `AssumeRole` for one user: the upload role, narrowed by an inline session policy to the
//! user's prefix, under a session name CloudTrail shows.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_credential_types::Credentials;
use aws_sdk_sts::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sts::operation::assume_role::AssumeRoleError;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use futures_util::future::BoxFuture;

use super::cache::Source;
use super::policy::{session_name, session_policy};
use crate::keys::{KeyLayout, UserSegment};
use crate::metrics::{Metrics, StsOutcome};
use crate::s3::{ClientSettings, Endpoint};

/// One STS attempt; the SDK retries throttling and transient failures within `s3_max_attempts`.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// The validated `sts_*` settings.
#[derive(Debug, Clone)]
pub struct StsSettings {
    pub role_arn: String,
    pub external_id: Option<String>,
    /// `DurationSeconds` of each session.
    pub duration: Duration,
    /// Prepended to the escaped user id in `RoleSessionName`.
    pub session_prefix: String,
    /// Also set `SourceIdentity` (the role's trust policy must allow `sts:SetSourceIdentity`).
    pub source_identity: bool,
    /// Credentials are replaced this long before they expire.
    pub refresh_margin: Duration,
}

impl StsSettings {
    /// The ARN partition of the role (`aws`, `aws-cn`, `aws-us-gov`): the bucket lives there too.
    pub fn partition(&self) -> &str {
        self.role_arn.split(':').nth(1).unwrap_or("aws")
    }
}

/// Checks a role ARN: `arn:<partition>:iam::<12-digit account>:role/<path/name>`.
pub fn check_role_arn(arn: &str) -> Result<(), String> {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let ok = parts.len() == 6
        && parts[0] == "arn"
        && parts[1].starts_with("aws")
        && parts[2] == "iam"
        && parts[3].is_empty()
        && parts[4].len() == 12
        && parts[4].bytes().all(|b| b.is_ascii_digit())
        && parts[5]
            .strip_prefix("role/")
            .is_some_and(|n| !n.is_empty());
    if ok {
        Ok(())
    } else {
        Err("expected arn:aws:iam::<account id>:role/<name>".into())
    }
}

/// Why no credentials could be had. `transient` failures (throttling, STS unreachable or
/// failing) become 503 with `Retry-After`; the rest (access denied, a policy STS refuses, bad
/// configuration) 502. Never carries credentials.
#[derive(Debug, Clone, thiserror::Error)]
#[error("STS {code}: {message}")]
pub struct StsError {
    pub code: String,
    pub message: String,
    pub transient: bool,
}

impl StsError {
    pub fn transient(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_owned(),
            message: message.into(),
            transient: true,
        }
    }

    pub fn internal(message: &str) -> Self {
        Self {
            code: "Internal".to_owned(),
            message: message.to_owned(),
            transient: false,
        }
    }
}

/// Maps an `AssumeRole` failure (after the SDK's retries).
fn sts_error(e: &SdkError<AssumeRoleError, HttpResponse>) -> StsError {
    let detail = || aws_smithy_types::error::display::DisplayErrorContext(e).to_string();
    match e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => {
            StsError::transient("Unreachable", detail())
        }
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            // Some STS-compatible servers send errors the SDK cannot parse: keep the status.
            let code = e
                .code()
                .map_or_else(|| format!("HTTP{status}"), str::to_owned);
            let transient = status >= 500
                || matches!(
                    code.as_str(),
                    "Throttling"
                        | "ThrottlingException"
                        | "RequestLimitExceeded"
                        | "IDPCommunicationError"
                );
            StsError {
                message: e.message().unwrap_or_default().to_owned(),
                code,
                transient,
            }
        }
        SdkError::ResponseError(_) => StsError::transient("BadResponse", detail()),
        // Includes the proxy having no credentials of its own to call STS with.
        _ => StsError {
            code: "ClientError".to_owned(),
            message: detail(),
            transient: false,
        },
    }
}

/// The STS client for the proxy's own identity, reaching STS the way `endpoint` reaches S3:
/// aws-config's default chain (which also honours `AWS_ENDPOINT_URL(_STS)`), or a static test
/// endpoint.
pub async fn client(endpoint: &Endpoint, settings: &ClientSettings) -> aws_sdk_sts::Client {
    let retry = RetryConfig::standard().with_max_attempts(settings.max_attempts);
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(5))
        .operation_attempt_timeout(ATTEMPT_TIMEOUT)
        .build();
    let builder = match endpoint {
        Endpoint::Default { region, .. } => {
            let mut loader = aws_config::defaults(BehaviorVersion::latest());
            if let Some(region) = region {
                loader = loader.region(aws_config::Region::new(region.clone()));
            }
            aws_sdk_sts::config::Builder::from(&loader.load().await)
        }
        Endpoint::Static {
            url,
            access_key,
            secret_key,
        } => aws_sdk_sts::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(url)
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(Credentials::new(
                access_key.clone(),
                secret_key.clone(),
                None,
                None,
                "static",
            )),
    };
    aws_sdk_sts::Client::from_conf(builder.retry_config(retry).timeout_config(timeouts).build())
}

/// Assumes the upload role for a user.
pub struct StsSource {
    pub client: aws_sdk_sts::Client,
    pub settings: StsSettings,
    pub bucket: Arc<str>,
    pub keys: KeyLayout,
    pub metrics: Arc<Metrics>,
}

impl StsSource {
    async fn assume_role(&self, user: &UserSegment) -> Result<Credentials, StsError> {
        let s = &self.settings;
        let name = session_name(&s.session_prefix, user);
        let policy = session_policy(s.partition(), &self.bucket, &self.keys, user);
        let seconds = i32::try_from(s.duration.as_secs())
            .map_err(|_| StsError::internal("sts_duration out of range"))?;
        let out = self
            .client
            .assume_role()
            .role_arn(&s.role_arn)
            .role_session_name(&name)
            .duration_seconds(seconds)
            .policy(policy)
            .set_external_id(s.external_id.clone())
            .set_source_identity(s.source_identity.then(|| name.clone()))
            .send()
            .await
            .map_err(|e| sts_error(&e))?;
        let c = out
            .credentials
            .ok_or_else(|| StsError::internal("AssumeRole returned no credentials"))?;
        let expiry = SystemTime::try_from(c.expiration)
            .map_err(|_| StsError::internal("AssumeRole returned an invalid expiration"))?;
        Ok(Credentials::new(
            c.access_key_id,
            c.secret_access_key,
            Some(c.session_token),
            Some(expiry),
            "s3up-assume-role",
        ))
    }
}

impl Source for StsSource {
    fn assume<'a>(&'a self, user: &'a UserSegment) -> BoxFuture<'a, Result<Credentials, StsError>> {
        Box::pin(async move {
            let result = self.assume_role(user).await;
            let outcome = match &result {
                Ok(_) => "ok",
                Err(e) if e.transient => "unavailable",
                Err(_) => "refused",
            };
            self.metrics
                .sts_assume_role
                .get_or_create(&StsOutcome { outcome })
                .inc();
            match &result {
                Ok(_) => tracing::debug!(user = user.as_str(), "assumed the upload role"),
                Err(e) => tracing::warn!(user = user.as_str(), error = %e, "AssumeRole failed"),
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_arns_are_checked() {
        assert!(check_role_arn("arn:aws:iam::123456789012:role/uploads").is_ok());
        assert!(check_role_arn("arn:aws-cn:iam::123456789012:role/path/to/r").is_ok());
        for bad in [
            "",
            "uploads",
            "arn:aws:iam::123:role/x",
            "arn:aws:iam::123456789012:user/x",
            "arn:aws:iam::123456789012:role/",
            "arn:aws:s3:::bucket",
        ] {
            assert!(check_role_arn(bad).is_err(), "{bad}");
        }
        let s = StsSettings {
            role_arn: "arn:aws-us-gov:iam::123456789012:role/u".into(),
            external_id: None,
            duration: Duration::from_secs(900),
            session_prefix: "s3up-".into(),
            source_identity: false,
            refresh_margin: Duration::from_secs(60),
        };
        assert_eq!(s.partition(), "aws-us-gov");
    }
}
