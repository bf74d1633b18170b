//! In-vehicle CAN (issue 12, seed 003). So far the leaf every later part stands on: the frame
//! model (`frame.rs`) and the candump log format that `outpost can learn/detect` and the
//! replay tests read (`candump.rs`). Neither does I/O beyond a `BufRead` nor names another
//! module of the crate.

pub mod candump;
pub mod frame;
