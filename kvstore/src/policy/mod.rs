//! Eviction policies (pluggable).
