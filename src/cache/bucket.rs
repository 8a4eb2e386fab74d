//! The cache's storage: users grouped into moka entries ("buckets"), each one
//! allocation searched by fingerprint, expired when its oldest user reaches the TTL.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use moka::Expiry;

use crate::domain::UserRoles;

/// Users per moka entry when the cache is full: a moka entry costs about 300 bytes of
/// its own (BENCHMARKS.md), more than a user's roles, so users share entries.
pub(super) const USERS_PER_BUCKET: u64 = 64;

/// Most users one bucket keeps; past it a load drops the bucket's oldest.
pub(super) const BUCKET_LIMIT: usize = 4 * USERS_PER_BUCKET as usize;

/// One cached user.
#[derive(Clone)]
pub(super) struct Slot {
    pub(super) roles: Arc<UserRoles>,
    /// When it was loaded ([`Lifetime::now_ms`]).
    pub(super) loaded_ms: u64,
    /// The low 32 bits of the user's hash.
    pub(super) fingerprint: u32,
    /// The low bits of the user's generation read before the load (a slot lives at most
    /// `--cache-ttl`, far too short for 2^32 writes to wrap it).
    pub(super) generation: u32,
}

/// The users of one moka entry, in one allocation with its reference count, in the order
/// of their fingerprints (ties by id): a lookup searches the fingerprints and compares
/// one id (the snapshot's own, [`UserRoles::user`]). Replaced whole (copy on write) when
/// a user is loaded into it.
///
/// moka expires a bucket when its oldest slot has been held `--cache-ttl`, so a read
/// never meets an older slot. A user loaded later is dropped with the bucket and loaded
/// again, early: at most twice the loads of a deadline per user, and the users of a busy
/// bucket fall into step.
pub(super) type Bucket = Arc<[Slot]>;

/// The cache's clock and TTL; as moka's [`Expiry`], expires each bucket when its oldest
/// slot reaches the TTL.
#[derive(Clone, Copy)]
pub(super) struct Lifetime {
    born: Instant,
    ttl_ms: u64,
}

impl Lifetime {
    pub(super) fn new(ttl: Duration) -> Self {
        Self { born: Instant::now(), ttl_ms: ttl.as_millis() as u64 }
    }

    /// Milliseconds since the cache was made.
    pub(super) fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    /// Whether `slot` is younger than the TTL at `now_ms`.
    pub(super) fn holds(&self, slot: &Slot, now_ms: u64) -> bool {
        now_ms.saturating_sub(slot.loaded_ms) < self.ttl_ms
    }

    fn left(&self, bucket: &[Slot]) -> Option<Duration> {
        let oldest = bucket.iter().map(|slot| slot.loaded_ms).min().unwrap_or(0);
        Some(Duration::from_millis((oldest + self.ttl_ms).saturating_sub(self.now_ms())))
    }
}

impl Expiry<u64, Bucket> for Lifetime {
    fn expire_after_create(&self, _: &u64, bucket: &Bucket, _: Instant) -> Option<Duration> {
        self.left(bucket)
    }

    fn expire_after_update(
        &self,
        _: &u64,
        bucket: &Bucket,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        self.left(bucket)
    }
}

/// `user`'s slot in `bucket`, if any.
pub(super) fn find<'a>(bucket: &'a [Slot], user: &str, fingerprint: u32) -> Option<&'a Slot> {
    let first = bucket.partition_point(|slot| slot.fingerprint < fingerprint);
    bucket[first..]
        .iter()
        .take_while(|slot| slot.fingerprint == fingerprint)
        .find(|slot| slot.roles.user() == user)
}

/// `bucket` with `slot` in it (replacing its user's), without the slots `keep` rejects,
/// and without its oldest slot when it already holds `limit`.
pub(super) fn with(
    bucket: &[Slot],
    slot: Slot,
    keep: impl Fn(&Slot) -> bool,
    limit: usize,
) -> Bucket {
    let user = slot.roles.user();
    let mut kept: Vec<Slot> =
        bucket.iter().filter(|old| old.roles.user() != user && keep(old)).cloned().collect();
    if kept.len() >= limit.max(1) {
        let oldest = (0..kept.len()).min_by_key(|&i| kept[i].loaded_ms).unwrap_or(0);
        kept.swap_remove(oldest);
    }
    kept.push(slot);
    kept.sort_unstable_by(|a, b| {
        (a.fingerprint, a.roles.user()).cmp(&(b.fingerprint, b.roles.user()))
    });
    kept.into()
}
