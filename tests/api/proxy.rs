//! A TCP proxy between servers and Postgres that a test can cut and restore: a real
//! outage (or restart, as clients see it) without touching the machine's Postgres.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::{net::TcpListener, task::AbortHandle};

use crate::helpers::admin_url;

/// Forwards TCP to Postgres until cut; while cut, drops every connection.
pub struct Proxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Proxy {
    /// A proxy to the test Postgres (`DATABASE_URL`).
    pub async fn start() -> Self {
        let (upstream, _) = split_url(&admin_url(), "127.0.0.1:1".parse().expect("addr"));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let cut = Arc::new(AtomicBool::new(false));
        let live = Arc::new(Mutex::new(Vec::new()));
        let (cut2, live2) = (cut.clone(), live.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if cut2.load(Ordering::SeqCst) {
                    continue; // dropped: connection closed at once
                }
                let upstream = upstream.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                live2.lock().expect("lock").push(task.abort_handle());
            }
        });
        Self { addr, cut, live }
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for task in self.live.lock().expect("lock").drain(..) {
            task.abort();
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// `host:port` and the URL through `proxy` for a database URL `postgres://user@host:port/db`.
fn split_url(url: &str, proxy: SocketAddr) -> (String, String) {
    let (scheme_user, rest) = url.split_once('@').expect("URL with user@host");
    let (host_port, path) = rest.split_once('/').expect("URL with a path");
    (host_port.to_owned(), format!("{scheme_user}@{proxy}/{path}"))
}

impl Proxy {
    /// `url` (a database on the test Postgres) routed through this proxy.
    pub fn url_through(&self, url: &str) -> String {
        split_url(url, self.addr).1
    }
}
