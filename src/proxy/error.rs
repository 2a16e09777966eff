//! Errors the proxy itself answers, each with its status code and the `x-meshlet-error` reason.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::Body;

/// The header that tells a caller the response was made by meshlet, and why.
pub const ERROR_HEADER: &str = "x-meshlet-error";

/// A request the proxy could not forward.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request head breaks HTTP/1.1 framing rules (RFC 9112).
    #[error("malformed request: {0}")]
    MalformedRequest(&'static str),
    /// Both `Content-Length` and `Transfer-Encoding`: refused, since two parsers may frame it differently.
    #[error("request has both Content-Length and Transfer-Encoding")]
    AmbiguousLength,
    /// The client's request body broke off or had invalid chunked encoding.
    #[error("malformed request body: {0}")]
    MalformedBody(hyper::Error),
    /// The request head did not arrive in time (a slowloris client, or one that stopped mid-head).
    #[error("request head not received within {0:?}")]
    HeaderTimeout(Duration),
    /// The request head exceeded the configured limit.
    #[error("request head larger than {0} bytes")]
    HeadersTooLarge(usize),
    /// A request to the explicit proxy that does not say where it goes.
    #[error("explicit proxy request without an absolute http:// URI or CONNECT authority: {0}")]
    NotAProxyRequest(String),
    /// The destination's name did not resolve.
    #[error("could not resolve {host}: {reason}")]
    Resolve {
        /// The name asked for.
        host: String,
        /// The resolver's answer.
        reason: String,
    },
    /// Nothing listens at the destination.
    #[error("upstream {0} refused the connection")]
    ConnectRefused(SocketAddr),
    /// Connecting failed for another reason (unreachable, reset).
    #[error("connecting to upstream {0} failed: {1}")]
    Connect(SocketAddr, io::Error),
    /// The upstream did not accept the connection in time.
    #[error("connecting to upstream {0} timed out after {1:?}")]
    ConnectTimeout(SocketAddr, Duration),
    /// The upstream accepted the request but did not start a response in time.
    #[error("upstream {0} did not respond within {1:?}")]
    ResponseTimeout(SocketAddr, Duration),
    /// The upstream closed or reset the connection before a response.
    #[error("upstream {0} failed before responding: {1}")]
    UpstreamReset(SocketAddr, hyper::Error),
    /// The mTLS handshake with the destination's sidecar failed (wrong identity, untrusted CA, expired).
    #[error("mTLS handshake with {0} failed: {1}")]
    TlsHandshake(SocketAddr, io::Error),
    /// The sidecar has no usable TLS configuration for the destination.
    #[error("no mTLS configuration: {0}")]
    TlsConfig(String),
    /// The destination's inbound rules refuse the caller.
    #[error("caller {0} is not allowed by the destination's inbound rules")]
    Unauthorized(String),
    /// A request between sidecars without a valid target port.
    #[error(
        "mesh request without a valid {} header",
        super::mesh::TARGET_PORT_HEADER
    )]
    MissingTarget,
    /// A service's virtual address was dialed but no endpoint listens on its port.
    #[error("service at {0} has no endpoints")]
    NoEndpoints(SocketAddr),
    /// A plaintext connection addressed to the proxy's own inbound port: forwarding it would loop.
    #[error("connection addressed to the proxy itself")]
    Loop,
}

impl ProxyError {
    /// The status code the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::MalformedRequest(_)
            | ProxyError::AmbiguousLength
            | ProxyError::MalformedBody(_)
            | ProxyError::NotAProxyRequest(_)
            | ProxyError::MissingTarget => StatusCode::BAD_REQUEST,
            ProxyError::Unauthorized(_) => StatusCode::FORBIDDEN,
            ProxyError::HeaderTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::Resolve { .. }
            | ProxyError::ConnectRefused(_)
            | ProxyError::Connect(..)
            | ProxyError::UpstreamReset(..)
            | ProxyError::TlsHandshake(..)
            | ProxyError::TlsConfig(_)
            | ProxyError::Loop => StatusCode::BAD_GATEWAY,
            ProxyError::NoEndpoints(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::ConnectTimeout(..) | ProxyError::ResponseTimeout(..) => {
                StatusCode::GATEWAY_TIMEOUT
            }
        }
    }

    /// The `x-meshlet-error` value and metrics label: short, stable, bounded.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::MalformedRequest(_) => "malformed-request",
            ProxyError::AmbiguousLength => "content-length-and-transfer-encoding",
            ProxyError::MalformedBody(_) => "malformed-body",
            ProxyError::HeaderTimeout(_) => "header-read-timeout",
            ProxyError::HeadersTooLarge(_) => "headers-too-large",
            ProxyError::NotAProxyRequest(_) => "not-a-proxy-request",
            ProxyError::Resolve { .. } => "dns-failure",
            ProxyError::ConnectRefused(_) => "connect-refused",
            ProxyError::Connect(..) => "connect-failed",
            ProxyError::ConnectTimeout(..) => "connect-timeout",
            ProxyError::ResponseTimeout(..) => "response-timeout",
            ProxyError::UpstreamReset(..) => "upstream-reset",
            ProxyError::TlsHandshake(..) => "tls-handshake-failed",
            ProxyError::TlsConfig(_) => "tls-config",
            ProxyError::Unauthorized(_) => "unauthorized",
            ProxyError::MissingTarget => "missing-target",
            ProxyError::NoEndpoints(_) => "no-endpoints",
            ProxyError::Loop => "loop",
        }
    }

    /// Classifies a failed TCP connect.
    pub fn from_connect(addr: SocketAddr, e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::ConnectionRefused {
            ProxyError::ConnectRefused(addr)
        } else {
            ProxyError::Connect(addr, e)
        }
    }

    /// The response the client sees: the status, the reason header and a one-line text body.
    pub fn to_response(&self) -> Response<Body> {
        let body = format!("meshlet: {}: {}\n", self.reason(), self);
        let mut rsp = Response::new(
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed(),
        );
        *rsp.status_mut() = self.status();
        let headers = rsp.headers_mut();
        headers.insert(ERROR_HEADER, HeaderValue::from_static(self.reason()));
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        rsp
    }

    /// The same answer as raw HTTP/1.1 bytes, for errors found before hyper owns the connection.
    pub fn to_http1_bytes(&self) -> Vec<u8> {
        let body = format!("meshlet: {}: {}\n", self.reason(), self);
        let status = self.status();
        format!(
            "HTTP/1.1 {} {}\r\n{ERROR_HEADER}: {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            self.reason(),
            body.len(),
            body
        )
        .into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_answer_is_valid_http() {
        let bytes = ProxyError::HeadersTooLarge(65536).to_http1_bytes();
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut rsp = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(head) = rsp.parse(&bytes).unwrap() else {
            panic!("partial")
        };
        assert_eq!(rsp.code, Some(431));
        let len: usize = std::str::from_utf8(
            rsp.headers
                .iter()
                .find(|h| h.name == "content-length")
                .unwrap()
                .value,
        )
        .unwrap()
        .parse()
        .unwrap();
        assert_eq!(bytes.len() - head, len);
        assert!(rsp
            .headers
            .iter()
            .any(|h| h.name == ERROR_HEADER && h.value == b"headers-too-large"));
    }
}
