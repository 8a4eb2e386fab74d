//! Opening what a server stands on: the store (retried while unreachable at start), the
//! follower's upstream, and `rolecheck migrate`.

use std::{future::Future, time::Duration};

use crate::{
    config::Config,
    domain::TenantId,
    error::{Error, Result},
    follower::{UpstreamOptions, UpstreamStore},
    store::{self, Store, StoreOptions},
};

/// Applies the migrations and exits: `rolecheck migrate` (creating the Postgres
/// database first with `--create-database`).
pub async fn migrate(args: &crate::config::MigrateArgs) -> Result<()> {
    let config = args.config();
    config.validate()?;
    let application_id = TenantId::parse("application_id", &config.application_id)?;
    if args.create_database {
        // Straight to Postgres: a pooler knows only the databases that exist.
        let direct = config.listen_database_url.as_ref().or(config.database_url.as_ref());
        match direct.filter(|_| !config.embedded_store()) {
            Some(url) => {
                let within = config.db_acquire_timeout.max(config.db_query_timeout);
                let created =
                    retry_at_start(&config, || store::diagnose::create_database(&url.0, within))
                        .await?;
                tracing::info!(created, "the database is there");
            }
            None => tracing::info!("--create-database: the embedded store creates its own file"),
        }
    }
    let store = open_store(&config, &application_id, true).await?;
    store.backend.close().await;
    Ok(())
}

/// The follower's upstream, from the settings (checked by [`Config::validate`]).
pub(super) fn follow(config: &Config, url: &str) -> Result<UpstreamStore> {
    UpstreamStore::connect(UpstreamOptions {
        url: url.to_owned(),
        key_file: config.upstream_key_file.clone(),
        ca: config.upstream_ca.clone(),
        cert: config.upstream_cert.clone().zip(config.upstream_cert_key.clone()),
        progress: (config.coherence_lease / 10).max(Duration::from_millis(10)),
        silence: config.coherence_lease * 2,
        lease: config.coherence_lease,
        timeout: config.db_query_timeout,
    })
}

/// Retries `call` while it is `UNAVAILABLE`, for `--db-startup-wait`.
pub(super) async fn retry_at_start<T, F, Fut>(config: &Config, mut call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let deadline = tokio::time::Instant::now() + config.db_startup_wait;
    let mut backoff = Duration::from_millis(100);
    loop {
        match call().await {
            Err(Error::Unavailable(reason)) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(%reason, retry_in = ?backoff, "not reachable yet; retrying (--db-startup-wait)");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(Error::Unavailable(reason)) => {
                return Err(Error::Unavailable(format!(
                    "{reason} (gave up after --db-startup-wait {:?})",
                    config.db_startup_wait
                )));
            }
            other => return other,
        }
    }
}

/// Opens the store, retrying an unreachable database for `--db-startup-wait`.
pub(super) async fn open_store(
    config: &Config,
    application_id: &TenantId,
    migrate: bool,
) -> Result<Store> {
    let options = StoreOptions {
        max_connections: config.db_max_connections,
        acquire_timeout: config.db_acquire_timeout,
        query_timeout: config.db_query_timeout,
        listener_silence: listener_silence(config.coherence_lease),
        fault_after_commit: config.fault_delay_after_commit,
        transaction_pooling: config.database_pool_mode == "transaction",
        listen_url: config.listen_database_url.as_ref().map(|url| url.0.clone()),
        read_url: config.read_database_url.as_ref().map(|url| url.0.clone()),
    };
    let url = config.database_url.as_ref().map(|url| url.0.as_str());
    retry_at_start(config, || store::open(url, &config.data_dir, application_id, &options, migrate))
        .await
}

/// How long the change listener may hear nothing before it reconnects: two leases (it
/// hears its own sync every 100 ms, so silence that long is no accident), at least 500 ms.
fn listener_silence(lease: Duration) -> Duration {
    (lease * 2).max(Duration::from_millis(500))
}
