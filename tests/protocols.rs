//! The same upload over HTTP/1.1, h2c (prior knowledge), and TLS with ALPN h2 and http/1.1.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use http::{StatusCode, Version};
use s3_upload_proxy::server::start;

async fn upload_with(
    h: &Harness,
    client: &reqwest::Client,
    base: &str,
    name: &str,
    body: Vec<u8>,
) -> Version {
    let resp = client
        .put(format!("{base}/uploads/{name}"))
        .bearer_auth(token("alice"))
        .body(chunked(body.clone(), 100_000))
        .send()
        .await
        .unwrap();
    let version = resp.version();
    assert_eq!(resp.status(), StatusCode::CREATED, "{name}");
    let stored = h.object(&format!("uploads/alice/{name}")).await.unwrap();
    assert_eq!(sha256(&stored), sha256(&body), "{name}");
    version
}

#[tokio::test]
async fn http2_cleartext_prior_knowledge() {
    let h = Harness::embedded(&[]).await;
    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let version = upload_with(&h, &h2c, &h.proxy.url(), "h2c.bin", data(12 * MIB, 1)).await;
    assert_eq!(version, Version::HTTP_2);
    let h1 = reqwest::Client::builder().http1_only().build().unwrap();
    let version = upload_with(&h, &h1, &h.proxy.url(), "h1.bin", data(7 * MIB, 2)).await;
    assert_eq!(version, Version::HTTP_11);
}

#[tokio::test]
async fn tls_with_alpn_serves_h2_and_http1() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let settings = settings(
        None,
        dir.path(),
        &[
            ("S3UP_TLS_CERT_FILE", cert_path.to_str().unwrap()),
            ("S3UP_TLS_KEY_FILE", key_path.to_str().unwrap()),
        ],
    );
    let proxy = start(settings, None).await.unwrap();
    assert!(proxy.url().starts_with("https://"));
    let s3 = proxy.app.state.bucket.client.clone();
    let h = Harness::from_running(proxy, s3, "uploads", dir);
    let base = format!("https://localhost:{}", h.proxy.addr.port());
    let root = reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap();
    let client = |h2: bool| {
        let b = reqwest::Client::builder()
            .tls_certs_only([root.clone()])
            .resolve("localhost", h.proxy.addr);
        if h2 { b } else { b.http1_only() }.build().unwrap()
    };
    assert_eq!(
        upload_with(&h, &client(true), &base, "tls-h2.bin", data(11 * MIB, 3)).await,
        Version::HTTP_2
    );
    assert_eq!(
        upload_with(&h, &client(false), &base, "tls-h1.bin", data(6 * MIB, 4)).await,
        Version::HTTP_11
    );
    // Plain HTTP to the TLS port is not served.
    assert!(
        reqwest::get(format!("http://{}/healthz", h.proxy.addr))
            .await
            .is_err()
    );
}
