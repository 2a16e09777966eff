//! The nat-table rules of `meshlet init`, generated as text and nothing else.
//!
//! Everything here is a pure function of the settings (and, to stay idempotent, of what `iptables-save`
//! reported), so the exact rules can be unit-tested and printed by `--dry-run` without root. The scripts are in
//! `iptables-restore` syntax and are applied with `--noflush`: declaring a chain (`:MESHLET_OUTBOUND - [0:0]`)
//! creates it or empties it, so a second run replaces the rule set instead of adding another one, and the whole
//! change lands in one transaction.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// Chain hooked from `PREROUTING`: connections arriving at the pod.
pub const INBOUND_CHAIN: &str = "MESHLET_INBOUND";
/// Chain hooked from `OUTPUT`: connections the pod's processes open.
pub const OUTBOUND_CHAIN: &str = "MESHLET_OUTBOUND";

/// The jump rules that hook our chains into the built-in ones, exactly as `iptables-save` prints them.
const INBOUND_JUMP: &str = "PREROUTING -j MESHLET_INBOUND";
const OUTBOUND_JUMP: &str = "OUTPUT -j MESHLET_OUTBOUND";

/// An IP family: each has its own tool (`iptables` or `ip6tables`) and its own tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// `IPv4` or `IPv6`, for messages.
impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

impl Family {
    fn contains(self, addr: IpAddr) -> bool {
        matches!(
            (self, addr),
            (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_))
        )
    }
}

/// A TCP port or an inclusive range of ports, written `8080` or `8000-8100` (or `8000:8100`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// First port of the range.
    pub first: u16,
    /// Last port of the range (equal to `first` for a single port).
    pub last: u16,
}

impl PortRange {
    /// Whether `port` falls inside the range.
    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }

    /// A single port.
    pub fn single(port: u16) -> Self {
        PortRange {
            first: port,
            last: port,
        }
    }
}

/// Why a port or port range was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PortRangeError {
    #[error("`{0}` is not a port number between 1 and 65535")]
    NotAPort(String),
    #[error("range `{0}` ends before it starts")]
    Backwards(String),
}

impl FromStr for PortRange {
    type Err = PortRangeError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let value = value.trim();
        let port = |text: &str| match text.trim().parse::<u16>() {
            Ok(port) if port > 0 => Ok(port),
            _ => Err(PortRangeError::NotAPort(text.trim().to_string())),
        };
        let (first, last) = match value.split_once(['-', ':']) {
            Some((first, last)) => (port(first)?, port(last)?),
            None => (port(value)?, port(value)?),
        };
        if first > last {
            return Err(PortRangeError::Backwards(value.to_string()));
        }
        Ok(PortRange { first, last })
    }
}

/// Printed the way iptables' `--dport` takes it.
impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}:{}", self.first, self.last)
        }
    }
}

/// An IPv4 or IPv6 network, written `10.0.0.0/8` or `fd00::/8`; a bare address is a single host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The family whose table this network belongs in.
    pub fn family(&self) -> Family {
        match self.addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// Why a CIDR was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    #[error("`{0}` is not an IPv4 or IPv6 address")]
    BadAddress(String),
    #[error("prefix length `{prefix}` is not a number from 0 to {max}")]
    BadPrefix { prefix: String, max: u8 },
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let value = value.trim();
        let (addr_text, prefix_text) = match value.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (value, None),
        };
        let addr: IpAddr = addr_text
            .parse()
            .map_err(|_| CidrError::BadAddress(addr_text.to_string()))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix_text {
            None => max,
            Some(text) => match text.parse::<u8>() {
                Ok(prefix) if prefix <= max => prefix,
                _ => {
                    return Err(CidrError::BadPrefix {
                        prefix: text.to_string(),
                        max,
                    })
                }
            },
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// What to intercept and what to let through, already validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interception {
    /// Port of the proxy's outbound listener, where the app's connections are redirected.
    pub outbound_port: u16,
    /// Port of the proxy's inbound listener, where connections to the pod are redirected.
    pub inbound_port: u16,
    /// Port of the proxy's admin listener; probes and scrapes reach it directly.
    pub admin_port: u16,
    /// The proxy's own traffic must never be redirected, or it would loop back into itself.
    pub proxy_uid: u32,
    /// Also exempt this group's traffic, for proxies identified by group rather than user.
    pub proxy_gid: Option<u32>,
    /// Inbound destination ports that reach the app directly.
    pub skip_inbound_ports: Vec<PortRange>,
    /// Outbound destination ports that bypass the proxy.
    pub skip_outbound_ports: Vec<PortRange>,
    /// Outbound destination networks that bypass the proxy (each lands in its own family's table).
    pub skip_outbound_cidrs: Vec<Cidr>,
}

impl Interception {
    /// The rules inside our two chains for one family, in `iptables-restore` syntax (`-A CHAIN ...`).
    pub fn chain_rules(&self, family: Family) -> Vec<String> {
        let mut rules = Vec::new();

        let proxy_ports =
            [self.inbound_port, self.outbound_port, self.admin_port].map(PortRange::single);
        for port in proxy_ports.iter().chain(&self.skip_inbound_ports) {
            rules.push(format!(
                "-A {INBOUND_CHAIN} -p tcp -m tcp --dport {port} -j RETURN"
            ));
        }
        rules.push(format!(
            "-A {INBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {}",
            self.inbound_port
        ));

        rules.push(format!(
            "-A {OUTBOUND_CHAIN} -m owner --uid-owner {} -j RETURN",
            self.proxy_uid
        ));
        if let Some(gid) = self.proxy_gid {
            rules.push(format!(
                "-A {OUTBOUND_CHAIN} -m owner --gid-owner {gid} -j RETURN"
            ));
        }
        rules.push(format!("-A {OUTBOUND_CHAIN} -o lo -j RETURN"));
        for port in &self.skip_outbound_ports {
            rules.push(format!(
                "-A {OUTBOUND_CHAIN} -p tcp -m tcp --dport {port} -j RETURN"
            ));
        }
        for cidr in self
            .skip_outbound_cidrs
            .iter()
            .filter(|cidr| family.contains(cidr.addr))
        {
            rules.push(format!("-A {OUTBOUND_CHAIN} -d {cidr} -j RETURN"));
        }
        rules.push(format!(
            "-A {OUTBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {}",
            self.outbound_port
        ));
        rules
    }

    /// The script that leaves exactly one meshlet rule set in the nat table, whatever `existing` holds:
    /// our chains are (re)declared, which empties them, and the jumps into them are added or de-duplicated.
    pub fn install_script(&self, family: Family, existing: &NatState) -> String {
        let mut lines = vec![
            "*nat".to_string(),
            format!(":{INBOUND_CHAIN} - [0:0]"),
            format!(":{OUTBOUND_CHAIN} - [0:0]"),
        ];
        lines.extend(self.chain_rules(family));
        lines.extend(exactly_one(INBOUND_JUMP, existing.inbound_jumps));
        lines.extend(exactly_one(OUTBOUND_JUMP, existing.outbound_jumps));
        lines.push("COMMIT".to_string());
        lines.join("\n") + "\n"
    }
}

/// `-A` the jump if it is missing, `-D` the copies if there are several (`-D` removes the first match).
fn exactly_one(jump: &str, present: usize) -> Vec<String> {
    match present {
        0 => vec![format!("-A {jump}")],
        n => (1..n).map(|_| format!("-D {jump}")).collect(),
    }
}

/// The parts of the nat table that belong to meshlet, as read from `iptables-save -t nat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NatState {
    pub inbound_chain: bool,
    pub outbound_chain: bool,
    pub inbound_jumps: usize,
    pub outbound_jumps: usize,
}

impl NatState {
    /// What a table holding one meshlet rule set looks like; `--cleanup --dry-run` shows its removal.
    pub const INSTALLED: NatState = NatState {
        inbound_chain: true,
        outbound_chain: true,
        inbound_jumps: 1,
        outbound_jumps: 1,
    };

    /// Reads the output of `iptables-save -t nat` (empty when the table does not exist yet).
    pub fn parse(save_output: &str) -> Self {
        let mut state = NatState::default();
        for line in save_output.lines().map(str::trim) {
            if let Some(chain) = line
                .strip_prefix(':')
                .and_then(|rest| rest.split_whitespace().next())
            {
                state.inbound_chain |= chain == INBOUND_CHAIN;
                state.outbound_chain |= chain == OUTBOUND_CHAIN;
            } else if let Some(rule) = line.strip_prefix("-A ") {
                state.inbound_jumps += usize::from(rule == INBOUND_JUMP);
                state.outbound_jumps += usize::from(rule == OUTBOUND_JUMP);
            }
        }
        state
    }

    /// The script that removes every meshlet rule and chain, or `None` when there is nothing to remove.
    pub fn cleanup_script(&self) -> Option<String> {
        if *self == NatState::default() {
            return None;
        }
        let mut lines = vec!["*nat".to_string()];
        lines.extend((0..self.inbound_jumps).map(|_| format!("-D {INBOUND_JUMP}")));
        lines.extend((0..self.outbound_jumps).map(|_| format!("-D {OUTBOUND_JUMP}")));
        for (exists, chain) in [
            (self.inbound_chain, INBOUND_CHAIN),
            (self.outbound_chain, OUTBOUND_CHAIN),
        ] {
            if exists {
                // Declaring the chain empties it; only an empty chain can be deleted.
                lines.push(format!(":{chain} - [0:0]"));
                lines.push(format!("-X {chain}"));
            }
        }
        lines.push("COMMIT".to_string());
        Some(lines.join("\n") + "\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interception() -> Interception {
        Interception {
            outbound_port: 15001,
            inbound_port: 15006,
            admin_port: 15020,
            proxy_uid: 2102,
            proxy_gid: None,
            skip_inbound_ports: vec![],
            skip_outbound_ports: vec![],
            skip_outbound_cidrs: vec![],
        }
    }

    #[test]
    fn default_rules_exempt_the_proxy_and_loopback_then_redirect_tcp() {
        let rules = interception().chain_rules(Family::V4);
        assert_eq!(
            rules,
            [
                "-A MESHLET_INBOUND -p tcp -m tcp --dport 15006 -j RETURN",
                "-A MESHLET_INBOUND -p tcp -m tcp --dport 15001 -j RETURN",
                "-A MESHLET_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
                "-A MESHLET_INBOUND -p tcp -j REDIRECT --to-ports 15006",
                "-A MESHLET_OUTBOUND -m owner --uid-owner 2102 -j RETURN",
                "-A MESHLET_OUTBOUND -o lo -j RETURN",
                "-A MESHLET_OUTBOUND -p tcp -j REDIRECT --to-ports 15001",
            ]
        );
    }

    #[test]
    fn skips_come_before_the_redirects_and_cidrs_go_to_their_own_family() {
        let mut settings = interception();
        settings.proxy_gid = Some(2103);
        settings.skip_inbound_ports = vec!["22".parse().unwrap(), "9000-9100".parse().unwrap()];
        settings.skip_outbound_ports = vec!["443".parse().unwrap()];
        settings.skip_outbound_cidrs =
            vec!["10.96.0.0/12".parse().unwrap(), "fd00::/8".parse().unwrap()];

        let v4 = settings.chain_rules(Family::V4);
        let v6 = settings.chain_rules(Family::V6);
        for rules in [&v4, &v6] {
            assert!(rules
                .contains(&"-A MESHLET_INBOUND -p tcp -m tcp --dport 22 -j RETURN".to_string()));
            assert!(rules.contains(
                &"-A MESHLET_INBOUND -p tcp -m tcp --dport 9000:9100 -j RETURN".to_string()
            ));
            assert!(rules
                .contains(&"-A MESHLET_OUTBOUND -m owner --gid-owner 2103 -j RETURN".to_string()));
            assert!(rules
                .contains(&"-A MESHLET_OUTBOUND -p tcp -m tcp --dport 443 -j RETURN".to_string()));
            // Each chain ends with its redirect, so every exemption above it takes effect.
            let last_of = |chain: &str| {
                rules
                    .iter()
                    .rfind(|rule| rule.contains(chain))
                    .unwrap()
                    .clone()
            };
            assert!(last_of("MESHLET_INBOUND").contains("REDIRECT --to-ports 15006"));
            assert!(last_of("MESHLET_OUTBOUND").contains("REDIRECT --to-ports 15001"));
        }
        assert!(v4.contains(&"-A MESHLET_OUTBOUND -d 10.96.0.0/12 -j RETURN".to_string()));
        assert!(!v4.iter().any(|rule| rule.contains("fd00::/8")));
        assert!(v6.contains(&"-A MESHLET_OUTBOUND -d fd00::/8 -j RETURN".to_string()));
        assert!(!v6.iter().any(|rule| rule.contains("10.96.0.0/12")));
    }

    #[test]
    fn install_on_an_empty_table_declares_chains_and_adds_one_jump_each() {
        let script = interception().install_script(Family::V4, &NatState::default());
        assert!(
            script.starts_with("*nat\n:MESHLET_INBOUND - [0:0]\n:MESHLET_OUTBOUND - [0:0]\n"),
            "{script}"
        );
        assert!(script.ends_with(
            "-A PREROUTING -j MESHLET_INBOUND\n-A OUTPUT -j MESHLET_OUTBOUND\nCOMMIT\n"
        ));
    }

    #[test]
    fn install_over_an_existing_rule_set_adds_no_second_jump_and_removes_duplicates() {
        let once = interception().install_script(Family::V4, &NatState::INSTALLED);
        assert!(
            !once.contains("PREROUTING") && !once.contains("OUTPUT -j"),
            "{once}"
        );
        assert!(
            once.contains(":MESHLET_INBOUND - [0:0]"),
            "chains are re-declared, which empties them"
        );

        let twice = NatState {
            inbound_jumps: 3,
            outbound_jumps: 2,
            ..NatState::INSTALLED
        };
        let script = interception().install_script(Family::V4, &twice);
        assert_eq!(
            script.matches("-D PREROUTING -j MESHLET_INBOUND").count(),
            2
        );
        assert_eq!(script.matches("-D OUTPUT -j MESHLET_OUTBOUND").count(), 1);
        assert!(!script.contains("-A PREROUTING") && !script.contains("-A OUTPUT"));
    }

    #[test]
    fn state_is_read_from_iptables_save_output() {
        let save =
            "# Generated by iptables-nft-save v1.8.9 (nf_tables)\n*nat\n:PREROUTING ACCEPT [0:0]\n\
                    :OUTPUT ACCEPT [0:0]\n:MESHLET_INBOUND - [0:0]\n:MESHLET_OUTBOUND - [0:0]\n\
                    -A PREROUTING -j MESHLET_INBOUND\n-A OUTPUT -j MESHLET_OUTBOUND\n\
                    -A OUTPUT -j MESHLET_OUTBOUND\n-A OUTPUT -p tcp -j MESHLET_OUTBOUND\n\
                    -A MESHLET_OUTBOUND -o lo -j RETURN\nCOMMIT\n";
        let state = NatState::parse(save);
        assert_eq!(
            state,
            NatState {
                inbound_chain: true,
                outbound_chain: true,
                inbound_jumps: 1,
                outbound_jumps: 2
            }
        );
        assert_eq!(NatState::parse(""), NatState::default());
    }

    #[test]
    fn cleanup_removes_jumps_before_emptying_and_deleting_chains() {
        assert_eq!(NatState::default().cleanup_script(), None);
        let script = NatState {
            outbound_jumps: 2,
            ..NatState::INSTALLED
        }
        .cleanup_script()
        .unwrap();
        assert_eq!(
            script,
            "*nat\n-D PREROUTING -j MESHLET_INBOUND\n-D OUTPUT -j MESHLET_OUTBOUND\n-D OUTPUT -j MESHLET_OUTBOUND\n\
             :MESHLET_INBOUND - [0:0]\n-X MESHLET_INBOUND\n:MESHLET_OUTBOUND - [0:0]\n-X MESHLET_OUTBOUND\nCOMMIT\n"
        );
        let only_chain = NatState {
            outbound_chain: true,
            ..NatState::default()
        }
        .cleanup_script()
        .unwrap();
        assert_eq!(
            only_chain,
            "*nat\n:MESHLET_OUTBOUND - [0:0]\n-X MESHLET_OUTBOUND\nCOMMIT\n"
        );
    }

    #[test]
    fn ports_and_ranges_parse_and_bad_ones_say_why() {
        assert_eq!("8080".parse(), Ok(PortRange::single(8080)));
        assert_eq!(
            "8000-8100".parse::<PortRange>().unwrap().to_string(),
            "8000:8100"
        );
        assert_eq!(
            "8000:8100".parse::<PortRange>().unwrap().to_string(),
            "8000:8100"
        );
        assert_eq!(
            "0".parse::<PortRange>(),
            Err(PortRangeError::NotAPort("0".into()))
        );
        assert_eq!(
            "70000".parse::<PortRange>(),
            Err(PortRangeError::NotAPort("70000".into()))
        );
        assert_eq!(
            "http".parse::<PortRange>(),
            Err(PortRangeError::NotAPort("http".into()))
        );
        assert_eq!(
            "9-3".parse::<PortRange>(),
            Err(PortRangeError::Backwards("9-3".into()))
        );
    }

    #[test]
    fn cidrs_parse_for_both_families_and_bad_ones_say_why() {
        let v4: Cidr = "10.0.0.0/8".parse().unwrap();
        assert_eq!(
            (v4.family(), v4.to_string()),
            (Family::V4, "10.0.0.0/8".to_string())
        );
        let host: Cidr = "fd00::1".parse().unwrap();
        assert_eq!(
            (host.family(), host.to_string()),
            (Family::V6, "fd00::1/128".to_string())
        );
        assert_eq!(
            "10.0.0.0/33".parse::<Cidr>(),
            Err(CidrError::BadPrefix {
                prefix: "33".into(),
                max: 32
            })
        );
        assert_eq!(
            "fd00::/129".parse::<Cidr>(),
            Err(CidrError::BadPrefix {
                prefix: "129".into(),
                max: 128
            })
        );
        assert_eq!(
            "10.0.0/8".parse::<Cidr>(),
            Err(CidrError::BadAddress("10.0.0".into()))
        );
    }
}
