//! DIDComm v1 core: envelopes (RFC 0019), keys, DIDs, signed attachments and message types.
//!
//! Owns: everything about bytes-on-the-wire for DIDComm v1 that can be computed without I/O.
//! Must not touch: sockets, the store, actix, async, clocks other than the one explicit
//! timestamp in [`jws::sign_connection`]. Every function that reads network input is
//! panic-free on arbitrary bytes and caps what it reads (see the `MAX_*` constants).
//!
//! Interop reference: real Credo 0.6.3 and ACA-Py 1.7 captures under
//! `/work/shared/interop/captures`; fixtures copied into `tests/fixtures/didcomm/`.

pub(crate) mod b64;
pub mod did;
pub mod envelope;
pub mod jws;
pub mod keys;
pub mod message;
pub mod nacl;
pub mod v2;

#[cfg(test)]
mod fuzz_tests;
