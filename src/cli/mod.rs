//! The `upload` command: a client for our own proxy. By default a resumable tus upload through
//! the proxy ([`tus_client`]); with `--direct`, scoped credentials from `GET /sts` and an
//! aws-sdk-s3 multipart upload straight to S3 ([`direct`]).
//!
//! Every failure ends as one [`CliError`] whose [`Kind`] is the exit code, so scripts can tell
//! "fix your token" from "try again later" from "this file will never go".

pub mod direct;
pub mod state;
pub mod tus_client;

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::Url;

/// `s3-upload-proxy upload FILE... --server URL`.
#[derive(Args, Debug)]
pub struct UploadArgs {
    /// Files to upload, one after the other.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Base URL of the proxy, e.g. `https://uploads.example.com`.
    #[arg(long, env = "S3UP_SERVER", value_name = "URL")]
    pub server: String,
    /// Bearer token (JWT). Prefer `--token-file` or the `S3UP_TOKEN` environment variable: a
    /// command-line argument is visible to other local users.
    #[arg(long, value_name = "T", conflicts_with = "token_file")]
    pub token: Option<String>,
    /// File holding the bearer token (surrounding whitespace ignored).
    #[arg(long, value_name = "F")]
    pub token_file: Option<PathBuf>,
    /// Upload straight to S3 with credentials from `GET /sts` (multipart, parallel parts).
    #[arg(long)]
    pub direct: bool,
    /// tus: bytes per PATCH request. A broken connection costs at most the chunk in flight.
    #[arg(long, default_value = "64MiB", value_parser = parse_size, value_name = "SIZE")]
    pub chunk_size: u64,
    /// tus: where upload URLs are remembered so that re-running the command resumes
    /// [default: $XDG_STATE_HOME/s3-upload-proxy or ~/.local/state/s3-upload-proxy].
    #[arg(long, env = "S3UP_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// tus: the proxy's `tus_base_path`.
    #[arg(long, default_value = "/files/", value_name = "PATH")]
    pub tus_path: String,
    /// tus: send at most this many bytes per second (e.g. `10MiB`).
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub limit_rate: Option<u64>,
    /// Attempts after a transient failure (connection lost, 5xx, a lost race) before giving up;
    /// the count starts again whenever bytes are stored.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub retries: u32,
    /// --direct: part size (at least 5 MiB; raised when the file needs more than 10,000 parts).
    #[arg(long, default_value = "16MiB", value_parser = parse_size, value_name = "SIZE")]
    pub part_size: u64,
    /// --direct: parts uploading at once (each holds one part in memory).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64), value_name = "N")]
    pub parallel: u32,
    /// --direct: replace an existing object of the same key (otherwise exit 5).
    #[arg(long)]
    pub overwrite: bool,
    /// --direct: the API key the proxy may require on `/sts` (`x-api-key`).
    #[arg(long, env = "S3UP_API_KEY", hide_env_values = true, value_name = "KEY")]
    pub api_key: Option<String>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let n = s
        .trim()
        .parse::<bytesize::ByteSize>()
        .map_err(|e| format!("invalid size {s:?}: {e}"))?
        .as_u64();
    if n == 0 {
        return Err("must be more than 0 bytes".into());
    }
    Ok(n)
}

/// What a failure means for the caller; the discriminant is the process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Bad arguments (clap uses 2 for its own usage errors too).
    Usage = 2,
    /// The server or S3 refused the token or the credentials.
    Auth = 3,
    /// The server, S3 or the network kept failing after the retries; trying later may work.
    Unavailable = 4,
    /// This file or request cannot succeed as it is: unreadable, too large, a conflict, changed
    /// while uploading, refused by the server as invalid.
    Invalid = 5,
}

/// One failure, printed as one line on stderr.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    pub kind: Kind,
    pub message: String,
}

impl CliError {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    pub fn exit_code(&self) -> u8 {
        self.kind as u8
    }
}

/// What every upload mode needs.
pub struct Ctx {
    pub http: reqwest::Client,
    pub server: Url,
    pub token: String,
    pub args: UploadArgs,
}

impl Ctx {
    /// `{server}{path}`, keeping any path the server URL has.
    pub fn url(&self, path: &str) -> Result<Url, CliError> {
        let base = self.server.as_str().trim_end_matches('/');
        Url::parse(&format!("{base}{path}"))
            .map_err(|e| CliError::new(Kind::Usage, format!("invalid URL {base}{path}: {e}")))
    }
}

/// A file as it was when the upload started. Size and mtime name its resume state and are
/// checked again at the end, so a file changed meanwhile is never reported as uploaded.
#[derive(Debug, Clone)]
pub struct LocalFile {
    pub path: PathBuf,
    /// Absolute, canonical: the same file resumes whatever the working directory.
    pub absolute: PathBuf,
    pub name: String,
    pub size: u64,
    pub mtime_ns: u128,
    pub content_type: String,
}

impl LocalFile {
    pub fn open(path: &Path) -> Result<Self, CliError> {
        let invalid = |e: std::io::Error| CliError::new(Kind::Invalid, e.to_string());
        let absolute = std::fs::canonicalize(path).map_err(invalid)?;
        let meta = std::fs::metadata(&absolute).map_err(invalid)?;
        if !meta.is_file() {
            return Err(CliError::new(Kind::Invalid, "not a regular file"));
        }
        // Readable at all? Better to find out now than after creating an upload.
        std::fs::File::open(&absolute).map_err(invalid)?;
        let name = absolute
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "file".into());
        let content_type = mime_guess::from_path(&absolute)
            .first_raw()
            .unwrap_or("application/octet-stream")
            .to_owned();
        Ok(Self {
            path: path.to_owned(),
            absolute,
            name,
            size: meta.len(),
            mtime_ns: mtime_ns(&meta),
            content_type,
        })
    }

    /// Fails when the file's size or mtime differ from when the upload started.
    pub fn check_unchanged(&self) -> Result<(), CliError> {
        let meta = std::fs::metadata(&self.absolute)
            .map_err(|e| CliError::new(Kind::Invalid, e.to_string()))?;
        if meta.len() != self.size || mtime_ns(&meta) != self.mtime_ns {
            return Err(CliError::new(
                Kind::Invalid,
                "the file changed while it was uploading",
            ));
        }
        Ok(())
    }
}

fn mtime_ns(meta: &std::fs::Metadata) -> u128 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos())
}

/// What the final line reports for one uploaded file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    pub key: String,
    pub size: u64,
    /// Full-object CRC64NVME, base64 of the big-endian value (as S3 reports it).
    pub crc64nvme: String,
}

impl std::fmt::Display for Uploaded {
    /// `KEY<TAB>SIZE<TAB>crc64nvme:BASE64`. Keys hold no control characters (the server strips
    /// them), so the tab-separated fields are unambiguous.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\t{}\tcrc64nvme:{}",
            self.key, self.size, self.crc64nvme
        )
    }
}

/// Runs the command; the result is the process exit code.
pub async fn run(args: UploadArgs) -> u8 {
    match prepare(args) {
        Ok(ctx) => upload_all(ctx).await,
        Err(e) => {
            eprintln!("s3-upload-proxy: {e}");
            e.exit_code()
        }
    }
}

fn prepare(args: UploadArgs) -> Result<Ctx, CliError> {
    let server = Url::parse(&args.server)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
        .ok_or_else(|| {
            CliError::new(
                Kind::Usage,
                format!("--server must be an http(s) URL, not {:?}", args.server),
            )
        })?;
    let token = token(&args)?;
    if !args.tus_path.starts_with('/') || !args.tus_path.ends_with('/') {
        return Err(CliError::new(
            Kind::Usage,
            "--tus-path must start and end with '/'",
        ));
    }
    let http = reqwest::Client::builder()
        .user_agent(concat!("s3-upload-proxy/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(15))
        // A peer that vanished without a FIN is noticed by keepalive probes rather than a
        // timeout: a PATCH of a large chunk legitimately runs for minutes.
        .tcp_keepalive(Duration::from_secs(30))
        .build()
        .map_err(|e| CliError::new(Kind::Usage, format!("cannot build the HTTP client: {e}")))?;
    Ok(Ctx {
        http,
        server,
        token,
        args,
    })
}

/// `--token`, else `--token-file`, else `S3UP_TOKEN`. Never printed.
fn token(args: &UploadArgs) -> Result<String, CliError> {
    let token = if let Some(t) = &args.token {
        t.clone()
    } else if let Some(f) = &args.token_file {
        std::fs::read_to_string(f)
            .map_err(|e| CliError::new(Kind::Usage, format!("--token-file {}: {e}", f.display())))?
    } else if let Ok(t) = std::env::var("S3UP_TOKEN") {
        t
    } else {
        return Err(CliError::new(
            Kind::Usage,
            "no token: give --token, --token-file or S3UP_TOKEN",
        ));
    };
    let token = token.trim().to_owned();
    let usable = !token.is_empty() && reqwest::header::HeaderValue::from_str(&token).is_ok();
    if !usable {
        return Err(CliError::new(
            Kind::Usage,
            "the token is empty or contains characters a header cannot carry",
        ));
    }
    Ok(token)
}

/// Uploads the files one after the other, printing one line per uploaded file. A failed file
/// does not stop the others, except when the token is refused (it would be refused for all).
/// The exit code is that of the first failure.
async fn upload_all(ctx: Ctx) -> u8 {
    let mut direct = None;
    let mut first_failure = None;
    for path in &ctx.args.files {
        let result = async {
            let file = LocalFile::open(path)?;
            if ctx.args.direct {
                if direct.is_none() {
                    direct = Some(direct::Direct::connect(&ctx).await?);
                }
                let d = direct.as_ref().expect("connected above");
                d.upload(&ctx, &file).await
            } else {
                tus_client::upload(&ctx, &file).await
            }
        }
        .await;
        match result {
            Ok(done) => println!("{done}"),
            Err(e) => {
                eprintln!("s3-upload-proxy: {}: {e}", path.display());
                first_failure.get_or_insert(e.exit_code());
                if e.kind == Kind::Auth {
                    break;
                }
            }
        }
    }
    first_failure.unwrap_or(0)
}

/// A byte progress bar on stderr, hidden when stderr is not a terminal.
pub fn progress_bar(file: &LocalFile) -> ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(file.size), target);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(file.name.clone());
    bar
}

/// Exponential backoff with jitter for a bounded number of consecutive failures.
#[derive(Debug)]
pub struct Backoff {
    failures: u32,
    max: u32,
    base: Duration,
    cap: Duration,
}

impl Backoff {
    pub fn new(max: u32) -> Self {
        Self {
            failures: 0,
            max,
            base: Duration::from_millis(500),
            cap: Duration::from_secs(30),
        }
    }

    /// Progress was made: the next failure starts the count again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Counts a transient failure: the delay before the next attempt, or the final error once
    /// the attempts are spent.
    pub fn fail(&mut self, message: &str) -> Result<Duration, CliError> {
        self.failures += 1;
        if self.failures > self.max {
            return Err(CliError::new(
                Kind::Unavailable,
                format!("{message} (gave up after {} attempts)", self.failures),
            ));
        }
        let exp = self
            .base
            .saturating_mul(1 << (self.failures - 1).min(16))
            .min(self.cap);
        // Up to 25% jitter so many clients do not retry in step.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let jitter = exp.mul_f64(f64::from(nanos % 1000) / 4000.0);
        Ok(exp + jitter)
    }

    /// Failures since the last progress.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// The proxy's JSON error (`{"error", "message"}`) as one readable phrase.
pub async fn describe(resp: reqwest::Response) -> String {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let json = serde_json::from_str::<serde_json::Value>(&text).ok();
    let field = |k: &str| {
        json.as_ref()
            .and_then(|v| v.get(k))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let detail = match (field("error"), field("message")) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c,
        (None, Some(m)) => m,
        (None, None) => text.chars().filter(|c| !c.is_control()).take(200).collect(),
    };
    if detail.is_empty() {
        format!("the server answered {status}")
    } else {
        format!("the server answered {status}: {detail}")
    }
}

/// A transport-level failure (no HTTP answer) as one phrase, with its causes.
pub fn transport(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("0").is_err());
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn backoff_grows_and_gives_up() {
        let mut b = Backoff::new(3);
        let d1 = b.fail("x").unwrap();
        let d2 = b.fail("x").unwrap();
        assert!(d1 >= Duration::from_millis(500) && d1 < Duration::from_millis(700));
        assert!(d2 >= Duration::from_secs(1) && d2 < Duration::from_millis(1300));
        b.fail("x").unwrap();
        let e = b.fail("network down").unwrap_err();
        assert_eq!(e.kind, Kind::Unavailable);
        assert!(e.message.contains("network down"), "{e}");
        b.reset();
        assert_eq!(b.failures(), 0);
        assert!(b.fail("x").is_ok());
    }

    #[test]
    fn exit_codes_are_stable() {
        assert_eq!(Kind::Usage as u8, 2);
        assert_eq!(Kind::Auth as u8, 3);
        assert_eq!(Kind::Unavailable as u8, 4);
        assert_eq!(Kind::Invalid as u8, 5);
    }

    #[test]
    fn final_line_is_tab_separated() {
        let u = Uploaded {
            key: "uploads/alice/a b.txt".into(),
            size: 3,
            crc64nvme: "AAAAAAAAAAA=".into(),
        };
        assert_eq!(
            u.to_string(),
            "uploads/alice/a b.txt\t3\tcrc64nvme:AAAAAAAAAAA="
        );
    }
}
