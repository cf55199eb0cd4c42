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
///
/// Variants that wrap an [`io::Error`] expose it through [`std::error::Error::source`] and
/// leave it out of their own message (the Rust API guidelines' convention), so a report
/// that walks the chain, like anyhow's `{:#}`, names the I/O error once. Printing only the
/// top-level message (`{}`) therefore omits the I/O detail; code that keeps just one
/// string should walk the chain instead.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("could not bind listen address {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },

    #[error("could not connect to {peer} within {timeout:?}")]
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

    #[error("{peer} disconnected during {op}")]
    PeerDisconnected {
        peer: Peer,
        op: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("I/O error with {peer} during {op}")]
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

    /// An NCCL operation (or the communicator's creation) did not complete within
    /// the collective's timeout; the communicator has been aborted. NCCL does not say which
    /// rank is missing: the coordinator's view of every rank's sequence does.
    #[error(
        "NCCL {op} did not complete within {timeout:?} (a rank is missing or stuck); \
         the communicator was aborted"
    )]
    NcclTimeout { op: &'static str, timeout: Duration },
}

impl CollectiveError {
    /// This error's message followed by those of its sources, `: `-separated, for the
    /// places that keep a single string (the poisoned message, log fields).
    pub(crate) fn chain_text(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }

    /// The same error with every peer it names replaced by `rename(peer)`: the ring of host
    /// leaders numbers its ranks by host, and its errors must name the leaders' ranks of the
    /// group instead.
    pub(crate) fn renaming_peer(self, rename: impl Fn(Peer) -> Peer) -> Self {
        use CollectiveError as E;
        match self {
            E::ConnectTimeout {
                peer,
                timeout,
                source,
            } => E::ConnectTimeout {
                peer: rename(peer),
                timeout,
                source,
            },
            E::AcceptTimeout { peer, timeout } => E::AcceptTimeout {
                peer: rename(peer),
                timeout,
            },
            E::Handshake { peer, reason } => E::Handshake {
                peer: rename(peer),
                reason,
            },
            E::Timeout { peer, op, timeout } => E::Timeout {
                peer: rename(peer),
                op,
                timeout,
            },
            E::PeerDisconnected { peer, op, source } => E::PeerDisconnected {
                peer: rename(peer),
                op,
                source,
            },
            E::Io { peer, op, source } => E::Io {
                peer: rename(peer),
                op,
                source,
            },
            E::LengthMismatch { peer, ours, theirs } => E::LengthMismatch {
                peer: rename(peer),
                ours,
                theirs,
            },
            E::Protocol { peer, detail } => E::Protocol {
                peer: rename(peer),
                detail,
            },
            other => other,
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> Peer {
        Peer {
            rank: 1,
            addr: "127.0.0.1:7000".parse().unwrap(),
        }
    }

    #[test]
    fn io_detail_is_in_the_chain_not_in_the_message() {
        let reset = || io::Error::from(io::ErrorKind::ConnectionReset);
        let text = reset().to_string();
        let err = CollectiveError::from_io(peer(), "all-reduce", Duration::from_secs(1), reset());
        assert!(
            matches!(err, CollectiveError::PeerDisconnected { .. }),
            "{err}"
        );
        let message = err.to_string();
        assert_eq!(
            message,
            "rank 1 (127.0.0.1:7000) disconnected during all-reduce"
        );
        let chain = err.chain_text();
        assert_eq!(chain.matches(&text).count(), 1, "{chain}");
        assert!(chain.starts_with(&message), "{chain}");
    }
}
