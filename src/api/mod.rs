//! The gRPC layer: one thin struct per proto service. Handlers validate input into
//! domain types, call the store, and convert the answer; no SQL or rules live here.

mod audit;
mod bulk;
mod issuing;
mod role_check;
mod tenants;
mod watch;

pub use issuing::{Issuing, SignHere};
pub use role_check::RoleCheckApi;
pub use tenants::TenantsApi;
pub use watch::{WatchHub, WatchLimits};

use prost_types::Timestamp;

use crate::{
    domain::{TenantId, UnixSeconds, now_unix},
    error::{Error, Result},
};

/// An expiry from the wire: unset means never; it must lie in the future. Sub-second
/// parts are dropped (rounding down, so a role never outlives what was asked).
fn parse_expiry(field: &str, expires_at: Option<&Timestamp>) -> Result<Option<UnixSeconds>> {
    let Some(ts) = expires_at else {
        return Ok(None);
    };
    if !(0..1_000_000_000).contains(&ts.nanos) {
        return Err(Error::invalid(field, "nanos must be within 0..1e9"));
    }
    if ts.seconds <= now_unix() {
        return Err(Error::invalid(field, "must be in the future"));
    }
    Ok(Some(ts.seconds))
}

fn timestamp_from_millis(ms: i64) -> Timestamp {
    Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 }
}

/// A tenant id where empty means the application tenant.
fn tenant_or_application(field: &str, value: &str, application: &TenantId) -> Result<TenantId> {
    if value.is_empty() { Ok(application.clone()) } else { TenantId::parse(field, value) }
}
