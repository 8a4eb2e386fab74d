//! The follower tier (`--upstream`): a rolecheck with no database and no private key,
//! only another rolecheck. Its store is the upstream ([`client`]: one more store
//! backend, so the cache and coherence rules are the same as over a database and a
//! follower is that store under the usual [`CachedStore`](crate::cache::CachedStore)); its
//! change feed is the upstream's `Watch` ([`feed`]); its published keys follow the
//! upstream's ([`keys`]); a new follower warms its cache before it reports ready
//! ([`warm`]). The API sees a follower only through [`crate::api::Issuing`]: tokens are
//! signed here or relayed upstream.

pub mod client;
pub mod feed;
pub mod keys;
pub mod warm;

pub use client::{FOLLOWER_HEADER, MAX_UPSTREAM_LOADS, UpstreamOptions, UpstreamStore};
pub use keys::follow_keys;
pub use warm::warm;
