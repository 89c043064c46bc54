//! `process.Process` against a real agent: real processes, real PTYs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{bash, client, collect, first_pid, raw, run};
use soulbox_client::envd::{CallOptions, by_pid};
use soulbox_wire::connect::Code;
use soulbox_wire::envd::process::{self as pb, process_input, process_selector};

fn opts() -> CallOptions {
    CallOptions::default()
}

#[tokio::test]
async fn start_streams_start_data_end() {
    let o = run(bash("echo out; echo err >&2; exit 3"), &opts()).await;
    assert_eq!(o.events.first(), Some(&"start"));
    assert_eq!(o.events.last(), Some(&"end"));
    assert!(o.pid > 0);
    assert_eq!(o.stdout, b"out\n");
    assert_eq!(o.stderr, b"err\n");
    let end = o.end.unwrap();
    assert_eq!((end.exit_code, end.exited), (3, true));
    assert_eq!(end.status, "exit status 3");
    assert_eq!(end.error.as_deref(), Some("exit status 3"));

    let ok = run(bash("true"), &opts()).await.end.unwrap();
    assert_eq!(
        (ok.exit_code, ok.status.as_str(), ok.error),
        (0, "exit status 0", None)
    );
}

#[tokio::test]
async fn large_output_is_intact_and_ordered() {
    let o = run(bash("seq 1 200000"), &opts()).await;
    let expected: String = (1..=200_000).map(|i| format!("{i}\n")).collect();
    assert_eq!(o.stdout.len(), expected.len());
    assert!(o.stdout == expected.as_bytes());
}

#[tokio::test]
async fn environment_cwd_and_users() {
    let mut req = bash("echo $FOO:$HOME:$USER:$LOGNAME:$E2B_SANDBOX:$PWD");
    req.process
        .as_mut()
        .unwrap()
        .envs
        .insert("FOO".into(), "bar".into());
    req.process.as_mut().unwrap().cwd = Some("/tmp".into());
    let o = run(req, &opts()).await;
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "bar:/root:root:root:true:/tmp\n"
    );

    // Per-command envs do not leak into later commands.
    let o = run(bash("echo ${FOO:-unset}"), &opts()).await;
    assert_eq!(o.stdout, b"unset\n");

    let nobody = CallOptions {
        user: Some("nobody".into()),
        ..opts()
    };
    let o = run(bash("id -u; id -g"), &nobody).await;
    assert_eq!(o.stdout, b"65534\n65534\n");

    let err = client()
        .start(
            &bash("true"),
            &CallOptions {
                user: Some("no-such-user".into()),
                ..opts()
            },
        )
        .await
        .unwrap();
    let mut err = err;
    let e = err.next().await.unwrap().unwrap_err();
    assert_eq!(e.code(), Some(Code::Unauthenticated));

    let mut req = bash("true");
    req.process
        .as_mut()
        .unwrap()
        .envs
        .insert("BAD".into(), "nul\0byte".into());
    let mut s = client().start(&req, &opts()).await.unwrap();
    let e = s.next().await.unwrap().unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");

    let mut req = bash("true");
    req.process.as_mut().unwrap().cwd = Some("/no/such/dir".into());
    let mut s = client().start(&req, &opts()).await.unwrap();
    let e = s.next().await.unwrap().unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument));
    assert!(
        e.to_string().contains("cwd '/no/such/dir' does not exist"),
        "{e}"
    );
}

#[tokio::test]
async fn stdin_pipe_send_stream_and_close() {
    let c = client();
    let mut req = bash("cat");
    req.stdin = Some(true);
    let mut s = c.start(&req, &opts()).await.unwrap();
    let pid = first_pid(&mut s, |m: pb::StartResponse| m.event).await;
    c.send_input(pid, process_input::Input::Stdin(b"one ".to_vec()))
        .await
        .unwrap();
    c.stream_input(
        pid,
        [
            process_input::Input::Stdin(b"two ".to_vec()),
            process_input::Input::Stdin(b"three".to_vec()),
        ],
    )
    .await
    .unwrap();
    // PTY input to a pipe process is refused, not hung.
    let e = c
        .send_input(pid, process_input::Input::Pty(b"x".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::FailedPrecondition));
    let close = pb::CloseStdinRequest {
        process: Some(by_pid(pid)),
    };
    let _: pb::CloseStdinResponse = c
        .unary("/process.Process/CloseStdin", &close, &opts())
        .await
        .unwrap();
    let o = collect(s, |m: pb::StartResponse| m.event).await;
    assert_eq!(o.stdout, b"one two three");

    // Started without stdin: input is an error.
    let mut s = c.start(&bash("sleep 5"), &opts()).await.unwrap();
    let pid = first_pid(&mut s, |m: pb::StartResponse| m.event).await;
    let e = c
        .send_input(pid, process_input::Input::Stdin(b"x".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::FailedPrecondition));
    c.send_signal(pid, pb::Signal::Sigkill).await.unwrap();
}

#[tokio::test]
async fn signals_and_unknown_pids() {
    let c = client();
    let mut s = c.start(&bash("sleep 30"), &opts()).await.unwrap();
    let pid = first_pid(&mut s, |m: pb::StartResponse| m.event).await;
    // Only SIGTERM and SIGKILL exist in the enum; anything else is unimplemented.
    let bad = pb::SendSignalRequest {
        process: Some(by_pid(pid)),
        signal: 0,
    };
    let e = c
        .unary::<_, pb::SendSignalResponse>("/process.Process/SendSignal", &bad, &opts())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::Unimplemented));
    c.send_signal(pid, pb::Signal::Sigterm).await.unwrap();
    let o = collect(s, |m: pb::StartResponse| m.event).await;
    let end = o.end.unwrap();
    assert_eq!(
        (end.exit_code, end.exited, end.status.as_str()),
        (-1, false, "signal: terminated")
    );

    let e = c
        .send_signal(4_000_000, pb::Signal::Sigkill)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::NotFound));
    assert!(e.to_string().contains("process with pid 4000000 not found"));
    let e = c
        .connect(
            pb::ProcessSelector {
                selector: Some(process_selector::Selector::Tag("nope".into())),
            },
            &opts(),
        )
        .await
        .unwrap()
        .next()
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::NotFound));
}

#[tokio::test]
async fn timeout_is_the_process_lifetime() {
    let t0 = Instant::now();
    let o = run(
        bash("sleep 20"),
        &CallOptions {
            timeout: Some(Duration::from_millis(400)),
            ..opts()
        },
    )
    .await;
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(o.end.unwrap().status, "signal: killed");
}

#[tokio::test]
async fn keepalives_follow_the_requested_interval() {
    let o = run(
        bash("sleep 2.5; echo done"),
        &CallOptions {
            keepalive: Some(Duration::from_secs(1)),
            ..opts()
        },
    )
    .await;
    assert!(o.keepalives >= 2, "{:?}", o.events);
    assert_eq!(o.stdout, b"done\n");
}

#[tokio::test]
async fn disconnect_keeps_the_process_and_connect_sees_live_output_and_the_end() {
    let c = client();
    let dir = common::scratch();
    let marker = dir.join("marker");
    let mut req = bash(&format!("sleep 0.6; echo late; touch {}", marker.display()));
    req.tag = Some(format!("bg-{}", std::process::id()));
    let mut s = c.start(&req, &opts()).await.unwrap();
    let pid = first_pid(&mut s, |m: pb::StartResponse| m.event).await;
    drop(s);

    let list: pb::ListResponse = c
        .unary("/process.Process/List", &pb::ListRequest {}, &opts())
        .await
        .unwrap();
    let me = list
        .processes
        .iter()
        .find(|p| p.pid == pid)
        .expect("listed");
    assert_eq!(me.tag, req.tag);
    assert_eq!(
        me.config.as_ref().unwrap().args,
        req.process.as_ref().unwrap().args
    );

    let by_tag = pb::ProcessSelector {
        selector: Some(process_selector::Selector::Tag(req.tag.clone().unwrap())),
    };
    let live = c.connect(by_tag, &opts()).await.unwrap();
    let o = collect(live, |m: pb::ConnectResponse| m.event).await;
    assert_eq!(o.pid, pid);
    assert_eq!(o.stdout, b"late\n");
    assert_eq!(o.end.unwrap().exit_code, 0);
    assert!(
        marker.exists(),
        "the process ran to completion after the client left"
    );

    // Ended less than 30 s ago: start + end.
    let again = c.connect(by_pid(pid), &opts()).await.unwrap();
    let o = collect(again, |m: pb::ConnectResponse| m.event).await;
    assert_eq!(o.events, vec!["start", "end"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn pty_output_input_and_resize() {
    let c = client();
    let req = pb::StartRequest {
        process: Some(pb::ProcessConfig {
            cmd: "/bin/bash".into(),
            args: vec![
                "-c".into(),
                "trap 'stty size' WINCH; stty size; echo tty=$(tty); read line; echo got:$line; sleep 0.3; wait".into(),
            ],
            envs: [("TERM".to_string(), "xterm-256color".to_string())].into(),
            cwd: None,
        }),
        pty: Some(pb::Pty { size: Some(pb::pty::Size { cols: 91, rows: 17 }) }),
        tag: None,
        stdin: None,
    };
    let mut s = c.start(&req, &opts()).await.unwrap();
    let pid = first_pid(&mut s, |m: pb::StartResponse| m.event).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.send_input(pid, process_input::Input::Pty(b"hello\r".to_vec()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.resize(pid, 120, 33).await.unwrap();
    // stdin input to a PTY process is refused.
    let e = c
        .send_input(pid, process_input::Input::Stdin(b"x".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::FailedPrecondition));
    let o = collect(s, |m: pb::StartResponse| m.event).await;
    let text = String::from_utf8_lossy(&o.pty);
    assert!(o.stdout.is_empty() && o.stderr.is_empty());
    assert!(text.contains("17 91"), "{text:?}");
    assert!(text.contains("tty=/dev/pts/"), "{text:?}");
    assert!(text.contains("got:hello"), "{text:?}");
    assert!(text.contains("33 120"), "SIGWINCH after resize: {text:?}");
    assert_eq!(o.end.unwrap().exit_code, 0);
}

#[tokio::test]
async fn many_short_processes_keep_their_exit_codes() {
    // Each command also leaves an orphan behind; the reaper must take those without stealing
    // the exit statuses of the processes we wait for.
    let mut handles = Vec::new();
    for i in 0..40 {
        handles.push(tokio::spawn(async move {
            let o = run(bash(&format!("(sleep 0.05 &) ; exit {}", i % 7)), &opts()).await;
            (i, o.end.unwrap().exit_code)
        }));
    }
    for h in handles {
        let (i, code) = h.await.unwrap();
        assert_eq!(code, i % 7);
    }
}

#[tokio::test]
async fn orphans_are_reaped() {
    // The development agent is a child subreaper, so orphans come to it as they would to PID 1.
    let o = run(
        bash("for i in 1 2 3 4 5; do (sleep 0.1 &); done; echo ok"),
        &opts(),
    )
    .await;
    assert_eq!(o.stdout, b"ok\n");
    let me = std::process::id();
    common::wait_until(|| zombie_children(me) == 0, "orphaned zombies to be reaped").await;
}

fn zombie_children(parent: u32) -> usize {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return 0;
    };
    rd.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            // pid (comm) state ppid ...
            let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
                return false;
            };
            let mut f = rest.split(' ');
            let state = f.next();
            let ppid = f.next().and_then(|p| p.parse::<u32>().ok());
            state == Some("Z") && ppid == Some(parent)
        })
        .count()
}

#[tokio::test]
async fn protobuf_codec_and_bad_requests() {
    use prost::Message;
    // Unary List in binary protobuf.
    let (status, headers, body) = raw(
        "POST",
        "/process.Process/List",
        &[("content-type", "application/proto")],
        pb::ListRequest {}.encode_to_vec(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/proto");
    pb::ListResponse::decode(body).unwrap();

    // Start in connect+proto: envelopes back in protobuf.
    let req = bash("echo proto");
    let env = soulbox_wire::connect::encode_envelope(0, &req.encode_to_vec());
    let (status, headers, body) = raw(
        "POST",
        "/process.Process/Start",
        &[("content-type", "application/connect+proto")],
        env,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/connect+proto");
    let mut d = soulbox_wire::connect::EnvelopeDecoder::new(1 << 20);
    d.push(&body);
    let mut stdout = Vec::new();
    let mut ended = false;
    while let Some(e) = d.next_envelope().unwrap() {
        if e.is_end_stream() {
            ended = true;
            assert_eq!(&e.payload[..], b"{}");
            break;
        }
        let ev = pb::StartResponse::decode(e.payload)
            .unwrap()
            .event
            .unwrap()
            .event
            .unwrap();
        if let pb::process_event::Event::Data(pb::process_event::DataEvent {
            output: Some(pb::process_event::data_event::Output::Stdout(b)),
        }) = ev
        {
            stdout.extend(b);
        }
    }
    assert!(ended);
    assert_eq!(stdout, b"proto\n");

    // A huge unary body is refused before it is buffered.
    let huge = vec![b' '; 17 << 20];
    let (status, _, body) = raw(
        "POST",
        "/process.Process/List",
        &[("content-type", "application/json")],
        huge,
    )
    .await;
    assert_eq!(status, 413);
    assert_eq!(common::json(&body)["code"], "resource_exhausted");
    // Oversized envelope on a stream: end-of-stream resource_exhausted.
    let (status, _, body) = raw(
        "POST",
        "/process.Process/Start",
        &[("content-type", "application/connect+json")],
        vec![0u8, 0x7f, 0xff, 0xff, 0xff],
    )
    .await;
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("resource_exhausted"));
    // Malformed JSON, wrong content type, unknown method.
    let (status, _, body) = raw(
        "POST",
        "/process.Process/List",
        &[("content-type", "application/json")],
        "{",
    )
    .await;
    assert_eq!(
        (status.as_u16(), common::json(&body)["code"].as_str()),
        (400, Some("invalid_argument"))
    );
    let (status, _, _) = raw(
        "POST",
        "/process.Process/List",
        &[("content-type", "text/plain")],
        "{}",
    )
    .await;
    assert_eq!(status, 415);
    let (status, _, body) = raw(
        "POST",
        "/process.Process/Nope",
        &[("content-type", "application/json")],
        "{}",
    )
    .await;
    assert_eq!(
        (status.as_u16(), common::json(&body)["code"].as_str()),
        (501, Some("unimplemented"))
    );
}

#[tokio::test]
async fn health_envs_and_init() {
    let c = client();
    c.health().await.unwrap();
    let (status, _, _) = raw("GET", "/health", &[], "").await;
    assert_eq!(status, 204);
    let (status, _, body) = raw("GET", "/envs", &[], "").await;
    assert_eq!(status, 200);
    assert_eq!(common::json(&body)["E2B_SANDBOX"], "true");
    let (status, _, _) = raw("POST", "/_soulbox/init", &[], "not json").await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn connection_is_reusable_after_a_chunked_stream_request() {
    // Python's SDK sends stream requests chunked; the body's terminator arrives after the
    // envelope. A server that stops reading at the envelope cannot reuse the connection.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(common::addr())
        .await
        .unwrap();
    let env = soulbox_wire::connect::encode_envelope(0, br#"{"process":{"cmd":"/bin/true"}}"#);
    let mut req = format!(
        "POST /process.Process/Start HTTP/1.1\r\nhost: x\r\ncontent-type: application/connect+json\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n",
        env.len()
    )
    .into_bytes();
    req.extend_from_slice(&env);
    req.extend_from_slice(b"\r\n");
    conn.write_all(&req).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    conn.write_all(b"0\r\n\r\n").await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.ends_with(b"\r\n0\r\n\r\n") {
        let n = conn.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "connection closed: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    common::assert_still_serves(&mut conn).await;
}

#[tokio::test]
async fn children_inherit_no_agent_descriptors_and_yield_to_the_oom_killer() {
    // Only stdio (and `ls`'s own directory fd) may be open: a leaked listener or pipe of the
    // agent would let sandbox code interfere with it.
    let o = run(
        bash("ls -1 /proc/self/fd; cat /proc/self/oom_score_adj"),
        &opts(),
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&o.stdout), "0\n1\n2\n3\n100\n");
    let mut pty = bash("ls -1 /proc/self/fd | tr '\\n' ' '");
    pty.pty = Some(pb::Pty {
        size: Some(pb::pty::Size { cols: 80, rows: 24 }),
    });
    let o = run(pty, &opts()).await;
    assert_eq!(String::from_utf8_lossy(&o.pty).trim(), "0 1 2 3");
}
