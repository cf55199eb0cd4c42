//! CPU ring backend: bandwidth-optimal all-reduce over TCP.
//!
//! Topology: rank `r` connects to its right neighbour `(r + 1) % n` and accepts
//! from its left neighbour `(r + n - 1) % n`; data only ever flows rightwards.
//!
//! Concurrency: for each operation a scoped sender thread writes chunks to the
//! right while the calling thread reads chunks from the left and reduces them.
//! Chunks are disjoint `&mut` sub-slices of the caller's buffer that travel to
//! the sender thread and back over channels, so the whole pipeline is safe Rust
//! with no copies other than the socket reads and writes themselves and no
//! allocation per chunk. Because the sender never waits for the receiver
//! (except for data it has not produced yet), a rank cannot deadlock with a
//! blocking send while its neighbour does the same, whatever the buffer size.
//!
//! With [`RingConfig::shared_memory`], joining picks one of three all-reduce paths
//! ([`AllReducePath`]; the crate docs give the summation orders): every rank learns every
//! rank's host ([`RingConfig::host`]) over this ring; all on one host → one shared region
//! (`shm.rs`); several hosts, one of them with two ranks or more → hierarchical: a region per
//! host, and a second ring of the hosts' leaders (their lowest ranks) between the reduction in
//! and the result out of each region; otherwise, or when any rank cannot join its region or
//! the leaders cannot form their ring (one all-reduce over this ring votes, so the decision is
//! unanimous), this TCP ring. Broadcasts, barriers' liveness and failure propagation keep
//! using this ring's connections whatever the path.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Mutex, PoisonError, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, SockRef, Socket, Type};

use crate::abort::AbortHandle;
use crate::shm::{self, PieceLayout, SharedRegion, WaitError};
use crate::wire::{
    ACK_LEN, Ack, HEADER_LEN, HELLO_LEN, Header, Hello, NONCE_LEN, OpKind, PROOF_LEN, Side,
    VERSION, derived_secret, proof, proven,
};
use crate::{Collective, CollectiveError, GradientPiece, Peer, ReduceOp, all_reduce_gathered};

/// Default size of the pieces the ring pipelines. Small enough that the
/// first chunk starts travelling on to the next rank quickly, large enough
/// that per-chunk syscalls and channel hand-offs stay negligible.
pub const DEFAULT_CHUNK_BYTES: usize = 256 * 1024;
/// Default `SO_SNDBUF`/`SO_RCVBUF`; Linux caps it at `net.core.{w,r}mem_max`.
/// Well above the kernel's starting sizes and enough for the bandwidth-delay
/// product of a 10-25 Gb/s datacenter link, yet small enough that in-flight
/// data stays in cache: on loopback 512 KiB beat 4 MiB (docs/allreduce.md).
pub const DEFAULT_SOCKET_BUFFER_BYTES: usize = 512 << 10;
/// Default for [`RingConfig::timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Derives the leaders' ring secret from the group's (see [`derived_secret`]): a leader's
/// handshake proves the group's secret as strongly as the group's ring does, yet neither ring
/// accepts a proof made for the other.
const LEADERS_SECRET_LABEL: &[u8] = b"gantry ring: host leaders";

/// How to build a [`RingCollective`].
#[derive(Debug, Clone)]
pub struct RingConfig {
    /// This process's rank, in `0..world_size`.
    pub rank: usize,
    pub world_size: usize,
    /// One listen address per rank; this rank listens on `peers[rank]` (unless
    /// given a listener) and connects to `peers[(rank + 1) % world_size]`.
    pub peers: Vec<SocketAddr>,
    /// Limit for connecting (the neighbour may start later) and for every
    /// blocking socket read or write afterwards. It must exceed the largest
    /// expected skew between ranks reaching the same collective.
    pub timeout: Duration,
    /// Pipelining granularity (rounded down to whole `f32`s, at least one).
    /// Ranks may use different values; it does not change the wire format.
    pub chunk_bytes: usize,
    /// Identifies one job; a rank from another job (a stale process, a
    /// mistyped address) is refused at the handshake.
    pub session_id: u64,
    /// The ring secret (a coordinator hands out a fresh one per generation in its
    /// authenticated Join reply). Each handshake proves that both neighbours hold it
    /// (HMAC-SHA256 over both identities and both nonces), so a connection from anyone
    /// else, however well it imitates a rank, is dropped. Empty: the proof is computed with
    /// an empty key, which anyone can, so only the session id separates jobs.
    pub secret: Vec<u8>,
    /// `SO_SNDBUF`/`SO_RCVBUF` to request, or `None` for kernel autotuning.
    pub socket_buffer_bytes: Option<usize>,
    /// All-reduce through shared memory when every rank is on this machine and can map the
    /// same region (see `shm.rs`); otherwise, and for broadcasts, the TCP ring. Every rank
    /// must pass the same value.
    pub shared_memory: bool,
    /// Size of each rank's two shared-memory slots; larger all-reduces go in pieces.
    pub shared_memory_slot_bytes: usize,
    /// With [`Self::shared_memory`]: the host this rank claims to be on. Ranks that claim the
    /// same host are grouped to share memory (and, when there are several hosts, to reduce
    /// through their host's region before their leader talks to the other hosts). `None`
    /// claims this machine's identity (hostname and boot id). Set it where that is not
    /// distinctive (containers with one hostname on several machines) or to simulate hosts
    /// (tests, benchmarks). A claim cannot make ranks on different machines share memory: the
    /// region is only mapped where the machine's own identity matches its creator's, and
    /// otherwise every rank stays on the TCP ring.
    pub host: Option<String>,
}

impl RingConfig {
    /// A config with the defaults above and session id 0.
    pub fn new(rank: usize, world_size: usize, peers: Vec<SocketAddr>) -> Self {
        RingConfig {
            rank,
            world_size,
            peers,
            timeout: DEFAULT_TIMEOUT,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            session_id: 0,
            secret: Vec::new(),
            socket_buffer_bytes: Some(DEFAULT_SOCKET_BUFFER_BYTES),
            shared_memory: false,
            shared_memory_slot_bytes: shm::DEFAULT_SLOT_BYTES,
            host: None,
        }
    }

    fn validate(&self) -> Result<(), CollectiveError> {
        let bad = |m: String| Err(CollectiveError::InvalidArgument(m));
        if self.world_size == 0 {
            return bad("world_size must be at least 1".into());
        }
        if u32::try_from(self.world_size).is_err() {
            return bad(format!("world_size {} is too large", self.world_size));
        }
        if self.rank >= self.world_size {
            return bad(format!(
                "rank {} is out of range for world_size {}",
                self.rank, self.world_size
            ));
        }
        if self.peers.len() != self.world_size {
            return bad(format!(
                "{} peer addresses given for world_size {}",
                self.peers.len(),
                self.world_size
            ));
        }
        if self.chunk_bytes < size_of::<f32>() {
            return bad(format!("chunk_bytes {} is below 4", self.chunk_bytes));
        }
        if self.timeout.is_zero() {
            return bad("timeout must be positive".into());
        }
        if self.shared_memory
            && (self.shared_memory_slot_bytes < 64
                || !self.shared_memory_slot_bytes.is_multiple_of(64))
        {
            return bad(format!(
                "shared_memory_slot_bytes {} is not a positive multiple of 64",
                self.shared_memory_slot_bytes
            ));
        }
        if self.host.as_deref() == Some("") {
            return bad("host must not be empty (None claims this machine)".into());
        }
        Ok(())
    }
}

/// Which way a [`RingCollective`]'s all-reduces (and barriers) go; see the crate docs for each
/// path's summation order. Broadcasts always travel the TCP ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AllReducePath {
    /// The TCP ring: reduce-scatter, then all-gather.
    Tcp,
    /// One shared-memory region: every rank is on one host.
    SharedMemory,
    /// A region per host, joined by a TCP ring of the hosts' leaders.
    Hierarchical {
        /// Number of hosts (the leaders' ring's size).
        hosts: usize,
    },
}

/// How logs and metrics name the path: `tcp`, `shared-memory`, `hierarchical(2 hosts)`.
impl std::fmt::Display for AllReducePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AllReducePath::Tcp => f.write_str("tcp"),
            AllReducePath::SharedMemory => f.write_str("shared-memory"),
            AllReducePath::Hierarchical { hosts } => write!(f, "hierarchical({hosts} hosts)"),
        }
    }
}

/// The chosen path, with what it needs.
#[derive(Debug)]
enum Route {
    Tcp,
    SharedMemory(SharedRegion),
    Hierarchical(Box<Hierarchy>),
}

/// One rank's part of the hierarchical all-reduce.
#[derive(Debug)]
struct Hierarchy {
    /// This host's ranks in rank order; the index is the local rank in `region`, and the first
    /// (the lowest rank) leads.
    host_ranks: Vec<usize>,
    /// This host's region; `None` when this rank is alone on its host.
    region: Option<SharedRegion>,
    /// Every host's leader, by host index (hosts numbered by their lowest rank): the ranks of
    /// the leaders' ring.
    leader_ranks: Vec<usize>,
    /// On the leader only: the ring of the hosts' leaders, rank = host index. It shares this
    /// collective's abort handle (its sockets are registered there too) and timeout.
    leaders: Option<Box<RingCollective>>,
    /// Elements per piece: `shared_memory_slot_bytes / 4`, the same on every rank.
    piece_elems: usize,
    /// Whether the left and right ring neighbours are on other hosts.
    neighbour_elsewhere: [bool; 2],
}

/// Where the gathered host claims point (see [`plan_hosts`]).
#[derive(Debug, PartialEq, Eq)]
enum HostPlan {
    OneHost,
    /// The ranks of each host, hosts in the order of their lowest ranks.
    Hierarchical(Vec<Vec<usize>>),
    Tcp(&'static str),
}

/// Groups ranks by the host they claim (each claim is `"<slot bytes>\n<host>"`). Every rank
/// computes this from the same gathered bytes, so every rank reaches the same plan.
fn plan_hosts(claims: &[Vec<u8>]) -> HostPlan {
    let mut slots: Option<&[u8]> = None;
    let mut slots_differ = false;
    let mut groups: Vec<(&[u8], Vec<usize>)> = Vec::new();
    for (rank, claim) in claims.iter().enumerate() {
        let Some(split) = claim.iter().position(|&b| b == b'\n') else {
            return HostPlan::Tcp("a rank's host claim is malformed");
        };
        let (slot, host) = (&claim[..split], &claim[split + 1..]);
        slots_differ |= *slots.get_or_insert(slot) != slot;
        match groups.iter_mut().find(|(h, _)| *h == host) {
            Some((_, ranks)) => ranks.push(rank),
            None => groups.push((host, vec![rank])),
        }
    }
    if groups.len() <= 1 {
        return HostPlan::OneHost;
    }
    if slots_differ {
        return HostPlan::Tcp("the ranks' shared_memory_slot_bytes differ");
    }
    if groups.iter().all(|(_, ranks)| ranks.len() == 1) {
        return HostPlan::Tcp("every rank is alone on its host");
    }
    if groups.iter().any(|(_, ranks)| ranks.len() > shm::MAX_RANKS) {
        return HostPlan::Tcp("a host has more ranks than a shared region holds");
    }
    HostPlan::Hierarchical(groups.into_iter().map(|(_, ranks)| ranks).collect())
}

/// Removes a region's file when dropped: once every rank has mapped it (or given up) the name
/// is no longer needed, and the mappings stay valid.
struct RegionFile(Option<std::path::PathBuf>);

impl Drop for RegionFile {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[derive(Debug)]
struct Links {
    right: TcpStream,
    left: TcpStream,
    right_peer: Peer,
    left_peer: Peer,
}

impl Links {
    fn neighbour(&self, left: bool) -> Peer {
        if left {
            self.left_peer
        } else {
            self.right_peer
        }
    }

    /// Both directions, both neighbours: the left one sees EOF when writing
    /// to us, the right one EOF when reading, so both fail promptly.
    fn shutdown(&self) {
        let _ = self.right.shutdown(Shutdown::Both);
        let _ = self.left.shutdown(Shutdown::Both);
    }
}

/// A rank of a TCP ring. See the [module docs](self) and [`Collective`].
#[derive(Debug)]
pub struct RingCollective {
    rank: usize,
    world_size: usize,
    timeout: Duration,
    chunk_elems: usize,
    /// `None` when `world_size == 1`: every operation is then local.
    links: Option<Links>,
    abort: AbortHandle,
    seq: u64,
    /// Set by the first failed operation; later calls fail fast with it.
    poisoned: Option<String>,
    /// Connections to the ring port dropped at the handshake (not a rank of this group, or
    /// no proof of the ring secret).
    strangers: u64,
    /// Receive buffer for the reduce-scatter phase, kept across calls.
    scratch: Vec<f32>,
    /// Every rank's listen address, to name peers in errors.
    peers: Vec<SocketAddr>,
    /// How all-reduces go (decided when joining).
    route: Route,
}

impl RingCollective {
    /// Binds `peers[rank]`, then joins the ring as [`Self::from_listener`] does.
    pub fn connect(config: RingConfig) -> Result<Self, CollectiveError> {
        config.validate()?;
        if config.world_size == 1 {
            return Self::single(&config);
        }
        let listener = bind_listener(config.peers[config.rank], config.socket_buffer_bytes)?;
        Self::from_listener(listener, config)
    }

    /// Joins the ring using an already bound listener (so tests and launchers
    /// can bind port 0 first and then share the real addresses). `peers[rank]`
    /// is only what the other ranks dial; it is not bound again.
    ///
    /// Retries connecting to the right neighbour until `config.timeout`, since
    /// it may start later, and verifies both neighbours' rank, world size and
    /// session id.
    pub fn from_listener(
        listener: TcpListener,
        config: RingConfig,
    ) -> Result<Self, CollectiveError> {
        config.validate()?;
        if config.world_size == 1 {
            return Self::single(&config);
        }
        let n = config.world_size;
        let rank = config.rank;
        let deadline = Instant::now() + config.timeout;
        let right_rank = (rank + 1) % n;
        let left_rank = (rank + n - 1) % n;
        let right_peer = Peer {
            rank: right_rank,
            addr: config.peers[right_rank],
        };
        let left_peer = Peer {
            rank: left_rank,
            addr: config.peers[left_rank],
        };
        let me = Hello {
            version: VERSION,
            rank: rank as u32,
            world_size: n as u32,
            session_id: config.session_id,
        };

        // The two halves run at once: this thread dials the right neighbour and completes
        // that handshake (hello, its answer and proof, our proof) while another accepts the
        // left one. Each acceptor answers as soon as it is dialled and each dialer proves
        // itself as soon as it is answered, so no rank waits in a cycle. (The acceptor thread
        // ends by itself at the deadline if this side fails first.)
        let acceptor = {
            let config = config.clone();
            thread::Builder::new()
                .name("ring-accept".into())
                .spawn(move || accept_left(&listener, left_peer, me, &config, deadline))
                .map_err(|e| io_err(left_peer, "accept", e))?
        };
        let mut right = connect_with_retry(right_peer, &config, deadline)?;
        let my_nonce: [u8; NONCE_LEN] = rand::random();
        let mut hello = me.encode().to_vec();
        hello.extend_from_slice(&my_nonce);
        write_all_until(&mut right, &hello, right_peer, deadline)?;

        let mut answer = [0u8; ACK_LEN + NONCE_LEN + PROOF_LEN];
        read_exact_until(&mut right, &mut answer, right_peer, deadline)?;
        let (ack, rest) = answer.split_at(ACK_LEN);
        let (their_nonce, their_proof) = rest.split_at(NONCE_LEN);
        let their_nonce: [u8; NONCE_LEN] = their_nonce.try_into().unwrap_or_default();
        let their_proof: [u8; PROOF_LEN] = their_proof.try_into().unwrap_or_default();
        let Some(ack) = Ack::decode(ack.try_into().unwrap_or(&[0u8; ACK_LEN])) else {
            return Err(CollectiveError::Handshake {
                peer: right_peer,
                reason: "answer is not a Gantry collective handshake".into(),
            });
        };
        let expected = Hello {
            rank: right_rank as u32,
            ..me
        };
        if !ack.accepted {
            return Err(CollectiveError::Handshake {
                peer: right_peer,
                reason: format!(
                    "it refused us ({}); it is {}",
                    describe(&me),
                    describe(&ack.me)
                ),
            });
        }
        if ack.me != expected {
            return Err(CollectiveError::Handshake {
                peer: right_peer,
                reason: format!(
                    "expected {}, found {}",
                    describe(&expected),
                    describe(&ack.me)
                ),
            });
        }
        let nonces = (&my_nonce, &their_nonce);
        if !proven(
            &their_proof,
            &config.secret,
            Side::Acceptor,
            &me,
            &ack.me,
            nonces,
        ) {
            return Err(CollectiveError::Handshake {
                peer: right_peer,
                reason: "it does not hold this group's ring secret".into(),
            });
        }
        let mine = proof(&config.secret, Side::Dialer, &me, &ack.me, nonces);
        write_all_until(&mut right, &mine, right_peer, deadline)?;
        let (left, strangers) = acceptor.join().map_err(|_| CollectiveError::Handshake {
            peer: left_peer,
            reason: "the accepting thread panicked".into(),
        })??;

        for s in [&right, &left] {
            set_op_timeouts(s, config.timeout, right_peer)?;
        }
        // The handle keeps clones of both sockets: shutting them down from another thread
        // wakes this rank's blocked reads and writes, and tells both neighbours.
        let abort = AbortHandle::new();
        abort.shut_down_on_abort(vec![
            right
                .try_clone()
                .map_err(|e| io_err(right_peer, "setup", e))?,
            left.try_clone()
                .map_err(|e| io_err(left_peer, "setup", e))?,
        ]);
        let mut ring = RingCollective {
            rank,
            world_size: n,
            timeout: config.timeout,
            chunk_elems: config.chunk_bytes / size_of::<f32>(),
            links: Some(Links {
                right,
                left,
                right_peer,
                left_peer,
            }),
            abort,
            seq: 0,
            poisoned: None,
            strangers,
            scratch: Vec::new(),
            peers: config.peers.clone(),
            route: Route::Tcp,
        };
        if config.shared_memory {
            ring.join_shared_memory(&config)?;
        }
        Ok(ring)
    }

    /// Whether all-reduces go through one shared-memory region, every rank on one host (see
    /// [`RingConfig::shared_memory`]). `false` for the hierarchical path, which uses shared
    /// memory only within each host: see [`Self::all_reduce_path`].
    pub fn uses_shared_memory(&self) -> bool {
        self.all_reduce_path() == AllReducePath::SharedMemory
    }

    /// Which way all-reduces and barriers go, as decided (unanimously) when joining.
    pub fn all_reduce_path(&self) -> AllReducePath {
        match &self.route {
            Route::Tcp => AllReducePath::Tcp,
            Route::SharedMemory(_) => AllReducePath::SharedMemory,
            Route::Hierarchical(h) => AllReducePath::Hierarchical {
                hosts: h.leader_ranks.len(),
            },
        }
    }

    /// Every rank's bytes, in rank order, on every rank (one broadcast per root in `roots`).
    fn broadcast_from_each(
        &mut self,
        roots: &[usize],
        mine: &[u8],
    ) -> Result<Vec<Vec<u8>>, CollectiveError> {
        let mut all = Vec::with_capacity(roots.len());
        for &root in roots {
            let mut bytes = if root == self.rank {
                mine.to_vec()
            } else {
                Vec::new()
            };
            self.broadcast_bytes(&mut bytes, root)?;
            all.push(bytes);
        }
        Ok(all)
    }

    /// Whether `ok` holds on every rank (an all-reduce over the current path).
    fn unanimous(&mut self, ok: bool) -> Result<bool, CollectiveError> {
        let mut votes = [if ok { 1.0f32 } else { 0.0 }];
        self.all_reduce_f32(&mut votes, ReduceOp::Sum)?;
        Ok(votes[0] == self.world_size as f32)
    }

    /// Gathers every rank's host claim and slot size, then joins the path they point to (see
    /// the module docs). The sequence number is reset afterwards, so joining costs callers no
    /// operations.
    fn join_shared_memory(&mut self, config: &RingConfig) -> Result<(), CollectiveError> {
        let claim = config.host.clone().unwrap_or_else(shm::host_identity);
        let mine = format!("{}\n{claim}", config.shared_memory_slot_bytes);
        let every_rank: Vec<usize> = (0..self.world_size).collect();
        let outcome = self
            .broadcast_from_each(&every_rank, mine.as_bytes())
            .and_then(|claims| match plan_hosts(&claims) {
                HostPlan::OneHost => self.join_single_region(config.shared_memory_slot_bytes),
                HostPlan::Hierarchical(groups) => self.join_hierarchy(config, groups),
                HostPlan::Tcp(why) => {
                    tracing::info!(rank = self.rank, why, "all-reduce stays on the TCP ring");
                    Ok(())
                }
            });
        self.seq = 0;
        self.abort.set_sequence(0);
        outcome
    }

    /// Every rank claims one host: rank 0 creates a region and broadcasts its machine identity
    /// and path; each rank maps it if it is on the same machine and can; only if every rank
    /// could (one all-reduce over TCP says) does the group switch. Rank 0 then removes the
    /// file: the mappings stay valid and nothing is left behind in `/dev/shm`, however the
    /// processes end.
    fn join_single_region(&mut self, slot_bytes: usize) -> Result<(), CollectiveError> {
        let n = self.world_size;
        if n > shm::MAX_RANKS {
            return Ok(());
        }
        let identity = shm::host_identity();
        // Rank 0 only; a failure to create it (no /dev/shm space, say) keeps the TCP path.
        let (created_path, created) = if self.rank == 0 {
            SharedRegion::create(n, slot_bytes).ok().unzip()
        } else {
            (None, None)
        };
        let mut message = match &created_path {
            Some(path) => format!("{identity}\n{}", path.display()).into_bytes(),
            None => Vec::new(),
        };
        let outcome = self.broadcast_bytes(&mut message, 0).and_then(|()| {
            let region = created.or_else(|| {
                let text = String::from_utf8(message).ok()?;
                let (theirs, path) = text.split_once('\n')?;
                let path = (theirs == identity).then_some(Path::new(path))?;
                SharedRegion::open(path, n, self.rank, slot_bytes).ok()
            });
            let mut joined = [if region.is_some() { 1.0f32 } else { 0.0 }];
            self.all_reduce_f32(&mut joined, ReduceOp::Sum)?;
            Ok((joined[0] == n as f32).then_some(region).flatten())
        });
        if let Some(path) = created_path {
            let _ = std::fs::remove_file(path);
        }
        if let Some(region) = outcome? {
            self.route = Route::SharedMemory(region);
        }
        self.seq = 0;
        self.abort.set_sequence(0);
        Ok(())
    }

    /// Several hosts: each host's leader (its lowest rank) creates the host's region (unless
    /// it is alone there) and binds a listener for the leaders' ring on its ring address's IP,
    /// and broadcasts both; the others map their host's region. Only if every rank managed
    /// (one vote) do the leaders form their ring, and only if every leader did (a second vote)
    /// does the group switch; otherwise it stays on this TCP ring.
    fn join_hierarchy(
        &mut self,
        config: &RingConfig,
        groups: Vec<Vec<usize>>,
    ) -> Result<(), CollectiveError> {
        let (rank, n) = (self.rank, self.world_size);
        let slot_bytes = config.shared_memory_slot_bytes;
        let host_of = |r: usize| groups.iter().position(|g| g.contains(&r));
        let host = host_of(rank).expect("the plan groups every rank");
        let host_ranks = groups[host].clone();
        let local = host_ranks
            .iter()
            .position(|&r| r == rank)
            .expect("this rank is in its own group");
        let leader_ranks: Vec<usize> = groups.iter().map(|g| g[0]).collect();
        let leads = local == 0;
        let identity = shm::host_identity();

        let mut region = None;
        let mut file = RegionFile(None);
        let mut listener = None;
        let mut offer = Vec::new();
        if leads {
            if host_ranks.len() > 1 {
                match SharedRegion::create(host_ranks.len(), slot_bytes) {
                    Ok((path, created)) => {
                        file.0 = Some(path);
                        region = Some(created);
                    }
                    Err(e) => {
                        tracing::warn!(rank, error = %e, "could not create this host's region")
                    }
                }
            }
            let addr = SocketAddr::new(self.peers[rank].ip(), 0);
            match bind_listener(addr, config.socket_buffer_bytes) {
                Ok(l) => listener = Some(l),
                Err(e) => {
                    tracing::warn!(rank, error = %e.chain_text(), "could not listen for the leaders' ring")
                }
            }
            // "<leaders' ring address>\n<region path>\n<machine identity>": the identity last,
            // since only it could hold a line break.
            let addr = listener.as_ref().and_then(|l| l.local_addr().ok());
            offer = format!(
                "{}\n{}\n{identity}",
                addr.map(|a| a.to_string()).unwrap_or_default(),
                file.0
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            )
            .into_bytes();
        }
        let offers = self.broadcast_from_each(&leader_ranks, &offer)?;
        let parsed: Vec<Option<(SocketAddr, &str, &str)>> = offers
            .iter()
            .map(|o| {
                let text = std::str::from_utf8(o).ok()?;
                let mut parts = text.splitn(3, '\n');
                let addr = parts.next()?.parse().ok()?;
                Some((addr, parts.next()?, parts.next()?))
            })
            .collect();
        if !leads && let Some((_, path, theirs)) = parsed[host] {
            region = (theirs == identity && !path.is_empty())
                .then(|| {
                    SharedRegion::open(Path::new(path), host_ranks.len(), local, slot_bytes).ok()
                })
                .flatten();
        }
        let leader_addrs: Option<Vec<SocketAddr>> =
            parsed.iter().map(|p| p.map(|(addr, _, _)| addr)).collect();
        let ready = leader_addrs.is_some()
            && (host_ranks.len() == 1 || region.is_some())
            && (!leads || listener.is_some());
        let mapped = self.unanimous(ready)?;
        drop(file);
        if !mapped {
            tracing::info!(
                rank,
                "a rank could not join its host's region: all-reduce stays on the TCP ring"
            );
            return Ok(());
        }

        let leaders = match (leads, listener, leader_addrs) {
            (true, Some(listener), Some(addrs)) => {
                match self.connect_leaders(config, listener, addrs, host) {
                    Ok(ring) => Some(ring),
                    Err(e) => {
                        let e = e.renaming_peer(|p| self.peer(leader_ranks[p.rank]));
                        tracing::warn!(rank, error = %e.chain_text(), "the leaders' ring did not form");
                        None
                    }
                }
            }
            _ => None,
        };
        if !self.unanimous(!leads || leaders.is_some())? {
            tracing::info!(
                rank,
                "the leaders' ring did not form: all-reduce stays on the TCP ring"
            );
            return Ok(());
        }
        let left = (rank + n - 1) % n;
        let right = (rank + 1) % n;
        tracing::info!(
            rank,
            hosts = groups.len(),
            host_ranks = ?host_ranks,
            leads,
            "hierarchical all-reduce"
        );
        self.route = Route::Hierarchical(Box::new(Hierarchy {
            neighbour_elsewhere: [host_of(left) != Some(host), host_of(right) != Some(host)],
            host_ranks,
            region,
            leader_ranks,
            leaders,
            piece_elems: slot_bytes / size_of::<f32>(),
        }));
        Ok(())
    }

    /// The leader's side of forming the leaders' ring: the ring constructor on `listener`, with
    /// the leaders' addresses, this host's index as rank and a secret derived from the
    /// group's. It gets half the timeout to form (the other ranks wait for the outcome in a
    /// vote bounded by the whole timeout), then the whole one for its operations, and this
    /// collective's abort handle, so an abort wakes a leader blocked on it too. Its errors
    /// name peers by host index.
    fn connect_leaders(
        &self,
        config: &RingConfig,
        listener: TcpListener,
        addrs: Vec<SocketAddr>,
        host: usize,
    ) -> Result<Box<RingCollective>, CollectiveError> {
        let leaders_config = RingConfig {
            rank: host,
            world_size: addrs.len(),
            peers: addrs,
            timeout: (config.timeout / 2).max(Duration::from_millis(1)),
            secret: derived_secret(&config.secret, LEADERS_SECRET_LABEL),
            shared_memory: false,
            host: None,
            ..config.clone()
        };
        let mut ring = Box::new(RingCollective::from_listener(listener, leaders_config)?);
        ring.timeout = config.timeout;
        let links = ring
            .links
            .as_ref()
            .expect("two hosts or more: the leaders' ring has neighbours");
        set_op_timeouts(&links.right, config.timeout, links.right_peer)?;
        set_op_timeouts(&links.left, config.timeout, links.left_peer)?;
        self.abort.shut_down_on_abort(vec![
            links
                .right
                .try_clone()
                .map_err(|e| io_err(links.right_peer, "setup", e))?,
            links
                .left
                .try_clone()
                .map_err(|e| io_err(links.left_peer, "setup", e))?,
        ]);
        ring.abort = self.abort.clone();
        Ok(ring)
    }

    fn peer(&self, rank: usize) -> Peer {
        Peer {
            rank,
            addr: self.peers[rank],
        }
    }

    fn single(config: &RingConfig) -> Result<Self, CollectiveError> {
        Ok(RingCollective {
            rank: 0,
            world_size: 1,
            timeout: config.timeout,
            chunk_elems: config.chunk_bytes / size_of::<f32>(),
            links: None,
            abort: AbortHandle::new(),
            seq: 0,
            poisoned: None,
            strangers: 0,
            scratch: Vec::new(),
            peers: config.peers.clone(),
            route: Route::Tcp,
        })
    }

    /// Connections to this rank's ring port that were dropped while it waited for its left
    /// neighbour: not a rank of this group, or without proof of the ring secret.
    pub fn strangers_refused(&self) -> u64 {
        self.strangers
    }

    /// Runs one operation; on failure poisons the collective and shuts the
    /// sockets so that neighbours blocked on us fail now, not at their timeout.
    fn run_op<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, CollectiveError>,
    ) -> Result<T, CollectiveError> {
        if self.abort.is_aborted() {
            return Err(CollectiveError::Aborted);
        }
        if let Some(p) = &self.poisoned {
            return Err(CollectiveError::Poisoned(p.clone()));
        }
        match f(self) {
            Ok(v) => {
                self.seq += 1;
                self.abort.set_sequence(self.seq);
                Ok(v)
            }
            Err(e) => {
                let e = if self.abort.is_aborted() {
                    CollectiveError::Aborted
                } else {
                    e
                };
                self.poisoned = Some(e.chain_text());
                self.tell_peers_we_failed();
                if let Some(l) = &self.links {
                    l.shutdown();
                }
                Err(e)
            }
        }
    }

    /// Marks this rank failed in its region (so the host's ranks learn of it at once) and, on a
    /// host leader, shuts the leaders' ring (so the other hosts do too).
    fn tell_peers_we_failed(&self) {
        match &self.route {
            Route::Tcp => {}
            Route::SharedMemory(region) => region.mark_failed(),
            Route::Hierarchical(h) => {
                if let Some(region) = &h.region {
                    region.mark_failed();
                }
                if let Some(links) = h.leaders.as_ref().and_then(|l| l.links.as_ref()) {
                    links.shutdown();
                }
            }
        }
    }

    /// Sends our header right and checks the one from the left. Returns the
    /// left's header for operation-specific checks.
    fn exchange_headers(&self, links: &Links, ours: Header) -> Result<Header, CollectiveError> {
        let op = ours.kind.name();
        (&links.right)
            .write_all(&ours.encode())
            .map_err(|e| self.io_err(links.right_peer, op, e))?;
        let mut raw = [0u8; HEADER_LEN];
        (&links.left)
            .read_exact(&mut raw)
            .map_err(|e| self.io_err(links.left_peer, op, e))?;
        let theirs = check_same_operation(links.left_peer, &ours, Header::decode(&raw))?;
        Ok(theirs)
    }

    fn io_err(&self, peer: Peer, op: &'static str, e: io::Error) -> CollectiveError {
        if self.abort.is_aborted() {
            CollectiveError::Aborted
        } else {
            CollectiveError::from_io(peer, op, self.timeout, e)
        }
    }

    fn all_reduce_inner(
        &mut self,
        kind: OpKind,
        buf: &mut [f32],
        op: ReduceOp,
    ) -> Result<(), CollectiveError> {
        if self.links.is_none() {
            // One rank: the sum is the buffer, and so is the average.
            return Ok(());
        }
        match self.route {
            Route::SharedMemory(_) => return self.shared_memory_all_reduce(kind, buf, op),
            Route::Hierarchical(_) => return self.hierarchical_all_reduce(kind, buf, op),
            Route::Tcp => {}
        }
        let ours = Header {
            kind,
            seq: self.seq,
            count: buf.len() as u64,
            extra: op.code(),
        };
        self.ring_all_reduce(ours, buf, op == ReduceOp::Average)
    }

    /// The TCP ring all-reduce of `buf`, announced by `ours` (the leaders' ring announces the
    /// group's operation, not its own); `average` divides by this ring's size.
    fn ring_all_reduce(
        &mut self,
        ours: Header,
        buf: &mut [f32],
        average: bool,
    ) -> Result<(), CollectiveError> {
        let Some(links) = &self.links else {
            return Ok(());
        };
        let kind = ours.kind;
        let n = self.world_size;
        let r = self.rank;
        let len = buf.len();
        let theirs = self.exchange_headers(links, ours)?;
        check_same_reduction(links.left_peer, &ours, &theirs)?;

        let ce = self.chunk_elems;
        if self.scratch.len() < ce.min(len) {
            self.scratch.resize(ce.min(len), 0.0);
        }
        let scratch = &mut self.scratch;
        // Segment i has base or base + 1 elements; all ranks split alike.
        let base = len / n;
        let rem = len % n;
        let seg_len = |i: usize| base + usize::from(i < rem);
        let mut segs: Vec<Option<&mut [f32]>> = Vec::with_capacity(n);
        let mut rest = buf;
        for i in 0..n {
            let (seg, tail) = rest.split_at_mut(seg_len(i));
            segs.push(Some(seg));
            rest = tail;
        }
        let n_f32 = n as f32;

        run_pipelined(links, &self.abort, self.timeout, kind.name(), |pipe| {
            let mut take = |i: usize| segs[i].take().expect("each segment is taken once");
            // Reduce-scatter step 0 sends our own contribution to segment r.
            for c in take(r).chunks_mut(ce) {
                pipe.send(bytemuck::cast_slice_mut(c))?;
            }
            // Step s receives segment r-s-1, adds our contribution and passes
            // it on (chunk by chunk, so forwarding overlaps receiving). After
            // the last step segment r+1 is complete here; it is the first
            // thing the all-gather sends.
            for s in 0..n - 1 {
                let last = s == n - 2;
                for c in take((r + n - s - 1) % n).chunks_mut(ce) {
                    let tmp = &mut scratch[..c.len()];
                    pipe.read_exact(bytemuck::cast_slice_mut(tmp))?;
                    for (a, b) in c.iter_mut().zip(tmp.iter()) {
                        *a += *b;
                    }
                    if last && average {
                        // Each rank scales only the segment it completed,
                        // before sharing it, so every rank ends up with the
                        // same bits and the division touches 1/n of the data.
                        for a in c.iter_mut() {
                            *a /= n_f32;
                        }
                    }
                    pipe.send(bytemuck::cast_slice_mut(c))?;
                }
            }
            // All-gather step s receives final segment r-s over our partial
            // copy and forwards it (except at the last step: the right
            // neighbour completed that segment itself). The sender returns
            // chunks in the order it sent them, which is exactly the order
            // needed here: r, r-1, ..., r+2.
            for s in 0..n - 1 {
                let forward = s < n - 2;
                for _ in 0..seg_len((r + n - s) % n).div_ceil(ce) {
                    let c = pipe.take_back()?;
                    pipe.read_exact(c)?;
                    if forward {
                        pipe.send(c)?;
                    }
                }
            }
            Ok(())
        })
    }

    /// [`Self::all_reduce_inner`] through the shared region, piece by piece.
    fn shared_memory_all_reduce(
        &mut self,
        kind: OpKind,
        buf: &mut [f32],
        op: ReduceOp,
    ) -> Result<(), CollectiveError> {
        let count = buf.len();
        self.through_region(kind, count, op.code(), |region, ours, wait, check| {
            let pieces = region.slot_elems();
            // An empty buffer still meets the others once, so mismatches are seen.
            let mut empty: [f32; 0] = [];
            let mut parts: Vec<&mut [f32]> = buf.chunks_mut(pieces).collect();
            if parts.is_empty() {
                parts.push(&mut empty);
            }
            for part in parts {
                region.all_reduce_piece(
                    part,
                    ours,
                    op == ReduceOp::Average,
                    &mut *wait,
                    &mut *check,
                )?;
            }
            Ok(())
        })
    }

    /// [`Collective::all_reduce_pieces`] through the shared region, in one operation.
    fn shared_memory_all_reduce_pieces(
        &mut self,
        pieces: &[GradientPiece<'_>],
        layout: &PieceLayout,
        out: &mut [f32],
        op: ReduceOp,
    ) -> Result<bool, CollectiveError> {
        let extra = op.code() | (pieces_fingerprint(pieces) << 1);
        let kind = OpKind::AllReducePieces;
        self.through_region(kind, out.len(), extra, |region, ours, wait, check| {
            let average = op == ReduceOp::Average;
            region.all_reduce_pieces(pieces, layout, out, ours, average, wait, check)
        })
    }

    /// One operation through the shared region, announced as `kind` with `count` elements
    /// and `extra`: `run` gets the region, the header, and the wait for a peer (bounded by the
    /// timeout, the abort handle and the neighbours' sockets) and the check of its header
    /// (same operation, length, reduce operation and pieces) that the region's methods take.
    fn through_region<T>(
        &mut self,
        kind: OpKind,
        count: usize,
        extra: u64,
        run: impl FnOnce(
            &mut SharedRegion,
            &Header,
            &mut dyn FnMut(&mut shm::Waiter<'_>) -> Result<(), CollectiveError>,
            &mut dyn FnMut(usize, Result<Header, String>) -> Result<(), CollectiveError>,
        ) -> Result<T, CollectiveError>,
    ) -> Result<T, CollectiveError> {
        let Self {
            links: Some(links),
            route: Route::SharedMemory(region),
            abort,
            peers,
            timeout,
            seq,
            ..
        } = self
        else {
            unreachable!("called with links and a region");
        };
        let name = kind.name();
        let timeout = *timeout;
        let peer = |rank: usize| Peer {
            rank,
            addr: peers[rank],
        };
        let ours = Header {
            kind,
            seq: *seq,
            count: count as u64,
            extra,
        };
        let mut wait = |waiter: &mut shm::Waiter<'_>| {
            waiter
                .wait(
                    timeout,
                    || abort.is_aborted(),
                    [&links.left, &links.right],
                    [None, None],
                )
                .map_err(|e| wait_failure(e, links, peer, name, timeout))
        };
        let mut check = |rank: usize, theirs: Result<Header, String>| {
            let theirs = check_same_operation(peer(rank), &ours, theirs)?;
            check_same_reduction(peer(rank), &ours, &theirs)
        };
        run(region, &ours, &mut wait, &mut check)
    }

    /// [`Self::all_reduce_inner`] over several hosts, piece by piece: each host's ranks sum
    /// through its region, the leaders all-reduce the host sums over their ring and divide by
    /// the world size for an average, and each leader's result goes back out through its
    /// region (see `shm.rs`).
    fn hierarchical_all_reduce(
        &mut self,
        kind: OpKind,
        buf: &mut [f32],
        op: ReduceOp,
    ) -> Result<(), CollectiveError> {
        let Self {
            links: Some(links),
            route: Route::Hierarchical(hierarchy),
            abort,
            peers,
            timeout,
            seq,
            world_size,
            ..
        } = self
        else {
            unreachable!("called with links and a hierarchy");
        };
        let Hierarchy {
            host_ranks,
            region,
            leader_ranks,
            leaders,
            piece_elems,
            neighbour_elsewhere,
        } = &mut **hierarchy;
        let name = kind.name();
        let timeout = *timeout;
        let ours = Header {
            kind,
            seq: *seq,
            count: buf.len() as u64,
            extra: op.code(),
        };
        let global = |rank: usize| Peer {
            rank,
            addr: peers[rank],
        };
        let local_peer = |local: usize| global(host_ranks[local]);
        let scale = *world_size as f32;
        // The leader's last step on each piece: the sum over hosts (the leaders' ring names
        // its peers by host index), then the average over every rank, once.
        let finish = |data: &mut [f32], leaders: &mut RingCollective| {
            leaders
                .ring_all_reduce(ours, data, false)
                .map_err(|e| e.renaming_peer(|p| global(leader_ranks[p.rank])))?;
            if op == ReduceOp::Average {
                for x in data.iter_mut() {
                    *x /= scale;
                }
            }
            Ok(())
        };
        let check = |local: usize, theirs: Result<Header, String>| {
            let theirs = check_same_operation(local_peer(local), &ours, theirs)?;
            check_same_reduction(local_peer(local), &ours, &theirs)
        };
        // A member's wait spans its leader's wait for the other members and the leaders'
        // ring, each bounded by the timeout, and a leader that fails marks the region; the
        // member's own deadline only catches a leader that stopped without failing.
        let result_timeout = timeout.saturating_mul(2);
        let may_be_ahead = neighbour_elsewhere.map(|elsewhere| elsewhere.then_some(ours.seq));
        // An empty buffer still meets the others once, so mismatches are seen.
        let mut empty: [f32; 0] = [];
        let mut parts: Vec<&mut [f32]> = buf.chunks_mut(*piece_elems).collect();
        if parts.is_empty() {
            parts.push(&mut empty);
        }
        for part in parts {
            match (region.as_mut(), leaders.as_deref_mut()) {
                (None, Some(leaders)) => finish(part, leaders)?,
                (Some(region), Some(leaders)) => region.lead_piece(
                    part,
                    &ours,
                    |waiter| {
                        waiter
                            .wait(
                                timeout,
                                || abort.is_aborted(),
                                [&links.left, &links.right],
                                [None, None],
                            )
                            .map_err(|e| wait_failure(e, links, local_peer, name, timeout))
                    },
                    check,
                    |data| finish(data, leaders),
                )?,
                (Some(region), None) => region.follow_piece(
                    part,
                    &ours,
                    |waiter| {
                        waiter
                            .wait(
                                result_timeout,
                                || abort.is_aborted(),
                                [&links.left, &links.right],
                                may_be_ahead,
                            )
                            .map_err(|e| wait_failure(e, links, local_peer, name, result_timeout))
                    },
                    |theirs| check(0, theirs),
                )?,
                (None, None) => unreachable!("a member always has its host's region"),
            }
        }
        Ok(())
    }

    /// Pipelines `data` from `root` rightwards round the ring; the rank left
    /// of the root does not forward.
    fn chain_broadcast(
        &self,
        links: &Links,
        op: &'static str,
        data: &mut [u8],
        root: usize,
    ) -> Result<(), CollectiveError> {
        let cb = self.chunk_elems * size_of::<f32>();
        let r = self.rank;
        let forward = (r + 1) % self.world_size != root;
        run_pipelined(links, &self.abort, self.timeout, op, |pipe| {
            for c in data.chunks_mut(cb) {
                if r != root {
                    pipe.read_exact(c)?;
                    if !forward {
                        continue;
                    }
                }
                pipe.send(c)?;
            }
            Ok(())
        })
    }

    fn check_root(&self, root: usize) -> Result<(), CollectiveError> {
        if root >= self.world_size {
            return Err(CollectiveError::InvalidArgument(format!(
                "broadcast root {root} is out of range for world_size {}",
                self.world_size
            )));
        }
        Ok(())
    }

    fn check_broadcast_header(
        links: &Links,
        theirs: &Header,
        root: usize,
    ) -> Result<(), CollectiveError> {
        if theirs.extra != root as u64 {
            return Err(CollectiveError::Protocol {
                peer: links.left_peer,
                detail: format!("it broadcasts from rank {}, we from {root}", theirs.extra),
            });
        }
        Ok(())
    }
}

impl Collective for RingCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_f32(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<(), CollectiveError> {
        self.run_op(|me| me.all_reduce_inner(OpKind::AllReduce, buf, op))
    }

    /// Through the single shared-memory region, the pieces as they are (bf16 ones in half the
    /// bytes); on the other paths gathered and all-reduced as one buffer. Every rank decides
    /// alike: the route is the same on all.
    fn all_reduce_pieces(
        &mut self,
        pieces: &[GradientPiece<'_>],
        out: &mut [f32],
        op: ReduceOp,
    ) -> Result<bool, CollectiveError> {
        let slot_bytes = match (&self.route, &self.links) {
            (Route::SharedMemory(region), Some(_)) => region.slot_bytes(),
            _ => return all_reduce_gathered(self, pieces, out, op),
        };
        let total: usize = pieces.iter().map(GradientPiece::len).sum();
        assert_eq!(total, out.len(), "pieces and output differ in length");
        let layout = PieceLayout::of(pieces, slot_bytes);
        self.run_op(|me| me.shared_memory_all_reduce_pieces(pieces, &layout, out, op))
    }

    fn broadcast_f32(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        self.run_op(|me| {
            me.check_root(root)?;
            let Some(links) = &me.links else {
                return Ok(());
            };
            let theirs = me.exchange_headers(
                links,
                Header {
                    kind: OpKind::BroadcastF32,
                    seq: me.seq,
                    count: buf.len() as u64,
                    extra: root as u64,
                },
            )?;
            Self::check_broadcast_header(links, &theirs, root)?;
            if theirs.count != buf.len() as u64 {
                return Err(CollectiveError::LengthMismatch {
                    peer: links.left_peer,
                    ours: buf.len(),
                    theirs: buf_len(theirs.count),
                });
            }
            me.chain_broadcast(links, "broadcast", bytemuck::cast_slice_mut(buf), root)
        })
    }

    fn broadcast_bytes(&mut self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError> {
        self.run_op(|me| {
            me.check_root(root)?;
            let Some(links) = &me.links else {
                return Ok(());
            };
            // Non-roots do not know the length yet, so the header carries no
            // count; the root's length travels ahead of the data instead.
            let theirs = me.exchange_headers(
                links,
                Header {
                    kind: OpKind::BroadcastBytes,
                    seq: me.seq,
                    count: 0,
                    extra: root as u64,
                },
            )?;
            Self::check_broadcast_header(links, &theirs, root)?;
            let mut len = (buf.len() as u64).to_le_bytes();
            me.chain_broadcast(links, "broadcast-bytes", &mut len, root)?;
            if me.rank != root {
                let len = usize::try_from(u64::from_le_bytes(len)).map_err(|_| {
                    CollectiveError::Protocol {
                        peer: links.left_peer,
                        detail: "broadcast length does not fit in memory".into(),
                    }
                })?;
                buf.clear();
                buf.resize(len, 0);
            }
            me.chain_broadcast(links, "broadcast-bytes", buf, root)
        })
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        // A one-element all-reduce: every rank's value has to reach every
        // other rank, so nobody leaves before everybody has arrived. The
        // result doubles as a sanity check of the ring.
        let n = self.world_size;
        self.run_op(|me| {
            let mut one = [1.0f32];
            me.all_reduce_inner(OpKind::Barrier, &mut one, ReduceOp::Sum)?;
            if one[0] != n as f32 {
                let peer = me.links.as_ref().map(|l| l.left_peer);
                return Err(CollectiveError::Protocol {
                    peer: peer.expect("world_size > 1 whenever the sum can differ"),
                    detail: format!("barrier counted {} ranks, expected {n}", one[0]),
                });
            }
            Ok(())
        })
    }

    fn abort(&mut self) {
        self.tell_peers_we_failed();
        self.abort.abort();
        self.poisoned.get_or_insert_with(|| "aborted".into());
    }

    fn abort_handle(&self) -> AbortHandle {
        self.abort.clone()
    }
}

impl Drop for RingCollective {
    fn drop(&mut self) {
        // A rank leaving the hierarchical path marks its host's region too: a member whose ring
        // neighbours are all on other hosts tolerates their closing (see `shm.rs`), so it
        // learns of its leader's end here. A peer still waiting for an operation this rank
        // finished sees the arrival before the mark.
        if let Route::Hierarchical(h) = &self.route
            && let Some(region) = &h.region
        {
            region.mark_failed();
        }
        // An AbortHandle may keep clones of the sockets alive; shut them down
        // explicitly so neighbours see the connection end now.
        if let Some(l) = &self.links {
            l.shutdown();
        }
    }
}

/// The calling thread's view of a pipelined operation.
struct Pipe<'l, 'd> {
    to_sender: mpsc::Sender<&'d mut [u8]>,
    from_sender: mpsc::Receiver<&'d mut [u8]>,
    left: &'l TcpStream,
    left_peer: Peer,
    timeout: Duration,
    op: &'static str,
}

impl<'d> Pipe<'_, 'd> {
    /// Queues `chunk` for the right neighbour; it comes back via `take_back`.
    fn send(&self, chunk: &'d mut [u8]) -> Result<(), CollectiveError> {
        self.to_sender.send(chunk).map_err(|_| sender_gone())
    }

    /// The oldest chunk the sender has finished writing.
    fn take_back(&self) -> Result<&'d mut [u8], CollectiveError> {
        self.from_sender.recv().map_err(|_| sender_gone())
    }

    fn read_exact(&self, buf: &mut [u8]) -> Result<(), CollectiveError> {
        let mut left = self.left;
        left.read_exact(buf)
            .map_err(|e| CollectiveError::from_io(self.left_peer, self.op, self.timeout, e))
    }
}

/// Only seen when the sender stopped on an error, which is reported instead.
fn sender_gone() -> CollectiveError {
    CollectiveError::Poisoned("sender thread stopped".into())
}

/// Runs `body` on this thread while a scoped thread writes every chunk it is
/// handed to the right neighbour, in order, handing each back once written.
///
/// The first error on either side wins and shuts the sockets down, which
/// unblocks the other side and tells the neighbours.
fn run_pipelined<'d>(
    links: &Links,
    abort: &AbortHandle,
    timeout: Duration,
    op: &'static str,
    body: impl FnOnce(&Pipe<'_, 'd>) -> Result<(), CollectiveError>,
) -> Result<(), CollectiveError> {
    let first_err: Mutex<Option<CollectiveError>> = Mutex::new(None);
    let fail = |e: CollectiveError| {
        let mut slot = first_err.lock().unwrap_or_else(PoisonError::into_inner);
        slot.get_or_insert(e);
        drop(slot);
        links.shutdown();
    };
    let (to_sender, sender_rx) = mpsc::channel::<&'d mut [u8]>();
    let (sender_tx, from_sender) = mpsc::channel::<&'d mut [u8]>();

    thread::scope(|s| {
        let fail = &fail;
        let sender = s.spawn(move || {
            let mut right = &links.right;
            for chunk in sender_rx {
                if let Err(e) = right.write_all(chunk) {
                    fail(CollectiveError::from_io(links.right_peer, op, timeout, e));
                    return;
                }
                // The receiver may be done with returned chunks; that is fine,
                // the remaining queued chunks must still be written.
                let _ = sender_tx.send(chunk);
            }
        });
        let pipe = Pipe {
            to_sender,
            from_sender,
            left: &links.left,
            left_peer: links.left_peer,
            timeout,
            op,
        };
        let result = body(&pipe);
        // Closing the channel lets the sender finish its queue and exit.
        drop(pipe);
        if let Err(e) = result {
            fail(e);
        }
        if let Err(panic) = sender.join() {
            std::panic::resume_unwind(panic);
        }
    });

    if abort.is_aborted() {
        return Err(CollectiveError::Aborted);
    }
    match first_err
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
    {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Names the rank behind a failed shared-memory wait, as the TCP path would; `peer` maps a
/// rank of the region to the group's.
fn wait_failure(
    e: WaitError,
    links: &Links,
    peer: impl Fn(usize) -> Peer,
    op: &'static str,
    timeout: Duration,
) -> CollectiveError {
    match e {
        WaitError::Aborted => CollectiveError::Aborted,
        WaitError::PeerFailed { rank } => CollectiveError::PeerDisconnected {
            peer: peer(rank),
            op,
            source: io::Error::other("it failed during a shared-memory operation"),
        },
        WaitError::NeighbourClosed { left } => CollectiveError::PeerDisconnected {
            peer: links.neighbour(left),
            op,
            source: io::ErrorKind::UnexpectedEof.into(),
        },
        WaitError::NeighbourOnTcp { left } => CollectiveError::Protocol {
            peer: links.neighbour(left),
            detail: format!("it runs an operation over TCP while we run {op} in shared memory"),
        },
        WaitError::Timeout { rank } => CollectiveError::Timeout {
            peer: peer(rank),
            op,
            timeout,
        },
        WaitError::Io { left, source } => {
            CollectiveError::from_io(links.neighbour(left), op, timeout, source)
        }
    }
}

fn describe(h: &Hello) -> String {
    format!(
        "rank {} of world {} in session {:#x} (protocol v{})",
        h.rank, h.world_size, h.session_id, h.version
    )
}

fn io_err(peer: Peer, op: &'static str, source: io::Error) -> CollectiveError {
    CollectiveError::Io { peer, op, source }
}

fn bind_listener(addr: SocketAddr, buffer: Option<usize>) -> Result<TcpListener, CollectiveError> {
    let bind_err = |source| CollectiveError::Bind { addr, source };
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(bind_err)?;
    sock.set_reuse_address(true).map_err(bind_err)?;
    if let Some(b) = buffer {
        // Set before listen so accepted sockets inherit it and the TCP window
        // scale is negotiated for it.
        sock.set_recv_buffer_size(b).map_err(bind_err)?;
        sock.set_send_buffer_size(b).map_err(bind_err)?;
    }
    sock.bind(&addr.into()).map_err(bind_err)?;
    sock.listen(128).map_err(bind_err)?;
    Ok(sock.into())
}

fn configure_stream(s: &TcpStream, config: &RingConfig, peer: Peer) -> Result<(), CollectiveError> {
    // Headers and small barriers must not wait for Nagle's 40 ms timer.
    s.set_nodelay(true).map_err(|e| io_err(peer, "setup", e))?;
    if let Some(b) = config.socket_buffer_bytes {
        let sock = SockRef::from(s);
        sock.set_send_buffer_size(b)
            .and_then(|()| sock.set_recv_buffer_size(b))
            .map_err(|e| io_err(peer, "setup", e))?;
    }
    Ok(())
}

fn set_op_timeouts(s: &TcpStream, timeout: Duration, peer: Peer) -> Result<(), CollectiveError> {
    s.set_read_timeout(Some(timeout))
        .and_then(|()| s.set_write_timeout(Some(timeout)))
        .map_err(|e| io_err(peer, "setup", e))
}

fn remaining(deadline: Instant) -> Duration {
    // Socket timeouts reject zero; the 1 ms floor still fails promptly.
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

fn connect_with_retry(
    peer: Peer,
    config: &RingConfig,
    deadline: Instant,
) -> Result<TcpStream, CollectiveError> {
    let mut last_err;
    loop {
        let attempt = (|| {
            let sock = Socket::new(Domain::for_address(peer.addr), Type::STREAM, None)?;
            if let Some(b) = config.socket_buffer_bytes {
                // Before connecting, so the window scale is negotiated for it.
                sock.set_recv_buffer_size(b)?;
                sock.set_send_buffer_size(b)?;
            }
            sock.connect_timeout(&peer.addr.into(), remaining(deadline))?;
            Ok::<TcpStream, io::Error>(sock.into())
        })();
        match attempt {
            Ok(s) => {
                configure_stream(&s, config, peer)?;
                return Ok(s);
            }
            Err(e) => last_err = e,
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(CollectiveError::ConnectTimeout {
                peer,
                timeout: config.timeout,
                source: last_err,
            });
        }
        // The neighbour may simply not be listening yet.
        thread::sleep(Duration::from_millis(20).min(deadline - now));
    }
}

/// Accepts connections until the left neighbour has proven itself, or the deadline. Each
/// connection's handshake runs on a thread of its own, so a stranger, silent or slow, costs
/// nothing but that thread; strangers are dropped and counted, never fatal. Returns the
/// neighbour's stream and the number of strangers.
fn accept_left(
    listener: &TcpListener,
    left_peer: Peer,
    me: Hello,
    config: &RingConfig,
    deadline: Instant,
) -> Result<(TcpStream, u64), CollectiveError> {
    // Non-blocking accept polled against the deadline: std has no accept
    // timeout, and a left neighbour that never comes must not hang us.
    listener
        .set_nonblocking(true)
        .map_err(|e| io_err(left_peer, "accept", e))?;
    let (proven_tx, proven_rx) = std::sync::mpsc::channel();
    let mut strangers = 0u64;
    // The newest refusal of a connection that said it was our left neighbour: if the real
    // one never comes, that is the likelier story than "nobody came" (a neighbour of another
    // session, or without the secret).
    let mut claimed: Option<CollectiveError> = None;
    loop {
        match listener.accept() {
            Ok((stream, addr)) => {
                let tx = proven_tx.clone();
                let config = config.clone();
                let spawned =
                    thread::Builder::new()
                        .name("ring-handshake".into())
                        .spawn(move || {
                            let who = Peer {
                                rank: left_peer.rank,
                                addr,
                            };
                            let _ = tx.send(prove_left(stream, who, me, &config, deadline));
                        });
                if spawned.is_err() {
                    strangers += 1;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(left_peer, "accept", e)),
        }
        while let Ok(outcome) = proven_rx.try_recv() {
            match outcome {
                Ok(stream) => return Ok((stream, strangers)),
                Err(Refusal {
                    error,
                    claimed_left,
                }) => {
                    strangers += 1;
                    tracing::warn!(
                        rank = me.rank,
                        error = %error.chain_text(),
                        "dropped a connection to the ring port"
                    );
                    if claimed_left {
                        claimed = Some(error);
                    }
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(claimed.unwrap_or(CollectiveError::AcceptTimeout {
                peer: left_peer,
                timeout: config.timeout,
            }));
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// Why a connection to the ring port was dropped.
#[derive(Debug)]
struct Refusal {
    error: CollectiveError,
    /// It introduced itself as our left neighbour (by rank), rather than being garbage.
    claimed_left: bool,
}

/// The acceptor's half of one handshake: the connection must say it is our left neighbour of
/// this session and prove it holds the ring secret.
fn prove_left(
    stream: TcpStream,
    who: Peer,
    me: Hello,
    config: &RingConfig,
    deadline: Instant,
) -> Result<TcpStream, Refusal> {
    let mut claimed_left = false;
    handshake_left(stream, who, me, config, deadline, &mut claimed_left).map_err(|error| Refusal {
        error,
        claimed_left,
    })
}

fn handshake_left(
    mut stream: TcpStream,
    mut who: Peer,
    me: Hello,
    config: &RingConfig,
    deadline: Instant,
    claimed_left: &mut bool,
) -> Result<TcpStream, CollectiveError> {
    stream
        .set_nonblocking(false)
        .map_err(|e| io_err(who, "accept", e))?;
    configure_stream(&stream, config, who)?;
    let mut raw = [0u8; HELLO_LEN + NONCE_LEN];
    read_exact_until(&mut stream, &mut raw, who, deadline)?;
    let (hello, their_nonce) = raw.split_at(HELLO_LEN);
    let Some(hello) = Hello::decode(hello.try_into().unwrap_or(&[0u8; HELLO_LEN])) else {
        return Err(CollectiveError::Handshake {
            peer: who,
            reason: "the connection is not from a Gantry collective rank".into(),
        });
    };
    let their_nonce: [u8; NONCE_LEN] = their_nonce.try_into().unwrap_or_default();
    // `who` names the left neighbour until the hello says who it really is.
    let expected = Hello {
        rank: who.rank as u32,
        ..me
    };
    who.rank = hello.rank as usize;
    *claimed_left = hello.rank == expected.rank;
    let accepted = hello == expected;
    let my_nonce: [u8; NONCE_LEN] = rand::random();
    let nonces = (&their_nonce, &my_nonce);
    let mut answer = Ack { accepted, me }.encode().to_vec();
    answer.extend_from_slice(&my_nonce);
    answer.extend_from_slice(&proof(&config.secret, Side::Acceptor, &hello, &me, nonces));
    // Best effort when refusing: the refused side learns why, but we fail regardless.
    let sent = write_all_until(&mut stream, &answer, who, deadline);
    if !accepted {
        return Err(CollectiveError::Handshake {
            peer: who,
            reason: format!(
                "expected {} as left neighbour, it is {}",
                describe(&expected),
                describe(&hello)
            ),
        });
    }
    sent?;
    let mut theirs = [0u8; PROOF_LEN];
    read_exact_until(&mut stream, &mut theirs, who, deadline)?;
    if !proven(&theirs, &config.secret, Side::Dialer, &hello, &me, nonces) {
        return Err(CollectiveError::Handshake {
            peer: who,
            reason: "it claims to be our left neighbour but cannot prove the ring secret".into(),
        });
    }
    Ok(stream)
}

fn read_exact_until(
    s: &mut TcpStream,
    buf: &mut [u8],
    peer: Peer,
    deadline: Instant,
) -> Result<(), CollectiveError> {
    let timeout = remaining(deadline);
    s.set_read_timeout(Some(timeout))
        .and_then(|()| s.read_exact(buf))
        .map_err(|e| CollectiveError::from_io(peer, "handshake", timeout, e))
}

fn write_all_until(
    s: &mut TcpStream,
    buf: &[u8],
    peer: Peer,
    deadline: Instant,
) -> Result<(), CollectiveError> {
    let timeout = remaining(deadline);
    s.set_write_timeout(Some(timeout))
        .and_then(|()| s.write_all(buf))
        .map_err(|e| CollectiveError::from_io(peer, "handshake", timeout, e))
}

fn buf_len(count: u64) -> usize {
    usize::try_from(count).unwrap_or(usize::MAX)
}

/// `theirs` (as decoded) must be the operation `ours` is: same kind, same place in the
/// sequence. Both paths (TCP headers, shared-memory headers) check peers with this.
fn check_same_operation(
    peer: Peer,
    ours: &Header,
    theirs: Result<Header, String>,
) -> Result<Header, CollectiveError> {
    let theirs = theirs.map_err(|detail| CollectiveError::Protocol { peer, detail })?;
    if theirs.kind != ours.kind {
        return Err(CollectiveError::Protocol {
            peer,
            detail: format!(
                "it runs {} while we run {}",
                theirs.kind.name(),
                ours.kind.name()
            ),
        });
    }
    if theirs.seq != ours.seq {
        return Err(CollectiveError::Protocol {
            peer,
            detail: format!(
                "it is at operation #{} while we are at #{}",
                theirs.seq, ours.seq
            ),
        });
    }
    Ok(theirs)
}

/// For reductions, also the same length, reduce operation and (for an all-reduce of pieces,
/// whose `extra` carries their fingerprint above the reduce operation's bit) pieces.
fn check_same_reduction(peer: Peer, ours: &Header, theirs: &Header) -> Result<(), CollectiveError> {
    if theirs.count != ours.count {
        return Err(CollectiveError::LengthMismatch {
            peer,
            ours: buf_len(ours.count),
            theirs: buf_len(theirs.count),
        });
    }
    if (theirs.extra ^ ours.extra) & 1 != 0 {
        return Err(CollectiveError::Protocol {
            peer,
            detail: "it uses a different reduce operation (sum vs average)".into(),
        });
    }
    if theirs.extra != ours.extra {
        return Err(CollectiveError::Protocol {
            peer,
            detail: "its gradient pieces differ from ours in kind or length".into(),
        });
    }
    Ok(())
}

/// A fingerprint of the pieces' kinds and lengths (FNV-1a), 63 bits, for the header of an
/// all-reduce of pieces: ranks whose pieces differ fail instead of summing unlike data.
fn pieces_fingerprint(pieces: &[GradientPiece<'_>]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for piece in pieces {
        let kind = match piece {
            GradientPiece::F32(_) => 1u8,
            GradientPiece::Bf16(_) => 2u8,
        };
        for byte in std::iter::once(kind).chain((piece.len() as u64).to_le_bytes()) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash >> 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(of: &[(&str, &str)]) -> Vec<Vec<u8>> {
        of.iter()
            .map(|(slot, host)| format!("{slot}\n{host}").into_bytes())
            .collect()
    }

    #[test]
    fn plan_groups_ranks_by_claimed_host_in_order_of_their_lowest_rank() {
        let plan = plan_hosts(&claims(&[
            ("64", "b"),
            ("64", "a"),
            ("64", "b"),
            ("64", "a\nx"),
        ]));
        assert_eq!(
            plan,
            HostPlan::Hierarchical(vec![vec![0, 2], vec![1], vec![3]])
        );
        assert_eq!(
            plan_hosts(&claims(&[("64", "a"), ("128", "a")])),
            HostPlan::OneHost,
            "one host keeps the single region, which checks the slot sizes itself"
        );
    }

    #[test]
    fn plan_stays_on_tcp_when_nothing_can_be_shared_or_pieces_would_not_line_up() {
        assert!(matches!(
            plan_hosts(&claims(&[("64", "a"), ("64", "b")])),
            HostPlan::Tcp(why) if why.contains("alone")
        ));
        assert!(matches!(
            plan_hosts(&claims(&[("64", "a"), ("64", "a"), ("128", "b")])),
            HostPlan::Tcp(why) if why.contains("slot")
        ));
        assert!(matches!(
            plan_hosts(&[b"64\na".to_vec(), b"garbage".to_vec()]),
            HostPlan::Tcp(why) if why.contains("malformed")
        ));
        let crowded: Vec<_> = (0..=shm::MAX_RANKS)
            .map(|_| ("64", "a"))
            .chain([("64", "b")])
            .collect();
        assert!(matches!(
            plan_hosts(&claims(&crowded)),
            HostPlan::Tcp(why) if why.contains("more ranks")
        ));
    }
}
