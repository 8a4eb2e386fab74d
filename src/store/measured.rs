//! A [`Store`] decorator that times every store operation into
//! `rolecheck_store_query_duration_seconds{operation}`, and bounds each by the query
//! timeout: a store that does not answer in time is `UNAVAILABLE`, whatever the network
//! under it does.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;

use crate::{
    domain::{Revision, TenantId, UnixSeconds, UserId},
    error::Result,
    store::StoredModel,
    store::{
        Answer, ChangeFilter, History, HistoryEntry, HistoryLog, Member, MembershipWrite,
        RoleReads, Store, Tenant, TenantReads, Writes,
    },
};

/// Where a store operation's duration goes (the server passes the metrics' recorder).
pub type Record = Arc<dyn Fn(&'static str, Duration) + Send + Sync>;

/// Times (and bounds) each part of the store it wraps.
pub struct MeasuredStore<T: ?Sized> {
    inner: Arc<T>,
    record: Record,
    timeout: Duration,
}

impl MeasuredStore<()> {
    /// `store` with every part but the change feed timed into `record`; an operation past
    /// `timeout` is `UNAVAILABLE`.
    pub fn wrap(store: Store, record: &Record, timeout: Duration) -> Store {
        fn part<T: ?Sized>(
            inner: Arc<T>,
            record: &Record,
            timeout: Duration,
        ) -> Arc<MeasuredStore<T>> {
            Arc::new(MeasuredStore { inner, record: record.clone(), timeout })
        }
        Store {
            roles: part(store.roles, record, timeout),
            tenants: part(store.tenants, record, timeout),
            writes: part(store.writes, record, timeout),
            history: part(store.history, record, timeout),
            backend: store.backend,
        }
    }
}

impl<T: ?Sized> MeasuredStore<T> {
    async fn timed<R>(
        &self,
        operation: &'static str,
        call: impl std::future::Future<Output = Result<R>>,
    ) -> Result<R> {
        let started = Instant::now();
        let out = tokio::time::timeout(self.timeout, call).await.unwrap_or_else(|_| {
            tracing::warn!(operation, timeout = ?self.timeout, "the store did not answer in time");
            Err(crate::error::Error::Unavailable("store unavailable: no answer in time".into()))
        });
        (self.record)(operation, started.elapsed());
        out
    }
}

#[async_trait]
impl RoleReads for MeasuredStore<dyn RoleReads> {
    async fn user_roles(&self, user: &UserId, min_revision: Revision) -> Result<Answer> {
        self.timed("user_roles", self.inner.user_roles(user, min_revision)).await
    }

    async fn user_roles_at_least(&self, user: &UserId, floor: Revision) -> Result<Answer> {
        self.timed("user_roles", self.inner.user_roles_at_least(user, floor)).await
    }
}

#[async_trait]
impl TenantReads for MeasuredStore<dyn TenantReads> {
    async fn list_members(
        &self,
        tenant: &TenantId,
        after: Option<&UserId>,
        limit: u32,
        now: UnixSeconds,
    ) -> Result<(Vec<Member>, Revision)> {
        self.timed("list_members", self.inner.list_members(tenant, after, limit, now)).await
    }

    async fn get_tenant(&self, id: &TenantId) -> Result<Tenant> {
        self.timed("get_tenant", self.inner.get_tenant(id)).await
    }

    async fn list_tenants(&self, after: Option<&TenantId>, limit: u32) -> Result<Vec<Tenant>> {
        self.timed("list_tenants", self.inner.list_tenants(after, limit)).await
    }

    async fn revision(&self) -> Result<Revision> {
        self.timed("revision", self.inner.revision()).await
    }

    async fn get_model(&self) -> Result<StoredModel> {
        self.timed("get_model", self.inner.get_model()).await
    }

    async fn revision_reaching(&self, at_least: Revision) -> Result<Revision> {
        self.timed("revision", self.inner.revision_reaching(at_least)).await
    }
}

#[async_trait]
impl Writes for MeasuredStore<dyn Writes> {
    async fn write_membership(&self, write: &MembershipWrite) -> Result<Revision> {
        self.timed("write_membership", self.inner.write_membership(write)).await
    }

    async fn create_tenant(&self, tenant: &Tenant, caller: &str) -> Result<(Revision, Tenant)> {
        self.timed("create_tenant", self.inner.create_tenant(tenant, caller)).await
    }

    async fn delete_tenant(&self, id: &TenantId, caller: &str) -> Result<Revision> {
        self.timed("delete_tenant", self.inner.delete_tenant(id, caller)).await
    }

    async fn set_model(&self, spec: &str, caller: &str) -> Result<Revision> {
        self.timed("set_model", self.inner.set_model(spec, caller)).await
    }

    async fn import_batch(
        &self,
        batch: &crate::store::ImportBatch,
    ) -> Result<crate::store::Imported> {
        self.timed("import_batch", self.inner.import_batch(batch)).await
    }
}

#[async_trait]
impl HistoryLog for MeasuredStore<dyn HistoryLog> {
    async fn changes_after(&self, after: Revision, limit: u32) -> Result<History> {
        self.timed("changes_after", self.inner.changes_after(after, limit)).await
    }

    async fn list_changes(
        &self,
        filter: &ChangeFilter,
        after: Revision,
        limit: u32,
    ) -> Result<Vec<HistoryEntry>> {
        self.timed("list_changes", self.inner.list_changes(filter, after, limit)).await
    }

    async fn prune_history(&self, older_than_ms: i64) -> Result<Revision> {
        self.timed("prune_history", self.inner.prune_history(older_than_ms)).await
    }

    async fn purge_deleted_tenants(&self) -> Result<u64> {
        self.timed("purge_deleted_tenants", self.inner.purge_deleted_tenants()).await
    }
}
