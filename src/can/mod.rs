//! In-vehicle CAN (issue 12, seed 003).
//!
//! The leaves: the frame model (`frame.rs`), the candump log format (`candump.rs`), the
//! profile learned from an attack-free capture (`profile.rs`) and the per-frame grading
//! against it (`detect.rs`), which `outpost can learn` and `outpost can detect` run on logs.
//! The fleet server's detection rules (`rules.rs`) are a leaf too. None does I/O beyond a
//! `BufRead` or names another module of the crate.
//!
//! The capability of `outpost run` stands on them: `config.rs` (the `[can]` section),
//! `source.rs` (kernel interfaces through `socketcan`, and log replay) and `service.rs` (the
//! owner task that grades, keeps incidents and windows, and answers by level through the
//! routing core and the uplink queue).

pub mod candump;
pub mod config;
pub mod detect;
pub mod frame;
pub mod profile;
pub mod rules;
pub mod service;
pub mod source;
