//! `meshlet init`: what `--dry-run` prints, and, as root inside a network namespace of the test's own, that
//! running it twice leaves exactly one rule set and that `--cleanup` removes everything.

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::process::Command;

use common::MESHLET;
use netns::{describe, Netns};

/// Runs `meshlet init` with no iptables tool reachable, so a dry run that tried to run one would fail.
fn init_without_iptables(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(MESHLET)
        .arg("init")
        .args(args)
        .env("PATH", "/nonexistent")
        .envs(env.iter().copied())
        .output()
        .expect("run meshlet init")
}

/// The part of the dry-run output for one restore command (`iptables-…` or `ip6tables-…`).
fn section<'a>(output: &'a str, tool: &str) -> &'a str {
    let start = output
        .find(&format!("# {tool}"))
        .unwrap_or_else(|| panic!("no {tool} section in:\n{output}"));
    let rest = &output[start..];
    let end = rest.find("COMMIT").expect("section ends with COMMIT");
    &rest[..end]
}

#[test]
fn dry_run_prints_both_families_rules_and_runs_nothing() {
    let output = init_without_iptables(
        &[
            "--dry-run",
            "--proxy-uid=3000",
            "--proxy-gid=3001",
            "--skip-inbound-ports=22,9000-9100",
            "--skip-outbound-cidrs=169.254.169.254/32,fd00::/8",
        ],
        &[("MESHLET_SKIP_OUTBOUND_PORTS", "5432")],
    );
    assert!(output.status.success(), "{}", describe(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);

    for tool in [
        "iptables-nft-restore --noflush",
        "ip6tables-nft-restore --noflush",
    ] {
        let rules = section(&stdout, tool);
        for expected in [
            "-A MESHLET_OUTBOUND -m owner --uid-owner 3000 -j RETURN",
            "-A MESHLET_OUTBOUND -m owner --gid-owner 3001 -j RETURN",
            "-A MESHLET_OUTBOUND -o lo -j RETURN",
            "-A MESHLET_OUTBOUND -p tcp -m tcp --dport 5432 -j RETURN",
            "-A MESHLET_OUTBOUND -p tcp -j REDIRECT --to-ports 15001",
            "-A MESHLET_INBOUND -p tcp -m tcp --dport 15006 -j RETURN",
            "-A MESHLET_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
            "-A MESHLET_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
            "-A MESHLET_INBOUND -p tcp -m tcp --dport 9000:9100 -j RETURN",
            "-A MESHLET_INBOUND -p tcp -j REDIRECT --to-ports 15006",
            "-A PREROUTING -j MESHLET_INBOUND",
            "-A OUTPUT -j MESHLET_OUTBOUND",
        ] {
            assert!(
                rules.contains(expected),
                "{tool} lacks `{expected}`:\n{rules}"
            );
        }
    }
    let v4 = section(&stdout, "iptables-nft-restore");
    let v6 = section(&stdout, "ip6tables-nft-restore");
    assert!(
        v4.contains("-d 169.254.169.254/32 -j RETURN") && !v4.contains("fd00::/8"),
        "{v4}"
    );
    assert!(
        v6.contains("-d fd00::/8 -j RETURN") && !v6.contains("169.254.169.254"),
        "{v6}"
    );
}

#[test]
fn dry_run_follows_mode_and_family_flags() {
    let output = init_without_iptables(
        &["--dry-run", "--iptables-mode=legacy", "--ipv6=false"],
        &[],
    );
    assert!(output.status.success(), "{}", describe(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.starts_with("# iptables-legacy-restore --noflush"),
        "{stdout}"
    );
    assert!(!stdout.contains("ip6tables"), "{stdout}");

    let output = init_without_iptables(&["--dry-run", "--cleanup"], &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    for tool in ["iptables-nft-restore", "ip6tables-nft-restore"] {
        let rules = section(&stdout, tool);
        assert!(
            rules.contains("-D OUTPUT -j MESHLET_OUTBOUND") && rules.contains("-X MESHLET_INBOUND"),
            "{rules}"
        );
    }
}

/// Flags, environment, and the flag and value the error message must name.
type BadValue = (
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
    &'static str,
    &'static str,
);

#[test]
fn bad_values_name_the_flag_and_the_value() {
    let cases: [BadValue; 4] = [
        (
            &["--skip-outbound-cidrs=10.0.0.0/33"],
            &[],
            "--skip-outbound-cidrs",
            "10.0.0.0/33",
        ),
        (
            &[],
            &[("MESHLET_SKIP_INBOUND_PORTS", "22,http")],
            "--skip-inbound-ports",
            "http",
        ),
        (&["--iptables-mode=bpf"], &[], "--iptables-mode", "bpf"),
        (
            &["--ipv6=false", "--skip-outbound-cidrs=fd00::/8"],
            &[],
            "--skip-outbound-cidrs",
            "fd00::/8",
        ),
    ];
    for (args, env, flag, value) in cases {
        let output = init_without_iptables(&[&["--dry-run"], args].concat(), env);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} {env:?} was accepted");
        assert!(
            stderr.contains(flag) && stderr.contains(value),
            "{args:?} {env:?}: {stderr}"
        );
    }
}

#[test]
fn a_missing_iptables_tool_is_reported_by_name() {
    let output = init_without_iptables(&[], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{}", describe(&output));
    assert!(stderr.contains("iptables-nft-save"), "{stderr}");
}

/// `iptables-save -t nat` (or `ip6tables-save`) of the namespace, in the given mode.
fn nat_table(netns: &Netns, tool: &str) -> String {
    netns.run(&[tool, "-t", "nat"])
}

#[test]
fn init_twice_leaves_one_rule_set_and_cleanup_removes_it() {
    let Some(_lock) = netns::lock_if_root("init_twice_leaves_one_rule_set_and_cleanup_removes_it")
    else {
        return;
    };
    for mode in ["nft", "legacy"] {
        // A namespace per mode: the two back ends keep separate tables.
        let netns = Netns::create(&format!("init-{mode}"));
        let init = |args: &[&str]| {
            netns.run(&[&[MESHLET, "init", "--iptables-mode", mode], args].concat())
        };

        init(&["--skip-outbound-ports=443"]);
        init(&[
            "--skip-outbound-ports=8443",
            "--skip-outbound-cidrs=10.96.0.0/12,fd00::/8",
        ]);

        for (family, cidr, other_cidr) in [
            ("iptables", "10.96.0.0/12", "fd00::/8"),
            ("ip6tables", "fd00::/8", "10.96.0.0/12"),
        ] {
            let table = nat_table(&netns, &format!("{family}-{mode}-save"));
            let count = |rule: &str| table.lines().filter(|line| line.trim() == rule).count();
            for rule in [
                ":MESHLET_INBOUND - [0:0]",
                ":MESHLET_OUTBOUND - [0:0]",
                "-A PREROUTING -j MESHLET_INBOUND",
                "-A OUTPUT -j MESHLET_OUTBOUND",
                "-A MESHLET_OUTBOUND -m owner --uid-owner 2102 -j RETURN",
                "-A MESHLET_OUTBOUND -o lo -j RETURN",
                "-A MESHLET_OUTBOUND -p tcp -m tcp --dport 8443 -j RETURN",
                &format!("-A MESHLET_OUTBOUND -d {cidr} -j RETURN"),
                "-A MESHLET_OUTBOUND -p tcp -j REDIRECT --to-ports 15001",
                "-A MESHLET_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
                "-A MESHLET_INBOUND -p tcp -j REDIRECT --to-ports 15006",
            ] {
                assert_eq!(
                    count(rule),
                    1,
                    "{family}-{mode}: `{rule}` should appear once:\n{table}"
                );
            }
            assert!(
                !table.contains("--dport 443 "),
                "the first run's rules were replaced:\n{table}"
            );
            assert!(
                !table.contains(other_cidr),
                "{family}-{mode} got the other family's network:\n{table}"
            );
        }

        init(&["--cleanup"]);
        init(&["--cleanup"]);
        for family in ["iptables", "ip6tables"] {
            let table = nat_table(&netns, &format!("{family}-{mode}-save"));
            assert!(
                !table.contains("MESHLET"),
                "{family}-{mode} after --cleanup:\n{table}"
            );
        }
    }
}

#[test]
fn a_failing_iptables_command_is_reported_with_its_stderr() {
    let Some(_lock) = netns::lock_if_root("a_failing_iptables_command_is_reported_with_its_stderr")
    else {
        return;
    };
    let netns = Netns::create("init-fail");
    // A chain of that name that something else jumps to cannot be deleted, so the cleanup's `-X` fails.
    netns.run(&["iptables-nft", "-t", "nat", "-N", "MESHLET_OUTBOUND"]);
    netns.run(&["iptables-nft", "-t", "nat", "-N", "OTHER"]);
    netns.run(&[
        "iptables-nft",
        "-t",
        "nat",
        "-A",
        "OTHER",
        "-j",
        "MESHLET_OUTBOUND",
    ]);

    let output = netns
        .command(&[MESHLET, "init", "--cleanup"])
        .output()
        .expect("run meshlet init");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{}", describe(&output));
    assert!(
        stderr.contains("iptables-nft-restore --noflush") && stderr.contains("failed"),
        "{stderr}"
    );
    assert!(
        stderr.contains("Device or resource busy"),
        "iptables' own message is included: {stderr}"
    );
}
