//! A throwaway Postgres primary and a streaming hot standby of it (`initdb`,
//! `pg_basebackup`, `pg_ctl` from the machine's Postgres), each on a free loopback port
//! with its socket in its own directory; both stopped and removed when the pair goes.
//! As root, every Postgres command runs as the `postgres` user.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// Where the machine's Postgres programs are (Debian: `/usr/lib/postgresql/<major>/bin`).
fn bin(program: &str) -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let mut majors: Vec<PathBuf> = std::fs::read_dir(root)
        .expect("/usr/lib/postgresql (Debian's postgresql package)")
        .filter_map(|entry| Some(entry.ok()?.path()))
        .collect();
    majors.sort();
    majors.pop().expect("a Postgres version").join("bin").join(program)
}

fn as_postgres(program: &str) -> Command {
    let root =
        std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
    if root {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(bin(program));
        command
    } else {
        Command::new(bin(program))
    }
}

fn run(command: &mut Command, what: &str) {
    let out = command.stdin(Stdio::null()).output().expect(what);
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("free port");
    listener.local_addr().expect("addr").port()
}

/// One running cluster.
struct Cluster {
    data: PathBuf,
    port: u16,
}

impl Cluster {
    fn start(data: PathBuf, port: u16) -> Self {
        let log = data.with_extension("log");
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1",
            data.parent().expect("parent").display()
        );
        let mut start = as_postgres("pg_ctl");
        start.args(["-w", "-t", "30", "-D"]).arg(&data).args(["-o", &options, "-l"]).arg(log);
        run(start.arg("start"), "pg_ctl start");
        Self { data, port }
    }

    fn stop(&self) {
        let mut stop = as_postgres("pg_ctl");
        stop.args(["-w", "-m", "immediate", "-D"]).arg(&self.data).arg("stop");
        let _ = stop.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}

/// A primary and a hot standby streaming from it.
pub struct Pair {
    primary: Cluster,
    standby: Cluster,
    _dir: tempfile::TempDir,
}

impl Pair {
    /// A fresh primary (trust authentication on loopback, user `postgres`) and a standby
    /// of it, both accepting connections.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("dir");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).expect("mode");
        let (primary_data, standby_data) = (dir.path().join("primary"), dir.path().join("standby"));
        let mut init = as_postgres("initdb");
        init.args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"]).arg(&primary_data);
        run(&mut init, "initdb");
        let primary = Cluster::start(primary_data, free_port());
        let mut backup = as_postgres("pg_basebackup");
        backup
            .args(["-h", "127.0.0.1", "-p", &primary.port.to_string(), "-U", "postgres"])
            .args(["-X", "stream", "-R", "-D"])
            .arg(&standby_data);
        run(&mut backup, "pg_basebackup");
        let standby = Cluster::start(standby_data, free_port());
        let pair = Self { primary, standby, _dir: dir };
        let until = Instant::now() + Duration::from_secs(30);
        while !pair.standby_streams() {
            assert!(Instant::now() < until, "the standby never started streaming");
            std::thread::sleep(Duration::from_millis(50));
        }
        pair
    }

    fn standby_streams(&self) -> bool {
        let mut psql = as_postgres("psql");
        psql.args(["-h", "127.0.0.1", "-p", &self.primary.port.to_string(), "-U", "postgres"])
            .args(["-Atc", "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"]);
        psql.output().is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "1")
    }

    /// The URL of `database` on the primary.
    pub fn primary_url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.primary.port)
    }

    /// Makes the standby synchronous: from now on a commit on the primary returns only
    /// once the standby has it.
    pub fn synchronous(&self) {
        let mut psql = as_postgres("psql");
        psql.args(["-h", "127.0.0.1", "-p", &self.primary.port.to_string(), "-U", "postgres"])
            .args(["-c", "ALTER SYSTEM SET synchronous_standby_names = '*'"])
            .args(["-c", "SELECT pg_reload_conf()"]);
        run(&mut psql, "synchronous_standby_names");
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let mut psql = as_postgres("psql");
            psql.args(["-h", "127.0.0.1", "-p", &self.primary.port.to_string(), "-U", "postgres"])
                .args([
                    "-Atc",
                    "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
                ]);
            if psql.output().is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "1") {
                return;
            }
            assert!(Instant::now() < until, "the standby never became synchronous");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `host:port` of the primary and of the standby.
    pub fn addrs(&self) -> (String, String) {
        let addr = |cluster: &Cluster| format!("127.0.0.1:{}", cluster.port);
        (addr(&self.primary), addr(&self.standby))
    }

    /// The primary dies (an immediate stop: no shutdown checkpoint, as in a crash).
    pub fn kill_primary(&self) {
        self.primary.stop();
    }

    /// Restarts the primary (an immediate stop, as in a crash, then a start on the same
    /// port): every connection to it breaks.
    #[allow(dead_code)] // only some tests restart it
    pub fn restart_primary(&mut self) {
        self.primary.stop();
        self.primary = Cluster::start(self.primary.data.clone(), self.primary.port);
    }

    /// Promotes the standby and waits until it accepts writes.
    pub fn promote(&self) {
        let mut promote = as_postgres("pg_ctl");
        promote.args(["-w", "-t", "30", "-D"]).arg(&self.standby.data).arg("promote");
        run(&mut promote, "pg_ctl promote");
    }

    /// The URL of `database` on the standby.
    pub fn standby_url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.standby.port)
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.standby.stop();
        self.primary.stop();
    }
}
