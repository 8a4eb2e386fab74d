//! Revoke-to-deny propagation across replicas: two rolecheck servers over one Postgres
//! (`DATABASE_URL`, default the local one), each with its own cache and change listener.
//! For each of N users: grant on A, prime B's cache with an allowed Check, revoke on A,
//! then poll B until it denies. Prints p50, p99 and max of the time from the revoke's
//! response (and from its request) to B's first deny.
//!
//! `cargo bench --bench propagation` (N = 1000; `PROPAGATION_N` overrides).

use std::time::{Duration, Instant};

use rolecheck::{
    config::{Config, DatabaseUrl},
    pb::{self, role_check_client::RoleCheckClient, tenants_client::TenantsClient},
    server::Server,
};
use sqlx::{Connection, PgConnection};
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// Polls of B per revoke before the bench gives up on it.
const MAX_POLLS: u32 = 100_000;

fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Starts a replica over `url`; returns a channel to it and its stop switch.
async fn replica(url: &str) -> (Channel, oneshot::Sender<()>) {
    let mut config = Config::defaults();
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.http_listen = "127.0.0.1:0".parse().expect("addr");
    config.database_url = Some(DatabaseUrl(url.to_owned()));
    let server = Server::bind(config).await.expect("server starts");
    let addr = server.local_addr();
    let (stop, stopped) = oneshot::channel();
    tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    (channel, stop)
}

fn check(user: &str) -> pb::CheckRequest {
    pb::CheckRequest {
        permission: String::new(),
        user_id: user.into(),
        tenant_id: "acme".into(),
        role: "admin".into(),
        min_revision: 0,
    }
}

async fn allowed(client: &mut RoleCheckClient<Channel>, user: &str) -> bool {
    client.check(check(user)).await.expect("check").into_inner().allowed
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(label: &str, mut samples: Vec<Duration>) {
    samples.sort_unstable();
    println!(
        "{label:<34} p50 {:>9.3?}  p99 {:>9.3?}  max {:>9.3?}",
        percentile(&samples, 0.50),
        percentile(&samples, 0.99),
        samples[samples.len() - 1]
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("PROPAGATION_N").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let admin = admin_url();
    let name = format!("rc_bench_{}", std::process::id());
    let mut conn = PgConnection::connect(&admin).await.expect("Postgres at DATABASE_URL");
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.expect("create db");
    let base = admin.split('?').next().expect("url");
    let url = format!("{}/{name}", &base[..base.rfind('/').expect("path")]);

    let (channel_a, stop_a) = replica(&url).await;
    let (channel_b, stop_b) = replica(&url).await;
    let mut a = RoleCheckClient::new(channel_a.clone());
    let mut b = RoleCheckClient::new(channel_b);
    TenantsClient::new(channel_a)
        .create_tenant(pb::CreateTenantRequest { tenant_id: "acme".into(), name: "Acme".into() })
        .await
        .expect("create tenant");

    let mut since_response = Vec::with_capacity(n);
    let mut since_request = Vec::with_capacity(n);
    let mut polls_total = 0u64;
    for i in 0..n {
        let user = format!("user{i}");
        let grant = pb::GrantRequest {
            user_id: user.clone(),
            tenant_id: "acme".into(),
            roles: vec!["admin".into()],
            expires_at: None,
        };
        a.grant(grant).await.expect("grant");
        let mut primed = 0;
        while !allowed(&mut b, &user).await {
            primed += 1;
            assert!(primed < MAX_POLLS, "B never saw the grant");
        }
        let revoke =
            pb::RevokeRequest { user_id: user.clone(), tenant_id: "acme".into(), roles: vec![] };
        let requested = Instant::now();
        a.revoke(revoke).await.expect("revoke");
        let responded = Instant::now();
        let mut polls = 0;
        while allowed(&mut b, &user).await {
            polls += 1;
            assert!(polls < MAX_POLLS, "B never denied after the revoke");
        }
        let denied = Instant::now();
        polls_total += u64::from(polls);
        since_response.push(denied - responded);
        since_request.push(denied - requested);
    }

    println!("revoke on A -> first deny on B, {n} revokes, 2 replicas over one Postgres");
    report("from the revoke's response", since_response);
    report("from the revoke's request", since_request);
    println!("stale polls of B after the revoke returned: {polls_total} in total");

    let _ = stop_a.send(());
    let _ = stop_b.send(());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut conn)
        .await;
}
