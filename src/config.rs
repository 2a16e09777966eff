//! Every setting of `meshlet proxy`, in one place.
//!
//! Each setting has a flag and a `MESHLET_*` environment variable (the flag wins). Values are parsed by clap
//! at start-up, so a bad value stops the proxy with a message naming the flag and the value, before any
//! listener is bound.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use serde::Serialize;

/// Ports whose protocol speaks first from the server (or is binary from byte one), so waiting for the
/// client to send an HTTP request line would only add the detection timeout to every connection.
/// SMTP, MySQL, Galera, PostgreSQL, Redis, Elasticsearch transport, memcached, MongoDB, NATS.
pub const DEFAULT_OPAQUE_PORTS: &str = "25,587,3306,4222,4444,5432,6379,9300,11211,27017";

/// Settings of the sidecar proxy.
#[derive(Debug, Clone, Args, Serialize)]
pub struct ProxyArgs {
    /// Outbound listeners: connections redirected from the app by iptables, or explicit HTTP proxy clients.
    #[arg(
        long = "outbound-addr",
        env = "MESHLET_OUTBOUND_ADDR",
        value_delimiter = ',',
        default_value = "127.0.0.1:15001,[::1]:15001",
        value_name = "ADDR,..."
    )]
    pub outbound_addrs: Vec<SocketAddr>,

    /// Inbound listeners: connections redirected to the pod's own ports (IPv4 and IPv6), and mTLS from peer
    /// sidecars.
    #[arg(
        long = "inbound-addr",
        env = "MESHLET_INBOUND_ADDR",
        value_delimiter = ',',
        default_value = "0.0.0.0:15006,[::]:15006",
        value_name = "ADDR,..."
    )]
    pub inbound_addrs: Vec<SocketAddr>,

    /// Admin listener: /metrics, /live, /ready, /config, POST /shutdown.
    #[arg(
        long,
        env = "MESHLET_ADMIN_ADDR",
        default_value = "0.0.0.0:15020",
        value_name = "ADDR"
    )]
    pub admin_addr: SocketAddr,

    /// Worker threads of the data plane. A sidecar shares its pod's CPU: one or two is plenty.
    #[arg(long, env = "MESHLET_WORKERS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub workers: u16,

    /// Destination ports that skip protocol detection and are proxied as opaque TCP.
    #[arg(long, env = "MESHLET_OPAQUE_PORTS", value_delimiter = ',', default_value = DEFAULT_OPAQUE_PORTS,
          value_name = "PORT,...")]
    pub opaque_ports: Vec<u16>,

    /// How long to wait for the client's first bytes before treating the connection as opaque TCP
    /// (server-speaks-first protocols send nothing).
    #[arg(long, env = "MESHLET_DETECT_TIMEOUT", default_value = "1s", value_parser = parse_duration,
          value_name = "DURATION")]
    #[serde(with = "humantime_serde_compat")]
    pub detect_timeout: Duration,

    /// Time allowed for a client to send a complete request head (answered with 408 after it).
    #[arg(long, env = "MESHLET_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration,
          value_name = "DURATION")]
    #[serde(with = "humantime_serde_compat")]
    pub header_read_timeout: Duration,

    /// Largest request head accepted, in bytes (answered with 431 above it).
    #[arg(long, env = "MESHLET_MAX_HEADER_BYTES", default_value_t = 65536,
          value_parser = clap::value_parser!(u32).range(1024..=1_048_576))]
    pub max_header_bytes: u32,

    /// Time allowed to establish a TCP connection to the upstream (502 after it).
    #[arg(long, env = "MESHLET_CONNECT_TIMEOUT", default_value = "3s", value_parser = parse_duration,
          value_name = "DURATION")]
    #[serde(with = "humantime_serde_compat")]
    pub connect_timeout: Duration,

    /// Time allowed for the upstream to start its response once the request is sent (504 after it).
    #[arg(long, env = "MESHLET_RESPONSE_TIMEOUT", default_value = "60s", value_parser = parse_duration,
          value_name = "DURATION")]
    #[serde(with = "humantime_serde_compat")]
    pub response_timeout: Duration,

    /// Opaque TCP connections with no bytes either way for this long are closed.
    #[arg(long, env = "MESHLET_TCP_IDLE_TIMEOUT", default_value = "1h", value_parser = parse_duration,
          value_name = "DURATION")]
    #[serde(with = "humantime_serde_compat")]
    pub tcp_idle_timeout: Duration,

    /// Idle upstream HTTP connections are closed after this long.
    #[arg(long, env = "MESHLET_POOL_IDLE_TIMEOUT", default_value = "90s", value_parser = parse_duration,
          value_name = "DURATION")]
    #[serde(with = "humantime_serde_compat")]
    pub pool_idle_timeout: Duration,

    /// Idle upstream HTTP/1 connections kept per destination.
    #[arg(long, env = "MESHLET_POOL_MAX_IDLE", default_value_t = 64)]
    pub pool_max_idle_per_destination: usize,

    /// Connections accepted at once across all listeners; more wait in the kernel backlog.
    #[arg(long, env = "MESHLET_MAX_CONNECTIONS", default_value_t = 20_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// After SIGTERM, keep serving this long (the app may still be calling out) before draining.
    #[arg(long, env = "MESHLET_DRAIN_DELAY", default_value = "5s", value_parser = parse_duration,
          value_name = "DURATION")]
    #[serde(with = "humantime_serde_compat")]
    pub drain_delay: Duration,

    /// Once draining, in-flight requests get this long to finish before the proxy exits.
    #[arg(long, env = "MESHLET_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration,
          value_name = "DURATION")]
    #[serde(with = "humantime_serde_compat")]
    pub drain_timeout: Duration,

    /// YAML file of the mesh's services: endpoints, identities, inbound rules. Re-read when it changes.
    /// It wins over the control plane (a local override). Absent: the mesh comes from the control plane's
    /// discovery watch when there is one, else every destination is passed through plain.
    #[arg(long, env = "MESHLET_MESH_CONFIG", value_name = "FILE")]
    pub mesh_config: Option<std::path::PathBuf>,

    /// Redis shared by the service's replicas for idempotency de-duplication (`redis://host:port/`), so a
    /// retry that lands on another replica is still answered once. Absent: each sidecar keeps its own table.
    #[arg(long, env = "MESHLET_DEDUP_REDIS_URL", value_name = "URL")]
    pub dedup_redis_url: Option<String>,

    /// Largest value written to the shared Redis for one idempotency key (bytes); a larger response is not
    /// stored and its key is released.
    #[arg(long, env = "MESHLET_DEDUP_REDIS_MAX_VALUE_BYTES", default_value_t = 2 << 20,
          value_parser = clap::value_parser!(u32).range(1024..), value_name = "BYTES")]
    pub dedup_redis_max_value_bytes: u32,

    /// Longest TTL given to an idempotency key in the shared Redis, whatever a policy's `ttl` asks.
    #[arg(long, env = "MESHLET_DEDUP_REDIS_MAX_TTL", default_value = "24h", value_parser = parse_duration,
          value_name = "DURATION")]
    #[serde(with = "humantime_serde_compat")]
    pub dedup_redis_max_ttl: Duration,

    /// The application's HTTP probes rewritten by the injector to `/app-health/...` on the admin port, as
    /// JSON (set by the injector; not for people to write).
    #[arg(long, env = "MESHLET_APP_PROBES", value_name = "JSON", hide = true)]
    pub app_probes: Option<String>,

    /// How often the sidecar reports its counts to the control plane (only with a control plane, once the
    /// certificate has arrived).
    #[arg(long, env = "MESHLET_REPORT_INTERVAL", default_value = "5s", value_parser = parse_report_interval,
          value_name = "DURATION")]
    #[serde(with = "humantime_serde_compat")]
    pub report_interval: Duration,

    /// Workload identity (needs a control plane; absent, the sidecar runs plain).
    #[command(flatten)]
    pub identity: crate::tls::IdentityArgs,

    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long, env = "MESHLET_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// Log filter in tracing's syntax, e.g. `info` or `meshlet=debug`.
    #[arg(long, env = "MESHLET_LOG", default_value = "info")]
    pub log: String,
}

/// Parses `500ms`, `10s`, `1m`, `1h`, or a bare number of seconds.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    if let Ok(secs) = value.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(value)
        .map_err(|e| format!("expected a duration such as 500ms, 10s or 1m ({e})"))
}

/// A report interval between 100ms and 1h (zero would make the reporter spin).
fn parse_report_interval(value: &str) -> Result<Duration, String> {
    let interval = parse_duration(value)?;
    if interval < Duration::from_millis(100) || interval > Duration::from_secs(3600) {
        return Err("expected a duration between 100ms and 1h".into());
    }
    Ok(interval)
}

/// Serializes durations in `/config` the way they are written on the command line.
mod humantime_serde_compat {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ProxyArgs,
    }

    #[test]
    fn durations_parse_in_several_forms() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn bad_value_names_the_flag_and_the_value() {
        let err = Cli::try_parse_from(["x", "--connect-timeout", "soon"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--connect-timeout"), "{err}");
        assert!(err.contains("soon"), "{err}");
        let err = Cli::try_parse_from(["x", "--inbound-addr", "nowhere:99999"])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("--inbound-addr") && err.contains("nowhere:99999"),
            "{err}"
        );
    }

    #[test]
    fn defaults_are_the_standard_sidecar_ports() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(cli.args.inbound_addrs[0].port(), 15006);
        assert_eq!(cli.args.admin_addr.port(), 15020);
        assert_eq!(cli.args.outbound_addrs.len(), 2);
        assert!(cli.args.opaque_ports.contains(&6379));
    }
}
