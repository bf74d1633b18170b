//! FIDO Device Onboard 1.1: the services, built on the wire format of [`crate::fdo_wire`].
//!
//! - [`session`]: bounded, expiring, single-use protocol sessions;
//! - [`rendezvous`]: the rendezvous server (TO0 registrations, TO1 answers);
//! - [`owner_service`]: the owner side of TO2 with devmod and the `outpost:mqtt` module;
//! - [`owner`]: the owner and installer keys of a gateway or cloud, rotation, voucher import;
//! - [`owner_backend`]: the owner backend on the store (vouchers, owner keys, recording
//!   into the device registry of [`crate::registry`]);
//! - [`to1_proxy`]: the determination unit in front of the rendezvous server (TO1 answered
//!   by the cloud while online, locally otherwise);
//! - [`http`]: the HTTP server for `POST /fdo/101/msg/{n}` (axum on hyper, bounded);
//! - [`service`]: the `[fdo]` config and the running services of a gateway or cloud
//!   (listener, rendezvous and owner on the store, the TO0 registrar);
//! - [`client`]: the device (TO1 + TO2) and the owner's TO0 over a bounded HTTP client;
//! - [`report`]: the human-readable `outpost voucher show`;
//! - [`stats`]: counters of what real peers send beyond the specification.
//!
//! Every failure is a [`crate::fdo_wire::FdoError`].

pub mod client;
pub mod http;
pub mod owner;
pub mod owner_backend;
pub mod owner_service;
pub mod rendezvous;
pub mod report;
pub mod service;
pub mod session;
pub mod stats;
pub mod to1_proxy;

/// Default port of the FDO HTTP endpoints (rendezvous and owner) that `init-device` writes
/// into the rendezvous info when `--rv-port` is not given.
pub const DEFAULT_RV_PORT: u16 = 8041;
/// Default rendezvous host name written by `init-device` (the gateway on the LAN).
pub const DEFAULT_RV_DNS: &str = "outpost.local";
