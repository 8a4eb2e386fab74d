//! Files reloaded in place (the API keys, the authorization policy): on SIGHUP, and when
//! the file's stamp changes. What a reload does, and what a failed one keeps, is the
//! owner's business.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

/// A file's modification time and size: a rewrite within the file system's timestamp
/// granularity still changes the size.
pub type Stamp = (Option<SystemTime>, u64);

/// The stamp of the file at `path`, if it can be read.
pub fn stamp(path: &Path) -> Option<Stamp> {
    std::fs::metadata(path).ok().map(|m| (m.modified().ok(), m.len()))
}

/// Calls `reload` on SIGHUP and whenever the stamp of `path` differs from the last one
/// seen (polled every `every`), starting from `loaded`, the stamp taken before the file
/// was first read (so a change made before the watch starts is still seen).
pub fn watch(
    path: PathBuf,
    loaded: Option<Stamp>,
    every: Duration,
    reload: impl Fn() + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut seen = loaded;
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            let hangup = async {
                match hup.as_mut() {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let hangup = std::future::pending::<()>();
            tokio::select! {
                () = hangup => reload(),
                () = tokio::time::sleep(every) => {
                    let now = stamp(&path);
                    if now != seen {
                        seen = now;
                        reload();
                    }
                }
            }
        }
    })
}
