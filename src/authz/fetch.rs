//! One HTTP GET for a JWK Set, over hyper's HTTP/1 client connection: `http://` on TCP,
//! `https://` through rustls with the system's root certificates. The caller bounds the
//! time; the body is bounded here.

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of `GET url`, at most `max_bytes`; any status but 200 is an error.
pub async fn get(url: &http::Uri, max_bytes: usize) -> Result<Bytes, BoxError> {
    let host = url.host().ok_or("no host in the URL")?;
    let https = url.scheme_str() == Some("https");
    let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = TcpStream::connect((host.trim_matches(['[', ']']), port)).await?;
    let path = url.path_and_query().map_or("/", |p| p.as_str());
    let authority = url.authority().map_or(host, |a| a.as_str());
    let request = http::Request::get(path)
        .header(http::header::HOST, authority)
        .header(http::header::ACCEPT, "application/jwk-set+json, application/json")
        .body(Empty::<Bytes>::new())?;
    let response = if https {
        let tls = tls_connector()?;
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_owned())?;
        let stream = tls.connect(name, tcp).await?;
        send(TokioIo::new(stream), request).await?
    } else {
        send(TokioIo::new(tcp), request).await?
    };
    if response.status() != http::StatusCode::OK {
        return Err(format!("answered {}", response.status()).into());
    }
    let body = Limited::new(response.into_body(), max_bytes).collect().await?;
    Ok(body.to_bytes())
}

async fn send<T>(
    io: T,
    request: http::Request<Empty<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, BoxError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(connection);
    Ok(sender.send_request(request).await?)
}

fn tls_connector() -> Result<tokio_rustls::TlsConnector, BoxError> {
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        tokio_rustls::rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)))
}
