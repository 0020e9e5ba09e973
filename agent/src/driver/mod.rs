//! The migration drivers: one per side, the same for every backend. They own what does not
//! depend on the VM — order verification and claim, the control channel, the attested
//! handshake, the switch-over and commit exchange, rollback or settlement, the journal,
//! progress and the summary — and call the backend (`crate::backend`) for the rest.

pub mod channel;
pub mod commit;
pub mod destination;
pub mod peer_budget;
pub mod reconcile;
pub mod settle;
pub mod source;
