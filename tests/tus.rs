//! tus 1.0 over raw HTTP: every status code of the protocol, against the embedded store, and
//! the core flows against moto_server too.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::*;
use http::StatusCode;
use reqwest::Response;

const OCTETS: &str = "application/offset+octet-stream";

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn sha1_b64(b: &[u8]) -> String {
    use sha1::Digest;
    b64(&sha1::Sha1::digest(b))
}

/// A raw tus client for one user.
struct Tus<'h> {
    h: &'h Harness,
    user: &'static str,
}

impl Tus<'_> {
    fn req(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        self.h
            .http
            .request(method, url)
            .bearer_auth(token(self.user))
            .header("tus-resumable", "1.0.0")
    }

    async fn create(&self, length: Option<u64>, metadata: &[(&str, &str)]) -> String {
        let resp = self.create_raw(length, metadata, &[]).await;
        assert_eq!(
            resp.status(),
            StatusCode::CREATED,
            "{:?}",
            resp.text().await
        );
        resp.headers()["location"].to_str().unwrap().to_owned()
    }

    async fn create_raw(
        &self,
        length: Option<u64>,
        metadata: &[(&str, &str)],
        extra: &[(&str, &str)],
    ) -> Response {
        let mut req = self.req(reqwest::Method::POST, &self.h.url("/files/"));
        req = match length {
            Some(l) => req.header("upload-length", l.to_string()),
            None => req.header("upload-defer-length", "1"),
        };
        if !metadata.is_empty() {
            let m: Vec<String> = metadata
                .iter()
                .map(|(k, v)| format!("{k} {}", b64(v.as_bytes())))
                .collect();
            req = req.header("upload-metadata", m.join(","));
        }
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        req.send().await.unwrap()
    }

    async fn patch(
        &self,
        url: &str,
        offset: u64,
        body: Vec<u8>,
        extra: &[(&str, &str)],
    ) -> Response {
        let mut req = self
            .req(reqwest::Method::PATCH, url)
            .header("content-type", OCTETS)
            .header("upload-offset", offset.to_string());
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        req.body(body).send().await.unwrap()
    }

    async fn head(&self, url: &str) -> Response {
        self.req(reqwest::Method::HEAD, url).send().await.unwrap()
    }

    async fn offset(&self, url: &str) -> u64 {
        let resp = self.head(url).await;
        assert_eq!(resp.status(), StatusCode::OK);
        resp.headers()["upload-offset"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }
}

fn offset_of(resp: &Response) -> u64 {
    resp.headers()["upload-offset"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Uploads `bytes` in PATCHes of `chunk` bytes and checks the stored object.
async fn upload_in_chunks(t: &Tus<'_>, name: &str, bytes: &[u8], chunk: usize) -> String {
    let url = t
        .create(Some(bytes.len() as u64), &[("filename", name)])
        .await;
    let mut offset = 0;
    for piece in bytes.chunks(chunk.max(1)) {
        let resp = t.patch(&url, offset, piece.to_vec(), &[]).await;
        assert_eq!(
            resp.status(),
            StatusCode::NO_CONTENT,
            "{:?}",
            resp.text().await
        );
        offset += piece.len() as u64;
        assert_eq!(offset_of(&resp), offset);
        assert!(resp.headers().contains_key("upload-expires"));
        assert_eq!(t.offset(&url).await, offset);
    }
    if bytes.is_empty() {
        assert_eq!(t.offset(&url).await, 0);
    }
    let key = format!("uploads/{}/{name}", t.user);
    let stored = t.h.object(&key).await.expect("object stored");
    assert_eq!(sha256(&stored), sha256(bytes), "{name}");
    url
}

async fn core_flows(h: &Harness) {
    let t = Tus { h, user: "alice" };
    // Sizes around the part boundary, in one PATCH and in 1 MiB PATCHes.
    for (i, len) in [0, 1, 5 * MIB - 1, 5 * MIB, 12 * MIB + 7]
        .into_iter()
        .enumerate()
    {
        let bytes = data(len, i as u64 + 10);
        upload_in_chunks(&t, &format!("one-{len}.bin"), &bytes, len).await;
        upload_in_chunks(&t, &format!("mib-{len}.bin"), &bytes, MIB).await;
    }
    // In-progress uploads never appear in the listing; state stays hidden.
    let url = t.create(Some(10), &[("filename", "pending.bin")]).await;
    assert_eq!(
        t.patch(&url, 0, b"12345".to_vec(), &[]).await.status(),
        StatusCode::NO_CONTENT
    );
    let list: serde_json::Value = h
        .http
        .get(h.url("/uploads"))
        .bearer_auth(token("alice"))
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
    assert!(names.contains(&"mib-12582919.bin"));
    assert!(
        !names
            .iter()
            .any(|n| n.contains("pending") || n.starts_with(".s3up")),
        "{names:?}"
    );
}

#[tokio::test]
async fn core_flows_embedded() {
    core_flows(&Harness::embedded(&[]).await).await;
}

#[tokio::test]
async fn core_flows_moto() {
    core_flows(&Harness::moto(&[]).await).await;
}

#[tokio::test]
async fn options_and_version() {
    let h = Harness::embedded(&[("S3UP_TUS_MAX_SIZE", "100MiB")]).await;
    let resp = h
        .http
        .request(reqwest::Method::OPTIONS, h.url("/files/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let hd = resp.headers();
    assert_eq!(hd["tus-version"], "1.0.0");
    assert_eq!(hd["tus-max-size"], (100 * MIB).to_string().as_str());
    let ext = hd["tus-extension"].to_str().unwrap();
    for e in [
        "creation",
        "creation-with-upload",
        "creation-defer-length",
        "termination",
        "expiration",
        "checksum",
        "checksum-trailer",
        "concatenation",
        "concatenation-unfinished",
    ] {
        assert!(ext.split(',').any(|x| x == e), "{e}");
    }
    assert_eq!(hd["tus-checksum-algorithm"], "sha1,md5,sha256,crc32");
    assert!(
        !hd.contains_key("tus-resumable"),
        "no Tus-Resumable on OPTIONS"
    );

    // Missing or unsupported version: 412 with Tus-Version, before anything else.
    for version in [None, Some("0.2.2"), Some("2.0.0")] {
        let mut req = h
            .http
            .post(h.url("/files/"))
            .bearer_auth(token("alice"))
            .header("upload-length", "5");
        if let Some(v) = version {
            req = req.header("tus-resumable", v);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::PRECONDITION_FAILED,
            "{version:?}"
        );
        assert_eq!(resp.headers()["tus-version"], "1.0.0");
        assert_eq!(resp.headers()["tus-resumable"], "1.0.0");
    }
    // Tus-Resumable on every other response, errors included.
    let t = Tus {
        h: &h,
        user: "alice",
    };
    let resp = t
        .head(&h.url("/files/0123456789abcdef0123456789abcdef"))
        .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(resp.headers()["tus-resumable"], "1.0.0");
    assert!(!resp.headers().contains_key("upload-offset"));
    // Without a token: 401, still a tus response.
    let resp = h
        .http
        .head(h.url("/files/0123456789abcdef0123456789abcdef"))
        .header("tus-resumable", "1.0.0")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(resp.headers()["tus-resumable"], "1.0.0");

    // CORS preflight from a browser page.
    let resp = h
        .http
        .request(
            reqwest::Method::OPTIONS,
            h.url("/files/0123456789abcdef0123456789abcdef"),
        )
        .header("origin", "https://app.example")
        .header("access-control-request-method", "PATCH")
        .header(
            "access-control-request-headers",
            "tus-resumable,upload-offset,content-type,authorization",
        )
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    assert_eq!(resp.headers()["access-control-allow-origin"], "*");
    let allowed = resp.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_owned();
    for hname in [
        "upload-offset",
        "tus-resumable",
        "authorization",
        "upload-checksum",
    ] {
        assert!(allowed.contains(hname), "{allowed}");
    }
    let resp = t
        .create_raw(Some(1), &[], &[("origin", "https://app.example")])
        .await;
    let exposed = resp.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap();
    assert!(
        exposed.contains("location") && exposed.contains("upload-offset"),
        "{exposed}"
    );
}

#[tokio::test]
async fn creation_errors() {
    let h = Harness::embedded(&[("S3UP_TUS_MAX_SIZE", "10MiB")]).await;
    let t = Tus {
        h: &h,
        user: "alice",
    };
    // Over the maximum size: 413.
    let resp = t.create_raw(Some(10 * MIB as u64 + 1), &[], &[]).await;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        t.create_raw(Some(10 * MIB as u64), &[], &[]).await.status(),
        StatusCode::CREATED
    );
    // Neither or both of Upload-Length / Upload-Defer-Length; bad values.
    let base = || t.req(reqwest::Method::POST, &h.url("/files/"));
    for req in [
        base(),
        base()
            .header("upload-length", "5")
            .header("upload-defer-length", "1"),
        base().header("upload-defer-length", "2"),
        base().header("upload-length", "-5"),
        base()
            .header("upload-length", "5")
            .header("upload-metadata", "filename !!!"),
        base()
            .header("upload-length", "5")
            .header("upload-metadata", "a YQ==,a YQ=="),
        base()
            .header("upload-length", "5")
            .header("upload-concat", "whatever"),
    ] {
        assert_eq!(req.send().await.unwrap().status(), StatusCode::BAD_REQUEST);
    }
    // Upload-Length: 0 completes at once.
    let url = t.create(Some(0), &[("filename", "empty.txt")]).await;
    assert_eq!(t.offset(&url).await, 0);
    assert_eq!(h.object("uploads/alice/empty.txt").await.unwrap(), b"");
    // The Location is absolute and names only the id.
    assert!(
        url.starts_with(&format!("{}/files/", h.proxy.url())),
        "{url}"
    );
    assert_eq!(url.rsplit('/').next().unwrap().len(), 32);
}

#[tokio::test]
async fn patch_status_codes() {
    let h = Harness::embedded(&[]).await;
    let t = Tus {
        h: &h,
        user: "alice",
    };
    let url = t.create(Some(100), &[("filename", "codes.bin")]).await;
    // Wrong content type: 415, nothing stored.
    let resp = t
        .req(reqwest::Method::PATCH, &url)
        .header("content-type", "application/octet-stream")
        .header("upload-offset", "0")
        .body(vec![1u8; 10])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // Missing offset: 400.
    let resp = t
        .req(reqwest::Method::PATCH, &url)
        .header("content-type", OCTETS)
        .body(vec![1u8; 10])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let bytes = data(100, 5);
    assert_eq!(
        t.patch(&url, 0, bytes[..40].to_vec(), &[]).await.status(),
        StatusCode::NO_CONTENT
    );
    // Wrong offset: 409 with the current offset; nothing changes.
    for wrong in [0, 39, 41, 90] {
        let resp = t.patch(&url, wrong, bytes[40..50].to_vec(), &[]).await;
        assert_eq!(resp.status(), StatusCode::CONFLICT, "{wrong}");
        assert_eq!(offset_of(&resp), 40);
    }
    assert_eq!(t.offset(&url).await, 40);
    // Checksum mismatch: 460, offset unchanged; then the right checksum works.
    let chunk = bytes[40..70].to_vec();
    let resp = t
        .patch(
            &url,
            40,
            chunk.clone(),
            &[("upload-checksum", &format!("sha1 {}", sha1_b64(b"other")))],
        )
        .await;
    assert_eq!(resp.status().as_u16(), 460);
    assert_eq!(t.offset(&url).await, 40);
    // Unknown algorithm: 400, offset unchanged.
    let resp = t
        .patch(&url, 40, chunk.clone(), &[("upload-checksum", "sha3 AAAA")])
        .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(t.offset(&url).await, 40);
    let resp = t
        .patch(
            &url,
            40,
            chunk.clone(),
            &[("upload-checksum", &format!("sha1 {}", sha1_b64(&chunk)))],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(offset_of(&resp), 70);
    // More than the declared length: 413, offset unchanged.
    let resp = t.patch(&url, 70, vec![0u8; 31], &[]).await;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(t.offset(&url).await, 70);
    // X-HTTP-Method-Override: a POST that means PATCH.
    let resp = t
        .req(reqwest::Method::POST, &url)
        .header("x-http-method-override", "PATCH")
        .header("content-type", OCTETS)
        .header("upload-offset", "70")
        .body(bytes[70..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(h.object("uploads/alice/codes.bin").await.unwrap(), bytes);
    // HEAD of a finished upload: offset == length, no-store.
    let resp = t.head(&url).await;
    assert_eq!(resp.headers()["upload-offset"], "100");
    assert_eq!(resp.headers()["upload-length"], "100");
    assert_eq!(resp.headers()["cache-control"], "no-store");
    // Another user's URL: 404, exactly like an unknown one, for HEAD, PATCH and DELETE.
    let mallory = Tus {
        h: &h,
        user: "mallory",
    };
    let pending = t.create(Some(10), &[]).await;
    assert_eq!(mallory.head(&pending).await.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        mallory.patch(&pending, 0, vec![1; 10], &[]).await.status(),
        StatusCode::NOT_FOUND
    );
    let resp = mallory
        .req(reqwest::Method::DELETE, &pending)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(t.offset(&pending).await, 0, "alice's upload is untouched");
    // Termination: 204, then 404.
    let resp = t
        .req(reqwest::Method::DELETE, &pending)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(resp.headers()["tus-resumable"], "1.0.0");
    assert_eq!(t.head(&pending).await.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        t.patch(&pending, 0, vec![1; 10], &[]).await.status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn metadata_names_the_object() {
    let h = Harness::embedded(&[]).await;
    let t = Tus {
        h: &h,
        user: "alice",
    };
    let url = t
        .create(
            Some(3),
            &[
                ("filename", "../../secret/photo.jpg"),
                ("filetype", "image/jpeg"),
                ("Camera", "Fujifilm X-T5"),
            ],
        )
        .await;
    let resp = t.head(&url).await;
    assert!(
        resp.headers()["upload-metadata"]
            .to_str()
            .unwrap()
            .contains("filename ")
    );
    // Unfinished: no object to name yet.
    assert!(resp.headers().get("s3up-key").is_none());
    assert_eq!(
        t.patch(&url, 0, b"abc".to_vec(), &[]).await.status(),
        StatusCode::NO_CONTENT
    );
    let head =
        h.s3.head_object()
            .bucket(&h.bucket)
            .key("uploads/alice/photo.jpg")
            .send()
            .await
            .unwrap();
    assert_eq!(head.content_type(), Some("image/jpeg"));
    assert_eq!(
        head.metadata().unwrap().get("camera").map(String::as_str),
        Some("Fujifilm X-T5")
    );
    // The same name again: the first object is kept, the second gets a suffix.
    let url2 = t
        .create(Some(3), &[("filename", "../../secret/photo.jpg")])
        .await;
    let resp = t.patch(&url2, 0, b"xyz".to_vec(), &[]).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let id8 = &url2.rsplit('/').next().unwrap()[..8];
    // The completing PATCH and every HEAD after it name the object that was stored.
    let crc = s3_upload_proxy::upload::part::crc64_base64(crc_fast::checksum(
        crc_fast::CrcAlgorithm::Crc64Nvme,
        b"xyz",
    ));
    let key = format!("uploads/alice/photo-{id8}.jpg");
    for headers in [
        resp.headers().clone(),
        t.head(&url2).await.headers().clone(),
    ] {
        assert_eq!(headers["s3up-key"], key.as_str());
        assert_eq!(headers["s3up-checksum-crc64nvme"], crc.as_str());
    }
    assert_eq!(h.object("uploads/alice/photo.jpg").await.unwrap(), b"abc");
    assert_eq!(
        h.object(&format!("uploads/alice/photo-{id8}.jpg"))
            .await
            .unwrap(),
        b"xyz"
    );
    // A name into the reserved prefix or an empty one falls back to the upload id.
    let url3 = t.create(Some(1), &[("filename", ".s3up")]).await;
    assert_eq!(
        t.patch(&url3, 0, b"!".to_vec(), &[]).await.status(),
        StatusCode::NO_CONTENT
    );
    let id = url3.rsplit('/').next().unwrap();
    assert_eq!(
        h.object(&format!("uploads/alice/{id}")).await.unwrap(),
        b"!"
    );
}

#[tokio::test]
async fn creation_with_upload_and_deferred_length() {
    let h = Harness::embedded(&[]).await;
    let t = Tus {
        h: &h,
        user: "alice",
    };
    let bytes = data(7 * MIB + 3, 21);
    // creation-with-upload: the POST carries the first 6 MiB.
    let resp = t
        .req(reqwest::Method::POST, &h.url("/files/"))
        .header("upload-length", bytes.len().to_string())
        .header("upload-metadata", format!("filename {}", b64(b"cwu.bin")))
        .header("content-type", OCTETS)
        .body(bytes[..6 * MIB].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(offset_of(&resp), 6 * MIB as u64);
    let url = resp.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(
        t.patch(&url, 6 * MIB as u64, bytes[6 * MIB..].to_vec(), &[])
            .await
            .status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        sha256(&h.object("uploads/alice/cwu.bin").await.unwrap()),
        sha256(&bytes)
    );

    // creation-defer-length: the length arrives with the last PATCH.
    let url = t.create(None, &[("filename", "deferred.bin")]).await;
    let resp = t.head(&url).await;
    assert_eq!(resp.headers()["upload-defer-length"], "1");
    assert!(!resp.headers().contains_key("upload-length"));
    let mut offset = 0;
    for piece in bytes.chunks(3 * MIB) {
        let end = offset + piece.len() as u64;
        let len = end.to_string();
        let extra: &[(&str, &str)] = if end == bytes.len() as u64 {
            &[("upload-length", &len)]
        } else {
            &[]
        };
        let resp = t.patch(&url, offset, piece.to_vec(), extra).await;
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        offset = end;
    }
    assert_eq!(
        t.head(&url).await.headers()["upload-length"],
        bytes.len().to_string().as_str()
    );
    assert_eq!(
        sha256(&h.object("uploads/alice/deferred.bin").await.unwrap()),
        sha256(&bytes)
    );
}

#[tokio::test]
async fn checksum_trailer_on_a_chunked_patch() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::embedded(&[]).await;
    let t = Tus {
        h: &h,
        user: "alice",
    };
    let bytes = data(3000, 8);
    let url = t.create(Some(3000), &[("filename", "trailer.bin")]).await;
    let path = url.trim_start_matches(&h.proxy.url()).to_owned();
    let send = |digest: String| {
        let (path, bytes) = (path.clone(), bytes.clone());
        let addr = h.proxy.addr;
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let head = format!(
                "PATCH {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nTus-Resumable: 1.0.0\r\nContent-Type: {OCTETS}\r\nUpload-Offset: 0\r\nTransfer-Encoding: chunked\r\nTrailer: Upload-Checksum\r\nConnection: close\r\n\r\n",
                token("alice")
            );
            s.write_all(head.as_bytes()).await.unwrap();
            for c in bytes.chunks(1000) {
                s.write_all(format!("{:x}\r\n", c.len()).as_bytes())
                    .await
                    .unwrap();
                s.write_all(c).await.unwrap();
                s.write_all(b"\r\n").await.unwrap();
            }
            s.write_all(format!("0\r\nUpload-Checksum: sha256 {digest}\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        }
    };
    let wrong = b64(&sha256(b"nope"));
    let out = send(wrong).await;
    assert!(out.starts_with("HTTP/1.1 460"), "{out}");
    assert_eq!(t.offset(&url).await, 0);
    let out = send(b64(&sha256(&bytes))).await;
    assert!(out.starts_with("HTTP/1.1 204"), "{out}");
    assert_eq!(h.object("uploads/alice/trailer.bin").await.unwrap(), bytes);
}

#[tokio::test]
async fn expired_uploads_are_gone_and_reaped() {
    let h = Harness::moto(&[
        ("S3UP_TUS_EXPIRY", "2s"),
        ("S3UP_TUS_REAPER_INTERVAL", "1s"),
    ])
    .await;
    let t = Tus {
        h: &h,
        user: "alice",
    };
    let url = t
        .create(Some(20 * MIB as u64), &[("filename", "late.bin")])
        .await;
    let resp = t.patch(&url, 0, data(6 * MIB + 5, 1), &[]).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let expires =
        httpdate::parse_http_date(resp.headers()["upload-expires"].to_str().unwrap()).unwrap();
    assert!(expires > std::time::SystemTime::now());
    let list =
        h.s3.list_multipart_uploads()
            .bucket(&h.bucket)
            .send()
            .await
            .unwrap();
    assert_eq!(list.uploads().len(), 1);
    // Expired: 410 for HEAD and PATCH (until the reaper removes it; then 404).
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let status = t.head(&url).await.status();
    assert!(
        status == StatusCode::GONE || status == StatusCode::NOT_FOUND,
        "{status}"
    );
    // The reaper aborts the multipart upload and removes state and tails.
    let mut left = usize::MAX;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let list =
            h.s3.list_multipart_uploads()
                .bucket(&h.bucket)
                .send()
                .await
                .unwrap();
        let objects =
            h.s3.list_objects_v2()
                .bucket(&h.bucket)
                .send()
                .await
                .unwrap();
        left = list.uploads().len() + objects.contents().len();
        if left == 0 {
            break;
        }
    }
    assert_eq!(
        left, 0,
        "multipart upload, state, tail and index marker all removed"
    );
    assert_eq!(t.head(&url).await.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn expired_is_410() {
    // A long reaper interval: the state is still there, so the proxy knows it expired.
    let h = Harness::embedded(&[("S3UP_TUS_EXPIRY", "1s")]).await;
    let t = Tus {
        h: &h,
        user: "alice",
    };
    let url = t.create(Some(10), &[]).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(t.head(&url).await.status(), StatusCode::GONE);
    let resp = t.patch(&url, 0, vec![0; 10], &[]).await;
    assert_eq!(resp.status(), StatusCode::GONE);
    assert!(!resp.headers().contains_key("upload-offset"));
}

async fn concatenation(h: &Harness) {
    let t = Tus { h, user: "alice" };
    for (name, sizes) in [
        ("big-parts.bin", vec![6 * MIB, 5 * MIB, 3]),
        ("small-parts.bin", vec![1000, 2 * MIB, 77]),
    ] {
        let mut all = Vec::new();
        let mut urls = Vec::new();
        for (i, len) in sizes.iter().enumerate() {
            let bytes = data(*len, 100 + i as u64);
            let resp = t
                .create_raw(Some(*len as u64), &[], &[("upload-concat", "partial")])
                .await;
            assert_eq!(resp.status(), StatusCode::CREATED);
            let url = resp.headers()["location"].to_str().unwrap().to_owned();
            assert_eq!(
                t.patch(&url, 0, bytes.clone(), &[]).await.status(),
                StatusCode::NO_CONTENT
            );
            let head = t.head(&url).await;
            assert_eq!(head.headers()["upload-concat"], "partial");
            // A partial's object is the proxy's own: not named.
            assert!(head.headers().get("s3up-key").is_none());
            all.extend_from_slice(&bytes);
            urls.push(url);
        }
        let resp = t
            .create_raw(
                None,
                &[("filename", name)],
                &[("upload-concat", &format!("final;{}", urls.join(" ")))],
            )
            .await;
        // (create_raw sends Upload-Defer-Length for None: a final takes no length at all.)
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let resp = t
            .req(reqwest::Method::POST, &h.url("/files/"))
            .header("upload-concat", format!("final;{}", urls.join(" ")))
            .header(
                "upload-metadata",
                format!("filename {}", b64(name.as_bytes())),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED);
        let fin = resp.headers()["location"].to_str().unwrap().to_owned();
        let stored = h
            .object(&format!("uploads/alice/{name}"))
            .await
            .expect("assembled");
        assert_eq!(sha256(&stored), sha256(&all), "{name}");
        let head = t.head(&fin).await;
        assert_eq!(
            head.headers()["upload-offset"],
            all.len().to_string().as_str()
        );
        assert!(
            head.headers()["upload-concat"]
                .to_str()
                .unwrap()
                .starts_with("final;")
        );
        assert_eq!(
            head.headers()["s3up-key"],
            format!("uploads/alice/{name}").as_str()
        );
        // PATCH on a final upload: 403.
        assert_eq!(
            t.patch(&fin, all.len() as u64, vec![1], &[]).await.status(),
            StatusCode::FORBIDDEN
        );
    }

    // concatenation-unfinished: the final upload is created first, assembled by the last PATCH.
    let a = data(6 * MIB, 7);
    let b = data(1234, 8);
    let mut urls = Vec::new();
    for len in [a.len(), b.len()] {
        let resp = t
            .create_raw(Some(len as u64), &[], &[("upload-concat", "partial")])
            .await;
        urls.push(resp.headers()["location"].to_str().unwrap().to_owned());
    }
    let resp = t
        .req(reqwest::Method::POST, &h.url("/files/"))
        .header("upload-concat", format!("final;{}", urls.join(" ")))
        .header("upload-metadata", format!("filename {}", b64(b"later.bin")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let fin = resp.headers()["location"].to_str().unwrap().to_owned();
    let head = t.head(&fin).await;
    assert!(
        !head.headers().contains_key("upload-offset"),
        "unfinished final has no offset"
    );
    assert_eq!(
        head.headers()["upload-length"],
        (a.len() + b.len()).to_string().as_str()
    );
    assert_eq!(
        t.patch(&urls[1], 0, b.clone(), &[]).await.status(),
        StatusCode::NO_CONTENT
    );
    assert!(h.object("uploads/alice/later.bin").await.is_none());
    assert_eq!(
        t.patch(&urls[0], 0, a.clone(), &[]).await.status(),
        StatusCode::NO_CONTENT
    );
    let stored = h
        .object("uploads/alice/later.bin")
        .await
        .expect("assembled by the last PATCH");
    assert_eq!(sha256(&stored), sha256(&[a, b].concat()));
    assert_eq!(t.offset(&fin).await, stored.len() as u64);
}

#[tokio::test]
async fn concatenation_embedded() {
    concatenation(&Harness::embedded(&[]).await).await;
}

#[tokio::test]
async fn concatenation_moto() {
    concatenation(&Harness::moto(&[]).await).await;
}

/// A PATCH that breaks off mid-part keeps what arrived: parts plus a tail, reported by HEAD,
/// and the next PATCH continues from there.
async fn broken_patch_keeps_its_bytes(h: &Harness) {
    use tokio::io::AsyncWriteExt;
    let t = Tus { h, user: "alice" };
    let bytes = data(20 * MIB, 3);
    let url = t
        .create(Some(bytes.len() as u64), &[("filename", "broken.bin")])
        .await;
    let path = url.trim_start_matches(&h.proxy.url()).to_owned();
    let mut s = tokio::net::TcpStream::connect(h.proxy.addr).await.unwrap();
    let head = format!(
        "PATCH {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nTus-Resumable: 1.0.0\r\nContent-Type: {OCTETS}\r\nUpload-Offset: 0\r\nContent-Length: {}\r\n\r\n",
        token("alice"),
        bytes.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let sent = 8 * MIB + 12_345;
    s.write_all(&bytes[..sent]).await.unwrap();
    s.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(s);
    let mut offset = 0;
    for _ in 0..100 {
        offset = t.offset(&url).await;
        if offset == sent as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(offset, sent as u64, "every byte that arrived is kept");
    let resp = t.patch(&url, offset, bytes[sent..].to_vec(), &[]).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        sha256(&h.object("uploads/alice/broken.bin").await.unwrap()),
        sha256(&bytes)
    );
}

#[tokio::test]
async fn broken_patch_keeps_its_bytes_embedded() {
    broken_patch_keeps_its_bytes(&Harness::embedded(&[]).await).await;
}

#[tokio::test]
async fn broken_patch_keeps_its_bytes_moto() {
    broken_patch_keeps_its_bytes(&Harness::moto(&[]).await).await;
}

/// Small PATCHes: S3 bytes written per byte uploaded stays below 2 (tails once, parts once).
#[tokio::test]
async fn small_patches_write_amplification() {
    let h = Harness::embedded(&[]).await;
    let t = Tus {
        h: &h,
        user: "alice",
    };
    let bytes = data(50 * MIB, 4);
    upload_in_chunks(&t, "amp.bin", &bytes, MIB).await;
    let received = h.metric("s3up_received_bytes_total").await;
    let sent = h.metric("s3up_s3_sent_bytes_total").await;
    let ratio = sent / received;
    println!("write amplification, 50 MiB in 1 MiB PATCHes: {ratio:.3} ({sent} / {received})");
    assert_eq!(received, bytes.len() as f64);
    assert!(ratio <= 1.81, "{ratio}");
    // 10 parts of 5 MiB, never more than the 10,000 limit allows.
    assert_eq!(h.metric("s3up_s3_parts_total").await, 10.0);
}

/// A checksum mismatch after whole parts already went to S3: nothing is recorded, the parts are
/// overwritten by the next PATCH, and the object is exactly the right bytes.
async fn checksum_mismatch_discards_uploaded_parts(h: &Harness) {
    let t = Tus { h, user: "alice" };
    let bytes = data(13 * MIB, 31);
    let url = t
        .create(Some(bytes.len() as u64), &[("filename", "discard.bin")])
        .await;
    let mut wrong = bytes.clone();
    wrong[12 * MIB] ^= 0xff;
    let digest = b64(&sha256(&bytes));
    let sum = format!("sha256 {digest}");
    // Parts 1 and 2 reach S3 before the last (corrupted) bytes arrive.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    let req = t
        .req(reqwest::Method::PATCH, &url)
        .header("content-type", OCTETS)
        .header("upload-offset", "0")
        .header("upload-checksum", &sum)
        .body(body)
        .send();
    let pending = tokio::spawn(req);
    tx.send(Ok(wrong[..11 * MIB].to_vec())).await.unwrap();
    for _ in 0..100 {
        if h.metric("s3up_s3_parts_total").await >= 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tx.send(Ok(wrong[11 * MIB..].to_vec())).await.unwrap();
    drop(tx);
    let resp = pending.await.unwrap().unwrap();
    assert_eq!(resp.status().as_u16(), 460);
    assert_eq!(t.offset(&url).await, 0);
    assert!(
        h.metric("s3up_s3_parts_total").await >= 2.0,
        "parts went out before the end"
    );
    let resp = t
        .patch(&url, 0, bytes.clone(), &[("upload-checksum", &sum)])
        .await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        sha256(&h.object("uploads/alice/discard.bin").await.unwrap()),
        sha256(&bytes)
    );
}

#[tokio::test]
async fn checksum_mismatch_discards_uploaded_parts_embedded() {
    checksum_mismatch_discards_uploaded_parts(&Harness::embedded(&[]).await).await;
}

#[tokio::test]
async fn checksum_mismatch_discards_uploaded_parts_moto() {
    checksum_mismatch_discards_uploaded_parts(&Harness::moto(&[]).await).await;
}

/// Two requests writing the same upload at once: the second waits for the first's lease and
/// then gets 409 with the offset the first reached; no byte of either is mixed into the object.
#[tokio::test]
async fn concurrent_patches_do_not_clobber_parts() {
    let h = Harness::embedded(&[]).await;
    let t = Tus {
        h: &h,
        user: "alice",
    };
    let bytes = data(16 * MIB, 12);
    let url = t
        .create(Some(bytes.len() as u64), &[("filename", "race.bin")])
        .await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    let first = tokio::spawn(
        t.req(reqwest::Method::PATCH, &url)
            .header("content-type", OCTETS)
            .header("upload-offset", "0")
            .body(body)
            .send(),
    );
    tx.send(Ok(bytes[..6 * MIB].to_vec())).await.unwrap();
    // The first request uploads part 1 and holds the lease while it waits for more.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = tokio::spawn(
        t.req(reqwest::Method::PATCH, &url)
            .header("content-type", OCTETS)
            .header("upload-offset", "0")
            .body(data(16 * MIB, 99))
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    tx.send(Ok(bytes[6 * MIB..10 * MIB].to_vec()))
        .await
        .unwrap();
    drop(tx);
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status(), StatusCode::NO_CONTENT);
    assert_eq!(offset_of(&first), 10 * MIB as u64);
    let second = second.await.unwrap().unwrap();
    assert_eq!(second.status(), StatusCode::CONFLICT);
    assert_eq!(offset_of(&second), 10 * MIB as u64);
    let resp = t
        .patch(&url, 10 * MIB as u64, bytes[10 * MIB..].to_vec(), &[])
        .await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        sha256(&h.object("uploads/alice/race.bin").await.unwrap()),
        sha256(&bytes)
    );
}

/// Behind a load balancer the Location is built from `public_url`, never from request headers
/// a client controls.
#[tokio::test]
async fn location_uses_public_url() {
    let h = Harness::embedded(&[
        ("S3UP_PUBLIC_URL", "https://up.example.com/"),
        ("S3UP_TUS_BASE_PATH", "/tus/v1/"),
    ])
    .await;
    let resp = h
        .http
        .post(h.url("/tus/v1/"))
        .bearer_auth(token("alice"))
        .header("tus-resumable", "1.0.0")
        .header("upload-length", "3")
        .header("x-forwarded-host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let location = resp.headers()["location"].to_str().unwrap();
    let id = location
        .strip_prefix("https://up.example.com/tus/v1/")
        .unwrap_or_else(|| panic!("{location}"));
    let t = Tus {
        h: &h,
        user: "alice",
    };
    let local = h.url(&format!("/tus/v1/{id}"));
    assert_eq!(
        t.patch(&local, 0, b"abc".to_vec(), &[]).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        h.object(&format!("uploads/alice/{id}")).await.unwrap(),
        b"abc"
    );
    // The default base path is not served when another is configured.
    let resp = t.create_raw(Some(1), &[], &[]).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}
