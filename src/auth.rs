//! Bearer-token authentication: verifies a JWT against an HMAC secret, one public key or a
//! JWKS endpoint and returns the claim that names the user. Also mints HS256 tokens.

use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{
    Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, EncodingKey, Header, Validation,
};
use serde_json::{Map, Value};

/// A JWKS fetch that takes longer than this fails; the request waiting on it gets a 503.
const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Unknown `kid`s can be sent by anyone, so they may cause at most one fetch per interval.
const JWKS_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// Cached keys are refetched after this long, so keys the IdP removed stop being trusted.
const JWKS_MAX_AGE: Duration = Duration::from_mins(10);
/// RFC 7518 3.2: an HS256 key must be at least as long as the hash output.
const MIN_HS256_SECRET_LEN: usize = 32;

/// How tokens are verified. Exactly one of the three key sources must be set.
#[derive(Clone)]
pub struct JwtSettings {
    pub hs256_secret: Option<Vec<u8>>,
    /// PEM text of one RSA, EC (P-256/P-384) or Ed25519 public key.
    pub public_key_pem: Option<String>,
    /// JWKS endpoint (http or https), fetched lazily on the first verification.
    pub jwks_url: Option<String>,
    /// Allowed `alg` values; empty means the ones that fit the key source.
    pub algorithms: Vec<Algorithm>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway: Duration,
    /// Claim naming the user; it must be a non-empty JSON string.
    pub user_claim: String,
}

impl Default for JwtSettings {
    fn default() -> Self {
        Self {
            hs256_secret: None,
            public_key_pem: None,
            jwks_url: None,
            algorithms: Vec::new(),
            issuer: None,
            audience: None,
            leeway: Duration::from_mins(1),
            user_claim: "sub".to_owned(),
        }
    }
}

impl fmt::Debug for JwtSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSettings")
            .field(
                "hs256_secret",
                &self.hs256_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("public_key_pem", &self.public_key_pem.is_some())
            .field("jwks_url", &self.jwks_url)
            .field("algorithms", &self.algorithms)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway", &self.leeway)
            .field("user_claim", &self.user_claim)
            .finish()
    }
}

/// A setting that cannot work, named as in the configuration.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {reason}")]
pub struct SetupError {
    pub setting: &'static str,
    pub reason: String,
}

fn setup_error(setting: &'static str, reason: impl Into<String>) -> SetupError {
    SetupError {
        setting,
        reason: reason.into(),
    }
}

/// Why a request was not authenticated. Only `JwksUnavailable` is our fault (503); the rest
/// are the client's (401). No variant carries the token.
#[derive(Debug, thiserror::Error)]
#[error("{}", self.description())]
pub enum AuthError {
    MissingToken,
    BadAuthorizationHeader,
    MalformedToken,
    BadSignature,
    Expired,
    NotYetValid,
    MissingExpiry,
    WrongIssuer,
    WrongAudience,
    AlgorithmNotAllowed,
    /// No key matches the token's `kid` and `alg`, even after refreshing the JWKS.
    UnknownKey,
    InvalidUserClaim,
    JwksUnavailable,
}

impl AuthError {
    /// Short text that is safe to send to clients.
    pub fn description(&self) -> &'static str {
        match self {
            Self::MissingToken => "missing bearer token",
            Self::BadAuthorizationHeader => "malformed Authorization header",
            Self::MalformedToken => "malformed token",
            Self::BadSignature => "invalid token signature",
            Self::Expired => "token expired",
            Self::NotYetValid => "token not yet valid",
            Self::MissingExpiry => "token has no valid expiry",
            Self::WrongIssuer => "wrong token issuer",
            Self::WrongAudience => "wrong token audience",
            Self::AlgorithmNotAllowed => "token algorithm not allowed",
            Self::UnknownKey => "unknown token signing key",
            Self::InvalidUserClaim => "token has no valid user claim",
            Self::JwksUnavailable => "authentication keys unavailable",
        }
    }
}

fn auth_error(err: &jsonwebtoken::errors::Error) -> AuthError {
    match err.kind() {
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidKeyFormat
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey => AuthError::BadSignature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::InvalidAlgorithm => AuthError::AlgorithmNotAllowed,
        ErrorKind::MissingRequiredClaim(claim) | ErrorKind::InvalidClaimFormat(claim) => {
            match claim.as_str() {
                "exp" => AuthError::MissingExpiry,
                "iss" => AuthError::WrongIssuer,
                "aud" => AuthError::WrongAudience,
                _ => AuthError::MalformedToken,
            }
        }
        _ => AuthError::MalformedToken,
    }
}

/// Returns the token of an `Authorization: Bearer <token>` header.
pub fn bearer_token(headers: &http::HeaderMap) -> Result<&str, AuthError> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let value = values.next().ok_or(AuthError::MissingToken)?;
    // Two headers are ambiguous; picking one could let a proxy and us disagree.
    if values.next().is_some() {
        return Err(AuthError::BadAuthorizationHeader);
    }
    let value = value
        .to_str()
        .map_err(|_| AuthError::BadAuthorizationHeader)?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer")
                && !token.is_empty()
                && !token.contains(' ') =>
        {
            Ok(token)
        }
        _ => Err(AuthError::BadAuthorizationHeader),
    }
}

/// Signs an HS256 token with `iat`, `exp` and, when given, `iss` and `aud`.
pub fn mint_hs256(
    secret: &[u8],
    user_claim: &str,
    user: &str,
    ttl: Duration,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> Result<String, jsonwebtoken::errors::Error> {
    ensure_crypto_provider();
    let now = jsonwebtoken::get_current_timestamp();
    let mut claims = Map::new();
    claims.insert(user_claim.to_owned(), user.into());
    claims.insert("iat".to_owned(), now.into());
    claims.insert("exp".to_owned(), now.saturating_add(ttl.as_secs()).into());
    if let Some(issuer) = issuer {
        claims.insert("iss".to_owned(), issuer.into());
    }
    if let Some(audience) = audience {
        claims.insert("aud".to_owned(), audience.into());
    }
    let key = EncodingKey::from_secret(secret)?;
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key)
}

/// jsonwebtoken picks aws-lc by itself unless some other crate also enables its
/// `rust_crypto` feature; installing it explicitly keeps tokens working in that case.
fn ensure_crypto_provider() {
    if jsonwebtoken::crypto::CryptoProvider::try_get_default().is_none() {
        // Losing a race to another installer is fine: any provider will do.
        let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
    }
}

/// Verifies bearer tokens. Cheap to clone; clones share the JWKS cache.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

struct Inner {
    keys: KeySource,
    /// One per allowed algorithm: jsonwebtoken requires every algorithm in a `Validation` to
    /// fit the key, and JWKS keys differ in kind.
    validations: Vec<Validation>,
    user_claim: String,
}

enum KeySource {
    Static(DecodingKey),
    Jwks(Jwks),
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys = match &self.inner.keys {
            KeySource::Static(key) if key.family() == AlgorithmFamily::Hmac => "hs256 secret",
            KeySource::Static(_) => "public key",
            KeySource::Jwks(jwks) => jwks.url.as_str(),
        };
        let algorithms: Vec<_> = self
            .inner
            .validations
            .iter()
            .flat_map(|v| &v.algorithms)
            .collect();
        f.debug_struct("Verifier")
            .field("keys", &keys)
            .field("algorithms", &algorithms)
            .field("user_claim", &self.inner.user_claim)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    pub fn new(settings: JwtSettings) -> Result<Self, SetupError> {
        Self::build(settings, JWKS_REFRESH_INTERVAL, JWKS_MAX_AGE)
    }

    fn build(
        settings: JwtSettings,
        refresh_interval: Duration,
        max_age: Duration,
    ) -> Result<Self, SetupError> {
        ensure_crypto_provider();
        if settings.user_claim.is_empty() {
            return Err(setup_error("jwt_user_claim", "must not be empty"));
        }
        let (keys, fitting) = match (
            &settings.hs256_secret,
            &settings.public_key_pem,
            &settings.jwks_url,
        ) {
            (Some(secret), None, None) => {
                (KeySource::Static(hmac_key(secret)?), vec![Algorithm::HS256])
            }
            (None, Some(pem), None) => {
                let (key, alg) = public_key(pem)?;
                (KeySource::Static(key), vec![alg])
            }
            (None, None, Some(url)) => (
                KeySource::Jwks(Jwks::new(url, refresh_interval, max_age)?),
                vec![Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA],
            ),
            _ => {
                return Err(setup_error(
                    "jwt",
                    "set exactly one of jwt_hs256_secret, jwt_public_key, jwt_jwks_url",
                ));
            }
        };
        let algorithms = if settings.algorithms.is_empty() {
            fitting
        } else {
            check_algorithms(&settings.algorithms, &keys)?
        };
        let validations = algorithms
            .into_iter()
            .map(|alg| validation(alg, &settings))
            .collect();
        Ok(Self {
            inner: Arc::new(Inner {
                keys,
                validations,
                user_claim: settings.user_claim,
            }),
        })
    }

    /// True when tokens can be minted, i.e. an HS256 secret is configured.
    pub fn can_mint(&self) -> bool {
        matches!(&self.inner.keys, KeySource::Static(key) if key.family() == AlgorithmFamily::Hmac)
    }

    /// Verifies `token` and returns its user claim.
    pub async fn verify(&self, token: &str) -> Result<String, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::MalformedToken)?;
        // Checked before any key lookup, so a disallowed token cannot trigger a JWKS fetch.
        let validation = self
            .inner
            .validations
            .iter()
            .find(|v| v.algorithms.contains(&header.alg))
            .ok_or(AuthError::AlgorithmNotAllowed)?;
        let jwks_key;
        let key = match &self.inner.keys {
            KeySource::Static(key) => key,
            KeySource::Jwks(jwks) => {
                jwks_key = jwks.key_for(header.alg, header.kid.as_deref()).await?;
                &*jwks_key
            }
        };
        let mut claims = jsonwebtoken::decode::<Map<String, Value>>(token, key, validation)
            .map_err(|e| auth_error(&e))?
            .claims;
        // An empty user would map to the bucket root, so it is rejected like a missing one.
        match claims.remove(&self.inner.user_claim) {
            Some(Value::String(user)) if !user.is_empty() => Ok(user),
            _ => Err(AuthError::InvalidUserClaim),
        }
    }
}

fn hmac_key(secret: &[u8]) -> Result<DecodingKey, SetupError> {
    if secret.len() < MIN_HS256_SECRET_LEN {
        return Err(setup_error(
            "jwt_hs256_secret",
            format!("must be at least {MIN_HS256_SECRET_LEN} bytes"),
        ));
    }
    DecodingKey::from_secret(secret).map_err(|e| setup_error("jwt_hs256_secret", e.to_string()))
}

/// Parses a public key PEM and returns it with the algorithm its kind implies.
fn public_key(pem: &str) -> Result<(DecodingKey, Algorithm), SetupError> {
    const SETTING: &str = "jwt_public_key";
    if pem.contains("PRIVATE KEY-----") {
        return Err(setup_error(
            SETTING,
            "is a private key; configure the public key",
        ));
    }
    // jsonwebtoken also takes certificates but reads their key unreliably.
    if !pem.contains("-----BEGIN PUBLIC KEY-----")
        && !pem.contains("-----BEGIN RSA PUBLIC KEY-----")
    {
        return Err(setup_error(SETTING, "not a PEM public key"));
    }
    let pem = pem.as_bytes();
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        return Ok((key, Algorithm::RS256));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        // The key holds the uncompressed point, 97 bytes on P-384 and 65 on P-256.
        let alg = match key.kind() {
            DecodingKeyKind::SecretOrDer(point) if point.len() == 97 => Algorithm::ES384,
            _ => Algorithm::ES256,
        };
        return Ok((key, alg));
    }
    if let Ok(key) = DecodingKey::from_ed_pem(pem) {
        return Ok((key, Algorithm::EdDSA));
    }
    Err(setup_error(SETTING, "not an RSA, EC or Ed25519 public key"))
}

/// Checks an explicit allow-list against the key source; HMAC never shares a list with
/// public-key algorithms, so a public key can never be used as an HMAC secret.
fn check_algorithms(
    algorithms: &[Algorithm],
    keys: &KeySource,
) -> Result<Vec<Algorithm>, SetupError> {
    const SETTING: &str = "jwt_algorithms";
    let is_hmac = |alg: &Algorithm| alg.family() == AlgorithmFamily::Hmac;
    if algorithms.iter().any(is_hmac) && !algorithms.iter().all(is_hmac) {
        return Err(setup_error(
            SETTING,
            "must not mix HMAC and public-key algorithms",
        ));
    }
    let mut allowed = Vec::new();
    for &alg in algorithms {
        let fits = match keys {
            KeySource::Static(key) => key.family() == alg.family(),
            KeySource::Jwks(_) => !is_hmac(&alg),
        };
        if !fits {
            return Err(setup_error(
                SETTING,
                format!("{alg:?} does not fit the configured key"),
            ));
        }
        if !allowed.contains(&alg) {
            allowed.push(alg);
        }
    }
    Ok(allowed)
}

fn validation(alg: Algorithm, settings: &JwtSettings) -> Validation {
    let mut validation = Validation::new(alg);
    validation.leeway = settings.leeway.as_secs();
    validation.validate_nbf = true;
    // jsonwebtoken checks iss and aud only when present, so configured ones are required.
    if let Some(issuer) = &settings.issuer {
        validation.set_issuer(&[issuer]);
        validation.required_spec_claims.insert("iss".to_owned());
    }
    match &settings.audience {
        Some(audience) => {
            validation.set_audience(&[audience]);
            validation.required_spec_claims.insert("aud".to_owned());
        }
        // Without a configured audience any `aud` is fine; jsonwebtoken would reject it.
        None => validation.validate_aud = false,
    }
    validation
}

/// Keys from a JWKS endpoint, fetched on demand and cached.
struct Jwks {
    url: reqwest::Url,
    client: reqwest::Client,
    refresh_interval: Duration,
    max_age: Duration,
    keys: RwLock<Arc<KeySet>>,
    /// Held during a fetch so concurrent misses share it; holds the last attempt's time.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
}

#[derive(Default)]
struct KeySet {
    keys: Vec<JwksKey>,
    /// `None` until the first successful fetch.
    fetched_at: Option<Instant>,
}

struct JwksKey {
    kid: Option<String>,
    alg: Option<KeyAlgorithm>,
    key: Arc<DecodingKey>,
}

impl Jwks {
    fn new(url: &str, refresh_interval: Duration, max_age: Duration) -> Result<Self, SetupError> {
        const SETTING: &str = "jwt_jwks_url";
        let url = reqwest::Url::parse(url).map_err(|e| setup_error(SETTING, e.to_string()))?;
        match url.scheme() {
            "https" => {}
            "http" => {
                tracing::warn!(%url, "JWKS fetched over plain http; keys can be forged in transit");
            }
            _ => return Err(setup_error(SETTING, "must be an http or https URL")),
        }
        let client = reqwest::Client::builder()
            .timeout(JWKS_FETCH_TIMEOUT)
            .build()
            .map_err(|e| setup_error(SETTING, format!("cannot build HTTP client: {e}")))?;
        Ok(Self {
            url,
            client,
            refresh_interval,
            max_age,
            keys: RwLock::default(),
            last_fetch: tokio::sync::Mutex::new(None),
        })
    }

    fn current(&self) -> Arc<KeySet> {
        Arc::clone(&self.keys.read().unwrap_or_else(PoisonError::into_inner))
    }

    async fn key_for(
        &self,
        alg: Algorithm,
        kid: Option<&str>,
    ) -> Result<Arc<DecodingKey>, AuthError> {
        let mut keys = self.current();
        let fresh = keys
            .fetched_at
            .is_some_and(|at| at.elapsed() < self.max_age);
        if fresh && let Some(key) = keys.find(alg, kid) {
            return Ok(key);
        }
        keys = self.refresh(&keys).await?;
        keys.find(alg, kid).ok_or(AuthError::UnknownKey)
    }

    /// Fetches the key set unless another task replaced `seen` meanwhile or the last attempt
    /// was too recent. Known keys stay in use when a fetch fails.
    async fn refresh(&self, seen: &Arc<KeySet>) -> Result<Arc<KeySet>, AuthError> {
        let mut last_fetch = self.last_fetch.lock().await;
        let current = self.current();
        let rate_limited = last_fetch.is_some_and(|at| at.elapsed() < self.refresh_interval);
        if !Arc::ptr_eq(&current, seen) || rate_limited {
            return usable(current);
        }
        *last_fetch = Some(Instant::now());
        match self.fetch().await {
            Ok(keys) => {
                let keys = Arc::new(keys);
                *self.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::clone(&keys);
                Ok(keys)
            }
            Err(error) => {
                tracing::warn!(url = %self.url, ?error, "JWKS fetch failed");
                usable(current)
            }
        }
    }

    async fn fetch(&self) -> Result<KeySet, reqwest::Error> {
        let set: JwkSet = self
            .client
            .get(self.url.clone())
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let keys: Vec<_> = set
            .keys
            .iter()
            .filter(|jwk| jwk.common.public_key_use != Some(PublicKeyUse::Encryption))
            .filter_map(|jwk| match DecodingKey::from_jwk(jwk) {
                // Symmetric keys have no place in a public key set.
                Ok(key) if key.family() != AlgorithmFamily::Hmac => Some(JwksKey {
                    kid: jwk.common.key_id.clone(),
                    alg: jwk.common.key_algorithm,
                    key: Arc::new(key),
                }),
                _ => {
                    tracing::debug!(kid = ?jwk.common.key_id, "skipping unusable JWKS key");
                    None
                }
            })
            .collect();
        tracing::debug!(url = %self.url, keys = keys.len(), "JWKS fetched");
        Ok(KeySet {
            keys,
            fetched_at: Some(Instant::now()),
        })
    }
}

/// A key set is usable once fetched; before that, failing to fetch it is our problem.
fn usable(keys: Arc<KeySet>) -> Result<Arc<KeySet>, AuthError> {
    if keys.fetched_at.is_some() {
        Ok(keys)
    } else {
        Err(AuthError::JwksUnavailable)
    }
}

impl KeySet {
    fn find(&self, alg: Algorithm, kid: Option<&str>) -> Option<Arc<DecodingKey>> {
        let mut fitting = self.keys.iter().filter(|k| {
            k.key.family() == alg.family() && k.alg.is_none_or(|a| a == KeyAlgorithm::from(alg))
        });
        let found = match kid {
            Some(kid) => fitting.find(|k| k.kid.as_deref() == Some(kid)),
            // Without a kid, only a single kid-less key of the right kind is unambiguous.
            None => {
                let mut kidless = fitting.filter(|k| k.kid.is_none());
                match (kidless.next(), kidless.next()) {
                    (Some(key), None) => Some(key),
                    _ => None,
                }
            }
        };
        found.map(|k| Arc::clone(&k.key))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use http::{HeaderMap, HeaderValue, header::AUTHORIZATION};
    use serde_json::json;

    use super::*;

    const SECRET: &[u8] = b"test-secret-0123456789abcdef-0123456789";
    const RSA_PRIVATE: &str = include_str!("../tests/fixtures/jwt/rsa_private.pem");
    const RSA_PUBLIC: &str = include_str!("../tests/fixtures/jwt/rsa_public.pem");
    const EC_PRIVATE: &str = include_str!("../tests/fixtures/jwt/ec_private.pem");
    const EC_PUBLIC: &str = include_str!("../tests/fixtures/jwt/ec_public.pem");
    const ED_PRIVATE: &str = include_str!("../tests/fixtures/jwt/ed25519_private.pem");
    const ED_PUBLIC: &str = include_str!("../tests/fixtures/jwt/ed25519_public.pem");
    const JWKS: &str = include_str!("../tests/fixtures/jwt/jwks.json");

    fn now() -> i64 {
        i64::try_from(jsonwebtoken::get_current_timestamp()).expect("timestamp fits i64")
    }

    fn claims() -> Value {
        json!({ "sub": "alice", "exp": now() + 300 })
    }

    fn sign(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, key).expect("sign")
    }

    fn hs256(claims: &Value) -> String {
        let key = EncodingKey::from_secret(SECRET).expect("key");
        sign(Algorithm::HS256, &key, None, claims)
    }

    fn rsa_key() -> EncodingKey {
        EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).expect("rsa key")
    }

    fn ec_key() -> EncodingKey {
        EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).expect("ec key")
    }

    fn ed_key() -> EncodingKey {
        EncodingKey::from_ed_pem(ED_PRIVATE.as_bytes()).expect("ed key")
    }

    fn hmac_settings() -> JwtSettings {
        JwtSettings {
            hs256_secret: Some(SECRET.to_vec()),
            leeway: Duration::from_secs(30),
            ..JwtSettings::default()
        }
    }

    fn pem_verifier(pem: &str) -> Verifier {
        let settings = JwtSettings {
            public_key_pem: Some(pem.to_owned()),
            ..JwtSettings::default()
        };
        Verifier::new(settings).expect("verifier")
    }

    async fn verify_hs256(settings: JwtSettings, claims: &Value) -> Result<String, AuthError> {
        Verifier::new(settings)
            .expect("verifier")
            .verify(&hs256(claims))
            .await
    }

    fn setup_err(settings: JwtSettings) -> SetupError {
        Verifier::new(settings).expect_err("settings must be rejected")
    }

    #[test]
    fn verifier_is_send_sync_clone() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<Verifier>();
    }

    #[tokio::test]
    async fn hs256_accepts_valid_token() {
        let verifier = Verifier::new(hmac_settings()).expect("verifier");
        assert!(verifier.can_mint());
        assert_eq!(
            verifier.verify(&hs256(&claims())).await.expect("valid"),
            "alice"
        );
    }

    #[tokio::test]
    async fn minted_token_verifies_with_issuer_and_audience() {
        let settings = JwtSettings {
            issuer: Some("proxy".into()),
            audience: Some("uploads".into()),
            user_claim: "email".into(),
            ..hmac_settings()
        };
        let ttl = Duration::from_mins(1);
        let token = mint_hs256(
            SECRET,
            "email",
            "a@example.com",
            ttl,
            Some("proxy"),
            Some("uploads"),
        )
        .expect("mint");
        let verifier = Verifier::new(settings).expect("verifier");
        assert_eq!(
            verifier.verify(&token).await.expect("valid"),
            "a@example.com"
        );
    }

    #[tokio::test]
    async fn rejects_wrong_secret() {
        let key = EncodingKey::from_secret(b"another-secret-0123456789abcdef-0123").expect("key");
        let token = sign(Algorithm::HS256, &key, None, &claims());
        let verifier = Verifier::new(hmac_settings()).expect("verifier");
        assert!(matches!(
            verifier.verify(&token).await,
            Err(AuthError::BadSignature)
        ));
    }

    #[tokio::test]
    async fn expiry_honours_leeway() {
        let expired = json!({ "sub": "alice", "exp": now() - 60 });
        let within_leeway = json!({ "sub": "alice", "exp": now() - 10 });
        let no_exp = json!({ "sub": "alice" });
        assert!(matches!(
            verify_hs256(hmac_settings(), &expired).await,
            Err(AuthError::Expired)
        ));
        assert!(verify_hs256(hmac_settings(), &within_leeway).await.is_ok());
        assert!(matches!(
            verify_hs256(hmac_settings(), &no_exp).await,
            Err(AuthError::MissingExpiry)
        ));
    }

    #[tokio::test]
    async fn not_before_honours_leeway() {
        let future = json!({ "sub": "alice", "exp": now() + 600, "nbf": now() + 120 });
        let within_leeway = json!({ "sub": "alice", "exp": now() + 600, "nbf": now() + 10 });
        assert!(matches!(
            verify_hs256(hmac_settings(), &future).await,
            Err(AuthError::NotYetValid)
        ));
        assert!(verify_hs256(hmac_settings(), &within_leeway).await.is_ok());
    }

    #[tokio::test]
    async fn rejects_wrong_or_missing_issuer() {
        let settings = || JwtSettings {
            issuer: Some("https://idp".into()),
            ..hmac_settings()
        };
        let wrong = json!({ "sub": "alice", "exp": now() + 60, "iss": "https://evil" });
        let right = json!({ "sub": "alice", "exp": now() + 60, "iss": "https://idp" });
        assert!(matches!(
            verify_hs256(settings(), &wrong).await,
            Err(AuthError::WrongIssuer)
        ));
        assert!(matches!(
            verify_hs256(settings(), &claims()).await,
            Err(AuthError::WrongIssuer)
        ));
        assert!(verify_hs256(settings(), &right).await.is_ok());
    }

    #[tokio::test]
    async fn rejects_wrong_or_missing_audience() {
        let settings = || JwtSettings {
            audience: Some("uploads".into()),
            ..hmac_settings()
        };
        let wrong = json!({ "sub": "alice", "exp": now() + 60, "aud": "billing" });
        let right = json!({ "sub": "alice", "exp": now() + 60, "aud": ["billing", "uploads"] });
        assert!(matches!(
            verify_hs256(settings(), &wrong).await,
            Err(AuthError::WrongAudience)
        ));
        assert!(matches!(
            verify_hs256(settings(), &claims()).await,
            Err(AuthError::WrongAudience)
        ));
        assert!(verify_hs256(settings(), &right).await.is_ok());
        // Without a configured audience, any audience is accepted.
        assert!(verify_hs256(hmac_settings(), &wrong).await.is_ok());
    }

    #[tokio::test]
    async fn rejects_alg_none() {
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(claims().to_string());
        let verifier = Verifier::new(hmac_settings()).expect("verifier");
        for token in [
            format!("{header}.{payload}."),
            format!("{header}.{payload}.c2ln"),
        ] {
            assert!(matches!(
                verifier.verify(&token).await,
                Err(AuthError::MalformedToken)
            ));
        }
    }

    #[tokio::test]
    async fn rejects_hmac_token_signed_with_rsa_public_key() {
        let key = EncodingKey::from_secret(RSA_PUBLIC.as_bytes()).expect("key");
        let token = sign(Algorithm::HS256, &key, None, &claims());
        let result = pem_verifier(RSA_PUBLIC).verify(&token).await;
        assert!(matches!(result, Err(AuthError::AlgorithmNotAllowed)));
    }

    #[tokio::test]
    async fn rejects_algorithm_outside_allow_list() {
        let settings = JwtSettings {
            algorithms: vec![Algorithm::HS384],
            ..hmac_settings()
        };
        assert!(matches!(
            verify_hs256(settings, &claims()).await,
            Err(AuthError::AlgorithmNotAllowed)
        ));
        // Same key family, but only RS256 is derived from an RSA key.
        let token = sign(Algorithm::PS256, &rsa_key(), None, &claims());
        let result = pem_verifier(RSA_PUBLIC).verify(&token).await;
        assert!(matches!(result, Err(AuthError::AlgorithmNotAllowed)));
    }

    #[tokio::test]
    async fn rejects_missing_or_invalid_user_claim() {
        let exp = now() + 60;
        for (user_claim, claims) in [
            ("sub", json!({ "exp": exp })),
            ("sub", json!({ "exp": exp, "sub": 42 })),
            ("sub", json!({ "exp": exp, "sub": "" })),
            ("email", json!({ "exp": exp, "sub": "alice" })),
            ("email", json!({ "exp": exp, "email": ["a@example.com"] })),
            ("email", json!({ "exp": exp, "email": null })),
        ] {
            let settings = JwtSettings {
                user_claim: user_claim.into(),
                ..hmac_settings()
            };
            let result = verify_hs256(settings, &claims).await;
            assert!(
                matches!(result, Err(AuthError::InvalidUserClaim)),
                "{claims}: {result:?}"
            );
        }
    }

    #[tokio::test]
    async fn rejects_malformed_tokens() {
        let verifier = Verifier::new(hmac_settings()).expect("verifier");
        let valid = hs256(&claims());
        let (unsigned, _) = valid.rsplit_once('.').expect("three parts");
        for token in ["", "abc", "a.b.c", "a.b", unsigned, &format!("{valid}.x")] {
            assert!(
                matches!(verifier.verify(token).await, Err(AuthError::MalformedToken)),
                "{token:?}"
            );
        }
        let bad_signature = format!("{unsigned}.!!!");
        assert!(matches!(
            verifier.verify(&bad_signature).await,
            Err(AuthError::MalformedToken)
        ));
    }

    #[test]
    fn parses_bearer_header() {
        let with = |values: &[&[u8]]| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(
                    AUTHORIZATION,
                    HeaderValue::from_bytes(value).expect("value"),
                );
            }
            headers
        };
        assert_eq!(
            bearer_token(&with(&[b"Bearer abc.def.ghi"])).ok(),
            Some("abc.def.ghi")
        );
        assert_eq!(bearer_token(&with(&[b"bEaReR tok"])).ok(), Some("tok"));
        assert!(matches!(
            bearer_token(&HeaderMap::new()),
            Err(AuthError::MissingToken)
        ));
        for bad in [
            &b"Basic dXNlcjpwYXNz"[..],
            b"Bearer",
            b"Bearer ",
            b"Bearer  tok",
            b"Bearer a b",
            b"Bearertok",
            b"Bearer t\xc3\xb6k",
        ] {
            assert!(
                matches!(
                    bearer_token(&with(&[bad])),
                    Err(AuthError::BadAuthorizationHeader)
                ),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let twice = with(&[b"Bearer a", b"Bearer b"]);
        assert!(matches!(
            bearer_token(&twice),
            Err(AuthError::BadAuthorizationHeader)
        ));
    }

    #[tokio::test]
    async fn verifies_public_key_algorithms() {
        let cases = [
            (
                RSA_PUBLIC,
                sign(Algorithm::RS256, &rsa_key(), None, &claims()),
            ),
            (
                EC_PUBLIC,
                sign(Algorithm::ES256, &ec_key(), None, &claims()),
            ),
            (
                ED_PUBLIC,
                sign(Algorithm::EdDSA, &ed_key(), None, &claims()),
            ),
        ];
        for (pem, token) in cases {
            let verifier = pem_verifier(pem);
            assert!(!verifier.can_mint());
            assert_eq!(verifier.verify(&token).await.expect("valid"), "alice");
        }
        let mismatched = sign(Algorithm::EdDSA, &ed_key(), None, &claims());
        let result = pem_verifier(EC_PUBLIC).verify(&mismatched).await;
        assert!(matches!(result, Err(AuthError::AlgorithmNotAllowed)));
    }

    #[test]
    fn rejects_bad_settings() {
        let secret = Some(SECRET.to_vec());
        let pem = Some(RSA_PUBLIC.to_owned());
        let cases = [
            ("jwt", JwtSettings::default()),
            (
                "jwt",
                JwtSettings {
                    hs256_secret: secret.clone(),
                    public_key_pem: pem.clone(),
                    ..JwtSettings::default()
                },
            ),
            (
                "jwt_hs256_secret",
                JwtSettings {
                    hs256_secret: Some(b"short".to_vec()),
                    ..JwtSettings::default()
                },
            ),
            (
                "jwt_public_key",
                JwtSettings {
                    public_key_pem: Some(RSA_PRIVATE.into()),
                    ..JwtSettings::default()
                },
            ),
            (
                "jwt_public_key",
                JwtSettings {
                    public_key_pem: Some("not a key".into()),
                    ..JwtSettings::default()
                },
            ),
            (
                "jwt_jwks_url",
                JwtSettings {
                    jwks_url: Some("ftp://idp/jwks".into()),
                    ..JwtSettings::default()
                },
            ),
            (
                "jwt_jwks_url",
                JwtSettings {
                    jwks_url: Some("not a url".into()),
                    ..JwtSettings::default()
                },
            ),
            (
                "jwt_algorithms",
                JwtSettings {
                    algorithms: vec![Algorithm::HS256, Algorithm::RS256],
                    ..hmac_settings()
                },
            ),
            (
                "jwt_algorithms",
                JwtSettings {
                    algorithms: vec![Algorithm::RS256],
                    ..hmac_settings()
                },
            ),
            (
                "jwt_algorithms",
                JwtSettings {
                    algorithms: vec![Algorithm::ES256],
                    public_key_pem: pem,
                    ..JwtSettings::default()
                },
            ),
            (
                "jwt_algorithms",
                JwtSettings {
                    algorithms: vec![Algorithm::HS256],
                    jwks_url: Some("https://idp/jwks".into()),
                    ..JwtSettings::default()
                },
            ),
            (
                "jwt_user_claim",
                JwtSettings {
                    user_claim: String::new(),
                    ..hmac_settings()
                },
            ),
        ];
        for (setting, settings) in cases {
            let debug = format!("{settings:?}");
            assert_eq!(setup_err(settings).setting, setting, "{debug}");
        }
    }

    #[test]
    fn debug_output_hides_secrets() {
        let secret = String::from_utf8_lossy(SECRET).into_owned();
        let verifier = Verifier::new(hmac_settings()).expect("verifier");
        assert!(!format!("{verifier:?}").contains(&secret));
        assert!(!format!("{:?}", hmac_settings()).contains(&secret));
    }

    /// Serves the fixture JWKS on a free port, counting requests.
    async fn jwks_server(delay: Duration) -> (String, Arc<AtomicUsize>) {
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&hits);
        let handler = move || async move {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            ([(http::header::CONTENT_TYPE, "application/json")], JWKS)
        };
        let app = axum::Router::new().route("/jwks", axum::routing::get(handler));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/jwks", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, hits)
    }

    fn jwks_verifier(url: &str, refresh_interval: Duration, max_age: Duration) -> Verifier {
        let settings = JwtSettings {
            jwks_url: Some(url.to_owned()),
            ..JwtSettings::default()
        };
        Verifier::build(settings, refresh_interval, max_age).expect("verifier")
    }

    #[tokio::test]
    async fn jwks_verifies_each_key_kind_with_one_fetch() {
        let (url, hits) = jwks_server(Duration::ZERO).await;
        let verifier = jwks_verifier(&url, JWKS_REFRESH_INTERVAL, JWKS_MAX_AGE);
        assert!(!verifier.can_mint());
        assert_eq!(hits.load(Ordering::SeqCst), 0, "startup must not fetch");
        for token in [
            sign(Algorithm::RS256, &rsa_key(), Some("rsa-1"), &claims()),
            sign(Algorithm::ES256, &ec_key(), Some("ec-1"), &claims()),
            // The Ed25519 key has no kid and is the only one of its kind.
            sign(Algorithm::EdDSA, &ed_key(), None, &claims()),
        ] {
            assert_eq!(verifier.verify(&token).await.expect("valid"), "alice");
        }
        // A kid naming a key of another kind, or no kid where the keys have one, find nothing.
        for token in [
            sign(Algorithm::ES256, &ec_key(), Some("rsa-1"), &claims()),
            sign(Algorithm::RS256, &rsa_key(), None, &claims()),
        ] {
            assert!(matches!(
                verifier.verify(&token).await,
                Err(AuthError::UnknownKey)
            ));
        }
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn jwks_unknown_kid_refetches_once_per_interval() {
        let interval = Duration::from_millis(500);
        let (url, hits) = jwks_server(Duration::ZERO).await;
        let verifier = jwks_verifier(&url, interval, JWKS_MAX_AGE);
        let known = sign(Algorithm::RS256, &rsa_key(), Some("rsa-1"), &claims());
        verifier.verify(&known).await.expect("valid");
        assert_eq!(hits.load(Ordering::SeqCst), 1);

        tokio::time::sleep(interval + Duration::from_millis(100)).await;
        let unknown = sign(Algorithm::RS256, &rsa_key(), Some("rotated-1"), &claims());
        assert!(matches!(
            verifier.verify(&unknown).await,
            Err(AuthError::UnknownKey)
        ));
        assert_eq!(hits.load(Ordering::SeqCst), 2);

        let unknown = sign(Algorithm::RS256, &rsa_key(), Some("rotated-2"), &claims());
        assert!(matches!(
            verifier.verify(&unknown).await,
            Err(AuthError::UnknownKey)
        ));
        assert_eq!(
            hits.load(Ordering::SeqCst),
            2,
            "rate limit must prevent a refetch"
        );
        verifier
            .verify(&known)
            .await
            .expect("known keys stay usable");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jwks_concurrent_misses_share_one_fetch() {
        let (url, hits) = jwks_server(Duration::from_millis(100)).await;
        // No rate limit, so only single-flight can keep this to one fetch.
        let verifier = jwks_verifier(&url, Duration::ZERO, JWKS_MAX_AGE);
        let token = sign(Algorithm::RS256, &rsa_key(), Some("rsa-1"), &claims());
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (verifier, token) = (verifier.clone(), token.clone());
                tokio::spawn(async move { verifier.verify(&token).await })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.expect("join").expect("valid"), "alice");
        }
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn jwks_refetches_stale_keys() {
        let (url, hits) = jwks_server(Duration::ZERO).await;
        let verifier = jwks_verifier(&url, Duration::ZERO, Duration::ZERO);
        let token = sign(Algorithm::RS256, &rsa_key(), Some("rsa-1"), &claims());
        verifier.verify(&token).await.expect("valid");
        verifier.verify(&token).await.expect("valid");
        assert_eq!(hits.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn jwks_unreachable_is_reported() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/jwks", listener.local_addr().expect("addr"));
        drop(listener);
        let verifier = jwks_verifier(&url, JWKS_REFRESH_INTERVAL, JWKS_MAX_AGE);
        let token = sign(Algorithm::RS256, &rsa_key(), Some("rsa-1"), &claims());
        for _ in 0..2 {
            assert!(matches!(
                verifier.verify(&token).await,
                Err(AuthError::JwksUnavailable)
            ));
        }
        // A disallowed algorithm is rejected without touching the JWKS.
        assert!(matches!(
            verifier.verify(&hs256(&claims())).await,
            Err(AuthError::AlgorithmNotAllowed)
        ));
    }
}
