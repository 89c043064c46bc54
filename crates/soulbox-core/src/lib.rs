//! Sandbox lifecycle manager: ties runtime, store, templates and agents together.
