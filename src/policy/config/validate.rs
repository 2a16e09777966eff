//! Checks of policy values, run on the whole file before anything is applied; every error names the field
//! path and the value.

use std::fmt;
use std::time::Duration;

use super::{Dur, Policy, PolicyConfigError, PolicyOverrides, MAX_DURATION};

pub(super) fn out_of_range(
    field: &str,
    value: impl fmt::Display,
    range: &'static str,
) -> PolicyConfigError {
    PolicyConfigError::OutOfRange {
        field: field.to_string(),
        value: value.to_string(),
        range,
    }
}

pub(super) fn invalid(field: &str, value: impl fmt::Display, reason: &str) -> PolicyConfigError {
    PolicyConfigError::Invalid {
        field: field.to_string(),
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

pub(super) fn validate_overrides(
    path: &str,
    o: &PolicyOverrides,
    errors: &mut Vec<PolicyConfigError>,
) {
    let positive = |field: &str, d: &Option<Dur>, errors: &mut Vec<PolicyConfigError>| {
        if let Some(d) = d {
            if d.0.is_zero() || d.0 > MAX_DURATION {
                errors.push(out_of_range(&format!("{path}.{field}"), d, "0s<..=365d"));
            }
        }
    };
    positive("timeouts.request", &o.timeouts.request, errors);
    positive("timeouts.per_try", &o.timeouts.per_try, errors);
    positive("timeouts.connect", &o.timeouts.connect, errors);
    positive("timeouts.idle", &o.timeouts.idle, errors);
    if let Some(n) = o.retries.max_attempts {
        if !(1..=10).contains(&n) {
            errors.push(out_of_range(
                &format!("{path}.retries.max_attempts"),
                n,
                "1..=10",
            ));
        }
    }
    positive("retries.backoff.base", &o.retries.backoff.base, errors);
    positive("retries.backoff.max", &o.retries.backoff.max, errors);
    if let Some(r) = o.retries.budget.ratio {
        if !(0.0..=1.0).contains(&r) {
            errors.push(out_of_range(
                &format!("{path}.retries.budget.ratio"),
                r,
                "0..=1",
            ));
        }
    }
    if let Some(n) = o.retries.budget.min_per_second {
        if n > 1_000_000 {
            errors.push(out_of_range(
                &format!("{path}.retries.budget.min_per_second"),
                n,
                "0..=1000000",
            ));
        }
    }
    if let Some(w) = o.retries.budget.window {
        if w.0 < Duration::from_secs(1) || w.0 > Duration::from_secs(60) {
            errors.push(out_of_range(
                &format!("{path}.retries.budget.window"),
                w,
                "1s..=60s",
            ));
        }
    }
    positive("idempotency.ttl", &o.idempotency.ttl, errors);
    positive(
        "idempotency.processing_timeout",
        &o.idempotency.processing_timeout,
        errors,
    );
    for (field, value) in [
        ("idempotency.max_entries", o.idempotency.max_entries),
        ("idempotency.max_bytes", o.idempotency.max_bytes),
        ("idempotency.max_body_bytes", o.idempotency.max_body_bytes),
        ("idempotency.max_in_flight", o.idempotency.max_in_flight),
        ("limits.max_concurrent", o.limits.max_concurrent),
    ] {
        if value == Some(0) {
            errors.push(out_of_range(&format!("{path}.{field}"), 0, ">= 1"));
        }
    }
    if let Some(n) = o.breaker.consecutive_failures {
        if n == 0 {
            errors.push(out_of_range(
                &format!("{path}.breaker.consecutive_failures"),
                n,
                ">= 1",
            ));
        }
    }
    positive("breaker.base_ejection", &o.breaker.base_ejection, errors);
    positive("breaker.max_ejection", &o.breaker.max_ejection, errors);
    if let Some(p) = o.breaker.max_ejected_percent {
        if p > 100 {
            errors.push(out_of_range(
                &format!("{path}.breaker.max_ejected_percent"),
                p,
                "0..=100",
            ));
        }
    }
}

pub(super) fn validate_resolved(path: &str, p: &Policy, errors: &mut Vec<PolicyConfigError>) {
    let r = &p.retries;
    if r.backoff_base > r.backoff_max {
        errors.push(invalid(
            &format!("{path}.retries.backoff.base"),
            Dur(r.backoff_base),
            &format!("is above retries.backoff.max ({})", Dur(r.backoff_max)),
        ));
    }
    let b = &p.breaker;
    if b.base_ejection > b.max_ejection {
        errors.push(invalid(
            &format!("{path}.breaker.base_ejection"),
            Dur(b.base_ejection),
            &format!("is above breaker.max_ejection ({})", Dur(b.max_ejection)),
        ));
    }
    if let Some(per_try) = p.timeouts.per_try {
        if per_try > p.timeouts.request {
            errors.push(invalid(
                &format!("{path}.timeouts.per_try"),
                Dur(per_try),
                &format!("is above timeouts.request ({})", Dur(p.timeouts.request)),
            ));
        }
    }
}
