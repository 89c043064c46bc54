//! Rust client for the SoulBox control plane and the envd API (used by the CLI and the benchmark).

pub mod envd;
pub mod rest;
