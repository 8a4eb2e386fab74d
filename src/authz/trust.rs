//! Who may ask for a proxy decision. The answer says whether a user holds a role and,
//! when allowed, which roles they hold, so only the proxy may ask:
//!
//! - a key with the `proxy` scope: for forward-auth in the [`KEY_HEADER`] header that
//!   the proxy's config sets (overwriting any copy the client sent); for ext_authz as
//!   `authorization: Bearer` metadata (checked by `crate::auth::AuthLayer`);
//! - a client certificate the key file lists with the `proxy` scope (mTLS);
//! - anyone, on listeners the operator declares private (`--authz-private-listener`),
//!   which the server accepts only on loopback or a unix socket;
//! - anyone, when no key file is given, which the server accepts only on loopback (or
//!   with `--insecure-no-auth`), and never with a trusted-header identity: a header any
//!   local process can send must not name the user ([`start_check`]).
//!
//! Anyone else gets 401 (a known key without the scope: 403), with no `x-rolecheck-*`
//! header and nothing about any user.

use http::HeaderMap;

use crate::{
    auth::{Keys, PeerIdentity, Scope},
    error::{Error, Result},
};

/// The header a proxy's forward-auth config sets to the proxy's key.
pub const KEY_HEADER: &str = "x-rolecheck-key";

/// Why a forward-auth caller is not answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Untrusted {
    /// No key and no listed certificate: 401.
    Unauthenticated,
    /// A known key or certificate without the `proxy` scope: 403.
    LacksScope,
}

/// Decides whether a forward-auth caller is the proxy.
#[derive(Clone, Debug)]
pub struct ProxyTrust {
    keys: Keys,
    private: bool,
}

impl ProxyTrust {
    /// Callers proven by `keys`; `private`: the listeners are declared private.
    pub fn new(keys: Keys, private: bool) -> Self {
        Self { keys, private }
    }

    /// Whether anyone who reaches the listener is answered (no proof asked).
    pub fn anonymous(&self) -> bool {
        self.private || !self.keys.enabled()
    }

    /// Whether a forward-auth request with `headers`, on a connection whose client
    /// certificate is `peer`, comes from the proxy.
    pub fn forward_auth(
        &self,
        headers: &HeaderMap,
        peer: Option<&PeerIdentity>,
    ) -> std::result::Result<(), Untrusted> {
        if self.anonymous() {
            return Ok(());
        }
        let ring = self.keys.current();
        let mut keys = headers.get_all(KEY_HEADER).iter();
        let caller = match (keys.next(), keys.next()) {
            (Some(_), Some(_)) => return Err(Untrusted::Unauthenticated),
            (Some(secret), None) => {
                let secret = secret.to_str().map_err(|_| Untrusted::Unauthenticated)?;
                ring.authenticate(secret.trim()).ok_or(Untrusted::Unauthenticated)?
            }
            (None, _) => match peer.filter(|peer| !peer.is_empty()) {
                Some(peer) => ring.certificate(peer).ok_or(Untrusted::Unauthenticated)?,
                None => return Err(Untrusted::Unauthenticated),
            },
        };
        if caller.may(Scope::Proxy) { Ok(()) } else { Err(Untrusted::LacksScope) }
    }
}

/// How the server is exposed, for the start-up checks.
#[derive(Debug, Clone, Copy)]
pub struct Exposure {
    /// A key file was given.
    pub keys: bool,
    /// `--authz-private-listener`.
    pub private: bool,
    /// The gRPC listener is loopback or a unix socket.
    pub grpc_local: bool,
    /// The HTTP listener is loopback.
    pub http_local: bool,
    /// `--insecure-no-auth`.
    pub insecure: bool,
}

impl Exposure {
    /// How `config` exposes the listeners (`keys`: whether a key file was given).
    pub fn of(config: &crate::config::Config, keys: bool) -> Self {
        Self {
            keys,
            private: config.authz_private_listener,
            grpc_local: config.listen.is_local_only(),
            http_local: config.http_listen.ip().is_loopback(),
            insecure: config.insecure_no_auth,
        }
    }
}

/// Refuses a start that would answer proxy decisions to callers that cannot be told
/// from the proxy, with what to change.
pub fn start_check(exposure: Exposure, header_identity: bool) -> Result<()> {
    if exposure.private && !(exposure.grpc_local && exposure.http_local) {
        return Err(Error::FailedPrecondition(
            "--authz-private-listener declares that only the proxy can reach rolecheck's \
             listeners, which holds only on loopback or a unix socket: listen there (--listen, \
             --http-listen), or give the proxy a key with the `proxy` scope instead"
                .into(),
        ));
    }
    if !exposure.keys && !exposure.http_local && !exposure.insecure {
        return Err(Error::FailedPrecondition(
            "refusing forward-auth at /authz on a non-loopback --http-listen without API keys: \
             anyone who reaches the port would get decisions; give the proxy a key with the \
             `proxy` scope (--api-keys-file), or listen on loopback"
                .into(),
        ));
    }
    header_identity_check(exposure, header_identity)
}

/// Refuses a trusted-header identity that an anonymous caller on a shared port could
/// send (at start, and on every policy reload).
pub fn header_identity_check(exposure: Exposure, header_identity: bool) -> Result<()> {
    if header_identity && !exposure.keys && !exposure.private {
        return Err(Error::FailedPrecondition(
            "[identity] header names the user from a request header, and with no API keys \
             any process that reaches the port could send it and read that user's roles: give \
             the proxy a key with the `proxy` scope (--api-keys-file), or declare the listeners \
             private to the proxy (--authz-private-listener)"
                .into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exposure(keys: bool, private: bool, local: bool) -> Exposure {
        Exposure { keys, private, grpc_local: local, http_local: local, insecure: false }
    }

    #[test]
    fn a_header_identity_is_never_open_to_anonymous_callers_on_a_shared_port() {
        assert!(start_check(exposure(false, false, true), true).is_err(), "no keys, loopback");
        assert!(start_check(exposure(false, true, true), true).is_ok(), "declared private");
        assert!(start_check(exposure(true, false, false), true).is_ok(), "keys");
        assert!(start_check(exposure(false, false, true), false).is_ok(), "JWT only, loopback");
        assert!(start_check(exposure(false, false, false), false).is_err(), "no keys, shared");
        assert!(start_check(exposure(true, true, false), false).is_err(), "private, shared");
        let insecure = Exposure { insecure: true, ..exposure(false, false, false) };
        assert!(start_check(insecure, false).is_ok());
        assert!(start_check(insecure, true).is_err(), "--insecure-no-auth is no excuse");
    }
}
