//! Paging for list calls: page sizes and opaque page tokens. Below both the API, which
//! hands tokens out, and a follower's client, which pages through its upstream's lists.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

use crate::error::{Error, Result};

/// Default and maximum page sizes for list RPCs.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// The largest page a list RPC returns.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// `page_size` validated: 0 means the default, above the maximum is invalid.
pub fn page_size(requested: u32) -> Result<u32> {
    match requested {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n <= MAX_PAGE_SIZE => Ok(n),
        n => Err(Error::invalid("page_size", format!("at most {MAX_PAGE_SIZE}, got {n}"))),
    }
}

/// An opaque page token: the last key of a page, tagged with what it pages over so a
/// token from one list is refused by another.
pub fn encode_page_token(kind: &str, last_key: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{kind}\n{last_key}"))
}

/// The last key inside a page token; empty token means the first page.
pub fn decode_page_token(kind: &str, token: &str) -> Result<Option<String>> {
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
