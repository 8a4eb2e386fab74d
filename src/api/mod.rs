//! The gRPC layer: one thin struct per proto service. Handlers validate input into
//! domain types, call the store, and convert the answer; no SQL or rules live here.

mod audit;
mod role_check;
mod tenants;
mod watch;

pub use role_check::RoleCheckApi;
pub use tenants::TenantsApi;
pub use watch::{WatchHub, WatchLimits};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use prost_types::Timestamp;

use crate::{
    domain::{TenantId, UnixSeconds, now_unix},
    error::{Error, Result},
};

/// Default and maximum page sizes for list RPCs.
const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 1000;

/// `page_size` validated: 0 means the default, above the maximum is invalid.
fn page_size(requested: u32) -> Result<u32> {
    match requested {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n <= MAX_PAGE_SIZE => Ok(n),
        n => Err(Error::invalid("page_size", format!("at most {MAX_PAGE_SIZE}, got {n}"))),
    }
}

/// An opaque page token: the last key of a page, tagged with what it pages over so a
/// token from one list is refused by another.
pub(crate) fn encode_page_token(kind: &str, last_key: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{kind}\n{last_key}"))
}

/// The last key inside a page token; empty token means the first page.
fn decode_page_token(kind: &str, token: &str) -> Result<Option<String>> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || Error::invalid("page_token", "not a token this list returned");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (tag, key) = text.split_once('\n').ok_or_else(bad)?;
    if tag != kind {
        return Err(bad());
    }
    Ok(Some(key.to_owned()))
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_are_bound_to_their_list() {
        let token = encode_page_token("members", "user-7");
        assert_eq!(decode_page_token("members", &token).unwrap().as_deref(), Some("user-7"));
        assert!(decode_page_token("tenants", &token).is_err());
        assert!(decode_page_token("members", "%%%").is_err());
        assert_eq!(decode_page_token("members", "").unwrap(), None);
    }
}
