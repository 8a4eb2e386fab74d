//! Resident memory of the role cache alone: `CACHE_USERS` users (200,000, default), each
//! with `CACHE_PER_USER` memberships (5, default) shaped as the load bench's (`user-<n>`,
//! `tenant-<n>`, "viewer"/"editor"), loaded through `CachedStore` from a stub that builds
//! each user's snapshot in memory, so nothing but the cache's own entries stays
//! allocated. Prints the resident memory before and after, measured once the allocator
//! has had time to return freed pages, and what that comes to per user and per
//! membership. Same allocator as the binary (mimalloc).
//!
//! With `CACHE_MOKA_ONLY=1`, the same count of entries of a bare `moka` cache (`u64` keys
//! and values) instead: what one moka entry per user would cost before any role is
//! stored, the reason the cache groups users into shared entries.
//!
//! `cargo bench --bench cache_memory`

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use prometheus_client::metrics::counter::Counter;
use rolecheck::{
    cache::{CacheOptions, CachedStore},
    coherence::Coherence,
    domain::{Revision, TenantId, UserId, UserRoles},
    error::Result,
    store::{self, Answer, RoleReads, StoreOptions},
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PER_USER: u64 = 5;
const TENANTS: u64 = 1000;

/// Each user's memberships (the field: how many), built on demand.
struct Generated(u64);

#[async_trait]
impl RoleReads for Generated {
    async fn user_roles(&self, user: &UserId, _min: Revision) -> Result<Answer> {
        let n: u64 = user.as_str().trim_start_matches("user-").parse().unwrap_or(0);
        let rows = (0..self.0).map(|k| {
            let tenant = format!("tenant-{:06}", (n + k * (TENANTS / PER_USER)) % TENANTS);
            let role = if k % 2 == 0 { "viewer" } else { "editor" };
            (tenant, role.to_owned(), None)
        });
        Ok(Answer::new(Arc::new(UserRoles::from_rows(user.as_str(), 1, rows))))
    }
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok());
    kib.unwrap_or(0) * 1024
}

fn main() {
    let setting = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let users = setting("CACHE_USERS").unwrap_or(200_000);
    let per_user = setting("CACHE_PER_USER").unwrap_or(PER_USER);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("dir");
        let app = TenantId::parse("app", "app").expect("id");
        let options = StoreOptions::new(2, Duration::from_secs(5));
        let store = store::open(None, dir.path(), &app, &options, true).await.expect("store");
        let coherence = Coherence::new(Duration::from_secs(1));
        let cache_options = CacheOptions {
            capacity: users * 2,
            ttl: Duration::from_secs(3600),
            min_revision_wait: Duration::from_millis(100),
            hits: Counter::default(),
            misses: Counter::default(),
        };
        let cached = Arc::new(CachedStore::new(
            Arc::new(Generated(per_user)),
            store.writes.clone(),
            &cache_options,
            coherence.clone(),
        ));
        coherence.run(store.backend.subscribe().await.expect("feed"), cached.clone());
        while !coherence.is_current() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        if std::env::var_os("CACHE_MOKA_ONLY").is_some() {
            let before = rss_bytes();
            let bare: moka::future::Cache<u64, u64> = moka::future::Cache::builder()
                .max_capacity(users * 2)
                .time_to_live(Duration::from_secs(3600))
                .build();
            for n in 0..users {
                bare.insert(n, n).await;
            }
            bare.run_pending_tasks().await;
            tokio::time::sleep(Duration::from_secs(4)).await;
            let grown = rss_bytes().saturating_sub(before) as f64;
            println!(
                "{users} bare moka entries (u64 -> u64), {} held: +{:.1} MiB, {:.0} bytes per entry",
                bare.entry_count(),
                grown / 1048576.0,
                grown / users as f64
            );
            return;
        }
        let before = rss_bytes();
        for n in 0..users {
            let user = UserId::parse("user_id", &format!("user-{n:08}")).expect("user");
            cached.user_roles(&user, 0).await.expect("load");
        }
        // Let moka finish its bookkeeping and mimalloc return what was freed.
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let after = rss_bytes();
        let grown = after.saturating_sub(before) as f64;
        let per_membership = match per_user {
            0 => String::new(),
            n => format!(", {:.0} bytes per membership", grown / (users * n) as f64),
        };
        println!(
            "{users} users ({} memberships) cached by {}: resident {:.1} MiB -> {:.1} MiB, \
             +{:.1} MiB: {:.0} bytes per user{per_membership}",
            users * per_user,
            cached.entry_count(),
            before as f64 / 1048576.0,
            after as f64 / 1048576.0,
            grown / 1048576.0,
            grown / users as f64,
        );
        // The hit path CheckBatch takes, timed: 1000 hot users asked 100 at a time, each
        // looked up in memory and checked once.
        let hot: Vec<String> = (0..1000.min(users)).map(|n| format!("user-{n:08}")).collect();
        let rounds = setting("CACHE_LOOKUP_ROUNDS").unwrap_or(20_000) as usize;
        let started = std::time::Instant::now();
        let mut allowed = 0u64;
        for round in 0..rounds {
            for k in 0..100 {
                let user = &hot[(round + k) % hot.len()];
                let answer = cached.user_roles_in_memory(user, 0).expect("a hit");
                allowed += u64::from(answer.roles.allows_str("tenant-000001", "viewer", 0));
            }
        }
        let lookups = rounds as f64 * 100.0;
        println!(
            "hit path: {:.0} ns per lookup and check ({lookups} lookups over {} hot users, {allowed} allowed)",
            started.elapsed().as_nanos() as f64 / lookups,
            hot.len()
        );
    });
}
