//! A tus 1.0 client (core protocol plus creation and checksum): POST creates the upload, its URL
//! is remembered in a state file, then one PATCH per chunk streams the file from the server's
//! offset. Transient failures re-read the offset with HEAD and continue from there.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::BytesMut;
use indicatif::ProgressBar;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, LOCATION};
use reqwest::{Method, StatusCode, Url};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};

use super::state::{self, StateFile};
use super::{Backoff, CliError, Ctx, Kind, LocalFile, Uploaded, describe, progress_bar, transport};
use crate::tus::{CHECKSUM_HEADER, KEY_HEADER};
use crate::upload::part::crc64_base64;

const TUS_VERSION: &str = "1.0.0";
/// Read size for request bodies.
const READ_BUF: u64 = 256 * 1024;
/// Uploads created for one file in one run before giving up (each after the previous vanished).
const MAX_CREATES: u32 = 3;

/// Uploads one file, resuming a previous run's upload of the same file when there is one.
pub async fn upload(ctx: &Ctx, file: &LocalFile) -> Result<Uploaded, CliError> {
    let endpoint = ctx.url(&ctx.args.tus_path)?;
    let dir = ctx
        .args
        .state_dir
        .clone()
        .or_else(state::default_dir)
        .ok_or_else(|| {
            CliError::new(
                Kind::Usage,
                "no directory for resume state: set --state-dir (or HOME / XDG_STATE_HOME)",
            )
        })?;
    let state = StateFile::new(&dir, endpoint.as_str(), file);
    let local_crc = LocalCrc::start(file);
    let mut client = Client {
        ctx,
        file,
        bar: progress_bar(file),
        backoff: Backoff::new(ctx.args.retries),
        sha1: false,
    };
    let result = client.run(&endpoint, &state).await;
    client.bar.finish_and_clear();
    let done = result?;
    file.check_unchanged()?;
    let local = local_crc.finish().await?;
    let crc64nvme = match done.checksum {
        Some(stored) if stored != local => {
            return Err(CliError::new(
                Kind::Unavailable,
                format!(
                    "the stored object's CRC64NVME ({stored}) differs from the file's ({local})"
                ),
            ));
        }
        _ => local,
    };
    Ok(Uploaded {
        // A server that does not name the key: "-" keeps the line's three fields.
        key: done.key.unwrap_or_else(|| "-".into()),
        size: file.size,
        crc64nvme,
    })
}

struct Client<'a> {
    ctx: &'a Ctx,
    file: &'a LocalFile,
    bar: ProgressBar,
    backoff: Backoff,
    /// The server takes `Upload-Checksum: sha1` (checksum extension).
    sha1: bool,
}

/// What a HEAD (or a finishing PATCH) says about an upload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Head {
    offset: u64,
    length: Option<u64>,
    key: Option<String>,
    checksum: Option<String>,
}

/// The outcome of one request that did not fail for good.
enum Step<T> {
    Done(T),
    /// 404/410: the upload is unknown or expired; start a new one.
    Gone,
    /// A transient failure: wait, re-read the offset, go on.
    Retry(String),
}

/// What a run of PATCHes ended with.
enum Transfer {
    Complete(Head),
    Gone,
}

impl Client<'_> {
    async fn run(&mut self, endpoint: &Url, state: &StateFile) -> Result<Head, CliError> {
        let this = self;
        this.probe(endpoint).await?;
        let mut current = this.resume(state).await?;
        let mut creates = 0;
        loop {
            let (url, offset) = match current.take() {
                Some(found) => found,
                None => {
                    creates += 1;
                    if creates > MAX_CREATES {
                        return Err(CliError::new(
                            Kind::Unavailable,
                            "the server keeps losing the upload (404/410)",
                        ));
                    }
                    let url = this.create(endpoint).await?;
                    state.save(this.file, url.as_str())?;
                    (url, 0)
                }
            };
            match this.transfer(&url, offset).await? {
                Transfer::Complete(head) => {
                    state.remove();
                    return Ok(head);
                }
                Transfer::Gone => state.remove(),
            }
        }
    }

    /// OPTIONS: the server's size limit and checksum support. A server that does not answer
    /// it is used without checksums; the real requests will tell what is wrong.
    async fn probe(&mut self, endpoint: &Url) -> Result<(), CliError> {
        let Ok(resp) = self
            .ctx
            .http
            .request(Method::OPTIONS, endpoint.clone())
            .send()
            .await
        else {
            return Ok(());
        };
        if !resp.status().is_success() {
            return Ok(());
        }
        let h = resp.headers();
        let list = |name: &str| -> Vec<String> {
            text(h, name)
                .map(|v| {
                    v.split(',')
                        .map(|s| s.trim().to_ascii_lowercase())
                        .collect()
                })
                .unwrap_or_default()
        };
        self.sha1 = list("tus-extension").iter().any(|e| e == "checksum")
            && list("tus-checksum-algorithm").iter().any(|a| a == "sha1");
        if let Some(max) = number(h, "tus-max-size")
            && self.file.size > max
        {
            return Err(CliError::new(
                Kind::Invalid,
                format!(
                    "{} bytes is more than the server accepts ({max} bytes)",
                    self.file.size
                ),
            ));
        }
        Ok(())
    }

    /// The upload a previous run left, if the server still has it and it is this file's.
    async fn resume(&mut self, state: &StateFile) -> Result<Option<(Url, u64)>, CliError> {
        let Some(url) = state.load(self.file) else {
            return Ok(None);
        };
        let Ok(url) = Url::parse(&url) else {
            state.remove();
            return Ok(None);
        };
        match self.head_retrying(&url).await? {
            Some(h) if h.length == Some(self.file.size) && h.offset <= self.file.size => {
                Ok(Some((url, h.offset)))
            }
            _ => {
                state.remove();
                Ok(None)
            }
        }
    }

    fn request(&self, method: Method, url: &Url) -> reqwest::RequestBuilder {
        self.ctx
            .http
            .request(method, url.clone())
            .bearer_auth(&self.ctx.token)
            .header("tus-resumable", TUS_VERSION)
    }

    /// POST: a new upload of the whole file; its absolute URL.
    async fn create(&mut self, endpoint: &Url) -> Result<Url, CliError> {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let metadata = format!(
            "filename {},filetype {}",
            b64(&self.file.name),
            b64(&self.file.content_type)
        );
        loop {
            let sent = self
                .request(Method::POST, endpoint)
                .header("upload-length", self.file.size)
                .header("upload-metadata", metadata.as_str())
                .header(CONTENT_LENGTH, 0)
                .send()
                .await;
            let step = match sent {
                Err(e) => Step::Retry(transport(&e)),
                Ok(resp) if resp.status() == StatusCode::CREATED => {
                    let location = text(resp.headers(), LOCATION.as_str());
                    match location.and_then(|l| resp.url().join(&l).ok()) {
                        Some(url) => Step::Done(url),
                        None => Step::Retry(
                            "the server created an upload but sent no usable Location".into(),
                        ),
                    }
                }
                Ok(resp) => refused(resp).await?,
            };
            match step {
                Step::Done(url) => return Ok(url),
                Step::Retry(msg) => self.pause(&msg).await?,
                Step::Gone => {
                    return Err(CliError::new(
                        Kind::Invalid,
                        format!("no tus endpoint at {endpoint} (404)"),
                    ));
                }
            }
        }
    }

    /// PATCHes from `offset` until the server holds the whole file, re-reading the offset after
    /// every failure; then HEAD for what was stored.
    async fn transfer(&mut self, url: &Url, mut offset: u64) -> Result<Transfer, CliError> {
        loop {
            self.bar.set_position(offset);
            if offset >= self.file.size {
                let Some(head) = self.head_retrying(url).await? else {
                    return Ok(Transfer::Gone);
                };
                if head.offset == self.file.size {
                    return Ok(Transfer::Complete(head));
                }
                offset = self.checked_offset(head.offset)?;
                continue;
            }
            let end = offset
                .saturating_add(self.ctx.args.chunk_size)
                .min(self.file.size);
            match self.patch(url, offset, end).await? {
                Step::Done(next) => {
                    if next > offset {
                        self.backoff.reset();
                    }
                    offset = self.checked_offset(next)?;
                }
                Step::Gone => return Ok(Transfer::Gone),
                Step::Retry(msg) => {
                    self.pause(&msg).await?;
                    let Some(head) = self.head_retrying(url).await? else {
                        return Ok(Transfer::Gone);
                    };
                    offset = self.checked_offset(head.offset)?;
                }
            }
        }
    }

    fn checked_offset(&self, offset: u64) -> Result<u64, CliError> {
        if offset > self.file.size {
            return Err(CliError::new(
                Kind::Invalid,
                format!(
                    "the server holds {offset} bytes of a {}-byte file",
                    self.file.size
                ),
            ));
        }
        Ok(offset)
    }

    /// Waits before the next attempt, or gives up; a file that changed meanwhile is an error
    /// of its own (retrying would upload a mix of two versions).
    async fn pause(&mut self, message: &str) -> Result<(), CliError> {
        let delay = self.backoff.fail(message)?;
        self.file.check_unchanged()?;
        // Shown only with the progress bar, on a terminal: scripts get the one final line.
        self.bar.println(format!(
            "{}: {message}; retrying in {:.1}s",
            self.file.name,
            delay.as_secs_f64()
        ));
        tokio::time::sleep(delay).await;
        Ok(())
    }

    async fn head_retrying(&mut self, url: &Url) -> Result<Option<Head>, CliError> {
        loop {
            match self.head(url).await? {
                Step::Done(h) => return Ok(Some(h)),
                Step::Gone => return Ok(None),
                Step::Retry(msg) => self.pause(&msg).await?,
            }
        }
    }

    async fn head(&self, url: &Url) -> Result<Step<Head>, CliError> {
        let resp = match self.request(Method::HEAD, url).send().await {
            Ok(r) => r,
            Err(e) => return Ok(Step::Retry(transport(&e))),
        };
        if resp.status() != StatusCode::OK && resp.status() != StatusCode::NO_CONTENT {
            // HEAD has no body: the status is all there is.
            return refused_status(resp.status(), format!("HEAD answered {}", resp.status()));
        }
        let h = resp.headers();
        let Some(offset) = number(h, "upload-offset") else {
            return Ok(Step::Retry("HEAD answered without Upload-Offset".into()));
        };
        Ok(Step::Done(Head {
            offset,
            length: number(h, "upload-length"),
            key: text(h, KEY_HEADER).and_then(|k| percent_decode(&k)),
            checksum: text(h, CHECKSUM_HEADER),
        }))
    }

    /// One PATCH of `[offset, end)`: the server's new offset.
    async fn patch(&self, url: &Url, offset: u64, end: u64) -> Result<Step<u64>, CliError> {
        let len = end - offset;
        self.bar.set_message(self.file.name.clone());
        let mut req = self
            .request(Method::PATCH, url)
            .header(CONTENT_TYPE, "application/offset+octet-stream")
            .header("upload-offset", offset)
            .header(CONTENT_LENGTH, len);
        if self.sha1 {
            let digest = sha1_of(self.file, offset, len).await?;
            req = req.header(
                "upload-checksum",
                format!(
                    "sha1 {}",
                    base64::engine::general_purpose::STANDARD.encode(digest)
                ),
            );
        }
        let body = body(
            self.file,
            offset,
            len,
            self.ctx.args.limit_rate,
            self.bar.clone(),
        )
        .await?;
        let resp = match req.body(body).send().await {
            Ok(r) => r,
            Err(e) => return Ok(Step::Retry(transport(&e))),
        };
        if resp.status() == StatusCode::NO_CONTENT || resp.status() == StatusCode::OK {
            return Ok(match number(resp.headers(), "upload-offset") {
                Some(next) => Step::Done(next),
                None => Step::Retry("PATCH answered without Upload-Offset".into()),
            });
        }
        refused(resp).await
    }
}

/// A non-success answer: transient ones become `Retry`, the rest end this file's upload.
async fn refused<T>(resp: reqwest::Response) -> Result<Step<T>, CliError> {
    let status = resp.status();
    let message = describe(resp).await;
    refused_status(status, message)
}

fn refused_status<T>(status: StatusCode, message: String) -> Result<Step<T>, CliError> {
    let fatal = |kind| Err(CliError::new(kind, message.clone()));
    match status.as_u16() {
        401 | 403 => fatal(Kind::Auth),
        404 | 410 => Ok(Step::Gone),
        // 409: another request moved the offset; 423: another request holds the upload for a
        // moment; 460: the chunk arrived corrupted and was discarded. All: re-HEAD and go on.
        408 | 409 | 423 | 429 | 460 => Ok(Step::Retry(message)),
        s if s >= 500 => Ok(Step::Retry(message)),
        _ => fatal(Kind::Invalid),
    }
}

fn text(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name)?.to_str().ok().map(|s| s.trim().to_owned())
}

fn number(h: &HeaderMap, name: &str) -> Option<u64> {
    text(h, name)?.parse().ok()
}

/// `%XX` sequences to bytes, which must then be UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

async fn open_at(file: &LocalFile, offset: u64) -> Result<tokio::fs::File, CliError> {
    let fail = |e: std::io::Error| CliError::new(Kind::Invalid, format!("reading the file: {e}"));
    let mut f = tokio::fs::File::open(&file.absolute).await.map_err(fail)?;
    f.seek(std::io::SeekFrom::Start(offset))
        .await
        .map_err(fail)?;
    Ok(f)
}

/// SHA-1 of `[offset, offset + len)`, for `Upload-Checksum` (read once more from disk, so the
/// body itself can still stream).
async fn sha1_of(file: &LocalFile, offset: u64, len: u64) -> Result<[u8; 20], CliError> {
    use sha1::Digest as _;
    let mut f = open_at(file, offset).await?;
    let mut hasher = sha1::Sha1::new();
    let mut buf = vec![0; READ_BUF as usize];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left.min(READ_BUF)).unwrap_or(buf.len());
        f.read_exact(&mut buf[..n])
            .await
            .map_err(|e| CliError::new(Kind::Invalid, format!("reading the file: {e}")))?;
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(hasher.finalize().into())
}

/// The request body: `len` bytes of the file from `offset`, read as they are sent, at most
/// `rate` bytes per second, counted on the progress bar.
async fn body(
    file: &LocalFile,
    offset: u64,
    len: u64,
    rate: Option<u64>,
    bar: ProgressBar,
) -> Result<reqwest::Body, CliError> {
    let f = open_at(file, offset).await?;
    let piece = match rate {
        // Small reads when limited, so the pacing stays smooth.
        Some(r) => (r / 20).clamp(4096, READ_BUF),
        None => READ_BUF,
    };
    let start = Instant::now();
    let ends_file = offset + len == file.size;
    let finishing = format!("{} (the server is finishing)", file.name);
    let stream = futures_util::stream::try_unfold((f, 0u64), move |(mut f, sent)| {
        let bar = bar.clone();
        let finishing = finishing.clone();
        async move {
            if sent >= len {
                return Ok::<_, std::io::Error>(None);
            }
            if let Some(rate) = rate {
                #[allow(clippy::cast_precision_loss)]
                let due = start + Duration::from_secs_f64(sent as f64 / rate as f64);
                tokio::time::sleep_until(due.into()).await;
            }
            let n = usize::try_from((len - sent).min(piece)).unwrap_or(4096);
            let mut buf = BytesMut::zeroed(n);
            f.read_exact(&mut buf).await?;
            bar.inc(n as u64);
            if ends_file && sent + n as u64 == len {
                bar.set_message(finishing);
            }
            Ok(Some((buf.freeze(), (f, sent + n as u64))))
        }
    });
    Ok(reqwest::Body::wrap_stream(stream))
}

/// The file's full CRC64NVME, computed on a blocking thread while the upload runs, to compare
/// with what the server stored. Dropping it stops the computation.
struct LocalCrc {
    handle: tokio::task::JoinHandle<std::io::Result<u64>>,
    stop: Arc<AtomicBool>,
}

impl LocalCrc {
    fn start(file: &LocalFile) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (path, flag) = (file.absolute.clone(), Arc::clone(&stop));
        let handle = tokio::task::spawn_blocking(move || {
            use std::io::Read as _;
            let mut f = std::fs::File::open(&path)?;
            let mut digest = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Nvme);
            let mut buf = vec![0; 1 << 20];
            loop {
                if flag.load(Ordering::Relaxed) {
                    return Err(std::io::Error::other("stopped"));
                }
                let n = f.read(&mut buf)?;
                if n == 0 {
                    return Ok(digest.finalize());
                }
                digest.update(&buf[..n]);
            }
        });
        Self { handle, stop }
    }

    async fn finish(mut self) -> Result<String, CliError> {
        let fail = |e: String| CliError::new(Kind::Invalid, format!("reading the file: {e}"));
        match (&mut self.handle).await {
            Ok(Ok(crc)) => Ok(crc64_base64(crc)),
            Ok(Err(e)) => Err(fail(e.to_string())),
            Err(e) => Err(fail(e.to_string())),
        }
    }
}

impl Drop for LocalCrc {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        let kind = |s: u16| match refused_status::<()>(StatusCode::from_u16(s).unwrap(), "m".into())
        {
            Ok(Step::Gone) => "gone",
            Ok(Step::Retry(_)) => "retry",
            Ok(Step::Done(())) => "done",
            Err(e) => match e.kind {
                Kind::Auth => "auth",
                Kind::Invalid => "invalid",
                Kind::Unavailable => "unavailable",
                Kind::Usage => "usage",
            },
        };
        assert_eq!(kind(401), "auth");
        assert_eq!(kind(403), "auth");
        assert_eq!(kind(404), "gone");
        assert_eq!(kind(410), "gone");
        for s in [409, 423, 460, 429, 500, 502, 503] {
            assert_eq!(kind(s), "retry", "{s}");
        }
        for s in [400, 412, 413, 415] {
            assert_eq!(kind(s), "invalid", "{s}");
        }
    }

    #[test]
    fn keys_are_percent_decoded() {
        assert_eq!(
            percent_decode("uploads/alice/a%20b%C3%BC.txt").as_deref(),
            Some("uploads/alice/a bü.txt")
        );
        assert_eq!(percent_decode("plain/key").as_deref(), Some("plain/key"));
        assert_eq!(percent_decode("bad%2"), None);
        assert_eq!(percent_decode("bad%zz"), None);
        assert_eq!(percent_decode("%FF"), None);
    }
}
