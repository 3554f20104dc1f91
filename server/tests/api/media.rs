//! Images: uploads typed by their content, size-limited, content-addressed,
//! posted in messages with dimensions and a thumbnail, downloadable by members only.

use std::io::Cursor;

use image::{ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::harness::{err_code, http, msgs_until, ok, open_direct, HttpReply, TestServer};

fn encoded(format: ImageFormat, width: u32, height: u32) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    match format {
        ImageFormat::Jpeg => RgbImage::from_fn(width, height, |x, y| Rgb([x as u8, y as u8, 90]))
            .write_to(&mut out, format)
            .unwrap(),
        _ => RgbaImage::from_fn(width, height, |x, y| Rgba([x as u8, y as u8, 90, 255]))
            .write_to(&mut out, format)
            .unwrap(),
    }
    out.into_inner()
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn upload(server: &TestServer, user: &str, conv: &str, bytes: Vec<u8>) -> HttpReply {
    let path = format!("/v1/media?conv={}", conv.replace(':', "%3A"));
    http(server, "POST", &path, Some((user, "")), bytes).await
}

fn media_files(server: &TestServer) -> usize {
    let root = server.dir.path().join("media");
    walk(&root)
}

fn walk(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    let path = e.path();
                    if path.is_dir() {
                        walk(&path)
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Upload, post, receive with a thumbnail, download: the bytes come back intact.
#[tokio::test]
async fn image_round_trip() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    let (mut bob, _) = server.login("bob", "phone").await;
    let png = encoded(ImageFormat::Png, 300, 200);
    let reply = upload(&server, "alice", &conv, png.clone()).await;
    assert_eq!(
        reply.status,
        201,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let media = reply.json()["media"].clone();
    assert_eq!(media["id"], hex_sha256(&png));
    assert_eq!(media["size"], png.len());
    assert_eq!(media["content_type"], "image/png");
    assert_eq!(
        (media["width"].as_u64(), media["height"].as_u64()),
        (Some(300), Some(200))
    );
    let thumbnail = media["thumbnail"].as_str().unwrap();
    assert!(
        thumbnail.starts_with("data:image/jpeg;base64,"),
        "{thumbnail}"
    );
    assert!(
        thumbnail.len() < 8 * 1024,
        "a small thumbnail, got {} bytes",
        thumbnail.len()
    );

    let id = media["id"].as_str().unwrap();
    let sent = ok(alice
        .request(
            json!({"op": "send", "conv": conv, "message_id": "img1", "media": id, "text": "look"}),
        )
        .await
        .unwrap());
    let seq = sent["seq"].as_u64().unwrap();
    let got = msgs_until(&mut bob, &conv, seq).await;
    let body = &got.last().unwrap()["body"];
    assert_eq!(body["kind"], "image");
    assert_eq!(body["caption"], "look");
    assert_eq!(body["media"], media);

    let download = http(
        &server,
        "GET",
        &format!("/v1/media/{id}"),
        Some(("bob", "")),
        Vec::new(),
    )
    .await;
    assert_eq!(download.status, 200);
    assert_eq!(download.headers["content-type"], "image/png");
    assert_eq!(download.body, png);
}

/// The type comes from the bytes: JPEG, GIF and WebP are recognised; text,
/// a renamed file and a corrupt image are refused with 415, and nothing is kept.
#[tokio::test]
async fn types_are_sniffed() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    for (format, mime) in [
        (ImageFormat::Jpeg, "image/jpeg"),
        (ImageFormat::Gif, "image/gif"),
        (ImageFormat::WebP, "image/webp"),
    ] {
        let reply = upload(&server, "alice", &conv, encoded(format, 40, 30)).await;
        assert_eq!(
            reply.status,
            201,
            "{mime}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        let media = &reply.json()["media"];
        assert_eq!(media["content_type"], mime);
        assert_eq!(
            (media["width"].as_u64(), media["height"].as_u64()),
            (Some(40), Some(30))
        );
    }
    let kept = media_files(&server);
    let text = upload(
        &server,
        "alice",
        &conv,
        b"<html>not an image</html>".to_vec(),
    )
    .await;
    assert_eq!(
        (text.status, text.code().as_str()),
        (415, "unsupported_media")
    );
    let tiny = upload(&server, "alice", &conv, vec![0xFF, 0xD8]).await;
    assert_eq!(
        (tiny.status, tiny.code().as_str()),
        (415, "unsupported_media")
    );
    let mut corrupt = encoded(ImageFormat::Png, 50, 50);
    corrupt.truncate(60);
    let broken = upload(&server, "alice", &conv, corrupt).await;
    assert_eq!(
        (broken.status, broken.code().as_str()),
        (415, "unsupported_media")
    );
    assert_eq!(
        media_files(&server),
        kept,
        "refused uploads leave nothing behind"
    );
}

/// Anything over 10 MiB gets 413 and is not kept; exactly 10 MiB would be fine.
#[tokio::test]
async fn oversize_upload_is_refused() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    let mut big = encoded(ImageFormat::Png, 8, 8);
    big.resize(10 * 1024 * 1024 + 1, 0);
    let reply = upload(&server, "alice", &conv, big).await;
    assert_eq!(
        (reply.status, reply.code().as_str()),
        (413, "media_too_large")
    );
    assert!(reply.json()["message"]
        .as_str()
        .unwrap()
        .contains("10485760"));
    assert_eq!(media_files(&server), 0, "nothing kept");
    let after = upload(&server, "alice", &conv, encoded(ImageFormat::Png, 8, 8)).await;
    assert_eq!(after.status, 201, "the server still takes uploads");
}

/// Only readers of a conversation an image was uploaded to may fetch or post it.
#[tokio::test]
async fn access_is_for_members_only() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let with_bob = open_direct(&mut alice, "bob").await;
    let with_carol = open_direct(&mut alice, "carol").await;
    let png = encoded(ImageFormat::Png, 20, 20);
    let media = upload(&server, "alice", &with_bob, png.clone())
        .await
        .json()["media"]
        .clone();
    let id = media["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/media/{id}");
    let carol = http(&server, "GET", &path, Some(("carol", "")), Vec::new()).await;
    assert_eq!((carol.status, carol.code().as_str()), (403, "not_member"));
    let anonymous = http(&server, "GET", &path, None, Vec::new()).await;
    assert_eq!(
        (anonymous.status, anonymous.code().as_str()),
        (401, "unauthorized")
    );
    let unknown = http(
        &server,
        "GET",
        &format!("/v1/media/{}", "0".repeat(64)),
        Some(("bob", "")),
        Vec::new(),
    )
    .await;
    assert_eq!(
        (unknown.status, unknown.code().as_str()),
        (404, "unknown_media")
    );
    let traversal = http(
        &server,
        "GET",
        "/v1/media/..%2F..%2Fsecret",
        Some(("bob", "")),
        Vec::new(),
    )
    .await;
    assert_eq!(traversal.status, 404);
    // Posting it where it was not uploaded is refused, until it is uploaded there.
    let elsewhere = alice
        .request(json!({"op": "send", "conv": with_carol, "message_id": "i2", "media": id}))
        .await
        .unwrap();
    assert_eq!(err_code(elsewhere), "unknown_media");
    let again = upload(&server, "alice", &with_carol, png).await.json()["media"].clone();
    assert_eq!(again, media, "same bytes, same id");
    ok(alice
        .request(json!({"op": "send", "conv": with_carol, "message_id": "i2", "media": id}))
        .await
        .unwrap());
    let carol = http(&server, "GET", &path, Some(("carol", "")), Vec::new()).await;
    assert_eq!(carol.status, 200);
    // Uploads need a conversation the uploader is in.
    let outsider = upload(&server, "dave", &with_bob, encoded(ImageFormat::Png, 4, 4)).await;
    assert_eq!(
        (outsider.status, outsider.code().as_str()),
        (403, "not_member")
    );
    let nowhere = upload(&server, "alice", "g:none", encoded(ImageFormat::Png, 4, 4)).await;
    assert_eq!(
        (nowhere.status, nowhere.code().as_str()),
        (404, "unknown_conversation")
    );
    let unnamed = http(
        &server,
        "POST",
        "/v1/media",
        Some(("alice", "")),
        encoded(ImageFormat::Png, 4, 4),
    )
    .await;
    assert_eq!(
        (unnamed.status, unnamed.code().as_str()),
        (400, "bad_request")
    );
    let bogus = alice
        .request(json!({"op": "send", "conv": with_bob, "message_id": "i3", "media": "not-an-id"}))
        .await
        .unwrap();
    assert_eq!(err_code(bogus), "unknown_media");
    let empty = alice
        .request(json!({"op": "send", "conv": with_bob, "message_id": "i4"}))
        .await
        .unwrap();
    assert_eq!(err_code(empty), "bad_request");
}

/// Several uploads at once all land, each under its own content address.
#[tokio::test]
async fn concurrent_uploads() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.login("alice", "phone").await;
    let conv = open_direct(&mut alice, "bob").await;
    let images: Vec<Vec<u8>> = (1..=8)
        .map(|i| encoded(ImageFormat::Png, 10 * i, 7))
        .collect();
    let replies = futures_util::future::join_all(
        images
            .iter()
            .map(|bytes| upload(&server, "alice", &conv, bytes.clone())),
    )
    .await;
    for (bytes, reply) in images.iter().zip(replies) {
        assert_eq!(reply.status, 201);
        let media: Value = reply.json()["media"].clone();
        assert_eq!(media["id"], hex_sha256(bytes));
    }
}
