//! One process per embedded store. SQLite has no NOTIFY: a second process writing the
//! same file would leave the first serving answers its cache never learns are stale. So
//! the store's file is locked for the life of the process that opened it (an OS lock,
//! `flock`, that the kernel drops when the process ends, however it ends), and a second
//! process is refused with the path, the holder's pid, and how to run several replicas.

use std::{
    fs::{File, OpenOptions, TryLockError},
    io::{Read, Seek, Write},
    path::{Path, PathBuf},
};

use crate::error::{Error, Result};

/// The lock on an embedded store, held while this value lives.
#[derive(Debug)]
pub struct Owner {
    _file: File,
    path: PathBuf,
}

impl Owner {
    /// Takes the lock beside `database` (`<database>.lock`), or says who holds it.
    pub fn take(database: &Path) -> Result<Self> {
        let mut name = database.as_os_str().to_owned();
        name.push(".lock");
        let path = PathBuf::from(name);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|err| {
                Error::FailedPrecondition(format!("cannot open {}: {err}", path.display()))
            })?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let who = if holder.is_empty() {
                    "another rolecheck".to_owned()
                } else {
                    format!("another rolecheck (pid {holder})")
                };
                return Err(Error::FailedPrecondition(format!(
                    "the embedded store {} is in use by {who}: it serves one process only \
                     (a second would answer from a cache that never hears of the first's \
                     writes). Give this one its own --data-dir, or run several replicas \
                     over Postgres (--database-url postgres://…)",
                    database.display()
                )));
            }
            Err(TryLockError::Error(err)) => {
                return Err(Error::FailedPrecondition(format!(
                    "cannot lock {}: {err}",
                    path.display()
                )));
            }
        }
        // Who holds it, for the next one's message (the lock, not the text, decides).
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = writeln!(file, "{}", std::process::id());
        Ok(Self { _file: file, path })
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_owner_is_refused_until_the_first_is_gone() {
        let dir = tempfile::tempdir().expect("dir");
        let db = dir.path().join("rolecheck.db");
        let first = Owner::take(&db).expect("first");
        assert!(first.path().ends_with("rolecheck.db.lock"));
        let refused = Owner::take(&db).expect_err("second").to_string();
        assert!(refused.contains(&format!("pid {}", std::process::id())), "{refused}");
        assert!(refused.contains(&db.display().to_string()) && refused.contains("Postgres"));
        drop(first);
        Owner::take(&db).expect("free again");
    }
}
