//! `sluice-bench`: Sluice's benchmarks against freshly started servers
//! (`sluice-bench append|workers|projections|sagas`; `sluice bench ...`
//! hands over to this binary).

use std::process::ExitCode;

use clap::Parser;

/// Benchmarks against a freshly started server.
#[derive(Debug, Parser)]
#[command(name = "sluice-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: sluice_bench::BenchCommand,
}

/// The product binary's allocator, so the figures measure what runs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            // The same variable and default as `sluice` itself.
            tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match sluice_bench::run(cli.command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(ToString::to_string).collect();
            eprintln!("error: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}
