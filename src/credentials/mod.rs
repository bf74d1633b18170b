//! Fleet credential management (issue 13; seeds 001 and 000): an inventory of every
//! certificate, key, password and token the devices hold, the operations an admin (or a
//! policy, or the vehicle binding check) runs on them, delivered to their holders only, and
//! the audits a fleet security admin expects.
//!
//! * `model.rs`, `msg.rs`, `seal.rs`: leaves (the records, the device messages, the sealing
//!   of a rotated key to its holder).
//! * `inventory/`: the [`inventory::InventoryStore`] trait and its two implementations.
//! * `service.rs`: the owner task ([`service::CredentialsHandle`], a closed `Command` enum)
//!   that records what the CA issues and the holders report, makes and drives the jobs.

pub mod config;
pub mod fleet_msg;
pub mod inventory;
pub mod model;
pub mod msg;
pub mod seal;
pub mod service;

pub use config::{CloudConfig, CredentialsConfig};
