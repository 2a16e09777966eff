//! meshlet: a lightweight service-mesh sidecar proxy.
//!
//! The file tree follows the proxy's concerns: `listener` (binding, original destination), `detect`
//! (protocol detection), `proxy` (HTTP and TCP forwarding), `metrics`, `admin`, `drain`, and `app`, which
//! wires them together.

pub mod admin;
pub mod app;
pub mod balance;
pub mod config;
pub mod control_plane;
pub mod demo;
pub mod detect;
pub mod discovery;
pub mod drain;
pub mod init;
pub mod inject;
pub mod listener;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod stat;
pub mod telemetry;
pub mod tls;
