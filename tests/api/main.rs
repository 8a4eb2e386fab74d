//! The conformance suite: every test runs against a real server over a fresh SQLite file
//! and over a fresh Postgres database (`DATABASE_URL`, default the local one).

mod authz;
mod authzen;
mod authzen_mapping;
mod callers;
mod coherence;
mod edges;
mod follower;
mod gateways;
mod helpers;
mod model;
mod operations;
mod outage;
mod permissions;
#[path = "../support/pgbouncer.rs"]
mod pgbouncer;
mod proxy;
mod revisions;
mod rpc;
mod standby;
#[path = "../support/standby.rs"]
mod standby_pair;
mod store;
mod tokens;
mod transport;
mod upkeep;
mod validation;
mod writes;
