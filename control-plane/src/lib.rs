//! meshlet control plane.
