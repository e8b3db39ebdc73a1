//! Loopback ports for tests that stop and restart a server on the same address.

/// A loopback port held for the whole test: bound with `SO_REUSEADDR` but not listening. Nothing
/// else is given the port (so it cannot be taken between a kill and a restart), a connection to
/// it is refused while nobody listens, and a server of ours may listen on it at any time
/// (tokio's `TcpListener::bind` sets `SO_REUSEADDR`; Linux refuses such a bind only while
/// another socket *listens* on the address).
pub struct PortReservation {
    _socket: tokio::net::TcpSocket,
    /// The reserved address.
    pub addr: std::net::SocketAddr,
}

/// Reserves a free loopback port ([`PortReservation`]).
pub fn reserve_port() -> PortReservation {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    PortReservation {
        _socket: socket,
        addr,
    }
}
