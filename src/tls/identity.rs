//! Workload identities (`spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`) and the allow-list
//! patterns that authorize them.
//!
//! Identities are parsed strictly: a certificate or a config file carrying anything else is refused, so the
//! rest of the proxy can compare identities as plain values and put them in metric labels safely (the
//! character set is small and the length bounded).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use x509_parser::extensions::GeneralName;

/// SPIFFE IDs are at most 2048 bytes long (SPIFFE-ID specification, section 2.3).
const MAX_ID_LEN: usize = 2048;

const SCHEME: &str = "spiffe://";

/// Why an identity, a pattern or a certificate's identity was refused; each message names the value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    /// The text is not a `spiffe://<td>/ns/<ns>/sa/<sa>` identity.
    #[error("invalid SPIFFE identity {value:?}: {reason}")]
    InvalidId {
        /// The text as given (cut to 256 characters).
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The text is neither an identity nor an `ns/<namespace>/*` pattern.
    #[error("invalid identity pattern {value:?}: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account> or ns/<namespace>/*")]
    InvalidPattern {
        /// The text as given (cut to 256 characters).
        value: String,
    },
    /// The certificate could not be parsed, or has no single SPIFFE URI SAN.
    #[error("certificate identity: {0}")]
    Certificate(String),
}

/// A workload identity: who a sidecar is, as written in the URI SAN of its certificate.
///
/// Cheap to clone (one `Arc`), so it can travel with every request for authorization, headers and metrics.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId(Arc<Parts>);

#[derive(PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Parts {
    uri: String,
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    /// Builds the identity of a service account; each part is checked as in [`SpiffeId::from_str`].
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    /// The identity as a URI, `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub fn as_str(&self) -> &str {
        &self.0.uri
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.0.trust_domain
    }

    /// The Kubernetes namespace of the workload.
    pub fn namespace(&self) -> &str {
        &self.0.namespace
    }

    /// The Kubernetes service account of the workload.
    pub fn service_account(&self) -> &str {
        &self.0.service_account
    }

    /// Reads the identity from a certificate's URI SAN. The certificate must carry exactly one URI SAN
    /// (as the SPIFFE X.509-SVID specification requires) and it must be a valid identity.
    pub fn from_certificate(cert: &CertificateDer<'_>) -> Result<Self, IdentityError> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| {
            IdentityError::Certificate(format!("not a valid X.509 certificate: {e}"))
        })?;
        let san = parsed
            .subject_alternative_name()
            .map_err(|e| {
                IdentityError::Certificate(format!("invalid subject alternative names: {e}"))
            })?
            .ok_or_else(|| IdentityError::Certificate("no subject alternative name".into()))?;
        let mut uris = san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            });
        match (uris.next(), uris.next()) {
            (Some(uri), None) => uri.parse(),
            (None, _) => Err(IdentityError::Certificate(
                "no URI subject alternative name".into(),
            )),
            (Some(_), Some(_)) => Err(IdentityError::Certificate(
                "more than one URI subject alternative name".into(),
            )),
        }
    }
}

/// Debug shows the URI, so errors that rustls formats with `{:?}` stay readable.
impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({self})")
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.uri)
    }
}

fn shorten(value: &str) -> String {
    value.chars().take(256).collect()
}

fn invalid(value: &str, reason: &'static str) -> IdentityError {
    IdentityError::InvalidId {
        value: shorten(value),
        reason,
    }
}

/// Trust domains are lowercase letters, digits, `.`, `-` and `_` (SPIFFE-ID section 2.1).
fn is_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

/// Path segments are letters, digits, `.`, `-` and `_`, and not `.` or `..` (SPIFFE-ID section 2.2).
fn is_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        if value.len() > MAX_ID_LEN {
            return Err(invalid(value, "longer than 2048 bytes"));
        }
        let rest = value
            .strip_prefix(SCHEME)
            .ok_or_else(|| invalid(value, "must start with spiffe://"))?;
        let (trust_domain, path) = rest
            .split_once('/')
            .ok_or_else(|| invalid(value, "has no path"))?;
        if !is_trust_domain(trust_domain) {
            return Err(invalid(
                value,
                "trust domain must be non-empty lowercase letters, digits, '.', '-', '_'",
            ));
        }
        let segments: Vec<&str> = path.split('/').collect();
        let [ns_key, namespace, sa_key, service_account] = segments[..] else {
            return Err(invalid(
                value,
                "path must be /ns/<namespace>/sa/<service-account>",
            ));
        };
        if ns_key != "ns" || sa_key != "sa" {
            return Err(invalid(
                value,
                "path must be /ns/<namespace>/sa/<service-account>",
            ));
        }
        if !is_segment(namespace) || !is_segment(service_account) {
            return Err(invalid(
                value,
                "namespace and service account must be non-empty letters, digits, '.', '-', '_'",
            ));
        }
        Ok(SpiffeId(Arc::new(Parts {
            uri: value.to_owned(),
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })))
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One entry of an allow-list: a single identity, or every identity of a namespace (`ns/<namespace>/*`).
///
/// A namespace pattern does not name a trust domain: peers are only authenticated when their chain ends in
/// this sidecar's trust bundle, so every peer already belongs to the mesh's trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityPattern {
    /// Exactly this identity.
    Exact(SpiffeId),
    /// Any service account of this namespace.
    Namespace(String),
}

impl IdentityPattern {
    /// Whether `id` is covered by this pattern.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            IdentityPattern::Exact(exact) => exact == id,
            IdentityPattern::Namespace(ns) => id.namespace() == ns,
        }
    }
}

impl FromStr for IdentityPattern {
    type Err = IdentityError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        if value.starts_with(SCHEME) {
            return value.parse().map(IdentityPattern::Exact);
        }
        match value
            .strip_prefix("ns/")
            .and_then(|rest| rest.strip_suffix("/*"))
        {
            Some(ns) if is_segment(ns) => Ok(IdentityPattern::Namespace(ns.to_owned())),
            _ => Err(IdentityError::InvalidPattern {
                value: shorten(value),
            }),
        }
    }
}

impl fmt::Display for IdentityPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentityPattern::Exact(id) => id.fmt(f),
            IdentityPattern::Namespace(ns) => write!(f, "ns/{ns}/*"),
        }
    }
}

impl Serialize for IdentityPattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IdentityPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The client identities a service accepts. An identity is allowed when any pattern matches it, so an
/// empty list allows nobody; "no allow-list configured" is the caller's decision, not an empty list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AllowList(Vec<IdentityPattern>);

impl AllowList {
    /// An allow-list of these patterns.
    pub fn new(patterns: Vec<IdentityPattern>) -> Self {
        AllowList(patterns)
    }

    /// Parses each entry (`spiffe://…` or `ns/<namespace>/*`); the error names the first bad entry.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, IdentityError> {
        entries
            .iter()
            .map(|e| e.as_ref().parse())
            .collect::<Result<_, _>>()
            .map(AllowList)
    }

    /// Whether `id` may call the service.
    pub fn allows(&self, id: &SpiffeId) -> bool {
        self.0.iter().any(|pattern| pattern.matches(id))
    }

    /// The patterns, in configuration order.
    pub fn patterns(&self) -> &[IdentityPattern] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip() {
        let text = "spiffe://cluster.local/ns/shop/sa/checkout";
        let id: SpiffeId = text.parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "checkout");
        assert_eq!(id.to_string(), text);
        assert_eq!(
            SpiffeId::new("cluster.local", "shop", "checkout").unwrap(),
            id
        );
    }

    #[test]
    fn malformed_identities_are_refused_and_named() {
        for bad in [
            "",
            "http://cluster.local/ns/a/sa/b",
            "spiffe://",
            "spiffe://cluster.local",
            "spiffe:///ns/a/sa/b",
            "spiffe://Cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/sa/a/ns/b",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/ns/../sa/b",
            "spiffe://cluster.local/ns/a b/sa/b",
            "spiffe://cluster.local/ns/a/sa/b?x=1",
            "spiffe://user@cluster.local/ns/a/sa/b",
            "spiffe://cluster.local:8080/ns/a/sa/b",
        ] {
            let err = bad.parse::<SpiffeId>().unwrap_err();
            assert!(
                err.to_string().contains(&format!("{bad:?}")),
                "{err} should name {bad:?}"
            );
        }
        let long = format!("spiffe://cluster.local/ns/{}/sa/b", "a".repeat(3000));
        assert!(long.parse::<SpiffeId>().is_err());
    }

    #[test]
    fn patterns_match_exact_identities_and_namespaces() {
        let checkout: SpiffeId = "spiffe://cluster.local/ns/shop/sa/checkout"
            .parse()
            .unwrap();
        let cart: SpiffeId = "spiffe://cluster.local/ns/shop/sa/cart".parse().unwrap();
        let admin: SpiffeId = "spiffe://cluster.local/ns/ops/sa/admin".parse().unwrap();

        let exact: IdentityPattern = checkout.to_string().parse().unwrap();
        assert!(exact.matches(&checkout));
        assert!(!exact.matches(&cart));

        let shop: IdentityPattern = "ns/shop/*".parse().unwrap();
        assert!(shop.matches(&checkout) && shop.matches(&cart));
        assert!(!shop.matches(&admin));
        assert_eq!(shop.to_string(), "ns/shop/*");

        for bad in [
            "ns/shop",
            "ns//*",
            "ns/shop/sa/*",
            "shop/*",
            "*",
            "spiffe://x/ns/a",
        ] {
            let err = bad.parse::<IdentityPattern>().unwrap_err();
            assert!(
                err.to_string().contains(&format!("{bad:?}")),
                "{err} should name {bad:?}"
            );
        }
    }

    #[test]
    fn allow_lists_allow_any_matching_pattern_and_nothing_when_empty() {
        let list =
            AllowList::parse(&["ns/ops/*", "spiffe://cluster.local/ns/shop/sa/checkout"]).unwrap();
        assert!(list.allows(&"spiffe://cluster.local/ns/ops/sa/x".parse().unwrap()));
        assert!(list.allows(
            &"spiffe://cluster.local/ns/shop/sa/checkout"
                .parse()
                .unwrap()
        ));
        assert!(!list.allows(&"spiffe://cluster.local/ns/shop/sa/cart".parse().unwrap()));
        assert!(
            !AllowList::default().allows(&"spiffe://cluster.local/ns/ops/sa/x".parse().unwrap())
        );

        let err = AllowList::parse(&["ns/ops/*", "nobody"]).unwrap_err();
        assert!(err.to_string().contains("\"nobody\""));
    }

    #[test]
    fn allow_lists_read_from_yaml_like_json() {
        let list: AllowList = serde_json::from_str(r#"["ns/ops/*"]"#).unwrap();
        assert_eq!(list.patterns(), &[IdentityPattern::Namespace("ops".into())]);
        assert!(serde_json::from_str::<AllowList>(r#"["ops"]"#).is_err());
        assert_eq!(serde_json::to_string(&list).unwrap(), r#"["ns/ops/*"]"#);
    }
}
