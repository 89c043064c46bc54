//! Rust client for the SoulBox control plane and the envd API (used by the CLI and the benchmark).

#![forbid(unsafe_code)]

pub mod envd;
pub mod rest;
pub mod volumes;
