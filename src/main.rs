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
    /// Add the mesh's init and proxy containers to the workloads in a YAML file (`-` = stdin); prints
    /// the result on stdout and the warnings on stderr.
    Inject {
        /// Manifests to inject (multi-document YAML, Lists allowed), or `-` for stdin.
        file: std::path::PathBuf,
        /// Injection settings (the chart's `inject.yaml`); built-in defaults when absent.
        #[arg(long, env = "MESHLET_INJECT_CONFIG")]
        config: Option<std::path::PathBuf>,
    },
    /// Wait until the local proxy reports ready (the injected app container's postStart hook, so the app
    /// starts only once its sidecar can carry its traffic).
    WaitReady {
        /// The proxy's admin address.
        #[arg(long, env = "MESHLET_ADMIN_ADDR", default_value = "127.0.0.1:15020")]
        admin_addr: std::net::SocketAddr,
        /// Give up (exit non-zero) after this long.
        #[arg(long, default_value = "120s", value_parser = meshlet::config::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Show the mesh's golden signals (success rate, requests/s, latency) per service or edge, from the
    /// control plane.
    Stat(meshlet::stat::StatArgs),
    /// Print the version.
    Version,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Proxy(args) => meshlet::app::run(*args),
        Command::Init(args) => Ok(meshlet::init::run(&args)?),
        Command::Demo(args) => meshlet::demo::run(args),
        Command::Stat(args) => meshlet::stat::run(args),
        Command::WaitReady {
            admin_addr,
            timeout,
        } => meshlet::admin::wait_ready(admin_addr, timeout),
        Command::Inject { file, config } => {
            let config = match config {
                Some(path) => meshlet::inject::InjectConfig::from_yaml_file(&path)?,
                None => meshlet::inject::InjectConfig::default(),
            };
            let input = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&file)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?
            };
            let injected = meshlet::inject::inject_yaml(&input, &config)?;
            for warning in &injected.warnings {
                eprintln!("warning: {warning}");
            }
            print!("{}", injected.yaml);
            Ok(())
        }
        Command::Version => {
            println!("meshlet {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}
