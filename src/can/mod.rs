//! In-vehicle CAN (issue 12, seed 003), in progress. The leaves every later part stands on:
//! the frame model (`frame.rs`), the candump log format (`candump.rs`), the DBC format
//! (`dbc.rs`) and payload bit fields and checksum families (`payload.rs`), the profile
//! learned from an attack-free capture, optionally with a DBC (`profile.rs`), the per-frame
//! grading against it (`detect.rs`) and the plain baseline it is measured against
//! (`baseline.rs`), which `outpost can learn [--dbc]` and `outpost can detect` run on logs.
//! None does I/O beyond a `BufRead` or names another module of the crate. The labelled
//! evaluation set comes from `scripts/can-eval/gen.py` (tests/can_eval.rs, benches/can.rs).

pub mod baseline;
pub mod candump;
pub mod dbc;
pub mod detect;
pub mod frame;
pub mod payload;
pub mod profile;
