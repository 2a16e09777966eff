//! Workload identity and mutual TLS between sidecars.

pub mod api;
