//! The `rolecheck` binary: parse configuration, start telemetry, run.

use clap::Parser;
use rolecheck::{config::Cli, server, telemetry};

/// mimalloc instead of glibc's malloc: with a million users cached and entries being
/// evicted, glibc's `_int_malloc` took 28 % of a `CheckBatch`'s CPU walking fragmented
/// free lists (perf, 10 M memberships; see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let (serve, config) = Cli::parse().into_command();
    telemetry::init_with(&config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        if serve {
            let stop = server::shutdown_signal();
            let server = server::Server::bind(config).await?;
            server.run(stop).await?;
        } else {
            server::migrate(&config).await?;
            tracing::info!("migrations applied");
        }
        Ok(())
    })
}
