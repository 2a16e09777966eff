//! Retries and timeouts against a real fault-injecting upstream on loopback.

mod policy_support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use meshlet::policy::{
    full_body, send, Attempts, Body, BoxError, DestinationPolicy, PolicyMetrics, ATTEMPTS_HEADER,
    DEADLINE_HEADER, ERROR_HEADER, TIMEOUT_HEADER,
};
use policy_support::*;
use tower::ServiceExt;

const FAST_BACKOFF: &str = "backoff: { base: 1ms, max: 5ms }";

fn destination(yaml: &str, upstream: &Upstream, metrics: &PolicyMetrics) -> DestinationPolicy {
    DestinationPolicy::new("svc", policy(yaml), &[upstream.addr], metrics)
}

#[tokio::test]
async fn get_is_retried_until_it_succeeds() {
    let upstream = Upstream::start(handler(|seen| async move {
        Ok(if seen.n < 2 {
            reply(503, "busy")
        } else {
            reply(200, "fine")
        })
    }))
    .await;
    let metrics = PolicyMetrics::unregistered();
    let yaml = format!("services:\n  svc:\n    retries: {{ max_attempts: 3, {FAST_BACKOFF} }}\n");
    let stack = destination(&yaml, &upstream, &metrics).outbound(TestClient::http1());
    let resp = stack
        .oneshot(request("GET", upstream.addr, "/item", ""))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, ATTEMPTS_HEADER), "3");
    assert_eq!(body_string(resp).await, "fine");
    assert_eq!(upstream.calls(), 3);
    assert_eq!(metrics.retries.with_label_values(&["svc", "503"]).get(), 2);
}

#[tokio::test]
async fn post_without_key_is_not_retried() {
    let upstream = Upstream::start(handler(|_| async { Ok(reply(503, "busy")) })).await;
    let metrics = PolicyMetrics::unregistered();
    let yaml = format!("services:\n  svc:\n    retries: {{ max_attempts: 3, {FAST_BACKOFF} }}\n");
    let stack = destination(&yaml, &upstream, &metrics).outbound(TestClient::http1());
    let resp = stack
        .oneshot(request("POST", upstream.addr, "/charge", "{\"cents\":100}"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(header(&resp, ATTEMPTS_HEADER), "1");
    assert_eq!(upstream.calls(), 1, "the app saw exactly one call");
}

#[tokio::test]
async fn post_with_key_is_retried_with_its_body() {
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen_bodies = bodies.clone();
    let upstream = Upstream::start(handler(move |seen| {
        seen_bodies
            .lock()
            .unwrap()
            .push((seen.body.clone(), seen.headers["idempotency-key"].clone()));
        async move {
            Ok(if seen.n == 0 {
                reply(502, "")
            } else {
                reply(201, "charged")
            })
        }
    }))
    .await;
    let metrics = PolicyMetrics::unregistered();
    let yaml = format!("services:\n  svc:\n    retries: {{ {FAST_BACKOFF} }}\n    idempotency: {{ inject: true }}\n");
    let stack = destination(&yaml, &upstream, &metrics).outbound(TestClient::http1());
    let resp = stack
        .oneshot(request("POST", upstream.addr, "/charge", "{\"cents\":100}"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(header(&resp, ATTEMPTS_HEADER), "2");
    let bodies = bodies.lock().unwrap();
    assert_eq!(bodies.len(), 2);
    assert_eq!(
        bodies[0], bodies[1],
        "same body and same injected key on every attempt"
    );
    assert!(
        bodies[0].1.to_str().unwrap().starts_with('"'),
        "the key is an sf-string"
    );
}

#[tokio::test]
async fn a_request_that_never_reached_the_upstream_is_retried_whatever_its_method() {
    let upstream = Upstream::start(handler(|_| async { Ok(reply(200, "")) })).await;
    let dead = upstream.addr;
    drop(upstream);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let metrics = PolicyMetrics::unregistered();
    let yaml = format!("services:\n  svc:\n    retries: {{ max_attempts: 3, {FAST_BACKOFF} }}\n");
    let dp = DestinationPolicy::new("svc", policy(&yaml), &[dead], &metrics);
    let stack = dp.outbound(TestClient::http1());
    let attempts = Attempts::default();
    let mut req = request("POST", dead, "/charge", "x");
    req.extensions_mut().insert(attempts.clone());
    let err = stack.oneshot(req).await.unwrap_err();
    assert!(err.0.is_connect(), "{err}");
    assert_eq!(
        attempts.get(),
        3,
        "connect failures are retried even for POST without a key"
    );
    assert_eq!(
        metrics
            .retries
            .with_label_values(&["svc", "connect-failure"])
            .get(),
        2
    );
}

#[tokio::test]
async fn reset_before_any_response_byte_is_retried() {
    let upstream = Upstream::start(handler(|seen| async move {
        if seen.n == 0 {
            Err::<Response<Body>, BoxError>("drop the connection".into())
        } else {
            Ok(reply(200, "second time lucky"))
        }
    }))
    .await;
    let metrics = PolicyMetrics::unregistered();
    let yaml = format!("services:\n  svc:\n    retries: {{ {FAST_BACKOFF} }}\n");
    let stack = destination(&yaml, &upstream, &metrics).outbound(TestClient::http1());
    let resp = stack
        .oneshot(request("GET", upstream.addr, "/", ""))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, ATTEMPTS_HEADER), "2");
    assert_eq!(
        metrics.retries.with_label_values(&["svc", "reset"]).get(),
        1
    );
}

#[tokio::test]
async fn streaming_response_is_never_retried_after_its_first_byte() {
    let upstream = Upstream::start(handler(|_| async {
        // The head and a first chunk go out; a moment later the body breaks.
        let frames = futures_util::stream::unfold(0, |step| async move {
            match step {
                0 => Some((Ok(Frame::data(Bytes::from_static(b"partial"))), 1)),
                1 => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Some((
                        Err::<Frame<Bytes>, BoxError>("upstream died mid-body".into()),
                        2,
                    ))
                }
                _ => None,
            }
        });
        Ok(Response::new(StreamBody::new(frames).boxed()))
    }))
    .await;
    let metrics = PolicyMetrics::unregistered();
    let yaml = format!("services:\n  svc:\n    retries: {{ {FAST_BACKOFF} }}\n");
    let stack = destination(&yaml, &upstream, &metrics).outbound(TestClient::http1());
    let resp = stack
        .oneshot(request("GET", upstream.addr, "/stream", ""))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, ATTEMPTS_HEADER), "1");
    assert!(
        resp.into_body().collect().await.is_err(),
        "the broken body reaches the caller as an error"
    );
    assert_eq!(upstream.calls(), 1, "passed-on responses are final");
}

#[tokio::test]
async fn retry_budget_bounds_load_on_a_failing_service() {
    let upstream = Upstream::start(handler(|_| async { Ok(reply(503, "down")) })).await;
    let metrics = PolicyMetrics::unregistered();
    let (floor, window) = (5.0, 1.0);
    let yaml = format!(
        "services:\n  svc:\n    retries: {{ max_attempts: 3, {FAST_BACKOFF}, budget: {{ ratio: 0.2, min_per_second: 5, window: 1s }} }}\n    breaker: {{ consecutive_failures: 1000000 }}\n"
    );
    let stack = destination(&yaml, &upstream, &metrics).outbound(TestClient::http1());
    let requests = 300;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..4 {
        let stack = stack.clone();
        let addr = upstream.addr;
        tasks.spawn(async move {
            for _ in 0..requests / 4 {
                let resp = send(&stack, request("GET", addr, &format!("/{worker}"), ""))
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 503);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let duration = started.elapsed().as_secs_f64();
    let attempts = upstream.calls() as f64;
    let bound = 1.2 * requests as f64 + floor * (duration + window);
    assert!(
        attempts <= bound,
        "{attempts} attempts for {requests} requests in {duration:.2}s; bound {bound:.1}"
    );
    assert!(attempts >= requests as f64);
    assert!(metrics.budget_exhausted.with_label_values(&["svc"]).get() > 0);
}

#[tokio::test]
async fn retry_after_is_honoured_while_it_fits_the_deadline() {
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let seen_at = arrivals.clone();
    let upstream = Upstream::start(handler(move |seen| {
        seen_at.lock().unwrap().push(Instant::now());
        async move {
            let mut resp = if seen.n == 0 {
                reply(503, "later")
            } else {
                reply(200, "now")
            };
            let wait = if seen.path == "/long" { "30" } else { "1" };
            if resp.status() == 503 || seen.path == "/long" {
                *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                resp.headers_mut()
                    .insert("retry-after", HeaderValue::from_static(wait));
            }
            Ok(resp)
        }
    }))
    .await;
    let metrics = PolicyMetrics::unregistered();
    let yaml = format!(
        "services:\n  svc:\n    timeouts: {{ request: 3s }}\n    retries: {{ {FAST_BACKOFF} }}\n"
    );
    let dp = destination(&yaml, &upstream, &metrics);
    let resp = dp
        .outbound(TestClient::http1())
        .oneshot(request("GET", upstream.addr, "/", ""))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let gap = {
        let arrivals = arrivals.lock().unwrap();
        arrivals[1] - arrivals[0]
    };
    assert!(
        gap >= Duration::from_millis(990),
        "waited {gap:?} for Retry-After: 1"
    );
    let resp = dp
        .outbound(TestClient::http1())
        .oneshot(request("GET", upstream.addr, "/long", ""))
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        503,
        "a Retry-After beyond the deadline is not waited for"
    );
    assert_eq!(header(&resp, ATTEMPTS_HEADER), "1");
}

#[tokio::test]
async fn per_try_timeout_retries_while_the_request_timeout_ends_it() {
    let upstream = Upstream::start(handler(|seen| async move {
        if seen.path == "/always-slow" || seen.n == 0 {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        Ok(reply(200, "done"))
    }))
    .await;
    let metrics = PolicyMetrics::unregistered();
    let yaml = format!(
        "services:\n  svc:\n    timeouts: {{ request: 1s, per_try: 300ms }}\n    retries: {{ max_attempts: 10, {FAST_BACKOFF} }}\n"
    );
    let dp = destination(&yaml, &upstream, &metrics);
    let resp = dp
        .outbound(TestClient::http1())
        .oneshot(request("GET", upstream.addr, "/once-slow", ""))
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "the per-try timeout cut the slow attempt and the retry succeeded"
    );
    assert_eq!(header(&resp, ATTEMPTS_HEADER), "2");
    assert_eq!(
        metrics
            .timeouts
            .with_label_values(&["svc", "per-try"])
            .get(),
        1
    );

    let resp = dp
        .outbound(TestClient::http1())
        .oneshot(request("GET", upstream.addr, "/always-slow", ""))
        .await
        .unwrap();
    assert_eq!(resp.status(), 504);
    assert_eq!(header(&resp, ERROR_HEADER), "timeout");
    assert_eq!(header(&resp, TIMEOUT_HEADER), "request");
    let attempts: u32 = header(&resp, ATTEMPTS_HEADER).parse().unwrap_or(0);
    assert!(
        (2..10).contains(&attempts),
        "{attempts} attempts fit in the request timeout"
    );
}

#[tokio::test]
async fn grpc_timeout_is_honoured_and_propagated() {
    let upstream = Upstream::start(handler(|seen| async move {
        if seen.path == "/slow" {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        let mut resp = reply(200, "");
        for name in ["grpc-timeout", DEADLINE_HEADER] {
            if let Some(v) = seen.headers.get(name) {
                resp.headers_mut().insert(
                    format!("x-seen-{name}")
                        .parse::<http::HeaderName>()
                        .unwrap(),
                    v.clone(),
                );
            }
        }
        Ok(resp)
    }))
    .await;
    let metrics = PolicyMetrics::unregistered();
    let dp = destination(
        "services:\n  svc:\n    timeouts: { request: 10s }\n",
        &upstream,
        &metrics,
    );
    let grpc = |path: &str| {
        let mut req = request("POST", upstream.addr, path, "");
        req.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/grpc"));
        req.headers_mut()
            .insert("grpc-timeout", HeaderValue::from_static("500m"));
        req
    };
    let resp = dp
        .outbound(TestClient::h2c())
        .oneshot(grpc("/fast"))
        .await
        .unwrap();
    let propagated =
        meshlet::policy::timeout::parse_grpc_timeout(header(&resp, "x-seen-grpc-timeout")).unwrap();
    assert!(
        propagated <= Duration::from_millis(500) && propagated > Duration::ZERO,
        "{propagated:?}"
    );
    let resp = dp
        .outbound(TestClient::h2c())
        .oneshot(grpc("/slow"))
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        504,
        "the caller's 500ms beat the policy's 10s"
    );
    assert_eq!(header(&resp, TIMEOUT_HEADER), "request");

    let resp = dp
        .outbound(TestClient::http1())
        .oneshot(request("GET", upstream.addr, "/fast", ""))
        .await
        .unwrap();
    let ms: u64 = header(&resp, &format!("x-seen-{DEADLINE_HEADER}"))
        .parse()
        .unwrap();
    assert!(
        ms <= 10_000 && ms > 0,
        "plain HTTP carries the remaining deadline: {ms}"
    );
}

#[tokio::test]
async fn grpc_unavailable_is_retried_and_trailers_pass_intact() {
    let upstream = Upstream::start(handler(|seen| async move {
        let mut resp = if seen.n == 0 {
            // Trailers-only: the status is in the headers, the body is empty.
            let mut r = Response::new(full_body(Bytes::new()));
            r.headers_mut()
                .insert("grpc-status", HeaderValue::from_static("14"));
            r
        } else {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            trailers.insert("grpc-message", HeaderValue::from_static("ok"));
            let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
                Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi"))),
                Ok(Frame::trailers(trailers)),
            ];
            Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed())
        };
        resp.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/grpc"));
        Ok(resp)
    }))
    .await;
    let metrics = PolicyMetrics::unregistered();
    let yaml = format!("services:\n  svc:\n    retries: {{ {FAST_BACKOFF} }}\n");
    let dp = destination(&yaml, &upstream, &metrics);
    let mut req: Request<Body> = request("POST", upstream.addr, "/pkg.Svc/Call", "\0\0\0\0\0");
    req.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    req.headers_mut()
        .insert("te", HeaderValue::from_static("trailers"));
    req.headers_mut()
        .insert("idempotency-key", HeaderValue::from_static("\"grpc-1\""));
    let resp = dp.outbound(TestClient::h2c()).oneshot(req).await.unwrap();
    assert_eq!(header(&resp, ATTEMPTS_HEADER), "2");
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers arrive");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "ok");
    assert_eq!(collected.to_bytes(), Bytes::from_static(b"\0\0\0\0\x02hi"));
    assert_eq!(
        metrics
            .retries
            .with_label_values(&["svc", "grpc-unavailable"])
            .get(),
        1
    );
}

#[tokio::test]
async fn bodies_larger_than_the_replay_buffer_are_streamed_once_and_not_retried() {
    let upstream = Upstream::start(handler(|seen| async move {
        Ok(reply(503, &seen.body.len().to_string()))
    }))
    .await;
    let metrics = PolicyMetrics::unregistered();
    let yaml = format!("services:\n  svc:\n    retries: {{ {FAST_BACKOFF} }}\n");
    let stack = destination(&yaml, &upstream, &metrics).outbound(TestClient::http1());
    let big = "x".repeat(100 * 1024);
    let mut req = request("PUT", upstream.addr, "/blob", &big);
    req.headers_mut().remove("content-length");
    let resp = stack.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(header(&resp, ATTEMPTS_HEADER), "1");
    assert_eq!(
        body_string(resp).await,
        big.len().to_string(),
        "the whole body reached the upstream"
    );
    assert_eq!(upstream.calls(), 1);
    assert_eq!(metrics.body_too_large.with_label_values(&["svc"]).get(), 1);
}

#[tokio::test]
async fn a_policy_edit_applies_to_the_next_request() {
    let upstream = Upstream::start(handler(|_| async { Ok(reply(503, "busy")) })).await;
    let metrics = PolicyMetrics::unregistered();
    let yaml = format!("services:\n  svc:\n    retries: {{ max_attempts: 3, {FAST_BACKOFF} }}\n");
    let dp = destination(&yaml, &upstream, &metrics);
    let stack = dp.outbound(TestClient::http1());
    let resp = send(&stack, request("GET", upstream.addr, "/", ""))
        .await
        .unwrap();
    assert_eq!(header(&resp, ATTEMPTS_HEADER), "3");
    dp.policy.replace(policy(
        "services:\n  svc:\n    retries: { max_attempts: 1 }\n",
    ));
    let resp = send(&stack, request("GET", upstream.addr, "/", ""))
        .await
        .unwrap();
    assert_eq!(
        header(&resp, ATTEMPTS_HEADER),
        "1",
        "same stack, new policy"
    );
}

#[tokio::test]
async fn grpc_unavailable_after_the_first_message_is_not_retried() {
    // A server-streaming call: headers, one message, a pause, then trailers with UNAVAILABLE. The caller has
    // the first message by then, so the stream is final: the status reaches it in the trailers, unretried.
    let upstream = Upstream::start(handler(|_| async {
        let frames = futures_util::stream::unfold(0, |step| async move {
            match step {
                0 => Some((
                    Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"\0\0\0\0\x02m1"))),
                    1,
                )),
                1 => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let mut trailers = HeaderMap::new();
                    trailers.insert("grpc-status", HeaderValue::from_static("14"));
                    trailers.insert("grpc-message", HeaderValue::from_static("going away"));
                    Some((Ok(Frame::trailers(trailers)), 2))
                }
                _ => None,
            }
        });
        let mut resp = Response::new(StreamBody::new(frames).boxed());
        resp.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/grpc"));
        Ok(resp)
    }))
    .await;
    let metrics = PolicyMetrics::unregistered();
    let yaml = format!("services:\n  svc:\n    retries: {{ {FAST_BACKOFF} }}\n");
    let dp = destination(&yaml, &upstream, &metrics);
    let mut req: Request<Body> = request("POST", upstream.addr, "/pkg.Svc/Watch", "\0\0\0\0\0");
    req.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    req.headers_mut()
        .insert("te", HeaderValue::from_static("trailers"));
    req.headers_mut()
        .insert("idempotency-key", HeaderValue::from_static("\"watch-1\""));
    let resp = dp.outbound(TestClient::h2c()).oneshot(req).await.unwrap();
    assert_eq!(header(&resp, ATTEMPTS_HEADER), "1");
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers arrive");
    assert_eq!(
        trailers["grpc-status"], "14",
        "the status reaches the caller"
    );
    assert_eq!(trailers["grpc-message"], "going away");
    assert_eq!(collected.to_bytes(), Bytes::from_static(b"\0\0\0\0\x02m1"));
    assert_eq!(
        upstream.calls(),
        1,
        "never sent again after the first message"
    );
    assert_eq!(
        metrics
            .retries
            .with_label_values(&["svc", "grpc-unavailable"])
            .get(),
        0
    );
}
