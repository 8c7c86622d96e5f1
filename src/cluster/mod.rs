//! (being written)
pub mod codec;
pub mod directory;
pub mod handshake;
pub mod membership;
pub mod proto;
