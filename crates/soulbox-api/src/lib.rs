//! Control-plane REST API (E2B-compatible) on axum.
