//! Builds the real base template with mmdebstrap from Debian's archive.

use std::os::unix::fs::MetadataExt;

use soulbox_templates::{BASE, Templates};

#[tokio::test]
#[ignore = "downloads Debian packages and builds a rootfs (~35 s); run with --ignored"]
async fn base_template_has_user_sudo_and_tools() {
    let dir = tempfile::tempdir().expect("tempdir");
    let templates = Templates::new(dir.path());
    let bar = indicatif::ProgressBar::hidden();
    let rootfs = templates.ensure_base(&bar).await.expect("build base");
    assert_eq!(rootfs, dir.path().join("base/rootfs"));
    assert_eq!(bar.position(), soulbox_templates::progress::TOTAL);
    assert!(templates.is_built(BASE));

    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).expect("passwd");
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("user:x:1000:1000:") && l.ends_with(":/home/user:/bin/bash")),
        "{passwd}"
    );
    let home = std::fs::metadata(rootfs.join("home/user")).expect("home");
    assert_eq!((home.uid(), home.gid()), (1000, 1000));
    let sudoers = std::fs::read_to_string(rootfs.join("etc/sudoers.d/user")).expect("sudoers");
    assert_eq!(sudoers.trim(), "user ALL=(ALL:ALL) NOPASSWD: ALL");
    for tool in [
        "usr/bin/python3",
        "usr/bin/pip3",
        "usr/bin/git",
        "usr/bin/curl",
        "usr/bin/sudo",
        "usr/bin/ps",
        "usr/bin/bash",
    ] {
        assert!(rootfs.join(tool).exists(), "{tool} missing");
    }
    // No build directory is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".build-"))
        .collect();
    assert!(leftovers.is_empty());
}
