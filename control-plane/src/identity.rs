//! SPIFFE identities of meshed workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! The control plane parses every identity it is asked for instead of comparing strings, so that a request
//! for another trust domain can be told apart (403) from one that is not an identity at all (400), and so that
//! the only SAN it ever signs is one it has rebuilt from checked parts.

use std::fmt;

/// Longest identity accepted; Kubernetes names are bounded, so anything longer is not ours.
const MAX_IDENTITY_LEN: usize = 512;

/// Why a string is not a workload identity of the form meshlet issues.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("identity {0:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    Form(String),
    #[error("identity {0:?} is longer than {MAX_IDENTITY_LEN} bytes")]
    TooLong(String),
    #[error("trust domain {0:?} is not valid: lowercase letters, digits, '.', '-' and '_' only")]
    TrustDomain(String),
    #[error("namespace {0:?} is not a valid Kubernetes namespace name")]
    Namespace(String),
    #[error("service account {0:?} is not a valid Kubernetes service account name")]
    ServiceAccount(String),
    #[error("user name {0:?} is not a ServiceAccount (system:serviceaccount:<namespace>:<name>)")]
    NotServiceAccount(String),
}

/// A workload identity: the trust domain plus the Kubernetes namespace and service account it stands for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    /// Builds an identity from its parts, checking each.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        check_trust_domain(trust_domain)?;
        if !is_dns_label(namespace) {
            return Err(IdentityError::Namespace(namespace.to_string()));
        }
        if !is_dns_subdomain(service_account) {
            return Err(IdentityError::ServiceAccount(service_account.to_string()));
        }
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        })
    }

    /// Parses `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub fn parse(text: &str) -> Result<Self, IdentityError> {
        if text.len() > MAX_IDENTITY_LEN {
            return Err(IdentityError::TooLong(text.chars().take(64).collect()));
        }
        let form = || IdentityError::Form(text.to_string());
        let rest = text.strip_prefix("spiffe://").ok_or_else(form)?;
        let mut parts = rest.split('/');
        let (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(form());
        };
        Self::new(td, ns, sa)
    }

    /// Maps a Kubernetes user name `system:serviceaccount:<namespace>:<name>` (what TokenReview returns for
    /// a ServiceAccount token) to the identity of that ServiceAccount in `trust_domain`.
    pub fn from_service_account_user(
        trust_domain: &str,
        username: &str,
    ) -> Result<Self, IdentityError> {
        let not_sa = || IdentityError::NotServiceAccount(username.to_string());
        let rest = username
            .strip_prefix("system:serviceaccount:")
            .ok_or_else(not_sa)?;
        let (namespace, name) = rest.split_once(':').ok_or_else(not_sa)?;
        Self::new(trust_domain, namespace, name)
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The Kubernetes service account name.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// Checks a SPIFFE trust domain name (the spec allows lowercase letters, digits, '.', '-' and '_').
pub fn check_trust_domain(trust_domain: &str) -> Result<(), IdentityError> {
    let valid = !trust_domain.is_empty()
        && trust_domain.len() <= 255
        && trust_domain.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if valid {
        Ok(())
    } else {
        Err(IdentityError::TrustDomain(trust_domain.to_string()))
    }
}

/// RFC 1123 label, as Kubernetes requires of namespace names.
fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// RFC 1123 subdomain, as Kubernetes requires of ServiceAccount names.
fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        let text = "spiffe://cluster.local/ns/shop/sa/web.frontend";
        let id = SpiffeId::parse(text).unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "web.frontend");
        assert_eq!(id.to_string(), text);
    }

    #[test]
    fn rejects_other_shapes() {
        for bad in [
            "",
            "spiffe://cluster.local",
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns/shop/sa/web/extra",
            "spiffe://cluster.local/ns/shop/sa/",
            "https://cluster.local/ns/shop/sa/web",
            "spiffe://Cluster.Local/ns/shop/sa/web",
            "spiffe://cluster.local/ns/Shop/sa/web",
            "spiffe://cluster.local/namespace/shop/sa/web",
            "spiffe://cluster.local/ns/-shop/sa/web",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn maps_service_account_user_names() {
        let id =
            SpiffeId::from_service_account_user("cluster.local", "system:serviceaccount:shop:web")
                .unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert!(
            SpiffeId::from_service_account_user("cluster.local", "system:node:worker-1").is_err()
        );
        assert!(
            SpiffeId::from_service_account_user("cluster.local", "system:serviceaccount:shop")
                .is_err()
        );
        assert!(SpiffeId::from_service_account_user(
            "cluster.local",
            "system:serviceaccount:shop:a:b"
        )
        .is_err());
    }
}
