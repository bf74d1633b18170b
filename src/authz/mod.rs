//! Operation requests on the vehicle (issue 14, seed 002): authenticate, authorize, verify
//! each request, and change an offender's rights by policy. Being built: so far the
//! escalation ladder's pure state machine ([`ladder`]); the design is
//! docs/design/operation-authorization.md.

pub mod ladder;
