//! AuthZEN over HTTP/1.1 against the same questions over gRPC, on one server under the
//! contract's example model, in rounds (`BENCH_AUTHZEN_ROUNDS`, 2) whose order flips each
//! round: a permission `Check` against an `evaluation` of the same permission (the same
//! users, one per call), and a `CheckBatch` of 100 against `evaluations` of 100. gRPC runs
//! on one HTTP/2 connection with `concurrency` streams in flight; HTTP/1.1 on
//! `concurrency` keep-alive connections, one request in flight on each (HTTP/1.1 has no
//! multiplexing).

use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use super::*;

const SET_MODEL: &str = "/rolecheck.v1.RoleCheck/SetModel";
const EVALUATION: &str = "/access/v1/evaluation";
const EVALUATIONS: &str = "/access/v1/evaluations";

/// The `i`-th evaluation: hot user `h<i % 1000>` reads invoices in `hot` (allowed).
fn evaluation(i: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"subject":{{"type":"user","id":"h{}"}},"action":{{"name":"invoice.read"}},"resource":{{"type":"tenant","id":"hot"}}}}"#,
        i % 1000
    ))
}

/// 100 evaluations sharing the action and resource, one hot user each.
fn evaluations() -> Bytes {
    let items: Vec<String> =
        (0..100).map(|i| format!(r#"{{"subject":{{"type":"user","id":"h{i}"}}}}"#)).collect();
    Bytes::from(format!(
        r#"{{"action":{{"name":"invoice.read"}},"resource":{{"type":"tenant","id":"hot"}},"evaluations":[{}]}}"#,
        items.join(",")
    ))
}

fn one_allowed(body: &[u8]) -> Result<(), String> {
    (body == br#"{"decision":true}"#)
        .then_some(())
        .ok_or_else(|| format!("not allowed: {}", String::from_utf8_lossy(body)))
}

fn hundred_allowed(body: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(body);
    (text.matches(r#"{"decision":true}"#).count() == 100)
        .then_some(())
        .ok_or_else(|| format!("not 100 allowed: {text:.200}"))
}

/// `body(i)` POSTed to `path` on `addr` from `concurrency` keep-alive HTTP/1.1
/// connections for `BENCH_SECONDS`; `pid` is the server measured.
async fn http1_load(
    addr: &str,
    pid: u32,
    concurrency: usize,
    (name, path, items): (&str, &'static str, u64),
    body: fn(u64) -> Bytes,
    verify: Verify,
) -> Outcome {
    let seconds: f64 = env_or("BENCH_SECONDS", 5.0);
    let next = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    for _ in 0..concurrency {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        let (send, connection) = http1::handshake(TokioIo::new(tcp)).await.expect("handshake");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        senders.push(send);
    }
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|mut send| {
            let next = next.clone();
            tokio::spawn(async move {
                let (mut latencies, mut errors, mut first_error) = (Vec::new(), 0u64, None);
                while Instant::now() < deadline {
                    let request = http::Request::post(path)
                        .header("host", "bench")
                        .header("content-type", "application/json")
                        .body(Full::new(body(next.fetch_add(1, Ordering::Relaxed))))
                        .expect("request");
                    let sent = Instant::now();
                    let answer = async {
                        send.ready().await.map_err(|e| e.to_string())?;
                        let response =
                            send.send_request(request).await.map_err(|e| e.to_string())?;
                        let status = response.status();
                        let bytes =
                            response.into_body().collect().await.map_err(|e| e.to_string())?;
                        match status.as_u16() {
                            200 => verify(&bytes.to_bytes()),
                            other => Err(format!("HTTP {other}")),
                        }
                    }
                    .await;
                    latencies.push(sent.elapsed());
                    if let Err(e) = answer {
                        errors += 1;
                        first_error.get_or_insert(e);
                    }
                }
                (latencies, errors, first_error)
            })
        })
        .collect();
    summarize(name, items, tasks, (started, pid, cpu_before)).await
}

/// The rounds, then the table and each pair's ratio.
pub(super) async fn authzen_phase(concurrency: usize, baseline: &Outcome) {
    let data = tempfile::tempdir().expect("dir");
    let server = spawn(rolecheck(data.path(), &[]));
    let conn = connect(&server.grpc).await;
    seed_small(&conn).await;
    let model = frame(&pb::SetModelRequest { model: model::MODEL.into() });
    setup_calls(&conn, 1, 1, SET_MODEL, move |_| model.clone()).await;
    setup_calls(&conn, 1000, concurrency, CHECK, |i| frame(&model::permission_check(i))).await;
    let batch = model::batch(model::permission_check);
    let mut outcomes = vec![baseline.clone()];
    let mut pairs: Vec<(usize, usize)> = Vec::new();
    for round in 1..=env_or("BENCH_AUTHZEN_ROUNDS", 2) {
        let grpc_first = round % 2 == 1;
        for single in [true, false] {
            let mut indices = [0, 0];
            for grpc in [grpc_first, !grpc_first] {
                let outcome = match (single, grpc) {
                    (true, true) => {
                        let name = format!("gRPC Check by permission, round {round}");
                        let scenario = Scenario::new(name, CHECK, allowed, |i| {
                            frame(&model::permission_check(i))
                        });
                        load(&conn, server.pid, concurrency, scenario).await
                    }
                    (false, true) => {
                        let name = format!("gRPC CheckBatch of 100 permissions, round {round}");
                        let mut scenario =
                            Scenario::fixed(name, CHECK_BATCH, all_allowed, batch.clone());
                        scenario.items = 100;
                        load(&conn, server.pid, concurrency, scenario).await
                    }
                    (true, false) => {
                        let name = format!("AuthZEN evaluation, HTTP/1.1, round {round}");
                        let what = (name.as_str(), EVALUATION, 1);
                        http1_load(
                            &server.http,
                            server.pid,
                            concurrency,
                            what,
                            evaluation,
                            one_allowed,
                        )
                        .await
                    }
                    (false, false) => {
                        let name = format!("AuthZEN evaluations of 100, HTTP/1.1, round {round}");
                        let what = (name.as_str(), EVALUATIONS, 100);
                        let body = |_| evaluations();
                        http1_load(
                            &server.http,
                            server.pid,
                            concurrency,
                            what,
                            body,
                            hundred_allowed,
                        )
                        .await
                    }
                };
                outcomes.push(outcome);
                indices[usize::from(!grpc)] = outcomes.len() - 1;
            }
            pairs.push((indices[0], indices[1]));
        }
    }
    table(
        "AuthZEN over HTTP/1.1 against gRPC (embedded store, cached, under the model)",
        baseline,
        &outcomes,
    );
    println!("\n| AuthZEN ÷ gRPC | calls/s | server CPU per call |\n| --- | --- | --- |");
    for (grpc, authzen) in pairs {
        let (g, a) = (&outcomes[grpc], &outcomes[authzen]);
        println!(
            "| {} / {} | {:.2} | {:.2} |",
            a.name,
            g.name,
            a.per_second / g.per_second,
            a.cpu_per_call.as_secs_f64() / g.cpu_per_call.as_secs_f64()
        );
    }
}
