//! Tandem's decode worker (DESIGN.md §2, step 5): fetches a request's KV
//! blocks from the store into its paged pool, joins the continuous batch
//! and streams tokens back.
//!
//! The worker service arrives with the disaggregated-serving issue; today
//! this crate only fixes its place in the crate graph (model, kvstore,
//! proto).
