//! `meshlet-control`: the meshlet control plane binary.

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "meshlet-control",
    version,
    about = "meshlet control plane: workload identity (SPIFFE certificates)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane: certificate issuance API and admin endpoint.
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    config: meshlet_control::Config,
    /// Log filter, e.g. `info` or `meshlet_control=debug`.
    #[arg(long, env = "MESHLET_CONTROL_LOG", default_value = "info")]
    log: String,
    /// Log line format.
    #[arg(
        long,
        env = "MESHLET_CONTROL_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> anyhow::Result<()> {
    let Command::Serve(args) = Cli::parse().command;
    let filter = EnvFilter::try_new(&args.log)
        .map_err(|e| anyhow::anyhow!("invalid --log {:?}: {e}", args.log))?;
    // A closed stderr must not turn every logged request into a panic (by default write errors are reported
    // with `eprintln!`, which panics when stderr is gone).
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    match args.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(meshlet_control::serve(args.config))?;
    Ok(())
}
