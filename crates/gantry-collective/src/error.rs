use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

/// A remote rank, named in errors so an operator knows which process to inspect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Peer {
    pub rank: usize,
    pub addr: SocketAddr,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rank {} ({})", self.rank, self.addr)
    }
}

/// Every failure of this crate.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("could not bind listen address {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },

    #[error("could not connect to {peer} within {timeout:?}: {source}")]
    ConnectTimeout {
        peer: Peer,
        timeout: Duration,
        #[source]
        source: io::Error,
    },

    #[error("{peer} (left neighbour) did not connect within {timeout:?}")]
    AcceptTimeout { peer: Peer, timeout: Duration },

    #[error("handshake with {peer} failed: {reason}")]
    Handshake { peer: Peer, reason: String },

    #[error("{peer} did not answer within {timeout:?} during {op}")]
    Timeout {
        peer: Peer,
        op: &'static str,
        timeout: Duration,
    },

    #[error("{peer} disconnected during {op}: {source}")]
    PeerDisconnected {
        peer: Peer,
        op: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("I/O error with {peer} during {op}: {source}")]
    Io {
        peer: Peer,
        op: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("buffer length mismatch with {peer}: ours has {ours} elements, theirs {theirs}")]
    LengthMismatch {
        peer: Peer,
        ours: usize,
        theirs: usize,
    },

    #[error("protocol mismatch with {peer}: {detail}")]
    Protocol { peer: Peer, detail: String },

    #[error("collective was aborted on this rank")]
    Aborted,

    #[error("collective is unusable after an earlier error: {0}")]
    Poisoned(String),

    #[error("NCCL backend unavailable: {0}")]
    NcclUnavailable(String),

    #[error("no CUDA device: {0}")]
    NoCudaDevice(String),

    #[error("NCCL call {call} failed: {detail}")]
    Nccl { call: &'static str, detail: String },

    #[error("CUDA call {call} failed: {detail}")]
    Cuda { call: &'static str, detail: String },
}

impl CollectiveError {
    /// Classifies a socket error so callers can tell a silent peer (timeout)
    /// from a dead one (reset/EOF).
    pub(crate) fn from_io(peer: Peer, op: &'static str, timeout: Duration, e: io::Error) -> Self {
        use io::ErrorKind as K;
        match e.kind() {
            K::WouldBlock | K::TimedOut => CollectiveError::Timeout { peer, op, timeout },
            K::UnexpectedEof
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::BrokenPipe
            | K::NotConnected => CollectiveError::PeerDisconnected {
                peer,
                op,
                source: e,
            },
            _ => CollectiveError::Io {
                peer,
                op,
                source: e,
            },
        }
    }
}
