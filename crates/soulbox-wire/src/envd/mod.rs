//! envd's Connect services `process.Process` and `filesystem.Filesystem`: messages with both
//! codecs the Connect protocol allows. The types are generated from `proto/*.proto` into
//! `gen/` (see `tests/codegen.rs`): prost gives the protobuf binary codec, pbjson the
//! proto3-JSON mapping (lowerCamelCase out, snake_case accepted, 64-bit integers as strings,
//! bytes as base64, enums by name or number, defaults omitted, oneofs inlined, unknown fields
//! ignored). Generating both from one schema keeps them from drifting apart.

mod timestamp;

pub use timestamp::Timestamp;

/// Service path prefix of the process service.
pub const PROCESS_SERVICE: &str = "process.Process";
/// Service path prefix of the filesystem service.
pub const FILESYSTEM_SERVICE: &str = "filesystem.Filesystem";

/// `process.Process` messages.
#[allow(clippy::all, clippy::unwrap_used, missing_docs)]
pub mod process {
    include!("gen/process.rs");
    include!("gen/process.serde.rs");
}

/// `filesystem.Filesystem` messages.
#[allow(clippy::all, clippy::unwrap_used, missing_docs)]
pub mod filesystem {
    include!("gen/filesystem.rs");
    include!("gen/filesystem.serde.rs");
}

#[cfg(test)]
mod tests;
