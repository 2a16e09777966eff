//! The `meshlet.io/*` annotations of a Service, turned into that Service's policy, inbound rules and opaque
//! ports (the reference, with types and defaults, is docs/annotations.md).
//!
//! Why all-or-nothing: the annotations of one Service are applied together or not at all. A half-applied set
//! (the new timeout but not the retry budget written next to it) is a state nobody asked for; keeping the
//! whole last good set is what the user can reason about from `kubectl describe service`.
//!
//! Each policy annotation is one field of the policy schema ([`meshlet::policy::config::ServiceConfig`]): its
//! value is converted to the field's JSON type and read with the schema's own deserializer, then the whole
//! policy is checked with the schema's validation against the mesh-wide defaults, so an annotation accepts
//! exactly what the YAML file accepts. Errors name the annotation and its value.

use std::collections::BTreeMap;
use std::fmt;

use meshlet::discovery::{InboundConfig, InboundMode};
use meshlet::inject::values::{parse_port_list, PortRange};
use meshlet::policy::config::{PolicyConfigError, PolicyOverrides, ServiceConfig as ServicePolicy};
use meshlet::policy::PolicyFile;
use meshlet::tls::{AllowList, IdentityPattern, SpiffeId};
use serde_json::{Map, Value};

/// The prefix of every annotation read here; an unknown annotation with this prefix is an error (a typo
/// must not silently leave a policy unset).
pub const PREFIX: &str = "meshlet.io/";
/// `permissive` or `strict`.
pub const MTLS_MODE: &str = "meshlet.io/mtls-mode";
/// Callers allowed, comma-separated (`ns/<ns>/sa/<sa>`, `ns/<ns>/*` or `spiffe://…`).
pub const AUTHORIZED_CLIENTS: &str = "meshlet.io/authorized-clients";
/// Service ports carried as opaque TCP.
pub const OPAQUE_PORTS: &str = "meshlet.io/opaque-ports";

/// Most entries `authorized-clients` may list; bounds the allow-list every sidecar checks.
const MAX_CLIENTS: usize = 256;
/// Longest value quoted in an error message (annotation values may be up to 256 KiB).
const MAX_QUOTED: usize = 120;

/// What an annotation's value is, which decides how the text becomes the schema field's JSON value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `250ms`, `2s`, `1m30s`.
    Duration,
    /// A whole number ≥ 0.
    Integer,
    /// A decimal number.
    Number,
    /// `true` or `false`.
    Bool,
    /// Comma-separated retry conditions.
    Conditions,
}

/// One policy annotation: its name, the schema field it sets (path under a service's policy) and its kind.
#[derive(Debug, Clone, Copy)]
pub struct PolicyAnnotation {
    /// The annotation.
    pub name: &'static str,
    /// The field of [`ServicePolicy`], dotted (`retries.budget.ratio`); also how validation errors name it.
    pub field: &'static str,
    /// How its value is read.
    pub kind: Kind,
}

const fn annotation(name: &'static str, field: &'static str, kind: Kind) -> PolicyAnnotation {
    PolicyAnnotation { name, field, kind }
}

/// Every policy annotation, in the order of docs/annotations.md.
pub const POLICY_ANNOTATIONS: &[PolicyAnnotation] = &[
    annotation(
        "meshlet.io/timeout-request",
        "timeouts.request",
        Kind::Duration,
    ),
    annotation(
        "meshlet.io/timeout-per-try",
        "timeouts.per_try",
        Kind::Duration,
    ),
    annotation(
        "meshlet.io/timeout-connect",
        "timeouts.connect",
        Kind::Duration,
    ),
    annotation("meshlet.io/timeout-idle", "timeouts.idle", Kind::Duration),
    annotation(
        "meshlet.io/retry-max-attempts",
        "retries.max_attempts",
        Kind::Integer,
    ),
    annotation(
        "meshlet.io/retry-on",
        "retries.conditions",
        Kind::Conditions,
    ),
    annotation(
        "meshlet.io/retry-backoff",
        "retries.backoff.base",
        Kind::Duration,
    ),
    annotation(
        "meshlet.io/retry-backoff-max",
        "retries.backoff.max",
        Kind::Duration,
    ),
    annotation(
        "meshlet.io/retry-budget-ratio",
        "retries.budget.ratio",
        Kind::Number,
    ),
    annotation(
        "meshlet.io/retry-budget-min-per-second",
        "retries.budget.min_per_second",
        Kind::Integer,
    ),
    annotation(
        "meshlet.io/retry-budget-window",
        "retries.budget.window",
        Kind::Duration,
    ),
    annotation(
        "meshlet.io/idempotency-inject",
        "idempotency.inject",
        Kind::Bool,
    ),
    annotation(
        "meshlet.io/idempotency-enforce",
        "idempotency.enforce",
        Kind::Bool,
    ),
    annotation(
        "meshlet.io/idempotency-ttl",
        "idempotency.ttl",
        Kind::Duration,
    ),
    annotation(
        "meshlet.io/idempotency-max-entries",
        "idempotency.max_entries",
        Kind::Integer,
    ),
    annotation(
        "meshlet.io/idempotency-max-bytes",
        "idempotency.max_bytes",
        Kind::Integer,
    ),
    annotation(
        "meshlet.io/idempotency-max-body-bytes",
        "idempotency.max_body_bytes",
        Kind::Integer,
    ),
    annotation(
        "meshlet.io/idempotency-processing-timeout",
        "idempotency.processing_timeout",
        Kind::Duration,
    ),
    annotation(
        "meshlet.io/breaker-consecutive-failures",
        "breaker.consecutive_failures",
        Kind::Integer,
    ),
    annotation(
        "meshlet.io/breaker-base-ejection",
        "breaker.base_ejection",
        Kind::Duration,
    ),
    annotation(
        "meshlet.io/breaker-max-ejection",
        "breaker.max_ejection",
        Kind::Duration,
    ),
    annotation(
        "meshlet.io/breaker-max-ejected-percent",
        "breaker.max_ejected_percent",
        Kind::Integer,
    ),
    annotation(
        "meshlet.io/max-concurrent-requests",
        "limits.max_concurrent",
        Kind::Integer,
    ),
    annotation(
        "meshlet.io/max-pending-requests",
        "limits.max_pending",
        Kind::Integer,
    ),
];

/// What a Service's annotations ask of the mesh.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceAnnotations {
    /// Client-side and de-duplication policy: the Service's entry of the `policy:` section.
    pub policy: ServicePolicy,
    /// mTLS mode and authorized clients, applied by the Service's own sidecars.
    pub inbound: InboundConfig,
    /// Service ports carried as opaque TCP.
    pub opaque_ports: Vec<PortRange>,
}

impl ServiceAnnotations {
    /// Whether `port` (a Service port) was listed in `meshlet.io/opaque-ports`.
    pub fn is_opaque(&self, port: u16) -> bool {
        self.opaque_ports.iter().any(|r| r.contains(port))
    }
}

/// A refused annotation: which, the value as written, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnotationError {
    /// The annotation's name.
    pub annotation: String,
    /// Its value (shortened when long).
    pub value: String,
    /// Why it was refused.
    pub reason: String,
}

impl AnnotationError {
    fn new(annotation: &str, value: &str, reason: impl Into<String>) -> Self {
        AnnotationError {
            annotation: annotation.to_string(),
            value: shorten(value),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for AnnotationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {:?} {}", self.annotation, self.value, self.reason)
    }
}

fn shorten(value: &str) -> String {
    if value.chars().count() <= MAX_QUOTED {
        return value.to_string();
    }
    let mut short: String = value.chars().take(MAX_QUOTED).collect();
    short.push('…');
    short
}

/// Reads the `meshlet.io/*` annotations of the Service whose policy key is `key`; every other annotation
/// is ignored. `defaults` (the mesh-wide defaults) take part in the cross-field checks
/// (`timeout-per-try` ≤ the request timeout in force). All the problems are returned at once.
pub fn parse(
    key: &str,
    annotations: &BTreeMap<String, String>,
    trust_domain: &str,
    defaults: &PolicyOverrides,
) -> Result<ServiceAnnotations, Vec<AnnotationError>> {
    let mut errors = Vec::new();
    let mut parsed = ServiceAnnotations::default();
    let mut fields = Value::Object(Map::new());
    let mut set: Vec<(&PolicyAnnotation, &str)> = Vec::new();
    for (name, value) in annotations.range(PREFIX.to_string()..) {
        if !name.starts_with(PREFIX) {
            break;
        }
        let value = value.trim();
        match name.as_str() {
            MTLS_MODE => match value {
                "permissive" => parsed.inbound.mode = InboundMode::Permissive,
                "strict" => parsed.inbound.mode = InboundMode::Strict,
                _ => errors.push(AnnotationError::new(
                    name,
                    value,
                    "is not permissive or strict",
                )),
            },
            AUTHORIZED_CLIENTS => match parse_clients(value, trust_domain) {
                Ok(allow) => parsed.inbound.allow = Some(allow),
                Err(reason) => errors.push(AnnotationError::new(name, value, reason)),
            },
            OPAQUE_PORTS => match parse_port_list(value) {
                Ok(ports) => parsed.opaque_ports = ports,
                Err(reason) => errors.push(AnnotationError::new(name, value, reason)),
            },
            _ => match POLICY_ANNOTATIONS.iter().find(|a| a.name == name) {
                Some(known) => match field_value(known, value) {
                    Ok(json) => {
                        insert(&mut fields, known.field, json);
                        set.push((known, value));
                    }
                    Err(reason) => errors.push(AnnotationError::new(name, value, reason)),
                },
                None => errors.push(AnnotationError::new(
                    name,
                    value,
                    "is not a Service annotation of meshlet (see docs/annotations.md)",
                )),
            },
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    parsed.policy = serde_json::from_value(fields).map_err(|e| {
        vec![AnnotationError::new(
            PREFIX,
            "",
            format!("policy annotations do not fit the schema: {e}"),
        )]
    })?;
    let file = PolicyFile {
        defaults: defaults.clone(),
        services: BTreeMap::from([(key.to_string(), parsed.policy.clone())]),
    };
    if let Err(problems) = file.validate() {
        let prefix = format!("services.{key}.");
        return Err(problems
            .0
            .iter()
            .map(|problem| blame(problem, &prefix, &set))
            .collect());
    }
    Ok(parsed)
}

/// The annotation a validation error is about: the one setting the field, else one named in the reason
/// (a cross-field rule against a default), else the mesh-wide defaults.
fn blame(
    problem: &PolicyConfigError,
    prefix: &str,
    set: &[(&PolicyAnnotation, &str)],
) -> AnnotationError {
    let (field, reason) = match problem {
        PolicyConfigError::OutOfRange { field, range, .. } => {
            (field.as_str(), format!("is outside {range}"))
        }
        PolicyConfigError::Invalid { field, reason, .. } => (field.as_str(), reason.clone()),
        PolicyConfigError::Parse(message) => ("", message.clone()),
    };
    let field = field.strip_prefix(prefix).unwrap_or(field);
    let culprit = set
        .iter()
        .find(|(a, _)| a.field == field)
        .or_else(|| set.iter().find(|(a, _)| reason.contains(a.field)));
    match culprit {
        Some((a, value)) => AnnotationError::new(a.name, value, reason),
        None => AnnotationError::new(
            "mesh-wide defaults",
            field,
            format!("{reason} (with this Service's annotations)"),
        ),
    }
}

/// The JSON value of the schema field behind `annotation`.
fn field_value(annotation: &PolicyAnnotation, value: &str) -> Result<Value, String> {
    let json = match annotation.kind {
        Kind::Duration => Value::String(value.to_string()),
        Kind::Integer => Value::from(
            value
                .parse::<u64>()
                .map_err(|_| "is not a whole number".to_string())?,
        ),
        Kind::Number => {
            let number: f64 = value.parse().map_err(|_| "is not a number".to_string())?;
            serde_json::Number::from_f64(number)
                .map(Value::Number)
                .ok_or_else(|| "is not a finite number".to_string())?
        }
        Kind::Bool => match value {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => return Err("is not true or false".to_string()),
        },
        Kind::Conditions => {
            let conditions: Vec<Value> = value
                .split(',')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(|c| Value::String(c.to_string()))
                .collect();
            if conditions.is_empty() {
                return Err("lists no condition".to_string());
            }
            Value::Array(conditions)
        }
    };
    // The schema's own deserializer decides (duration syntax, integer width, known conditions).
    let mut alone = Value::Object(Map::new());
    insert(&mut alone, annotation.field, json.clone());
    serde_json::from_value::<ServicePolicy>(alone).map_err(|e| format!("is refused: {e}"))?;
    Ok(json)
}

/// Sets `path` (dotted) in a JSON object tree, creating the objects on the way.
fn insert(tree: &mut Value, path: &str, value: Value) {
    let mut node = tree;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        let Value::Object(map) = node else {
            return;
        };
        if parts.peek().is_none() {
            map.insert(part.to_string(), value);
            return;
        }
        node = map
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
}

/// `ns/shop/sa/order,ns/ops/*,spiffe://other/ns/a/sa/b`; the trust domain is implied for `ns/…/sa/…`.
fn parse_clients(value: &str, trust_domain: &str) -> Result<AllowList, String> {
    let mut patterns = Vec::new();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        if patterns.len() == MAX_CLIENTS {
            return Err(format!("lists more than {MAX_CLIENTS} clients"));
        }
        let pattern = match entry
            .strip_prefix("ns/")
            .and_then(|rest| rest.split_once("/sa/"))
        {
            Some((ns, sa)) => SpiffeId::new(trust_domain, ns, sa).map(IdentityPattern::Exact),
            None => entry.parse::<IdentityPattern>(),
        }
        .map_err(|e| format!("has a bad entry {entry:?}: {e}"))?;
        patterns.push(pattern);
    }
    if patterns.is_empty() {
        return Err("lists no client (remove the annotation to allow everyone)".to_string());
    }
    Ok(AllowList::new(patterns))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use meshlet::policy::config::RetryOn;
    use serde::Deserialize;

    use super::*;

    const KEY: &str = "payment.shop";
    const TD: &str = "cluster.local";

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn good(pairs: &[(&str, &str)]) -> ServiceAnnotations {
        parse(KEY, &annotations(pairs), TD, &PolicyOverrides::default())
            .unwrap_or_else(|e| panic!("{pairs:?} refused: {e:?}"))
    }

    fn bad(pairs: &[(&str, &str)]) -> Vec<AnnotationError> {
        parse(KEY, &annotations(pairs), TD, &PolicyOverrides::default())
            .expect_err("should be refused")
    }

    /// The resolved policy of the Service with these annotations.
    fn resolved(pairs: &[(&str, &str)]) -> meshlet::policy::Policy {
        let file = PolicyFile {
            defaults: PolicyOverrides::default(),
            services: BTreeMap::from([(KEY.to_string(), good(pairs).policy)]),
        };
        (*file.resolve(KEY).default).clone()
    }

    #[test]
    fn every_policy_annotation_sets_its_field() {
        let p = resolved(&[
            ("meshlet.io/timeout-request", "4s"),
            ("meshlet.io/timeout-per-try", "1s"),
            ("meshlet.io/timeout-connect", "500ms"),
            ("meshlet.io/timeout-idle", "30m"),
            ("meshlet.io/retry-max-attempts", "4"),
            ("meshlet.io/retry-on", "connect-failure, 503"),
            ("meshlet.io/retry-backoff", "50ms"),
            ("meshlet.io/retry-backoff-max", "2s"),
            ("meshlet.io/retry-budget-ratio", "0.1"),
            ("meshlet.io/retry-budget-min-per-second", "5"),
            ("meshlet.io/retry-budget-window", "20s"),
            ("meshlet.io/idempotency-inject", "true"),
            ("meshlet.io/idempotency-enforce", "true"),
            ("meshlet.io/idempotency-ttl", "2h"),
            ("meshlet.io/idempotency-max-entries", "500"),
            ("meshlet.io/idempotency-max-bytes", "1048576"),
            ("meshlet.io/idempotency-max-body-bytes", "4096"),
            ("meshlet.io/idempotency-processing-timeout", "30s"),
            ("meshlet.io/breaker-consecutive-failures", "7"),
            ("meshlet.io/breaker-base-ejection", "30s"),
            ("meshlet.io/breaker-max-ejection", "5m"),
            ("meshlet.io/breaker-max-ejected-percent", "30"),
            ("meshlet.io/max-concurrent-requests", "100"),
            ("meshlet.io/max-pending-requests", "0"),
        ]);
        let s = Duration::from_secs;
        assert_eq!(p.timeouts.request, s(4));
        assert_eq!(p.timeouts.per_try, Some(s(1)));
        assert_eq!(p.timeouts.connect, Duration::from_millis(500));
        assert_eq!(p.timeouts.idle, s(1800));
        assert_eq!(p.retries.max_attempts, 4);
        assert_eq!(
            p.retries.conditions,
            vec![RetryOn::ConnectFailure, RetryOn::Status503]
        );
        assert_eq!(p.retries.backoff_base, Duration::from_millis(50));
        assert_eq!(p.retries.backoff_max, s(2));
        assert_eq!(p.retries.budget.ratio, 0.1);
        assert_eq!(p.retries.budget.min_per_second, 5);
        assert_eq!(p.retries.budget.window, s(20));
        assert!(p.idempotency.inject && p.idempotency.enforce);
        assert_eq!(p.idempotency.ttl, s(7200));
        assert_eq!(p.idempotency.max_entries, 500);
        assert_eq!(p.idempotency.max_bytes, 1 << 20);
        assert_eq!(p.idempotency.max_body_bytes, 4096);
        assert_eq!(p.idempotency.processing_timeout, s(30));
        assert_eq!(p.breaker.consecutive_failures, 7);
        assert_eq!(p.breaker.base_ejection, s(30));
        assert_eq!(p.breaker.max_ejection, s(300));
        assert_eq!(p.breaker.max_ejected_percent, 30);
        assert_eq!(p.limits.max_concurrent, 100);
        assert_eq!(p.limits.max_pending, 0);
    }

    #[test]
    fn no_annotation_leaves_every_default() {
        let parsed = good(&[("app.kubernetes.io/name", "payment"), ("other/x", "y")]);
        assert_eq!(parsed, ServiceAnnotations::default());
        assert_eq!(resolved(&[]), meshlet::policy::Policy::default());
    }

    #[test]
    fn security_and_port_annotations() {
        let parsed = good(&[
            ("meshlet.io/mtls-mode", "strict"),
            (
                "meshlet.io/authorized-clients",
                "ns/shop/sa/order, ns/ops/*,spiffe://other.td/ns/a/sa/b",
            ),
            ("meshlet.io/opaque-ports", "6379,9000-9002"),
        ]);
        assert_eq!(parsed.inbound.mode, InboundMode::Strict);
        let allow = parsed.inbound.allow.clone().unwrap();
        let id = |s: &str| s.parse::<SpiffeId>().unwrap();
        assert!(allow.allows(&id("spiffe://cluster.local/ns/shop/sa/order")));
        assert!(!allow.allows(&id("spiffe://cluster.local/ns/shop/sa/web")));
        assert!(allow.allows(&id("spiffe://cluster.local/ns/ops/sa/anyone")));
        assert!(allow.allows(&id("spiffe://other.td/ns/a/sa/b")));
        assert!(parsed.opaque_ports.len() == 2);
        assert!(parsed.is_opaque(6379) && parsed.is_opaque(9001) && !parsed.is_opaque(8080));
        assert_eq!(
            good(&[("meshlet.io/mtls-mode", "permissive")]).inbound.mode,
            InboundMode::Permissive
        );
    }

    /// Every annotation with a bad value: refused, and the error names the annotation and the value.
    #[test]
    fn bad_values_name_the_annotation_and_the_value() {
        let cases: &[(&str, &str, &str)] = &[
            ("meshlet.io/timeout-request", "soon", "expected a duration"),
            ("meshlet.io/timeout-request", "0s", "outside 0s<..=365d"),
            ("meshlet.io/timeout-per-try", "-1s", "expected a duration"),
            ("meshlet.io/timeout-connect", "1000y", "outside"),
            ("meshlet.io/timeout-idle", "", "expected a duration"),
            ("meshlet.io/retry-max-attempts", "11", "outside 1..=10"),
            (
                "meshlet.io/retry-max-attempts",
                "three",
                "not a whole number",
            ),
            ("meshlet.io/retry-on", "418", "unknown variant"),
            ("meshlet.io/retry-on", " , ", "lists no condition"),
            ("meshlet.io/retry-backoff", "fast", "expected a duration"),
            ("meshlet.io/retry-backoff-max", "0ms", "outside"),
            ("meshlet.io/retry-budget-ratio", "7.5", "outside 0..=1"),
            (
                "meshlet.io/retry-budget-ratio",
                "NaN",
                "not a finite number",
            ),
            ("meshlet.io/retry-budget-ratio", "a lot", "not a number"),
            (
                "meshlet.io/retry-budget-min-per-second",
                "-5",
                "not a whole number",
            ),
            (
                "meshlet.io/retry-budget-min-per-second",
                "2000000",
                "outside",
            ),
            ("meshlet.io/retry-budget-window", "2m", "outside 1s..=60s"),
            ("meshlet.io/idempotency-inject", "yes", "not true or false"),
            (
                "meshlet.io/idempotency-enforce",
                "TRUE",
                "not true or false",
            ),
            (
                "meshlet.io/idempotency-ttl",
                "forever",
                "expected a duration",
            ),
            ("meshlet.io/idempotency-max-entries", "0", ">= 1"),
            (
                "meshlet.io/idempotency-max-bytes",
                "1.5",
                "not a whole number",
            ),
            ("meshlet.io/idempotency-max-body-bytes", "0", ">= 1"),
            ("meshlet.io/idempotency-processing-timeout", "0s", "outside"),
            ("meshlet.io/breaker-consecutive-failures", "0", ">= 1"),
            (
                "meshlet.io/breaker-base-ejection",
                "x",
                "expected a duration",
            ),
            ("meshlet.io/breaker-max-ejection", "0s", "outside"),
            (
                "meshlet.io/breaker-max-ejected-percent",
                "150",
                "outside 0..=100",
            ),
            ("meshlet.io/breaker-max-ejected-percent", "300", "u8"),
            ("meshlet.io/max-concurrent-requests", "0", ">= 1"),
            (
                "meshlet.io/max-pending-requests",
                "-1",
                "not a whole number",
            ),
            ("meshlet.io/mtls-mode", "lax", "not permissive or strict"),
            ("meshlet.io/authorized-clients", "shop/order", "bad entry"),
            ("meshlet.io/authorized-clients", "ns/shop/sa/", "bad entry"),
            ("meshlet.io/authorized-clients", ",", "lists no client"),
            ("meshlet.io/opaque-ports", "99999", "99999"),
            ("meshlet.io/opaque-ports", "90-80", "ends before it starts"),
            (
                "meshlet.io/timeout-requets",
                "1s",
                "not a Service annotation",
            ),
        ];
        for (annotation, value, reason) in cases {
            let errors = bad(&[(annotation, value)]);
            assert_eq!(errors.len(), 1, "{annotation}={value:?}: {errors:?}");
            let error = &errors[0];
            assert_eq!(error.annotation, *annotation, "{error}");
            assert_eq!(error.value, value.trim(), "{error}");
            let text = error.to_string();
            assert!(
                text.contains(annotation) && text.contains(reason),
                "{annotation}={value:?}: {text}"
            );
        }
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let errors = bad(&[
            ("meshlet.io/mtls-mode", "lax"),
            ("meshlet.io/retry-max-attempts", "0"),
            ("meshlet.io/retry-budget-window", "0s"),
        ]);
        assert_eq!(errors.len(), 1, "syntax first: {errors:?}");
        let errors = bad(&[
            ("meshlet.io/retry-max-attempts", "0"),
            ("meshlet.io/retry-budget-window", "0s"),
        ]);
        let names: Vec<_> = errors.iter().map(|e| e.annotation.as_str()).collect();
        assert_eq!(
            names,
            [
                "meshlet.io/retry-max-attempts",
                "meshlet.io/retry-budget-window"
            ]
        );
    }

    #[test]
    fn cross_field_rules_blame_an_annotation_and_see_the_mesh_defaults() {
        let errors = bad(&[
            ("meshlet.io/timeout-request", "1s"),
            ("meshlet.io/timeout-per-try", "2s"),
        ]);
        assert_eq!(errors[0].annotation, "meshlet.io/timeout-per-try");
        assert!(
            errors[0].reason.contains("above timeouts.request"),
            "{errors:?}"
        );
        // A backoff ceiling below the built-in base: blamed on the annotation named in the rule.
        let errors = bad(&[("meshlet.io/retry-backoff-max", "10ms")]);
        assert_eq!(errors[0].annotation, "meshlet.io/retry-backoff-max");
        assert_eq!(errors[0].value, "10ms");
        // The mesh-wide request timeout takes part: 2s per try is fine under 10s, not under 1s.
        let defaults: PolicyOverrides = serde_yaml::from_str("timeouts: { request: 1s }").unwrap();
        let per_try = annotations(&[("meshlet.io/timeout-per-try", "2s")]);
        assert!(parse(KEY, &per_try, TD, &PolicyOverrides::default()).is_ok());
        let errors = parse(KEY, &per_try, TD, &defaults).unwrap_err();
        assert_eq!(errors[0].annotation, "meshlet.io/timeout-per-try");
    }

    /// The shipped example manifests must be accepted as they are.
    #[test]
    fn the_shop_manifest_annotations_are_all_accepted() {
        let shop = include_str!("../../../deploy/k8s/shop.yaml");
        let mut services = 0;
        for document in serde_yaml::Deserializer::from_str(shop) {
            let value = serde_yaml::Value::deserialize(document).unwrap();
            if value["kind"].as_str() != Some("Service") {
                continue;
            }
            services += 1;
            let name = value["metadata"]["name"].as_str().unwrap();
            let annotations: BTreeMap<String, String> =
                serde_yaml::from_value(value["metadata"]["annotations"].clone())
                    .unwrap_or_default();
            let key = format!("{name}.shop");
            if let Err(errors) = parse(&key, &annotations, TD, &PolicyOverrides::default()) {
                panic!("{key}: {errors:?}");
            }
        }
        assert!(services >= 8, "{services} Services");
    }

    #[test]
    fn long_values_are_shortened_in_messages() {
        let long = "x".repeat(10_000);
        let errors = bad(&[("meshlet.io/mtls-mode", &long)]);
        assert!(errors[0].to_string().len() < 300, "{}", errors[0]);
    }
}
