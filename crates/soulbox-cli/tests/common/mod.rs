//! A real `soulbox serve` (this package's binary) on a fresh data dir and ephemeral ports, and
//! the clients the tests drive it with.
//!
//! Building the base template needs Debian's archive and a minute, so it is built once per
//! machine into `$SOULBOX_TEST_TEMPLATES` (default `/var/tmp/soulbox-test-templates`) and each
//! test's data dir links to it; the server sees an already built template.

#![allow(dead_code)] // each test binary uses a different part

pub mod ports;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use soulbox_client::envd::{CallOptions, EnvdClient};
use soulbox_wire::envd::process::{self as pb, process_event};

pub const BIN: &str = env!("CARGO_BIN_EXE_soulbox");

/// The cached base rootfs, built on first use (serialised across test processes by a lock).
pub fn base_rootfs() -> PathBuf {
    let root = std::env::var_os("SOULBOX_TEST_TEMPLATES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/soulbox-test-templates"));
    std::fs::create_dir_all(&root).expect("template cache dir");
    let lock = std::fs::File::create(root.join(".lock")).expect("lock file");
    lock.lock().expect("lock");
    let templates = soulbox_templates::Templates::new(&root);
    if !templates.is_built(soulbox_templates::BASE) {
        // On a thread of its own: the callers already run inside a tokio runtime.
        let t = templates.clone();
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(t.build_base(&indicatif::ProgressBar::hidden()))
                .expect("building the base template for tests");
        })
        .join()
        .expect("template build thread");
    }
    templates.rootfs(soulbox_templates::BASE)
}

/// A running `soulbox serve`. Dropping it kills its sandboxes, then stops it.
pub struct Server {
    pub api_url: String,
    pub sandbox_url: String,
    pub api_key: String,
    pub data: PathBuf,
    /// Every `export` line the server printed (domain mode adds `E2B_DOMAIN` and the CA's).
    pub exports: BTreeMap<String, String>,
    cgroup: String,
    extra_args: Vec<String>,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts a server on a new data dir; `cgroup` names its parent cgroup (unique per test, so
    /// parallel tests never reap each other's sandboxes).
    pub fn start(cgroup: &str) -> Server {
        Server::start_with(cgroup, &[])
    }

    /// [`Server::start`] with more `soulbox serve` arguments.
    pub fn start_with(cgroup: &str, extra_args: &[&str]) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let base = data.join("templates/base");
        std::fs::create_dir_all(&base).expect("templates dir");
        std::os::unix::fs::symlink(base_rootfs(), base.join("rootfs")).expect("link rootfs");
        let mut s = Server {
            api_url: String::new(),
            sandbox_url: String::new(),
            api_key: String::new(),
            data,
            exports: BTreeMap::new(),
            cgroup: cgroup.to_owned(),
            extra_args: extra_args.iter().map(|a| (*a).to_owned()).collect(),
            child: None,
            _dir: Some(dir),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let mut child = Command::new(BIN)
            .args([
                "serve",
                "--api-addr",
                "127.0.0.1:0",
                "--sandbox-addr",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(&self.data)
            .args(["--cgroup-name", &self.cgroup])
            .args(&self.extra_args)
            .env_remove("SOULBOX_ADMIN_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn soulbox serve");
        let stdout = child.stdout.take().expect("stdout");
        // The last line of the export block: domain mode adds its own, and the local CA's
        // unless a certificate is given.
        let domain = self.extra_args.iter().any(|a| a == "--domain");
        let last = match (domain, self.extra_args.iter().any(|a| a == "--tls-cert")) {
            (false, _) => "E2B_API_KEY",
            (true, true) => "E2B_DOMAIN",
            (true, false) => "NODE_EXTRA_CA_CERTS",
        };
        let mut exports = BTreeMap::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("serve output");
            if let Some((k, v)) = line
                .strip_prefix("export ")
                .and_then(|kv| kv.split_once('='))
            {
                exports.insert(k.to_owned(), v.to_owned());
            }
            if exports.contains_key(last) {
                break;
            }
        }
        assert!(exports.contains_key(last), "serve printed {exports:?}");
        self.api_url = exports["E2B_API_URL"].clone();
        self.sandbox_url = exports["E2B_SANDBOX_URL"].clone();
        self.api_key = exports["E2B_API_KEY"].clone();
        self.exports = exports;
        self.child = Some(child);
    }

    /// Stops the server with `signal` and waits for it; sandboxes keep running.
    pub fn stop(&mut self, signal: i32) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("server running");
        let pid = i32::try_from(child.id()).expect("pid");
        // SAFETY: kill(2) on the pid of our own child, which has not been waited for yet.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "signalling soulbox serve");
        child.wait().expect("wait for soulbox serve")
    }

    /// Runs `soulbox down` on this server's data dir (refused while it runs).
    pub fn down(&self) -> std::process::Output {
        Command::new(BIN)
            .arg("down")
            .arg("--data-dir")
            .arg(&self.data)
            .args(["--cgroup-name", &self.cgroup])
            // Tests run servers side by side: one going down must not turn forwarding off
            // under another that is starting.
            .arg("--keep-forwarding")
            .output()
            .expect("run soulbox down")
    }

    /// Host pid of the running `soulbox serve`.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Starts the server again on the same data dir.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.stop(libc::SIGTERM);
        }
        self.spawn();
    }

    pub fn api(&self) -> Api {
        Api {
            base: self.api_url.clone(),
            key: self.api_key.clone(),
            http: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        }
    }

    /// An envd client for a sandbox through the gateway.
    pub fn envd(&self, id: &str, token: Option<&str>) -> EnvdClient {
        let c = EnvdClient::new(&self.sandbox_url)
            .expect("envd client")
            .sandbox(id);
        match token {
            Some(t) => c.access_token(t),
            None => c,
        }
    }

    /// Runs `soulbox sandbox …` against this server.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .arg("sandbox")
            .args(args)
            .env("E2B_API_URL", &self.api_url)
            .env("E2B_API_KEY", &self.api_key)
            .output()
            .expect("run soulbox sandbox")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
        // Kill what the test left (also when it failed), with the CLI, then stop the server.
        let out = self.cli(&["list", "--json"]);
        if let Ok(list) = serde_json::from_slice::<Vec<Value>>(&out.stdout) {
            for s in list {
                if let Some(id) = s["sandboxID"].as_str() {
                    let _ = self.cli(&["kill", id]);
                }
            }
        }
        self.stop(libc::SIGTERM);
        // The server keeps its nftables table and disk mount for a next start; this data dir
        // has none, and they would outlive the temporary directory.
        let _ = self.down();
    }
}

/// Raw control-plane calls.
pub struct Api {
    base: String,
    key: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

pub struct Reply {
    pub status: StatusCode,
    pub body: Value,
}

impl Api {
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
        let req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("x-api-key", &self.key)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            )))
            .expect("request");
        let resp = self.http.request(req).await.expect("response");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        Reply {
            status,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    /// Creates a sandbox through `POST /v2/sandboxes`; returns (id, access token).
    pub async fn create(&self, body: Value) -> (String, String) {
        let r = self.call(Method::POST, "/v2/sandboxes", Some(body)).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        (
            r.body["sandboxID"].as_str().expect("id").to_owned(),
            r.body["envdAccessToken"]
                .as_str()
                .expect("token")
                .to_owned(),
        )
    }

    pub async fn get(&self, id: &str) -> Reply {
        self.call(Method::GET, &format!("/sandboxes/{id}"), None)
            .await
    }

    /// `GET /soulbox/pools`.
    pub async fn pools(&self) -> Vec<soulbox_wire::rest::WarmPool> {
        let r = self
            .call(Method::GET, soulbox_wire::rest::POOLS_PATH, None)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        serde_json::from_value(r.body).expect("pool report")
    }

    /// Ids of every idle pool member, and how many members are being made.
    pub async fn pool_members(&self) -> (std::collections::HashSet<String>, usize) {
        let pools = self.pools().await;
        let idle = pools.iter().flat_map(|p| p.idle.iter().cloned()).collect();
        (idle, pools.iter().map(|p| p.starting).sum())
    }
}

/// What a command printed and how it ended.
#[derive(Debug)]
pub struct Ran {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
}

/// Runs `bash -l -c cmd` as `user` through the gateway.
pub async fn run(envd: &EnvdClient, cmd: &str, user: Option<&str>) -> Ran {
    let req = start_request(cmd);
    let opts = CallOptions {
        user: user.map(str::to_owned),
        timeout: Some(Duration::from_secs(60)),
        keepalive: None,
    };
    let mut stream = envd.start(&req, &opts).await.expect("start");
    let mut ran = Ran {
        stdout: String::new(),
        stderr: String::new(),
        exit_code: i32::MIN,
    };
    while let Some(msg) = stream.next().await {
        let event = msg
            .expect("process event")
            .event
            .and_then(|e| e.event)
            .expect("event");
        match event {
            process_event::Event::Data(d) => match d.output {
                Some(process_event::data_event::Output::Stdout(b)) => {
                    ran.stdout.push_str(&String::from_utf8_lossy(&b))
                }
                Some(process_event::data_event::Output::Stderr(b)) => {
                    ran.stderr.push_str(&String::from_utf8_lossy(&b))
                }
                _ => {}
            },
            process_event::Event::End(end) => ran.exit_code = end.exit_code,
            _ => {}
        }
    }
    ran
}

pub fn start_request(cmd: &str) -> pb::StartRequest {
    pb::StartRequest {
        process: Some(pb::ProcessConfig {
            cmd: "/bin/bash".into(),
            args: vec!["-l".into(), "-c".into(), cmd.into()],
            ..Default::default()
        }),
        pty: None,
        tag: None,
        stdin: Some(false),
    }
}

/// Polls `f` until it is true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Host pid of a sandbox's PID 1, from the server's database.
pub async fn stored_pid(data: &Path, id: &str) -> i32 {
    let store = soulbox_store::Store::open(&data.join("soulbox.db"))
        .await
        .expect("open the server's database");
    let row = store
        .get_sandbox(id)
        .await
        .expect("query")
        .unwrap_or_else(|| panic!("no row for {id}"));
    store.close().await;
    let handle: Value = serde_json::from_str(&row.handle).expect("handle json");
    handle["pid"]
        .as_i64()
        .and_then(|p| i32::try_from(p).ok())
        .expect("pid")
}

/// Whether `pid` is a live process (a zombie waiting for its reaper is dead).
pub fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, None | Some("Z" | "X"))
}

pub fn new_sandbox(timeout: i64, metadata: Value) -> Value {
    json!({"templateID": "base", "timeout": timeout, "metadata": metadata, "envVars": {"FROM_CREATE": "yes"}})
}
