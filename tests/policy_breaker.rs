//! Circuit breaking, load balancing and concurrency limits against real upstreams on loopback.

mod policy_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use meshlet::policy::{send, DestinationPolicy, PolicyMetrics, ERROR_HEADER};
use policy_support::*;
use tokio::sync::Semaphore;

#[tokio::test]
async fn breaker_opens_fails_fast_and_a_half_open_probe_closes_it() {
    let upstream = Upstream::start(handler(|seen| async move {
        Ok(if seen.n < 3 {
            reply(503, "sick")
        } else {
            reply(200, "well")
        })
    }))
    .await;
    let metrics = PolicyMetrics::unregistered();
    let yaml = "services:\n  svc:\n    retries: { max_attempts: 1 }\n    breaker: { consecutive_failures: 3, base_ejection: 300ms, max_ejection: 1s }\n";
    let dp = DestinationPolicy::new("svc", policy(yaml), &[upstream.addr], &metrics);
    let stack = dp.outbound(TestClient::http1());
    for _ in 0..3 {
        let resp = send(&stack, request("GET", upstream.addr, "/", ""))
            .await
            .unwrap();
        assert_eq!(header(&resp, ERROR_HEADER), "", "the upstream's own 503");
    }
    let (calls, accepts) = (upstream.calls(), upstream.accepts());
    let resp = send(&stack, request("GET", upstream.addr, "/", ""))
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(header(&resp, ERROR_HEADER), "circuit-open");
    assert_eq!(
        (upstream.calls(), upstream.accepts()),
        (calls, accepts),
        "no network while open"
    );
    let endpoint = upstream.addr.to_string();
    assert_eq!(
        metrics
            .breaker_state
            .with_label_values(&["svc", &endpoint])
            .get(),
        1
    );

    tokio::time::sleep(Duration::from_millis(350)).await;
    let probe = send(&stack, request("GET", upstream.addr, "/", ""))
        .await
        .unwrap();
    assert_eq!(probe.status(), 200, "the half-open probe went through");
    let after = send(&stack, request("GET", upstream.addr, "/", ""))
        .await
        .unwrap();
    assert_eq!(after.status(), 200, "closed again");
    assert_eq!(
        metrics
            .breaker_state
            .with_label_values(&["svc", &endpoint])
            .get(),
        0
    );
    for to in ["open", "half-open", "closed"] {
        assert_eq!(
            metrics
                .breaker_transitions
                .with_label_values(&["svc", &endpoint, to])
                .get(),
            1,
            "{to}"
        );
    }
}

#[tokio::test]
async fn a_ten_times_slower_endpoint_gets_less_than_a_fifth_of_the_traffic() {
    let fast = Upstream::start(handler(|_| async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok(reply(200, "fast"))
    }))
    .await;
    let slow = Upstream::start(handler(|_| async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(reply(200, "slow"))
    }))
    .await;
    let metrics = PolicyMetrics::unregistered();
    let dp = DestinationPolicy::new("svc", policy("{}"), &[slow.addr, fast.addr], &metrics);
    let stack = dp.outbound(TestClient::http1());
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let stack = stack.clone();
        let to = fast.addr;
        workers.spawn(async move {
            for _ in 0..50 {
                assert_eq!(
                    send(&stack, request("GET", to, "/", ""))
                        .await
                        .unwrap()
                        .status(),
                    200
                );
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done.unwrap();
    }
    let (f, s) = (fast.calls(), slow.calls());
    assert_eq!(f + s, 200);
    assert!(f * 100 >= 80 * 200, "fast {f}, slow {s}");
}

#[tokio::test]
async fn endpoints_are_replaced_at_run_time() {
    let a = Upstream::start(handler(|_| async { Ok(reply(200, "a")) })).await;
    let b = Upstream::start(handler(|_| async { Ok(reply(200, "b")) })).await;
    let metrics = PolicyMetrics::unregistered();
    let dp = DestinationPolicy::new("svc", policy("{}"), &[a.addr], &metrics);
    let stack = dp.outbound(TestClient::http1());
    assert_eq!(
        body_string(send(&stack, request("GET", a.addr, "/", "")).await.unwrap()).await,
        "a"
    );
    dp.endpoints.update(&[b.addr]);
    assert_eq!(
        body_string(send(&stack, request("GET", a.addr, "/", "")).await.unwrap()).await,
        "b"
    );
}

#[tokio::test]
async fn beyond_the_concurrency_and_pending_limits_requests_fail_fast() {
    let gate = Arc::new(Semaphore::new(0));
    let held = gate.clone();
    let upstream = Upstream::start(handler(move |_| {
        let held = held.clone();
        async move {
            let _ = held.acquire().await.map(|p| p.forget());
            Ok(reply(200, "done"))
        }
    }))
    .await;
    let metrics = PolicyMetrics::unregistered();
    let yaml = "services:\n  svc:\n    limits: { max_concurrent: 2, max_pending: 1 }\n";
    let dp = DestinationPolicy::new("svc", policy(yaml), &[upstream.addr], &metrics);
    let stack = dp.outbound(TestClient::http1());
    let mut admitted = Vec::new();
    for _ in 0..2 {
        admitted.push(tokio::spawn(send(
            &stack,
            request("GET", upstream.addr, "/", ""),
        )));
    }
    eventually("two requests at the upstream", || upstream.calls() == 2).await;
    admitted.push(tokio::spawn(send(
        &stack,
        request("GET", upstream.addr, "/", ""),
    )));
    // Give the third request the moment it needs to take the one pending place.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = send(&stack, request("GET", upstream.addr, "/", ""))
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(header(&refused, ERROR_HEADER), "overloaded");
    gate.add_permits(10);
    for call in admitted {
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(
        upstream.calls(),
        3,
        "the pending request ran once a slot was free"
    );
    assert_eq!(
        metrics
            .limit_rejections
            .with_label_values(&["svc", "overloaded"])
            .get(),
        1
    );
}

#[tokio::test]
async fn keyed_requests_go_to_their_key_endpoint_and_fall_back_when_it_is_ejected() {
    // The index of the endpoint that fails, once one is chosen.
    let sick = Arc::new(AtomicUsize::new(usize::MAX));
    let mut upstreams = Vec::new();
    for i in 0..3 {
        let sick = sick.clone();
        upstreams.push(
            Upstream::start(handler(move |_| {
                let ill = sick.load(Ordering::SeqCst) == i;
                async move {
                    Ok(if ill {
                        reply(503, "sick")
                    } else {
                        reply(200, "ok")
                    })
                }
            }))
            .await,
        );
    }
    let addrs: Vec<_> = upstreams.iter().map(|u| u.addr).collect();
    let metrics = PolicyMetrics::unregistered();
    let yaml = "services:\n  svc:\n    retries: { max_attempts: 1 }\n    breaker: { consecutive_failures: 2, base_ejection: 10s, max_ejected_percent: 50 }\n";
    let dp = DestinationPolicy::new("svc", policy(yaml), &addrs, &metrics);
    let stack = dp.outbound(TestClient::http1());
    let keyed = |key: &str| {
        let mut req = request("POST", addrs[0], "/charge", "x");
        req.headers_mut()
            .insert("idempotency-key", format!("\"{key}\"").parse().unwrap());
        req
    };
    for _ in 0..20 {
        let resp = send(&stack, keyed("order-1")).await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    let calls: Vec<usize> = upstreams.iter().map(Upstream::calls).collect();
    assert_eq!(calls.iter().sum::<usize>(), 20);
    assert!(
        calls.contains(&20),
        "every call of one key on one endpoint: {calls:?}"
    );
    // Other keys spread over the endpoints.
    for i in 0..30 {
        send(&stack, keyed(&format!("order-{}", i + 100)))
            .await
            .unwrap();
    }
    let spread: Vec<usize> = upstreams
        .iter()
        .zip(&calls)
        .map(|(u, before)| u.calls() - before)
        .collect();
    assert!(
        spread.iter().filter(|n| **n > 0).count() >= 2,
        "keys spread: {spread:?}"
    );
    // The key's endpoint fails twice and is ejected: the key's requests go elsewhere and succeed.
    let home = calls.iter().position(|n| *n == 20).unwrap();
    sick.store(home, Ordering::SeqCst);
    for _ in 0..2 {
        let resp = send(&stack, keyed("order-1")).await.unwrap();
        assert_eq!(resp.status(), 503);
    }
    let at_home = upstreams[home].calls();
    for _ in 0..5 {
        let resp = send(&stack, keyed("order-1")).await.unwrap();
        assert_eq!(resp.status(), 200, "served by another endpoint");
    }
    assert_eq!(
        upstreams[home].calls(),
        at_home,
        "the ejected endpoint is skipped"
    );
}

#[tokio::test]
async fn callers_that_go_away_do_not_eject_a_healthy_endpoint() {
    // The first five requests are slow; their callers give up long before the per-try timeout.
    let upstream = Upstream::start(handler(|seen| async move {
        if seen.n < 5 {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        Ok(reply(200, "well"))
    }))
    .await;
    let metrics = PolicyMetrics::unregistered();
    let yaml = "services:\n  svc:\n    timeouts: { per_try: 1s }\n    retries: { max_attempts: 1 }\n    breaker: { consecutive_failures: 2 }\n";
    let dp = DestinationPolicy::new("svc", policy(yaml), &[upstream.addr], &metrics);
    let stack = dp.outbound(TestClient::http1());
    for _ in 0..5 {
        let request = send(&stack, request("GET", upstream.addr, "/", ""));
        let gave_up = tokio::time::timeout(Duration::from_millis(50), request).await;
        assert!(gave_up.is_err(), "the caller left before the answer");
    }
    let resp = send(&stack, request("GET", upstream.addr, "/", ""))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", header(&resp, ERROR_HEADER));
    let endpoint = upstream.addr.to_string();
    assert_eq!(
        metrics
            .breaker_transitions
            .with_label_values(&["svc", &endpoint, "open"])
            .get(),
        0,
        "five cancelled attempts are no verdict on the endpoint"
    );
}
