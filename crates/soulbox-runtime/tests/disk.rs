//! Disk limits on a btrfs state dir: writes and file creation past `disk_mb` fail with EDQUOT
//! inside one sandbox only; destroy removes the subvolume, and the space it held goes back to
//! the host's file. Own test binary: it mounts loop filesystems for its state dirs.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use soulbox_runtime::{Limits, prepare_state_fs};

fn btrfs_available() -> bool {
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    let mkfs = std::process::Command::new("mkfs.btrfs")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !(mkfs && fs.contains("btrfs")) {
        return common::skip("needs btrfs in the kernel and mkfs.btrfs (btrfs-progs)");
    }
    true
}

/// Unmounts the test's loop filesystem (the loop device goes with it: autoclear).
struct Unmount<'a>(&'a Path);
impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("--lazy")
            .arg(self.0)
            .status();
    }
}

const FILL: &str = r#"python3 - <<'EOF'
import errno, os
written = 0
try:
    with open("/tmp/big", "wb") as f:
        while written < (256 << 20):
            f.write(b"x" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
            written += 1 << 20
    print("no-limit", written >> 20)
except OSError as e:
    print(errno.errorcode[e.errno], written >> 20)
os.remove("/tmp/big")
n = 0
os.mkdir("/tmp/many")
try:
    while n < 500000:
        open(f"/tmp/many/{n}", "w").close()
        n += 1
    print("no-limit", n)
except OSError as e:
    print(errno.errorcode[e.errno], n)
EOF"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_limit_is_per_sandbox() {
    if !can_run() || !btrfs_available() {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("sbx-disk-")
        .tempdir()
        .expect("tempdir");
    let state = tmp.path().join("sandboxes");
    let image = tmp.path().join("state.btrfs");
    assert!(prepare_state_fs(&state, &image, 4096).expect("prepare"));
    // The image holds every sandbox's files: host root only.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&image).expect("image").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let _unmount = Unmount(&state);
    assert!(!prepare_state_fs(&state, &image, 4096).expect("again"));
    let env = Env::at("disk", &agent_py(), &state);

    let limits = Limits {
        disk_mb: 8,
        ..Limits::default()
    };
    let t = Instant::now();
    let a = env.rt.create(&env.spec(limits)).await.expect("create a");
    eprintln!("create on btrfs with a disk limit: {:?}", t.elapsed());
    let b = env.rt.create(&env.spec(limits)).await.expect("create b");

    let out = sh(&a, FILL);
    let lines: Vec<Vec<&str>> = out.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(lines[0][0], "EDQUOT", "bytes: {out}");
    let mb: u64 = lines[0][1].parse().expect("MiB");
    assert!((2..=8).contains(&mb), "stopped after {mb} MiB");
    assert_eq!(lines[1][0], "EDQUOT", "inodes: {out}");
    // The other sandbox is not affected by a's full disk.
    sh(&b, "head -c 4M /dev/zero > /tmp/four && sync");
    assert_eq!(sh(&b, "stat -c %s /tmp/four"), (4 << 20).to_string());

    let dir_a = state.join(&a.id);
    assert!(dir_a.is_dir());
    env.rt.destroy(&a).await.expect("destroy");
    env.rt.destroy(&b).await.expect("destroy");
    assert!(!dir_a.exists());
    assert!(env.leftover_dirs().is_empty(), "{:?}", env.leftover_dirs());
    assert!(env.leftover_cgroups().is_empty());
}

/// MiB the host's filesystem holds for the sparse image.
fn allocated_mb(image: &Path) -> f64 {
    let blocks = std::fs::metadata(image).expect("image").blocks();
    blocks as f64 * 512.0 / f64::from(1 << 20)
}

/// A sandbox that wrote 256 MiB and 200 000 empty files is destroyed: within a minute the
/// image's allocation on the host is back within a few MiB of what it was before (without the
/// trim rounds the files' metadata block groups stay allocated for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freed_disk_returns_to_the_host() {
    if !can_run() || !btrfs_available() {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("sbx-trim-")
        .tempdir()
        .expect("tempdir");
    let state = tmp.path().join("sandboxes");
    let image = tmp.path().join("state.btrfs");
    assert!(prepare_state_fs(&state, &image, 4096).expect("prepare"));
    let _unmount = Unmount(&state);
    let env = Env::at("trim", &agent_py(), &state);
    // The runtime's first round (at start) trims what mkfs and the quota setup left.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = allocated_mb(&image);

    let limits = Limits {
        disk_mb: 2048,
        ..Limits::default()
    };
    let a = env.rt.create(&env.spec(limits)).await.expect("create");
    sh(
        &a,
        r#"head -c 256M /dev/urandom > /tmp/big && python3 -c '
import os
for d in range(100):
    os.mkdir(f"/tmp/m{d}")
    for f in range(2000):
        open(f"/tmp/m{d}/{f}", "w").close()
' && sync"#,
    );
    let filled = allocated_mb(&image);
    assert!(
        filled - before > 256.0,
        "the fill did not reach the image: {before:.1} -> {filled:.1} MiB"
    );

    env.rt.destroy(&a).await.expect("destroy");
    let killed = Instant::now();
    let mut after = allocated_mb(&image);
    while after > before + 4.0 && killed.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        after = allocated_mb(&image);
    }
    eprintln!(
        "image allocated: {before:.1} MiB before, {filled:.1} filled, {after:.1} after {:?}",
        killed.elapsed()
    );
    assert!(
        after <= before + 4.0,
        "a minute after destroy the image holds {:.1} MiB more than before",
        after - before
    );
}
