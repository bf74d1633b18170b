//! In-vehicle CAN (issue 12, seed 003), in progress. The leaves every later part stands on:
//! the frame model (`frame.rs`), the candump log format (`candump.rs`), the profile learned
//! from an attack-free capture (`profile.rs`) and the per-frame grading against it
//! (`detect.rs`), which `outpost can learn` and `outpost can detect` run on logs. None does
//! I/O beyond a `BufRead` or names another module of the crate.

pub mod baseline;
pub mod candump;
pub mod dbc;
pub mod detect;
pub mod frame;
pub mod payload;
pub mod profile;
