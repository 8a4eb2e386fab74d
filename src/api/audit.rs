//! `ListChanges`: the audit trail — who changed what, where, at which revision.

use super::timestamp_from_millis;
use crate::paging::{decode_page_token, encode_page_token, page_size};
use crate::{
    domain::{TenantId, UserId},
    error::{Error, Result},
    pb,
    store::{ChangeFilter, ChangeKind, HistoryEntry, HistoryLog},
};

/// One page of the audit trail matching `req`.
pub async fn list_changes(
    store: &dyn HistoryLog,
    req: &pb::ListChangesRequest,
) -> Result<pb::ListChangesResponse, tonic::Status> {
    let filter = ChangeFilter {
        tenant_id: optional(&req.tenant_id, |v| TenantId::parse("tenant_id", v).map(|_| ()))?,
        user_id: optional(&req.user_id, |v| UserId::parse("user_id", v).map(|_| ()))?,
        caller: req.caller.clone(),
    };
    let limit = page_size(req.page_size)?;
    let after = match decode_page_token("changes", &req.page_token)? {
        Some(last) => last
            .parse()
            .map_err(|_| Error::invalid("page_token", "not a token this list returned"))?,
        None => req.after_revision,
    };
    let mut entries = store.list_changes(&filter, after, limit + 1).await?;
    // Read after the page: a floor raised meanwhile is reported, never a stale one.
    let pruned_through = store.changes_after(after, 0).await?.pruned_through;
    let next_page_token = match whole_revisions(&mut entries, limit as usize) {
        true => entries
            .last()
            .map(|e| encode_page_token("changes", &e.revision.to_string()))
            .unwrap_or_default(),
        false => String::new(),
    };
    Ok(pb::ListChangesResponse {
        entries: entries
            .into_iter()
            .map(|entry| pb::AuditEntry {
                revision: entry.revision,
                committed_at: Some(timestamp_from_millis(entry.committed_at_ms)),
                change: Some(to_pb(entry)),
            })
            .collect(),
        next_page_token,
        pruned_through,
    })
}

/// Cuts `entries` (whole revisions, in order, read with a limit of `limit + 1`) to a page
/// of at most `limit` in whole revisions; whether more may follow. A revision of more
/// entries than a page (an import batch) makes a page of its own.
fn whole_revisions(entries: &mut Vec<HistoryEntry>, limit: usize) -> bool {
    let Some(beyond) = entries.get(limit).map(|entry| entry.revision) else { return false };
    let before = entries.iter().take_while(|entry| entry.revision < beyond).count();
    let keep = match before {
        0 => entries.iter().take_while(|entry| entry.revision == beyond).count(),
        before => before,
    };
    entries.truncate(keep);
    true
}

/// An optional filter field: empty, or valid per `check`.
fn optional(value: &str, check: impl FnOnce(&str) -> Result<()>) -> Result<String> {
    if !value.is_empty() {
        check(value)?;
    }
    Ok(value.to_owned())
}

fn kind(kind: ChangeKind) -> pb::ChangeKind {
    match kind {
        ChangeKind::Membership => pb::ChangeKind::Membership,
        ChangeKind::TenantCreated => pb::ChangeKind::TenantCreated,
        ChangeKind::TenantDeleted => pb::ChangeKind::TenantDeleted,
        ChangeKind::ModelChanged => pb::ChangeKind::ModelChanged,
    }
}

/// A history entry on the wire.
pub fn to_pb(entry: HistoryEntry) -> pb::Change {
    pb::Change {
        tenant_id: entry.tenant_id,
        user_id: entry.user_id,
        roles: entry.roles,
        kind: kind(entry.kind).into(),
        caller: entry.caller,
    }
}
