//! In-vehicle CAN (issue 12, seed 003).
//!
//! The leaves: the frame model (`frame.rs`), the candump log format (`candump.rs`), the DBC
//! format (`dbc.rs`) and payload bit fields and checksum families (`payload.rs`), the
//! profile learned from an attack-free capture, optionally with a DBC (`profile.rs`), the
//! per-frame grading against it (`detect.rs`), the plain baseline it is measured against
//! (`baseline.rs`), and the fleet server's detection rules (`rules.rs`); `outpost can learn
//! [--dbc]` and `outpost can detect` run them on logs. None does I/O beyond a `BufRead` or
//! names another module of the crate. The labelled evaluation set comes from
//! `scripts/can-eval/gen.py` (tests/can_eval.rs, benches/can.rs).
//!
//! The capability of `outpost run` stands on them: `config.rs` (the `[can]` section),
//! `source.rs` (kernel interfaces through `socketcan`, and log replay) and `service.rs` (the
//! owner task that grades, keeps incidents and windows, and answers by level through the
//! routing core and the uplink queue).

pub mod baseline;
pub mod candump;
pub mod config;
pub mod dbc;
pub mod detect;
pub mod frame;
pub mod payload;
pub mod profile;
pub mod rules;
pub mod service;
pub mod source;
