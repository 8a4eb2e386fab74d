//! Where the gRPC port listens: a TCP address, or `unix:/path` for the sidecar pattern
//! (the app and rolecheck share an `emptyDir`; nothing else can reach the socket).

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr};

use tokio::net::{TcpListener, UnixListener};

use crate::error::{Error, Result};

/// A gRPC listen address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A unix domain socket path.
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.strip_prefix("unix:") {
            Some("") => Err("unix: needs a socket path".into()),
            Some(path) => Ok(ListenAddr::Unix(PathBuf::from(path))),
            None => s
                .parse()
                .map(ListenAddr::Tcp)
                .map_err(|_| format!("{s:?} is neither host:port nor unix:/path")),
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl ListenAddr {
    /// Whether this is a unix socket path.
    pub fn is_unix(&self) -> bool {
        matches!(self, ListenAddr::Unix(_))
    }

    /// Whether only this machine can connect: loopback TCP or a unix socket.
    pub fn is_local_only(&self) -> bool {
        match self {
            ListenAddr::Tcp(addr) => addr.ip().is_loopback(),
            ListenAddr::Unix(_) => true,
        }
    }
}

/// A bound gRPC listener.
pub enum GrpcListener {
    /// TCP.
    Tcp(TcpListener),
    /// A unix socket (the server removes the file when it stops).
    Unix(UnixListener, PathBuf),
}

impl GrpcListener {
    /// Binds `addr`. A unix socket file left by a previous run is replaced, and the new
    /// one gets `mode` permissions (e.g. 0o660: owner and group may connect).
    pub async fn bind(addr: &ListenAddr, mode: u32) -> Result<Self> {
        let fail = |err: std::io::Error| cannot_listen(addr, "--listen", &err);
        match addr {
            ListenAddr::Tcp(socket) => {
                Ok(GrpcListener::Tcp(TcpListener::bind(socket).await.map_err(fail)?))
            }
            ListenAddr::Unix(path) => {
                use std::os::unix::fs::{FileTypeExt, PermissionsExt};
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                    std::fs::remove_file(path).map_err(fail)?;
                }
                let listener = UnixListener::bind(path).map_err(fail)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                    .map_err(fail)?;
                Ok(GrpcListener::Unix(listener, path.clone()))
            }
        }
    }

    /// The bound TCP address (port 0 resolved), if TCP.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            GrpcListener::Tcp(listener) => listener.local_addr().ok(),
            GrpcListener::Unix(..) => None,
        }
    }
}

/// A listener that could not be opened, with what to do about it.
pub fn cannot_listen(addr: &dyn std::fmt::Display, flag: &str, err: &std::io::Error) -> Error {
    let fix = match err.kind() {
        std::io::ErrorKind::AddrInUse => {
            format!(
                ": another process listens there (another rolecheck?); stop it, or choose another {flag}"
            )
        }
        std::io::ErrorKind::AddrNotAvailable => {
            format!(": no interface of this machine has that address; fix {flag}")
        }
        std::io::ErrorKind::PermissionDenied => {
            format!(": ports below 1024 need privileges; choose another {flag}")
        }
        _ => String::new(),
    };
    Error::FailedPrecondition(format!("cannot listen on {addr} ({flag}): {err}{fix}"))
}
