//! Kubernetes mode's discovery end to end: the reflectors, through the real `kube::Client`, against a fake
//! API server over HTTPS on loopback serving recorded lists and watch streams of Services, EndpointSlices
//! and Pods; the MeshConfig the receiver holds is checked after each step (add, change, bad annotation,
//! delete).

mod common;

use std::time::Duration;

use common::fake_api::FakeApiServer;
use meshlet::discovery::{InboundMode, MeshConfig, PortProtocol, ServiceConfig, ServicePort};
use meshlet_control::k8s::{self, K8sSettings};
use tokio::sync::watch;

const SERVICES: &str = include_str!("fixtures/k8s/services-list.json");
const SLICES: &str = include_str!("fixtures/k8s/endpointslices-list.json");
const PODS: &str = include_str!("fixtures/k8s/pods-list.json");
const ADD: &str = include_str!("fixtures/k8s/watch-1-add.jsonl");
const CHANGE: &str = include_str!("fixtures/k8s/watch-2-change.jsonl");
const BAD_ANNOTATION: &str = include_str!("fixtures/k8s/watch-3-bad-annotation.jsonl");
const DELETE: &str = include_str!("fixtures/k8s/watch-4-delete.jsonl");

/// Generous: the debounce is 50 ms; this only bounds a broken test.
const PATIENCE: Duration = Duration::from_secs(20);

async fn wait_for(
    mesh: &mut watch::Receiver<MeshConfig>,
    what: &str,
    done: impl Fn(&MeshConfig) -> bool,
) -> MeshConfig {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        {
            let current = mesh.borrow_and_update();
            if done(&current) {
                return current.clone();
            }
        }
        if tokio::time::timeout_at(deadline, mesh.changed())
            .await
            .is_err()
        {
            panic!("timed out waiting for {what}; mesh: {:#?}", *mesh.borrow());
        }
    }
}

fn service<'a>(mesh: &'a MeshConfig, name: &str) -> Option<&'a ServiceConfig> {
    mesh.services.iter().find(|s| s.name == name)
}

fn addresses(service: &ServiceConfig) -> Vec<String> {
    service
        .endpoints
        .iter()
        .map(|e| e.address.to_string())
        .collect()
}

fn request_timeout(mesh: &MeshConfig, name: &str) -> Duration {
    mesh.policy.resolve(name).default.timeouts.request
}

#[tokio::test]
async fn the_mesh_follows_services_endpoint_slices_and_pods() {
    let api = FakeApiServer::start(&[
        ("/api/v1/services", SERVICES),
        ("/apis/discovery.k8s.io/v1/endpointslices", SLICES),
        ("/api/v1/pods", PODS),
    ])
    .await;
    let mut settings = K8sSettings::new("cluster.local");
    settings.debounce = Duration::from_millis(50);
    let mut mesh = k8s::spawn(api.client(), settings);

    // The recorded lists: a ClusterIP Service with a named target port, a headless one, the API server's.
    let listed = wait_for(&mut mesh, "the listed objects", |m| m.services.len() == 3).await;
    let names: Vec<&str> = listed.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["kubernetes.default", "payment.shop", "redis.shop"]);
    let payment = service(&listed, "payment.shop").unwrap();
    assert_eq!(
        payment.identity.as_str(),
        "spiffe://cluster.local/ns/shop/sa/payment"
    );
    assert_eq!(
        payment.addresses,
        ["10.96.0.10".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(
        payment.ports,
        [ServicePort {
            port: 80,
            target_port: Some(8080),
            protocol: Some(PortProtocol::Http)
        }],
        "ClusterIP port 80 → the endpoints' targetPort, resolved by name through the slice"
    );
    assert_eq!(
        addresses(payment),
        ["10.244.1.5:8080", "10.244.1.9:8080", "10.244.2.7:8080"],
        "ready endpoints only"
    );
    let canary = &payment.endpoints[1];
    assert!(!canary.meshed, "the canary pod has no sidecar");
    assert_eq!(
        canary.identity.as_ref().map(|i| i.as_str()),
        Some("spiffe://cluster.local/ns/shop/sa/payment-canary")
    );
    assert!(payment.endpoints[0].meshed && payment.endpoints[0].identity.is_none());
    assert_eq!(payment.inbound.mode, InboundMode::Strict);
    let order = "spiffe://cluster.local/ns/shop/sa/order".parse().unwrap();
    let web = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
    let allow = payment.inbound.allow.as_ref().unwrap();
    assert!(allow.allows(&order) && !allow.allows(&web));
    assert_eq!(
        request_timeout(&listed, "payment.shop"),
        Duration::from_secs(3)
    );

    let redis = service(&listed, "redis.shop").unwrap();
    assert!(redis.addresses.is_empty(), "headless");
    assert_eq!(
        redis.ports,
        [ServicePort {
            port: 6379,
            target_port: None,
            protocol: Some(PortProtocol::Opaque)
        }],
        "appProtocol tcp"
    );
    assert_eq!(addresses(redis), ["10.244.3.3:6379"]);
    assert!(redis.endpoints[0].meshed, "the meshed label counts");
    assert_eq!(
        redis.identity.as_str(),
        "spiffe://cluster.local/ns/shop/sa/redis"
    );

    let apiserver = service(&listed, "kubernetes.default").unwrap();
    assert_eq!(addresses(apiserver), ["172.18.0.2:6443"]);
    assert!(!apiserver.endpoints[0].meshed, "no pod behind it");

    // Added: a gRPC Service, its Pod and its slice (then a bookmark).
    api.push_watch_events(ADD);
    let added = wait_for(&mut mesh, "inventory", |m| {
        service(m, "inventory.shop").is_some_and(|s| !s.endpoints.is_empty())
    })
    .await;
    let inventory = service(&added, "inventory.shop").unwrap();
    assert_eq!(
        inventory.addresses,
        ["10.96.0.20".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(
        inventory.ports,
        [ServicePort {
            port: 9090,
            target_port: None,
            protocol: Some(PortProtocol::Grpc)
        }]
    );
    assert_eq!(addresses(inventory), ["10.244.2.20:9090"]);
    assert!(inventory.endpoints[0].meshed);
    assert_eq!(
        inventory.identity.as_str(),
        "spiffe://cluster.local/ns/shop/sa/inventory"
    );
    assert_eq!(
        added
            .policy
            .resolve("inventory.shop")
            .default
            .retries
            .max_attempts,
        2
    );

    // Changed: payment's timeout annotation, one endpoint no longer ready, the canary pod meshed.
    api.push_watch_events(CHANGE);
    let changed = wait_for(&mut mesh, "the changes", |m| {
        service(m, "payment.shop")
            .is_some_and(|s| s.endpoints.len() == 2 && s.endpoints.iter().all(|e| e.meshed))
            && request_timeout(m, "payment.shop") == Duration::from_secs(5)
    })
    .await;
    assert_eq!(
        addresses(service(&changed, "payment.shop").unwrap()),
        ["10.244.1.5:8080", "10.244.1.9:8080"]
    );

    // A bad annotation: an Event on the Service naming it and its value; the last good policy stays.
    api.push_watch_events(BAD_ANNOTATION);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let event = loop {
        if let Some(event) = api.events.lock().unwrap().first().cloned() {
            break event;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no Event was posted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "InvalidAnnotation");
    assert_eq!(event["regarding"]["kind"], "Service");
    assert_eq!(event["regarding"]["name"], "payment");
    assert_eq!(event["regarding"]["namespace"], "shop");
    assert_eq!(event["metadata"]["namespace"], "shop");
    let note = event["note"].as_str().unwrap();
    assert!(
        note.contains("meshlet.io/timeout-request") && note.contains("\"soon\""),
        "{note}"
    );
    assert!(note.contains("last good policy"), "{note}");
    assert_eq!(
        request_timeout(&mesh.borrow(), "payment.shop"),
        Duration::from_secs(5),
        "the last good policy stays in force"
    );

    // Deleted: inventory's slice, pod and Service.
    api.push_watch_events(DELETE);
    let deleted = wait_for(&mut mesh, "inventory gone", |m| {
        service(m, "inventory.shop").is_none()
    })
    .await;
    assert_eq!(deleted.services.len(), 3);
    assert!(!deleted.policy.services.contains_key("inventory.shop"));
    assert_eq!(
        request_timeout(&deleted, "payment.shop"),
        Duration::from_secs(5)
    );

    // kube listed each kind once, then watched from the list's version with bookmarks.
    let requests = api.requests.lock().unwrap().clone();
    for path in [
        "/api/v1/services",
        "/apis/discovery.k8s.io/v1/endpointslices",
        "/api/v1/pods",
    ] {
        assert!(
            requests
                .iter()
                .any(|r| r.starts_with(&format!("GET {path}?"))
                    && r.contains("watch=true")
                    && r.contains("resourceVersion=100")
                    && r.contains("allowWatchBookmarks=true")),
            "{path}: {requests:#?}"
        );
    }
    assert_eq!(api.events.lock().unwrap().len(), 1, "reported once");
}

/// The recorded list with only the objects of `namespace`, as `GET /api/v1/namespaces/<ns>/…` answers.
fn list_in(list: &str, namespace: &str) -> String {
    let mut list: serde_json::Value = serde_json::from_str(list).unwrap();
    list["items"]
        .as_array_mut()
        .unwrap()
        .retain(|item| item["metadata"]["namespace"] == namespace);
    list.to_string()
}

#[tokio::test]
async fn only_the_configured_namespaces_are_watched() {
    let (services, slices, pods) = (
        list_in(SERVICES, "shop"),
        list_in(SLICES, "shop"),
        list_in(PODS, "shop"),
    );
    let api = FakeApiServer::start(&[
        ("/api/v1/namespaces/shop/services", &services),
        (
            "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices",
            &slices,
        ),
        ("/api/v1/namespaces/shop/pods", &pods),
    ])
    .await;
    let mut settings = K8sSettings::new("cluster.local");
    settings.namespaces = vec!["shop".to_string()];
    settings.debounce = Duration::from_millis(50);
    let mut mesh = k8s::spawn(api.client(), settings);
    let listed = wait_for(&mut mesh, "shop's services", |m| m.services.len() == 2).await;
    let names: Vec<&str> = listed.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["payment.shop", "redis.shop"],
        "default is not watched"
    );
    api.push_watch_events(ADD);
    wait_for(&mut mesh, "inventory", |m| {
        service(m, "inventory.shop").is_some_and(|s| !s.endpoints.is_empty())
    })
    .await;
    let requests = api.requests.lock().unwrap().clone();
    assert!(
        requests.iter().all(|r| r.contains("/namespaces/shop/")),
        "{requests:#?}"
    );
}
