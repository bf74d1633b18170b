//! The embedded inventory (being written).
