//! Load balancing across a service's endpoints: power of two choices over peak-EWMA latency.
//!
//! Why this and not round robin? Round robin sends a slow endpoint its full share and lets requests pile up
//! there. Each request here picks two random endpoints and takes the cheaper, where cost is the endpoint's
//! latency estimate times its requests in flight plus one. The estimate jumps up at once on a slow response
//! (the "peak") and decays toward faster ones, so a slow endpoint quickly loses traffic, and a busy one does
//! too. Two random choices (instead of the global minimum) keep many proxies from stampeding onto the same
//! endpoint. Endpoints ejected by the circuit breaker are skipped; when every endpoint is ejected the
//! request still goes down to the breaker, which answers 503 `circuit-open` without touching the network.
//!
//! Requests carrying an `Idempotency-Key` go to the key's own endpoint instead (rendezvous hashing of the key
//! over the endpoints), while that endpoint is not ejected: a retry then reaches the replica that took the
//! first attempt, whose de-duplication table already knows the key, even without a shared store. This is an
//! optimisation, not the guarantee (that is the shared store's job): when the key's endpoint is ejected the
//! request falls back to the two choices, and keyed requests are spread by key rather than by latency.
//!
//! The chosen endpoint is recorded in the request's [`Endpoint`] extension and written into its URI (the
//! original authority stays in `Host`), so the client below connects to it.

use std::future::Future;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use pin_project_lite::pin_project;
use rand::Rng;
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::policy::body::with_guard;
use crate::policy::breaker::{BreakerTable, Endpoint};
use crate::policy::idempotency::KEY_HEADER;
use crate::policy::{proxy_response, Body, ProxyReason};

/// Latency assumed for an endpoint before it has answered.
const DEFAULT_RTT: Duration = Duration::from_millis(5);
/// How fast the estimate forgets a slow past: the weight of the old value halves about every 7 s.
const DECAY: Duration = Duration::from_secs(10);

/// Latency estimate and load of one endpoint.
#[derive(Debug)]
struct EndpointLoad {
    addr: SocketAddr,
    /// `addr` as a URI authority, made once.
    authority: Option<Authority>,
    in_flight: AtomicUsize,
    ewma: Mutex<PeakEwma>,
}

#[derive(Debug)]
struct PeakEwma {
    /// Estimated latency in nanoseconds.
    estimate: f64,
    stamp: Instant,
    /// False until the first response: the default estimate is a guess and is replaced outright.
    observed: bool,
}

impl PeakEwma {
    fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        let elapsed = now.saturating_duration_since(self.stamp).as_secs_f64();
        self.stamp = now;
        if rtt > self.estimate || !self.observed {
            self.observed = true;
            self.estimate = rtt;
        } else {
            let weight = (-elapsed / DECAY.as_secs_f64()).exp();
            self.estimate = self.estimate * weight + rtt * (1.0 - weight);
        }
    }
}

impl EndpointLoad {
    fn new(addr: SocketAddr) -> EndpointLoad {
        EndpointLoad {
            addr,
            authority: Authority::try_from(addr.to_string()).ok(),
            in_flight: AtomicUsize::new(0),
            ewma: Mutex::new(PeakEwma {
                estimate: DEFAULT_RTT.as_nanos() as f64,
                stamp: Instant::now(),
                observed: false,
            }),
        }
    }

    fn cost(&self) -> f64 {
        let estimate = crate::policy::lock(&self.ewma).estimate;
        estimate * (self.in_flight.load(Ordering::Relaxed) + 1) as f64
    }

    fn observe(&self, rtt: Duration) {
        let mut ewma = crate::policy::lock(&self.ewma);
        ewma.observe(rtt, Instant::now());
    }
}

/// The endpoints of one service, replaceable at run time (from configuration now, the control plane later).
#[derive(Debug, Clone)]
pub struct Endpoints {
    current: Arc<RwLock<Arc<Vec<Arc<EndpointLoad>>>>>,
    breakers: Arc<BreakerTable>,
}

impl Endpoints {
    /// A set of `addrs`, whose circuit state lives in `breakers`.
    pub fn new(addrs: &[SocketAddr], breakers: Arc<BreakerTable>) -> Endpoints {
        let endpoints = Endpoints {
            current: Arc::new(RwLock::new(Arc::new(Vec::new()))),
            breakers,
        };
        endpoints.update(addrs);
        endpoints
    }

    /// Replaces the endpoints; those that stay keep their latency estimate and circuit state.
    pub fn update(&self, addrs: &[SocketAddr]) {
        let old = self.snapshot();
        let mut next = Vec::with_capacity(addrs.len());
        for addr in addrs {
            if next.iter().any(|e: &Arc<EndpointLoad>| e.addr == *addr) {
                continue;
            }
            let kept = old.iter().find(|e| e.addr == *addr).cloned();
            next.push(kept.unwrap_or_else(|| Arc::new(EndpointLoad::new(*addr))));
        }
        self.breakers.set_endpoints(addrs);
        let mut current = crate::policy::write(&self.current);
        *current = Arc::new(next);
    }

    /// The current endpoint addresses.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.snapshot().iter().map(|e| e.addr).collect()
    }

    /// One endpoint for a connection (opaque TCP, `CONNECT`, WebSocket), chosen as a request would be.
    pub fn pick(&self) -> Option<SocketAddr> {
        self.choose(None).map(|e| e.addr)
    }

    fn snapshot(&self) -> Arc<Vec<Arc<EndpointLoad>>> {
        crate::policy::read(&self.current).clone()
    }

    /// The endpoint of `key` when there is one and it is available; else power of two choices among
    /// available endpoints; any endpoint when none is available (the breaker below refuses it); `None` when
    /// there are no endpoints at all.
    fn choose(&self, key: Option<&[u8]>) -> Option<Arc<EndpointLoad>> {
        let all = self.snapshot();
        if let Some(home) = key.and_then(|key| home_of(&all, key)) {
            if self.breakers.is_available(&home.addr) {
                return Some(home.clone());
            }
        }
        if all.len() == 1 {
            // Available or not: an ejected single endpoint is refused by the breaker below.
            return all.first().cloned();
        }
        let mut rng = rand::rng();
        let available = |e: &Arc<EndpointLoad>| self.breakers.is_available(&e.addr);
        // The common case first, without allocating: two endpoints at random, both available.
        if let Some((a, b)) = two_of(&mut rng, all.len()) {
            if available(&all[a]) && available(&all[b]) {
                return Some(cheaper(&all[a], &all[b]).clone());
            }
        }
        let pool: Vec<&Arc<EndpointLoad>> = all.iter().filter(|e| available(e)).collect();
        match two_of(&mut rng, pool.len()) {
            Some((a, b)) => Some(cheaper(pool[a], pool[b]).clone()),
            // One available endpoint, or none: then any, so that the breaker answers `circuit-open`.
            None => pool.first().copied().or(all.first()).cloned(),
        }
    }
}

/// Two distinct random indices below `n`, when there are two.
fn two_of(rng: &mut impl Rng, n: usize) -> Option<(usize, usize)> {
    if n < 2 {
        return None;
    }
    let a = rng.random_range(0..n);
    Some((a, (a + rng.random_range(1..n)) % n))
}

/// The endpoint with the lower cost (the first on a tie).
fn cheaper<'a>(a: &'a Arc<EndpointLoad>, b: &'a Arc<EndpointLoad>) -> &'a Arc<EndpointLoad> {
    if a.cost() <= b.cost() {
        a
    } else {
        b
    }
}

/// The endpoint `key` belongs to: the one whose hash with the key is highest (rendezvous hashing), so that
/// adding or removing an endpoint moves only the keys of that endpoint. The hash only has to agree within
/// this process: the retries of a request are sent by the sidecar that sent its first attempt.
fn home_of<'a>(endpoints: &'a [Arc<EndpointLoad>], key: &[u8]) -> Option<&'a Arc<EndpointLoad>> {
    endpoints.iter().max_by_key(|endpoint| {
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        endpoint.addr.hash(&mut hasher);
        hasher.finish()
    })
}

/// Spreads requests over a service's [`Endpoints`].
#[derive(Clone, Debug)]
pub struct BalanceLayer {
    endpoints: Endpoints,
}

impl BalanceLayer {
    /// Balances over `endpoints`.
    pub fn new(endpoints: Endpoints) -> BalanceLayer {
        BalanceLayer { endpoints }
    }
}

impl<S> Layer<S> for BalanceLayer {
    type Service = Balance<S>;

    fn layer(&self, inner: S) -> Balance<S> {
        Balance {
            inner,
            endpoints: self.endpoints.clone(),
        }
    }
}

/// Picks an endpoint per request and points the request at it.
#[derive(Clone, Debug)]
pub struct Balance<S> {
    inner: S,
    endpoints: Endpoints,
}

/// Counts a request in flight until its response body is done (or the attempt is dropped).
pub struct InFlight(Arc<EndpointLoad>);

impl InFlight {
    fn new(endpoint: Arc<EndpointLoad>) -> InFlight {
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(endpoint)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Points `req` at `addr`: the URI's authority becomes the endpoint, `Host` keeps the original name.
fn retarget(req: &mut Request<Body>, endpoint: &EndpointLoad) {
    if !req.headers().contains_key(http::header::HOST) {
        if let Some(host) = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            req.headers_mut().insert(http::header::HOST, host);
        }
    }
    let mut parts = req.uri().clone().into_parts();
    if let Some(authority) = endpoint.authority.clone() {
        parts.authority = Some(authority);
        if parts.scheme.is_none() {
            parts.scheme = Some(Scheme::HTTP);
        }
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
    req.extensions_mut().insert(Endpoint(endpoint.addr));
}

impl<S, E> Service<Request<Body>> for Balance<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = E>,
{
    type Response = Response<Body>;
    type Error = E;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let key = req.headers().get(KEY_HEADER).map(HeaderValue::as_bytes);
        let Some(endpoint) = self.endpoints.choose(key) else {
            return ResponseFuture::NoEndpoints;
        };
        retarget(&mut req, &endpoint);
        ResponseFuture::Sent {
            in_flight: Some(InFlight::new(endpoint)),
            started: Instant::now(),
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// The chosen endpoint's response, its latency observed; or 503 `no-endpoints`.
    #[project = ResponseFutureProj]
    pub enum ResponseFuture<F> {
        /// Sent to the endpoint counted in `in_flight`, which moves into the response body.
        Sent { #[pin] inner: F, in_flight: Option<InFlight>, started: Instant },
        /// The service has no endpoints.
        NoEndpoints,
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseFutureProj::Sent {
                inner,
                in_flight,
                started,
            } => {
                let resp = ready!(inner.poll(cx))?;
                Poll::Ready(Ok(match in_flight.take() {
                    Some(in_flight) => {
                        in_flight.0.observe(started.elapsed());
                        resp.map(|body| with_guard(body, in_flight))
                    }
                    None => resp,
                }))
            }
            ResponseFutureProj::NoEndpoints => {
                Poll::Ready(Ok(proxy_response(ProxyReason::NoEndpoints)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicyMetrics;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[tokio::test(start_paused = true)]
    async fn slow_endpoints_lose_traffic_and_updates_keep_state() {
        let table = Arc::new(BreakerTable::new("svc", PolicyMetrics::unregistered()));
        let endpoints = Endpoints::new(&[addr(1), addr(2)], table);
        endpoints.snapshot()[0].observe(Duration::from_millis(50));
        endpoints.snapshot()[1].observe(Duration::from_millis(1));
        for _ in 0..100 {
            assert_eq!(endpoints.choose(None).unwrap().addr, addr(2));
        }
        endpoints.update(&[addr(2), addr(3)]);
        assert_eq!(endpoints.addrs(), vec![addr(2), addr(3)]);
        assert!(
            endpoints.snapshot()[0].cost() < DEFAULT_RTT.as_nanos() as f64,
            "kept its estimate"
        );
    }

    #[tokio::test]
    async fn keys_have_a_home_endpoint_unless_it_is_ejected() {
        let metrics = PolicyMetrics::unregistered();
        let table = Arc::new(BreakerTable::new("svc", metrics));
        let endpoints = Endpoints::new(&[addr(1), addr(2), addr(3)], table.clone());
        let home = endpoints.choose(Some(b"key-1")).unwrap().addr;
        for _ in 0..50 {
            assert_eq!(endpoints.choose(Some(b"key-1")).unwrap().addr, home);
        }
        let homes: std::collections::HashSet<SocketAddr> = (0..60)
            .map(|i| {
                let key = format!("key-{i}");
                endpoints.choose(Some(key.as_bytes())).unwrap().addr
            })
            .collect();
        assert_eq!(homes.len(), 3, "keys spread over every endpoint");
        // Removing another endpoint does not move the key.
        let other = [addr(1), addr(2), addr(3)]
            .into_iter()
            .find(|a| *a != home)
            .unwrap();
        let rest: Vec<SocketAddr> = [addr(1), addr(2), addr(3)]
            .into_iter()
            .filter(|a| *a != other)
            .collect();
        endpoints.update(&rest);
        assert_eq!(endpoints.choose(Some(b"key-1")).unwrap().addr, home);
    }

    #[test]
    fn retarget_keeps_the_host() {
        let mut req = Request::new(crate::policy::full_body("".into()));
        *req.uri_mut() = "http://payment.shop:8080/charge?x=1".parse().unwrap();
        retarget(&mut req, &EndpointLoad::new(addr(9)));
        assert_eq!(req.uri(), "http://127.0.0.1:9/charge?x=1");
        assert_eq!(req.headers()["host"], "payment.shop:8080");
        assert_eq!(Endpoint::of(&req), Some(addr(9)));
    }
}
