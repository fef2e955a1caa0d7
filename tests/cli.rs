//! The binary as an operator meets it: zero-config start, dev tokens, config errors, SIGTERM.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;
use http::StatusCode;

fn bin(dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_s3-upload-proxy"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap())
        .env("HOME", dir)
        .current_dir(dir);
    cmd
}

#[test]
fn invalid_config_exits_64_naming_the_key_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    // Hold the port: a proxy that bound before validating would fail with "address in use".
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = held.local_addr().unwrap().to_string();
    for (key, value, named) in [
        ("S3UP_PART_SIZE", "1MiB", "part_size"),
        ("S3UP_MEMORY_BUDGET", "lots", "memory_budget"),
        ("S3UP_KEY_PREFIX", "/abs/{user}/", "key_prefix"),
        ("S3UP_NO_SUCH_SETTING", "1", "no_such_setting"),
    ] {
        let out = bin(dir.path())
            .arg("serve")
            .env("S3UP_LISTEN", &listen)
            .env(key, value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{key}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(named) && !stderr.contains("in use"),
            "{key}: {stderr}"
        );
    }
    // A custom endpoint without a bucket is a configuration error too.
    let out = bin(dir.path())
        .arg("serve")
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bucket"));
}

#[test]
fn token_refuses_without_an_hs256_secret() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin(dir.path())
        .args(["token", "--user", "alice"])
        .env("S3UP_BUCKET", "b-1")
        .env("S3UP_JWT_JWKS_URL", "http://127.0.0.1:1/jwks")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("HS256"));
    assert!(out.stdout.is_empty());
}

#[tokio::test]
async fn zero_config_serve_with_dev_login_then_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    // Our own debug logs on, so a leak would show: no token, secret or key may appear in them.
    let mut serve = bin(dir.path())
        .arg("serve")
        .env("S3UP_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info,s3_upload_proxy=debug,tower_http=debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = serve.stderr.take().unwrap();
    let logs = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap());
    let mut lines = BufReader::new(serve.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let url = first.rsplit(' ').next().unwrap().to_owned();
    assert!(first.contains("listening on http://127.0.0.1:"), "{first}");
    let rest: Vec<String> = lines.by_ref().take(3).map(Result::unwrap).collect();
    assert!(rest.iter().any(|l| l.contains("token --user")), "{rest:?}");

    let token = bin(dir.path())
        .args(["token", "--user", "alice", "--ttl", "5m"])
        .output()
        .unwrap();
    assert!(token.status.success());
    let token = String::from_utf8(token.stdout).unwrap().trim().to_owned();
    assert_eq!(token.split('.').count(), 3);

    let body = data(6 * MIB + 3, 1);
    let client = reqwest::Client::new();
    let resp = client
        .put(format!("{url}/uploads/first.bin"))
        .bearer_auth(&token)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    // The embedded store keeps the object as a file under ./data/<bucket>/<key>.
    let stored = std::fs::read(dir.path().join("data/uploads/uploads/alice/first.bin")).unwrap();
    assert_eq!(sha256(&stored), sha256(&body));

    let pid = serve.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::task::spawn_blocking(move || serve.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
    let logs = logs.join().unwrap();
    assert!(logs.contains("request"), "request logs expected: {logs}");
    let secret = std::fs::read_to_string(dir.path().join("data/.dev-jwt-secret")).unwrap();
    let signature = token.rsplit('.').next().unwrap();
    for (what, needle) in [
        ("token", token.as_str()),
        ("token signature", signature),
        ("dev secret", secret.trim()),
    ] {
        assert!(!logs.contains(needle), "the {what} appears in the logs");
    }
    assert!(
        !logs.to_ascii_lowercase().contains("bearer "),
        "an Authorization header was logged"
    );
}
