//! A TCP proxy between servers and Postgres (or a client and a server) that a test can
//! cut, silence and restore: a real outage, or a network that goes quiet, without
//! touching the machine's Postgres.
//!
//! - `cut`: every connection is closed and new ones are closed at once (a closed socket,
//!   the easy case).
//! - `silence`: every connection open now stops carrying bytes in both directions but
//!   stays open, and so does every connection made while silent (a failover behind a
//!   virtual IP, a dropped conntrack entry). `restore` lets new connections through; the
//!   silenced ones stay silent for good, so only a client that gives up on them recovers.
//! - `retarget`: new connections go to another target (a virtual IP moved to a promoted
//!   standby).
//! - `delay`: every byte from the target reaches the client that much later (a deep
//!   buffer on the way: whatever the target sends waits behind what it sent before).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    task::AbortHandle,
    time::{Duration, Instant},
};

use crate::helpers::admin_url;

/// One proxied connection: its tasks and whether it has gone silent.
struct Conn {
    tasks: Vec<AbortHandle>,
    silent: Arc<AtomicBool>,
}

/// Forwards TCP to a target until cut or silenced.
pub struct Proxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    silent: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<Conn>>>,
    target_closed: Arc<AtomicU64>,
    /// Milliseconds every byte from the target is held before the client gets it.
    delay_ms: Arc<AtomicU64>,
    /// Where new connections go (`host:port`).
    target: Arc<Mutex<String>>,
}

impl Proxy {
    /// A proxy to the test Postgres (`DATABASE_URL`).
    pub async fn start() -> Self {
        let (upstream, _) = split_url(&admin_url(), "127.0.0.1:1".parse().expect("addr"));
        Self::start_to(upstream).await
    }

    /// A proxy to `target` (`host:port`).
    pub async fn start_to(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let proxy = Self {
            addr,
            cut: Arc::default(),
            silent: Arc::default(),
            live: Arc::default(),
            target_closed: Arc::default(),
            delay_ms: Arc::default(),
            target: Arc::new(Mutex::new(target)),
        };
        let target = proxy.target.clone();
        let (cut, silent, live, closed, delay) = (
            proxy.cut.clone(),
            proxy.silent.clone(),
            proxy.live.clone(),
            proxy.target_closed.clone(),
            proxy.delay_ms.clone(),
        );
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if cut.load(Ordering::SeqCst) {
                    continue; // dropped: connection closed at once
                }
                let quiet = Arc::new(AtomicBool::new(silent.load(Ordering::SeqCst)));
                let to = target.lock().expect("lock").clone();
                let Ok(server) = TcpStream::connect(&to).await else { continue };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                let up = tokio::spawn(pump(
                    client_read,
                    server_write,
                    quiet.clone(),
                    None,
                    Arc::default(),
                ));
                let down = tokio::spawn(pump(
                    server_read,
                    client_write,
                    quiet.clone(),
                    Some(closed.clone()),
                    delay.clone(),
                ));
                live.lock().expect("lock").push(Conn {
                    tasks: vec![up.abort_handle(), down.abort_handle()],
                    silent: quiet,
                });
            }
        });
        proxy
    }

    /// Closes every connection; new ones are closed at once until `restore`.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for conn in self.live.lock().expect("lock").drain(..) {
            conn.tasks.iter().for_each(AbortHandle::abort);
        }
    }

    /// Every open connection, and every new one until `restore`, carries nothing but
    /// stays open.
    pub fn silence(&self) {
        self.silent.store(true, Ordering::SeqCst);
        for conn in self.live.lock().expect("lock").iter() {
            conn.silent.store(true, Ordering::SeqCst);
        }
    }

    /// New connections go through again (silenced ones stay silent).
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
        self.silent.store(false, Ordering::SeqCst);
    }

    /// New connections go to `target` (`host:port`) from now on: the address an HA
    /// manager moves to a promoted standby.
    pub fn retarget(&self, target: String) {
        *self.target.lock().expect("lock") = target;
    }

    /// From now on, every byte from the target reaches its client `delay` later, in order.
    pub fn delay(&self, delay: std::time::Duration) {
        self.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// How many times the target side closed a connection (or failed it).
    pub fn target_closed(&self) -> u64 {
        self.target_closed.load(Ordering::SeqCst)
    }
}

/// Copies `from` to `to` until either ends, each chunk `delay_ms` after it was read; once
/// `silent`, swallows whatever arrives and holds `to` open even after `from` ends.
/// `closed` counts the end of `from`.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    silent: Arc<AtomicBool>,
    closed: Option<Arc<AtomicU64>>,
    delay_ms: Arc<AtomicU64>,
) {
    let (queue, mut queued) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let quiet = silent.clone();
    let read = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    if let Some(closed) = &closed {
                        closed.fetch_add(1, Ordering::SeqCst);
                    }
                    if silent.load(Ordering::SeqCst) {
                        // Keep the queue, and so the other side's socket, open: it learns
                        // nothing.
                        let _keep = queue;
                        std::future::pending::<()>().await;
                    }
                    return;
                }
                Ok(n) => n,
            };
            if silent.load(Ordering::SeqCst) {
                continue; // swallowed: read (so a close is seen) but never delivered
            }
            let due = Instant::now() + Duration::from_millis(delay_ms.load(Ordering::SeqCst));
            if queue.send((due, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    };
    let write = async move {
        while let Some((due, bytes)) = queued.recv().await {
            tokio::time::sleep_until(due).await;
            if quiet.load(Ordering::SeqCst) {
                continue;
            }
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(read, write);
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
