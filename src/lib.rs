//! rolecheck: a gRPC service that stores which roles each user holds in each tenant and
//! answers "does user U have role R in tenant T".
//!
//! Where things live: a check is decided in [`domain::UserRoles::allows`]; the SQL is in
//! [`store`]; errors become gRPC codes in [`error`]; the cache is [`cache::CachedStore`].

#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod authz;
pub mod authzen;
pub mod cache;
pub mod cli;
pub mod client;
pub mod codec;
pub mod coherence;
pub mod config;
pub mod doctor;
pub mod domain;
pub mod error;
pub mod follower;
pub mod http;
pub mod listen;
pub mod metrics;
pub mod model;
pub mod paging;
pub mod reload;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod token;

/// Code generated from `proto/rolecheck/v1/rolecheck.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("rolecheck.v1");

    /// The encoded file-descriptor set that reflection serves.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("rolecheck_descriptor");
}
