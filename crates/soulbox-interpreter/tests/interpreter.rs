//! The interpreter service on real Jupyter kernels, over HTTP.
//!
//! Needs `python3` with `ipykernel` on PATH (plus matplotlib and pandas for the rich-output
//! test). Without ipykernel the tests print why and pass, unless `SOULBOX_REQUIRE_KERNELS=1`
//! (CI), where that is a failure. Example:
//! `PATH=/tmp/venv-kernels/bin:$PATH cargo test -p soulbox-interpreter`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use soulbox_interpreter::{Config, Interpreter};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

struct Service {
    addr: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
    interpreter: Interpreter,
    _cwd: tempfile::TempDir,
}

impl Service {
    /// Starts the service on a free port and waits for the default Python context; `None`
    /// (test skipped) when this machine has no ipykernel.
    async fn start() -> Option<Service> {
        if !python_has(&["ipykernel"]) {
            assert!(
                std::env::var("SOULBOX_REQUIRE_KERNELS").as_deref() != Ok("1"),
                "SOULBOX_REQUIRE_KERNELS=1 but `python3 -c 'import ipykernel'` fails"
            );
            eprintln!("skipping: python3 with ipykernel is not on PATH (pip install ipykernel)");
            return None;
        }
        let cwd = tempfile::tempdir().expect("tempdir");
        let interpreter = Interpreter::start(Config {
            default_cwd: cwd.path().to_owned(),
        })
        .expect("start");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let router = interpreter.router();
        tokio::spawn(async move { axum::serve(listener, router).await });
        assert!(interpreter.ready().await, "default Python context failed");
        let client = Client::builder(TokioExecutor::new()).build_http();
        Some(Service {
            addr,
            client,
            interpreter,
            _cwd: cwd,
        })
    }

    async fn request(&self, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
        let request = http::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            )))
            .expect("request");
        let response = self.client.request(request).await.expect("response");
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// Runs code and returns the NDJSON lines, checking the stream's framing.
    async fn execute(&self, body: Value) -> Vec<Value> {
        let (status, text) = self.request("POST", "/execute", Some(body)).await;
        assert_eq!(status, 200, "{text}");
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .filter(|l: &Value| l["type"] != "keepalive")
            .collect();
        assert_eq!(
            lines.last().map(|l| &l["type"]),
            Some(&json!("end_of_execution"))
        );
        lines
    }

    async fn run(&self, code: &str) -> Vec<Value> {
        self.execute(json!({"code": code})).await
    }
}

fn python_has(modules: &[&str]) -> bool {
    let import = format!("import {}", modules.join(", "));
    std::process::Command::new("python3")
        .args(["-c", &import])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn of_type<'a>(lines: &'a [Value], kind: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["type"] == kind).collect()
}

fn main_text(lines: &[Value]) -> Option<String> {
    lines
        .iter()
        .find(|l| l["type"] == "result" && l["is_main_result"] == true)
        .and_then(|l| l["text"].as_str().map(str::to_owned))
}

#[tokio::test]
async fn execute_streams_output_results_and_errors_in_order() {
    let Some(svc) = Service::start().await else {
        return;
    };
    assert_eq!(
        svc.request("GET", "/health", None).await,
        (200, "\"OK\"".into())
    );

    let lines = svc.run("x = 20\nprint('hello')\nx + 1").await;
    let kinds: Vec<&str> = lines.iter().filter_map(|l| l["type"].as_str()).collect();
    assert_eq!(
        kinds,
        [
            "number_of_executions",
            "stdout",
            "result",
            "end_of_execution"
        ]
    );
    assert_eq!(lines[1]["text"], "hello\n");
    assert!(lines[1]["timestamp"].is_string());
    assert_eq!(main_text(&lines).as_deref(), Some("21"));

    let lines = svc.run("x * 2").await;
    assert_eq!(main_text(&lines).as_deref(), Some("40"), "state persists");

    let lines = svc
        .run("import sys\nprint('e', file=sys.stderr)\n1/0")
        .await;
    assert_eq!(of_type(&lines, "stderr")[0]["text"], "e\n");
    let errors = of_type(&lines, "error");
    assert_eq!(errors.len(), 1, "one error per execution: {lines:?}");
    assert_eq!(errors[0]["name"], "ZeroDivisionError");
    assert!(
        errors[0]["traceback"]
            .as_str()
            .is_some_and(|t| t.contains("1/0") && !t.contains('\u{1b}')),
        "{errors:?}"
    );

    let count =
        |lines: &[Value]| of_type(lines, "number_of_executions")[0]["execution_count"].as_i64();
    let before = count(&svc.run("'quoted'").await);
    let lines = svc.run("'quoted'").await;
    assert_eq!(count(&lines), before.map(|c| c + 1));
    assert_eq!(main_text(&lines).as_deref(), Some("quoted"));
    svc.interpreter.shut_down().await;
}

#[tokio::test]
async fn contexts_env_vars_and_bad_requests() {
    let Some(svc) = Service::start().await else {
        return;
    };
    let cwd = tempfile::tempdir().expect("tempdir");
    let wanted = cwd.path().join("new/dir");
    let (status, body) = svc
        .request(
            "POST",
            "/contexts",
            Some(json!({"language": "Python", "cwd": wanted})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let context: Value = serde_json::from_str(&body).expect("context");
    let id = context["id"].as_str().expect("id").to_owned();
    assert_eq!(context["language"], "python");
    assert_eq!(
        main_text(
            &svc.execute(json!({"code": "import os; os.getcwd()", "context_id": id}))
                .await
        ),
        Some(wanted.display().to_string())
    );

    let (_, listed) = svc.request("GET", "/contexts", None).await;
    let listed: Vec<Value> = serde_json::from_str(&listed).expect("list");
    assert_eq!(listed.last().map(|c| &c["id"]), Some(&json!(id)));
    assert_eq!(
        listed[0]["language"], "python",
        "the default context comes first"
    );

    // Contexts do not share state; a restart clears it.
    svc.execute(json!({"code": "mine = 1", "context_id": id}))
        .await;
    assert_eq!(
        of_type(&svc.run("mine").await, "error")[0]["name"],
        "NameError"
    );
    assert_eq!(
        svc.request("POST", &format!("/contexts/{id}/restart"), None)
            .await,
        (200, "null".into())
    );
    let lines = svc.execute(json!({"code": "mine", "context_id": id})).await;
    assert_eq!(of_type(&lines, "error")[0]["name"], "NameError");

    // Env vars are set for one execution and restored afterwards, even when it fails.
    let lines = svc
        .execute(
            json!({"code": "import os\nprint(os.environ['HOME'], os.environ['NEW_ONE'])\n1/0",
                        "env_vars": {"HOME": "/over'ridden", "NEW_ONE": "1"}}),
        )
        .await;
    assert_eq!(of_type(&lines, "stdout")[0]["text"], "/over'ridden 1\n");
    let home = std::env::var("HOME").unwrap_or_default();
    let lines = svc
        .run("import os\nprint(os.environ.get('HOME'), os.environ.get('NEW_ONE'))")
        .await;
    let expected = if home.is_empty() {
        "None None\n".to_owned()
    } else {
        format!("{home} None\n")
    };
    assert_eq!(of_type(&lines, "stdout")[0]["text"], expected);

    // Bad requests.
    let (status, body) = svc
        .request(
            "POST",
            "/execute",
            Some(json!({"code": "1", "context_id": id, "language": "python"})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        svc.request(
            "POST",
            "/execute",
            Some(json!({"code": "1", "context_id": "missing"}))
        )
        .await,
        (404, "Context missing not found".into())
    );
    let (status, body) = svc
        .request(
            "POST",
            "/execute",
            Some(json!({"code": "1", "language": "cobol"})),
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        body.contains("Unsupported language") && body.contains("python"),
        "{body}"
    );
    let (status, body) = svc
        .request(
            "POST",
            "/execute",
            Some(json!({"code": "1", "env_vars": {"A=B": "x"}})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = svc
        .request("POST", "/execute", Some(json!({"nocode": 1})))
        .await;
    assert_eq!(status, 400);
    let (status, _) = svc
        .request("POST", "/contexts", Some(json!({"cwd": "relative/path"})))
        .await;
    assert_eq!(status, 400);

    assert_eq!(
        svc.request("DELETE", &format!("/contexts/{id}"), None)
            .await,
        (200, "null".into())
    );
    assert_eq!(
        svc.request("DELETE", &format!("/contexts/{id}"), None)
            .await
            .0,
        404
    );
    assert_eq!(
        svc.request("POST", &format!("/contexts/{id}/restart"), None)
            .await
            .0,
        404
    );
    svc.interpreter.shut_down().await;
}

#[tokio::test]
async fn a_client_disconnect_interrupts_and_a_dead_kernel_is_replaced() {
    let Some(svc) = Service::start().await else {
        return;
    };
    svc.run("kept = 'state survives the interrupt'").await;

    // Start an endless loop, read until it runs, then hang up.
    let mut tcp = tokio::net::TcpStream::connect(svc.addr)
        .await
        .expect("connect");
    let body =
        json!({"code": "import time\nprint('started', flush=True)\nwhile True: time.sleep(0.05)"})
            .to_string();
    let request = format!(
        "POST /execute HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("started") {
        let n = tcp.read(&mut buf).await.expect("read");
        assert!(n > 0, "stream ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    drop(tcp);

    let started = Instant::now();
    let lines = svc.run("kept").await;
    assert_eq!(
        main_text(&lines).as_deref(),
        Some("state survives the interrupt")
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "interrupt took {:?}",
        started.elapsed()
    );

    // A kernel that exits is reported by the execution it died in, then replaced.
    let lines = svc.run("import os; os._exit(7)").await;
    let errors = of_type(&lines, "error");
    assert_eq!(errors[0]["name"], "ContextRestarting");
    assert!(
        errors[0]["value"]
            .as_str()
            .is_some_and(|v| v.contains("exit status 7")),
        "{errors:?}"
    );
    let lines = svc.run("1 + 1").await;
    assert_eq!(main_text(&lines).as_deref(), Some("2"), "{lines:?}");
    assert!(of_type(&lines, "error").is_empty());
    svc.interpreter.shut_down().await;
}

#[tokio::test]
async fn charts_and_dataframes() {
    let Some(svc) = Service::start().await else {
        return;
    };
    if !python_has(&["matplotlib", "pandas"]) {
        eprintln!("skipping: matplotlib/pandas not installed");
        return;
    }
    let lines = svc
        .run("import matplotlib.pyplot as plt\nplt.plot([0, 1, 2], [0, 1, 4], label='f')\nplt.xlabel('t (s)')\nplt.title('T')\nplt.show()")
        .await;
    let results = of_type(&lines, "result");
    assert_eq!(results.len(), 1, "{lines:?}");
    let chart = &results[0]["chart"];
    assert!(results[0]["png"].is_string());
    assert_eq!(results[0]["is_main_result"], false);
    assert_eq!(chart["type"], "line");
    assert_eq!(chart["title"], "T");
    assert_eq!(chart["x_unit"], "s");
    assert_eq!(chart["y_label"], Value::Null);
    assert_eq!(chart["elements"][0]["label"], "f");
    assert_eq!(
        chart["elements"][0]["points"],
        json!([[0.0, 0.0], [1.0, 1.0], [2.0, 4.0]])
    );

    let lines = svc
        .run("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', None]})")
        .await;
    let result = of_type(&lines, "result")[0];
    assert_eq!(result["data"], json!({"a": [1, 2], "b": ["x", null]}));
    assert!(
        result["html"]
            .as_str()
            .is_some_and(|h| h.contains("<table"))
    );
    assert!(result.get("extra").is_none(), "{result}");
    svc.interpreter.shut_down().await;
}
