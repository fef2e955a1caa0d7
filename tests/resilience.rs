//! S3 failures between the proxy and the store: retried from the buffered part, or reported
//! with S3's request id and cleaned up; plus the drain on shutdown.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use common::*;
use http::StatusCode;
use s3_upload_proxy::s3::Endpoint;
use s3_upload_proxy::s3::embedded::EmbeddedStore;
use serde_json::Value;

/// Which requests fail, and how.
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    /// The first attempt of every UploadPart gets a 500.
    FirstPartAttempt,
    /// Every UploadPart gets a 500.
    EveryPart,
    /// Every UploadPart gets 503 SlowDown.
    SlowDown,
}

struct Faulty {
    store: String,
    fault: Fault,
    seen_parts: std::sync::Mutex<std::collections::HashSet<String>>,
    injected: AtomicUsize,
    aborts: AtomicUsize,
    http: reqwest::Client,
}

/// An HTTP proxy in front of the embedded store that injects S3 errors.
async fn faulty_s3(fault: Fault) -> (Arc<Faulty>, EmbeddedStore, String) {
    let dir = tempfile::tempdir().unwrap().keep();
    let store = EmbeddedStore::start(
        &dir,
        "uploads",
        ([127, 0, 0, 1], 0).into(),
        Some(("ak".into(), "sk".into())),
    )
    .await
    .unwrap();
    let state = Arc::new(Faulty {
        store: store.url(),
        fault,
        seen_parts: Default::default(),
        injected: AtomicUsize::new(0),
        aborts: AtomicUsize::new(0),
        http: reqwest::Client::new(),
    });
    let app = axum::Router::new()
        .fallback(forward)
        .with_state(Arc::clone(&state));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (state, store, url)
}

async fn forward(State(f): State<Arc<Faulty>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let query = parts.uri.query().unwrap_or("");
    let is_part = parts.method == http::Method::PUT && query.contains("partNumber=");
    if parts.method == http::Method::DELETE && query.contains("uploadId=") {
        f.aborts.fetch_add(1, Ordering::SeqCst);
    }
    let fail = is_part
        && match f.fault {
            Fault::FirstPartAttempt => f.seen_parts.lock().unwrap().insert(query.to_owned()),
            Fault::EveryPart | Fault::SlowDown => true,
        };
    if fail {
        let n = f.injected.fetch_add(1, Ordering::SeqCst);
        let (status, code) = if f.fault == Fault::SlowDown {
            (503, "SlowDown")
        } else {
            (500, "InternalError")
        };
        let xml = format!(
            "<Error><Code>{code}</Code><Message>injected</Message><RequestId>fault-{n}</RequestId></Error>"
        );
        return Response::builder()
            .status(status)
            .header("x-amz-request-id", format!("fault-{n}"))
            .header("content-type", "application/xml")
            .body(Body::from(xml))
            .unwrap();
    }
    let mut out = f.http.request(
        parts.method,
        format!("{}{}", f.store, parts.uri.path_and_query().unwrap()),
    );
    for (name, value) in &parts.headers {
        if name != http::header::CONNECTION && name != http::header::TRANSFER_ENCODING {
            out = out.header(name, value);
        }
    }
    let resp = out.body(body).send().await.unwrap();
    let mut builder = Response::builder().status(resp.status());
    for (name, value) in resp.headers() {
        if name != http::header::TRANSFER_ENCODING
            && name != http::header::CONNECTION
            && name != http::header::CONTENT_LENGTH
        {
            builder = builder.header(name, value);
        }
    }
    builder
        .body(Body::from(resp.bytes().await.unwrap()))
        .unwrap()
}

async fn harness(fault: Fault) -> (Harness, Arc<Faulty>, EmbeddedStore) {
    let (faulty, store, url) = faulty_s3(fault).await;
    let endpoint = Endpoint::Static {
        url,
        access_key: "ak".into(),
        secret_key: "sk".into(),
    };
    let direct = Endpoint::Static {
        url: store.url(),
        access_key: "ak".into(),
        secret_key: "sk".into(),
    };
    let settings = s3_upload_proxy::s3::ClientSettings {
        max_attempts: 3,
        attempt_timeout: std::time::Duration::from_secs(30),
    };
    let s3 = s3_upload_proxy::s3::client(direct, &settings, Default::default()).await;
    (
        Harness::with_endpoint(endpoint, "uploads", s3, &[]).await,
        faulty,
        store,
    )
}

#[tokio::test]
async fn failed_parts_are_retried_from_the_buffer() {
    let (h, faulty, _store) = harness(Fault::FirstPartAttempt).await;
    for (name, body) in [
        ("cl.bin", data(17 * MIB, 1)),
        ("chunked.bin", data(17 * MIB + 5, 2)),
    ] {
        let req = if name == "cl.bin" {
            body.clone().into()
        } else {
            chunked(body.clone(), 300_000)
        };
        let resp = h.put("alice", name, req).await;
        assert_eq!(
            resp.status(),
            StatusCode::CREATED,
            "{}",
            resp.text().await.unwrap()
        );
        let stored = h.object(&format!("uploads/alice/{name}")).await.unwrap();
        assert_eq!(sha256(&stored), sha256(&body));
    }
    // 4 parts each, every first attempt failed, every retry resent the buffered bytes.
    assert_eq!(faulty.injected.load(Ordering::SeqCst), 8);
    assert_eq!(h.metric("s3up_s3_retries_total").await, 8.0);
    assert_eq!(h.metric("s3up_s3_parts_total").await, 8.0);
}

#[tokio::test]
async fn persistent_s3_errors_fail_with_the_s3_request_id_and_abort() {
    let (h, faulty, _store) = harness(Fault::EveryPart).await;
    let resp = h.put("alice", "doomed.bin", data(12 * MIB, 1).into()).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "s3_error");
    assert!(
        body["s3_request_id"]
            .as_str()
            .unwrap()
            .starts_with("fault-"),
        "{body}"
    );
    assert!(body["message"].as_str().unwrap().contains("InternalError"));
    // 3 attempts for the failing part (others may have been in flight too).
    assert!(faulty.injected.load(Ordering::SeqCst) >= 3);
    for _ in 0..50 {
        if faulty.aborts.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        faulty.aborts.load(Ordering::SeqCst),
        1,
        "the multipart upload must be aborted"
    );
    assert!(h.object("uploads/alice/doomed.bin").await.is_none());
}

#[tokio::test]
async fn throttling_is_a_503() {
    let (h, _faulty, _store) = harness(Fault::SlowDown).await;
    let resp = h.put("alice", "slow.bin", data(11 * MIB, 1).into()).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "s3_error");
}

#[tokio::test]
async fn unreachable_s3_is_a_503_and_not_ready() {
    let port = free_port();
    let endpoint = Endpoint::Static {
        url: format!("http://127.0.0.1:{port}"),
        access_key: "a".into(),
        secret_key: "s".into(),
    };
    let s3 = s3_upload_proxy::s3::client(
        endpoint.clone(),
        &s3_upload_proxy::s3::ClientSettings {
            max_attempts: 1,
            attempt_timeout: std::time::Duration::from_secs(5),
        },
        Default::default(),
    )
    .await;
    let h = Harness::with_endpoint(endpoint, "uploads", s3, &[]).await;
    assert_eq!(
        h.http.get(h.url("/readyz")).send().await.unwrap().status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    let resp = h.put("alice", "x.bin", "x".into()).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"],
        "s3_unreachable"
    );
}

#[tokio::test]
async fn shutdown_drains_then_aborts_what_is_left() {
    let h = Harness::embedded(&[("S3UP_SHUTDOWN_GRACE", "2s")]).await;
    // One upload finishes during the grace period, one stalls past it.
    let (tx_done, rx_done) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let (tx_stall, rx_stall) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let send = |name: &str, rx| {
        let req = h
            .http
            .put(h.url(&format!("/uploads/{name}")))
            .bearer_auth(token("alice"))
            .body(reqwest::Body::wrap_stream(stream(rx)));
        tokio::spawn(async move { req.send().await })
    };
    let done = send("done.bin", rx_done);
    let stalled = send("stalled.bin", rx_stall);
    tx_done.send(Ok(data(6 * MIB, 1))).await.unwrap();
    tx_stall.send(Ok(data(6 * MIB, 2))).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    h.proxy.shutdown();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    // No new connections once draining.
    assert!(
        reqwest::Client::new()
            .get(h.url("/healthz"))
            .send()
            .await
            .is_err()
    );
    tx_done.send(Ok(data(MIB, 3))).await.unwrap();
    drop(tx_done);
    let done = done.await.unwrap().unwrap();
    assert_eq!(done.status(), StatusCode::CREATED);
    // The stalled one is cut off when the grace period ends.
    let stalled = stalled.await.unwrap();
    assert!(stalled.is_err() || stalled.unwrap().status() != StatusCode::CREATED);
    drop(tx_stall);
    for _ in 0..50 {
        if h.proxy.app.state.metrics.multipart_aborted.get() == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        h.proxy.app.state.metrics.multipart_aborted.get(),
        1,
        "the stalled multipart upload must be aborted"
    );
    assert_eq!(
        h.object("uploads/alice/done.bin").await.unwrap().len(),
        7 * MIB
    );
    assert!(h.object("uploads/alice/stalled.bin").await.is_none());
}

fn stream<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}
