//! `GET/POST /files` against a real agent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use common::{bash, json, raw, run, scratch};
use soulbox_client::envd::CallOptions;

fn enc(p: &str) -> String {
    percent_encoding::utf8_percent_encode(p, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn multipart(parts: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "----soulboxtestboundary";
    let mut body = Vec::new();
    for (filename, data) in parts {
        write!(
            body,
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .unwrap();
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    write!(body, "--{boundary}--\r\n").unwrap();
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[tokio::test]
async fn multipart_upload_with_full_path_filenames() {
    let d = scratch();
    let base = d.to_str().unwrap();
    let a = format!("{base}/deep/dir/a.txt");
    let b = format!("{base}/b.bin");
    let (ct, body) = multipart(&[(&a, b"alpha"), (&b, &[0, 1, 2, 255])]);
    let (status, _, resp) = raw(
        "POST",
        "/files?username=nobody",
        &[("content-type", &ct)],
        body,
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
    let v = json(&resp);
    assert_eq!(v[0]["path"], a.as_str());
    assert_eq!(v[0]["name"], "a.txt");
    assert_eq!(v[0]["type"], "file");
    assert_eq!(std::fs::read(&a).unwrap(), b"alpha");
    assert_eq!(std::fs::read(&b).unwrap(), [0, 1, 2, 255]);
    // Created parents and the files belong to the user.
    assert_eq!(std::fs::metadata(d.join("deep")).unwrap().uid(), 65534);
    assert_eq!(std::fs::metadata(&a).unwrap().uid(), 65534);

    // `path` wins over the filename; the same path twice is refused.
    let (ct, body) = multipart(&[("ignored-name", b"by query")]);
    let (status, _, _) = raw(
        "POST",
        &format!("/files?path={}", enc(&b)),
        &[("content-type", &ct)],
        body,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(std::fs::read(&b).unwrap(), b"by query");
    let (ct, body) = multipart(&[(&a, b"1"), (&a, b"2")]);
    let (status, _, resp) = raw("POST", "/files", &[("content-type", &ct)], body).await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&resp));
    std::fs::remove_dir_all(d).unwrap();
}

#[tokio::test]
async fn raw_and_gzip_uploads_with_metadata() {
    let d = scratch();
    let p = format!("{}/raw.txt", d.display());
    let (status, _, resp) = raw(
        "POST",
        &format!("/files?path={}", enc(&p)),
        &[
            ("content-type", "application/octet-stream"),
            ("x-metadata-Owner", "alice"),
            ("x-metadata-kind", "note"),
        ],
        "raw body",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        json(&resp)[0]["metadata"],
        serde_json::json!({"owner": "alice", "kind": "note"})
    );
    assert_eq!(std::fs::read(&p).unwrap(), b"raw body");
    assert_eq!(xattr::get(&p, "user.e2b.owner").unwrap().unwrap(), b"alice");

    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&b"zipped ".repeat(1000)).unwrap();
    let (status, _, _) = raw(
        "POST",
        &format!("/files?path={}", enc(&p)),
        &[
            ("content-type", "application/octet-stream"),
            ("content-encoding", "gzip"),
        ],
        gz.finish().unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(std::fs::read(&p).unwrap(), b"zipped ".repeat(1000));
    // A new upload replaces the metadata set.
    assert!(xattr::get(&p, "user.e2b.owner").unwrap().is_none());

    let (status, _, resp) = raw(
        "POST",
        "/files",
        &[("content-type", "application/octet-stream")],
        "x",
    )
    .await;
    assert_eq!(
        status,
        400,
        "raw upload without path: {}",
        String::from_utf8_lossy(&resp)
    );
    let (status, _, _) = raw(
        "POST",
        &format!("/files?path={}", enc(&p)),
        &[
            ("content-type", "application/octet-stream"),
            ("x-metadata-big", &"v".repeat(5000)),
        ],
        "x",
    )
    .await;
    assert_eq!(status, 400);
    std::fs::remove_dir_all(d).unwrap();
}

#[tokio::test]
async fn downloads_ranges_gzip_and_errors() {
    let d = scratch();
    let p = format!("{}/data.bin", d.display());
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&p, &data).unwrap();
    let q = format!("/files?path={}", enc(&p));

    let (status, h, body) = raw("GET", &q, &[], "").await;
    assert_eq!(status, 200);
    assert_eq!(body.as_ref(), data.as_slice());
    assert_eq!(h["content-disposition"], "inline; filename=\"data.bin\"");
    assert_eq!(h["content-length"], "200000");

    let (status, h, body) = raw("GET", &q, &[("range", "bytes=10-19")], "").await;
    assert_eq!(status, 206);
    assert_eq!(h["content-range"], "bytes 10-19/200000");
    assert_eq!(body.as_ref(), &data[10..20]);
    let (status, _, body) = raw("GET", &q, &[("range", "bytes=-5")], "").await;
    assert_eq!((status.as_u16(), body.as_ref()), (206, &data[199_995..]));
    let (status, h, _) = raw("GET", &q, &[("range", "bytes=999999-")], "").await;
    assert_eq!(status, 416);
    assert_eq!(h["content-range"], "bytes */200000");

    let (status, h, body) = raw("GET", &q, &[("accept-encoding", "gzip")], "").await;
    assert_eq!(status, 200);
    assert_eq!(h["content-encoding"], "gzip");
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(body.as_ref())
        .read_to_end(&mut out)
        .unwrap();
    assert_eq!(out, data);
    let (status, h, _) = raw("GET", &q, &[("accept-encoding", "gzip, deflate, br")], "").await;
    assert_eq!(status, 200);
    assert!(h.get("content-encoding").is_none());
    let (status, _, _) = raw("GET", &q, &[("accept-encoding", "identity;q=0")], "").await;
    assert_eq!(status, 406);

    let missing = format!("{}/nope", d.display());
    let (status, h, body) = raw("GET", &format!("/files?path={}", enc(&missing)), &[], "").await;
    assert_eq!(status, 404);
    assert!(
        h["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    assert_eq!(
        json(&body),
        serde_json::json!({"code": 404, "message": format!("path '{missing}' does not exist")})
    );
    let (status, _, body) = raw(
        "GET",
        &format!("/files?path={}", enc(d.to_str().unwrap())),
        &[],
        "",
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        json(&body)["message"],
        format!("path '{}' is a directory", d.display())
    );
    let (status, _, body) = raw("GET", "/files?path=x&username=nosuchuser", &[], "").await;
    assert_eq!(status, 401);
    assert_eq!(json(&body)["code"], 401);
    std::fs::remove_dir_all(d).unwrap();
}

#[tokio::test]
async fn fifos_and_devices_are_refused_without_blocking() {
    let d = scratch();
    let fifo = format!("{}/fifo", d.display());
    let o = run(bash(&format!("mkfifo {fifo}")), &CallOptions::default()).await;
    assert_eq!(o.end.unwrap().exit_code, 0);
    let q = format!("/files?path={}", enc(&fifo));
    let get = tokio::time::timeout(Duration::from_secs(5), raw("GET", &q, &[], ""));
    let (status, _, body) = get.await.expect("must not block on a FIFO");
    assert_eq!(status, 400);
    assert!(
        json(&body)["message"]
            .as_str()
            .unwrap()
            .contains("not a regular file")
    );
    let put = raw(
        "POST",
        &q,
        &[("content-type", "application/octet-stream")],
        "x",
    );
    let (status, _, _) = tokio::time::timeout(Duration::from_secs(5), put)
        .await
        .expect("no block");
    assert_eq!(status, 400);
    let (status, _, _) = raw("GET", "/files?path=%2Fdev%2Fzero", &[], "").await;
    assert_eq!(status, 400);
    std::fs::remove_dir_all(d).unwrap();
}

#[tokio::test]
async fn relative_paths_resolve_against_home() {
    let name = format!("soulbox-rel-{}.txt", std::process::id());
    let (status, _, resp) = raw(
        "POST",
        &format!("/files?path={}&username=root", enc(&format!("~/{name}"))),
        &[("content-type", "application/octet-stream")],
        "home",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(json(&resp)[0]["path"], format!("/root/{name}"));
    let (status, _, body) = raw("GET", &format!("/files?path={}", enc(&name)), &[], "").await;
    assert_eq!((status.as_u16(), body.as_ref()), (200, b"home".as_slice()));
    std::fs::remove_file(format!("/root/{name}")).unwrap();
}

#[tokio::test]
async fn full_disk_is_507() {
    // A 256 KiB tmpfs stands in for a sandbox whose disk quota is used up (needs root).
    let d = scratch();
    let mounted = nix::mount::mount(
        Some("tmpfs"),
        &d,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=256k"),
    );
    if mounted.is_err() {
        eprintln!("skipping: cannot mount a tmpfs here ({mounted:?})");
        return;
    }
    let p = format!("{}/big", d.display());
    let (status, _, body) = raw(
        "POST",
        &format!("/files?path={}", enc(&p)),
        &[("content-type", "application/octet-stream")],
        vec![7u8; 4 << 20],
    )
    .await;
    let _ = nix::mount::umount2(&d, nix::mount::MntFlags::MNT_DETACH);
    assert_eq!(status, 507, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json(&body)["code"], 507);
    std::fs::remove_dir_all(d).unwrap();
}

#[tokio::test]
async fn connection_is_reusable_after_a_multipart_epilogue_sent_late() {
    // Clients end a multipart body with a CRLF after the closing boundary, some in a write of
    // its own. Answering before reading it made the agent close the connection, and the
    // gateway, still writing it, got EPIPE instead of the answer.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = scratch();
    let target = dir.join("late-epilogue.txt");
    let (ctype, body) = multipart(&[(target.to_str().unwrap(), b"late")]);
    let (head_body, epilogue) = body.split_at(body.len() - 2);
    let mut conn = tokio::net::TcpStream::connect(common::addr())
        .await
        .unwrap();
    let head = format!(
        "POST /files HTTP/1.1\r\nhost: x\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(head_body).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    conn.write_all(epilogue).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.ends_with(b"]") {
        let n = conn.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(
        seen.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    assert_eq!(std::fs::read(&target).unwrap(), b"late");
    common::assert_still_serves(&mut conn).await;
}

#[tokio::test]
async fn a_failed_upload_is_answered_after_its_body() {
    // An upload that fails at once (here: a directory as the target) used to be answered
    // before its body was read; the agent then closed the connection, and a client still
    // sending (reqwest, the Python SDK's transport) got a broken pipe instead of the error.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = scratch();
    let body = vec![b'x'; 4 << 20];
    let mut conn = tokio::net::TcpStream::connect(common::addr())
        .await
        .unwrap();
    let head = format!(
        "POST /files?path={} HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
        enc(dir.to_str().unwrap()),
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&body)
        .await
        .expect("the whole body is taken");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(
        seen.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
}
