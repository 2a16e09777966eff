//! A stand-in for the Kubernetes API server, over HTTPS on loopback, for the discovery tests: it answers
//! list requests with recorded lists and watch requests with a stream of JSON-line watch events (fed by the
//! test, replayed from the requested resourceVersion on reconnects, as the real server does), and keeps the
//! Events it was sent.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;

/// A watchable collection: its recorded list and every watch event since, by resourceVersion.
struct Collection {
    list: String,
    events: Mutex<Vec<(u64, String)>>,
    count: watch::Sender<usize>,
}

/// The fake API server; collections are keyed by their collection path (`/api/v1/services`).
pub struct FakeApiServer {
    pub addr: SocketAddr,
    ca_der: CertificateDer<'static>,
    collections: Arc<HashMap<String, Collection>>,
    /// Bodies of the Events POSTed (events.k8s.io/v1).
    pub events: Arc<Mutex<Vec<serde_json::Value>>>,
    /// Every request line (path and query) received.
    pub requests: Arc<Mutex<Vec<String>>>,
}

/// The collection paths an object of this kind in this namespace is listed under: the namespace's, then
/// the cluster-wide one.
fn collections_of(kind: &str, namespace: &str) -> [String; 2] {
    let (prefix, plural) = match kind {
        "Service" => ("/api/v1", "services"),
        "Pod" => ("/api/v1", "pods"),
        "EndpointSlice" => ("/apis/discovery.k8s.io/v1", "endpointslices"),
        other => panic!("no collection for kind {other}"),
    };
    [
        format!("{prefix}/namespaces/{namespace}/{plural}"),
        format!("{prefix}/{plural}"),
    ]
}

impl FakeApiServer {
    /// Serves these recorded lists (`(collection path, list JSON)`).
    pub async fn start(lists: &[(&str, &str)]) -> FakeApiServer {
        let super::LoopbackTls {
            listener,
            acceptor,
            ca_der,
        } = super::loopback_tls().await;
        let addr = listener.local_addr().unwrap();
        let collections: Arc<HashMap<_, _>> = Arc::new(
            lists
                .iter()
                .map(|(path, list)| {
                    (
                        path.to_string(),
                        Collection {
                            list: list.to_string(),
                            events: Mutex::new(Vec::new()),
                            count: watch::channel(0).0,
                        },
                    )
                })
                .collect(),
        );
        let server = FakeApiServer {
            addr,
            ca_der,
            collections: collections.clone(),
            events: Arc::default(),
            requests: Arc::default(),
        };
        let (events, requests) = (server.events.clone(), server.requests.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let (collections, events, requests) =
                    (collections.clone(), events.clone(), requests.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |request| {
                        answer(
                            request,
                            collections.clone(),
                            events.clone(),
                            requests.clone(),
                        )
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        server
    }

    /// A client of this server, as the control plane builds it.
    pub fn client(&self) -> kube::Client {
        let mut config = kube::Config::new(format!("https://{}", self.addr).parse().unwrap());
        config.root_cert = Some(vec![self.ca_der.to_vec()]);
        config.read_timeout = Some(Duration::from_secs(30));
        kube::Client::try_from(config).unwrap()
    }

    /// Appends recorded watch events (JSON lines) to their collections (every served one that holds the
    /// object: its namespace's and the cluster-wide one), for current and future watches.
    pub fn push_watch_events(&self, jsonl: &str) {
        for line in jsonl.lines().filter(|l| !l.trim().is_empty()) {
            let event: serde_json::Value = serde_json::from_str(line).unwrap();
            let object = &event["object"];
            let version: u64 = object["metadata"]["resourceVersion"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            let namespace = object["metadata"]["namespace"].as_str().unwrap_or_default();
            for path in collections_of(object["kind"].as_str().unwrap(), namespace) {
                if let Some(collection) = self.collections.get(path.as_str()) {
                    let mut events = collection.events.lock().unwrap();
                    events.push((version, format!("{line}\n")));
                    collection.count.send_replace(events.len());
                }
            }
        }
    }
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

fn json(status: u16, body: String) -> http::Response<Body> {
    http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)).boxed_unsync())
        .unwrap()
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

async fn answer(
    request: http::Request<Incoming>,
    collections: Arc<HashMap<String, Collection>>,
    events: Arc<Mutex<Vec<serde_json::Value>>>,
    requests: Arc<Mutex<Vec<String>>>,
) -> Result<http::Response<Body>, Infallible> {
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or_default().to_string();
    let method = request.method().clone();
    requests
        .lock()
        .unwrap()
        .push(format!("{method} {path}?{query}"));
    if method == http::Method::POST
        && path.starts_with("/apis/events.k8s.io/v1/namespaces/")
        && path.ends_with("/events")
    {
        let body = request.into_body().collect().await.unwrap().to_bytes();
        let event: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        events.lock().unwrap().push(event);
        return Ok(json(201, String::from_utf8_lossy(&body).into_owned()));
    }
    let Some((key, collection)) = collections
        .get_key_value(path.as_str())
        .filter(|_| method == http::Method::GET)
    else {
        let status = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#;
        return Ok(json(404, status.to_string()));
    };
    if query_param(&query, "watch") != Some("true") {
        return Ok(json(200, collection.list.clone()));
    }
    let from: u64 = query_param(&query, "resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // Every event after `from`, then each new one as it is pushed.
    let count = collection.count.subscribe();
    let key = key.clone();
    let collections = collections.clone();
    let stream = futures::stream::unfold((0usize, count), move |(mut next, mut count)| {
        let (collections, key) = (collections.clone(), key.clone());
        async move {
            loop {
                let pending: Vec<String> = {
                    let events = collections[&key].events.lock().unwrap();
                    let fresh: Vec<String> = events[next..]
                        .iter()
                        .filter(|(v, _)| *v > from)
                        .map(|(_, line)| line.clone())
                        .collect();
                    next = events.len();
                    fresh
                };
                if !pending.is_empty() {
                    let frame = Frame::data(Bytes::from(pending.concat()));
                    return Some((Ok::<_, Infallible>(frame), (next, count)));
                }
                count.changed().await.ok()?;
            }
        }
    });
    let response = http::Response::builder()
        .status(200)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(StreamBody::new(stream.boxed()).boxed_unsync())
        .unwrap();
    Ok(response)
}
