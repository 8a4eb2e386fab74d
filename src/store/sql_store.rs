//! The one implementation of [`Store`](crate::store::Store) over the shared SQL in
//! `sql.rs`, expanded for each backend's pool type. A backend provides `read_pool()`,
//! `write_pool()`, `application_id()`, `read_user()`, `write_member()`, `write_guard()`,
//! `lock_first()`, `record()`, `announcer()`, `fault_after_commit()`,
//! `feed()` and `migrator()`.

/// Implements [`crate::store::Store`] for a backend struct over sqlx database `$db`.
macro_rules! sql_store {
    ($store:ty, $db:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::Store for $store {
            async fn user_roles(
                &self,
                user: &$crate::domain::UserId,
                min_revision: $crate::domain::Revision,
            ) -> $crate::error::Result<$crate::store::Answer> {
                let snapshot = self.read_user(user).await?;
                $crate::store::check_min_revision(snapshot.revision, min_revision)?;
                Ok($crate::store::Answer::new(std::sync::Arc::new(snapshot)))
            }

            async fn write_membership(
                &self,
                write: &$crate::store::MembershipWrite,
            ) -> $crate::error::Result<$crate::domain::Revision> {
                self.write_member(write).await
            }

            async fn list_members(
                &self,
                tenant: &$crate::domain::TenantId,
                after: Option<&$crate::domain::UserId>,
                limit: u32,
                now: $crate::domain::UnixSeconds,
            ) -> $crate::error::Result<(Vec<$crate::store::Member>, $crate::domain::Revision)> {
                let rows: Vec<$crate::store::sql::MemberRow> =
                    sqlx::query_as($crate::store::sql::LIST_MEMBERS)
                        .bind(tenant.as_str())
                        .bind(after.map_or("", |user| user.as_str()))
                        .bind(now)
                        .bind(i64::from(limit))
                        .fetch_all(self.read_pool())
                        .await?;
                Ok($crate::store::sql::members_from(rows))
            }

            async fn create_tenant(
                &self,
                tenant: &$crate::store::Tenant,
                caller: &str,
            ) -> $crate::error::Result<$crate::domain::Revision> {
                let serial = self.write_guard().await?;
                let mut tx = self.write_pool().begin().await?;
                self.lock_first(&mut tx).await?;
                let inserted = sqlx::query($crate::store::sql::INSERT_TENANT)
                    .bind(tenant.id.as_str())
                    .bind(tenant.name.as_str())
                    .bind(tenant.created_at_ms)
                    .execute(&mut *tx)
                    .await;
                match inserted.map_err($crate::error::Error::from) {
                    Err($crate::error::Error::AlreadyExists(_)) => {
                        return Err($crate::error::Error::AlreadyExists(format!(
                            "tenant {} already exists",
                            tenant.id
                        )));
                    }
                    other => other?,
                };
                let change = $crate::store::ChangeRef {
                    kind: $crate::store::ChangeKind::TenantCreated,
                    tenant: tenant.id.as_str(),
                    user: "",
                    caller,
                };
                self.finish_write(tx, change, serial).await
            }

            async fn get_tenant(
                &self,
                id: &$crate::domain::TenantId,
            ) -> $crate::error::Result<$crate::store::Tenant> {
                let row: Option<(String, String, i64)> =
                    sqlx::query_as($crate::store::sql::GET_TENANT)
                        .bind(id.as_str())
                        .fetch_optional(self.read_pool())
                        .await?;
                row.map($crate::store::tenant_from_row)
                    .ok_or_else(|| $crate::error::Error::NotFound(format!("tenant {id} not found")))
            }

            async fn list_tenants(
                &self,
                after: Option<&$crate::domain::TenantId>,
                limit: u32,
            ) -> $crate::error::Result<Vec<$crate::store::Tenant>> {
                let rows: Vec<(String, String, i64)> =
                    sqlx::query_as($crate::store::sql::LIST_TENANTS)
                        .bind(after.map_or("", |id| id.as_str()))
                        .bind(i64::from(limit))
                        .fetch_all(self.read_pool())
                        .await?;
                Ok(rows.into_iter().map($crate::store::tenant_from_row).collect())
            }

            async fn delete_tenant(
                &self,
                id: &$crate::domain::TenantId,
                caller: &str,
            ) -> $crate::error::Result<$crate::domain::Revision> {
                use $crate::store::sql;
                if id == self.application_id() {
                    return Err($crate::error::Error::FailedPrecondition(format!(
                        "tenant {id} is the application tenant and cannot be deleted"
                    )));
                }
                let serial = self.write_guard().await?;
                let mut tx = self.write_pool().begin().await?;
                self.lock_first(&mut tx).await?;
                sqlx::query(sql::DELETE_TENANT_MEMBERS).bind(id.as_str()).execute(&mut *tx).await?;
                let deleted =
                    sqlx::query(sql::DELETE_TENANT).bind(id.as_str()).execute(&mut *tx).await?;
                if deleted.rows_affected() == 0 {
                    return Err($crate::error::Error::NotFound(format!("tenant {id} not found")));
                }
                let change = $crate::store::ChangeRef {
                    kind: $crate::store::ChangeKind::TenantDeleted,
                    tenant: id.as_str(),
                    user: "",
                    caller,
                };
                self.finish_write(tx, change, serial).await
            }

            async fn revision(&self) -> $crate::error::Result<$crate::domain::Revision> {
                let (revision,): (i64,) = sqlx::query_as($crate::store::sql::REVISION)
                    .fetch_one(self.read_pool())
                    .await?;
                Ok(revision as $crate::domain::Revision)
            }

            async fn close(&self) {
                self.write_pool().close().await;
                self.read_pool().close().await;
            }

            async fn subscribe(&self) -> $crate::error::Result<$crate::store::Feed> {
                self.feed().await
            }

            async fn changes_after(
                &self,
                after: $crate::domain::Revision,
                limit: u32,
            ) -> $crate::error::Result<$crate::store::History> {
                let rows: Vec<$crate::store::sql::ChangeRow> =
                    sqlx::query_as($crate::store::sql::CHANGES_AFTER)
                        .bind(after as i64)
                        .bind(i64::from(limit))
                        .fetch_all(self.read_pool())
                        .await?;
                Ok($crate::store::sql::history_from(rows))
            }

            async fn list_changes(
                &self,
                filter: &$crate::store::ChangeFilter,
                after: $crate::domain::Revision,
                limit: u32,
            ) -> $crate::error::Result<Vec<$crate::store::HistoryEntry>> {
                let sql = $crate::store::sql::list_changes_sql(filter);
                let mut query =
                    sqlx::query_as::<_, $crate::store::sql::AuditRow>(&sql).bind(after as i64);
                for value in [&filter.tenant_id, &filter.user_id, &filter.caller] {
                    if !value.is_empty() {
                        query = query.bind(value.as_str());
                    }
                }
                let rows = query.bind(i64::from(limit)).fetch_all(self.read_pool()).await?;
                Ok($crate::store::sql::audit_from(rows))
            }

            async fn prune_history(
                &self,
                older_than_ms: i64,
            ) -> $crate::error::Result<$crate::domain::Revision> {
                use $crate::store::sql;
                let mut tx = self.write_pool().begin().await?;
                let (floor,): (Option<i64>,) = sqlx::query_as(sql::PRUNE_FLOOR)
                    .bind(older_than_ms)
                    .fetch_one(&mut *tx)
                    .await?;
                let Some(floor) = floor else { return Ok(0) };
                sqlx::query(sql::PRUNE_CHANGES).bind(floor).execute(&mut *tx).await?;
                sqlx::query(sql::RAISE_FLOOR).bind(floor).execute(&mut *tx).await?;
                tx.commit().await?;
                Ok(floor as $crate::domain::Revision)
            }
        }

        impl $store {
            /// Without migrating: refuses a schema newer than this binary knows, or one
            /// that still needs `rolecheck migrate`.
            pub async fn check_schema(&self) -> $crate::error::Result<()> {
                let known = self.migrator().iter().map(|m| m.version).max().unwrap_or(0);
                // No migrations table means a fresh database ("run migrate"); any other
                // failure (an unreachable database) is itself: UNAVAILABLE, retried at start.
                let applied: (Option<i64>,) =
                    match sqlx::query_as("SELECT max(version) FROM _sqlx_migrations WHERE success")
                        .fetch_one(self.read_pool())
                        .await
                    {
                        Ok(row) => row,
                        Err(sqlx::Error::Database(db))
                            if db.code().as_deref() == Some("42P01")
                                || db.message().contains("no such table") =>
                        {
                            (None,)
                        }
                        Err(err) => return Err(err.into()),
                    };
                match applied.0 {
                    Some(version) if version > known => Err($crate::error::Error::FailedPrecondition(format!(
                        "the database schema is at version {version}, newer than this rolecheck \
                         knows ({known}): upgrade rolecheck"
                    ))),
                    Some(version) if version == known => Ok(()),
                    _ => Err($crate::error::Error::FailedPrecondition(format!(
                        "the database schema is behind this rolecheck (needs version {known}): \
                         run `rolecheck migrate`"
                    ))),
                }
            }

            /// A membership write as a transaction of single statements (the embedded
            /// store's way; Postgres batches its writes into one call, see postgres/writer.rs).
            #[allow(dead_code)]
            async fn write_in_steps(
                &self,
                write: &$crate::store::MembershipWrite,
            ) -> $crate::error::Result<$crate::domain::Revision> {
                use $crate::store::{WriteKind, sql};
                let serial = self.write_guard().await?;
                let mut tx = self.write_pool().begin().await?;
                let exists: Option<(i32,)> = sqlx::query_as(sql::TENANT_EXISTS)
                    .bind(write.tenant.as_str())
                    .fetch_optional(&mut *tx)
                    .await?;
                if exists.is_none() {
                    // A Revoke there changes nothing and succeeds (a retry after
                    // DeleteTenant is not an error), answering the current revision.
                    if write.kind == WriteKind::Revoke {
                        let (revision,): (i64,) =
                            sqlx::query_as(sql::REVISION).fetch_one(&mut *tx).await?;
                        return Ok(revision as $crate::domain::Revision);
                    }
                    return Err($crate::error::Error::NotFound(format!(
                        "tenant {} not found",
                        write.tenant
                    )));
                }
                let remove_all = match write.kind {
                    WriteKind::SetRoles => true,
                    WriteKind::Revoke => write.roles.is_empty(),
                    WriteKind::Grant => false,
                };
                if remove_all {
                    sqlx::query(sql::DELETE_MEMBER)
                        .bind(write.tenant.as_str())
                        .bind(write.user.as_str())
                        .execute(&mut *tx)
                        .await?;
                } else if write.kind == WriteKind::Revoke {
                    let mut query = sqlx::QueryBuilder::<$db>::new(sql::DELETE_ROLES_PREFIX);
                    query.push_bind(write.tenant.as_str());
                    query.push(" AND user_id = ").push_bind(write.user.as_str());
                    query.push(" AND role IN (");
                    let mut roles = query.separated(", ");
                    for role in &write.roles {
                        roles.push_bind(role.as_str());
                    }
                    query.push(")");
                    query.build().execute(&mut *tx).await?;
                }
                if write.kind != WriteKind::Revoke && !write.roles.is_empty() {
                    let mut query = sqlx::QueryBuilder::<$db>::new(sql::UPSERT_ROLES_PREFIX);
                    query.push_values(&write.roles, |mut row, role| {
                        row.push_bind(write.tenant.as_str())
                            .push_bind(write.user.as_str())
                            .push_bind(role.as_str())
                            .push_bind(write.expires_at);
                    });
                    query.push(sql::UPSERT_ROLES_SUFFIX);
                    query.build().execute(&mut *tx).await?;
                }
                let change = $crate::store::ChangeRef {
                    kind: $crate::store::ChangeKind::Membership,
                    tenant: write.tenant.as_str(),
                    user: write.user.as_str(),
                    caller: &write.caller,
                };
                self.finish_write(tx, change, serial).await
            }

            /// Ends every write the same way: the backend's `record` bumps the revision row
            /// (its lock orders revisions as commits), records the change in the history and
            /// announces it; then the transaction commits.
            ///
            /// Once the change is recorded, the outcome is decided: COMMIT and the
            /// announcement run on a task of their own, so a caller that goes away (a
            /// deadline, a reset stream) cannot leave a committed write unannounced. Before
            /// that, a caller that goes away rolls the transaction back. The write lock
            /// (`serial`) is held until the announcement, so announcements keep revision
            /// order.
            async fn finish_write(
                &self,
                mut tx: sqlx::Transaction<'static, $db>,
                change: $crate::store::ChangeRef<'_>,
                serial: Option<tokio::sync::OwnedMutexGuard<()>>,
            ) -> $crate::error::Result<$crate::domain::Revision> {
                use $crate::store::sql;
                // The roles after this change. Read before the revision is taken, which
                // keeps the section holding the revision lock to `record` and COMMIT: no
                // other write to this membership can commit in between, because the
                // stepwise membership write runs under the write guard (SQLite only;
                // Postgres writes memberships in `rolecheck_apply`).
                let roles = if change.kind == $crate::store::ChangeKind::Membership {
                    let rows: Vec<(String,)> = sqlx::query_as(sql::ROLES_AFTER)
                        .bind(change.tenant)
                        .bind(change.user)
                        .bind($crate::domain::now_unix())
                        .fetch_all(&mut *tx)
                        .await?;
                    rows.into_iter().map(|(role,)| role).collect::<Vec<_>>().join(",")
                } else {
                    String::new()
                };
                let revision = self.record(&mut tx, &change, roles).await?;
                let announcer = self.announcer();
                let fault = self.fault_after_commit();
                let subject = match change.kind {
                    $crate::store::ChangeKind::Membership => change.user,
                    _ => change.tenant,
                };
                let (kind, subject) = (change.kind, subject.to_owned());
                let decided = tokio::spawn(async move {
                    let _serial = serial;
                    tx.commit().await?;
                    if let Some(delay) = fault {
                        tokio::time::sleep(delay).await;
                    }
                    announcer.committed(revision, kind, &subject);
                    Ok::<_, $crate::error::Error>(revision)
                });
                decided.await.map_err(|err| $crate::error::Error::Internal(Box::new(err)))?
            }

            /// Creates the application tenant if it does not exist yet. Not a write:
            /// the application tenant is part of the schema's starting state.
            pub async fn ensure_application_tenant(
                &self,
                id: &$crate::domain::TenantId,
            ) -> $crate::error::Result<()> {
                sqlx::query($crate::store::sql::ENSURE_TENANT)
                    .bind(id.as_str())
                    .bind("Application")
                    .bind($crate::domain::now_millis())
                    .execute(self.write_pool())
                    .await?;
                Ok(())
            }
        }
    };
}

pub(crate) use sql_store;
