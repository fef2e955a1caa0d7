//! PUT /uploads end to end: the real proxy on port 0 against the embedded store and moto_server.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use http::StatusCode;
use serde_json::Value;

/// 0 B, 1 B, one part, one part + 1, and several parts, with Content-Length and chunked.
async fn sizes_round_trip(h: &Harness) {
    let sizes = [0, 1, 5 * MIB, 5 * MIB + 1, 3 * 5 * MIB + 12_345];
    for (i, &len) in sizes.iter().enumerate() {
        for chunked_body in [false, true] {
            let bytes = data(len, i as u64 + 1);
            let name = format!("sizes/{len}-{chunked_body}.bin");
            let body = if chunked_body {
                chunked(bytes.clone(), 64 * 1024 + 7)
            } else {
                bytes.clone().into()
            };
            let resp = h.put("alice", &name, body).await;
            assert_eq!(
                resp.status(),
                StatusCode::CREATED,
                "{name}: {}",
                resp.text().await.unwrap()
            );
            let json: Value = resp.json().await.unwrap();
            let key = format!("uploads/alice/{name}");
            assert_eq!(json["key"], key.as_str());
            assert_eq!(json["bucket"], h.bucket.as_str());
            assert_eq!(json["size"], len as u64, "{name}");
            assert_eq!(json["checksum_algorithm"], "CRC64NVME");
            assert_eq!(json["checksum"], crc64(&bytes), "{name}");
            assert!(!json["etag"].as_str().unwrap().is_empty());
            let stored = h.object(&key).await.expect("object stored");
            assert_eq!(
                sha256(&stored),
                sha256(&bytes),
                "{name}: stored bytes differ"
            );
        }
    }
}

fn crc64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    let mut d = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Nvme);
    d.update(bytes);
    base64::engine::general_purpose::STANDARD.encode(d.finalize().to_be_bytes())
}

#[tokio::test]
async fn sizes_round_trip_embedded() {
    let h = Harness::embedded(&[]).await;
    sizes_round_trip(&h).await;
    // Bodies up to one part go as one PutObject, with or without a length; the rest are
    // 2 and 4 parts, with Content-Length and chunked.
    assert_eq!(h.metric("s3up_s3_parts_total").await, 2.0 * (2.0 + 4.0));
}

#[tokio::test]
async fn sizes_round_trip_moto() {
    let h = Harness::moto(&[]).await;
    sizes_round_trip(&h).await;
}

#[tokio::test]
async fn interrupted_upload_leaves_no_multipart_upload_behind() {
    use tokio::io::AsyncWriteExt;
    let h = Harness::moto(&[]).await;
    let mut socket = tokio::net::TcpStream::connect(h.proxy.addr).await.unwrap();
    let head = format!(
        "PUT /uploads/cut.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n",
        token("alice"),
        40 * MIB
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(&data(17 * MIB, 9)).await.unwrap();
    // Parts 1-3 are on their way to S3 by now; the client vanishes.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    drop(socket);

    let mut uploads = None;
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let list =
            h.s3.list_multipart_uploads()
                .bucket(&h.bucket)
                .send()
                .await
                .unwrap();
        uploads = Some(list.uploads().len());
        if uploads == Some(0) && h.metric("s3up_multipart_aborted_total").await == 1.0 {
            break;
        }
    }
    assert_eq!(uploads, Some(0), "a multipart upload was left behind");
    assert_eq!(h.metric("s3up_multipart_aborted_total").await, 1.0);
    assert!(
        h.object("uploads/alice/cut.bin").await.is_none(),
        "no partial object may appear"
    );
}

#[tokio::test]
async fn chunked_body_over_the_limit_is_refused_and_aborted() {
    let h = Harness::embedded(&[("S3UP_MAX_OBJECT_SIZE", "12MiB")]).await;
    // Declared too large: refused before any byte is read.
    let resp = h
        .put("alice", "big.bin", vec![0u8; 12 * MIB + 1].into())
        .await;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "too_large");
    // Undeclared: refused once the limit is passed, after parts went out.
    let resp = h
        .put("alice", "big.bin", chunked(data(16 * MIB, 3), 256 * 1024))
        .await;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(h.object("uploads/alice/big.bin").await.is_none());
    for _ in 0..50 {
        if h.metric("s3up_multipart_aborted_total").await == 1.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(h.metric("s3up_multipart_aborted_total").await, 1.0);
    // Exactly at the limit is fine.
    let resp = h
        .put("alice", "ok.bin", chunked(data(12 * MIB, 3), 256 * 1024))
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn tokens_are_checked() {
    let h = Harness::embedded(&[]).await;
    let url = h.url("/uploads/x.bin");
    let cases = [
        None,
        Some("Bearer not-a-jwt".to_owned()),
        Some(format!(
            "Bearer {}",
            s3_upload_proxy::auth::mint_hs256(
                &[7u8; 32],
                "sub",
                "alice",
                std::time::Duration::from_secs(60),
                None,
                None
            )
            .unwrap()
        )),
        Some(format!("Basic {}", token("alice"))),
    ];
    for auth in cases {
        let mut req = h.http.put(&url).body("hello");
        if let Some(a) = &auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{auth:?}");
        assert_eq!(
            resp.headers()["www-authenticate"],
            "Bearer error=\"invalid_token\""
        );
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "invalid_token");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    assert!(h.object("uploads/alice/x.bin").await.is_none());
}

#[tokio::test]
async fn users_cannot_reach_each_others_prefix() {
    let h = Harness::embedded(&[]).await;
    // Traversal in the name is refused, whichever way it is encoded.
    for path in [
        "/uploads/..%2Fbob%2Fx.bin",
        "/uploads/x/%2E%2E%2F%2E%2E%2Fbob%2Fy",
        "/uploads/a/..%2F..%2Fbob/x.bin",
        "/uploads/%2Fbob/x.bin",
        "/uploads/.s3up/x",
    ] {
        let resp = h
            .http
            .put(h.url(path))
            .bearer_auth(token("alice"))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(resp.json::<Value>().await.unwrap()["error"], "bad_request");
    }
    // A name that looks like another user's prefix stays inside alice's.
    let resp = h.put("alice", "uploads/bob/x.bin", "mine".into()).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(
        h.object("uploads/alice/uploads/bob/x.bin").await.as_deref(),
        Some(&b"mine"[..])
    );
    // A hostile user id maps to its own escaped prefix, never bob's.
    let resp = h.put("../bob", "x.bin", "evil".into()).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let key = resp.json::<Value>().await.unwrap()["key"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(key, "uploads/=2E.=2Fbob/x.bin");
    assert!(h.object("uploads/bob/x.bin").await.is_none());
    // Listings show only the caller's objects.
    h.put("bob", "b.bin", "bob's".into()).await;
    let list: Value = h
        .http
        .get(h.url("/uploads"))
        .bearer_auth(token("bob"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = list["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["b.bin"]);
}

#[tokio::test]
async fn existing_objects_are_kept_unless_overwrite() {
    let h = Harness::moto(&[]).await;
    assert_eq!(
        h.put("alice", "a.txt", "one".into()).await.status(),
        StatusCode::CREATED
    );
    let resp = h.put("alice", "a.txt", "two".into()).await;
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "conflict");
    assert_eq!(
        h.object("uploads/alice/a.txt").await.as_deref(),
        Some(&b"one"[..])
    );
    let resp = h
        .http
        .put(h.url("/uploads/a.txt?overwrite=true"))
        .bearer_auth(token("alice"))
        .body("two")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(
        h.object("uploads/alice/a.txt").await.as_deref(),
        Some(&b"two"[..])
    );
}

async fn racing_uploads_cannot_clobber_each_other(h: &Harness) {
    // A passes the existence check and sends its first part, then B uploads the same name
    // completely; S3's If-None-Match on A's completion must refuse A.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let a_body = reqwest::Body::wrap_stream(tokio_stream_from(rx));
    let a = tokio::spawn({
        let req = h
            .http
            .put(h.url("/uploads/race.bin"))
            .bearer_auth(token("alice"))
            .body(a_body);
        async move { req.send().await.unwrap() }
    });
    tx.send(Ok(data(6 * MIB, 1))).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let b = data(7 * MIB, 2);
    assert_eq!(
        h.put("alice", "race.bin", b.clone().into()).await.status(),
        StatusCode::CREATED
    );
    tx.send(Ok(data(MIB, 3))).await.unwrap();
    drop(tx);
    let a = a.await.unwrap();
    assert_eq!(a.status(), StatusCode::CONFLICT);
    assert_eq!(
        sha256(&h.object("uploads/alice/race.bin").await.unwrap()),
        sha256(&b)
    );
}

fn tokio_stream_from<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

#[tokio::test]
async fn racing_uploads_embedded() {
    racing_uploads_cannot_clobber_each_other(&Harness::embedded(&[]).await).await;
}

#[tokio::test]
async fn listing_paginates() {
    let h = Harness::embedded(&[]).await;
    for i in 0..5 {
        assert_eq!(
            h.put("carol", &format!("f{i}"), "x".into()).await.status(),
            StatusCode::CREATED
        );
    }
    let mut names = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut req = h
            .http
            .get(h.url("/uploads"))
            .bearer_auth(token("carol"))
            .query(&[("limit", "2")]);
        if let Some(c) = &cursor {
            req = req.query(&[("cursor", c)]);
        }
        let page: Value = req.send().await.unwrap().json().await.unwrap();
        pages += 1;
        names.extend(
            page["objects"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o["name"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(names, ["f0", "f1", "f2", "f3", "f4"]);
    assert_eq!(pages, 3);
    let resp = h
        .http
        .get(h.url("/uploads?limit=0"))
        .bearer_auth(token("carol"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn health_ready_metrics() {
    let h = Harness::embedded(&[]).await;
    assert_eq!(
        h.http.get(h.url("/healthz")).send().await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(
        h.http.get(h.url("/readyz")).send().await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(
        h.put("alice", "m.bin", data(6 * MIB, 1).into())
            .await
            .status(),
        StatusCode::CREATED
    );
    assert_eq!(
        h.metric("s3up_received_bytes_total").await,
        (6 * MIB) as f64
    );
    assert_eq!(h.metric("s3up_s3_sent_bytes_total").await, (6 * MIB) as f64);
    assert_eq!(h.metric("s3up_buffer_budget_in_use_bytes").await, 0.0);
    assert_eq!(
        h.metric("s3up_buffer_budget_bytes").await,
        (64 * MIB) as f64
    );
    assert_eq!(h.metric("s3up_active_uploads").await, 0.0);
    let resp = h.http.get(h.url("/nope")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "not_found");
}

#[tokio::test]
async fn racing_uploads_moto() {
    racing_uploads_cannot_clobber_each_other(&Harness::moto(&[]).await).await;
}
