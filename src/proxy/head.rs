//! Checks the first request head of an HTTP/1 connection before hyper sees it.
//!
//! Doing it ourselves lets every refusal carry `x-meshlet-error`, and lets the proxy refuse what hyper would
//! quietly accept: `Content-Length` together with `Transfer-Encoding` (request smuggling), or conflicting
//! lengths. Later requests on a kept-alive connection are checked by hyper's own parser and limits.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use super::error::ProxyError;

/// Header fields accepted in one request head.
const MAX_HEADERS: usize = 128;

/// Reads until the end of the first request head (keeping every byte in `buf`) and validates it.
pub async fn read_first_head<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
    timeout: Duration,
    max_bytes: usize,
) -> Result<(), ProxyError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(end) = find_head_end(buf) {
            // A whole head can arrive in one read, so its size is checked here too, not only while waiting.
            if end > max_bytes {
                return Err(ProxyError::HeadersTooLarge(max_bytes));
            }
            return validate(&buf[..end]);
        }
        if buf.len() > max_bytes {
            return Err(ProxyError::HeadersTooLarge(max_bytes));
        }
        match tokio::time::timeout_at(deadline, io.read_buf(buf)).await {
            Err(_) => return Err(ProxyError::HeaderTimeout(timeout)),
            Ok(Ok(0)) => {
                return Err(ProxyError::MalformedRequest(
                    "connection closed in the middle of the request head",
                ))
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) => {
                return Err(ProxyError::MalformedRequest(
                    "connection failed in the middle of the request head",
                ))
            }
        }
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

fn validate(head: &[u8]) -> Result<(), ProxyError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(ProxyError::MalformedRequest("incomplete request head"))
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ProxyError::HeadersTooLarge(head.len()))
        }
        Err(_) => {
            return Err(ProxyError::MalformedRequest(
                "invalid request line or header field",
            ))
        }
    }
    let mut content_length: Option<&[u8]> = None;
    let mut transfer_encoding = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let value = h.value.trim_ascii();
            if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
                return Err(ProxyError::MalformedRequest("invalid Content-Length"));
            }
            if content_length.is_some_and(|first| first != value) {
                return Err(ProxyError::MalformedRequest(
                    "conflicting Content-Length values",
                ));
            }
            content_length = Some(value);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = true;
        }
    }
    if transfer_encoding && content_length.is_some() {
        return Err(ProxyError::AmbiguousLength);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn check(input: &'static [u8]) -> Result<(), ProxyError> {
        let mut io = input;
        let mut buf = BytesMut::new();
        read_first_head(&mut io, &mut buf, Duration::from_secs(1), 1024).await
    }

    #[tokio::test]
    async fn accepts_ordinary_heads_and_refuses_smuggling() {
        assert!(check(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.is_ok());
        assert!(
            check(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
                .await
                .is_ok()
        );
        let both =
            check(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")
                .await;
        assert!(matches!(both, Err(ProxyError::AmbiguousLength)));
        let twice =
            check(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n").await;
        assert!(matches!(twice, Err(ProxyError::MalformedRequest(_))));
        let bad = check(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n").await;
        assert!(matches!(bad, Err(ProxyError::MalformedRequest(_))));
        let truncated = check(b"GET / HTTP/1.1\r\nHost: a\r\n").await;
        assert!(matches!(truncated, Err(ProxyError::MalformedRequest(_))));
    }

    #[tokio::test]
    async fn refuses_oversized_heads() {
        let mut big = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 4096));
        let mut io = &big[..];
        let mut buf = BytesMut::new();
        let err = read_first_head(&mut io, &mut buf, Duration::from_secs(1), 1024)
            .await
            .unwrap_err();
        assert!(matches!(err, ProxyError::HeadersTooLarge(1024)));

        big.extend_from_slice(b"\r\n\r\n");
        let mut io = &big[..];
        let mut buf = BytesMut::new();
        let err = read_first_head(&mut io, &mut buf, Duration::from_secs(1), 1024)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ProxyError::HeadersTooLarge(1024)),
            "a complete head read at once is still measured: {err}"
        );
    }
}
