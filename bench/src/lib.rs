//! Tandem's benchmark harness.
