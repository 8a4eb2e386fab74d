//! A rolecheck process started for a test or a bench: waits for it to serve, and kills
//! it when dropped (so nothing outlives the test that started it).

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
};

/// A started server and the addresses it logged.
pub struct Server {
    pub child: Child,
    pub pid: u32,
    /// The gRPC address (`addr=` of its "serving gRPC" line).
    pub grpc: String,
    /// The HTTP address (`http_addr=`).
    pub http: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `command` (logging at least `rolecheck::server=info` to stderr) and waits for
/// its "serving gRPC" log line; the rest of its log is drained in the background.
pub fn spawn(mut command: Command) -> Server {
    let mut child =
        command.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().expect("spawn server");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let field = |line: &str, key: &str| {
        line.split(key).nth(1).and_then(|v| v.split_whitespace().next()).map(str::to_owned)
    };
    let mut http = String::new();
    let grpc = loop {
        let line = lines.next().expect("server exited before serving").expect("read");
        if let Some(addr) = field(&line, "http_addr=") {
            http = addr;
        }
        if line.contains("serving gRPC") {
            break field(&line, "addr=").expect("addr");
        }
    };
    std::thread::spawn(move || for _ in lines.by_ref() {});
    Server { pid: child.id(), child, grpc, http }
}
