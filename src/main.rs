//! The `meshlet` command line: the sidecar proxy and its companions.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "meshlet",
    version,
    about = "A lightweight service-mesh sidecar proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar proxy (outbound, inbound and admin listeners).
    Proxy(meshlet::config::ProxyArgs),
    /// Print the version.
    Version,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Proxy(_args) => anyhow::bail!("proxy: not wired yet"),
        Command::Version => {
            println!("meshlet {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}
