//! Binding listeners and finding out where a redirected connection was going.
//!
//! iptables `REDIRECT` rewrites the destination of a connection to the proxy's port; the kernel keeps the
//! original destination in conntrack, where `SO_ORIGINAL_DST` (IPv4) and `IP6T_SO_ORIGINAL_DST` (IPv6) read it.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

/// Why a listener could not be bound; start-up stops with this message.
#[derive(Debug, thiserror::Error)]
#[error("failed to bind {name} listener to {addr}: {source}")]
pub struct BindError {
    /// Which listener (outbound, inbound, admin), so the message points at the setting to fix.
    pub name: &'static str,
    /// The address from the configuration.
    pub addr: SocketAddr,
    /// What the kernel said.
    pub source: io::Error,
}

/// Binds a TCP listener with the options every meshlet listener wants.
///
/// `SO_REUSEADDR` lets a restarted proxy bind while old connections sit in TIME_WAIT; IPv6 listeners are
/// v6-only so that `0.0.0.0` and `[::]` can be bound side by side.
pub fn bind(name: &'static str, addr: SocketAddr) -> Result<TcpListener, BindError> {
    let std = bind_std(name, addr)?;
    TcpListener::from_std(std).map_err(|source| BindError { name, addr, source })
}

/// Like [`bind`], for a listener that another runtime (the admin thread's) will adopt.
pub fn bind_std(name: &'static str, addr: SocketAddr) -> Result<std::net::TcpListener, BindError> {
    let wrap = |source| BindError { name, addr, source };
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(wrap)?;
    socket.set_reuse_address(true).map_err(wrap)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true).map_err(wrap)?;
    }
    socket.set_nonblocking(true).map_err(wrap)?;
    socket.bind(&addr.into()).map_err(wrap)?;
    socket.listen(4096).map_err(wrap)?;
    Ok(socket.into())
}

/// Where an accepted connection was headed before iptables redirected it to us.
///
/// Returns `None` when the connection was not redirected: there is no NAT entry (`ENOENT`), or the
/// original destination is the listener itself. Such a client talks to the proxy on purpose.
pub fn original_dst(stream: &TcpStream) -> io::Result<Option<SocketAddr>> {
    let local = stream.local_addr()?;
    let sock = SockRef::from(stream);
    let found = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    match found {
        Ok(addr) => {
            let addr = addr.as_socket().ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "original destination is not an IP address",
                )
            })?;
            Ok((addr != local).then_some(addr))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Connects to an upstream with `TCP_NODELAY`, since proxied requests are small writes that must not wait.
pub async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_direct_connection_has_no_original_destination() {
        let listener = bind("test", "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        assert_eq!(original_dst(&server).unwrap(), None);
        drop(client);
    }

    #[test]
    fn bind_error_names_the_listener_and_address() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let first = bind("admin", "127.0.0.1:0".parse().unwrap()).unwrap();
            let taken = first.local_addr().unwrap();
            let std = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let busy = std.local_addr().unwrap();
            let _ = taken;
            // SO_REUSEADDR does not allow two listeners on one port.
            let err = bind("inbound", busy).unwrap_err().to_string();
            assert!(
                err.contains("inbound") && err.contains(&busy.to_string()),
                "{err}"
            );
        });
    }
}
