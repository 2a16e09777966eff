//! `meshlet init`: the nat-table rules that make interception transparent, like linkerd's proxy-init.
//!
//! It runs once per pod, as root, before the app starts (an init container). Two chains of our own are hooked
//! from the built-in ones:
//! - `MESHLET_OUTBOUND` (from `OUTPUT`): the app's TCP connections go to the proxy's outbound port, except the
//!   proxy's own (by uid, and gid if given; otherwise the proxy's upstream connections would loop back into
//!   it), loopback, and the skipped ports and networks.
//! - `MESHLET_INBOUND` (from `PREROUTING`): TCP connections arriving at the pod go to the proxy's inbound port,
//!   except those to the proxy's own ports and the skipped ones.
//!
//! `rules` generates the rules as text (pure, unit-tested, printed by `--dry-run`); `iptables` applies them.

mod iptables;
pub mod rules;

use std::io;
use std::process::ExitStatus;
use std::str::FromStr;

use clap::{ArgAction, Args, ValueEnum};

use iptables::Iptables;
use rules::{Cidr, Family, Interception, NatState, PortRange};

/// Which iptables back end writes the rules. Both exist on Debian; the node's choice must be followed,
/// because rules written through the other one are invisible to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IptablesMode {
    /// `iptables-nft`: nf_tables underneath (Debian's default).
    Nft,
    /// `iptables-legacy`: the old x_tables kernel interface.
    Legacy,
}

/// A comma-separated list flag that may be repeated. An empty value means "none", because Kubernetes
/// manifests often set a list variable to `""` rather than leaving it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct List<T>(pub Vec<T>);

impl<T: FromStr> FromStr for List<T> {
    type Err = T::Err;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        value
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map(List)
    }
}

/// All the items of a repeated list flag.
fn flatten<T: Clone>(lists: &[List<T>]) -> Vec<T> {
    lists
        .iter()
        .flat_map(|list| list.0.iter().cloned())
        .collect()
}

/// Settings of `meshlet init`.
#[derive(Debug, Clone, Args)]
pub struct InitArgs {
    /// Uid the proxy runs as; its own traffic is never redirected.
    #[arg(
        long,
        env = "MESHLET_PROXY_UID",
        default_value_t = 2102,
        value_name = "UID"
    )]
    pub proxy_uid: u32,

    /// Gid whose traffic is never redirected either (optional).
    #[arg(long, env = "MESHLET_PROXY_GID", value_name = "GID")]
    pub proxy_gid: Option<u32>,

    /// Port of the proxy's outbound listener, where the app's connections are redirected.
    #[arg(long, env = "MESHLET_OUTBOUND_PORT", default_value_t = 15001,
          value_parser = clap::value_parser!(u16).range(1..), value_name = "PORT")]
    pub outbound_port: u16,

    /// Port of the proxy's inbound listener, where connections to the pod are redirected.
    #[arg(long, env = "MESHLET_INBOUND_PORT", default_value_t = 15006,
          value_parser = clap::value_parser!(u16).range(1..), value_name = "PORT")]
    pub inbound_port: u16,

    /// Port of the proxy's admin listener, reached directly by probes and scrapers.
    #[arg(long, env = "MESHLET_ADMIN_PORT", default_value_t = 15020,
          value_parser = clap::value_parser!(u16).range(1..), value_name = "PORT")]
    pub admin_port: u16,

    /// Inbound ports (or ranges such as 9000-9100) that reach the app without the proxy.
    #[arg(long, env = "MESHLET_SKIP_INBOUND_PORTS", value_name = "PORT,...")]
    pub skip_inbound_ports: Vec<List<PortRange>>,

    /// Outbound destination ports (or ranges) that bypass the proxy.
    #[arg(long, env = "MESHLET_SKIP_OUTBOUND_PORTS", value_name = "PORT,...")]
    pub skip_outbound_ports: Vec<List<PortRange>>,

    /// Outbound destination networks that bypass the proxy, IPv4 or IPv6 (e.g. 169.254.169.254/32,fd00::/8).
    #[arg(long, env = "MESHLET_SKIP_OUTBOUND_CIDRS", value_name = "CIDR,...")]
    pub skip_outbound_cidrs: Vec<List<Cidr>>,

    /// Also install the rules for IPv6 (ip6tables).
    #[arg(long, env = "MESHLET_IPV6", default_value_t = true, action = ArgAction::Set, value_name = "BOOL")]
    pub ipv6: bool,

    /// iptables back end; it must match the one the node uses.
    #[arg(long, env = "MESHLET_IPTABLES_MODE", value_enum, default_value_t = IptablesMode::Nft)]
    pub iptables_mode: IptablesMode,

    /// Print what would be applied, in iptables-restore syntax, and change nothing.
    #[arg(long, env = "MESHLET_DRY_RUN")]
    pub dry_run: bool,

    /// Remove meshlet's rules and chains instead of installing them (nothing to remove is not an error).
    #[arg(long, env = "MESHLET_CLEANUP")]
    pub cleanup: bool,
}

/// Why `meshlet init` could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("--skip-outbound-cidrs {0} is an IPv6 network but --ipv6 is false")]
    Ipv6Disabled(Cidr),
    #[error("could not run {program} (is the iptables package installed?): {source}")]
    Spawn { program: String, source: io::Error },
    #[error("could not send the rules to {program}: {source}")]
    Write { program: String, source: io::Error },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
}

impl InitArgs {
    /// The validated interception settings.
    pub fn interception(&self) -> Result<Interception, InitError> {
        let skip_outbound_cidrs = flatten(&self.skip_outbound_cidrs);
        if !self.ipv6 {
            if let Some(cidr) = skip_outbound_cidrs
                .iter()
                .find(|cidr| cidr.family() == Family::V6)
            {
                return Err(InitError::Ipv6Disabled(*cidr));
            }
        }
        Ok(Interception {
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            admin_port: self.admin_port,
            proxy_uid: self.proxy_uid,
            proxy_gid: self.proxy_gid,
            skip_inbound_ports: flatten(&self.skip_inbound_ports),
            skip_outbound_ports: flatten(&self.skip_outbound_ports),
            skip_outbound_cidrs,
        })
    }

    fn families(&self) -> Vec<Family> {
        if self.ipv6 {
            vec![Family::V4, Family::V6]
        } else {
            vec![Family::V4]
        }
    }
}

/// Installs (or with `--cleanup` removes) the rules, or with `--dry-run` prints them.
pub fn run(args: &InitArgs) -> Result<(), InitError> {
    if args.dry_run {
        print!("{}", dry_run(args)?);
        return Ok(());
    }
    let interception = args.interception()?;
    for family in args.families() {
        let iptables = Iptables::new(args.iptables_mode, family);
        let existing = NatState::parse(&iptables.save_nat()?);
        let script = if args.cleanup {
            existing.cleanup_script()
        } else {
            Some(interception.install_script(family, &existing))
        };
        match script {
            Some(script) => {
                iptables.restore(&script)?;
                let action = if args.cleanup { "removed" } else { "installed" };
                println!(
                    "meshlet init: {family} rules {action} ({})",
                    iptables.restore_command()
                );
            }
            None => println!("meshlet init: no {family} rules to remove"),
        }
    }
    Ok(())
}

/// What `run` would apply to a table holding no meshlet rules (or, with `--cleanup`, exactly one rule set),
/// as the restore command of each family followed by its script.
pub fn dry_run(args: &InitArgs) -> Result<String, InitError> {
    let interception = args.interception()?;
    let mut out = String::new();
    for family in args.families() {
        let script = if args.cleanup {
            NatState::INSTALLED.cleanup_script().unwrap_or_default()
        } else {
            interception.install_script(family, &NatState::default())
        };
        out.push_str(&format!(
            "# {}\n{script}",
            Iptables::new(args.iptables_mode, family).restore_command()
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: InitArgs,
    }

    fn parse(flags: &[&str]) -> Result<InitArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("init").chain(flags.iter().copied()))
            .map(|cli| cli.args)
    }

    #[test]
    fn defaults_match_the_proxy_ports_and_cover_both_families_with_nft() {
        let args = parse(&[]).unwrap();
        assert_eq!(
            (
                args.outbound_port,
                args.inbound_port,
                args.admin_port,
                args.proxy_uid
            ),
            (15001, 15006, 15020, 2102)
        );
        assert_eq!(args.iptables_mode, IptablesMode::Nft);
        assert_eq!(args.families(), [Family::V4, Family::V6]);
        assert!(!args.dry_run && !args.cleanup);
    }

    #[test]
    fn dry_run_shows_each_familys_restore_command_and_rules() {
        let args = parse(&[
            "--iptables-mode",
            "legacy",
            "--skip-outbound-cidrs",
            "10.96.0.0/12,fd00::/8",
        ])
        .unwrap();
        let out = dry_run(&args).unwrap();
        let (v4, v6) = out
            .split_once("# ip6tables-legacy-restore --noflush")
            .unwrap();
        assert!(
            v4.starts_with("# iptables-legacy-restore --noflush"),
            "{out}"
        );
        assert!(
            v4.contains("-A MESHLET_OUTBOUND -d 10.96.0.0/12 -j RETURN")
                && !v4.contains("fd00::/8"),
            "{out}"
        );
        assert!(
            v6.contains("-A MESHLET_OUTBOUND -d fd00::/8 -j RETURN")
                && !v6.contains("10.96.0.0/12"),
            "{out}"
        );

        let cleanup = dry_run(&parse(&["--cleanup", "--ipv6", "false"]).unwrap()).unwrap();
        assert!(
            cleanup.starts_with("# iptables-nft-restore --noflush")
                && !cleanup.contains("ip6tables"),
            "{cleanup}"
        );
        assert!(
            cleanup.contains("-X MESHLET_INBOUND")
                && cleanup.contains("-D OUTPUT -j MESHLET_OUTBOUND")
        );
    }

    #[test]
    fn an_ipv6_network_without_ipv6_names_the_flag_and_the_value() {
        let args = parse(&[
            "--ipv6",
            "false",
            "--skip-outbound-cidrs",
            "10.0.0.0/8,fd00::/8",
        ])
        .unwrap();
        let err = args.interception().unwrap_err().to_string();
        assert_eq!(
            err,
            "--skip-outbound-cidrs fd00::/8 is an IPv6 network but --ipv6 is false"
        );
    }

    #[test]
    fn list_flags_take_commas_repeats_and_empty_values() {
        let args = parse(&[
            "--skip-inbound-ports",
            "22, 80",
            "--skip-inbound-ports",
            "9000-9100",
            "--skip-outbound-ports=",
        ])
        .unwrap();
        let interception = args.interception().unwrap();
        assert_eq!(
            interception.skip_inbound_ports,
            ["22", "80", "9000-9100"].map(|p| p.parse().unwrap())
        );
        assert!(interception.skip_outbound_ports.is_empty());
    }

    #[test]
    fn bad_values_name_the_flag_and_the_value() {
        for (flag, value) in [
            ("--skip-outbound-cidrs", "10.0.0.0/33"),
            ("--skip-outbound-cidrs", "not-a-network"),
            ("--skip-inbound-ports", "0"),
            ("--skip-outbound-ports", "9-3"),
            ("--inbound-port", "0"),
            ("--proxy-uid", "-1"),
            ("--ipv6", "maybe"),
            ("--iptables-mode", "bpf"),
        ] {
            let err = parse(&[&format!("{flag}={value}")])
                .err()
                .unwrap()
                .to_string();
            assert!(
                err.contains(flag) && err.contains(value),
                "{flag} {value}: {err}"
            );
        }
    }
}
