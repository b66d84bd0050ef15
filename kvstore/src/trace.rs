//! Mooncake trace parsing.
