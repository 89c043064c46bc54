//! The JSON mapping checked against request bodies captured from the real SDKs (Python `e2b`
//! 2.63.0 and JS `e2b` 2.51.0, `E2B_DEBUG=true` against a recording server) and against the
//! proto3-JSON rules the SDK parsers rely on.
#![allow(clippy::unwrap_used)]

use super::Timestamp;
use super::filesystem::{self as fs, EntryInfo, FileType};
use super::process::{self as pr, process_event, process_input, process_selector};
use crate::connect::{Codec, Framing};
use serde_json::{Value, json};

fn selector(pid: u32) -> Option<pr::ProcessSelector> {
    Some(pr::ProcessSelector {
        selector: Some(process_selector::Selector::Pid(pid)),
    })
}

#[test]
fn captured_start_requests() {
    // commands.run("echo hi", envs={"X":"1"}, cwd="/tmp") from both SDKs (identical bytes).
    let r: pr::StartRequest = serde_json::from_str(
        r#"{"process":{"cmd":"/bin/bash","args":["-l","-c","echo hi"],"envs":{"X":"1"},"cwd":"/tmp"},"stdin":false}"#,
    )
    .unwrap();
    let p = r.process.unwrap();
    assert_eq!(p.cmd, "/bin/bash");
    assert_eq!(p.args, ["-l", "-c", "echo hi"]);
    assert_eq!(p.envs.get("X").map(String::as_str), Some("1"));
    assert_eq!(p.cwd.as_deref(), Some("/tmp"));
    assert_eq!(r.stdin, Some(false));
    assert!(r.pty.is_none() && r.tag.is_none());

    // pty.create(rows=24, cols=80): no `stdin` field at all.
    let r: pr::StartRequest = serde_json::from_str(
        r#"{"process":{"cmd":"/bin/bash","args":["-i","-l"],"envs":{"TERM":"xterm-256color","LANG":"C.UTF-8","LC_ALL":"C.UTF-8"}},"pty":{"size":{"cols":80,"rows":24}}}"#,
    )
    .unwrap();
    assert_eq!(r.stdin, None);
    assert_eq!(
        r.pty.and_then(|p| p.size),
        Some(pr::pty::Size { cols: 80, rows: 24 })
    );
}

#[test]
fn captured_unary_process_requests() {
    let r: pr::SendSignalRequest =
        serde_json::from_str(r#"{"process":{"pid":42},"signal":"SIGNAL_SIGKILL"}"#).unwrap();
    assert_eq!(r.process, selector(42));
    assert_eq!(r.signal(), pr::Signal::Sigkill);

    let r: pr::SendInputRequest =
        serde_json::from_str(r#"{"process":{"pid":42},"input":{"stdin":"aGkK"}}"#).unwrap();
    assert_eq!(
        r.input.unwrap().input,
        Some(process_input::Input::Stdin(b"hi\n".to_vec()))
    );
    let r: pr::SendInputRequest =
        serde_json::from_str(r#"{"process":{"pid":42},"input":{"pty":"bHMK"}}"#).unwrap();
    assert_eq!(
        r.input.unwrap().input,
        Some(process_input::Input::Pty(b"ls\n".to_vec()))
    );

    let r: pr::UpdateRequest =
        serde_json::from_str(r#"{"process":{"pid":42},"pty":{"size":{"cols":100,"rows":30}}}"#)
            .unwrap();
    assert_eq!(
        r.pty.and_then(|p| p.size),
        Some(pr::pty::Size {
            cols: 100,
            rows: 30
        })
    );
    let r: pr::CloseStdinRequest = serde_json::from_str(r#"{"process":{"pid":42}}"#).unwrap();
    assert_eq!(r.process, selector(42));
    let _: pr::ListRequest = serde_json::from_str("{}").unwrap();

    // Python stream_input: start, then one data envelope per chunk.
    let r: pr::StreamInputRequest =
        serde_json::from_str(r#"{"start":{"process":{"pid":42}}}"#).unwrap();
    assert!(matches!(
        r.event,
        Some(pr::stream_input_request::Event::Start(_))
    ));
    let r: pr::StreamInputRequest =
        serde_json::from_str(r#"{"data":{"input":{"stdin":"YmM="}}}"#).unwrap();
    let Some(pr::stream_input_request::Event::Data(d)) = r.event else {
        panic!("expected data event")
    };
    assert_eq!(
        d.input.unwrap().input,
        Some(process_input::Input::Stdin(b"bc".to_vec()))
    );
}

#[test]
fn captured_filesystem_requests() {
    let r: fs::ListDirRequest = serde_json::from_str(r#"{"path":"/tmp","depth":2}"#).unwrap();
    assert_eq!((r.path.as_str(), r.depth), ("/tmp", 2));
    let r: fs::MoveRequest =
        serde_json::from_str(r#"{"source":"/tmp/a","destination":"/tmp/b"}"#).unwrap();
    assert_eq!(r.destination, "/tmp/b");
    let r: fs::CreateWatcherRequest =
        serde_json::from_str(r#"{"path":"/tmp","recursive":true}"#).unwrap();
    assert!(r.recursive && !r.include_entry);
}

#[test]
fn alternative_spellings_are_accepted() {
    // snake_case names, enum numbers, 64-bit integers as numbers or strings, unknown fields.
    let r: fs::WatchDirRequest = serde_json::from_str(
        r#"{"path":"/a","include_entry":true,"allowNetworkMounts":true,"future":{"x":1}}"#,
    )
    .unwrap();
    assert!(r.include_entry && r.allow_network_mounts);
    let r: pr::SendSignalRequest =
        serde_json::from_str(r#"{"process":{"pid":"7"},"signal":15}"#).unwrap();
    assert_eq!(r.signal(), pr::Signal::Sigterm);
    assert_eq!(r.process, selector(7));
    let e: EntryInfo =
        serde_json::from_str(r#"{"size":12,"modified_time":"2024-01-01T00:00:00.5+02:00"}"#)
            .unwrap();
    assert_eq!(e.size, 12);
    assert_eq!(
        e.modified_time,
        Some(Timestamp {
            seconds: 1_704_060_000,
            nanos: 500_000_000
        })
    );
    let r: pr::ConnectRequest = serde_json::from_str(r#"{"process":{"tag":"web"}}"#).unwrap();
    assert_eq!(
        r.process.unwrap().selector,
        Some(process_selector::Selector::Tag("web".into()))
    );
}

#[test]
fn bad_json_is_rejected_not_panicking() {
    for body in [
        r#"{"process":{"pid":-1}}"#,
        r#"{"process":{"pid":"x"}}"#,
        r#"{"process":{"pid":99999999999}}"#,
        r#"{"process":[]}"#,
        r#"{"process":{"pid":1,"tag":"a"}}"#,
        "[",
    ] {
        assert!(
            serde_json::from_str::<pr::ConnectRequest>(body).is_err(),
            "{body}"
        );
    }
    assert!(serde_json::from_str::<pr::SendInputRequest>(r#"{"input":{"stdin":"***"}}"#).is_err());
}

#[test]
fn process_events_serialise_canonically() {
    let start = pr::StartResponse {
        event: Some(pr::ProcessEvent {
            event: Some(process_event::Event::Start(process_event::StartEvent {
                pid: 42,
            })),
        }),
    };
    assert_eq!(
        serde_json::to_value(&start).unwrap(),
        json!({"event":{"start":{"pid":42}}})
    );
    let data = pr::ProcessEvent {
        event: Some(process_event::Event::Data(process_event::DataEvent {
            output: Some(process_event::data_event::Output::Stderr(vec![0xff, 0, 1])),
        })),
    };
    assert_eq!(
        serde_json::to_value(&data).unwrap(),
        json!({"data":{"stderr":"/wAB"}})
    );
    let end = pr::ProcessEvent {
        event: Some(process_event::Event::End(process_event::EndEvent {
            exit_code: -1,
            exited: false,
            status: "signal: killed".into(),
            error: Some("signal: killed".into()),
        })),
    };
    assert_eq!(
        serde_json::to_value(&end).unwrap(),
        json!({"end":{"exitCode":-1,"status":"signal: killed","error":"signal: killed"}})
    );
    let ka = pr::ProcessEvent {
        event: Some(process_event::Event::Keepalive(process_event::KeepAlive {})),
    };
    assert_eq!(serde_json::to_value(&ka).unwrap(), json!({"keepalive":{}}));
    let list = pr::ListResponse {
        processes: vec![pr::ProcessInfo {
            config: Some(pr::ProcessConfig {
                cmd: "/bin/bash".into(),
                args: vec![],
                envs: Default::default(),
                cwd: None,
            }),
            pid: 3,
            tag: Some("t".into()),
        }],
    };
    assert_eq!(
        serde_json::to_value(&list).unwrap(),
        json!({"processes":[{"config":{"cmd":"/bin/bash"},"pid":3,"tag":"t"}]})
    );
}

#[test]
fn entry_info_serialises_canonically() {
    let e = EntryInfo {
        name: "a.txt".into(),
        r#type: FileType::File as i32,
        path: "/home/user/a.txt".into(),
        size: 12,
        mode: 0o644,
        permissions: "-rw-r--r--".into(),
        owner: "user".into(),
        group: "user".into(),
        modified_time: Some(Timestamp {
            seconds: 1_700_000_000,
            nanos: 120_000_000,
        }),
        symlink_target: None,
        metadata: [("k".to_string(), "v".to_string())].into(),
        is_symlink: false,
    };
    let v = serde_json::to_value(&e).unwrap();
    assert_eq!(
        v,
        json!({"name":"a.txt","type":"FILE_TYPE_FILE","path":"/home/user/a.txt","size":"12",
               "mode":420,"permissions":"-rw-r--r--","owner":"user","group":"user",
               "modifiedTime":"2023-11-14T22:13:20.120Z","metadata":{"k":"v"}})
    );
    let watch = fs::WatchDirResponse {
        event: Some(fs::watch_dir_response::Event::Start(
            fs::watch_dir_response::StartEvent {},
        )),
    };
    assert_eq!(serde_json::to_value(&watch).unwrap(), json!({"start":{}}));
    let ev = fs::FilesystemEvent {
        name: "sub/x".into(),
        r#type: fs::EventType::Rename as i32,
        entry: None,
    };
    assert_eq!(
        serde_json::to_value(&ev).unwrap(),
        json!({"name":"sub/x","type":"EVENT_TYPE_RENAME"})
    );
    let Value::String(t) = serde_json::to_value(Timestamp {
        seconds: 0,
        nanos: 0,
    })
    .unwrap() else {
        panic!("timestamp is a string")
    };
    assert_eq!(t, "1970-01-01T00:00:00Z");
}

#[test]
fn both_codecs_round_trip() {
    let msg = pr::StartRequest {
        process: Some(pr::ProcessConfig {
            cmd: "/bin/sh".into(),
            args: vec!["-c".into(), "true".into()],
            envs: [("A".to_string(), "b".to_string())].into(),
            cwd: Some("/".into()),
        }),
        pty: None,
        tag: Some("x".into()),
        stdin: Some(false),
    };
    for codec in [Codec::Json, Codec::Proto] {
        let bytes = codec.encode(&msg);
        let back: pr::StartRequest = codec.decode(&bytes).unwrap();
        assert_eq!(back, msg);
    }
    // Protobuf: `stdin` is proto3 optional, so an explicit false survives.
    let bytes = Codec::Proto.encode(&pr::StartRequest {
        stdin: Some(false),
        ..Default::default()
    });
    let back: pr::StartRequest = Codec::Proto.decode(&bytes).unwrap();
    assert_eq!(back.stdin, Some(false));
    // Empty bodies are empty messages; garbage is invalid_argument.
    let _: pr::ListRequest = Codec::Json.decode(b"").unwrap();
    let err = Codec::Proto
        .decode::<pr::StartRequest>(&[0xff, 0xff])
        .unwrap_err();
    assert_eq!(err.code, crate::connect::Code::InvalidArgument);
    assert_eq!(
        Codec::from_content_type("application/connect+json"),
        Some((Codec::Json, Framing::Streaming))
    );
}
