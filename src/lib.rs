//! mailroom — a clustered DIDComm v1 mediator.
//!
//! Map of the crate:
//! - [`config`]: `cluster.toml` structures, defaults and validation (no sockets, no store).
//! - [`didcomm`]: envelopes, keys, DIDs, signed attachments, message types — pure, no I/O.
//! - [`protocols`]: one module per protocol family; turns an unpacked message into replies and
//!   store changes, through the [`store::Store`] trait only.
//! - [`store`]: the `Store` trait, its sled and PostgreSQL backends, one conformance suite.
//! - [`registry`]: the per-node registry actor (connection -> live sessions).
//! - [`session`]: WebSocket and HTTP sessions; the only place that knows actix-web-actors.
//! - [`cluster`]: the authenticated TCP peer protocol, session directory, notifications.
//! - [`admin`]: the admin HTTP listener.
//! - [`client`]: the agent side of the same protocols (tests, load generator).
//! - [`probe`]: `mailroom probe`, checks of any DIDComm v1 mediator through [`client`].
//! - [`push`]: push notifications (FCM, APNs, webhook) that wake offline wallets.
//! - [`metrics`]: Prometheus counters and gauges, `mailroom_*`.
//! - [`logging`], [`signals`]: tracing setup; SIGTERM/SIGINT.
//! - [`node`]: the composition root: opens the store, starts actors and listeners, shuts down.
#![forbid(unsafe_code)]

pub mod admin;
pub mod client;
pub mod cluster;
pub mod config;
pub mod didcomm;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod probe;
pub mod protocols;
pub mod push;
pub mod registry;
pub mod session;
pub mod signals;
pub mod store;
pub mod tls;
