//! Every setting of `meshlet-control serve`: a flag, a `MESHLET_CONTROL_*` environment variable, a default.
//! Values clap cannot check alone are checked in [`Config::validate`], whose errors name the flag and value.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use meshlet::tls::{IdentityError, SpiffeId};

/// Shortest certificate lifetime accepted; tests of rotation use a few seconds.
pub const MIN_CERT_TTL: Duration = Duration::from_secs(1);
/// Longest certificate lifetime accepted; workload certificates are meant to be short-lived.
pub const MAX_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Where the CA and the credentials come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Self-made CA persisted in `--data-dir`; join tokens from `--join-tokens`.
    Local,
    /// Issuer from `--issuer-dir` (cert-manager layout); ServiceAccount tokens checked by TokenReview.
    Cluster,
}

/// A setting with a value that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{flag} is required with --mode {mode}")]
    Missing {
        flag: &'static str,
        mode: &'static str,
    },
    #[error("invalid --trust-domain {0:?}: {1}")]
    TrustDomain(String, IdentityError),
    #[error("invalid --cert-ttl {value}: must be between {min} and {max}", value = humantime::format_duration(*.0), min = humantime::format_duration(MIN_CERT_TTL), max = humantime::format_duration(MAX_CERT_TTL))]
    CertTtl(Duration),
    #[error("invalid --token-audience {0:?}: must not be empty")]
    TokenAudience(String),
}

/// Settings of the control plane.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// local: own CA in --data-dir and join tokens; cluster: issuer from --issuer-dir and TokenReview.
    #[arg(
        long,
        env = "MESHLET_CONTROL_MODE",
        value_enum,
        default_value = "local"
    )]
    pub mode: Mode,
    /// HTTPS API address (certificate issuance).
    #[arg(long, env = "MESHLET_CONTROL_API_ADDR", default_value = "0.0.0.0:8443")]
    pub api_addr: SocketAddr,
    /// Plain HTTP admin address: /live, /ready, /metrics.
    #[arg(
        long,
        env = "MESHLET_CONTROL_ADMIN_ADDR",
        default_value = "0.0.0.0:9990"
    )]
    pub admin_addr: SocketAddr,
    /// SPIFFE trust domain of the identities issued.
    #[arg(
        long,
        env = "MESHLET_CONTROL_TRUST_DOMAIN",
        default_value = "cluster.local"
    )]
    pub trust_domain: String,
    /// Local mode: directory where the CA (root and intermediate) is created and kept.
    #[arg(long, env = "MESHLET_CONTROL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Cluster mode: directory with tls.crt (issuer), tls.key (issuer key, PKCS#8) and ca.crt (trust anchors).
    #[arg(long, env = "MESHLET_CONTROL_ISSUER_DIR")]
    pub issuer_dir: Option<PathBuf>,
    /// Directory with tls.crt/tls.key to serve the API with; absent: a certificate is made from the CA.
    #[arg(long, env = "MESHLET_CONTROL_API_CERT_DIR")]
    pub api_cert_dir: Option<PathBuf>,
    /// Lifetime of issued workload certificates, e.g. 24h, 90s.
    #[arg(long, env = "MESHLET_CONTROL_CERT_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_ttl: Duration,
    /// Local mode: YAML file, a list of {token, identity, expires?}.
    #[arg(long, env = "MESHLET_CONTROL_JOIN_TOKENS")]
    pub join_tokens: Option<PathBuf>,
    /// Cluster mode: audience ServiceAccount tokens must be issued for.
    #[arg(
        long,
        env = "MESHLET_CONTROL_TOKEN_AUDIENCE",
        default_value = "meshlet"
    )]
    pub token_audience: String,
    /// Sidecar injection settings (proxy image, resources, defaults) for `POST /inject`; the chart mounts
    /// them from a ConfigMap. Absent: built-in defaults.
    #[arg(long, env = "MESHLET_CONTROL_INJECT_CONFIG")]
    pub inject_config: Option<PathBuf>,
    /// Local mode: YAML file of the mesh (services, endpoints, identities, policies), the schema of the
    /// sidecar's --mesh-config; re-read when it changes and streamed to sidecars. Absent: an empty mesh.
    #[arg(long, env = "MESHLET_CONTROL_MESH_FILE")]
    pub mesh_file: Option<PathBuf>,
    /// Cluster mode: namespaces whose Services, EndpointSlices and Pods make the mesh (comma-separated);
    /// absent: every namespace.
    #[arg(long, env = "MESHLET_CONTROL_WATCH_NAMESPACES", value_delimiter = ',')]
    pub watch_namespaces: Vec<String>,
    /// Cluster mode: how long start-up waits for the first complete listing of the cluster before serving
    /// the discovery watch, so a restarted control plane never pushes an empty mesh to running sidecars.
    #[arg(long, env = "MESHLET_CONTROL_DISCOVERY_SYNC_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub discovery_sync_timeout: Duration,
}

impl Config {
    /// Local mode on ephemeral loopback ports with defaults otherwise: what tests and `meshlet demo` want.
    pub fn local_loopback(data_dir: PathBuf, join_tokens: PathBuf) -> Self {
        Self {
            mode: Mode::Local,
            data_dir: Some(data_dir),
            join_tokens: Some(join_tokens),
            ..Self::loopback_defaults()
        }
    }

    /// Cluster mode on ephemeral loopback ports with the issuer from `issuer_dir`.
    pub fn cluster_loopback(issuer_dir: PathBuf) -> Self {
        Self {
            mode: Mode::Cluster,
            issuer_dir: Some(issuer_dir),
            // Test API servers answer TokenReviews but may not list Services; do not hold start-up for them.
            discovery_sync_timeout: Duration::from_secs(1),
            ..Self::loopback_defaults()
        }
    }

    fn loopback_defaults() -> Self {
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        Self {
            mode: Mode::Local,
            api_addr: loopback,
            admin_addr: loopback,
            trust_domain: "cluster.local".to_string(),
            data_dir: None,
            issuer_dir: None,
            api_cert_dir: None,
            cert_ttl: Duration::from_secs(24 * 3600),
            join_tokens: None,
            token_audience: "meshlet".to_string(),
            inject_config: None,
            mesh_file: None,
            watch_namespaces: Vec::new(),
            discovery_sync_timeout: Duration::from_secs(30),
        }
    }

    /// Checks what clap cannot: values in range and the settings each mode needs.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // The trust domain is valid when an identity in it is.
        SpiffeId::new(&self.trust_domain, "default", "default")
            .map_err(|e| ConfigError::TrustDomain(self.trust_domain.clone(), e))?;
        if !(MIN_CERT_TTL..=MAX_CERT_TTL).contains(&self.cert_ttl) {
            return Err(ConfigError::CertTtl(self.cert_ttl));
        }
        match self.mode {
            Mode::Local => {
                if self.data_dir.is_none() {
                    return Err(ConfigError::Missing {
                        flag: "--data-dir",
                        mode: "local",
                    });
                }
                if self.join_tokens.is_none() {
                    return Err(ConfigError::Missing {
                        flag: "--join-tokens",
                        mode: "local",
                    });
                }
            }
            Mode::Cluster => {
                if self.issuer_dir.is_none() {
                    return Err(ConfigError::Missing {
                        flag: "--issuer-dir",
                        mode: "cluster",
                    });
                }
                if self.token_audience.is_empty() {
                    return Err(ConfigError::TokenAudience(self.token_audience.clone()));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    fn parse(args: &[&str]) -> Result<Config, String> {
        let cli =
            Cli::try_parse_from(std::iter::once("meshlet-control").chain(args.iter().copied()))
                .map_err(|e| e.to_string())?;
        cli.config.validate().map_err(|e| e.to_string())?;
        Ok(cli.config)
    }

    #[test]
    fn defaults_follow_the_contract() {
        let config = parse(&["--data-dir", "/tmp/d", "--join-tokens", "/tmp/t"]).unwrap();
        assert_eq!(config.mode, Mode::Local);
        assert_eq!(config.api_addr, "0.0.0.0:8443".parse().unwrap());
        assert_eq!(config.admin_addr, "0.0.0.0:9990".parse().unwrap());
        assert_eq!(config.trust_domain, "cluster.local");
        assert_eq!(config.cert_ttl, Duration::from_secs(86400));
        assert_eq!(config.token_audience, "meshlet");
    }

    #[test]
    fn bad_values_name_the_flag_and_value() {
        let err = parse(&["--mode", "cluster", "--cert-ttl", "soon"]).unwrap_err();
        assert!(err.contains("--cert-ttl") && err.contains("soon"), "{err}");
        let err = parse(&[
            "--mode",
            "cluster",
            "--issuer-dir",
            "/x",
            "--cert-ttl",
            "0s",
        ])
        .unwrap_err();
        assert!(err.contains("--cert-ttl") && err.contains("0s"), "{err}");
        let err = parse(&["--api-addr", "nowhere:1"]).unwrap_err();
        assert!(
            err.contains("--api-addr") && err.contains("nowhere:1"),
            "{err}"
        );
        let err = parse(&[
            "--mode",
            "cluster",
            "--issuer-dir",
            "/x",
            "--trust-domain",
            "Bad/Domain",
        ])
        .unwrap_err();
        assert!(
            err.contains("--trust-domain") && err.contains("Bad/Domain"),
            "{err}"
        );
        let err = parse(&["--mode", "cluster"]).unwrap_err();
        assert!(err.contains("--issuer-dir"), "{err}");
        let err = parse(&["--data-dir", "/tmp/d"]).unwrap_err();
        assert!(err.contains("--join-tokens"), "{err}");
    }
}
