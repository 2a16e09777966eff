//! The policy schema: what a destination service asks of the mesh (timeouts, retries, idempotency,
//! circuit breaking, limits), written once in YAML or JSON.
//!
//! One precedence, most specific first: **route override > service policy > mesh-wide defaults > built-in
//! defaults**. Every level is a partial [`PolicyOverrides`]; [`PolicyFile::resolve`] folds them into complete
//! [`Policy`] values. Validation happens on the whole file before anything is applied, and each error names
//! the field path and the value (`services.payment.retries.budget.ratio: 7.5 is outside 0..=1`), so a bad edit
//! never reaches a running layer (tower's `TpsBudget::new` would panic on some of these values).
//!
//! ```yaml
//! defaults:                       # mesh-wide, optional
//!   timeouts: { request: 10s }
//! services:
//!   payment.shop:8080:
//!     timeouts: { request: 3s, per_try: 800ms }
//!     retries: { max_attempts: 3, budget: { ratio: 0.2, min_per_second: 10, window: 10s } }
//!     idempotency: { inject: true, enforce: true, ttl: 1h }
//!     routes:
//!       - method: GET
//!         path_prefix: /health
//!         overrides: { retries: { max_attempts: 1 } }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http::Method;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

mod validate;
use validate::{invalid, validate_overrides, validate_resolved};

/// Largest request body kept in memory so that it can be sent again on a retry.
pub const MAX_REPLAY_BODY_BYTES: usize = 64 * 1024;

/// Longest duration accepted anywhere in a policy; keeps deadline arithmetic far from overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// A duration written as `500ms`, `10s`, `1m` (or a bare number of seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        crate::config::parse_duration(&text)
            .map(Dur)
            .map_err(|e| serde::de::Error::custom(format!("{text:?}: {e}")))
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// When a failed attempt may be tried again (subject to method safety, attempts, budget and deadline).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RetryOn {
    /// The TCP connection could not be made (refused or timed out): the upstream never saw the request.
    #[serde(rename = "connect-failure")]
    ConnectFailure,
    /// HTTP/2 `REFUSED_STREAM`: the upstream declares it did not process the request.
    #[serde(rename = "refused-stream")]
    RefusedStream,
    /// The connection was reset before any response byte arrived.
    #[serde(rename = "reset")]
    Reset,
    /// The per-try timeout ran out before the response headers arrived.
    #[serde(rename = "per-try-timeout")]
    PerTryTimeout,
    /// The upstream answered 502.
    #[serde(rename = "502")]
    Status502,
    /// The upstream answered 503.
    #[serde(rename = "503")]
    Status503,
    /// The upstream answered 504.
    #[serde(rename = "504")]
    Status504,
    /// A gRPC response whose headers carry `grpc-status: 14` (UNAVAILABLE, a trailers-only response).
    #[serde(rename = "grpc-unavailable")]
    GrpcUnavailable,
    /// A receiving meshlet answered 409 `idempotency-conflict`: the first attempt of this keyed request is
    /// still being processed there, and a later attempt will get its response.
    #[serde(rename = "idempotency-conflict")]
    IdempotencyConflict,
}

impl RetryOn {
    /// Every condition; the default set.
    pub const ALL: [RetryOn; 9] = [
        RetryOn::ConnectFailure,
        RetryOn::RefusedStream,
        RetryOn::Reset,
        RetryOn::PerTryTimeout,
        RetryOn::Status502,
        RetryOn::Status503,
        RetryOn::Status504,
        RetryOn::GrpcUnavailable,
        RetryOn::IdempotencyConflict,
    ];

    /// The metric label for retries caused by this condition.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryOn::ConnectFailure => "connect-failure",
            RetryOn::RefusedStream => "refused-stream",
            RetryOn::Reset => "reset",
            RetryOn::PerTryTimeout => "per-try-timeout",
            RetryOn::Status502 => "502",
            RetryOn::Status503 => "503",
            RetryOn::Status504 => "504",
            RetryOn::GrpcUnavailable => "grpc-unavailable",
            RetryOn::IdempotencyConflict => "idempotency-conflict",
        }
    }
}

/// Timeouts. `request` covers all attempts and backoff; `per_try` one attempt up to the response headers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timeouts {
    /// Total time for the request, all attempts included (default 10s).
    pub request: Duration,
    /// Time for one attempt to produce response headers (default: none beyond `request`).
    pub per_try: Option<Duration>,
    /// Time to establish a connection to an endpoint (default 1s).
    pub connect: Duration,
    /// Idle upstream connections are closed after this (default 60s).
    pub idle: Duration,
}

/// The retry budget: retries may add at most `ratio` of recent requests plus `min_per_second`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Budget {
    /// Share of recent requests that may be retried, 0..=1 (default 0.2: at most 1.2× load).
    pub ratio: f32,
    /// Retries always allowed per second, so that a quiet service can still retry (default 10).
    pub min_per_second: u32,
    /// How long a request counts as "recent", 1s..=60s (default 10s).
    pub window: Duration,
}

/// Retries.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Retries {
    /// Attempts in total, the first included, 1..=10 (default 3; 1 disables retries).
    pub max_attempts: u32,
    /// Which failures are retried (default: all of [`RetryOn::ALL`]).
    pub conditions: Vec<RetryOn>,
    /// First backoff ceiling; it doubles per retry, with full jitter (default 25ms).
    pub backoff_base: Duration,
    /// Largest backoff ceiling (default 1s).
    pub backoff_max: Duration,
    /// The retry budget.
    pub budget: Budget,
}

/// `Idempotency-Key` handling.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Idempotency {
    /// Outbound: give POST/PATCH without a key a fresh UUIDv7 key, so they become safe to retry (default false).
    pub inject: bool,
    /// Inbound: de-duplicate requests by (caller, key) and replay stored responses (default false).
    pub enforce: bool,
    /// How long a key is remembered (default 1h).
    pub ttl: Duration,
    /// Keys remembered at most (default 10000); the oldest are evicted first.
    pub max_entries: usize,
    /// Bytes of stored responses at most (default 64 MiB).
    pub max_bytes: usize,
    /// Largest response body stored for replay (default 1 MiB); larger responses are not stored.
    pub max_body_bytes: usize,
    /// Time the first request of a key may take at the app, even when its caller went away (default 60s).
    pub processing_timeout: Duration,
    /// First requests processed at once per service, each in its own task (default 1000). Beyond it a new key
    /// is answered 503 `overloaded` without reaching the app; a retry with the same key comes back later.
    pub max_in_flight: usize,
}

/// Per-endpoint failure accrual.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Breaker {
    /// Consecutive failures that eject an endpoint (default 5).
    pub consecutive_failures: u32,
    /// First ejection; doubles with each further ejection, jittered (default 5s).
    pub base_ejection: Duration,
    /// Longest ejection (default 2m).
    pub max_ejection: Duration,
    /// Largest share of a service's endpoints ejected at once, 0..=100 (default 50). A single-endpoint service
    /// can always be ejected.
    pub max_ejected_percent: u8,
}

/// Per-service concurrency.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Limits {
    /// Requests in flight at once (default 1000).
    pub max_concurrent: usize,
    /// Requests waiting for a slot (default 1000); beyond this, 503 `overloaded` at once.
    pub max_pending: usize,
}

/// A complete policy, every value decided.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Policy {
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Retries.
    pub retries: Retries,
    /// Idempotency keys.
    pub idempotency: Idempotency,
    /// Circuit breaking.
    pub breaker: Breaker,
    /// Concurrency limits.
    pub limits: Limits,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            timeouts: Timeouts {
                request: Duration::from_secs(10),
                per_try: None,
                connect: Duration::from_secs(1),
                idle: Duration::from_secs(60),
            },
            retries: Retries {
                max_attempts: 3,
                conditions: RetryOn::ALL.to_vec(),
                backoff_base: Duration::from_millis(25),
                backoff_max: Duration::from_secs(1),
                budget: Budget {
                    ratio: 0.2,
                    min_per_second: 10,
                    window: Duration::from_secs(10),
                },
            },
            idempotency: Idempotency {
                inject: false,
                enforce: false,
                ttl: Duration::from_secs(3600),
                max_entries: 10_000,
                max_bytes: 64 << 20,
                max_body_bytes: 1 << 20,
                processing_timeout: Duration::from_secs(60),
                max_in_flight: 1000,
            },
            breaker: Breaker {
                consecutive_failures: 5,
                base_ejection: Duration::from_secs(5),
                max_ejection: Duration::from_secs(120),
                max_ejected_percent: 50,
            },
            limits: Limits {
                max_concurrent: 1000,
                max_pending: 1000,
            },
        }
    }
}

// ----- the partial schema, as written in files -----

/// Timeout overrides.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct TimeoutOverrides {
    pub request: Option<Dur>,
    pub per_try: Option<Dur>,
    pub connect: Option<Dur>,
    pub idle: Option<Dur>,
}

/// Backoff overrides.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct BackoffOverrides {
    pub base: Option<Dur>,
    pub max: Option<Dur>,
}

/// Budget overrides.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct BudgetOverrides {
    pub ratio: Option<f32>,
    pub min_per_second: Option<u32>,
    pub window: Option<Dur>,
}

/// Retry overrides.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RetryOverrides {
    pub max_attempts: Option<u32>,
    pub conditions: Option<Vec<RetryOn>>,
    #[serde(default)]
    pub backoff: BackoffOverrides,
    #[serde(default)]
    pub budget: BudgetOverrides,
}

/// Idempotency overrides.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct IdempotencyOverrides {
    pub inject: Option<bool>,
    pub enforce: Option<bool>,
    pub ttl: Option<Dur>,
    pub max_entries: Option<usize>,
    pub max_bytes: Option<usize>,
    pub max_body_bytes: Option<usize>,
    pub processing_timeout: Option<Dur>,
    pub max_in_flight: Option<usize>,
}

/// Breaker overrides.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct BreakerOverrides {
    pub consecutive_failures: Option<u32>,
    pub base_ejection: Option<Dur>,
    pub max_ejection: Option<Dur>,
    pub max_ejected_percent: Option<u8>,
}

/// Limit overrides.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct LimitOverrides {
    pub max_concurrent: Option<usize>,
    pub max_pending: Option<usize>,
}

/// One level of the precedence chain: only the fields it sets win over the level below.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct PolicyOverrides {
    #[serde(default)]
    pub timeouts: TimeoutOverrides,
    #[serde(default)]
    pub retries: RetryOverrides,
    #[serde(default)]
    pub idempotency: IdempotencyOverrides,
    #[serde(default)]
    pub breaker: BreakerOverrides,
    #[serde(default)]
    pub limits: LimitOverrides,
}

/// A route: requests whose method (if given) matches and whose path starts with `path_prefix`. The longest
/// matching prefix wins; a route with a method beats one without for the same prefix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// HTTP method, any when absent.
    #[serde(default)]
    pub method: Option<String>,
    /// Path prefix, starting with `/`.
    pub path_prefix: String,
    /// What this route changes.
    #[serde(default)]
    pub overrides: PolicyOverrides,
}

/// A destination service's policy as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct ServiceConfig {
    #[serde(default)]
    pub timeouts: TimeoutOverrides,
    #[serde(default)]
    pub retries: RetryOverrides,
    #[serde(default)]
    pub idempotency: IdempotencyOverrides,
    #[serde(default)]
    pub breaker: BreakerOverrides,
    #[serde(default)]
    pub limits: LimitOverrides,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

impl ServiceConfig {
    fn overrides(&self) -> PolicyOverrides {
        PolicyOverrides {
            timeouts: self.timeouts.clone(),
            retries: self.retries.clone(),
            idempotency: self.idempotency.clone(),
            breaker: self.breaker.clone(),
            limits: self.limits.clone(),
        }
    }
}

/// The whole policy file: mesh-wide defaults and per-service policies keyed by destination name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Mesh-wide defaults, below every service's own settings.
    #[serde(default)]
    pub defaults: PolicyOverrides,
    /// Per destination service (e.g. `payment.shop:8080`).
    #[serde(default)]
    pub services: BTreeMap<String, ServiceConfig>,
}

/// A policy value that cannot be applied; names the field path and the value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyConfigError {
    /// A value out of its range.
    #[error("{field}: {value} is outside {range}")]
    OutOfRange {
        /// Field path.
        field: String,
        /// The value as written.
        value: String,
        /// The accepted range.
        range: &'static str,
    },
    /// A value that is malformed or contradicts another.
    #[error("{field}: {value} {reason}")]
    Invalid {
        /// Field path.
        field: String,
        /// The value as written.
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// The document does not parse.
    #[error("policy file: {0}")]
    Parse(String),
}

/// All the problems of a policy file at once, one per line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
pub struct PolicyErrors(pub Vec<PolicyConfigError>);

impl PolicyFile {
    /// Parses YAML (a JSON document is valid YAML too) and validates it.
    pub fn from_yaml(text: &str) -> Result<PolicyFile, PolicyErrors> {
        let file: PolicyFile = serde_yaml::from_str(text)
            .map_err(|e| PolicyErrors(vec![PolicyConfigError::Parse(e.to_string())]))?;
        file.validate()?;
        Ok(file)
    }

    /// Checks every value and every resolved combination, before anything is applied.
    pub fn validate(&self) -> Result<(), PolicyErrors> {
        let mut errors = Vec::new();
        validate_overrides("defaults", &self.defaults, &mut errors);
        for (name, service) in &self.services {
            let path = format!("services.{name}");
            validate_overrides(&path, &service.overrides(), &mut errors);
            for (i, route) in service.routes.iter().enumerate() {
                let route_path = format!("{path}.routes[{i}]");
                if !route.path_prefix.starts_with('/') {
                    errors.push(invalid(
                        &format!("{route_path}.path_prefix"),
                        &route.path_prefix,
                        "must start with /",
                    ));
                }
                if let Some(method) = &route.method {
                    if Method::from_bytes(method.as_bytes()).is_err() {
                        errors.push(invalid(
                            &format!("{route_path}.method"),
                            method,
                            "is not an HTTP method",
                        ));
                    }
                }
                validate_overrides(
                    &format!("{route_path}.overrides"),
                    &route.overrides,
                    &mut errors,
                );
            }
        }
        if errors.is_empty() {
            // Cross-field rules hold on resolved values, wherever each side came from.
            for name in self.services.keys() {
                let resolved = self.resolve(name);
                validate_resolved(&format!("services.{name}"), &resolved.default, &mut errors);
                for (i, (_, policy)) in resolved.routes.iter().enumerate() {
                    validate_resolved(&format!("services.{name}.routes[{i}]"), policy, &mut errors);
                }
            }
            validate_resolved(
                "defaults",
                &Policy::default().merged(&self.defaults),
                &mut errors,
            );
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(PolicyErrors(errors))
        }
    }

    /// The complete policy of `service` (mesh-wide defaults alone when the service is not listed).
    pub fn resolve(&self, service: &str) -> ServicePolicy {
        let mesh = Policy::default().merged(&self.defaults);
        let Some(config) = self.services.get(service) else {
            return ServicePolicy {
                default: Arc::new(mesh),
                routes: Vec::new(),
            };
        };
        let default = mesh.merged(&config.overrides());
        let routes = config
            .routes
            .iter()
            .map(|r| {
                let matcher = RouteMatch {
                    method: r
                        .method
                        .as_ref()
                        .and_then(|m| Method::from_bytes(m.as_bytes()).ok()),
                    path_prefix: r.path_prefix.clone(),
                };
                (matcher, Arc::new(default.merged(&r.overrides)))
            })
            .collect();
        ServicePolicy {
            default: Arc::new(default),
            routes,
        }
    }
}

impl Policy {
    /// This policy with `o`'s fields laid over it.
    pub fn merged(&self, o: &PolicyOverrides) -> Policy {
        let mut p = self.clone();
        let t = &o.timeouts;
        set(&mut p.timeouts.request, t.request.map(|d| d.0));
        if let Some(d) = t.per_try {
            p.timeouts.per_try = Some(d.0);
        }
        set(&mut p.timeouts.connect, t.connect.map(|d| d.0));
        set(&mut p.timeouts.idle, t.idle.map(|d| d.0));
        let r = &o.retries;
        set(&mut p.retries.max_attempts, r.max_attempts);
        set(&mut p.retries.conditions, r.conditions.clone());
        set(&mut p.retries.backoff_base, r.backoff.base.map(|d| d.0));
        set(&mut p.retries.backoff_max, r.backoff.max.map(|d| d.0));
        set(&mut p.retries.budget.ratio, r.budget.ratio);
        set(
            &mut p.retries.budget.min_per_second,
            r.budget.min_per_second,
        );
        set(&mut p.retries.budget.window, r.budget.window.map(|d| d.0));
        let i = &o.idempotency;
        set(&mut p.idempotency.inject, i.inject);
        set(&mut p.idempotency.enforce, i.enforce);
        set(&mut p.idempotency.ttl, i.ttl.map(|d| d.0));
        set(&mut p.idempotency.max_entries, i.max_entries);
        set(&mut p.idempotency.max_bytes, i.max_bytes);
        set(&mut p.idempotency.max_body_bytes, i.max_body_bytes);
        set(
            &mut p.idempotency.processing_timeout,
            i.processing_timeout.map(|d| d.0),
        );
        set(&mut p.idempotency.max_in_flight, i.max_in_flight);
        let b = &o.breaker;
        set(&mut p.breaker.consecutive_failures, b.consecutive_failures);
        set(&mut p.breaker.base_ejection, b.base_ejection.map(|d| d.0));
        set(&mut p.breaker.max_ejection, b.max_ejection.map(|d| d.0));
        set(&mut p.breaker.max_ejected_percent, b.max_ejected_percent);
        let l = &o.limits;
        set(&mut p.limits.max_concurrent, l.max_concurrent);
        set(&mut p.limits.max_pending, l.max_pending);
        p
    }
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

/// Which requests a route applies to.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteMatch {
    /// Any method when `None`.
    pub method: Option<Method>,
    /// Path prefix.
    pub path_prefix: String,
}

/// A service's resolved policy: its default and each route's.
#[derive(Debug, Clone, PartialEq)]
pub struct ServicePolicy {
    /// For requests no route matches.
    pub default: Arc<Policy>,
    /// Routes in file order.
    pub routes: Vec<(RouteMatch, Arc<Policy>)>,
}

impl ServicePolicy {
    /// One policy for every request.
    pub fn uniform(policy: Policy) -> ServicePolicy {
        ServicePolicy {
            default: Arc::new(policy),
            routes: Vec::new(),
        }
    }

    /// The policy for a request: the longest matching path prefix; with equal prefixes, a route naming the
    /// method beats one that does not.
    pub fn for_request(&self, method: &Method, path: &str) -> &Arc<Policy> {
        let mut best: Option<(usize, bool, &Arc<Policy>)> = None;
        for (m, policy) in &self.routes {
            if m.method.as_ref().is_some_and(|want| want != method)
                || !path.starts_with(&m.path_prefix)
            {
                continue;
            }
            let rank = (m.path_prefix.len(), m.method.is_some());
            if best.is_none_or(|(len, has_method, _)| rank > (len, has_method)) {
                best = Some((rank.0, rank.1, policy));
            }
        }
        best.map(|(_, _, p)| p).unwrap_or(&self.default)
    }
}

/// A service's policy that can be replaced while requests flow: each request reads the current value once.
#[derive(Debug, Clone)]
pub struct SharedPolicy(Arc<RwLock<Arc<ServicePolicy>>>);

impl SharedPolicy {
    /// Starts with `policy`.
    pub fn new(policy: ServicePolicy) -> SharedPolicy {
        SharedPolicy(Arc::new(RwLock::new(Arc::new(policy))))
    }

    /// The current policy.
    pub fn current(&self) -> Arc<ServicePolicy> {
        crate::policy::read(&self.0).clone()
    }

    /// Replaces the policy; requests already under way keep the one they started with.
    pub fn replace(&self, policy: ServicePolicy) {
        let mut guard = crate::policy::write(&self.0);
        *guard = Arc::new(policy);
    }

    /// Reads the current policy in place, for what a layer looks up on every request (no reference count
    /// taken).
    pub fn read_current<R>(&self, read: impl FnOnce(&ServicePolicy) -> R) -> R {
        read(&crate::policy::read(&self.0))
    }

    /// [`SharedPolicy::for_request`] for a layer that only reads a setting: once resolved, the request's
    /// policy is read in place.
    pub fn read_for_request<B, R>(
        &self,
        req: &mut http::Request<B>,
        read: impl FnOnce(&Policy) -> R,
    ) -> R {
        if let Some(RequestPolicy(p)) = req.extensions().get::<RequestPolicy>() {
            return read(p);
        }
        read(&self.resolve(req))
    }

    /// The policy of this request, resolved once and cached in its extensions so that every layer agrees.
    pub fn for_request<B>(&self, req: &mut http::Request<B>) -> Arc<Policy> {
        if let Some(RequestPolicy(p)) = req.extensions().get::<RequestPolicy>() {
            return p.clone();
        }
        self.resolve(req)
    }

    /// Resolves the request's route policy and caches it (the request has none cached yet).
    fn resolve<B>(&self, req: &mut http::Request<B>) -> Arc<Policy> {
        let policy = self
            .current()
            .for_request(req.method(), req.uri().path())
            .clone();
        req.extensions_mut().insert(RequestPolicy(policy.clone()));
        policy
    }
}

/// Request extension: the policy resolved for this request by the outermost policy layer.
#[derive(Debug, Clone)]
pub struct RequestPolicy(pub Arc<Policy>);

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
defaults:
  timeouts: { request: 5s }
services:
  payment:
    timeouts: { per_try: 500ms }
    retries: { max_attempts: 4, budget: { ratio: 0.1 } }
    idempotency: { inject: true }
    routes:
      - path_prefix: /charge
        overrides: { retries: { max_attempts: 2 } }
      - method: POST
        path_prefix: /charge
        overrides: { timeouts: { request: 2s } }
      - path_prefix: /charge/refund
        overrides: { retries: { max_attempts: 1 } }
"#;

    #[test]
    fn precedence_is_route_then_service_then_mesh_then_builtin() {
        let file = PolicyFile::from_yaml(SAMPLE).unwrap();
        let svc = file.resolve("payment");
        let d = &svc.default;
        assert_eq!(d.timeouts.request, Duration::from_secs(5));
        assert_eq!(d.timeouts.per_try, Some(Duration::from_millis(500)));
        assert_eq!(d.retries.max_attempts, 4);
        assert_eq!(d.retries.budget.ratio, 0.1);
        assert_eq!(d.retries.budget.min_per_second, 10);
        assert!(d.idempotency.inject);
        let get = svc.for_request(&Method::GET, "/charge/1");
        assert_eq!(get.retries.max_attempts, 2);
        assert_eq!(get.timeouts.request, Duration::from_secs(5));
        let post = svc.for_request(&Method::POST, "/charge/1");
        assert_eq!(post.timeouts.request, Duration::from_secs(2));
        assert_eq!(
            post.retries.max_attempts, 4,
            "a route's overrides sit on the service policy, not on other routes"
        );
        assert_eq!(
            svc.for_request(&Method::POST, "/charge/refund/9")
                .retries
                .max_attempts,
            1
        );
        assert_eq!(
            svc.for_request(&Method::GET, "/other").retries.max_attempts,
            4
        );
        let unknown = file.resolve("nobody");
        assert_eq!(unknown.default.timeouts.request, Duration::from_secs(5));
        assert!(!unknown.default.idempotency.inject);
    }

    #[test]
    fn out_of_range_values_name_field_and_value() {
        let err = PolicyFile::from_yaml(
            "services:\n  pay:\n    retries: { budget: { ratio: 7.5, window: 2m } }\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("services.pay.retries.budget.ratio: 7.5 is outside 0..=1"),
            "{err}"
        );
        assert!(
            err.contains("services.pay.retries.budget.window: 2m is outside 1s..=60s"),
            "{err}"
        );
        let err = PolicyFile::from_yaml(
            "services:\n  pay:\n    routes: [{ path_prefix: x, overrides: { breaker: { max_ejected_percent: 150 } } }]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("services.pay.routes[0].path_prefix: x must start with /"),
            "{err}"
        );
        assert!(
            err.contains("routes[0].overrides.breaker.max_ejected_percent: 150 is outside 0..=100"),
            "{err}"
        );
    }

    #[test]
    fn cross_field_rules_use_resolved_values() {
        let err = PolicyFile::from_yaml("defaults:\n  retries: { backoff: { max: 10ms } }\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("retries.backoff.base: 25ms is above retries.backoff.max (10ms)"),
            "{err}"
        );
        let err =
            PolicyFile::from_yaml("services:\n  a:\n    timeouts: { request: 1s, per_try: 2s }\n")
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("services.a.timeouts.per_try: 2s is above timeouts.request (1s)"),
            "{err}"
        );
    }

    #[test]
    fn bad_durations_and_unknown_fields_are_refused() {
        let err = PolicyFile::from_yaml("defaults:\n  timeouts: { request: soon }\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("soon"), "{err}");
        let err = PolicyFile::from_yaml("defaults:\n  idempotency: { ttl: 1000y }\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("defaults.idempotency.ttl: 1000years is outside 0s<..=365d"),
            "{err}"
        );
        let err = PolicyFile::from_yaml("defaults:\n  timeouts: { requets: 1s }\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("requets"), "{err}");
        let err = PolicyFile::from_yaml("defaults:\n  retries: { conditions: [\"418\"] }\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("418"), "{err}");
    }

    #[test]
    fn json_is_accepted() {
        let file = PolicyFile::from_yaml(
            r#"{"services": {"a": {"retries": {"conditions": ["503", "connect-failure"]}, "limits": {"max_pending": 0}}}}"#,
        )
        .unwrap();
        let p = file.resolve("a").default;
        assert_eq!(
            p.retries.conditions,
            vec![RetryOn::Status503, RetryOn::ConnectFailure]
        );
        assert_eq!(p.limits.max_pending, 0);
    }

    #[test]
    fn shared_policy_is_replaced_while_requests_keep_theirs() {
        let shared = SharedPolicy::new(ServicePolicy::uniform(Policy::default()));
        let mut req = http::Request::new(());
        let before = shared.for_request(&mut req);
        let mut changed = Policy::default();
        changed.retries.max_attempts = 1;
        shared.replace(ServicePolicy::uniform(changed));
        assert_eq!(
            shared.for_request(&mut req).retries.max_attempts,
            before.retries.max_attempts
        );
        assert_eq!(
            shared
                .for_request(&mut http::Request::new(()))
                .retries
                .max_attempts,
            1
        );
    }
}
