//! The transport header of opaque mTLS connections between sidecars (ALPN `meshlet/tcp`).
//!
//! Right after the handshake the client sidecar sends one line, `MESHLET/1 <port> <protocol>\n`, where
//! `<port>` is the application port on the receiving pod and `<protocol>` is `tcp` (relay bytes) or
//! `http1` (an HTTP/1.1 connection that carries an upgrade, e.g. WebSocket). The receiving sidecar then
//! delivers to that port, with or without iptables. The line is at most [`MAX_HEADER`] bytes.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Longest transport header accepted.
pub const MAX_HEADER: usize = 64;

/// What follows the transport header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carried {
    /// Opaque bytes.
    Tcp,
    /// HTTP/1.1 (an upgrade or CONNECT-style stream that must not be multiplexed).
    Http1,
}

/// The target stated by the client sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportHeader {
    /// Application port on the receiving pod.
    pub port: u16,
    /// Protocol that follows.
    pub carried: Carried,
}

/// Why a transport header was refused.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The peer sent something else, or too much.
    #[error("malformed meshlet transport header: {0:?}")]
    Malformed(String),
    /// The connection ended or failed before the header was complete.
    #[error("reading meshlet transport header: {0}")]
    Io(#[from] std::io::Error),
}

impl TransportHeader {
    /// The bytes sent on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let carried = match self.carried {
            Carried::Tcp => "tcp",
            Carried::Http1 => "http1",
        };
        format!("MESHLET/1 {} {}\n", self.port, carried).into_bytes()
    }

    /// Reads the header byte by byte (it is tiny, and nothing after it may be consumed).
    pub async fn read<I: AsyncRead + Unpin>(io: &mut I) -> Result<Self, TransportError> {
        let mut line = Vec::with_capacity(32);
        loop {
            let byte = io.read_u8().await?;
            if byte == b'\n' {
                break;
            }
            line.push(byte);
            if line.len() > MAX_HEADER {
                return Err(TransportError::Malformed(
                    String::from_utf8_lossy(&line).into_owned(),
                ));
            }
        }
        let text = String::from_utf8_lossy(&line).into_owned();
        let malformed = || TransportError::Malformed(text.clone());
        let mut parts = text.split(' ');
        if parts.next() != Some("MESHLET/1") {
            return Err(malformed());
        }
        let port = parts
            .next()
            .and_then(|p| p.parse::<u16>().ok())
            .filter(|p| *p != 0)
            .ok_or_else(malformed)?;
        let carried = match parts.next() {
            Some("tcp") => Carried::Tcp,
            Some("http1") => Carried::Http1,
            _ => return Err(malformed()),
        };
        if parts.next().is_some() {
            return Err(malformed());
        }
        Ok(TransportHeader { port, carried })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trips_and_leaves_the_payload() {
        let header = TransportHeader {
            port: 6379,
            carried: Carried::Tcp,
        };
        let mut wire = header.encode();
        wire.extend_from_slice(b"PING\r\n");
        let mut io = &wire[..];
        assert_eq!(TransportHeader::read(&mut io).await.unwrap(), header);
        assert_eq!(io, b"PING\r\n");
    }

    #[tokio::test]
    async fn refuses_anything_else() {
        for bad in [
            &b"GET / HTTP/1.1\n"[..],
            b"MESHLET/1 0 tcp\n",
            b"MESHLET/1 80 udp\n",
            b"MESHLET/1 80 tcp x\n",
        ] {
            let mut io = bad;
            assert!(
                TransportHeader::read(&mut io).await.is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = [b'M'; 200];
        let mut io = &long[..];
        assert!(matches!(
            TransportHeader::read(&mut io).await,
            Err(TransportError::Malformed(_))
        ));
    }
}
