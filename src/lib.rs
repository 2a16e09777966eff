//! meshlet: a lightweight service-mesh sidecar proxy.
//!
//! The file tree follows the proxy's concerns: `listener` (binding, original destination), `detect`
//! (protocol detection), `proxy` (HTTP and TCP forwarding), `metrics`, `admin`, `drain`, and `app`, which
//! wires them together.

pub mod balance;
pub mod config;
pub mod policy;
pub mod tls;
