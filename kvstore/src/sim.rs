//! Cache simulation over traces.
