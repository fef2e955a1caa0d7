//! Typed configuration: a TOML file, then `S3UP_*` environment overrides, validated into
//! [`Settings`] before anything binds a port. Every limit documents its default and why.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_with::{DisplayFromStr, PickFirst, serde_as};

use crate::auth::JwtSettings;
use crate::credentials::StsSettings;
use crate::credentials::policy::{MAX_POLICY_CHARS, check_session_prefix, session_policy};
use crate::credentials::sts::check_role_arn;
use crate::keys::{KeyLayout, UserSegment};

/// S3's hard limits (Amazon S3 user guide, "multipart upload limits").
pub const MIN_PART_SIZE: u64 = 5 * MIB;
pub const MAX_PART_SIZE: u64 = 5 * GIB;
pub const MAX_PARTS: u64 = 10_000;
pub const MAX_OBJECT_SIZE: u64 = MAX_PARTS * MAX_PART_SIZE;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

const ENV_PREFIX: &str = "S3UP_";

/// The raw file/env form. Field names are the TOML keys; `S3UP_<NAME>` overrides each.
#[serde_as]
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on.
    pub listen: String,
    /// Base URL clients reach us at (behind a load balancer); used for absolute URLs.
    pub public_url: Option<String>,
    /// PEM certificate chain and key: serve HTTPS (HTTP/1.1 and HTTP/2 via ALPN).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Target bucket. Setting it (or an AWS endpoint) turns the embedded store off.
    pub bucket: Option<String>,
    pub region: Option<String>,
    /// Where the embedded store keeps its data (dev mode only).
    pub data_dir: PathBuf,
    /// Key prefix template; `{user}` is replaced by the caller's escaped user id.
    pub key_prefix: String,
    /// The JWT claim naming the user.
    pub user_claim: String,
    pub jwt_hs256_secret: Option<Secret>,
    pub jwt_hs256_secret_file: Option<PathBuf>,
    /// PEM public key (RSA, EC P-256 or Ed25519).
    pub jwt_public_key_file: Option<PathBuf>,
    pub jwt_jwks_url: Option<String>,
    /// Comma-separated allow-list, e.g. `RS256,ES256`; empty derives it from the key kind.
    pub jwt_algorithms: Option<String>,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    /// Clock skew tolerated on `exp`/`nbf`.
    #[serde(with = "humantime_serde")]
    pub jwt_leeway: Duration,
    /// Global budget for buffered part bytes, shared by all uploads. Default 256 MiB: 16 parts
    /// of the default size, enough to keep S3 busy from a 2-core box.
    pub memory_budget: Size,
    /// Initial part size. Default 16 MiB: fewer, larger requests cost less CPU per byte while the
    /// first part still starts uploading soon; it grows for large or unbounded bodies.
    pub part_size: Size,
    /// Parts of one upload in flight to S3 at once. Default 4: saturates a link to S3 without
    /// letting a single upload take the whole budget.
    #[serde_as(as = "PickFirst<(_, DisplayFromStr)>")]
    pub parts_in_flight: usize,
    /// Largest object accepted (413 beyond). Default: S3's maximum, 10,000 × 5 GiB.
    pub max_object_size: Size,
    /// Attempts per S3 request (standard retry mode with exponential backoff and jitter).
    #[serde_as(as = "PickFirst<(_, DisplayFromStr)>")]
    pub s3_max_attempts: u32,
    /// Upper bound for one attempt of one S3 request (a whole part upload).
    #[serde(with = "humantime_serde")]
    pub s3_attempt_timeout: Duration,
    /// On SIGTERM, how long running uploads may take to finish before they are aborted.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// `text` or `json`.
    pub log_format: String,

    // Per-user STS credentials and direct-to-S3 mode.
    /// IAM role assumed for every user, with an inline session policy limiting the session to
    /// that user's prefix. Unset: the proxy's own credentials are used (scoping off) and `/sts`
    /// answers 501.
    pub sts_role_arn: Option<String>,
    /// `ExternalId` the role's trust policy may require.
    pub sts_external_id: Option<String>,
    /// Session lifetime. Default 1h: the most role chaining (ECS, Lambda) allows; 900s..12h.
    #[serde(with = "humantime_serde")]
    pub sts_duration: Duration,
    /// `RoleSessionName` = this prefix + the escaped user id, so CloudTrail shows the user.
    pub sts_session_prefix: String,
    /// Also set `SourceIdentity` (the trust policy must allow `sts:SetSourceIdentity`).
    #[serde_as(as = "PickFirst<(_, DisplayFromStr)>")]
    pub sts_source_identity: bool,
    /// Credentials are replaced this long before they expire. Default 5 min: every request and
    /// presigned URL gets at least that much validity; 60s..half of sts_duration.
    #[serde(with = "humantime_serde")]
    pub sts_refresh_margin: Duration,
    /// When set, `/sts` and `/s3/*` also require `x-api-key` with this value (16+ characters).
    pub api_key: Option<Secret>,
    pub api_key_file: Option<PathBuf>,
    // tus 1.0 resumable uploads (src/tus).
    /// Where the tus endpoint lives; upload URLs are `{tus_base_path}{id}`. Default `/files/`,
    /// what tus clients and Uppy expect.
    pub tus_base_path: String,
    /// How long an unfinished tus upload lives after its last PATCH (sliding). Default 24h:
    /// a day to resume a broken upload, while abandoned ones stop costing storage soon.
    #[serde(with = "humantime_serde")]
    pub tus_expiry: Duration,
    /// Largest tus upload (`Tus-Max-Size`, 413 beyond). Default: `max_object_size`.
    pub tus_max_size: Option<Size>,
    /// How often each instance looks for expired tus uploads to remove. Default 15m: expired
    /// uploads go soon after their expiry, and one listing of the (small) expiry index per
    /// interval costs nothing.
    #[serde(with = "humantime_serde")]
    pub tus_reaper_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            public_url: None,
            tls_cert_file: None,
            tls_key_file: None,
            bucket: None,
            region: None,
            data_dir: "./data".into(),
            key_prefix: "uploads/{user}/".into(),
            user_claim: "sub".into(),
            jwt_hs256_secret: None,
            jwt_hs256_secret_file: None,
            jwt_public_key_file: None,
            jwt_jwks_url: None,
            jwt_algorithms: None,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_leeway: Duration::from_secs(30),
            memory_budget: Size(256 * MIB),
            part_size: Size(16 * MIB),
            parts_in_flight: 4,
            max_object_size: Size(MAX_OBJECT_SIZE),
            s3_max_attempts: 5,
            s3_attempt_timeout: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(30),
            log_format: "text".into(),
            sts_role_arn: None,
            sts_external_id: None,
            sts_duration: Duration::from_secs(3600),
            sts_session_prefix: "s3up-".into(),
            sts_source_identity: false,
            sts_refresh_margin: Duration::from_secs(300),
            api_key: None,
            api_key_file: None,
            tus_base_path: "/files/".into(),
            tus_expiry: Duration::from_secs(24 * 3600),
            tus_max_size: None,
            tus_reaper_interval: Duration::from_secs(15 * 60),
        }
    }
}

/// A byte count written as an integer or with a unit (`256MiB`, `1 GiB`, `64kb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Size(n)),
            Raw::Str(s) => s
                .trim()
                .parse::<bytesize::ByteSize>()
                .map(|b| Size(b.as_u64()))
                .map_err(|e| serde::de::Error::custom(format!("invalid size {s:?}: {e}"))),
        }
    }
}

/// A secret string whose `Debug` never shows it.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Rejected configuration; the message names the key. Exit code 64 (EX_USAGE).
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_owned(),
        message: message.into(),
    }
}

/// Where objects go.
#[derive(Debug, Clone)]
pub enum Backend {
    /// Start the embedded S3-compatible store on a loopback port, data under `data_dir`.
    Embedded { data_dir: PathBuf, bucket: String },
    /// Any S3 endpoint reached through aws-config's default chain.
    External {
        bucket: String,
        custom_endpoint: bool,
    },
}

impl Backend {
    pub fn bucket(&self) -> &str {
        match self {
            Backend::Embedded { bucket, .. } | Backend::External { bucket, .. } => bucket,
        }
    }
}

/// Validated settings: everything the server needs, already parsed.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub public_url: Option<String>,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub backend: Backend,
    pub region: Option<String>,
    pub keys: KeyLayout,
    pub jwt: JwtSettings,
    pub upload: UploadSettings,
    pub s3_max_attempts: u32,
    pub s3_attempt_timeout: Duration,
    pub shutdown_grace: Duration,
    pub json_logs: bool,
    /// Per-user STS credentials; `None` when no upload role is configured.
    pub sts: Option<StsSettings>,
    /// Required `x-api-key` for the direct-mode routes.
    pub api_key: Option<Secret>,
    pub tus: TusSettings,
}

#[derive(Debug, Clone)]
pub struct TusSettings {
    /// Starts and ends with `/`.
    pub base_path: String,
    pub expiry: Duration,
    pub max_size: u64,
    pub reaper_interval: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct UploadSettings {
    pub memory_budget: u64,
    pub part_size: u64,
    pub parts_in_flight: usize,
    pub max_object_size: u64,
}

/// The bucket the embedded store serves.
pub const EMBEDDED_BUCKET: &str = "uploads";
const DEV_SECRET_FILE: &str = ".dev-jwt-secret";

impl Config {
    /// Reads `file` (if any), then applies `S3UP_*` variables from `env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| invalid("config", format!("{}: {e}", path.display())))?;
                text.parse::<toml::Table>()
                    .map_err(|e| invalid("config", format!("{}: {e}", path.display())))?
            }
            None => toml::Table::new(),
        };
        for (name, value) in env {
            let Some(key) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if key == "CONFIG" {
                continue;
            }
            table.insert(key.to_ascii_lowercase(), toml::Value::String(value));
        }
        // Deserialize key by key first, so an error names the key that caused it.
        for (key, value) in &table {
            let single = toml::Table::from_iter([(key.clone(), value.clone())]);
            if let Err(e) = Config::deserialize(single) {
                return Err(invalid(
                    &format!("{key} ({ENV_PREFIX}{})", key.to_ascii_uppercase()),
                    e.message(),
                ));
            }
        }
        Config::deserialize(table).map_err(|e| invalid("config", e.message()))
    }

    /// Validates every value, reads secret files, and picks the backend. `aws_endpoint` says
    /// whether `AWS_ENDPOINT_URL`/`AWS_ENDPOINT_URL_S3` is set.
    pub fn validate(self, aws_endpoint: bool) -> Result<Settings, ConfigError> {
        let (sts, api_key) = self.validate_direct(aws_endpoint)?;
        let listen: SocketAddr = self
            .listen
            .parse()
            .map_err(|e| invalid("listen", format!("{:?}: {e}", self.listen)))?;
        if let Some(url) = &self.public_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(invalid("public_url", "must start with http:// or https://"));
        }
        let tls = match (self.tls_cert_file, self.tls_key_file) {
            (None, None) => None,
            (Some(c), Some(k)) => {
                Some((readable("tls_cert_file", c)?, readable("tls_key_file", k)?))
            }
            _ => {
                return Err(invalid(
                    "tls_cert_file",
                    "tls_cert_file and tls_key_file go together",
                ));
            }
        };

        let backend = match (self.bucket, aws_endpoint) {
            (Some(bucket), custom_endpoint) => {
                check_bucket_name(&bucket)?;
                Backend::External {
                    bucket,
                    custom_endpoint,
                }
            }
            (None, true) => {
                return Err(invalid(
                    "bucket",
                    "an AWS endpoint is configured, so S3UP_BUCKET is required",
                ));
            }
            (None, false) => Backend::Embedded {
                data_dir: self.data_dir.clone(),
                bucket: EMBEDDED_BUCKET.into(),
            },
        };

        let keys = KeyLayout::new(&self.key_prefix).map_err(|m| invalid("key_prefix", m))?;
        if self.user_claim.is_empty() {
            return Err(invalid("user_claim", "must not be empty"));
        }

        let upload = UploadSettings {
            memory_budget: self.memory_budget.0,
            part_size: self.part_size.0,
            parts_in_flight: self.parts_in_flight,
            max_object_size: self.max_object_size.0,
        };
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&upload.part_size) {
            return Err(invalid(
                "part_size",
                "must be between 5 MiB and 5 GiB (S3's part limits)",
            ));
        }
        if upload.memory_budget < upload.part_size {
            return Err(invalid(
                "memory_budget",
                "must hold at least one part (>= part_size)",
            ));
        }
        if !(1..=64).contains(&upload.parts_in_flight) {
            return Err(invalid("parts_in_flight", "must be between 1 and 64"));
        }
        if upload.max_object_size == 0 || upload.max_object_size > MAX_OBJECT_SIZE {
            return Err(invalid(
                "max_object_size",
                "must be between 1 byte and 10,000 x 5 GiB",
            ));
        }
        if !(1..=20).contains(&self.s3_max_attempts) {
            return Err(invalid("s3_max_attempts", "must be between 1 and 20"));
        }
        if self.s3_attempt_timeout < Duration::from_secs(1) {
            return Err(invalid("s3_attempt_timeout", "must be at least 1s"));
        }
        let json_logs = match self.log_format.as_str() {
            "text" => false,
            "json" => true,
            other => {
                return Err(invalid(
                    "log_format",
                    format!("{other:?}: expected text or json"),
                ));
            }
        };

        let secret = match (self.jwt_hs256_secret, self.jwt_hs256_secret_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "jwt_hs256_secret",
                    "set jwt_hs256_secret or jwt_hs256_secret_file, not both",
                ));
            }
            (Some(s), None) => Some(s.0.into_bytes()),
            (None, Some(path)) => Some(read_secret_file("jwt_hs256_secret_file", &path)?),
            (None, None) => None,
        };
        if let Some(s) = &secret
            && s.len() < 32
        {
            return Err(invalid(
                "jwt_hs256_secret",
                "must be at least 32 bytes (RFC 7518 §3.2)",
            ));
        }
        let public_key_pem =
            match self.jwt_public_key_file {
                Some(path) => Some(std::fs::read_to_string(&path).map_err(|e| {
                    invalid("jwt_public_key_file", format!("{}: {e}", path.display()))
                })?),
                None => None,
            };
        let sources = usize::from(secret.is_some())
            + usize::from(public_key_pem.is_some())
            + usize::from(self.jwt_jwks_url.is_some());
        if sources > 1 {
            return Err(invalid(
                "jwt_hs256_secret",
                "configure exactly one of jwt_hs256_secret(_file), jwt_public_key_file, jwt_jwks_url",
            ));
        }
        let secret = match (sources, &backend) {
            (0, Backend::Embedded { data_dir, .. }) => Some(dev_secret(data_dir)?),
            (0, Backend::External { .. }) => {
                return Err(invalid(
                    "jwt_hs256_secret",
                    "no JWT verification configured: set jwt_hs256_secret(_file), jwt_public_key_file or jwt_jwks_url",
                ));
            }
            _ => secret,
        };
        let algorithms = match &self.jwt_algorithms {
            None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    s.parse()
                        .map_err(|_| invalid("jwt_algorithms", format!("unknown algorithm {s:?}")))
                })
                .collect::<Result<_, _>>()?,
        };
        let jwt = JwtSettings {
            hs256_secret: secret,
            public_key_pem,
            jwks_url: self.jwt_jwks_url,
            algorithms,
            issuer: self.jwt_issuer,
            audience: self.jwt_audience,
            leeway: self.jwt_leeway,
            user_claim: self.user_claim,
        };
        // Build a verifier once so bad keys or allow-lists fail here, not on the first request.
        crate::auth::Verifier::new(jwt.clone()).map_err(|e| {
            let key = if e.setting == "jwt_public_key" {
                "jwt_public_key_file"
            } else {
                e.setting
            };
            invalid(key, e.reason)
        })?;

        if !(self.tus_base_path.starts_with('/')
            && self.tus_base_path.ends_with('/')
            && self.tus_base_path.len() > 1
            && self.tus_base_path[1..self.tus_base_path.len() - 1]
                .split('/')
                .all(|s| {
                    !s.is_empty()
                        && s.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
                }))
        {
            return Err(invalid(
                "tus_base_path",
                "must look like /files/: starts and ends with '/', plain path segments",
            ));
        }
        if self.tus_expiry < Duration::from_secs(1) {
            return Err(invalid("tus_expiry", "must be at least 1s"));
        }
        if self.tus_reaper_interval < Duration::from_secs(1) {
            return Err(invalid("tus_reaper_interval", "must be at least 1s"));
        }
        let tus_max_size = self.tus_max_size.map_or(upload.max_object_size, |s| s.0);
        if tus_max_size == 0 || tus_max_size > upload.max_object_size {
            return Err(invalid(
                "tus_max_size",
                "must be between 1 byte and max_object_size",
            ));
        }
        let tus = TusSettings {
            base_path: self.tus_base_path,
            expiry: self.tus_expiry,
            max_size: tus_max_size,
            reaper_interval: self.tus_reaper_interval,
        };

        Ok(Settings {
            listen,
            public_url: self.public_url.map(|u| u.trim_end_matches('/').to_owned()),
            tls,
            backend,
            region: self.region,
            keys,
            jwt,
            upload,
            s3_max_attempts: self.s3_max_attempts,
            s3_attempt_timeout: self.s3_attempt_timeout,
            shutdown_grace: self.shutdown_grace,
            json_logs,
            sts,
            api_key,
            tus,
        })
    }

    /// The `sts_*` and `api_key*` settings.
    fn validate_direct(
        &self,
        aws_endpoint: bool,
    ) -> Result<(Option<StsSettings>, Option<Secret>), ConfigError> {
        let api_key = match (&self.api_key, &self.api_key_file) {
            (Some(_), Some(_)) => {
                return Err(invalid("api_key", "set api_key or api_key_file, not both"));
            }
            (Some(k), None) => Some(k.clone()),
            (None, Some(path)) => {
                let bytes = read_secret_file("api_key_file", path)?;
                let text = String::from_utf8(bytes)
                    .map_err(|_| invalid("api_key_file", "must be UTF-8 text"))?;
                Some(Secret(text))
            }
            (None, None) => None,
        };
        if let Some(key) = &api_key
            && (key.0.len() < 16 || !key.0.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(invalid(
                "api_key",
                "must be at least 16 printable ASCII characters without spaces",
            ));
        }

        let Some(role_arn) = &self.sts_role_arn else {
            return Ok((None, api_key));
        };
        check_role_arn(role_arn).map_err(|m| invalid("sts_role_arn", m))?;
        if self.bucket.is_none() && !aws_endpoint {
            return Err(invalid(
                "sts_role_arn",
                "the embedded store has no STS; an upload role needs an external bucket (S3UP_BUCKET)",
            ));
        }
        if let Some(id) = &self.sts_external_id {
            let ok = (2..=1224).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_+=,.@:/-".contains(&b));
            if !ok {
                return Err(invalid(
                    "sts_external_id",
                    "must be 2 to 1224 characters of letters, digits and _ + = , . @ : / -",
                ));
            }
        }
        if !(Duration::from_secs(900)..=Duration::from_secs(12 * 3600)).contains(&self.sts_duration)
        {
            return Err(invalid(
                "sts_duration",
                "must be between 15m and 12h (STS DurationSeconds)",
            ));
        }
        if self.sts_refresh_margin < Duration::from_secs(60)
            || self.sts_refresh_margin > self.sts_duration / 2
        {
            return Err(invalid(
                "sts_refresh_margin",
                "must be at least 60s and at most half of sts_duration",
            ));
        }
        check_session_prefix(&self.sts_session_prefix)
            .map_err(|m| invalid("sts_session_prefix", m))?;
        // The longest possible policy must fit STS's limit (a bad key_prefix is reported later).
        if let (Some(bucket), Ok(keys)) = (&self.bucket, KeyLayout::new(&self.key_prefix)) {
            let longest =
                UserSegment::new(&"x".repeat(128)).expect("128 plain bytes are a valid user id");
            let policy = session_policy("aws-us-gov", bucket, &keys, &longest);
            if policy.len() > MAX_POLICY_CHARS {
                return Err(invalid(
                    "key_prefix",
                    "too long for an STS session policy (2,048 characters)",
                ));
            }
        }
        let sts = StsSettings {
            role_arn: role_arn.clone(),
            external_id: self.sts_external_id.clone(),
            duration: self.sts_duration,
            session_prefix: self.sts_session_prefix.clone(),
            source_identity: self.sts_source_identity,
            refresh_margin: self.sts_refresh_margin,
        };
        Ok((Some(sts), api_key))
    }
}

fn readable(key: &str, path: PathBuf) -> Result<PathBuf, ConfigError> {
    std::fs::metadata(&path).map_err(|e| invalid(key, format!("{}: {e}", path.display())))?;
    Ok(path)
}

fn read_secret_file(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(key, format!("{}: {e}", path.display())))?;
    Ok(text.trim_end_matches(['\r', '\n']).as_bytes().to_vec())
}

/// The dev login's secret: random, kept in the data dir so `serve` and `token` agree.
fn dev_secret(data_dir: &Path) -> Result<Vec<u8>, ConfigError> {
    let path = data_dir.join(DEV_SECRET_FILE);
    if let Ok(secret) = read_secret_file("data_dir", &path) {
        return Ok(secret);
    }
    std::fs::create_dir_all(data_dir)
        .map_err(|e| invalid("data_dir", format!("{}: {e}", data_dir.display())))?;
    let secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    write_private(&path, secret.as_bytes())
        .map_err(|e| invalid("data_dir", format!("{}: {e}", path.display())))?;
    Ok(secret.into_bytes())
}

/// Creates `path` (it must not exist) readable by its owner only.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

fn check_bucket_name(b: &str) -> Result<(), ConfigError> {
    let ok = (3..=63).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
        && !b.starts_with(['-', '.'])
        && !b.ends_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "bucket",
            format!("{b:?} is not a valid S3 bucket name"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn external(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let mut all = env(&[
            ("S3UP_BUCKET", "my-bucket"),
            ("S3UP_JWT_HS256_SECRET", &"x".repeat(32)),
        ]);
        all.extend(env(pairs));
        Config::load(None, all)?.validate(false)
    }

    #[test]
    fn env_overrides_with_units() {
        let s = external(&[
            ("S3UP_MEMORY_BUDGET", "1GiB"),
            ("S3UP_PART_SIZE", "8388608"),
            ("S3UP_PARTS_IN_FLIGHT", "8"),
            ("S3UP_LISTEN", "0.0.0.0:9000"),
            ("OTHER", "ignored"),
        ])
        .unwrap();
        assert_eq!(s.upload.memory_budget, GIB);
        assert_eq!(s.upload.part_size, 8 * MIB);
        assert_eq!(s.upload.parts_in_flight, 8);
        assert_eq!(s.listen.port(), 9000);
        assert!(matches!(s.backend, Backend::External { ref bucket, .. } if bucket == "my-bucket"));
    }

    #[test]
    fn file_then_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "part_size = \"32MiB\"\nparts_in_flight = 2\nbucket = \"from-file\"\n",
        )
        .unwrap();
        let c = Config::load(Some(&path), env(&[("S3UP_PARTS_IN_FLIGHT", "6")])).unwrap();
        assert_eq!(c.part_size, Size(32 * MIB));
        assert_eq!(c.parts_in_flight, 6);
        assert_eq!(c.bucket.as_deref(), Some("from-file"));
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("S3UP_PART_SIZE", "1MiB")], "part_size"),
            (&[("S3UP_PART_SIZE", "lots")], "part_size"),
            (&[("S3UP_MEMORY_BUDGET", "8MiB")], "memory_budget"),
            (&[("S3UP_LISTEN", "nowhere")], "listen"),
            (&[("S3UP_PARTS_IN_FLIGHT", "0")], "parts_in_flight"),
            (&[("S3UP_KEY_PREFIX", "uploads/")], "key_prefix"),
            (&[("S3UP_LOG_FORMAT", "xml")], "log_format"),
            (&[("S3UP_NO_SUCH_KEY", "1")], "no_such_key"),
            (&[("S3UP_TLS_CERT_FILE", "/nonexistent")], "tls_cert_file"),
            (&[("S3UP_JWT_ALGORITHMS", "none")], "jwt_algorithms"),
            (
                &[("S3UP_JWT_JWKS_URL", "https://idp.example/jwks")],
                "jwt_hs256_secret",
            ),
            (&[("S3UP_MAX_OBJECT_SIZE", "0")], "max_object_size"),
        ];
        for (pairs, key) in cases {
            let err = external(pairs).unwrap_err();
            assert!(err.key.starts_with(key), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn tus_settings() {
        let s = external(&[]).unwrap();
        assert_eq!(s.tus.base_path, "/files/");
        assert_eq!(s.tus.expiry, Duration::from_secs(24 * 3600));
        assert_eq!(s.tus.max_size, MAX_OBJECT_SIZE);
        let s = external(&[
            ("S3UP_TUS_BASE_PATH", "/api/tus/"),
            ("S3UP_TUS_EXPIRY", "2h"),
            ("S3UP_TUS_MAX_SIZE", "1GiB"),
            ("S3UP_TUS_REAPER_INTERVAL", "30s"),
        ])
        .unwrap();
        assert_eq!(s.tus.base_path, "/api/tus/");
        assert_eq!(s.tus.expiry, Duration::from_secs(7200));
        assert_eq!(s.tus.max_size, GIB);
        assert_eq!(s.tus.reaper_interval, Duration::from_secs(30));
        for (key, value) in [
            ("S3UP_TUS_BASE_PATH", "files/"),
            ("S3UP_TUS_BASE_PATH", "/files"),
            ("S3UP_TUS_BASE_PATH", "/"),
            ("S3UP_TUS_BASE_PATH", "/a//b/"),
            ("S3UP_TUS_BASE_PATH", "/{id}/"),
            ("S3UP_TUS_EXPIRY", "0s"),
            ("S3UP_TUS_REAPER_INTERVAL", "0s"),
            ("S3UP_TUS_MAX_SIZE", "0"),
        ] {
            let err = external(&[(key, value)]).unwrap_err();
            assert!(
                err.key.starts_with(&key[5..].to_ascii_lowercase()),
                "{value}: {err}"
            );
        }
        let err = external(&[
            ("S3UP_MAX_OBJECT_SIZE", "1GiB"),
            ("S3UP_TUS_MAX_SIZE", "2GiB"),
        ])
        .unwrap_err();
        assert_eq!(err.key, "tus_max_size");
    }

    #[test]
    fn short_secret_and_missing_auth_rejected() {
        let err = Config::load(
            None,
            env(&[("S3UP_BUCKET", "b-1"), ("S3UP_JWT_HS256_SECRET", "short")]),
        )
        .unwrap()
        .validate(false)
        .unwrap_err();
        assert_eq!(err.key, "jwt_hs256_secret");
        let err = Config::load(None, env(&[("S3UP_BUCKET", "b-1")]))
            .unwrap()
            .validate(false)
            .unwrap_err();
        assert_eq!(err.key, "jwt_hs256_secret");
        let err = Config::load(None, env(&[]))
            .unwrap()
            .validate(true)
            .unwrap_err();
        assert_eq!(err.key, "bucket");
    }

    #[test]
    fn sts_settings_and_api_key() {
        let role = (
            "S3UP_STS_ROLE_ARN",
            "arn:aws:iam::123456789012:role/uploads",
        );
        let s = external(&[role]).unwrap();
        let sts = s.sts.unwrap();
        assert_eq!(sts.duration, Duration::from_secs(3600));
        assert_eq!(sts.refresh_margin, Duration::from_secs(300));
        assert_eq!(sts.session_prefix, "s3up-");
        assert!(!sts.source_identity && sts.external_id.is_none());
        assert!(s.api_key.is_none());
        let s = external(&[
            role,
            ("S3UP_STS_DURATION", "2h"),
            ("S3UP_STS_REFRESH_MARGIN", "10m"),
            ("S3UP_STS_SOURCE_IDENTITY", "true"),
            ("S3UP_STS_EXTERNAL_ID", "tenant-42"),
            ("S3UP_STS_SESSION_PREFIX", "web@"),
            ("S3UP_API_KEY", "k-0123456789abcdef"),
        ])
        .unwrap();
        let sts = s.sts.unwrap();
        assert_eq!(sts.duration, Duration::from_secs(7200));
        assert_eq!(sts.refresh_margin, Duration::from_secs(600));
        assert!(sts.source_identity);
        assert_eq!(sts.external_id.as_deref(), Some("tenant-42"));
        assert_eq!(sts.session_prefix, "web@");
        assert_eq!(s.api_key.unwrap().0, "k-0123456789abcdef");
        // Without a role there is no scoping, whatever else is set.
        assert!(external(&[]).unwrap().sts.is_none());
    }

    #[test]
    fn bad_sts_settings_name_the_key() {
        let role = (
            "S3UP_STS_ROLE_ARN",
            "arn:aws:iam::123456789012:role/uploads",
        );
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("S3UP_STS_ROLE_ARN", "uploads")], "sts_role_arn"),
            (&[role, ("S3UP_STS_DURATION", "10m")], "sts_duration"),
            (&[role, ("S3UP_STS_DURATION", "13h")], "sts_duration"),
            (
                &[role, ("S3UP_STS_REFRESH_MARGIN", "10s")],
                "sts_refresh_margin",
            ),
            (
                &[role, ("S3UP_STS_REFRESH_MARGIN", "31m")],
                "sts_refresh_margin",
            ),
            (
                &[role, ("S3UP_STS_SESSION_PREFIX", "a+b")],
                "sts_session_prefix",
            ),
            (&[role, ("S3UP_STS_EXTERNAL_ID", "x")], "sts_external_id"),
            (
                &[role, ("S3UP_STS_SOURCE_IDENTITY", "maybe")],
                "sts_source_identity",
            ),
            (
                &[
                    role,
                    ("S3UP_KEY_PREFIX", &format!("{}/{{user}}/", "p".repeat(700))),
                ],
                "key_prefix",
            ),
            (&[("S3UP_API_KEY", "short")], "api_key"),
        ];
        for (pairs, key) in cases {
            let err = external(pairs).unwrap_err();
            assert!(err.key.starts_with(key), "{pairs:?}: {err}");
        }
        // The embedded store has no STS.
        let err = Config::load(None, env(&[role]))
            .unwrap()
            .validate(false)
            .unwrap_err();
        assert_eq!(err.key, "sts_role_arn");
    }

    #[test]
    fn api_key_from_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "file-key-0123456789\n").unwrap();
        let s = external(&[("S3UP_API_KEY_FILE", path.to_str().unwrap())]).unwrap();
        assert_eq!(s.api_key.unwrap().0, "file-key-0123456789");
        let err = external(&[
            ("S3UP_API_KEY_FILE", path.to_str().unwrap()),
            ("S3UP_API_KEY", "k-0123456789abcdef"),
        ])
        .unwrap_err();
        assert_eq!(err.key, "api_key");
    }

    #[test]
    fn embedded_default_creates_a_stable_dev_secret() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let load = || {
            Config::load(None, env(&[("S3UP_DATA_DIR", data.to_str().unwrap())]))
                .unwrap()
                .validate(false)
                .unwrap()
        };
        let (a, b) = (load(), load());
        assert!(matches!(a.backend, Backend::Embedded { .. }));
        assert_eq!(a.jwt.hs256_secret, b.jwt.hs256_secret);
        assert!(a.jwt.hs256_secret.unwrap().len() >= 32);
    }

    #[test]
    fn secret_from_file_and_debug_redacts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, format!("{}\n", "s".repeat(40))).unwrap();
        let s = Config::load(
            None,
            env(&[
                ("S3UP_BUCKET", "b-1"),
                ("S3UP_JWT_HS256_SECRET_FILE", path.to_str().unwrap()),
            ]),
        )
        .unwrap()
        .validate(false)
        .unwrap();
        assert_eq!(
            s.jwt.hs256_secret.as_deref(),
            Some("s".repeat(40).as_bytes())
        );
        let c = Config {
            jwt_hs256_secret: Some(Secret("hunter2-hunter2".into())),
            ..Config::default()
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
