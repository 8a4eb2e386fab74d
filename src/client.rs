//! A client's way to a rolecheck server: the channel (`http://`, `https://` with the
//! system roots or a CA and an optional client certificate, or `unix:/path`) and the
//! bearer key every call carries. A follower reaches its upstream this way, and the
//! command line its server.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::error::{Error, Result};

/// The settings' names, for errors that say which to fix.
#[derive(Clone, Copy, Debug)]
pub struct Flags {
    pub url: &'static str,
    pub ca: &'static str,
    pub cert: &'static str,
    pub cert_key: &'static str,
    pub key_file: &'static str,
}

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct Target<'a> {
    pub url: &'a str,
    pub ca: Option<&'a Path>,
    pub cert: Option<(&'a Path, &'a Path)>,
    /// Longest one call, and the connection, may take.
    pub timeout: Duration,
    /// HTTP/2 keepalive pings this often (and a connection unanswered for as long is
    /// dropped), even while idle; `None`: none.
    pub keepalive: Option<Duration>,
    pub flags: Flags,
}

/// The file at `path`, or `FAILED_PRECONDITION` naming the setting `what`.
pub fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|err| {
        Error::FailedPrecondition(format!("cannot read {what} {}: {err}", path.display()))
    })
}

/// A channel to `target`, connected lazily (a server that is down is retried by every
/// call).
pub fn channel(target: &Target<'_>) -> Result<Channel> {
    let bad = |why: String| Error::invalid(target.flags.url, why);
    if let Some(path) = target.url.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        return Ok(Endpoint::from_static("http://rolecheck.invalid").connect_with_connector_lazy(
            tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }),
        ));
    }
    let mut endpoint = Endpoint::from_shared(target.url.to_owned())
        .map_err(|_| bad("not an http(s):// or unix: URL".into()))?
        .timeout(target.timeout)
        .connect_timeout(target.timeout);
    if let Some(every) = target.keepalive {
        endpoint = endpoint
            .http2_keep_alive_interval(every)
            .keep_alive_timeout(every)
            .keep_alive_while_idle(true);
    }
    match endpoint.uri().scheme_str() {
        Some("https") => {
            let mut tls = ClientTlsConfig::new().with_native_roots();
            if let Some(ca) = target.ca {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca, target.flags.ca)?));
            }
            if let Some((cert, key)) = target.cert {
                tls = tls.identity(Identity::from_pem(
                    read(cert, target.flags.cert)?,
                    read(key, target.flags.cert_key)?,
                ));
            }
            endpoint = endpoint.tls_config(tls).map_err(|err| bad(err.to_string()))?;
        }
        Some("http") => {}
        _ => return Err(bad("not an http(s):// or unix: URL".into())),
    }
    Ok(endpoint.connect_lazy())
}

/// Adds a bearer key to every call.
#[derive(Clone, Debug)]
pub struct Credentials(Option<MetadataValue<Ascii>>);

impl Credentials {
    /// The key in the file at `key_file` (none without one); `flag` names the setting.
    pub fn from_file(key_file: Option<&Path>, flag: &str) -> Result<Self> {
        let Some(path) = key_file else { return Ok(Self(None)) };
        let bad = |why: &str| Error::invalid(flag, why);
        let secret =
            String::from_utf8(read(path, flag)?).map_err(|_| bad("the key file is not text"))?;
        let value = format!("Bearer {}", secret.trim())
            .parse()
            .map_err(|_| bad("the key file must hold one printable secret"))?;
        Ok(Self(Some(value)))
    }
}

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, mut request: Request<()>) -> std::result::Result<Request<()>, Status> {
        if let Some(key) = &self.0 {
            request.metadata_mut().insert("authorization", key.clone());
        }
        Ok(request)
    }
}
