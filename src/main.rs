//! The `rolecheck` binary: parse configuration, start telemetry, run.

use clap::Parser;
use rolecheck::{
    config::{Cli, Run},
    doctor, server, telemetry,
};

/// mimalloc instead of glibc's malloc: with a million users cached and entries being
/// evicted, glibc's `_int_malloc` took 28 % of a `CheckBatch`'s CPU walking fragmented
/// free lists (perf, 10 M memberships; see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<std::process::ExitCode> {
    let run = Cli::parse().into_run();
    telemetry::init_with(run.log_format());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let ran: anyhow::Result<std::process::ExitCode> = runtime.block_on(async {
        match run {
            Run::Serve(config) => {
                let stop = server::shutdown_signal();
                server::Server::bind(config).await?.run(stop).await?;
            }
            Run::Migrate(args) => {
                server::migrate(&args).await?;
                tracing::info!("migrations applied");
            }
            Run::Model(command) => return Ok(rolecheck::cli::model(command).await?),
            Run::Admin(command) => return Ok(rolecheck::cli::admin(command).await?),
            Run::Completions(shell) => {
                let mut command = <Cli as clap::CommandFactory>::command();
                clap_complete::generate(shell, &mut command, "rolecheck", &mut std::io::stdout());
            }
            Run::Doctor(config) => {
                let report = doctor::check(&config).await;
                print!("{}", report.render());
                if !report.passed() {
                    return Ok(std::process::ExitCode::FAILURE);
                }
            }
        }
        Ok(std::process::ExitCode::SUCCESS)
    });
    // What went wrong and what to do, in one line (the causes after it), never a
    // backtrace: start-up errors are read by operators.
    Ok(ran.unwrap_or_else(|err| {
        eprintln!("Error: {err:#}");
        std::process::ExitCode::FAILURE
    }))
}
