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
    Proxy(Box<meshlet::config::ProxyArgs>),
    /// Install the iptables rules that send the pod's traffic through the proxy (run once, as root).
    Init(meshlet::init::InitArgs),
    /// Run the demo shop as a local mesh on loopback.
    Demo(meshlet::demo::DemoArgs),
    /// Print the version.
    Version,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Proxy(args) => meshlet::app::run(*args),
        Command::Init(args) => Ok(meshlet::init::run(&args)?),
        Command::Demo(args) => meshlet::demo::run(args),
        Command::Version => {
            println!("meshlet {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}
