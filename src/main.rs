//! The `rolecheck` binary: parse configuration, start telemetry, run.

use clap::Parser;
use rolecheck::{config::Cli, server, telemetry};

fn main() -> anyhow::Result<()> {
    let (serve, config) = Cli::parse().into_command();
    telemetry::init_with(&config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        if serve {
            let server = server::Server::bind(config).await?;
            server.run(server::shutdown_signal()).await?;
        } else {
            server::migrate(&config).await?;
            tracing::info!("migrations applied");
        }
        Ok(())
    })
}
