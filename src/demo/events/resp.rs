//! A tiny, bounded Redis client (RESP2) that talks through the app's sidecar.
//!
//! The shop's apps reach Redis the way they reach everything else: through their own sidecar, here as an
//! explicit-proxy `CONNECT` tunnel, which the sidecar carries over mTLS (ALPN `meshlet/tcp`) to the Redis
//! pod's sidecar. The `redis` crate dials its server itself, so it cannot ride on such a tunnel; the few
//! commands the demo needs (`PING`, `RPUSH`, `BLPOP`) fit in this file.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest reply line (`+OK`, `-ERR ...`, `:12`, a length header).
const MAX_LINE: usize = 4096;
/// Largest bulk string accepted.
const MAX_BULK: usize = 1 << 20;
/// Most elements in one array reply.
const MAX_ARRAY: usize = 64;
/// Deepest nesting of arrays.
const MAX_DEPTH: usize = 4;
/// Largest CONNECT response head from the sidecar.
const MAX_HEAD: usize = 8192;

/// What can go wrong talking to Redis.
#[derive(Debug, thiserror::Error)]
pub enum RespError {
    /// The connection failed or closed.
    #[error("redis connection: {0}")]
    Io(#[from] std::io::Error),
    /// The sidecar refused or failed the tunnel.
    #[error("the sidecar answered CONNECT with {0:?}")]
    Tunnel(String),
    /// The server sent something that is not RESP, or is larger than this client accepts.
    #[error("bad redis reply: {0}")]
    Protocol(&'static str),
    /// The server did not answer in time.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
}

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`
    Simple(String),
    /// `-ERR ...`
    Error(String),
    /// `:n`
    Integer(i64),
    /// `$n` bytes, or `$-1` (none).
    Bulk(Option<Vec<u8>>),
    /// `*n` replies, or `*-1` (none, e.g. a `BLPOP` that timed out).
    Array(Option<Vec<Reply>>),
}

/// Encodes a command as a RESP array of bulk strings.
pub fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Parses one reply from the start of `buf`: `Ok(None)` when more bytes are needed, else the reply and the
/// number of bytes it used.
pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, RespError> {
    parse_at(buf, 0)
}

fn parse_at(buf: &[u8], depth: usize) -> Result<Option<(Reply, usize)>, RespError> {
    if depth > MAX_DEPTH {
        return Err(RespError::Protocol("arrays nested too deep"));
    }
    let Some(end) = buf.windows(2).take(MAX_LINE).position(|w| w == b"\r\n") else {
        return if buf.len() > MAX_LINE {
            Err(RespError::Protocol("line too long"))
        } else {
            Ok(None)
        };
    };
    if end == 0 {
        return Err(RespError::Protocol("a reply without a type"));
    }
    let (kind, line) = (buf[0], &buf[1..end]);
    let text = std::str::from_utf8(line).map_err(|_| RespError::Protocol("line is not UTF-8"))?;
    let used = end + 2;
    let length = || -> Result<i64, RespError> {
        text.parse()
            .map_err(|_| RespError::Protocol("bad length or integer"))
    };
    match kind {
        b'+' => Ok(Some((Reply::Simple(text.to_string()), used))),
        b'-' => Ok(Some((Reply::Error(text.to_string()), used))),
        b':' => Ok(Some((Reply::Integer(length()?), used))),
        b'$' => {
            let n = length()?;
            if n < 0 {
                return Ok(Some((Reply::Bulk(None), used)));
            }
            let n = usize::try_from(n).map_err(|_| RespError::Protocol("bad length"))?;
            if n > MAX_BULK {
                return Err(RespError::Protocol("bulk string too large"));
            }
            if buf.len() < used + n + 2 {
                return Ok(None);
            }
            if &buf[used + n..used + n + 2] != b"\r\n" {
                return Err(RespError::Protocol("bulk string not terminated"));
            }
            Ok(Some((
                Reply::Bulk(Some(buf[used..used + n].to_vec())),
                used + n + 2,
            )))
        }
        b'*' => {
            let n = length()?;
            if n < 0 {
                return Ok(Some((Reply::Array(None), used)));
            }
            let n = usize::try_from(n).map_err(|_| RespError::Protocol("bad length"))?;
            if n > MAX_ARRAY {
                return Err(RespError::Protocol("array too long"));
            }
            let mut items = Vec::with_capacity(n);
            let mut at = used;
            for _ in 0..n {
                match parse_at(&buf[at..], depth + 1)? {
                    Some((item, len)) => {
                        items.push(item);
                        at += len;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Reply::Array(Some(items)), at)))
        }
        _ => Err(RespError::Protocol("unknown reply type")),
    }
}

/// A Redis connection through a `CONNECT` tunnel of the app's sidecar.
pub struct Connection {
    stream: TcpStream,
    buf: BytesMut,
}

impl Connection {
    /// Opens a tunnel to `redis` through `sidecar` (the app's outbound listener).
    pub async fn through_sidecar(
        sidecar: SocketAddr,
        redis: SocketAddr,
    ) -> Result<Connection, RespError> {
        let limit = Duration::from_secs(3);
        let mut stream = tokio::time::timeout(limit, TcpStream::connect(sidecar))
            .await
            .map_err(|_| RespError::Timeout(limit))??;
        stream.set_nodelay(true)?;
        stream
            .write_all(format!("CONNECT {redis} HTTP/1.1\r\nHost: {redis}\r\n\r\n").as_bytes())
            .await?;
        let mut buf = BytesMut::with_capacity(1024);
        let head_end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            if buf.len() > MAX_HEAD {
                return Err(RespError::Tunnel("a response head over 8 KiB".into()));
            }
            let n = tokio::time::timeout(limit, stream.read_buf(&mut buf))
                .await
                .map_err(|_| RespError::Timeout(limit))??;
            if n == 0 {
                return Err(RespError::Tunnel("connection closed".into()));
            }
        };
        let status = String::from_utf8_lossy(&buf[..head_end])
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        if status.split_whitespace().nth(1) != Some("200") {
            return Err(RespError::Tunnel(status));
        }
        buf.advance(head_end);
        Ok(Connection { stream, buf })
    }

    /// Sends one command and waits up to `limit` for its reply.
    pub async fn command(&mut self, args: &[&[u8]], limit: Duration) -> Result<Reply, RespError> {
        self.stream.write_all(&encode(args)).await?;
        tokio::time::timeout(limit, self.read_reply())
            .await
            .map_err(|_| RespError::Timeout(limit))?
    }

    async fn read_reply(&mut self) -> Result<Reply, RespError> {
        loop {
            if let Some((reply, used)) = parse(&self.buf)? {
                self.buf.advance(used);
                return Ok(reply);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(RespError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_commands_as_bulk_string_arrays() {
        assert_eq!(
            encode(&[b"RPUSH", b"k", b"v1"]),
            b"*3\r\n$5\r\nRPUSH\r\n$1\r\nk\r\n$2\r\nv1\r\n"
        );
    }

    #[test]
    fn parses_every_reply_kind_and_waits_for_partial_ones() {
        let blpop = b"*2\r\n$4\r\nlist\r\n$5\r\nhello\r\n";
        assert_eq!(
            parse(blpop).unwrap(),
            Some((
                Reply::Array(Some(vec![
                    Reply::Bulk(Some(b"list".to_vec())),
                    Reply::Bulk(Some(b"hello".to_vec()))
                ])),
                blpop.len()
            ))
        );
        for cut in 0..blpop.len() {
            assert_eq!(parse(&blpop[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert_eq!(
            parse(b"+PONG\r\n").unwrap(),
            Some((Reply::Simple("PONG".into()), 7))
        );
        assert_eq!(parse(b":42\r\n").unwrap(), Some((Reply::Integer(42), 5)));
        assert_eq!(parse(b"*-1\r\n").unwrap(), Some((Reply::Array(None), 5)));
        assert_eq!(parse(b"$-1\r\n").unwrap(), Some((Reply::Bulk(None), 5)));
        assert!(matches!(
            parse(b"-ERR wrong\r\n").unwrap(),
            Some((Reply::Error(e), _)) if e == "ERR wrong"
        ));
    }

    #[test]
    fn refuses_what_it_does_not_bound() {
        assert!(parse(b"$9999999999\r\n").is_err());
        assert!(parse(b"*100000\r\n").is_err());
        assert!(parse(b"?\r\n").is_err());
        assert!(parse(b"\r\n").is_err());
        assert!(parse(b"$3\r\nabcXY").is_err());
        assert!(parse(&[b'+'; MAX_LINE + 10]).is_err());
        let nested = "*1\r\n".repeat(MAX_DEPTH + 2);
        assert!(parse(nested.as_bytes()).is_err());
    }
}
