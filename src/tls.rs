//! TLS for the gRPC and HTTP listeners (rustls on aws-lc-rs). With `--tls-client-ca`, gRPC
//! clients must present a certificate from that CA (mTLS). The HTTP port serves only
//! public data (JWKS, probes, metrics), so it asks for no client certificate: kubelet
//! probes and token verifiers reach it with plain TLS. The certificate, key and CA files are
//! re-read when they change, so certificates rotate without a restart; a reload that
//! fails keeps the configuration in force and logs why. Each connection uses the
//! configuration current when it was accepted.

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinHandle,
};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        RootCertStore, ServerConfig,
        crypto::aws_lc_rs,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        server::WebPkiClientVerifier,
    },
    server::TlsStream,
};

use crate::{
    auth::PeerIdentity,
    error::{Error, Result},
};

/// Longest a client may take to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most handshakes in flight per listener; past it, the listener stops accepting until one
/// ends (the kernel's backlog holds the rest), so a flood of idle connections costs a
/// bounded amount of memory and CPU.
const MAX_HANDSHAKES: usize = 1024;

/// The TLS files and the configuration built from them.
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    configs: RwLock<Configs>,
}

/// The configurations in force: gRPC (client certificates as configured) and HTTP (none).
#[derive(Clone)]
struct Configs {
    grpc: Arc<ServerConfig>,
    http: Arc<ServerConfig>,
}

/// Which listener a connection arrives on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    /// The gRPC port.
    Grpc,
    /// The HTTP port.
    Http,
}

fn bad(path: &Path, what: &str) -> Error {
    Error::FailedPrecondition(format!("TLS: {}: {what}", path.display()))
}

impl Tls {
    /// Loads the certificate chain, key and optional client CA.
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Arc<Self>> {
        let configs = build_both(cert, key, client_ca)?;
        Ok(Arc::new(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            client_ca: client_ca.map(Path::to_owned),
            configs: RwLock::new(configs),
        }))
    }

    fn current(&self, port: Port) -> Arc<ServerConfig> {
        let configs = self.configs.read().map_or_else(|p| p.into_inner().clone(), |c| c.clone());
        match port {
            Port::Grpc => configs.grpc,
            Port::Http => configs.http,
        }
    }

    /// Rebuilds the configuration from the files; keeps the old one on failure.
    pub fn reload(&self) {
        match build_both(&self.cert, &self.key, self.client_ca.as_deref()) {
            Ok(configs) => {
                if let Ok(mut current) = self.configs.write() {
                    *current = configs;
                }
                tracing::info!("TLS certificates reloaded");
            }
            Err(err) => {
                tracing::error!(%err, "TLS reload failed; keeping the certificates in force")
            }
        }
    }

    /// Reloads whenever one of the files' modification time changes (polled).
    pub fn watch(self: &Arc<Self>, every: Duration) -> JoinHandle<()> {
        let tls = self.clone();
        tokio::spawn(async move {
            let stamp = |tls: &Tls| -> Vec<Option<SystemTime>> {
                [Some(&tls.cert), Some(&tls.key), tls.client_ca.as_ref()]
                    .into_iter()
                    .flatten()
                    .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
                    .collect()
            };
            let mut seen = stamp(&tls);
            loop {
                tokio::time::sleep(every).await;
                let now = stamp(&tls);
                if now != seen {
                    seen = now;
                    tls.reload();
                }
            }
        })
    }

    /// Accepts TLS connections on `listener`; handshakes run concurrently, at most
    /// `MAX_HANDSHAKES` (1024) at once and each for at most `HANDSHAKE_TIMEOUT` (5 s).
    pub fn incoming(self: &Arc<Self>, listener: TcpListener, port: Port) -> TlsIncoming {
        self.accept(listener, port, None)
    }

    /// [`incoming`](Self::incoming), with TCP keepalive probes every `keepalive` on each
    /// connection.
    pub fn incoming_with_keepalive(
        self: &Arc<Self>,
        listener: TcpListener,
        port: Port,
        keepalive: Duration,
    ) -> TlsIncoming {
        self.accept(listener, port, Some(keepalive))
    }

    fn accept(
        self: &Arc<Self>,
        listener: TcpListener,
        port: Port,
        keepalive: Option<Duration>,
    ) -> TlsIncoming {
        let local = listener.local_addr().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        let (tx, rx) = mpsc::channel(64);
        let tls = self.clone();
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        let task = tokio::spawn(async move {
            loop {
                let Ok(slot) = handshakes.clone().acquire_owned().await else { return };
                let (tcp, addr) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        tracing::debug!(%err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                if let Some(every) = keepalive {
                    let probes = socket2::TcpKeepalive::new().with_time(every).with_interval(every);
                    let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&probes);
                }
                let acceptor = TlsAcceptor::from(tls.current(port));
                let tx = tx.clone();
                tokio::spawn(async move {
                    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
                    let handshake = handshake.await;
                    drop(slot);
                    match handshake {
                        Ok(Ok(stream)) => {
                            let peer = identity(&stream);
                            let _ = tx.send(TlsConn { stream, peer, addr }).await;
                        }
                        Ok(Err(err)) => tracing::debug!(%err, %addr, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
                    }
                });
            }
        });
        TlsIncoming { rx, local, task }
    }
}

fn build_both(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Configs> {
    Ok(Configs {
        grpc: Arc::new(build(cert, key, client_ca)?),
        http: Arc::new(build(cert, key, None)?),
    })
}

fn build(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<ServerConfig> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|_| bad(cert, "cannot read certificates"))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| bad(cert, "not a PEM certificate chain"))?;
    if chain.is_empty() {
        return Err(bad(cert, "no certificate in the file"));
    }
    let private =
        PrivateKeyDer::from_pem_file(key).map_err(|_| bad(key, "not a PEM private key"))?;
    let provider = Arc::new(aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|err| Error::FailedPrecondition(format!("TLS: {err}")))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca).map_err(|_| bad(ca, "cannot read"))? {
                roots.add(cert.map_err(|_| bad(ca, "not PEM"))?).map_err(|_| bad(ca, "bad CA"))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|err| Error::FailedPrecondition(format!("TLS client CA: {err}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, private)
        .map_err(|err| Error::FailedPrecondition(format!("TLS: {err}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The identity of the verified client certificate, from structured fields: the one CN
/// attribute of the subject (none when there are several or it is not a string), and the
/// DNS and URI subject alternative names. Nothing is taken from a rendered subject.
fn identity(stream: &TlsStream<TcpStream>) -> PeerIdentity {
    let Some(der) = stream.get_ref().1.peer_certificates().and_then(|c| c.first()) else {
        return PeerIdentity::default();
    };
    peer_identity(der.as_ref())
}

/// The identity of a DER certificate.
pub fn peer_identity(der: &[u8]) -> PeerIdentity {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return PeerIdentity::default();
    };
    let mut cns = cert.subject().iter_common_name();
    let cn = match (cns.next(), cns.next()) {
        (Some(only), None) => only.as_str().ok().map(str::to_owned),
        _ => None,
    };
    let (mut dns, mut uris) = (Vec::new(), Vec::new());
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => dns.push((*d).to_owned()),
                GeneralName::URI(u) => uris.push((*u).to_owned()),
                _ => {}
            }
        }
    }
    PeerIdentity { cn, dns, uris }
}

/// An accepted TLS connection.
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    peer: PeerIdentity,
    addr: SocketAddr,
}

impl TlsConn {
    /// The client's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl crate::http::ClientCertificate for TlsConn {
    fn client_certificate(&self) -> Option<PeerIdentity> {
        Some(self.peer.clone()).filter(|peer| !peer.is_empty())
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerIdentity;

    fn connect_info(&self) -> PeerIdentity {
        self.peer.clone()
    }
}

/// Handshaken TLS connections, for tonic (a `Stream`) and axum (a `Listener`).
pub struct TlsIncoming {
    rx: mpsc::Receiver<TlsConn>,
    local: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl futures::Stream for TlsIncoming {
    type Item = io::Result<TlsConn>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|conn| conn.map(Ok))
    }
}

impl axum::serve::Listener for TlsIncoming {
    type Io = TlsConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TlsConn, SocketAddr) {
        match self.rx.recv().await {
            Some(conn) => {
                let addr = conn.addr;
                (conn, addr)
            }
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}
