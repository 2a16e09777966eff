//! The certificate manager against a small HTTPS control plane on loopback that implements
//! `POST /v1/certificates` by signing the CSR with a test CA.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use meshlet::tls::api::{IssueError, IssueRequest, IssueResponse, ISSUE_PATH};
use meshlet::tls::store::parse_certificates;
use meshlet::tls::testing::{spawn_echo_server, EchoClient, TestCa};
use meshlet::tls::{
    client_config, provider, server_config, CertManager, ClientError, Credentials, IdentityArgs,
    IdentitySettings, IdentityStore, SpiffeId, ALPN_MESH_H2,
};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

const CONTROL_PLANE_NAME: &str = "meshlet-control.test";
const WAIT: Duration = Duration::from_secs(30);

fn web() -> SpiffeId {
    SpiffeId::new("cluster.local", "shop", "web").unwrap()
}

/// The fake control plane's state: which token it accepts, the TTL it issues, what it has seen.
struct ControlPlane {
    ca: TestCa,
    serving: Arc<ServerConfig>,
    accepted_token: Mutex<String>,
    ttl: Duration,
    tokens_seen: Mutex<Vec<String>>,
}

impl ControlPlane {
    fn new(ca: TestCa, ttl: Duration, token: &str) -> Arc<Self> {
        let leaf = ca.issue_dns(CONTROL_PLANE_NAME);
        let serving = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                parse_certificates(&leaf.chain_pem, "control plane chain").unwrap(),
                PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap(),
            )
            .unwrap();
        Arc::new(ControlPlane {
            ca,
            serving: Arc::new(serving),
            accepted_token: Mutex::new(token.to_owned()),
            ttl,
            tokens_seen: Mutex::new(Vec::new()),
        })
    }

    /// Serves HTTPS on `addr` until the returned task is aborted (which closes the listener).
    async fn start(self: &Arc<Self>, addr: SocketAddr) -> (SocketAddr, JoinHandle<()>) {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cp, acceptor) = (self.clone(), TlsAcceptor::from(self.serving.clone()));
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (cp, acceptor) = (cp.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |req| {
                        let cp = cp.clone();
                        async move { Ok::<_, std::convert::Infallible>(cp.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        (addr, task)
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let refuse = |status: StatusCode, reason: &str, message: String| {
            let body = serde_json::to_vec(&IssueError {
                reason: reason.into(),
                message,
            })
            .unwrap();
            Response::builder()
                .status(status)
                .body(Full::new(Bytes::from(body)))
                .unwrap()
        };
        if req.method() != http::Method::POST || req.uri().path() != ISSUE_PATH {
            return refuse(StatusCode::NOT_FOUND, "not-found", req.uri().path().into());
        }
        let token = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default()
            .to_owned();
        self.tokens_seen.lock().unwrap().push(token.clone());
        if token != *self.accepted_token.lock().unwrap() {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "bad-credential",
                format!("token {token:?} is not valid"),
            );
        }
        let Ok(body) = Limited::new(req.into_body(), 64 * 1024).collect().await else {
            return refuse(
                StatusCode::BAD_REQUEST,
                "malformed-request",
                "unreadable body".into(),
            );
        };
        let Ok(request) = serde_json::from_slice::<IssueRequest>(&body.to_bytes()) else {
            return refuse(
                StatusCode::BAD_REQUEST,
                "malformed-request",
                "not an IssueRequest".into(),
            );
        };
        if request.identity != web().to_string() {
            return refuse(StatusCode::FORBIDDEN, "identity-mismatch", request.identity);
        }
        let now = SystemTime::now();
        let (not_before, not_after) = (now - Duration::from_secs(60), now + self.ttl);
        let chain = match self
            .ca
            .sign_csr(&request.csr_pem, &web(), not_before, not_after)
        {
            Ok(chain) => chain,
            Err(e) => return refuse(StatusCode::BAD_REQUEST, "malformed-csr", e.to_string()),
        };
        let unix = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        let response = IssueResponse {
            certificate_chain_pem: chain,
            trust_bundle_pem: self.ca.trust_bundle_pem(),
            not_after_unix: unix(not_after),
            not_before_unix: unix(not_before),
        };
        Response::new(Full::new(Bytes::from(
            serde_json::to_vec(&response).unwrap(),
        )))
    }

    fn saw_token(&self, token: &str) -> bool {
        self.tokens_seen.lock().unwrap().iter().any(|t| t == token)
    }
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("meshlet-tls-client-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn write(&self, file: &str, contents: &str) -> PathBuf {
        let path = self.0.join(file);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Settings as the sidecar builds them from its flags, with quick retries for the test.
fn settings(
    scratch: &Scratch,
    cp_addr: SocketAddr,
    anchors_pem: &str,
    token: &str,
) -> IdentitySettings {
    let args = IdentityArgs {
        control_plane_addr: Some(cp_addr.to_string()),
        control_plane_name: CONTROL_PLANE_NAME.into(),
        trust_anchors: Some(scratch.write("anchors.pem", anchors_pem)),
        trust_domain: "cluster.local".into(),
        namespace: Some("shop".into()),
        service_account: Some("web".into()),
        token_file: scratch.write("token", token),
        join_token: None,
    };
    let mut settings = args.settings().unwrap().unwrap();
    settings.retry_initial = Duration::from_millis(100);
    settings.retry_max = Duration::from_millis(500);
    settings
}

fn leaf(credentials: &Credentials) -> Vec<u8> {
    credentials.certified_key().cert[0].to_vec()
}

/// Waits for the store's next replacement and returns it.
async fn next_credentials(
    rx: &mut tokio::sync::watch::Receiver<Option<Arc<Credentials>>>,
) -> Arc<Credentials> {
    tokio::time::timeout(WAIT, rx.changed())
        .await
        .expect("a new certificate in time")
        .unwrap();
    rx.borrow_and_update().clone().expect("credentials")
}

#[tokio::test]
async fn obtains_a_certificate_then_renews_at_half_life_rereading_the_token() {
    let scratch = Scratch::new("renew");
    let cp = ControlPlane::new(TestCa::new("mesh"), Duration::from_secs(4), "token-1");
    let (addr, _server) = cp.start((Ipv4Addr::LOCALHOST, 0).into()).await;
    let settings = settings(&scratch, addr, &cp.ca.trust_bundle_pem(), "token-1");

    let manager = CertManager::new(settings).unwrap();
    let store = manager.store().clone();
    let mut updates = store.subscribe();
    assert!(store.current().is_none());
    let task = tokio::spawn(manager.run());

    tokio::time::timeout(WAIT, store.ready())
        .await
        .expect("ready once the first certificate arrives");
    let mut previous = next_credentials(&mut updates).await;
    assert_eq!(previous.identity(), &web());
    previous.verify_chain().unwrap();
    let lifetime = previous
        .not_after()
        .duration_since(SystemTime::now())
        .unwrap();
    assert!(lifetime <= Duration::from_secs(4), "{lifetime:?}");

    // The kubelet rotates the projected token; the control plane only accepts the new one from now on.
    *cp.accepted_token.lock().unwrap() = "token-2".into();
    scratch.write("token", "token-2\n");

    for _ in 0..3 {
        let renewed = next_credentials(&mut updates).await;
        assert_eq!(renewed.identity(), &web());
        assert_ne!(
            leaf(&renewed),
            leaf(&previous),
            "a renewal brings a new certificate"
        );
        assert!(renewed.not_after() > previous.not_after());
        previous = renewed;
    }
    assert!(
        cp.saw_token("token-2"),
        "the token file is re-read at every request"
    );
    task.abort();
}

#[tokio::test]
async fn keeps_serving_while_the_control_plane_is_down_and_renews_when_it_returns() {
    let scratch = Scratch::new("outage");
    let ca = TestCa::new("mesh");
    let client = IdentityStore::with_credentials(ca.credentials(
        &SpiffeId::new("cluster.local", "shop", "cart").unwrap(),
        Duration::from_secs(3600),
    ));
    let cp = ControlPlane::new(ca, Duration::from_secs(10), "token");
    let (addr, server) = cp.start((Ipv4Addr::LOCALHOST, 0).into()).await;

    let manager =
        CertManager::new(settings(&scratch, addr, &cp.ca.trust_bundle_pem(), "token")).unwrap();
    let store = manager.store().clone();
    let mut updates = store.subscribe();
    let task = tokio::spawn(manager.run());
    let first = next_credentials(&mut updates).await;

    // The control plane goes away; renewal at half-life (5 s) fails and is retried with backoff.
    server.abort();
    let _ = server.await;
    let requests_before = cp.tokens_seen.lock().unwrap().len();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        cp.tokens_seen.lock().unwrap().len(),
        requests_before,
        "the control plane was really down"
    );
    let kept = store.current().unwrap();
    assert_eq!(
        leaf(&kept),
        leaf(&first),
        "the still-valid certificate stays in use"
    );
    assert!(!updates.has_changed().unwrap());

    // Sidecars keep handshaking with it.
    let (echo, _outcomes) = spawn_echo_server(server_config(&store).unwrap()).await;
    let mut conn = EchoClient::connect(client_config(&client, web(), ALPN_MESH_H2).unwrap(), echo)
        .await
        .unwrap();
    assert_eq!(conn.echo("during outage").await.unwrap(), "during outage");

    // The control plane returns on the same address: the next retry renews.
    let (_, _server) = cp.start(addr).await;
    let renewed = next_credentials(&mut updates).await;
    assert_ne!(leaf(&renewed), leaf(&first));
    let conn = EchoClient::connect(client_config(&client, web(), ALPN_MESH_H2).unwrap(), echo)
        .await
        .unwrap();
    assert_eq!(
        conn.server_leaf().unwrap(),
        leaf(&renewed),
        "new connections use the renewed certificate"
    );
    task.abort();
}

#[tokio::test]
async fn refusals_and_untrusted_control_planes_are_reported() {
    let scratch = Scratch::new("refusals");
    let cp = ControlPlane::new(TestCa::new("mesh"), Duration::from_secs(3600), "good");
    let (addr, _server) = cp.start((Ipv4Addr::LOCALHOST, 0).into()).await;
    let anchors = cp.ca.trust_bundle_pem();

    let err = CertManager::new(settings(&scratch, addr, &anchors, "bad"))
        .unwrap()
        .request()
        .await
        .unwrap_err();
    match &err {
        ClientError::Refused { status, reason, .. } => {
            assert_eq!(*status, StatusCode::UNAUTHORIZED);
            assert_eq!(reason, "bad-credential");
        }
        other => panic!("expected a refusal, got {other}"),
    }

    // A control plane whose certificate does not chain to --trust-anchors is not talked to.
    let stranger = TestCa::new("stranger").trust_bundle_pem();
    let err = CertManager::new(settings(&scratch, addr, &stranger, "good"))
        .unwrap()
        .request()
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Tls { .. }), "{err}");
    assert!(
        cp.tokens_seen.lock().unwrap().iter().all(|t| t == "bad"),
        "no token was sent to an untrusted server"
    );

    // A missing token file is named.
    let mut no_token = settings(&scratch, addr, &anchors, "good");
    no_token.credential =
        meshlet::tls::client::Credential::TokenFile(scratch.0.join("missing-token"));
    let err = CertManager::new(no_token)
        .unwrap()
        .request()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("missing-token"), "{err}");

    // Nothing listening.
    let closed = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let err = CertManager::new(settings(&scratch, closed, &anchors, "good"))
        .unwrap()
        .request()
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");

    // And the good path through `request` alone.
    let credentials = CertManager::new(settings(&scratch, addr, &anchors, "good"))
        .unwrap()
        .request()
        .await
        .unwrap();
    assert_eq!(credentials.identity(), &web());
}
