//! Shared test harness: real servers on port 0 (or a free port for moto), real clients.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_s3::Client;
use s3_upload_proxy::config::{Config, Settings};
use s3_upload_proxy::s3::{ClientSettings, Endpoint};
use s3_upload_proxy::server::{Running, start};
use sha2::{Digest, Sha256};

pub const MIB: usize = 1 << 20;
pub const SECRET: &str = "test-secret-test-secret-test-secret!";

/// Settings for an in-process proxy: port 0, 5 MiB parts, HS256 test secret.
pub fn settings(
    bucket: Option<&str>,
    data_dir: &std::path::Path,
    extra: &[(&str, &str)],
) -> Settings {
    let mut env = vec![
        ("S3UP_LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
        ("S3UP_PART_SIZE".to_owned(), "5MiB".to_owned()),
        ("S3UP_MEMORY_BUDGET".to_owned(), "64MiB".to_owned()),
        ("S3UP_JWT_HS256_SECRET".to_owned(), SECRET.to_owned()),
        ("S3UP_DATA_DIR".to_owned(), data_dir.display().to_string()),
        ("S3UP_S3_MAX_ATTEMPTS".to_owned(), "3".to_owned()),
    ];
    if let Some(b) = bucket {
        env.push(("S3UP_BUCKET".to_owned(), b.to_owned()));
    }
    env.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    Config::load(None, env).unwrap().validate(false).unwrap()
}

/// Logs of the proxy under test, when `S3UP_TEST_LOG` is set (e.g. `debug`).
pub fn init_logs() {
    if let Ok(filter) = std::env::var("S3UP_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

pub fn token(user: &str) -> String {
    s3_upload_proxy::auth::mint_hs256(
        SECRET.as_bytes(),
        "sub",
        user,
        Duration::from_secs(600),
        None,
        None,
    )
    .unwrap()
}

/// A proxy plus a client that reads what it stored.
pub struct Harness {
    pub proxy: Running,
    pub s3: Client,
    pub bucket: String,
    pub http: reqwest::Client,
    _dir: tempfile::TempDir,
    _moto: Option<Moto>,
    extra: Vec<(String, String)>,
}

impl Harness {
    /// Against the embedded store (started in-process by the app itself).
    pub async fn embedded(extra: &[(&str, &str)]) -> Self {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let proxy = start(settings(None, dir.path(), extra), None)
            .await
            .unwrap();
        let s3 = proxy.app.state.bucket.client.clone();
        Self {
            bucket: "uploads".into(),
            proxy,
            s3,
            http: http(),
            _dir: dir,
            _moto: None,
            extra: owned(extra),
        }
    }

    /// Stops the proxy (draining it) and starts a new one on the same address against the same
    /// store: nothing but S3 survives, as after a deploy or a crash of a stateless instance.
    pub async fn restart(self) -> Self {
        let Harness {
            proxy,
            s3,
            bucket,
            http,
            _dir,
            _moto,
            extra,
        } = self;
        let mut env = extra.clone();
        env.push(("S3UP_LISTEN".into(), proxy.addr.to_string()));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let (name, endpoint) = match &_moto {
            Some(m) => (Some(bucket.as_str()), Some(m.endpoint())),
            None => (None, None),
        };
        let settings = settings(name, _dir.path(), &env);
        proxy.shutdown();
        proxy.wait().await;
        let proxy = start(settings, endpoint).await.unwrap();
        let s3 = if _moto.is_none() {
            proxy.app.state.bucket.client.clone()
        } else {
            s3
        };
        Harness {
            proxy,
            s3,
            bucket,
            http,
            _dir,
            _moto,
            extra,
        }
    }

    /// Against moto_server.
    pub async fn moto(extra: &[(&str, &str)]) -> Self {
        init_logs();
        let moto = Moto::start();
        let s3 = moto.client().await;
        s3.create_bucket()
            .bucket("test-bucket")
            .send()
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let proxy = start(
            settings(Some("test-bucket"), dir.path(), extra),
            Some(moto.endpoint()),
        )
        .await
        .unwrap();
        Self {
            bucket: "test-bucket".into(),
            proxy,
            s3,
            http: http(),
            _dir: dir,
            _moto: Some(moto),
            extra: owned(extra),
        }
    }

    /// Against any S3 endpoint (e.g. a fault-injecting proxy in front of a store).
    pub async fn with_endpoint(
        endpoint: Endpoint,
        bucket: &str,
        s3: Client,
        extra: &[(&str, &str)],
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let proxy = start(settings(Some(bucket), dir.path(), extra), Some(endpoint))
            .await
            .unwrap();
        Self {
            bucket: bucket.into(),
            proxy,
            s3,
            http: http(),
            _dir: dir,
            _moto: None,
            extra: owned(extra),
        }
    }

    /// Wraps an already started proxy; `dir` lives as long as the harness.
    pub fn from_running(proxy: Running, s3: Client, bucket: &str, dir: tempfile::TempDir) -> Self {
        Self {
            bucket: bucket.into(),
            proxy,
            s3,
            http: http(),
            _dir: dir,
            _moto: None,
            extra: Vec::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.proxy.url())
    }

    pub async fn put(&self, user: &str, name: &str, body: reqwest::Body) -> reqwest::Response {
        self.http
            .put(self.url(&format!("/uploads/{name}")))
            .bearer_auth(token(user))
            .body(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn object(&self, key: &str) -> Option<Vec<u8>> {
        match self
            .s3
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(o) => Some(o.body.collect().await.unwrap().into_bytes().to_vec()),
            Err(_) => None,
        }
    }

    pub async fn metric(&self, name: &str) -> f64 {
        let text = self
            .http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metric(&text, name)
    }
}

fn owned(extra: &[(&str, &str)]) -> Vec<(String, String)> {
    extra
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(' '))
        .filter(|(k, _)| *k == name || k.starts_with(&format!("{name}{{")))
        .map(|(_, v)| v.trim().parse::<f64>().unwrap())
        .sum()
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// Deterministic pseudo-random bytes (xorshift), different per seed.
pub fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// A chunked (no Content-Length) body sending `bytes` in `chunk`-sized pieces.
pub fn chunked(bytes: Vec<u8>, chunk: usize) -> reqwest::Body {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        bytes.chunks(chunk).map(|c| Ok(c.to_vec())).collect();
    reqwest::Body::wrap_stream(futures_util::stream::iter(chunks))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn venv_bin(name: &str) -> PathBuf {
    let venv = std::env::var_os("S3UP_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv"));
    let bin = venv.join("bin").join(name);
    assert!(
        bin.exists(),
        "{} not found: run the tests with scripts/test, which installs it",
        bin.display()
    );
    bin
}

/// moto_server on a free loopback port, killed on drop.
pub struct Moto {
    child: Child,
    pub addr: SocketAddr,
}

impl Moto {
    pub fn start() -> Self {
        for _ in 0..5 {
            let port = free_port();
            let child = Command::new(venv_bin("moto_server"))
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut moto = Moto {
                child,
                addr: ([127, 0, 0, 1], port).into(),
            };
            if moto.wait_ready() {
                return moto;
            }
        }
        panic!("moto_server did not start");
    }

    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if std::net::TcpStream::connect(self.addr).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint::Static {
            url: self.url(),
            access_key: "testing".into(),
            secret_key: "testing".into(),
        }
    }

    pub async fn client(&self) -> Client {
        let settings = ClientSettings {
            max_attempts: 3,
            attempt_timeout: Duration::from_secs(60),
        };
        s3_upload_proxy::s3::client(self.endpoint(), &settings, Default::default()).await
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// moto_server prepared for per-user STS: a bucket, an upload role whose own policy allows only
/// `uploads/*`, a proxy IAM user that may assume it (and nothing else in S3), and an admin user
/// for the test's own reads. IAM enforcement starts off; see [`MotoIam::enforce`].
pub struct MotoIam {
    pub url: String,
    pub proxy_access_key: String,
    pub proxy_secret_key: String,
    pub admin_access_key: String,
    pub admin_secret_key: String,
    pub role_arn: String,
}

pub const ROLE_BUCKET: &str = "test-bucket";

impl MotoIam {
    fn setup(moto: &Moto) -> Self {
        let out = Command::new(venv_bin("python"))
            .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/moto_iam_setup.py"))
            .args([&moto.url(), ROLE_BUCKET])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "moto_iam_setup.py: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let s = |k: &str| v[k].as_str().unwrap().to_owned();
        Self {
            url: moto.url(),
            proxy_access_key: s("proxy_access_key"),
            proxy_secret_key: s("proxy_secret_key"),
            admin_access_key: s("admin_access_key"),
            admin_secret_key: s("admin_secret_key"),
            role_arn: s("role_arn"),
        }
    }

    /// Turns moto's IAM enforcement on or off (presigned requests get 500 while it is on).
    pub async fn enforce(&self, on: bool) {
        let resp = http()
            .post(format!("{}/moto-api/reset-auth", self.url))
            .header("content-type", "text/plain")
            .body(if on { "0" } else { "inf" })
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "reset-auth: {}", resp.status());
    }

    /// How the proxy reaches moto: as the proxy IAM user.
    pub fn proxy_endpoint(&self) -> Endpoint {
        Endpoint::Static {
            url: self.url.clone(),
            access_key: self.proxy_access_key.clone(),
            secret_key: self.proxy_secret_key.clone(),
        }
    }

    pub async fn admin_client(&self) -> Client {
        let endpoint = Endpoint::Static {
            url: self.url.clone(),
            access_key: self.admin_access_key.clone(),
            secret_key: self.admin_secret_key.clone(),
        };
        let settings = ClientSettings {
            max_attempts: 3,
            attempt_timeout: Duration::from_secs(60),
        };
        s3_upload_proxy::s3::client(endpoint, &settings, Default::default()).await
    }
}

impl Harness {
    /// A proxy with an upload role (`S3UP_STS_ROLE_ARN`) against moto prepared by [`MotoIam`],
    /// with IAM enforcement on or off. `h.s3` reads as the admin user.
    pub async fn moto_with_role(extra: &[(&str, &str)], enforce: bool) -> (Self, MotoIam) {
        let moto = Moto::start();
        let iam = MotoIam::setup(&moto);
        if enforce {
            iam.enforce(true).await;
        }
        let mut env = vec![("S3UP_STS_ROLE_ARN", iam.role_arn.as_str())];
        env.extend_from_slice(extra);
        let dir = tempfile::tempdir().unwrap();
        let proxy = start(
            settings(Some(ROLE_BUCKET), dir.path(), &env),
            Some(iam.proxy_endpoint()),
        )
        .await
        .unwrap();
        let h = Self {
            bucket: ROLE_BUCKET.into(),
            proxy,
            s3: iam.admin_client().await,
            http: http(),
            _dir: dir,
            _moto: Some(moto),
            extra: owned(&env),
        };
        (h, iam)
    }
}
