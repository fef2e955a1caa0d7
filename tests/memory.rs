//! Peak RSS of the real binary under many concurrent uploads far larger than the budget.
//! The proxy runs as its own process (against `s3-upload-proxy store`, also its own process) so
//! /proc/<pid>/status measures only the proxy.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;

const BUDGET_MIB: u64 = 64;
/// What the proxy may grow beyond the budget while serving: 50 connections' read buffers, frames
/// carried between parts, SDK and allocator state. Measured from the idle process after one
/// warm-up upload, so code pages (tens of MiB in a debug build) are not counted.
const OVERHEAD_MIB: u64 = 16;
const UPLOADS: usize = 50;
const UPLOAD_SIZE: usize = 16 * MIB;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_s3-upload-proxy"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap())
        .env("AWS_ACCESS_KEY_ID", "memtest")
        .env("AWS_SECRET_ACCESS_KEY", "memtest-secret")
        .env("RUST_LOG", "warn");
    cmd
}

/// A generated body sent in 64 KiB chunks; never held whole in this process.
fn body(seed: u64) -> reqwest::Body {
    let chunk = 64 * 1024;
    let stream = futures_util::stream::iter(0..UPLOAD_SIZE / chunk)
        .map(move |i| Ok::<_, std::io::Error>(data(chunk, seed * 1000 + i as u64)));
    reqwest::Body::wrap_stream(stream)
}

use futures_util::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peak_rss_stays_within_budget_plus_constant() {
    let dir = tempfile::tempdir().unwrap();
    let store_port = free_port();
    let _store = Proc(
        bin()
            .args([
                "store",
                "--listen",
                &format!("127.0.0.1:{store_port}"),
                "--data-dir",
            ])
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", store_port)).is_err() {
        assert!(Instant::now() < deadline, "store did not start");
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut proxy = bin()
        .arg("serve")
        .env("HOME", dir.path())
        .env("S3UP_LISTEN", "127.0.0.1:0")
        .env("S3UP_BUCKET", "uploads")
        .env("S3UP_MEMORY_BUDGET", format!("{BUDGET_MIB}MiB"))
        .env("S3UP_PART_SIZE", "8MiB")
        .env("S3UP_JWT_HS256_SECRET", SECRET)
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{store_port}"))
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = proxy.id();
    let mut line = String::new();
    BufReader::new(proxy.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{line}");
    let _proxy = Proc(proxy);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .unwrap();
    // Warm up every code path once (a multipart upload), so the baseline includes the code.
    let resp = client
        .put(format!("{url}/uploads/warmup.bin"))
        .bearer_auth(token("warm"))
        .body(data(9 * MIB, 1))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let baseline = status_kib(pid, "VmRSS:");

    let started = Instant::now();
    let tasks: Vec<_> = (0..UPLOADS)
        .map(|i| {
            let mut req = client
                .put(format!("{url}/uploads/mem/{i}.bin"))
                .bearer_auth(token(&format!("user{}", i % 7)));
            if i % 2 == 0 {
                req = req.header("content-length", UPLOAD_SIZE);
            }
            let req = req.body(body(i as u64));
            tokio::spawn(async move { req.send().await.unwrap() })
        })
        .collect();
    for task in tasks {
        let resp = task.await.unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED);
        let json: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(json["size"], UPLOAD_SIZE as u64);
    }
    let elapsed = started.elapsed();
    let peak = status_kib(pid, "VmHWM:");
    println!(
        "{UPLOADS} x {} MiB uploads in {elapsed:?}; proxy RSS idle {} MiB, peak {} MiB, growth {} MiB (budget {BUDGET_MIB} MiB)",
        UPLOAD_SIZE / MIB,
        baseline / 1024,
        peak / 1024,
        (peak - baseline) / 1024
    );
    assert!(
        peak - baseline <= (BUDGET_MIB + OVERHEAD_MIB) * 1024,
        "peak RSS grew {} MiB over idle: more than budget {BUDGET_MIB} MiB + {OVERHEAD_MIB} MiB",
        (peak - baseline) / 1024
    );
}
