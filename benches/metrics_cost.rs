//! What recording metrics adds to every call: the request layer (duration histogram by
//! method and code, request id only when debug logging is on) around a service that
//! answers at once, against the same service bare. Prints nanoseconds per call.
//!
//! `cargo bench --bench metrics_cost`.

use std::{
    convert::Infallible,
    future::{Ready, ready},
    task::{Context, Poll},
    time::Instant,
};

use rolecheck::metrics::{Metrics, RequestLayer};
use tower::{Layer, Service};

#[derive(Clone)]
struct Instant200;

impl Service<http::Request<()>> for Instant200 {
    type Response = http::Response<()>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<()>) -> Self::Future {
        ready(Ok(http::Response::new(())))
    }
}

fn request() -> http::Request<()> {
    http::Request::post("/rolecheck.v1.RoleCheck/Check").body(()).expect("request")
}

async fn per_call<S>(mut service: S, calls: u32) -> f64
where
    S: Service<http::Request<()>, Response = http::Response<()>>,
{
    let started = Instant::now();
    for _ in 0..calls {
        let _ = service.call(request()).await;
    }
    started.elapsed().as_nanos() as f64 / f64::from(calls)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let calls = 1_000_000;
    let metrics = Metrics::new();
    let layered = RequestLayer(metrics).layer(Instant200);
    // Warm up both paths, then measure each twice, alternating.
    per_call(Instant200, 10_000).await;
    per_call(layered.clone(), 10_000).await;
    let mut bare = f64::MAX;
    let mut with = f64::MAX;
    for _ in 0..2 {
        bare = bare.min(per_call(Instant200, calls).await);
        with = with.min(per_call(layered.clone(), calls).await);
    }
    println!("bare service:             {bare:8.1} ns/call");
    println!("with the request layer:   {with:8.1} ns/call");
    println!("metrics recording adds:   {:8.1} ns/call", with - bare);
}
