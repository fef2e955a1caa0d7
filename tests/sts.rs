//! Per-user STS credentials and direct mode, end to end against moto_server with IAM (an upload
//! role allowed only `uploads/*`, a proxy user that may only assume it) and the embedded store.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use common::*;
use http::StatusCode;
use s3_upload_proxy::keys::UserSegment;
use s3_upload_proxy::s3::{ClientSettings, Endpoint};
use serde_json::{Value, json};

fn alice() -> UserSegment {
    UserSegment::new("alice").unwrap()
}

/// An S3 client signing with the given credentials.
fn client_with(url: &str, access: &str, secret: &str, token: Option<&str>) -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .endpoint_url(url)
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .force_path_style(true)
        .credentials_provider(Credentials::new(
            access,
            secret,
            token.map(str::to_owned),
            None,
            "test",
        ))
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// The identity moto sees for some credentials.
async fn caller_arn(url: &str, c: &Credentials) -> String {
    let config = aws_sdk_sts::Config::builder()
        .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
        .endpoint_url(url)
        .region(aws_sdk_sts::config::Region::new("us-east-1"))
        .credentials_provider(c.clone())
        .build();
    aws_sdk_sts::Client::from_conf(config)
        .get_caller_identity()
        .send()
        .await
        .unwrap()
        .arn
        .unwrap()
}

async fn get_json(h: &Harness, path: &str, user: &str) -> (StatusCode, Value) {
    let resp = h
        .http
        .get(h.url(path))
        .bearer_auth(token(user))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap())
}

#[tokio::test]
async fn proxy_uploads_use_assumed_role_credentials() {
    let (h, iam) = Harness::moto_with_role(&[("S3UP_STS_SOURCE_IDENTITY", "true")], true).await;
    for (name, len) in [("small.bin", 1000), ("large.bin", 11 * MIB + 7)] {
        let bytes = data(len, 3);
        let resp = h.put("alice", name, bytes.clone().into()).await;
        assert_eq!(
            resp.status(),
            StatusCode::CREATED,
            "{}",
            resp.text().await.unwrap()
        );
        let key = format!("uploads/alice/{name}");
        assert_eq!(resp.json::<Value>().await.unwrap()["key"], key.as_str());
        assert_eq!(sha256(&h.object(&key).await.unwrap()), sha256(&bytes));
    }
    // Listing (ListBucket with the user's prefix) works with the scoped credentials too.
    let (status, list) = get_json(&h, "/uploads", "alice").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["objects"].as_array().unwrap().len(), 2);

    // The credentials the proxy signs with are the role's, in a session named after alice.
    let users = &h.proxy.app.state.users;
    assert!(users.is_scoped());
    let creds = users.credentials(&alice()).await.unwrap().unwrap();
    assert!(creds.session_token().is_some());
    assert_eq!(
        caller_arn(&iam.url, &creds).await,
        "arn:aws:sts::123456789012:assumed-role/upload-role/s3up-alice"
    );
    assert_eq!(h.metric("s3up_sts_assume_role_total").await, 1.0);

    // The proxy's own identity may not write there at all: the uploads above cannot have used it.
    let own = client_with(&iam.url, &iam.proxy_access_key, &iam.proxy_secret_key, None);
    let err = own
        .put_object()
        .bucket(&h.bucket)
        .key("uploads/alice/own.bin")
        .body(b"x".to_vec().into())
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        aws_sdk_s3::error::ProvideErrorMetadata::code(&err),
        Some("AccessDenied")
    );

    // A proxy whose key layout leaves `uploads/` is stopped by S3 itself (the role's policy).
    let elsewhere = Harness::with_endpoint(
        iam.proxy_endpoint(),
        ROLE_BUCKET,
        iam.admin_client().await,
        &[
            ("S3UP_STS_ROLE_ARN", &iam.role_arn),
            ("S3UP_KEY_PREFIX", "other/{user}/"),
        ],
    )
    .await;
    let resp = elsewhere.put("alice", "x.bin", "nope".into()).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "s3_error");
    assert!(
        body["message"].as_str().unwrap().contains("AccessDenied"),
        "{body}"
    );
    assert!(elsewhere.object("other/alice/x.bin").await.is_none());
}

#[tokio::test]
async fn sts_credentials_upload_directly_with_the_rust_sdk_and_boto3() {
    let (h, iam) = Harness::moto_with_role(&[], true).await;
    let resp = h
        .http
        .get(h.url("/sts"))
        .bearer_auth(token("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["cache-control"], "private, no-store");
    let sts: Value = resp.json().await.unwrap();
    assert_eq!(sts["bucket"], ROLE_BUCKET);
    assert_eq!(sts["region"], "us-east-1");
    assert_eq!(sts["prefix"], "uploads/alice/");
    let c = &sts["credentials"];
    let expiration = aws_smithy_types::DateTime::from_str(
        c["Expiration"].as_str().unwrap(),
        aws_smithy_types::date_time::Format::DateTime,
    )
    .unwrap();
    let left = SystemTime::try_from(expiration)
        .unwrap()
        .duration_since(SystemTime::now())
        .unwrap();
    assert!(
        left > Duration::from_secs(3000) && left <= Duration::from_secs(3600),
        "{left:?}"
    );
    // Companion's path answers the same credentials.
    let (status, again) = get_json(&h, "/s3/sts", "alice").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["credentials"]["AccessKeyId"], c["AccessKeyId"]);

    // aws-sdk-s3 with the handed-out credentials: a multipart upload into the prefix.
    let s3 = client_with(
        &iam.url,
        c["AccessKeyId"].as_str().unwrap(),
        c["SecretAccessKey"].as_str().unwrap(),
        c["SessionToken"].as_str(),
    );
    let key = "uploads/alice/rust.bin";
    let parts = [data(5 * MIB, 1), data(4321, 2)];
    let upload = s3
        .create_multipart_upload()
        .bucket(ROLE_BUCKET)
        .key(key)
        .send()
        .await
        .unwrap();
    let id = upload.upload_id().unwrap();
    let mut done = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let n = i as i32 + 1;
        let out = s3
            .upload_part()
            .bucket(ROLE_BUCKET)
            .key(key)
            .upload_id(id)
            .part_number(n)
            .body(part.clone().into())
            .send()
            .await
            .unwrap();
        done.push(
            CompletedPart::builder()
                .part_number(n)
                .e_tag(out.e_tag().unwrap())
                .build(),
        );
    }
    s3.complete_multipart_upload()
        .bucket(ROLE_BUCKET)
        .key(key)
        .upload_id(id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(done))
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        sha256(&h.object(key).await.unwrap()),
        sha256(&parts.concat())
    );
    // Outside `uploads/` S3 refuses them.
    let err = s3
        .put_object()
        .bucket(ROLE_BUCKET)
        .key("elsewhere/rust.bin")
        .body(b"x".to_vec().into())
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        aws_sdk_s3::error::ProvideErrorMetadata::code(&err),
        Some("AccessDenied")
    );

    // boto3, fetching /sts itself.
    let venv = std::env::var("S3UP_TEST_VENV").unwrap();
    let out = tokio::process::Command::new(format!("{venv}/bin/python"))
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sts_boto3.py"))
        .args([&h.proxy.url(), &token("alice"), &iam.url])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "sts_boto3.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["key"], "uploads/alice/boto3.bin");
    assert_eq!(result["outside"], "AccessDenied");
    let stored = h.object("uploads/alice/boto3.bin").await.unwrap();
    assert_eq!(stored.len(), 5 * MIB + 1234);
    let hex: String = sha256(&stored).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(result["sha256"], hex.as_str());
    assert!(h.object("elsewhere/boto3.bin").await.is_none());
    assert!(h.object("elsewhere/rust.bin").await.is_none());
}

/// Drives the Companion routes the way @uppy/aws-s3 does: create, sign each part, PUT the parts
/// to the signed URLs, list, complete; plus a presigned single PUT and an abort.
/// The stores differ from S3 where noted.
#[derive(PartialEq)]
enum Store {
    /// moto 5.2 answers ListParts with a `ListPartsResponse` root that aws-sdk-s3 refuses.
    Moto,
    /// s3s-fs lists parts in no order (we sort them) and an aborted upload as empty.
    Embedded,
}

async fn companion_flow(h: &Harness, store: Store) {
    let http = &h.http;
    let create = |user: &str, body: Value| {
        http.post(h.url("/s3/multipart"))
            .bearer_auth(token(user))
            .json(&body)
            .send()
    };
    let resp = create(
        "alice",
        json!({"filename": "../../bob/clip.mp4", "type": "video/mp4",
               "metadata": {"name": "clip.mp4", "caption": "Grüße", "relativePath": null}}),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let created: Value = resp.json().await.unwrap();
    let key = created["key"].as_str().unwrap().to_owned();
    let upload_id = created["uploadId"].as_str().unwrap().to_owned();
    assert_eq!(created["bucket"], h.bucket.as_str());
    assert!(
        key.starts_with("uploads/alice/") && key.ends_with("-clip.mp4"),
        "{key}"
    );
    assert!(!key.contains("bob"), "{key}");

    let parts = [data(5 * MIB, 11), data(5 * MIB, 12), data(777, 13)];
    let q = |extra: &str| format!("?key={}{extra}", urlencode(&key));
    // Part 1 signed alone, parts 2 and 3 in a batch.
    let (status, one) =
        get_json(h, &format!("/s3/multipart/{upload_id}/1{}", q("")), "alice").await;
    assert_eq!(status, StatusCode::OK, "{one}");
    let expires = one["expires"].as_u64().unwrap();
    assert!((60..=900).contains(&expires), "{expires}");
    let (status, batch) = get_json(
        h,
        &format!("/s3/multipart/{upload_id}/batch{}", q("&partNumbers=2,3")),
        "alice",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{batch}");
    let urls = [
        one["url"].as_str().unwrap().to_owned(),
        batch["presignedUrls"]["2"].as_str().unwrap().to_owned(),
        batch["presignedUrls"]["3"].as_str().unwrap().to_owned(),
    ];
    if let Some(creds) = h
        .proxy
        .app
        .state
        .users
        .credentials(&UserSegment::new("alice").unwrap())
        .await
        .unwrap()
    {
        // Signed with alice's scoped credentials.
        for url in &urls {
            assert!(
                url.contains(&format!("X-Amz-Credential={}", creds.access_key_id())),
                "{url}"
            );
            assert!(url.contains("X-Amz-Security-Token="), "{url}");
        }
    }
    let mut etags = Vec::new();
    for (url, part) in urls.iter().zip(&parts) {
        let resp = http.put(url).body(part.clone()).send().await.unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::OK,
            "{}",
            resp.text().await.unwrap()
        );
        etags.push(resp.headers()["etag"].to_str().unwrap().to_owned());
    }
    if store != Store::Moto {
        let path = format!("/s3/multipart/{upload_id}{}", q(""));
        let (status, listed) = get_json(h, &path, "alice").await;
        assert_eq!(status, StatusCode::OK, "{listed}");
        let listed = listed.as_array().unwrap();
        assert_eq!(listed.len(), 3);
        for (i, p) in listed.iter().enumerate() {
            assert_eq!(p["PartNumber"], i as u64 + 1);
            assert_eq!(p["Size"], parts[i].len() as u64);
        }
    }

    // Another user can reach none of it: not with alice's key, nor with alice's upload id.
    let bob_key = q("");
    for (method, path) in [
        ("GET", format!("/s3/multipart/{upload_id}{bob_key}")),
        ("GET", format!("/s3/multipart/{upload_id}/1{bob_key}")),
        (
            "GET",
            format!("/s3/multipart/{upload_id}/batch{bob_key}&partNumbers=1"),
        ),
        (
            "POST",
            format!("/s3/multipart/{upload_id}/complete{bob_key}"),
        ),
        ("DELETE", format!("/s3/multipart/{upload_id}{bob_key}")),
    ] {
        let resp = http
            .request(method.parse().unwrap(), h.url(&path))
            .bearer_auth(token("bob"))
            .json(&json!({"parts": [{"PartNumber": 1, "ETag": etags[0]}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{method} {path}");
        assert_eq!(resp.json::<Value>().await.unwrap()["error"], "forbidden");
    }
    // (Bob's own key with alice's upload id is S3's to refuse: real S3 ties an upload id to its
    // key, and bob's session policy to uploads/bob/. Neither moto nor s3s-fs checks the pair.)
    let resp = create("bob", json!({"filename": "b.bin"})).await.unwrap();
    let bobs: Value = resp.json().await.unwrap();
    assert!(bobs["key"].as_str().unwrap().starts_with("uploads/bob/"));
    // Keys that only look like alice's are refused too.
    for fake in [
        "uploads/alice/../bob/x",
        "uploads/alice/.s3up/state",
        "uploads/alice",
        "uploads/alicex/y",
        "uploads/bob/x",
    ] {
        let (status, _) = get_json(
            h,
            &format!("/s3/multipart/{upload_id}?key={}", urlencode(fake)),
            "alice",
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{fake}");
    }

    // Complete as Uppy does, with the ETags the PUTs returned.
    let parts_json: Vec<Value> = etags
        .iter()
        .enumerate()
        .map(|(i, e)| json!({"PartNumber": i + 1, "ETag": e}))
        .collect();
    let resp = http
        .post(h.url(&format!("/s3/multipart/{upload_id}/complete{}", q(""))))
        .bearer_auth(token("alice"))
        .json(&json!({ "parts": parts_json }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let done: Value = resp.json().await.unwrap();
    assert_eq!(done["key"], key.as_str());
    assert_eq!(done["bucket"], h.bucket.as_str());
    assert_eq!(
        sha256(&h.object(&key).await.unwrap()),
        sha256(&parts.concat())
    );
    let head =
        h.s3.head_object()
            .bucket(&h.bucket)
            .key(&key)
            .send()
            .await
            .unwrap();
    assert_eq!(head.content_type(), Some("video/mp4"));
    let meta = head.metadata().unwrap();
    assert_eq!(meta["name"], "clip.mp4");
    assert_eq!(meta["caption"], "=?UTF-8?B?R3LDvMOfZQ==?=");

    // A presigned single PUT (GET /s3/params), sending the signed headers it returns.
    let (status, params) = get_json(
        h,
        "/s3/params?filename=photo.jpg&type=image/jpeg&metadata[name]=photo.jpg",
        "alice",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{params}");
    assert_eq!(params["method"], "PUT");
    assert_eq!(params["fields"], json!({}));
    let photo_key = params["key"].as_str().unwrap();
    assert!(photo_key.starts_with("uploads/alice/") && photo_key.ends_with("-photo.jpg"));
    let mut put = http.put(params["url"].as_str().unwrap()).body("jpeg bytes");
    for (k, v) in params["headers"].as_object().unwrap() {
        put = put.header(k, v.as_str().unwrap());
    }
    let resp = put.send().await.unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "{}",
        resp.text().await.unwrap()
    );
    assert_eq!(
        h.object(photo_key).await.as_deref(),
        Some(&b"jpeg bytes"[..])
    );

    // Abort: gone afterwards.
    let resp = create("alice", json!({"filename": "dropped.bin"}))
        .await
        .unwrap();
    let dropped: Value = resp.json().await.unwrap();
    let path = format!(
        "/s3/multipart/{}?key={}",
        dropped["uploadId"].as_str().unwrap(),
        urlencode(dropped["key"].as_str().unwrap())
    );
    let resp = http
        .delete(h.url(&path))
        .bearer_auth(token("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({}));
    let (status, body) = get_json(h, &path, "alice").await;
    match store {
        Store::Moto => assert_eq!(status, StatusCode::NOT_FOUND, "{body}"),
        Store::Embedded => assert_eq!((status, body), (StatusCode::OK, json!([]))),
    }

    // Bad input is answered as JSON errors.
    let (status, body) =
        get_json(h, &format!("/s3/multipart/{upload_id}/0{}", q("")), "alice").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "bad_request");
    let (status, _) = get_json(h, &format!("/s3/multipart/{upload_id}"), "alice").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let resp = http
        .post(h.url("/s3/multipart"))
        .bearer_auth(token("alice"))
        .json(&json!({"type": "x/y"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(
        h.http
            .get(h.url("/s3/params?filename=x"))
            .send()
            .await
            .unwrap()
            .status()
            == StatusCode::UNAUTHORIZED
    );
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn companion_routes_with_scoped_credentials() {
    // moto answers presigned requests with 500 while IAM enforcement is on.
    let (h, _iam) = Harness::moto_with_role(&[], false).await;
    companion_flow(&h, Store::Moto).await;
    assert!(h.proxy.app.state.users.is_scoped());
}

#[tokio::test]
async fn companion_routes_on_the_embedded_store() {
    let h = Harness::embedded(&[]).await;
    companion_flow(&h, Store::Embedded).await;
}

#[tokio::test]
async fn sts_needs_a_role_and_the_api_key_guards_direct_mode() {
    let h = Harness::embedded(&[("S3UP_API_KEY", "key-0123456789abcdef")]).await;
    for path in [
        "/sts",
        "/s3/sts",
        "/s3/params?filename=x",
        "/s3/multipart/x?key=y",
    ] {
        for key in [
            None,
            Some("wrong-0123456789abcdef"),
            Some("key-0123456789abcdeg"),
        ] {
            let mut req = h.http.get(h.url(path)).bearer_auth(token("alice"));
            if let Some(k) = key {
                req = req.header("x-api-key", k);
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{path} {key:?}");
            assert_eq!(
                resp.json::<Value>().await.unwrap(),
                json!({"message": "Forbidden"})
            );
        }
    }
    let with_key = |path: &str| {
        h.http
            .get(h.url(path))
            .header("x-api-key", "key-0123456789abcdef")
    };
    // The right key still needs a valid token.
    let resp = with_key("/sts").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // Without an upload role there are no scoped credentials: never the proxy's own.
    for path in ["/sts", "/s3/sts"] {
        let resp = with_key(path)
            .bearer_auth(token("alice"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_IMPLEMENTED, "{path}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "not_configured");
        assert!(body.get("credentials").is_none());
        let text = body.to_string();
        assert!(!text.contains(&h.proxy.app.embedded.as_ref().unwrap().secret_key));
    }
    let resp = with_key("/s3/params?filename=x.bin")
        .bearer_auth(token("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // PUT /uploads is not a direct-mode route: no API key needed.
    assert_eq!(
        h.put("alice", "k.bin", "x".into()).await.status(),
        StatusCode::CREATED
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_assume_role_for_a_thousand_concurrent_requests() {
    let (h, _iam) = Harness::moto_with_role(&[], true).await;
    let users = h.proxy.app.state.users.clone();
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let users = users.clone();
            tokio::spawn(async move { users.for_user(&alice()).await.map(drop) })
        })
        .collect();
    let http: Vec<_> = (0..50)
        .map(|_| {
            let req = h.http.get(h.url("/sts")).bearer_auth(token("alice"));
            tokio::spawn(async move { req.send().await.unwrap().status() })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    for t in http {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(h.metric("s3up_sts_assume_role_total").await, 1.0);
    users
        .for_user(&UserSegment::new("bob").unwrap())
        .await
        .unwrap();
    assert_eq!(h.metric("s3up_sts_assume_role_total").await, 2.0);
}

#[tokio::test]
async fn an_upload_outliving_its_credentials_continues_with_fresh_ones() {
    let (h, _iam) = Harness::moto_with_role(&[], true).await;
    let users = h.proxy.app.state.users.clone();
    let cache = users.cache().unwrap().clone();
    let first = users.credentials(&alice()).await.unwrap().unwrap();

    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    let upload = tokio::spawn({
        let req = h
            .http
            .put(h.url("/uploads/long.bin"))
            .bearer_auth(token("alice"))
            .body(body);
        async move { req.send().await.unwrap() }
    });
    let bytes = data(16 * MIB + 5, 21);
    tx.send(Ok(bytes[..6 * MIB].to_vec())).await.unwrap();
    // Wait until the first part is in S3, signed with the first credentials.
    for _ in 0..400 {
        if h.metric("s3up_s3_parts_total").await >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(h.metric("s3up_s3_parts_total").await >= 1.0);
    assert_eq!(h.metric("s3up_sts_assume_role_total").await, 1.0);
    // 56 minutes later the first credentials are within 5 minutes of expiring.
    cache.clock().advance(Duration::from_secs(56 * 60));
    tx.send(Ok(bytes[6 * MIB..].to_vec())).await.unwrap();
    drop(tx);
    let resp = upload.await.unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::CREATED,
        "{}",
        resp.text().await.unwrap()
    );
    assert_eq!(
        sha256(&h.object("uploads/alice/long.bin").await.unwrap()),
        sha256(&bytes)
    );
    // The later parts asked for, and were signed with, new credentials.
    assert!(h.metric("s3up_sts_assume_role_total").await >= 2.0);
    cache.clock().reset();
    let now = users.credentials(&alice()).await.unwrap().unwrap();
    assert_ne!(now.access_key_id(), first.access_key_id());
    assert!(now.expiry().unwrap() > first.expiry().unwrap());
}

#[tokio::test]
async fn sts_failures_are_502_or_503() {
    // A role the proxy may not assume: STS says AccessDenied, we say 502.
    let (h, iam) = Harness::moto_with_role(&[], true).await;
    let denied = Harness::with_endpoint(
        iam.proxy_endpoint(),
        ROLE_BUCKET,
        iam.admin_client().await,
        &[(
            "S3UP_STS_ROLE_ARN",
            "arn:aws:iam::123456789012:role/not-ours",
        )],
    )
    .await;
    let resp = denied.put("alice", "x.bin", "x".into()).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert!(resp.headers().get("retry-after").is_none());
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "sts_error");
    // moto's AssumeRole denial is not parseable by the SDK; AWS says AccessDenied.
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("AccessDenied") || message.contains("HTTP403"),
        "{body}"
    );
    // STS's message names the proxy's user and the role: it stays in our logs.
    assert!(!body.to_string().contains("user/proxy"), "{body}");
    let (status, _) = get_json(&denied, "/sts", "alice").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(h.object("uploads/alice/x.bin").await.is_none());

    // STS unreachable: 503 with Retry-After.
    let port = free_port();
    let closed = || Endpoint::Static {
        url: format!("http://127.0.0.1:{port}"),
        access_key: "a".into(),
        secret_key: "b".into(),
    };
    let s3 = s3_upload_proxy::s3::client(
        closed(),
        &ClientSettings {
            max_attempts: 1,
            attempt_timeout: Duration::from_secs(5),
        },
        Default::default(),
    )
    .await;
    let down = Harness::with_endpoint(
        closed(),
        ROLE_BUCKET,
        s3,
        &[
            (
                "S3UP_STS_ROLE_ARN",
                "arn:aws:iam::123456789012:role/upload-role",
            ),
            ("S3UP_S3_MAX_ATTEMPTS", "2"),
        ],
    )
    .await;
    let resp = down.put("alice", "x.bin", "x".into()).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["retry-after"], "5");
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "sts_error");
    let resp = down
        .http
        .get(down.url("/sts"))
        .bearer_auth(token("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    // (Usually 1: the failure is shared for 2 s; a slow machine may ask again.)
    assert!(down.metric("s3up_sts_assume_role_total").await >= 1.0);
}
