//! The edges: a network to Postgres that goes silent, random paths against the metrics,
//! Watch caps, many watchers beside the heartbeat, and clients that vanish.

use std::time::{Duration, Instant};

use rolecheck::pb;
use tonic::Code;

use crate::{
    helpers::{Backend, TestApp, TestDb, check_req, connect, metric, start, test_config, wait_for},
    proxy::Proxy,
};

/// What a Check on `app` answers: allowed, or the status code.
async fn ask(app: &TestApp, user: &str, min_revision: u64) -> Result<bool, Code> {
    app.checks
        .clone()
        .check(check_req(user, "acme", "admin", min_revision))
        .await
        .map(|r| r.into_inner().allowed)
        .map_err(|s| s.code())
}

/// A proxy between a replica and Postgres stops carrying bytes on every connection but
/// keeps them open. The replica answers UNAVAILABLE within the request timeout, its
/// listener notices and reconnects, a revoke written meanwhile through another replica is
/// never answered as allowed, and once the proxy forwards again the replica serves from
/// its cache again by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_network_to_postgres_fails_closed_and_recovers_by_itself() {
    let db = TestDb::create(Backend::Postgres).await;
    let TestDb::Postgres { url, .. } = &db else { unreachable!() };
    let proxy = Proxy::start().await;
    let mut config = test_config(&db);
    config.database_url = Some(rolecheck::config::DatabaseUrl(proxy.url_through(url)));
    let request_timeout = Duration::from_secs(3);
    config.request_timeout = request_timeout;
    config.db_query_timeout = Duration::from_secs(1);
    config.db_acquire_timeout = Duration::from_secs(2); // the default: room for a ping
    config.coherence_lease = Duration::from_secs(1); // the default
    // A small pool, so a connection lost to the silence for good would be missed.
    config.db_max_connections = 2;
    let app = start(config, db).await;
    let other = app.replica(|_| {}).await;

    app.create_tenant("acme").await;
    app.grant("u1", "acme", &["admin"]).await;
    let granted = app.grant("u2", "acme", &["admin"]).await;
    crate::helpers::wait_trusted(&app, granted).await;
    assert_eq!(ask(&app, "u1", 0).await, Ok(true));
    assert_eq!(ask(&app, "u2", 0).await, Ok(true));
    let reconnects = metric(&app, "rolecheck_listener_reconnects").await.expect("metric");
    // Both pooled connections open and idle when the network goes silent.
    let lists = (0..8).map(|_| {
        let mut checks = app.checks.clone();
        let request = pb::ListMembersRequest { tenant_id: "acme".into(), ..Default::default() };
        async move { checks.list_members(request).await.expect("list") }
    });
    futures::future::join_all(lists).await;

    proxy.silence();
    let mut writes = app.checks.clone();
    let started = Instant::now();
    let grant = pb::GrantRequest {
        user_id: "u3".into(),
        tenant_id: "acme".into(),
        roles: vec!["admin".into()],
        expires_at: None,
    };
    let status = writes.grant(grant.clone()).await.expect_err("no database");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    eprintln!("silent network: Grant UNAVAILABLE after {:?}", started.elapsed());
    assert!(started.elapsed() < request_timeout, "answered in {:?}", started.elapsed());
    let started = Instant::now();
    assert_eq!(ask(&app, "never-seen", 0).await, Err(Code::Unavailable));
    assert!(started.elapsed() < request_timeout, "answered in {:?}", started.elapsed());

    // The lease runs out and the listener notices the silence (two leases) by itself.
    wait_for(Duration::from_secs(3), "the cache to stop being trusted", || async {
        (metric(&app, "rolecheck_cache_trusted").await == Some(0.0)).then_some(())
    })
    .await;
    wait_for(Duration::from_secs(5), "the listener to notice the silence", || async {
        let now = metric(&app, "rolecheck_listener_reconnects").await.unwrap_or(0.0);
        (now > reconnects).then_some(())
    })
    .await;
    // Meanwhile another replica revokes u1.
    let revoked = other.revoke("u1", "acme", &["admin"]).await;
    for min_revision in [0, revoked] {
        let started = Instant::now();
        assert_eq!(ask(&app, "u1", min_revision).await, Err(Code::Unavailable));
        assert!(started.elapsed() < request_timeout, "answered in {:?}", started.elapsed());
    }

    // The path comes back (the silenced connections stay silent for good).
    proxy.restore();
    wait_for(Duration::from_secs(20), "the cache to be trusted again", || async {
        (metric(&app, "rolecheck_cache_trusted").await == Some(1.0)).then_some(())
    })
    .await;
    // The first reads that need the store may still meet a silenced pooled connection
    // (UNAVAILABLE while it is found out and closed); none may allow.
    // Each such read takes the query timeout (1 s) to find its connection silent.
    wait_for(Duration::from_secs(10), "reads of the store to answer again", || async {
        let got = ask(&app, "u1", revoked).await;
        assert_ne!(got, Ok(true), "the revoke was answered as allowed");
        got.ok()
    })
    .await;
    for min_revision in [0, revoked] {
        assert_eq!(ask(&app, "u1", min_revision).await, Ok(false), "the revoke holds");
    }
    // Reads that need the pool answer again: no connection was lost to the silence.
    let misses = (0..6).map(|i| {
        let mut checks = app.checks.clone();
        async move { checks.check(check_req(&format!("new{i}"), "acme", "admin", 0)).await }
    });
    for got in futures::future::join_all(misses).await {
        assert!(!got.expect("a cache miss is answered").into_inner().allowed);
    }
    assert_eq!(ask(&app, "u2", 0).await, Ok(true));
    let hits = metric(&app, "rolecheck_cache_hits_total").await.expect("hits");
    for _ in 0..5 {
        assert_eq!(ask(&app, "u2", 0).await, Ok(true));
    }
    let after = metric(&app, "rolecheck_cache_hits_total").await.expect("hits");
    assert_eq!(after - hits, 5.0, "served from the cache again");
    // Writes go through again too, once the pool has dropped its silenced connections.
    wait_for(Duration::from_secs(20), "a write to go through", || {
        let (mut writes, grant) = (writes.clone(), grant.clone());
        async move { writes.grant(grant).await.ok() }
    })
    .await;
    assert_eq!(ask(&other, "u3", 0).await, Ok(true));
    assert_eq!(ask(&other, "u1", 0).await, Ok(false));
}

/// Unauthenticated calls to random paths add no label values to `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_paths_do_not_grow_the_metrics() {
    let dir = tempfile::tempdir().expect("dir");
    let keys = dir.path().join("keys.toml");
    std::fs::write(&keys, crate::callers::keys_toml(&[("k", "k-secret", &["check"])], &[]))
        .expect("write");
    let app = crate::helpers::spawn_with(Backend::Sqlite, |c| c.api_keys_file = Some(keys)).await;
    let channel = connect(app.addr).await;
    // One of each: the label sets every later call would reuse.
    let body = |path: String| {
        let channel = channel.clone();
        async move { crate::callers::call(&channel, &path, Vec::new(), None).await }
    };
    let _ = body("/rolecheck.v1.RoleCheck/warm-up".into()).await;
    let before = wait_for(Duration::from_secs(5), "the warm-up call to be recorded", || async {
        let (_, text) = crate::helpers::http_get(&app, "/metrics").await;
        text.contains(r#"method="unknown",code="Unimplemented""#).then_some(text)
    })
    .await;
    let mut calls = Vec::new();
    for i in 0..10_000u32 {
        let path = if i % 2 == 0 {
            format!("/rolecheck.v1.RoleCheck/M{i:x}{}", i.wrapping_mul(2_654_435_761))
        } else {
            format!("/svc{i}.S/M{i}")
        };
        calls.push(body(path));
        if calls.len() == 200 {
            for got in futures::future::join_all(calls.drain(..)).await {
                assert_eq!(got.unwrap_err().code(), Code::Unimplemented);
            }
        }
    }
    let (_, after) = crate::helpers::http_get(&app, "/metrics").await;
    eprintln!("/metrics: {} bytes before, {} after 10,000 random paths", before.len(), after.len());
    // Not one request label set more, and the whole text within a few KB (the counts'
    // digits, and background series such as the first history pruning's).
    let label_sets = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("rolecheck_grpc_request_duration_seconds_count"))
            .count()
    };
    assert_eq!(label_sets(&after), label_sets(&before), "request label sets grew");
    assert!(
        after.len() <= before.len() + 4096,
        "/metrics grew from {} to {} bytes",
        before.len(),
        after.len()
    );
    assert!(after.contains(r#"method="unknown",code="Unimplemented""#), "{after}");
}

/// Watch streams are capped per caller and in total; a closed stream frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_are_capped_per_caller_and_in_total() {
    let dir = tempfile::tempdir().expect("dir");
    let keys = dir.path().join("keys.toml");
    let toml = crate::callers::keys_toml(
        &[("auditor", "a-secret", &["audit"]), ("follower", "f-secret", &["follow"])],
        &[],
    );
    std::fs::write(&keys, toml).expect("write");
    let app = crate::helpers::spawn_with(Backend::Sqlite, |c| {
        c.api_keys_file = Some(keys);
        c.max_watch_streams = 3;
        c.max_watch_streams_per_caller = 2;
    })
    .await;
    let channel = connect(app.addr).await;
    let watch = |secret: &'static str| {
        let mut client = pb::role_check_client::RoleCheckClient::new(channel.clone());
        async move {
            let mut request = tonic::Request::new(pb::WatchRequest {
                after_revision: 0,
                progress_ms: 0,
                epoch: String::new(),
            });
            let bearer = format!("Bearer {secret}").parse().expect("header");
            request.metadata_mut().insert("authorization", bearer);
            client.watch(request).await.map(tonic::Response::into_inner)
        }
    };
    let first = watch("a-secret").await.expect("first");
    let _second = watch("a-secret").await.expect("second");
    let third = watch("a-secret").await.expect_err("over the per-caller cap");
    assert_eq!(third.code(), Code::ResourceExhausted, "{third:?}");
    assert!(third.message().contains("--max-watch-streams-per-caller"), "{third:?}");
    let _other = watch("f-secret").await.expect("another caller");
    let full = watch("f-secret").await.expect_err("over the total cap");
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    assert!(full.message().contains("--max-watch-streams)"), "{full:?}");
    drop(first);
    wait_for(Duration::from_secs(5), "the closed stream's place to be free", || async {
        watch("f-secret").await.ok()
    })
    .await;
}

/// A fleet of followers sharing one key is capped per follower, not as one caller: 300
/// streams of one key, each naming its follower, are all admitted under a per-caller cap
/// of 2; a follower past its own cap is refused, and the server-wide cap still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_caps_count_each_follower_of_a_shared_key() {
    let dir = tempfile::tempdir().expect("dir");
    let keys = dir.path().join("keys.toml");
    let toml = crate::callers::keys_toml(&[("fleet", "f-secret", &["follow"])], &[]);
    std::fs::write(&keys, toml).expect("write");
    let app = crate::helpers::spawn_with(Backend::Sqlite, |c| {
        c.api_keys_file = Some(keys);
        c.max_watch_streams = 302;
        c.max_watch_streams_per_caller = 2;
    })
    .await;
    let mut channels = Vec::new();
    for _ in 0..3 {
        channels.push(connect(app.addr).await);
    }
    let watch = |i: usize, follower: Option<String>| {
        let mut client = pb::role_check_client::RoleCheckClient::new(channels[i % 3].clone());
        async move {
            let mut request = tonic::Request::new(pb::WatchRequest::default());
            let bearer = "Bearer f-secret".parse().expect("header");
            request.metadata_mut().insert("authorization", bearer);
            if let Some(follower) = follower {
                let name = follower.parse().expect("name");
                request.metadata_mut().insert(rolecheck::follower::FOLLOWER_HEADER, name);
            }
            client.watch(request).await.map(tonic::Response::into_inner)
        }
    };
    let mut open = Vec::new();
    for i in 0..300 {
        let stream = watch(i, Some(format!("pod-{i}"))).await;
        open.push(stream.unwrap_or_else(|s| panic!("follower {i}: {s:?}")));
    }
    let second = watch(0, Some("pod-0".into())).await.expect("pod-0's second stream");
    let third = watch(0, Some("pod-0".into())).await.expect_err("pod-0 over its cap");
    assert_eq!(third.code(), Code::ResourceExhausted, "{third:?}");
    let unnamed = watch(1, None).await.expect("the key itself, unnamed");
    let full = watch(2, Some("pod-300".into())).await.expect_err("over the server-wide cap");
    assert!(full.message().contains("--max-watch-streams)"), "{full:?}");
    drop((second, unnamed, open));
}

/// With 200 Watch streams open and writes landing, a steady Check load keeps its hit
/// ratio and the coherence lease never lapses: the watchers share one history reader,
/// and the heartbeat has its own connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_watchers_do_not_starve_the_heartbeat() {
    let app = crate::helpers::spawn_with(Backend::Postgres, |c| {
        c.db_max_connections = 4;
    })
    .await;
    app.create_tenant("acme").await;
    let (users, last) = crate::helpers::granted_readers(&app, "acme").await;
    let mut streams = Vec::new();
    for i in 0..200 {
        // 100 streams per connection, under the default 256 streams per connection.
        let channel = connect(app.addr).await;
        let mut client = pb::role_check_client::RoleCheckClient::new(channel);
        let stream = client
            .watch(pb::WatchRequest { after_revision: last, progress_ms: 0, epoch: String::new() })
            .await
            .unwrap_or_else(|s| panic!("watch {i}: {s:?}"))
            .into_inner();
        streams.push(stream);
    }
    for user in &users {
        assert!(app.check(user, "acme", "admin").await); // warm
    }
    let reconnects = metric(&app, "rolecheck_listener_reconnects").await.expect("metric");
    let hits = metric(&app, "rolecheck_cache_hits_total").await.expect("hits");
    let misses = metric(&app, "rolecheck_cache_misses_total").await.expect("misses");

    let writer = {
        let mut checks = app.checks.clone();
        tokio::spawn(async move {
            let mut revision = 0;
            for i in 0..50 {
                let grant = pb::GrantRequest {
                    user_id: format!("writer{i}"),
                    tenant_id: "acme".into(),
                    roles: vec!["viewer".into()],
                    expires_at: None,
                };
                revision = checks.grant(grant).await.expect("grant").into_inner().revision;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            revision
        })
    };
    let mut checked = 0u32;
    let mut lapses = 0u32;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        for user in &users {
            assert!(app.check(user, "acme", "admin").await);
            checked += 1;
        }
        if metric(&app, "rolecheck_cache_trusted").await != Some(1.0) {
            lapses += 1;
        }
    }
    let final_revision = writer.await.expect("writer");
    let hits = metric(&app, "rolecheck_cache_hits_total").await.expect("hits") - hits;
    let misses = metric(&app, "rolecheck_cache_misses_total").await.expect("misses") - misses;
    let ratio = hits / (hits + misses);
    eprintln!("200 watchers: {checked} checks, hit ratio {ratio:.4}, lease lapses {lapses}");
    assert_eq!(lapses, 0, "the lease lapsed during the load");
    assert_eq!(metric(&app, "rolecheck_listener_reconnects").await, Some(reconnects));
    assert!(ratio >= 0.99, "hit ratio {ratio:.4} over {checked} checks ({hits} hits)");
    // Every stream saw every write, in order, up to the last.
    for (i, stream) in streams.iter_mut().enumerate().step_by(20) {
        let mut seen = last;
        while seen < final_revision {
            let next = tokio::time::timeout(Duration::from_secs(5), stream.message())
                .await
                .unwrap_or_else(|_| panic!("stream {i} stalled at {seen}"))
                .expect("stream")
                .expect("open");
            assert_eq!(next.revision, seen + 1, "stream {i}: gapless");
            seen = next.revision;
        }
    }
}

/// A client that vanishes without closing its connection (its network goes silent) is
/// dropped by the server's keepalive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_client_is_reaped_by_keepalive() {
    let app = crate::helpers::spawn_with(Backend::Sqlite, |c| {
        c.keepalive_interval = Duration::from_millis(500);
        c.keepalive_timeout = Duration::from_millis(500);
    })
    .await;
    let proxy = Proxy::start_to(app.addr.to_string()).await;
    let channel = connect(proxy.addr).await;
    let mut client = pb::role_check_client::RoleCheckClient::new(channel);
    client.check(check_req("u", "", "r", 0)).await.expect("check through the proxy");
    assert_eq!(proxy.target_closed(), 0);
    proxy.silence();
    // Interval, then timeout, then the close: well inside 5 s (the defaults take 40 s).
    wait_for(Duration::from_secs(5), "the server to drop the silent client", || async {
        (proxy.target_closed() >= 1).then_some(())
    })
    .await;
}

/// A client that opens the HTTP port and never finishes its request headers is cut off
/// by hyper's header-read timeout (5 s), not kept forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_http_headers_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = crate::helpers::spawn(Backend::Sqlite).await;
    let mut slow = tokio::net::TcpStream::connect(app.http).await.expect("connect");
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await.expect("send");
    let started = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the connection was still open after 10 s");
    assert!(started.elapsed() >= Duration::from_secs(4), "cut after {:?}", started.elapsed());
    // Other clients are served meanwhile and after.
    let (head, _) = crate::helpers::http_get(&app, "/healthz").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

/// The HTTP port holds at most 256 connections: past that, a new one is closed at once,
/// and once some close, requests are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_port_has_a_connection_limit() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = crate::helpers::spawn(Backend::Sqlite).await;
    let mut held = Vec::new();
    for _ in 0..rolecheck::http::MAX_CONNECTIONS {
        let mut conn = tokio::net::TcpStream::connect(app.http).await.expect("connect");
        conn.write_all(b"GET /healthz HTTP/1.1\r\n").await.expect("half a request");
        held.push(conn);
    }
    // Each held connection is accepted (a full request on the last one would be answered);
    // one more is closed without an answer, well before the header timeout.
    let get = || async {
        let mut conn = tokio::net::TcpStream::connect(app.http).await.ok()?;
        conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut response = String::new();
        let read = tokio::time::timeout(Duration::from_secs(2), conn.read_to_string(&mut response));
        read.await.ok()?.ok()?;
        Some(response)
    };
    wait_for(Duration::from_secs(2), "the 257th connection to be closed", || async {
        get().await.filter(String::is_empty).map(|_| ())
    })
    .await;
    drop(held);
    let served = wait_for(Duration::from_secs(5), "requests to be served again", || async {
        get().await.filter(|r| r.starts_with("HTTP/1.1 200"))
    })
    .await;
    assert!(served.ends_with("ok\n"), "{served}");
}
