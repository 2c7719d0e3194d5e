//! Live migration of a VM between two popek processes (docs/migration.md): the wire
//! protocol, transports, the complete machine state, and memory transfer.

pub mod auth;
pub mod compress;
pub mod delta;
pub mod destination;
pub mod memory;
pub mod pages;
pub mod postcopy_destination;
pub mod postcopy_source;
pub mod protocol;
pub mod source;
pub mod state;
pub mod tls;
pub mod transport;
