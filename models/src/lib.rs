//! Models, data sets, training and parameter math for p2p-node.
//!
//! This crate will own everything that touches candle and nothing that touches the network:
//! device selection, model definitions, data sets and sharding, the training step, parameter
//! averaging math and safetensors checkpoints (see the training issue and
//! `ARCHITECTURE.md`). The node crate drives it from a dedicated trainer thread.
//!
//! It is empty on purpose while the networking foundation lands: the workspace declares
//! candle, candle-nn and safetensors once so that this crate adds them without touching the
//! other crates.
