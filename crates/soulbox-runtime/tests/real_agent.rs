//! The real `soulbox agent` as PID 1, when `SOULBOX_AGENT_BIN` names a built `soulbox` binary
//! (otherwise skipped): it gets its socket on fd 3 and answers `/health` through it.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use soulbox_runtime::Limits;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_agent_serves_health_on_the_passed_socket() {
    let Some(bin) = std::env::var_os("SOULBOX_AGENT_BIN") else {
        common::skip("set SOULBOX_AGENT_BIN to a built soulbox binary");
        return;
    };
    if !can_run() {
        return;
    }
    let env = Env::with_agent("realagent", std::path::Path::new(&bin));
    let h = env
        .rt
        .create(&env.spec(Limits::default()))
        .await
        .expect("create");
    let mut s = UnixStream::connect(&h.socket_path).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(b"GET /health HTTP/1.1\r\nHost: sandbox\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("read");
    assert!(
        reply.starts_with("HTTP/1.1 2"),
        "agent did not answer /health: {reply:?}"
    );
    env.rt.destroy(&h).await.expect("destroy");
    assert!(env.leftover_dirs().is_empty());
}
