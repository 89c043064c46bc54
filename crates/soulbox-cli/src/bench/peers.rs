//! "Start an isolated process that runs `true`", from nothing to its exit and cleanup, with
//! SoulBox's runtime and with bubblewrap, crun and runc (Debian's packages), on one rootfs.
//!
//! Each peer gets what SoulBox gives a sandbox where it can: fresh pid, mount, ipc, uts, net and
//! cgroup namespaces, a user namespace mapping root to an unprivileged range, a read-only
//! root, and (crun, runc) cgroup limits of 2 CPUs, 512 MiB and 4096 pids. bubblewrap has no
//! cgroup support. SoulBox does more: an overlay root with a writable layer, its seccomp
//! filter, and its agent as PID 1, which runs `true` on request over its socket.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::json;
use soulbox_runtime::{Limits, Runtime, RuntimeConfig, SandboxSpec};
use soulbox_wire::connect::{Codec, EnvelopeDecoder, Framing};
use soulbox_wire::envd::process::{self as pb, process_event};

/// First host uid of the peers' user namespaces (below SoulBox's own ranges).
const PEER_UID_BASE: u32 = 0x0800_0000;
/// Parent cgroup of crun's and runc's containers; removed afterwards.
const PEER_CGROUP: &str = "soulbox-bench-peers";

/// One way of running `true` in isolation.
pub struct Peer {
    pub name: &'static str,
    pub version: String,
    pub note: &'static str,
}

/// The rootfs the comparison runs on: `--rootfs`, `$SOULBOX_BENCH_ROOTFS`, the Debian bootstrap
/// layer of the server's base template (with `--data-dir`: the layer that has both `/bin/true`
/// and `/etc/passwd`), or the base template cached by the CLI tests.
pub fn find_rootfs(given: Option<&Path>, data_dir: Option<&Path>) -> Option<PathBuf> {
    let layers = data_dir
        .and_then(|d| std::fs::read_dir(d.join("layers")).ok())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path());
    [
        given.map(Path::to_path_buf),
        std::env::var_os("SOULBOX_BENCH_ROOTFS").map(PathBuf::from),
    ]
    .into_iter()
    .flatten()
    .chain(layers)
    .chain([PathBuf::from("/var/tmp/soulbox-test-templates/base/rootfs")])
    .find(|p| p.join("bin/true").exists() && p.join("etc/passwd").exists())
}

fn version(cmd: &str, arg: &str) -> Option<String> {
    let out = Command::new(cmd).arg(arg).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next()?.trim().to_owned();
    out.status.success().then_some(first)
}

/// The peers installed on this host.
pub fn available() -> Vec<Peer> {
    let mut peers = Vec::new();
    if let Some(v) = version("bwrap", "--version") {
        peers.push(Peer {
            name: "bwrap",
            version: v,
            note: "no cgroup limits (bubblewrap has none)",
        });
    }
    if let Some(v) = version("crun", "--version") {
        peers.push(Peer {
            name: "crun",
            version: v,
            note: "",
        });
    }
    if let Some(v) = version("runc", "--version") {
        peers.push(Peer {
            name: "runc",
            version: v,
            note: "",
        });
    }
    peers
}

/// An OCI bundle (config.json) running `/bin/true` on `rootfs`, as SoulBox isolates.
fn write_bundle(dir: &Path, rootfs: &Path) -> anyhow::Result<()> {
    let mapping = json!([{"containerID": 0, "hostID": PEER_UID_BASE, "size": 65536}]);
    let namespaces: Vec<serde_json::Value> =
        ["pid", "network", "ipc", "uts", "mount", "cgroup", "user"]
            .iter()
            .map(|t| json!({"type": t}))
            .collect();
    let config = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": ["/bin/true"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
        },
        "root": {"path": rootfs, "readonly": true},
        "hostname": "bench",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]},
        ],
        "linux": {
            "namespaces": namespaces,
            "uidMappings": mapping,
            "gidMappings": mapping,
            "resources": {
                "memory": {"limit": 512_u64 << 20},
                "pids": {"limit": 4096},
                "cpu": {"quota": 200_000, "period": 100_000},
            },
        },
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)
        .context("writing config.json")
}

/// `/sys/fs/cgroup/unified/cgroup.controllers`, when the host is hybrid with a controller on
/// the v2 side: crun refuses such hosts ("cgroups in hybrid mode not supported"), so its runs
/// get a private mount namespace where that file reads empty. Costs it two mount calls.
fn hybrid_controllers_file() -> Option<PathBuf> {
    let file = PathBuf::from("/sys/fs/cgroup/unified/cgroup.controllers");
    std::fs::read_to_string(&file)
        .ok()
        .filter(|c| !c.trim().is_empty())
        .map(|_| file)
}

/// The command that runs `true` once with `peer`; `i` makes container names unique.
fn command(peer: &str, i: usize, bundle: &Path, rootfs: &Path, empty: &Path) -> Command {
    let mut cmd = match peer {
        "bwrap" => {
            let mut c = Command::new("bwrap");
            c.args(["--unshare-all", "--die-with-parent", "--ro-bind"])
                .arg(rootfs)
                .args(["/", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"])
                .args(["--uid", "0", "--gid", "0", "/bin/true"]);
            c
        }
        oci => {
            let mut c = Command::new(oci);
            c.args(["run", "--bundle"])
                .arg(bundle)
                .arg(format!("{PEER_CGROUP}-{oci}-{}-{i}", std::process::id()));
            c
        }
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if peer == "crun"
        && let Some(file) = hybrid_controllers_file()
    {
        let (file, empty) = (cstring(&file), cstring(empty));
        // SAFETY: the closure runs in the forked child before exec and only makes raw
        // syscalls (unshare, mount) on C strings prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let root = c"/";
                let flags = libc::MS_REC | libc::MS_PRIVATE;
                if libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    flags,
                    std::ptr::null(),
                ) != 0
                    || libc::mount(
                        empty.as_ptr(),
                        file.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd
}

fn cstring(p: &Path) -> std::ffi::CString {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

/// `rootfs` bound at `<dir>/rootfs`, unmounted on drop. The peers' user namespaces map root
/// to an unprivileged uid, which cannot pass the server's data dir (0700) to reach a template
/// layer; the bind mount under a 0755 directory shows them the same files.
struct PeerRoot(PathBuf);

impl PeerRoot {
    fn bind(dir: &Path, rootfs: &Path) -> anyhow::Result<PeerRoot> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        let target = dir.join("rootfs");
        std::fs::create_dir(&target)?;
        nix::mount::mount(
            Some(rootfs),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND | nix::mount::MsFlags::MS_REC,
            None::<&str>,
        )
        .with_context(|| format!("binding {} for the peers", rootfs.display()))?;
        Ok(PeerRoot(target))
    }
}

impl Drop for PeerRoot {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Runs `true` `runs` times with `peer`; the wall time of each run.
pub fn run_peer(peer: &str, rootfs: &Path, runs: usize) -> anyhow::Result<Vec<Duration>> {
    let dir = tempfile::Builder::new()
        .prefix("soulbox-bench-")
        .tempdir()?;
    let root = PeerRoot::bind(dir.path(), rootfs)?;
    let rootfs = root.0.as_path();
    write_bundle(dir.path(), rootfs)?;
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "")?;
    let mut times = Vec::with_capacity(runs);
    let result = (|| {
        // One unmeasured run: binaries and the rootfs into the page cache.
        for i in 0..=runs {
            let t0 = Instant::now();
            let out = command(peer, i, dir.path(), rootfs, &empty)
                .output()
                .with_context(|| format!("running {peer}"))?;
            let took = t0.elapsed();
            if !out.status.success() {
                bail!(
                    "{peer} failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            if i > 0 {
                times.push(took);
            }
        }
        Ok(())
    })();
    remove_peer_cgroups();
    result.map(|()| times)
}

/// Removes the parent cgroups crun and runc left (their containers' own are gone).
fn remove_peer_cgroups() {
    let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for c in controllers.flatten() {
        let parent = c.path().join(PEER_CGROUP);
        if let Ok(children) = std::fs::read_dir(&parent) {
            for child in children.flatten().filter(|e| e.path().is_dir()) {
                let _ = std::fs::remove_dir(child.path());
            }
        }
        let _ = std::fs::remove_dir(&parent);
    }
}

/// SoulBox's own cold path, in process: runtime create (namespaces, overlay, cgroups,
/// seccomp, the agent as PID 1), `/bin/true` run by the agent over its socket, destroy.
pub async fn run_soulbox_cold(rootfs: &Path, runs: usize) -> anyhow::Result<Vec<Duration>> {
    let dir = tempfile::Builder::new()
        .prefix("soulbox-bench-")
        .tempdir()?;
    // A copy of this binary as the agent, as `serve` does (the build may change meanwhile).
    let agent = dir.path().join("soulbox");
    std::fs::copy(std::env::current_exe()?, &agent).context("copying the agent binary")?;
    let runtime = Runtime::new(RuntimeConfig {
        state_dir: dir.path().join("sandboxes"),
        agent_binary: agent,
        cgroup_name: format!("soulbox-bench-{}", std::process::id()),
    })?;
    let mut times = Vec::with_capacity(runs);
    for i in 0..=runs {
        let spec = SandboxSpec {
            id: soulbox_core::new_sandbox_id(),
            layers: vec![rootfs.to_path_buf()],
            limits: Limits::default(),
            volumes: Vec::new(),
        };
        let t0 = Instant::now();
        let handle = runtime.create(&spec).await?;
        let ran = run_true_on_socket(&handle.socket_path).await;
        let destroyed = runtime.destroy(&handle).await;
        let took = t0.elapsed();
        ran?;
        destroyed?;
        if i > 0 {
            times.push(took);
        }
    }
    runtime.remove_parent_cgroups();
    Ok(times)
}

/// `process.Process/Start` of `/bin/true` straight to an agent's socket, to its end.
async fn run_true_on_socket(socket: &Path) -> anyhow::Result<()> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(conn);
    let start = pb::StartRequest {
        process: Some(pb::ProcessConfig {
            cmd: "/bin/true".into(),
            ..Default::default()
        }),
        stdin: Some(false),
        ..Default::default()
    };
    let req = http::Request::post("/process.Process/Start")
        .header(http::header::HOST, "agent")
        .header(
            http::header::CONTENT_TYPE,
            Codec::Json.content_type(Framing::Streaming),
        )
        .body(Full::new(Codec::Json.envelope(&start)))?;
    let resp = sender.send_request(req).await?;
    let body: Bytes = resp.into_body().collect().await?.to_bytes();
    driver.abort();
    let mut decoder = EnvelopeDecoder::new(1 << 20);
    decoder.push(&body);
    while let Some(env) = decoder.next_envelope()? {
        if env.is_end_stream() {
            break;
        }
        let msg: pb::StartResponse = Codec::Json.decode(&env.payload)?;
        if let Some(process_event::Event::End(end)) = msg.event.and_then(|e| e.event) {
            if end.exit_code != 0 {
                bail!("true exited with {}", end.exit_code);
            }
            return Ok(());
        }
    }
    bail!("the agent's stream ended without an end event")
}
