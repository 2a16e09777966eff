//! Idempotency keys end to end: an outbound stack injecting keys and retrying, an inbound sidecar
//! de-duplicating in front of an app that keeps a ledger of the effects it applied.

mod policy_support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use meshlet::policy::idempotency::{DedupStore, MemoryStore, RedisLimits, RedisStore};
use meshlet::policy::{
    send, Body, DestinationPolicy, PolicyMetrics, PolicyService, ATTEMPTS_HEADER, ERROR_HEADER,
};
use policy_support::*;
use tokio::sync::Semaphore;

/// The app behind the inbound sidecar: every call it serves is one effect in its ledger.
struct App {
    ledger: AtomicUsize,
    /// While set, calls wait for `release` after committing their effect.
    hold: AtomicBool,
    gate: Semaphore,
    /// The first call answers 503 (after committing nothing).
    fail_first: AtomicBool,
}

impl Default for App {
    fn default() -> Self {
        App {
            ledger: AtomicUsize::new(0),
            hold: AtomicBool::new(false),
            gate: Semaphore::new(0),
            fail_first: AtomicBool::new(false),
        }
    }
}

impl App {
    fn effects(&self) -> usize {
        self.ledger.load(Ordering::SeqCst)
    }

    fn release(&self) {
        self.hold.store(false, Ordering::SeqCst);
        self.gate.add_permits(1000);
    }

    fn service(self: &Arc<Self>) -> PolicyService<Infallible> {
        let app = self.clone();
        PolicyService::new(tower::service_fn(move |_req: Request<Body>| {
            let app = app.clone();
            async move {
                if app.fail_first.swap(false, Ordering::SeqCst) {
                    return Ok::<_, Infallible>(reply(503, "not now"));
                }
                let n = app.ledger.fetch_add(1, Ordering::SeqCst) + 1;
                if app.hold.load(Ordering::SeqCst) {
                    let _ = app.gate.acquire().await.map(|p| p.forget());
                }
                let mut resp = reply(201, &format!("charged #{n}"));
                resp.headers_mut().insert("x-charge", HeaderValue::from(n));
                Ok(resp)
            }
        }))
    }
}

const INBOUND: &str = "services:\n  svc:\n    idempotency: { enforce: true }\n";
const OUTBOUND: &str = "services:\n  svc:\n    timeouts: { request: 10s, per_try: 500ms }\n    retries: { max_attempts: 3, backoff: { base: 1ms, max: 5ms } }\n    idempotency: { inject: true }\n";

fn memory_store(metrics: &PolicyMetrics, max_entries: usize) -> Arc<dyn DedupStore> {
    Arc::new(MemoryStore::new(
        "svc",
        max_entries,
        1 << 20,
        metrics.clone(),
    ))
}

/// An inbound sidecar in front of `app`, counting the requests that reach it.
async fn inbound(
    yaml: &str,
    app: &Arc<App>,
    store: Arc<dyn DedupStore>,
    metrics: &PolicyMetrics,
) -> (Sidecar, Arc<AtomicUsize>) {
    let arrivals = Arc::new(AtomicUsize::new(0));
    let stack =
        DestinationPolicy::new("svc", policy(yaml), &[], metrics).inbound(app.service(), store);
    (
        Sidecar::start(counted(stack, arrivals.clone())).await,
        arrivals,
    )
}

fn outbound(to: SocketAddr, metrics: &PolicyMetrics) -> PolicyService<ClientError> {
    DestinationPolicy::new("svc", policy(OUTBOUND), &[to], metrics).outbound(TestClient::http1())
}

fn keyed(addr: SocketAddr, key: &str, body: &str, deadline_ms: u64) -> Request<Body> {
    let mut req = request("POST", addr, "/charge", body);
    req.headers_mut().insert(
        "idempotency-key",
        HeaderValue::from_str(&format!("\"{key}\"")).unwrap(),
    );
    req.headers_mut()
        .insert("x-meshlet-deadline-ms", HeaderValue::from(deadline_ms));
    req
}

#[tokio::test]
async fn timed_out_attempt_after_commit_is_answered_by_replay() {
    let metrics = PolicyMetrics::unregistered();
    let app = Arc::new(App::default());
    app.hold.store(true, Ordering::SeqCst);
    let (sidecar, arrivals) = inbound(INBOUND, &app, memory_store(&metrics, 100), &metrics).await;
    let client = outbound(sidecar.addr, &metrics);
    let call = tokio::spawn(send(
        &client,
        request("POST", sidecar.addr, "/charge", "{\"cents\":500}"),
    ));
    // The first attempt committed and hangs past its per-try timeout; once the retry arrives, let it finish.
    eventually("the retry to arrive", || {
        arrivals.load(Ordering::SeqCst) >= 2
    })
    .await;
    app.release();
    let resp = call.await.unwrap().unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(header(&resp, "idempotent-replayed"), "true");
    assert_eq!(header(&resp, ATTEMPTS_HEADER), "2");
    assert_eq!(body_string(resp).await, "charged #1");
    assert_eq!(app.effects(), 1, "charged exactly once");
    assert_eq!(
        metrics.dedup.with_label_values(&["svc", "replayed"]).get(),
        1
    );
}

/// A TCP relay between the two sidecars that cuts its first connection once the app has committed.
async fn cutting_relay(to: SocketAddr, app: Arc<App>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut client, _)) = listener.accept().await {
            let mut server = tokio::net::TcpStream::connect(to).await.unwrap();
            if first {
                first = false;
                let app = app.clone();
                tokio::spawn(async move {
                    let (mut client_read, _client_write) = client.split();
                    let (_server_read, mut server_write) = server.split();
                    let forward = tokio::io::copy(&mut client_read, &mut server_write);
                    let committed = eventually("the app to commit", || app.effects() >= 1);
                    tokio::select! { _ = forward => {}, _ = committed => {} }
                    // Both connections are dropped here: the cut.
                });
            } else {
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        }
    });
    addr
}

#[tokio::test]
async fn connection_cut_after_commit_is_answered_by_replay() {
    let metrics = PolicyMetrics::unregistered();
    let app = Arc::new(App::default());
    let (sidecar, _) = inbound(INBOUND, &app, memory_store(&metrics, 100), &metrics).await;
    let relay = cutting_relay(sidecar.addr, app.clone()).await;
    let client = outbound(relay, &metrics);
    let resp = send(
        &client,
        request("POST", relay, "/charge", "{\"cents\":700}"),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(header(&resp, ATTEMPTS_HEADER), "2");
    assert_eq!(header(&resp, "idempotent-replayed"), "true");
    assert_eq!(app.effects(), 1, "charged exactly once");
    assert_eq!(
        metrics.retries.with_label_values(&["svc", "reset"]).get(),
        1
    );
}

#[tokio::test]
async fn duplicate_in_flight_waits_for_the_first_or_gets_409() {
    let metrics = PolicyMetrics::unregistered();
    let app = Arc::new(App::default());
    app.hold.store(true, Ordering::SeqCst);
    let (sidecar, _) = inbound(INBOUND, &app, memory_store(&metrics, 100), &metrics).await;
    let client = PolicyService::new(TestClient::http1());
    let first = tokio::spawn(send(&client, keyed(sidecar.addr, "k1", "a", 10_000)));
    eventually("the first to commit", || app.effects() == 1).await;
    let impatient = send(&client, keyed(sidecar.addr, "k1", "a", 300))
        .await
        .unwrap();
    assert_eq!(impatient.status(), 409);
    assert_eq!(
        header(&impatient, "content-type"),
        "application/problem+json"
    );
    assert_eq!(header(&impatient, ERROR_HEADER), "idempotency-conflict");
    let patient = tokio::spawn(send(&client, keyed(sidecar.addr, "k1", "a", 10_000)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    app.release();
    let (first, patient) = (
        first.await.unwrap().unwrap(),
        patient.await.unwrap().unwrap(),
    );
    assert_eq!(first.status(), 201);
    assert_eq!(patient.status(), 201);
    assert_eq!(header(&patient, "idempotent-replayed"), "true");
    assert_eq!(header(&patient, "x-charge"), header(&first, "x-charge"));
    assert_eq!(app.effects(), 1);
    assert_eq!(
        metrics.dedup.with_label_values(&["svc", "conflict"]).get(),
        1
    );
}

#[tokio::test]
async fn key_reused_for_another_request_is_422() {
    let metrics = PolicyMetrics::unregistered();
    let app = Arc::new(App::default());
    let (sidecar, _) = inbound(INBOUND, &app, memory_store(&metrics, 100), &metrics).await;
    let client = PolicyService::new(TestClient::http1());
    assert_eq!(
        send(&client, keyed(sidecar.addr, "k", "amount=1", 5000))
            .await
            .unwrap()
            .status(),
        201
    );
    let other = send(&client, keyed(sidecar.addr, "k", "amount=2", 5000))
        .await
        .unwrap();
    assert_eq!(other.status(), 422);
    assert_eq!(header(&other, ERROR_HEADER), "idempotency-key-reused");
    let same = send(&client, keyed(sidecar.addr, "k", "amount=1", 5000))
        .await
        .unwrap();
    assert_eq!(same.status(), 201);
    assert_eq!(header(&same, "idempotent-replayed"), "true");
    assert_eq!(app.effects(), 1);
}

#[tokio::test]
async fn server_errors_are_not_stored() {
    let metrics = PolicyMetrics::unregistered();
    let app = Arc::new(App::default());
    app.fail_first.store(true, Ordering::SeqCst);
    let (sidecar, _) = inbound(INBOUND, &app, memory_store(&metrics, 100), &metrics).await;
    let client = PolicyService::new(TestClient::http1());
    assert_eq!(
        send(&client, keyed(sidecar.addr, "k", "x", 5000))
            .await
            .unwrap()
            .status(),
        503
    );
    let again = send(&client, keyed(sidecar.addr, "k", "x", 5000))
        .await
        .unwrap();
    assert_eq!(
        again.status(),
        201,
        "the key was released, so the retry ran"
    );
    assert_eq!(header(&again, "idempotent-replayed"), "");
}

#[tokio::test]
async fn keys_expire_and_the_table_is_bounded() {
    let metrics = PolicyMetrics::unregistered();
    let app = Arc::new(App::default());
    let yaml = "services:\n  svc:\n    idempotency: { enforce: true, ttl: 300ms }\n";
    let (sidecar, _) = inbound(yaml, &app, memory_store(&metrics, 2), &metrics).await;
    let client = PolicyService::new(TestClient::http1());
    let post = |key: &'static str| send(&client, keyed(sidecar.addr, key, "x", 5000));
    post("a").await.unwrap();
    post("a").await.unwrap();
    assert_eq!(app.effects(), 1, "replayed within the TTL");
    tokio::time::sleep(Duration::from_millis(400)).await;
    post("a").await.unwrap();
    assert_eq!(app.effects(), 2, "processed again after the TTL");
    for key in ["b", "c", "d"] {
        post(key).await.unwrap();
    }
    assert_eq!(app.effects(), 5);
    post("b").await.unwrap();
    assert_eq!(
        app.effects(),
        6,
        "b was evicted by c and d (two entries at most)"
    );
    assert!(metrics.dedup.with_label_values(&["svc", "evicted"]).get() >= 1);
}

/// An outbound stack whose first attempt goes to replica `a` and every later one to replica `b`.
fn first_to_a_then_b(
    a: SocketAddr,
    b: SocketAddr,
    metrics: &PolicyMetrics,
) -> PolicyService<ClientError> {
    let attempts = Arc::new(AtomicUsize::new(0));
    let http = TestClient::http1();
    let client = tower::service_fn(move |mut req: Request<Body>| {
        if attempts.fetch_add(1, Ordering::SeqCst) > 0 {
            *req.uri_mut() = format!("http://{b}{}", req.uri().path()).parse().unwrap();
        }
        tower::Service::call(&mut http.clone(), req)
    });
    DestinationPolicy::new("svc", policy(OUTBOUND), &[a], metrics).outbound(client)
}

async fn redis_store(server: &RedisServer) -> Arc<dyn DedupStore> {
    Arc::new(RedisStore::connect(&server.url).await.unwrap())
}

#[tokio::test]
async fn replicas_share_de_duplication_through_redis() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let metrics = PolicyMetrics::unregistered();
    let app = Arc::new(App::default());
    let (a, _) = inbound(INBOUND, &app, redis_store(&redis).await, &metrics).await;
    let (b, _) = inbound(INBOUND, &app, redis_store(&redis).await, &metrics).await;
    let client = PolicyService::new(TestClient::http1());
    let first = send(&client, keyed(a.addr, "r1", "x", 5000)).await.unwrap();
    let second = send(&client, keyed(b.addr, "r1", "x", 5000)).await.unwrap();
    assert_eq!(second.status(), 201);
    assert_eq!(header(&second, "idempotent-replayed"), "true");
    assert_eq!(header(&second, "x-charge"), header(&first, "x-charge"));
    let mismatch = send(&client, keyed(b.addr, "r1", "y", 5000)).await.unwrap();
    assert_eq!(mismatch.status(), 422);
    assert_eq!(app.effects(), 1);
}

#[tokio::test]
async fn retry_on_another_replica_after_the_first_replica_is_gone() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let metrics = PolicyMetrics::unregistered();
    let app = Arc::new(App::default());
    app.hold.store(true, Ordering::SeqCst);
    let (a, _) = inbound(INBOUND, &app, redis_store(&redis).await, &metrics).await;
    let (b, b_arrivals) = inbound(INBOUND, &app, redis_store(&redis).await, &metrics).await;
    let stack = first_to_a_then_b(a.addr, b.addr, &metrics);
    let call = tokio::spawn(send(
        &stack,
        request("POST", a.addr, "/charge", "{\"cents\":900}"),
    ));
    eventually("replica A's app call to commit", || app.effects() == 1).await;
    // Replica A goes away: its listener, its connections and its de-dup layer are dropped. The first
    // request's own task carries on and stores its response in Redis.
    a.stop();
    eventually("the retry to reach replica B", || {
        b_arrivals.load(Ordering::SeqCst) >= 1
    })
    .await;
    app.release();
    let resp: Response<Body> = call.await.unwrap().unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(header(&resp, "idempotent-replayed"), "true");
    assert_eq!(body_string(resp).await, "charged #1");
    assert_eq!(app.effects(), 1, "charged exactly once across replicas");
}

#[tokio::test]
async fn a_killed_replica_never_lets_the_effect_happen_twice() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let metrics = PolicyMetrics::unregistered();
    let app = Arc::new(App::default());
    app.hold.store(true, Ordering::SeqCst);
    // Replica A runs on a runtime of its own, so that killing it ends everything it was doing, including
    // the first request's task: its response is never stored.
    let replica_a = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let a = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                replica_a.block_on(async {
                    let store = redis_store(&redis).await;
                    inbound(INBOUND, &app, store, &metrics).await.0
                })
            })
            .join()
            .unwrap()
    });
    let (b, _) = inbound(INBOUND, &app, redis_store(&redis).await, &metrics).await;
    let stack = first_to_a_then_b(a.addr, b.addr, &metrics);
    let call = tokio::spawn(send(
        &stack,
        request("POST", a.addr, "/charge", "{\"cents\":300}"),
    ));
    eventually("replica A's app call to commit", || app.effects() == 1).await;
    replica_a.shutdown_background();
    app.release();
    let resp = call.await.unwrap().unwrap();
    assert_eq!(
        resp.status(),
        409,
        "the outcome is unknown, so the key stays claimed"
    );
    assert_eq!(header(&resp, ERROR_HEADER), "idempotency-conflict");
    assert_eq!(app.effects(), 1, "never charged twice");
    drop(a);
}

#[tokio::test]
async fn first_requests_beyond_the_bound_are_refused_with_503_and_their_key_released() {
    let metrics = PolicyMetrics::unregistered();
    let app = Arc::new(App::default());
    app.hold.store(true, Ordering::SeqCst);
    let yaml = "services:\n  svc:\n    idempotency: { enforce: true, max_in_flight: 1 }\n";
    let (sidecar, _) = inbound(yaml, &app, memory_store(&metrics, 100), &metrics).await;
    let client = PolicyService::new(TestClient::http1());
    let first = tokio::spawn(send(&client, keyed(sidecar.addr, "k1", "a", 10_000)));
    eventually("the first to commit", || app.effects() == 1).await;
    let refused = send(&client, keyed(sidecar.addr, "k2", "b", 10_000))
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(header(&refused, ERROR_HEADER), "overloaded");
    assert_eq!(
        app.effects(),
        1,
        "the refused request never reached the app"
    );
    // A duplicate of the running key is not a new first request: it waits for it as usual.
    let duplicate = tokio::spawn(send(&client, keyed(sidecar.addr, "k1", "a", 10_000)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    app.release();
    assert_eq!(first.await.unwrap().unwrap().status(), 201);
    let duplicate = duplicate.await.unwrap().unwrap();
    assert_eq!(header(&duplicate, "idempotent-replayed"), "true");
    // The refused key was released, so its retry is processed now that there is room.
    let retried = send(&client, keyed(sidecar.addr, "k2", "b", 10_000))
        .await
        .unwrap();
    assert_eq!(retried.status(), 201);
    assert_eq!(header(&retried, "idempotent-replayed"), "");
    assert_eq!(app.effects(), 2);
    assert_eq!(
        metrics
            .dedup
            .with_label_values(&["svc", "overloaded"])
            .get(),
        1
    );
}

/// An app answering every call with a body of `len` bytes, counting its calls.
fn sized_app(calls: Arc<AtomicUsize>, len: usize) -> PolicyService<Infallible> {
    PolicyService::new(tower::service_fn(move |_req: Request<Body>| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, Infallible>(reply(201, &"x".repeat(len))) }
    }))
}

#[tokio::test]
async fn redis_store_bounds_value_size_and_ttl() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let metrics = PolicyMetrics::unregistered();
    let limits = RedisLimits {
        max_value_bytes: 4096,
        max_ttl: Duration::from_millis(600),
    };
    let store = |limits| {
        let url = redis.url.clone();
        async move {
            Arc::new(RedisStore::connect(&url).await.unwrap().with_limits(limits))
                as Arc<dyn DedupStore>
        }
    };
    // The policy asks for an hour; the store writes at most 600 ms.
    let yaml = "services:\n  svc:\n    idempotency: { enforce: true, ttl: 1h }\n";
    let (small_calls, big_calls) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let small = DestinationPolicy::new("svc", policy(yaml), &[], &metrics)
        .inbound(sized_app(small_calls.clone(), 100), store(limits).await);
    let big = DestinationPolicy::new("svc", policy(yaml), &[], &metrics)
        .inbound(sized_app(big_calls.clone(), 10_000), store(limits).await);
    let (small, big) = (Sidecar::start(small).await, Sidecar::start(big).await);
    let client = PolicyService::new(TestClient::http1());
    let mut conn = redis::Client::open(redis.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        async move {
            redis::cmd("KEYS")
                .arg("meshlet:idem:*")
                .query_async::<Vec<String>>(&mut conn)
                .await
                .unwrap()
        }
    };

    // Over max_value_bytes: answered, not stored, the key released (a duplicate runs again).
    for _ in 0..2 {
        let resp = send(&client, keyed(big.addr, "big", "x", 5000))
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        assert_eq!(body_string(resp).await.len(), 10_000);
    }
    assert_eq!(big_calls.load(Ordering::SeqCst), 2);
    assert!(keys(&mut conn).await.is_empty(), "nothing left in Redis");
    assert_eq!(
        metrics.dedup.with_label_values(&["svc", "too-large"]).get(),
        2
    );

    // Within the bound: stored, with a TTL cut to max_ttl, replayed until it expires.
    let first = send(&client, keyed(small.addr, "small", "x", 5000))
        .await
        .unwrap();
    assert_eq!(first.status(), 201);
    let stored = keys(&mut conn).await;
    assert_eq!(stored.len(), 1);
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&stored[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(pttl > 0 && pttl <= 600, "TTL {pttl} ms");
    let replay = send(&client, keyed(small.addr, "small", "x", 5000))
        .await
        .unwrap();
    assert_eq!(header(&replay, "idempotent-replayed"), "true");
    assert_eq!(small_calls.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(keys(&mut conn).await.is_empty(), "expired in Redis");
    let again = send(&client, keyed(small.addr, "small", "x", 5000))
        .await
        .unwrap();
    assert_eq!(header(&again, "idempotent-replayed"), "");
    assert_eq!(small_calls.load(Ordering::SeqCst), 2);
}
