//! Wire formats: E2B REST bodies, envd Connect messages, the Connect envelope codec, host-agent messages, the port tunnel.

#![forbid(unsafe_code)]

pub mod agent;
pub mod connect;
pub mod envd;
pub mod rest;
pub mod tunnel;
pub mod volumes;
