//! The failure-accrual state machine of a service's endpoints.
//!
//! ```text
//! closed ──N consecutive failures──▶ open (ejected for a jittered, growing time)
//!   ▲                                   │ time is up
//!   └──────── probe succeeds ◀── half-open (exactly one request admitted) ──probe fails──▶ open (longer)
//! ```
//!
//! Ejections are refused when they would take more than `max_ejected_percent` of the service's endpoints out
//! of rotation (a failing majority is more likely a problem of the caller or of the whole service), except
//! for a service with a single endpoint, which fails fast rather than hammering its only instance.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use crate::policy::config::Breaker as BreakerConfig;
use crate::policy::PolicyMetrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

#[derive(Debug, Clone, Copy)]
struct Health {
    state: State,
    /// Ejections in a row without a successful probe; the next ejection lasts `base × 2^ejections`.
    ejections: u32,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            state: State::Closed { failures: 0 },
            ejections: 0,
        }
    }
}

/// How a request was let through; hand it back to [`BreakerTable::record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The endpoint is healthy.
    Normal,
    /// The single probe of a half-open endpoint.
    Probe,
}

/// The circuit state of every endpoint of one destination service.
#[derive(Debug)]
pub struct BreakerTable {
    endpoints: Mutex<HashMap<SocketAddr, Health>>,
    metrics: PolicyMetrics,
    destination: Arc<str>,
}

impl BreakerTable {
    /// An empty table for `destination` (the metric label); endpoints are added by
    /// [`BreakerTable::set_endpoints`] or on first use.
    pub fn new(destination: &str, metrics: PolicyMetrics) -> BreakerTable {
        BreakerTable {
            endpoints: Mutex::new(HashMap::new()),
            metrics,
            destination: Arc::from(destination),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SocketAddr, Health>> {
        crate::policy::lock(&self.endpoints)
    }

    /// Replaces the endpoint set, keeping the state of endpoints that stay.
    pub fn set_endpoints(&self, addrs: &[SocketAddr]) {
        let mut table = self.lock();
        table.retain(|addr, _| {
            let keep = addrs.contains(addr);
            if !keep {
                let _ = self
                    .metrics
                    .breaker_state
                    .remove_label_values(&[&*self.destination, &addr.to_string()]);
            }
            keep
        });
        for addr in addrs {
            if !table.contains_key(addr) {
                table.insert(*addr, Health::default());
                self.gauge(addr, 0);
            }
        }
    }

    /// True when a request sent to `addr` now would be admitted (without admitting it).
    pub fn is_available(&self, addr: &SocketAddr) -> bool {
        match self.lock().get(addr).map(|h| h.state) {
            None | Some(State::Closed { .. }) => true,
            Some(State::Open { until }) => Instant::now() >= until,
            Some(State::HalfOpen { probing }) => !probing,
        }
    }

    /// Lets a request to `addr` through, or refuses it while the endpoint is ejected or its probe is out.
    pub fn admit(&self, addr: &SocketAddr) -> Option<Admission> {
        let mut table = self.lock();
        let health = table.entry(*addr).or_default();
        match health.state {
            State::Closed { .. } => Some(Admission::Normal),
            State::Open { until } if Instant::now() >= until => {
                health.state = State::HalfOpen { probing: true };
                drop(table);
                self.transition(addr, "half-open", 2);
                Some(Admission::Probe)
            }
            State::HalfOpen { probing: false } => {
                health.state = State::HalfOpen { probing: true };
                Some(Admission::Probe)
            }
            State::Open { .. } | State::HalfOpen { probing: true } => None,
        }
    }

    /// Forgets an admitted request that was cancelled before its outcome was known: a probe's slot goes to
    /// the next request, and a closed endpoint's failure count stays as it was.
    pub fn cancel(&self, addr: &SocketAddr, admission: Admission) {
        if admission != Admission::Probe {
            return;
        }
        if let Some(health) = self.lock().get_mut(addr) {
            if let State::HalfOpen { probing: true } = health.state {
                health.state = State::HalfOpen { probing: false };
            }
        }
    }

    /// Records the outcome of an admitted request.
    pub fn record(
        &self,
        addr: &SocketAddr,
        admission: Admission,
        success: bool,
        config: &BreakerConfig,
    ) {
        let mut table = self.lock();
        let total = table.len();
        let ejected = table
            .values()
            .filter(|h| !matches!(h.state, State::Closed { .. }))
            .count();
        let Some(health) = table.get_mut(addr) else {
            return;
        };
        let change = match (health.state, success) {
            (State::Closed { .. }, true) => {
                health.state = State::Closed { failures: 0 };
                None
            }
            (State::Closed { failures }, false) => {
                let failures = failures.saturating_add(1);
                let may_eject = total <= 1
                    || (ejected + 1) * 100 <= total * config.max_ejected_percent as usize;
                if failures >= config.consecutive_failures && may_eject {
                    health.state = State::Open {
                        until: Instant::now() + ejection_time(health.ejections, config),
                    };
                    health.ejections = health.ejections.saturating_add(1);
                    Some(("open", 1))
                } else {
                    health.state = State::Closed { failures };
                    None
                }
            }
            (State::HalfOpen { .. }, true) if admission == Admission::Probe => {
                *health = Health::default();
                Some(("closed", 0))
            }
            (State::HalfOpen { .. }, false) if admission == Admission::Probe => {
                health.state = State::Open {
                    until: Instant::now() + ejection_time(health.ejections, config),
                };
                health.ejections = health.ejections.saturating_add(1);
                Some(("open", 1))
            }
            // Late outcomes of requests admitted before the ejection do not move the state.
            _ => None,
        };
        drop(table);
        if let Some((to, gauge)) = change {
            self.transition(addr, to, gauge);
        }
    }

    fn transition(&self, addr: &SocketAddr, to: &str, gauge: i64) {
        let endpoint = addr.to_string();
        self.metrics
            .breaker_transitions
            .with_label_values(&[&*self.destination, &endpoint, to])
            .inc();
        self.gauge(addr, gauge);
    }

    fn gauge(&self, addr: &SocketAddr, value: i64) {
        self.metrics
            .breaker_state
            .with_label_values(&[&*self.destination, &addr.to_string()])
            .set(value);
    }
}

/// `base × 2^ejections`, capped at `max`, then jittered down by up to a quarter so that endpoints ejected
/// together are not probed together.
fn ejection_time(ejections: u32, config: &BreakerConfig) -> Duration {
    let full = config
        .base_ejection
        .saturating_mul(1u32 << ejections.min(20))
        .min(config.max_ejection);
    let jitter = rand::rng().random_range(0.0..0.25);
    full.mul_f64(1.0 - jitter)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_n_failures_then_one_probe_closes_it() {
        let config = BreakerConfig {
            consecutive_failures: 3,
            ..Policy::default().breaker
        };
        let table = BreakerTable::new("svc", PolicyMetrics::unregistered());
        table.set_endpoints(&[addr(1)]);
        for _ in 0..3 {
            let a = table.admit(&addr(1)).unwrap();
            table.record(&addr(1), a, false, &config);
        }
        assert_eq!(table.admit(&addr(1)), None, "ejected");
        tokio::time::advance(config.base_ejection).await;
        assert_eq!(table.admit(&addr(1)), Some(Admission::Probe));
        assert_eq!(
            table.admit(&addr(1)),
            None,
            "exactly one probe while half-open"
        );
        table.record(&addr(1), Admission::Probe, true, &config);
        assert_eq!(table.admit(&addr(1)), Some(Admission::Normal));
    }

    #[test]
    fn ejections_grow_up_to_the_max_with_jitter() {
        let config = Policy::default().breaker;
        for ejections in 0..10u32 {
            let full = config
                .base_ejection
                .saturating_mul(1 << ejections)
                .min(config.max_ejection);
            let t = ejection_time(ejections, &config);
            assert!(t <= full && t >= full.mul_f64(0.75), "{t:?} vs {full:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn never_ejects_more_than_the_allowed_share() {
        let config = BreakerConfig {
            consecutive_failures: 1,
            max_ejected_percent: 50,
            ..Policy::default().breaker
        };
        let table = BreakerTable::new("svc", PolicyMetrics::unregistered());
        table.set_endpoints(&[addr(1), addr(2), addr(3), addr(4)]);
        for port in 1..=4 {
            table.record(&addr(port), Admission::Normal, false, &config);
        }
        let available = (1..=4).filter(|p| table.is_available(&addr(*p))).count();
        assert_eq!(available, 2, "half of four may be ejected");
    }
}
