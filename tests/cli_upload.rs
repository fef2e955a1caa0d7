//! The `upload` command, run as the real binary against a proxy started in-process on port 0:
//! tus uploads through the proxy (resumed after the client is killed), exit codes, and
//! `--direct` uploads to moto with `/sts` credentials of an upload role.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::*;

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

/// The binary's `upload` command with a clean environment: no S3UP_* or AWS_* settings from
/// the machine running the tests.
fn cli(server: &str, state_dir: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_s3-upload-proxy"));
    for (k, _) in std::env::vars() {
        if k.starts_with("S3UP_") || k.starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    cmd.arg("upload")
        .args(["--server", server])
        .arg("--state-dir")
        .arg(state_dir)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn run(mut cmd: tokio::process::Command) -> Output {
    let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
        .await
        .expect("the upload command did not finish in 5 minutes")
        .unwrap();
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// The final lines: (key, size, checksum) per uploaded file.
fn lines(out: &Output) -> Vec<(String, u64, String)> {
    out.stdout
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 3, "not KEY<TAB>SIZE<TAB>CHECKSUM: {l:?}");
            (f[0].to_owned(), f[1].parse().unwrap(), f[2].to_owned())
        })
        .collect()
}

fn crc64nvme(bytes: &[u8]) -> String {
    let crc = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Nvme, bytes);
    format!(
        "crc64nvme:{}",
        s3_upload_proxy::upload::part::crc64_base64(crc)
    )
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn state_files(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

fn assert_ok(out: &Output) {
    assert_eq!(
        out.code, 0,
        "exit {}\nstdout: {}\nstderr: {}",
        out.code, out.stdout, out.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tus_uploads_files_of_every_size() {
    let h = Harness::embedded(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let files = [
        ("empty.bin", data(0, 1)),
        ("one.txt", data(1, 2)),
        // Three PATCHes of 4 MiB (two parts of the proxy's and tails) and a short last one.
        ("multi.bin", data(13 * MIB + 7, 3)),
    ];
    let paths: Vec<PathBuf> = files
        .iter()
        .map(|(name, bytes)| write(dir.path(), name, bytes))
        .collect();
    let mut cmd = cli(&h.proxy.url(), &state);
    cmd.args(["--chunk-size", "4MiB"])
        .args(&paths)
        .env("S3UP_TOKEN", token("alice"));
    let out = run(cmd).await;
    assert_ok(&out);
    let done = lines(&out);
    assert_eq!(done.len(), files.len(), "{}", out.stdout);
    for ((name, bytes), (key, size, checksum)) in files.iter().zip(&done) {
        assert_eq!(key, &format!("uploads/alice/{name}"));
        assert_eq!(*size, bytes.len() as u64);
        assert_eq!(checksum, &crc64nvme(bytes), "{name}");
        let stored = h
            .object(key)
            .await
            .unwrap_or_else(|| panic!("{key} missing"));
        assert_eq!(sha256(&stored), sha256(bytes), "{name}");
    }
    // The guessed type reached S3.
    let head =
        h.s3.head_object()
            .bucket(&h.bucket)
            .key("uploads/alice/one.txt")
            .send()
            .await
            .unwrap();
    assert_eq!(head.content_type(), Some("text/plain"));
    // Finished uploads leave no resume state behind.
    assert_eq!(state_files(&state), Vec::<PathBuf>::new());
    // The token is never printed.
    assert!(!out.stderr.contains(&token("alice")) && !out.stdout.contains(&token("alice")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tus_upload_resumes_after_the_client_is_killed() {
    let h = Harness::embedded(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let len = 24 * MIB + 123;
    let bytes = data(len, 9);
    let path = write(dir.path(), "resume.bin", &bytes);
    let token_file = write(
        dir.path(),
        "token",
        format!("{}\n", token("alice")).as_bytes(),
    );
    let command = |limited: bool| {
        let mut cmd = cli(&h.proxy.url(), &state);
        cmd.args(["--chunk-size", "6MiB"])
            .arg("--token-file")
            .arg(&token_file)
            .arg(&path);
        if limited {
            cmd.args(["--limit-rate", "3MiB"]);
        }
        cmd
    };

    // First run, slowed down; killed once the first chunk is stored and the second is flowing.
    let mut first = command(true).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while h.metric("s3up_received_bytes_total").await < (7 * MIB) as f64 {
        assert!(Instant::now() < deadline, "the first run made no progress");
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first run ended early"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.kill().await.unwrap();
    assert_eq!(
        state_files(&state).len(),
        1,
        "the upload URL is remembered while the upload is unfinished"
    );
    assert!(h.object("uploads/alice/resume.bin").await.is_none());
    // Let the proxy finish storing what it received of the broken PATCH.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = h.metric("s3up_received_bytes_total").await;

    // The same command again: it continues from the server's offset.
    let out = run(command(false)).await;
    assert_ok(&out);
    let sent_again = h.metric("s3up_received_bytes_total").await - before;
    assert!(
        sent_again <= (len - 6 * MIB) as f64,
        "the second run sent {sent_again} bytes of {len}: it did not resume"
    );
    assert!(sent_again > 0.0);
    let done = lines(&out);
    assert_eq!(
        done,
        vec![(
            "uploads/alice/resume.bin".to_owned(),
            len as u64,
            crc64nvme(&bytes)
        )]
    );
    let stored = h.object("uploads/alice/resume.bin").await.unwrap();
    assert_eq!(sha256(&stored), sha256(&bytes));
    assert_eq!(state_files(&state), Vec::<PathBuf>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_tokens_and_bad_files_have_their_exit_codes() {
    let h = Harness::embedded(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let path = write(dir.path(), "a.bin", &data(1000, 4));
    let bad = "not-a-valid-token";

    // A token the proxy refuses: 3, for tus and for --direct, with one line on stderr.
    for direct in [false, true] {
        let mut cmd = cli(&h.proxy.url(), &state);
        cmd.args(["--token", bad]).arg(&path);
        if direct {
            cmd.arg("--direct");
        }
        let out = run(cmd).await;
        assert_eq!(out.code, 3, "direct={direct}: {}", out.stderr);
        assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
        assert!(out.stderr.contains("401"), "{}", out.stderr);
        assert!(!out.stderr.contains(bad), "the token was printed");
        assert_eq!(out.stdout, "");
    }

    // A file that does not exist: 5; the other file is still uploaded.
    let mut cmd = cli(&h.proxy.url(), &state);
    cmd.env("S3UP_TOKEN", token("alice"))
        .arg(dir.path().join("missing.bin"))
        .arg(&path);
    let out = run(cmd).await;
    assert_eq!(out.code, 5, "{}", out.stderr);
    assert!(out.stderr.contains("missing.bin"), "{}", out.stderr);
    assert_eq!(lines(&out).len(), 1, "{}", out.stdout);
    assert!(h.object("uploads/alice/a.bin").await.is_some());

    // --direct on a proxy without an upload role (/sts answers 501): 5.
    let mut cmd = cli(&h.proxy.url(), &state);
    cmd.env("S3UP_TOKEN", token("alice"))
        .arg("--direct")
        .arg(&path);
    let out = run(cmd).await;
    assert_eq!(out.code, 5, "{}", out.stderr);
    assert!(out.stderr.contains("501"), "{}", out.stderr);

    // No token at all, or a server URL that is none: usage, 2.
    let mut cmd = cli(&h.proxy.url(), &state);
    cmd.arg(&path);
    assert_eq!(run(cmd).await.code, 2);
    let mut cmd = cli("not a url", &state);
    cmd.args(["--token", "t"]).arg(&path);
    assert_eq!(run(cmd).await.code, 2);

    // Nothing listens: 4 after the retries.
    let port = free_port();
    let mut cmd = cli(&format!("http://127.0.0.1:{port}"), &state);
    cmd.args(["--token", "t", "--retries", "1"]).arg(&path);
    let out = run(cmd).await;
    assert_eq!(out.code, 4, "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_uploads_land_under_the_users_prefix_in_s3() {
    let (h, iam) = Harness::moto_with_role(&[], true).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let files = [
        ("empty.bin", data(0, 5)),
        ("one.txt", data(1, 6)),
        // Three parts of 5 MiB, two at a time.
        ("multi.bin", data(11 * MIB + 5, 7)),
    ];
    let paths: Vec<PathBuf> = files
        .iter()
        .map(|(name, bytes)| write(dir.path(), name, bytes))
        .collect();
    let direct = |extra: &[&str], paths: &[PathBuf]| {
        let mut cmd = cli(&h.proxy.url(), &state);
        cmd.args(["--direct", "--part-size", "5MiB", "--parallel", "2"])
            .args(extra)
            .args(paths)
            .env("S3UP_TOKEN", token("alice"))
            .env("AWS_ENDPOINT_URL_S3", &iam.url);
        cmd
    };
    let out = run(direct(&[], &paths)).await;
    assert_ok(&out);
    let done = lines(&out);
    assert_eq!(done.len(), files.len(), "{}", out.stdout);
    for ((name, bytes), (key, size, checksum)) in files.iter().zip(&done) {
        assert_eq!(key, &format!("uploads/alice/{name}"));
        assert_eq!(*size, bytes.len() as u64);
        assert_eq!(checksum, &crc64nvme(bytes), "{name}");
        let stored = h
            .object(key)
            .await
            .unwrap_or_else(|| panic!("{key} missing"));
        assert_eq!(sha256(&stored), sha256(bytes), "{name}");
    }
    let head =
        h.s3.head_object()
            .bucket(&h.bucket)
            .key("uploads/alice/multi.bin")
            .send()
            .await
            .unwrap();
    assert_eq!(head.content_type(), Some("application/octet-stream"));
    // The bytes went to S3, not through the proxy.
    assert_eq!(h.metric("s3up_received_bytes_total").await, 0.0);

    // An existing object is not replaced without --overwrite: 5, and S3 keeps the old bytes.
    let changed = data(1, 8);
    let one = write(dir.path(), "one.txt", &changed);
    let out = run(direct(&[], std::slice::from_ref(&one))).await;
    assert_eq!(out.code, 5, "{}", out.stderr);
    assert!(out.stderr.contains("already exists"), "{}", out.stderr);
    assert_eq!(h.object("uploads/alice/one.txt").await.unwrap(), files[1].1);
    let out = run(direct(&["--overwrite"], std::slice::from_ref(&one))).await;
    assert_ok(&out);
    assert_eq!(h.object("uploads/alice/one.txt").await.unwrap(), changed);
}

/// A TCP relay to `upstream` that breaks the first connection on which more than `cut_after`
/// bytes go from client to server; returns its address and how many connections it broke.
async fn breaking_relay(
    upstream: std::net::SocketAddr,
    cut_after: usize,
) -> (std::net::SocketAddr, Arc<AtomicU32>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cuts = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&cuts);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(upstream).await.unwrap();
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let down = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                });
                let mut buf = vec![0; 64 * 1024];
                let mut sent = 0;
                loop {
                    let n = match client_read.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if sent + n > cut_after && counter.load(Ordering::SeqCst) == 0 {
                        counter.fetch_add(1, Ordering::SeqCst);
                        // Dropping both halves of both sockets breaks the request mid-body.
                        down.abort();
                        return;
                    }
                    sent += n;
                    if server_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = server_write.shutdown().await;
                let _ = down.await;
            });
        }
    });
    (addr, cuts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tus_upload_survives_a_broken_connection_in_one_run() {
    let h = Harness::embedded(&[]).await;
    let (relay, cuts) = breaking_relay(h.proxy.addr, 3 * MIB).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let len = 16 * MIB + 3;
    let bytes = data(len, 11);
    let path = write(dir.path(), "broken.bin", &bytes);
    let mut cmd = cli(&format!("http://{relay}"), &state);
    cmd.args(["--chunk-size", "8MiB", "--retries", "3"])
        .env("S3UP_TOKEN", token("alice"))
        .arg(&path);
    let out = run(cmd).await;
    assert_ok(&out);
    assert_eq!(
        cuts.load(Ordering::SeqCst),
        1,
        "the relay broke no connection"
    );
    assert_eq!(
        lines(&out),
        vec![(
            "uploads/alice/broken.bin".to_owned(),
            len as u64,
            crc64nvme(&bytes)
        )]
    );
    let stored = h.object("uploads/alice/broken.bin").await.unwrap();
    assert_eq!(sha256(&stored), sha256(&bytes));
    // The same upload went on (HEAD, then PATCH from the proxy's offset): one creation, and
    // nothing was sent twice but what the broken connection carried.
    let text = h
        .http
        .get(h.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await;
    let created: f64 = text
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("s3up_http_requests_total{") && l.contains("\"tus_create\""))
        .filter(|l| l.contains("status=\"201\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(created, 1.0);
    let received = h.metric("s3up_received_bytes_total").await;
    assert!(
        received <= (len + 3 * MIB) as f64,
        "the proxy received {received} bytes for a {len}-byte file"
    );
}
