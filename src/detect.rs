//! Protocol detection: what does the client speak on this connection?
//!
//! The proxy reads the client's first bytes (with a timeout, since server-speaks-first protocols send
//! nothing) and decides between HTTP/1, HTTP/2 with prior knowledge and opaque TCP. The bytes read are kept
//! and replayed through [`PrefixedIo`], so detection never loses data.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The longest request line we wait for before deciding the bytes are not HTTP.
const MAX_REQUEST_LINE: usize = 8192;

/// What the first bytes of a connection say about its protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// An HTTP/1.x request line.
    Http1,
    /// The HTTP/2 connection preface (h2c with prior knowledge, gRPC without TLS).
    H2,
    /// Anything else: the app's own TLS, a binary protocol, or silence until the timeout.
    Opaque,
}

impl Protocol {
    /// Label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::H2 => "h2",
            Protocol::Opaque => "opaque",
        }
    }
}

/// The outcome of detection, with every byte read so far.
#[derive(Debug)]
pub struct Detected {
    /// The decision.
    pub protocol: Protocol,
    /// Bytes consumed from the socket that must be replayed to whoever handles the connection.
    pub prefix: BytesMut,
    /// Whether the decision was forced by the timeout (nothing conclusive arrived in time).
    pub timed_out: bool,
    /// Whether the client closed its side before a decision.
    pub eof: bool,
}

/// Reads from `io` until the protocol is known, the deadline passes, or the client closes.
pub async fn detect<I: AsyncRead + Unpin>(io: &mut I, timeout: Duration) -> io::Result<Detected> {
    let deadline = Instant::now() + timeout;
    let mut prefix = BytesMut::with_capacity(1024);
    loop {
        if let Some(protocol) = classify(&prefix) {
            return Ok(Detected {
                protocol,
                prefix,
                timed_out: false,
                eof: false,
            });
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut prefix)).await {
            Err(_) => {
                return Ok(Detected {
                    protocol: Protocol::Opaque,
                    prefix,
                    timed_out: true,
                    eof: false,
                })
            }
            Ok(Ok(0)) => {
                return Ok(Detected {
                    protocol: Protocol::Opaque,
                    prefix,
                    timed_out: false,
                    eof: true,
                })
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// Decides from the bytes so far, or returns `None` when more bytes are needed.
fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    let preface_len = buf.len().min(H2_PREFACE.len());
    if buf[..preface_len] == H2_PREFACE[..preface_len] {
        // "PRI * HTTP/2.0" is also a prefix of nothing else we accept; wait for the whole preface.
        return (buf.len() >= H2_PREFACE.len()).then_some(Protocol::H2);
    }
    match buf.iter().position(|&b| b == b'\n') {
        Some(end) => Some(if is_http1_request_line(&buf[..end]) {
            Protocol::Http1
        } else {
            Protocol::Opaque
        }),
        None if buf.len() >= MAX_REQUEST_LINE || !plausible_request_line_prefix(buf) => {
            Some(Protocol::Opaque)
        }
        None => None,
    }
}

/// `METHOD SP request-target SP HTTP/1.x` (RFC 9112 §3), with an optional trailing CR.
fn is_http1_request_line(line: &[u8]) -> bool {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    !method.is_empty()
        && method.iter().all(|&b| is_token_char(b))
        && !target.is_empty()
        && target.iter().all(|&b| b > b' ' && b != 0x7f)
        && (version == b"HTTP/1.1" || version == b"HTTP/1.0")
}

/// Whether `buf` could still become a request line: a method token, then the rest of a line.
fn plausible_request_line_prefix(buf: &[u8]) -> bool {
    match buf.iter().position(|&b| b == b' ') {
        None => buf.len() <= 32 && buf.iter().all(|&b| is_token_char(b)),
        Some(0) => false,
        Some(sp) => {
            buf[..sp].iter().all(|&b| is_token_char(b))
                && buf[sp + 1..]
                    .iter()
                    .all(|&b| b >= b' ' && b != 0x7f || b == b'\r')
        }
    }
}

/// RFC 9110 `tchar`.
fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// An IO whose first reads return bytes that were already read from the inner IO.
#[derive(Debug)]
pub struct PrefixedIo<I> {
    prefix: Bytes,
    inner: I,
}

impl<I> PrefixedIo<I> {
    /// Replays `prefix` before reading from `inner`.
    pub fn new(prefix: Bytes, inner: I) -> Self {
        Self { prefix, inner }
    }

    /// The wrapped IO.
    pub fn get_ref(&self) -> &I {
        &self.inner
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for PrefixedIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for PrefixedIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: a\r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(
            classify(b"POST http://x:1/a?b HTTP/1.0\r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(
            classify(b"CONNECT x:443 HTTP/1.1\r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(H2_PREFACE), Some(Protocol::H2));
        assert_eq!(classify(&H2_PREFACE[..10]), None);
        assert_eq!(classify(b"GET /inde"), None);
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(Protocol::Opaque));
        assert_eq!(classify(b"*2\r\n$4\r\nPING\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"GET / SPDY/3\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"\x00\x01garbage"), Some(Protocol::Opaque));
        assert_eq!(classify(&[b'A'; 40]), Some(Protocol::Opaque));
    }

    #[tokio::test]
    async fn detection_keeps_every_byte_and_times_out_on_silence() {
        let (mut client, mut server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"GET / HTTP/1.1\r\n")
            .await
            .unwrap();
        let detected = detect(&mut server, Duration::from_secs(5)).await.unwrap();
        assert_eq!(detected.protocol, Protocol::Http1);
        let mut replay = PrefixedIo::new(detected.prefix.freeze(), server);
        let mut line = [0u8; 16];
        replay.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"GET / HTTP/1.1\r\n");

        let (_quiet, mut server) = tokio::io::duplex(64);
        let detected = detect(&mut server, Duration::from_millis(20))
            .await
            .unwrap();
        assert!(detected.timed_out && detected.prefix.is_empty());
        assert_eq!(detected.protocol, Protocol::Opaque);
    }
}
