//! Cost of the policy stacks per request, against the same in-process service without them.
//!
//! The inner service answers at once without any network, so the figures are the policies' own overhead
//! (ns/request): `bare` is the service alone, `outbound` is limit → timeouts → key injection → retry → balance
//! → breaker with every policy at its defaults, `outbound_post_keyed` adds key injection and body buffering
//! for replay, `inbound_dedup` is the receiver's de-duplication with a fresh key per request (claim, forward in
//! its own task, store).
//!
//! How the data path reaches a stack: `*_built_per_request` assembles the stack for every request (what the
//! proxy did before stacks were kept per destination), `*_kept` sends through the destination's kept stack
//! (`DestinationPolicy::send_outbound` / `send_inbound`, what the proxy does now).
//!
//! Run: `cargo bench --bench policy`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderValue, Request, Response};
use meshlet::policy::idempotency::MemoryStore;
use meshlet::policy::{
    full_body, send, Body, Classify, DestinationPolicy, FailureKind, PolicyFile, PolicyMetrics,
    PolicyService,
};

#[derive(Debug)]
struct NeverFails;

impl Classify for NeverFails {
    fn failure_kind(&self) -> FailureKind {
        FailureKind::Other
    }
}

/// The in-process service as a stateless last hop, as kept stacks need (`Default`).
#[derive(Clone, Default)]
struct Answer;

impl tower::Service<Request<Body>> for Answer {
    type Response = Response<Body>;
    type Error = NeverFails;
    type Future = std::future::Ready<Result<Response<Body>, NeverFails>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), NeverFails>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<Body>) -> Self::Future {
        std::future::ready(Ok(Response::new(full_body(Bytes::from_static(b"ok")))))
    }
}

fn app() -> PolicyService<NeverFails> {
    PolicyService::new(tower::service_fn(|_req: Request<Body>| async {
        Ok::<_, NeverFails>(Response::new(full_body(Bytes::from_static(b"ok"))))
    }))
}

fn get() -> Request<Body> {
    Request::get("http://svc.bench:8080/item")
        .body(full_body(Bytes::new()))
        .unwrap_or_default()
}

fn post(body: &'static [u8]) -> Request<Body> {
    Request::post("http://svc.bench:8080/charge")
        .body(full_body(Bytes::from_static(body)))
        .unwrap_or_default()
}

fn policy_stacks(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let metrics = PolicyMetrics::unregistered();
    let file = PolicyFile::from_yaml(
        "services:\n  svc:\n    idempotency: { inject: true, enforce: true }\n    breaker: { consecutive_failures: 1000 }\n",
    )
    .expect("bench policy");
    let endpoint = "127.0.0.1:8080".parse().expect("addr");
    let dp = DestinationPolicy::new("svc", file.resolve("svc"), &[endpoint], &metrics);
    let bare = app();
    let outbound = dp.outbound(app());
    let store = Arc::new(MemoryStore::new("svc", 10_000, 64 << 20, metrics.clone()));
    let inbound = dp.inbound(
        PolicyService::new(tower::service_fn(|_req: Request<Body>| async {
            Ok::<_, Infallible>(Response::new(full_body(Bytes::from_static(b"ok"))))
        })),
        store,
    );
    let keys = AtomicU64::new(0);

    let mut group = c.benchmark_group("policy");
    group.bench_function("bare", |b| b.to_async(&rt).iter(|| send(&bare, get())));
    group.bench_function("outbound", |b| {
        b.to_async(&rt).iter(|| send(&outbound, get()))
    });
    group.bench_function("outbound_post_keyed", |b| {
        b.to_async(&rt)
            .iter(|| send(&outbound, post(b"{\"cents\":100}")))
    });
    group.bench_function("outbound_built_per_request", |b| {
        b.to_async(&rt).iter(|| send(&dp.outbound(Answer), get()))
    });
    group.bench_function("outbound_kept", |b| {
        b.to_async(&rt)
            .iter(|| dp.send_outbound::<Answer, _>(get()))
    });
    let unkeyed = || {
        Request::get("http://svc.bench:8080/item")
            .body(full_body(Bytes::new()))
            .unwrap_or_default()
    };
    let inbound_store: Arc<dyn meshlet::policy::idempotency::DedupStore> =
        Arc::new(MemoryStore::new("svc", 10_000, 64 << 20, metrics.clone()));
    group.bench_function("inbound_built_per_request", |b| {
        b.to_async(&rt)
            .iter(|| send(&dp.inbound(Answer, inbound_store.clone()), unkeyed()))
    });
    group.bench_function("inbound_kept", |b| {
        b.to_async(&rt)
            .iter(|| dp.send_inbound::<Answer, _>(&inbound_store, unkeyed()))
    });
    group.bench_function("inbound_dedup", |b| {
        b.to_async(&rt).iter(|| {
            let mut req = post(b"{\"cents\":100}");
            let key = format!("\"k{}\"", keys.fetch_add(1, Ordering::Relaxed));
            req.headers_mut()
                .insert("idempotency-key", HeaderValue::from_str(&key).expect("key"));
            let call = send(&inbound, req);
            async move {
                let resp = call.await;
                assert!(resp.is_ok_and(|r| r.status() == 200));
            }
        })
    });
    group.finish();
}

criterion_group!(benches, policy_stacks);
criterion_main!(benches);
