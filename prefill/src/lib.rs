//! Tandem's prefill worker (DESIGN.md §2, step 4): loads cached prefix
//! blocks from the store, computes the rest of the prompt in chunks with the
//! shared engine in `tandem-model`, writes new blocks layer by layer and
//! hands the request to a decode node.
//!
//! The worker service arrives with the disaggregated-serving issue; today
//! this crate only fixes its place in the crate graph (model, kvstore,
//! proto).
