//! Who is asking: turning the bearer credential of an issuance request into the identity it stands for.
//!
//! In a cluster the credential is the pod's projected ServiceAccount token (audience `meshlet`); the API
//! server is the only party that can vouch for it, so every token goes through a TokenReview that names the
//! audience, and both `authenticated` and the returned audiences are checked (an API server that ignores the
//! requested audience must not make a token for another audience good here). Locally there is no API server:
//! a join token from a file is bound to one identity.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use meshlet::tls::{IdentityError, SpiffeId};

/// Longest bearer credential accepted; projected tokens are a few KiB at most.
pub const MAX_CREDENTIAL_LEN: usize = 16 * 1024;
/// How long a TokenReview may take before the request is answered 503 (the sidecar retries).
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a credential was not accepted (401), or could not be checked (503).
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("no bearer credential was presented")]
    Missing,
    #[error("the credential is longer than {MAX_CREDENTIAL_LEN} bytes")]
    TooLong,
    #[error("the credential is not a known join token")]
    UnknownJoinToken,
    #[error("the join token for {0} expired at {1}")]
    Expired(String, String),
    #[error("the token was not authenticated by the Kubernetes API server{}", .0.as_deref().map(|e| format!(": {e}")).unwrap_or_default())]
    NotAuthenticated(Option<String>),
    #[error("the token is not valid for audience {expected:?} (token audiences: {got:?})")]
    WrongAudience { expected: String, got: Vec<String> },
    #[error("the token belongs to {0:?}, not to a ServiceAccount (system:serviceaccount:<namespace>:<name>)")]
    NotServiceAccount(String),
    #[error("the token's ServiceAccount is not a valid identity: {0}")]
    BadServiceAccount(IdentityError),
    #[error("the TokenReview request to the Kubernetes API server failed: {0}")]
    ReviewFailed(kube::Error),
    #[error("the Kubernetes API server did not answer the TokenReview within {REVIEW_TIMEOUT:?}")]
    ReviewTimedOut,
}

impl CredentialError {
    /// True when the fault is ours (the API server could not be asked), not the caller's.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            CredentialError::ReviewFailed(_) | CredentialError::ReviewTimedOut
        )
    }

    /// A short machine-readable reason for the API response and the error metric.
    pub fn reason(&self) -> &'static str {
        match self {
            CredentialError::Expired(..) => "expired-credential",
            CredentialError::ReviewFailed(_) | CredentialError::ReviewTimedOut => {
                "credential-check-unavailable"
            }
            _ => "bad-credential",
        }
    }
}

/// Why the join-token file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum JoinTokenFileError {
    #[error("cannot read --join-tokens file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("--join-tokens file {0} is not a YAML list of {{token, identity, expires?}}: {1}")]
    Parse(PathBuf, serde_yaml::Error),
    #[error("--join-tokens file {path}: entry {index} has an empty token")]
    EmptyToken { path: PathBuf, index: usize },
    #[error("--join-tokens file {path}: entry {index}: {source}")]
    Identity {
        path: PathBuf,
        index: usize,
        source: IdentityError,
    },
    #[error(
        "--join-tokens file {path}: entry {index} is for trust domain {got:?}, not {expected:?}"
    )]
    TrustDomain {
        path: PathBuf,
        index: usize,
        got: String,
        expected: String,
    },
    #[error("--join-tokens file {path}: entry {index} has expires {value:?}, not an RFC 3339 time: {source}")]
    Expires {
        path: PathBuf,
        index: usize,
        value: String,
        source: humantime::TimestampError,
    },
}

/// One line of the join-token file. Public so tools (e.g. `meshlet demo`) can write the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenEntry {
    /// The secret a sidecar presents as `Authorization: Bearer <token>`.
    pub token: String,
    /// The only identity this token may obtain, `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
    pub identity: String,
    /// When the token stops working, RFC 3339 (e.g. `2030-01-01T00:00:00Z`); never when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
}

struct JoinToken {
    token: Vec<u8>,
    identity: SpiffeId,
    expires: Option<SystemTime>,
}

/// Join tokens loaded from the local config file.
pub struct JoinTokens {
    tokens: Vec<JoinToken>,
}

impl JoinTokens {
    /// Loads and checks the `--join-tokens` YAML file; every identity must be in `trust_domain`.
    pub fn load(path: &Path, trust_domain: &str) -> Result<Self, JoinTokenFileError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| JoinTokenFileError::Read(path.to_path_buf(), e))?;
        let entries: Vec<JoinTokenEntry> = serde_yaml::from_str(&text)
            .map_err(|e| JoinTokenFileError::Parse(path.to_path_buf(), e))?;
        let path = path.to_path_buf();
        let mut tokens = Vec::with_capacity(entries.len());
        for (index, entry) in entries.into_iter().enumerate() {
            if entry.token.is_empty() {
                return Err(JoinTokenFileError::EmptyToken { path, index });
            }
            let identity = entry.identity.parse::<SpiffeId>().map_err(|source| {
                JoinTokenFileError::Identity {
                    path: path.clone(),
                    index,
                    source,
                }
            })?;
            if identity.trust_domain() != trust_domain {
                return Err(JoinTokenFileError::TrustDomain {
                    path,
                    index,
                    got: identity.trust_domain().to_string(),
                    expected: trust_domain.to_string(),
                });
            }
            let expires = match entry.expires {
                None => None,
                Some(value) => Some(humantime::parse_rfc3339_weak(&value).map_err(|source| {
                    JoinTokenFileError::Expires {
                        path: path.clone(),
                        index,
                        value: value.clone(),
                        source,
                    }
                })?),
            };
            tokens.push(JoinToken {
                token: entry.token.into_bytes(),
                identity,
                expires,
            });
        }
        Ok(Self { tokens })
    }

    /// How many tokens are configured.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// True when no token is configured (every request will be refused).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Finds the token in constant time with respect to its contents (every entry is compared).
    fn authenticate(&self, presented: &str, now: SystemTime) -> Result<SpiffeId, CredentialError> {
        let mut found: Option<&JoinToken> = None;
        for entry in &self.tokens {
            if bool::from(entry.token.as_slice().ct_eq(presented.as_bytes())) {
                found = Some(entry);
            }
        }
        let entry = found.ok_or(CredentialError::UnknownJoinToken)?;
        if let Some(expires) = entry.expires {
            if expires <= now {
                return Err(CredentialError::Expired(
                    entry.identity.to_string(),
                    humantime::format_rfc3339_seconds(expires).to_string(),
                ));
            }
        }
        Ok(entry.identity.clone())
    }
}

/// Checks projected ServiceAccount tokens through the Kubernetes TokenReview API.
pub struct TokenReviewer {
    api: Api<TokenReview>,
    audience: String,
    trust_domain: String,
}

impl TokenReviewer {
    /// Reviews tokens with `client`, requiring `audience`; identities are minted in `trust_domain`.
    pub fn new(client: kube::Client, audience: String, trust_domain: String) -> Self {
        Self {
            api: Api::all(client),
            audience,
            trust_domain,
        }
    }

    async fn authenticate(&self, token: &str) -> Result<SpiffeId, CredentialError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let reviewed = tokio::time::timeout(
            REVIEW_TIMEOUT,
            self.api.create(&PostParams::default(), &review),
        )
        .await
        .map_err(|_| CredentialError::ReviewTimedOut)?
        .map_err(CredentialError::ReviewFailed)?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(CredentialError::NotAuthenticated(status.error));
        }
        let audiences = status.audiences.unwrap_or_default();
        if !audiences.iter().any(|a| a == &self.audience) {
            return Err(CredentialError::WrongAudience {
                expected: self.audience.clone(),
                got: audiences,
            });
        }
        let username = status
            .user
            .and_then(|user| user.username)
            .unwrap_or_default();
        service_account_identity(&self.trust_domain, &username)
    }
}

/// Maps a Kubernetes user name `system:serviceaccount:<namespace>:<name>` (what TokenReview returns for a
/// ServiceAccount token) to the identity of that ServiceAccount in `trust_domain`.
fn service_account_identity(
    trust_domain: &str,
    username: &str,
) -> Result<SpiffeId, CredentialError> {
    let not_sa = || CredentialError::NotServiceAccount(username.to_string());
    let rest = username
        .strip_prefix("system:serviceaccount:")
        .ok_or_else(not_sa)?;
    let (namespace, name) = rest.split_once(':').ok_or_else(not_sa)?;
    SpiffeId::new(trust_domain, namespace, name).map_err(CredentialError::BadServiceAccount)
}

/// Where credentials are checked, by mode.
pub enum Credentials {
    /// Local mode: join tokens from the config file.
    JoinTokens(JoinTokens),
    /// Cluster mode: ServiceAccount tokens checked by the API server.
    TokenReview(TokenReviewer),
}

impl Credentials {
    /// The identity `bearer` proves, or why it proves none.
    pub async fn authenticate(&self, bearer: Option<&str>) -> Result<SpiffeId, CredentialError> {
        let bearer = bearer
            .filter(|b| !b.is_empty())
            .ok_or(CredentialError::Missing)?;
        if bearer.len() > MAX_CREDENTIAL_LEN {
            return Err(CredentialError::TooLong);
        }
        match self {
            Credentials::JoinTokens(tokens) => tokens.authenticate(bearer, SystemTime::now()),
            Credentials::TokenReview(reviewer) => reviewer.authenticate(bearer).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn load(yaml: &str) -> Result<JoinTokens, JoinTokenFileError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.yaml");
        std::fs::write(&path, yaml).unwrap();
        JoinTokens::load(&path, "cluster.local")
    }

    #[test]
    fn join_tokens_map_to_their_identity_until_they_expire() {
        let tokens = load(
            "- token: web-secret\n  identity: spiffe://cluster.local/ns/shop/sa/web\n\
             - token: old\n  identity: spiffe://cluster.local/ns/shop/sa/db\n  expires: 2020-01-01T00:00:00Z\n",
        )
        .unwrap();
        let now = SystemTime::now();
        let id = tokens.authenticate("web-secret", now).unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert!(matches!(
            tokens.authenticate("web-secre", now),
            Err(CredentialError::UnknownJoinToken)
        ));
        assert!(matches!(
            tokens.authenticate("web-secret!", now),
            Err(CredentialError::UnknownJoinToken)
        ));
        assert!(matches!(
            tokens.authenticate("old", now),
            Err(CredentialError::Expired(..))
        ));
        let before = humantime::parse_rfc3339("2019-12-31T00:00:00Z").unwrap();
        assert!(tokens.authenticate("old", before).is_ok());
        assert!(tokens
            .authenticate("old", before + Duration::from_secs(86400 * 2))
            .is_err());
    }

    #[test]
    fn service_account_user_names_map_to_identities() {
        let id =
            service_account_identity("cluster.local", "system:serviceaccount:shop:web").unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        for user in [
            "system:node:worker-1",
            "system:serviceaccount:shop",
            "system:serviceaccount:shop:a:b",
            "system:serviceaccount::web",
            "",
        ] {
            assert!(
                service_account_identity("cluster.local", user).is_err(),
                "{user:?} accepted"
            );
        }
    }

    #[test]
    fn bad_files_name_the_entry_and_value() {
        let err = load("- token: a\n  identity: spiffe://other.domain/ns/a/sa/b\n")
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("entry 0") && err.to_string().contains("other.domain"),
            "{err}"
        );
        let err = load("- token: a\n  identity: web\n").err().unwrap();
        assert!(err.to_string().contains("\"web\""), "{err}");
        let err =
            load("- token: a\n  identity: spiffe://cluster.local/ns/a/sa/b\n  expires: soon\n")
                .err()
                .unwrap();
        assert!(err.to_string().contains("\"soon\""), "{err}");
        let err = load("- token: ''\n  identity: spiffe://cluster.local/ns/a/sa/b\n")
            .err()
            .unwrap();
        assert!(
            matches!(err, JoinTokenFileError::EmptyToken { index: 0, .. }),
            "{err}"
        );
        assert!(load("- token: a\n  idenity: x\n").is_err());
    }
}
