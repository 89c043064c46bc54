//! The envd message types in `src/envd/gen/` are generated from `proto/*.proto` (prost for the
//! protobuf codec, pbjson for the proto3-JSON mapping) and checked in, so that building the
//! workspace needs neither `protoc` nor the code generators. This test regenerates them and
//! fails if the checked-in files are stale; `SOULBOX_REGEN=1 cargo test -p soulbox-wire --test
//! codegen` rewrites them.

use std::path::{Path, PathBuf};

const FILES: [&str; 4] = [
    "process.rs",
    "process.serde.rs",
    "filesystem.rs",
    "filesystem.serde.rs",
];

fn generate(out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto");
    let fds = protox::compile(
        [proto.join("process.proto"), proto.join("filesystem.proto")],
        [&proto],
    )?;
    let mut cfg = prost_build::Config::new();
    cfg.out_dir(out)
        .extern_path(".google.protobuf.Timestamp", "crate::envd::Timestamp");
    cfg.compile_fds(fds.clone())?;
    let descriptors = prost::Message::encode_to_vec(&fds);
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .out_dir(out)
        .extern_path(".google.protobuf.Timestamp", "crate::envd::Timestamp")
        .ignore_unknown_fields()
        .build(&[".process", ".filesystem"])?;
    Ok(())
}

#[test]
fn generated_envd_code_is_fresh() -> Result<(), Box<dyn std::error::Error>> {
    let checked_in = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/envd/gen");
    let tmp = std::env::temp_dir().join(format!("soulbox-wire-codegen-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    generate(&tmp)?;
    let regen = std::env::var_os("SOULBOX_REGEN").is_some();
    let mut stale = Vec::new();
    for f in FILES {
        let fresh = std::fs::read_to_string(tmp.join(f))?;
        let old = std::fs::read_to_string(checked_in.join(f)).unwrap_or_default();
        if fresh != old {
            if regen {
                std::fs::write(checked_in.join(f), &fresh)?;
            } else {
                stale.push(f);
            }
        }
    }
    std::fs::remove_dir_all(&tmp)?;
    assert!(
        stale.is_empty(),
        "stale generated files {stale:?}: run SOULBOX_REGEN=1 cargo test -p soulbox-wire --test codegen"
    );
    Ok(())
}
