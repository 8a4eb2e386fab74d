//! A real PgBouncer (Debian's, installed by `scripts/ensure-pgbouncer`) on a free
//! loopback port in front of the test Postgres, in transaction mode with md5 passwords;
//! killed when it goes.

use std::{
    net::TcpListener,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// The password of the user `postgres` at the pooler.
pub const PASSWORD: &str = "right-password";

pub struct Bouncer {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Bouncer {
    /// In front of the Postgres `admin_url` names (`postgres://user@host:port/db`), every
    /// database of it; `ignore`: its `ignore_startup_parameters`.
    pub fn start(admin_url: &str, ignore: &str) -> Self {
        let rest = admin_url.split_once("://").expect("scheme").1;
        let host = rest.split_once('@').map_or(rest, |(_, host)| host);
        let (host, port) = host.split('/').next().expect("host").split_once(':').expect("port");
        let dir = tempfile::tempdir().expect("dir");
        let listen = TcpListener::bind("127.0.0.1:0").expect("free port");
        let free = listen.local_addr().expect("addr").port();
        drop(listen);
        let ini = format!(
            "[databases]\n* = host={host} port={port}\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
             listen_port = {free}\nauth_type = md5\nauth_file = {users}\npool_mode = transaction\n\
             unix_socket_dir =\npidfile =\nlogfile =\nignore_startup_parameters = {ignore}\n\
             max_client_conn = 500\ndefault_pool_size = 20\n",
            users = dir.path().join("users.txt").display()
        );
        std::fs::write(dir.path().join("users.txt"), format!("\"postgres\" \"{PASSWORD}\"\n"))
            .expect("users");
        std::fs::write(dir.path().join("pgbouncer.ini"), ini).expect("ini");
        // PgBouncer will not run as root: as root, it is told to become postgres.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("mode");
        let mut command = Command::new("/usr/sbin/pgbouncer");
        if std::fs::metadata("/proc/self")
            .is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        {
            command.args(["-u", "postgres"]);
        }
        let child = command
            .arg(dir.path().join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn pgbouncer (scripts/ensure-pgbouncer installs it)");
        let bouncer = Self { child, port: free, _dir: dir };
        let until = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", free)).is_err() {
            assert!(Instant::now() < until, "pgbouncer never listened on {free}");
            std::thread::sleep(Duration::from_millis(20));
        }
        bouncer
    }

    /// The URL of `database` through the pooler, as `postgres` with `password`.
    pub fn url(&self, database: &str, password: &str) -> String {
        format!("postgres://postgres:{password}@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
