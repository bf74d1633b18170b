//! The PostgreSQL inventory (being written).
