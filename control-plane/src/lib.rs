//! meshlet control plane.
pub mod webhook;
