//! Application health probes forwarded through the admin port.
//!
//! The injector points the kubelet's `httpGet` probes at `/app-health/<container>/<livez|readyz|startupz>`
//! on the admin port (never redirected, so probes keep working when the service accepts only mTLS) and hands
//! the original targets to the proxy in `MESHLET_APP_PROBES`. This module calls the application on
//! `127.0.0.1:<port><path>` and answers with its status, as the kubelet would have seen it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::inject::probes::ProbeTarget;

/// The kubelet's default probe timeout is one second; the proxy allows a little more for its own hop.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The rewritten probes, by admin path.
pub type AppProbes = BTreeMap<String, ProbeTarget>;

/// Calls the application for the probe at `path`; `None` when no such probe was rewritten.
pub async fn check(probes: &AppProbes, path: &str) -> Option<(StatusCode, String)> {
    let target = probes.get(path)?;
    let result = tokio::time::timeout(PROBE_TIMEOUT, call(target)).await;
    Some(match result {
        Ok(Ok(status)) => (status, format!("application answered {status}\n")),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("application probe failed: {e}\n"),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("application probe timed out after {PROBE_TIMEOUT:?}\n"),
        ),
    })
}

async fn call(
    target: &ProbeTarget,
) -> Result<StatusCode, Box<dyn std::error::Error + Send + Sync>> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", target.port)).await?;
    let mut req = Request::get(target.path.as_str())
        .header(http::header::HOST, format!("127.0.0.1:{}", target.port));
    for header in &target.headers {
        if let (Some(name), Some(value)) = (
            header.get("name").and_then(|v| v.as_str()),
            header.get("value").and_then(|v| v.as_str()),
        ) {
            req = req.header(name, value);
        }
    }
    let req = req
        .header(http::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())?;
    if target.scheme.eq_ignore_ascii_case("https") {
        // Like the kubelet, an HTTPS probe does not verify the application's certificate.
        let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate))
            .with_no_client_auth();
        let name = ServerName::try_from("localhost")?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await?;
        send(tls, req).await
    } else {
        send(tcp, req).await
    }
}

async fn send<I>(
    io: I,
    req: Request<Empty<Bytes>>,
) -> Result<StatusCode, Box<dyn std::error::Error + Send + Sync>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    Ok(sender.send_request(req).await?.status())
}

/// Accepts any server certificate: only for probing the pod's own application on loopback.
#[derive(Debug)]
struct AcceptAnyCertificate;

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        crate::tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
