//! tus with real clients: tus-js-client (Node) and tuspy (Python) as separate processes, the way
//! browsers, apps and scripts use the proxy. Every stored object's SHA-256 equals the source's.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const SIZES: [usize; 5] = [0, 1, 5 * MIB - 1, 5 * MIB, 50 * MIB];

fn js_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/js/tus-upload.mjs")
}

fn py_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/tus_upload.py")
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn node(cfg: &Value) -> Child {
    Command::new("node")
        .arg(js_script())
        .env("TUS_TEST_ARGS", cfg.to_string())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node is installed (scripts/test installs tus-js-client)")
}

fn tuspy(
    h: &Harness,
    file: &Path,
    chunk: usize,
    url: Option<&str>,
    stop_at: Option<usize>,
) -> Child {
    let mut cmd = Command::new(venv_bin("python"));
    cmd.arg(py_script())
        .arg(h.url("/files/"))
        .arg(token("alice"))
        .arg(file)
        .arg(chunk.to_string())
        .arg(url.unwrap_or("-"));
    if let Some(s) = stop_at {
        cmd.arg(s.to_string());
    }
    cmd.stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Waits for the process and returns its JSON events; it must succeed.
async fn events(child: Child) -> Vec<Value> {
    let out = tokio::time::timeout(Duration::from_secs(300), child.wait_with_output())
        .await
        .expect("client finished in time")
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "client failed: {text}");
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn event<'e>(events: &'e [Value], name: &str) -> &'e Value {
    events
        .iter()
        .find(|e| e["event"] == name)
        .unwrap_or_else(|| panic!("no {name} event in {events:?}"))
}

fn js_cfg(h: &Harness, file: &Path, chunk: Option<usize>, name: &str) -> Value {
    json!({
        "endpoint": h.url("/files/"),
        "token": token("alice"),
        "file": file,
        "chunkSize": chunk,
        "metadata": { "filename": name, "filetype": "application/x-test" },
    })
}

async fn stored_matches(h: &Harness, name: &str, bytes: &[u8]) {
    let stored = h
        .object(&format!("uploads/alice/{name}"))
        .await
        .unwrap_or_else(|| panic!("{name} stored"));
    assert_eq!(stored.len(), bytes.len(), "{name}");
    assert_eq!(sha256(&stored), sha256(bytes), "{name}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tus_js_client_sizes_and_chunking() {
    let h = Harness::embedded(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    for (i, len) in SIZES.into_iter().enumerate() {
        let bytes = data(len, 40 + i as u64);
        let file = write_file(dir.path(), &format!("src-{len}"), &bytes);
        for chunk in [Some(MIB), None] {
            let name = format!(
                "js-{len}-{}.bin",
                chunk.map_or("whole".into(), |c| c.to_string())
            );
            let (recv0, sent0) = (
                h.metric("s3up_received_bytes_total").await,
                h.metric("s3up_s3_sent_bytes_total").await,
            );
            let ev = events(node(&js_cfg(&h, &file, chunk, &name))).await;
            event(&ev, "success");
            stored_matches(&h, &name, &bytes).await;
            if len == 50 * MIB {
                let recv = h.metric("s3up_received_bytes_total").await - recv0;
                let sent = h.metric("s3up_s3_sent_bytes_total").await - sent0;
                println!(
                    "tus-js-client 50 MiB, chunkSize {chunk:?}: S3 bytes written per byte uploaded = {:.3}",
                    sent / recv
                );
                assert_eq!(recv, len as f64);
                let limit = if chunk.is_some() { 1.81 } else { 1.0 };
                assert!(sent / recv <= limit, "write amplification {}", sent / recv);
            }
        }
    }
    let head =
        h.s3.head_object()
            .bucket(&h.bucket)
            .key("uploads/alice/js-1-whole.bin")
            .send()
            .await
            .unwrap();
    assert_eq!(head.content_type(), Some("application/x-test"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tuspy_sizes_and_chunking() {
    let h = Harness::embedded(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    for (i, len) in SIZES.into_iter().enumerate() {
        let bytes = data(len, 60 + i as u64);
        for chunk in [MIB, 0] {
            let name = format!("py-{len}-{chunk}.bin");
            let file = write_file(dir.path(), &name, &bytes);
            let ev = events(tuspy(&h, &file, chunk, None, None)).await;
            event(&ev, "success");
            stored_matches(&h, &name, &bytes).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tus_js_client_against_moto() {
    let h = Harness::moto(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let bytes = data(12 * MIB + 5, 77);
    let file = write_file(dir.path(), "m", &bytes);
    for chunk in [Some(MIB), None] {
        let name = format!("moto-{chunk:?}.bin");
        event(
            &events(node(&js_cfg(&h, &file, chunk, &name))).await,
            "success",
        );
        stored_matches(&h, &name, &bytes).await;
    }
    let file = write_file(dir.path(), "moto-py.bin", &bytes);
    event(&events(tuspy(&h, &file, MIB, None, None)).await, "success");
    stored_matches(&h, "moto-py.bin", &bytes).await;
}

/// The client process dies in the middle of a PATCH; a new process resumes from the stored URL
/// and finds every byte the proxy received kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tus_js_client_killed_mid_patch_then_resumed() {
    let h = Harness::embedded(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let bytes = data(50 * MIB, 91);
    let file = write_file(dir.path(), "killed", &bytes);
    let mut cfg = js_cfg(&h, &file, None, "killed.bin");
    cfg["throttle"] = json!(20 * MIB);
    let mut first = node(&cfg);
    let mut lines = BufReader::new(first.stdout.take().unwrap()).lines();
    let url = loop {
        let line = lines.next_line().await.unwrap().expect("an upload URL");
        let ev: Value = serde_json::from_str(&line).unwrap();
        if ev["event"] == "url" {
            break ev["url"].as_str().unwrap().to_owned();
        }
    };
    let mut received = 0.0;
    for _ in 0..600 {
        received = h.metric("s3up_received_bytes_total").await;
        if received >= (12 * MIB) as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        received >= (12 * MIB) as f64 && received < bytes.len() as f64,
        "{received}"
    );
    first.kill().await.unwrap();

    let mut cfg = js_cfg(&h, &file, None, "killed.bin");
    cfg["uploadUrl"] = json!(url);
    let ev = events(node(&cfg)).await;
    // Its first PATCH may come before the request of the killed process has recorded what it
    // received (HEAD is answered from the state, which is being written); that PATCH waits for
    // the other's lease and gets a 409 with the new offset, and the client continues there.
    let resumed_at = ev
        .iter()
        .filter(|e| e["event"] == "patch")
        .filter_map(|e| e["offset"].as_u64())
        .max()
        .unwrap();
    assert!(resumed_at >= (12 * MIB) as u64, "resumed at {resumed_at}");
    assert_eq!(event(&ev, "success")["url"], url.as_str());
    stored_matches(&h, "killed.bin", &bytes).await;
    let received = h.metric("s3up_received_bytes_total").await;
    assert!(
        received < 1.1 * bytes.len() as f64,
        "the second process did not start over: {received}"
    );
}

/// An upload half done (tails in S3, no parts yet), the proxy restarted, a new client process
/// resumes: all state was in S3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_proxy_restart() {
    let h = Harness::embedded(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let bytes = data(13 * MIB + 11, 55);
    let file = write_file(dir.path(), "restart-py.bin", &bytes);
    let ev = events(tuspy(&h, &file, MIB, None, Some(7 * MIB))).await;
    let url = event(&ev, "stopped")["url"].as_str().unwrap().to_owned();
    assert_eq!(event(&ev, "stopped")["offset"], 7 * MIB);

    let jsfile = write_file(dir.path(), "restart-js", &bytes);
    let mut cfg = js_cfg(&h, &jsfile, Some(3 * MIB), "restart-js.bin");
    cfg["throttle"] = json!(8 * MIB);
    let mut js = node(&cfg);
    let mut lines = BufReader::new(js.stdout.take().unwrap()).lines();
    let mut js_url = None;
    while let Some(line) = lines.next_line().await.unwrap() {
        let ev: Value = serde_json::from_str(&line).unwrap();
        if ev["event"] == "url" {
            js_url = ev["url"].as_str().map(str::to_owned);
        }
        if ev["event"] == "patch" && ev["offset"].as_u64() >= Some(6 * MIB as u64) {
            break;
        }
    }
    js.kill().await.unwrap();

    let h = h.restart().await;

    let ev = events(tuspy(&h, &file, MIB, Some(&url), None)).await;
    assert_eq!(
        event(&ev, "url")["offset"],
        7 * MIB,
        "the new proxy knows the offset"
    );
    event(&ev, "success");
    stored_matches(&h, "restart-py.bin", &bytes).await;

    let mut cfg = js_cfg(&h, &jsfile, Some(3 * MIB), "restart-js.bin");
    cfg["uploadUrl"] = json!(js_url.unwrap());
    let ev = events(node(&cfg)).await;
    assert!(event(&ev, "patch")["offset"].as_u64().unwrap() >= 6 * MIB as u64);
    event(&ev, "success");
    stored_matches(&h, "restart-js.bin", &bytes).await;
}

/// `parallelUploads: 4`: four partial uploads, then a final upload assembled from them
/// (UploadPartCopy when the partials are large enough, a streamed server-side copy otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tus_js_client_parallel_uploads() {
    let h = Harness::embedded(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    for (len, chunk) in [(50 * MIB, None), (3 * MIB + 3, Some(MIB))] {
        let bytes = data(len, len as u64);
        let file = write_file(dir.path(), &format!("par-{len}"), &bytes);
        let name = format!("parallel-{len}.bin");
        let mut cfg = js_cfg(&h, &file, chunk, &name);
        cfg["parallel"] = json!(4);
        let ev = events(node(&cfg)).await;
        event(&ev, "success");
        stored_matches(&h, &name, &bytes).await;
    }
    // Nothing of the partial uploads is left in the user's listing.
    let list: Value = h
        .http
        .get(h.url("/uploads"))
        .bearer_auth(token("alice"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["objects"].as_array().unwrap().len(), 2, "{list}");
}
