//! `soulbox template build` end to end against a real `soulbox serve`: a fixture Dockerfile
//! built into layers, a sandbox made from it, the step cache, and bad builds.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{Server, run};
use http::{Method, StatusCode};
use serde_json::json;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/template-small");

fn build(server: &Server, dir: &Path, extra: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_soulbox"))
        .args(["template", "build"])
        .arg(dir)
        .args(extra)
        .env("E2B_API_URL", &server.api_url)
        .env("E2B_API_KEY", &server.api_key)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run soulbox template build")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn copy_fixture(to: &Path) -> PathBuf {
    let dir = to.join("template-small");
    std::fs::create_dir_all(dir.join("app")).expect("mkdir");
    for f in ["Dockerfile", "run.sh", "app/hello.txt"] {
        std::fs::copy(Path::new(FIXTURE).join(f), dir.join(f)).expect("copy fixture");
    }
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_use_cache_and_rebuild_from_a_changed_line() {
    let server = Server::start("soulbox-test-templates-build");
    let out = build(&server, Path::new(FIXTURE), &["--name", "small"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("template small is ready"),
        "{}",
        text(&out)
    );

    let (id, token) = server
        .api()
        .create(json!({"templateID": "small", "timeout": 60}))
        .await;
    let envd = server.envd(&id, Some(&token));
    let r = run(
        &envd,
        "cat /opt/app/hello.txt; echo \"$GREETING|$APP_HOME|$FLAVOR\"; id -un; pwd; \
         cat /etc/flavor; test ! -e /etc/debian_version && echo whiteout-ok; \
         stat -c %U /opt/app/hello.txt; /usr/local/bin/run.sh; test -f /tmp/started && echo started",
        None,
    )
    .await;
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert_eq!(
        r.stdout.lines().collect::<Vec<_>>(),
        [
            "hello from the template",
            "hello world|/opt/app|",
            "user",
            "/opt/app",
            "flavor=plain",
            "whiteout-ok",
            "user",
            "run.sh ran",
            "started",
        ],
        "{r:?}"
    );
    let info = server.api().get(&id).await;
    assert_eq!(info.body["alias"], "small", "{}", info.body);
    server
        .api()
        .call(Method::DELETE, &format!("/sandboxes/{id}"), None)
        .await;

    // Unchanged: every layer-making step (RUN, 2 COPY, WORKDIR) comes from the cache.
    let again = build(&server, Path::new(FIXTURE), &["--name", "small"]);
    let log = text(&again);
    assert!(again.status.success(), "{log}");
    assert_eq!(log.matches("CACHED").count(), 4, "{log}");
    assert!(!log.contains(" layer "), "{log}");

    // One changed line: the steps before it are cached, it and those after are rebuilt.
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = copy_fixture(tmp.path());
    let df = std::fs::read_to_string(dir.join("Dockerfile")).expect("read");
    std::fs::write(
        dir.join("Dockerfile"),
        df.replace("COPY --chmod=755 run.sh", "COPY --chmod=700 run.sh"),
    )
    .expect("write");
    let changed = build(&server, &dir, &["--name", "small"]);
    let log = text(&changed);
    assert!(changed.status.success(), "{log}");
    let cached_steps: Vec<&str> = log
        .lines()
        .filter(|l| l.ends_with(" CACHED"))
        .map(|l| l.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(cached_steps, ["#4", "#5"], "{log}");
    assert!(log.contains("#6 layer"), "{log}");
    assert!(!log.contains("#8 CACHED"), "{log}");

    let list = server.api().call(Method::GET, "/templates", None).await;
    let entry = list
        .body
        .as_array()
        .and_then(|a| a.iter().find(|t| t["names"][0] == "small").cloned());
    let entry = entry.expect("small listed");
    assert_eq!(entry["buildStatus"], "ready", "{entry}");
    assert_eq!(entry["buildCount"], 3, "{entry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_builds_fail_clearly_and_register_nothing() {
    let server = Server::start("soulbox-test-templates-bad");
    let tmp = tempfile::tempdir().expect("tempdir");
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("mkdir");
    std::fs::write(tmp.path().join("outside.txt"), "x").expect("write");
    let cases: [(&str, &str); 6] = [
        (
            "FROM base\nRUN true\nHEALTHCHECK CMD true\n",
            "line 3: unsupported instruction HEALTHCHECK",
        ),
        ("FROM base\nRUN echo \"oops\n", "line 2: unterminated quote"),
        (
            "FROM base\nCOPY missing.txt /x\n",
            "line 2: COPY source 'missing.txt' not found",
        ),
        (
            "FROM base\nCOPY ../outside.txt /x\n",
            "line 2: COPY source '../outside.txt' is outside the build context",
        ),
        // Checked at the end of the build: its start command cannot run (no such user).
        (
            "FROM base\nUSER ghost\nCMD [\"sleep\", \"infinity\"]\n",
            "a sandbox of the new template does not start",
        ),
        (
            "FROM base\nRUN echo step-output && exit 7\n",
            "exited with code 7",
        ),
    ];
    for (dockerfile, want) in cases {
        std::fs::write(ctx.join("Dockerfile"), dockerfile).expect("write");
        let out = build(&server, &ctx, &["--name", "bad"]);
        let log = text(&out);
        assert!(!out.status.success(), "{dockerfile}: {log}");
        assert!(log.contains(want), "{dockerfile}: wanted {want:?} in {log}");
    }
    // The failing RUN's output is in the error.
    assert!(
        text(&build(&server, &ctx, &["--name", "bad"])).contains("step-output"),
        "failing step output missing"
    );
    // Nothing was registered under the name.
    let r = server
        .api()
        .call(
            Method::POST,
            "/v2/sandboxes",
            Some(json!({"templateID": "bad"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);

    // Name clash: shipped template names are reserved for their own Dockerfile.
    std::fs::write(ctx.join("Dockerfile"), "FROM base\n").expect("write");
    let out = build(&server, &ctx, &["--name", "code-interpreter-v1"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("reserved"), "{}", text(&out));
    // A shipped template that is not built yet says how to build it.
    let r = server
        .api()
        .call(
            Method::POST,
            "/v2/sandboxes",
            Some(json!({"templateID": "code-interpreter-v1"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    assert!(
        r.body["message"]
            .as_str()
            .is_some_and(|m| m.contains("soulbox template build code-interpreter-v1")),
        "{}",
        r.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_build_leaves_the_next_unaffected() {
    let mut server = Server::start("soulbox-test-templates-kill");
    let tmp = tempfile::tempdir().expect("tempdir");
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("mkdir");
    std::fs::write(ctx.join("Dockerfile"), "FROM base\nRUN sleep 30\n").expect("write");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_soulbox"))
        .args(["template", "build"])
        .arg(&ctx)
        .args(["--name", "killed"])
        .env("E2B_API_URL", &server.api_url)
        .env("E2B_API_KEY", &server.api_key)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn build");
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    server.stop(libc::SIGKILL);
    let _ = child.wait();
    server.restart();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM base\nRUN echo fine > /tmp/fine\n",
    )
    .expect("write");
    let out = build(&server, &ctx, &["--name", "killed"]);
    assert!(out.status.success(), "{}", text(&out));
    let leftovers: Vec<_> = std::fs::read_dir(server.data.join("layers"))
        .expect("layers dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
