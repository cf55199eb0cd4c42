//! Same-host fast path of the ring: all-reduce through one shared-memory region.
//!
//! When every rank of a ring runs on one machine (and can open the same file in `/dev/shm`),
//! moving gradients through loopback TCP costs two kernel copies per byte, a sender thread
//! per operation and a wake-up per chunk. Here each rank copies its buffer into its own slot
//! of a shared mapping, announces it, waits until every rank has announced the same operation,
//! and then sums all slots itself, in rank order, so every rank computes bit-identical
//! results with one barrier per operation and no system call on the fast path (futexes only
//! when a rank has to sleep).
//!
//! An all-reduce of gradient pieces (`all_reduce_pieces`) works the same way, with each piece
//! in the slot as it is (bf16 in half the bytes), in chunks of at most a slot, one ticket
//! each; the sum widens as it reads and writes the f32 result into the caller's buffer.
//!
//! Layout: a 4 KiB header, then `world_size × 2` slots of `slot_bytes`. Each rank owns two
//! slots, used alternately: a rank may run one operation ahead of a peer still reading the
//! previous one, never two (it would have had to pass the barrier of the one in between), so
//! two slots make the reuse safe without a second barrier.
//!
//! Header: a magic number, the world size and slot size (checked by every rank that maps it),
//! the first failed rank (so ranks that are not neighbours of a failure learn of it at once),
//! and per rank, on cache lines of its own, the ticket of its last announced operation (the
//! futex word) and, per slot, the operation's header (the same `wire::Header` the TCP path
//! sends: kind, sequence, length, reduce operation) that every peer checks, so mismatched
//! calls fail on every rank instead of summing unrelated data.
//!
//! Hierarchical all-reduce (ranks on several hosts) uses one region per host, with the host's
//! ranks numbered by rank order (local rank 0, the lowest rank, leads). Each piece takes two
//! tickets: members (local ranks above 0) copy their piece into their slot and announce the
//! first; the leader waits for them, sums every slot in local rank order (its own term from
//! its buffer), turns the host sum into the result (the cross-host ring, see `ring.rs`), copies
//! the result into its own slot and announces the second, which the members wait for and copy
//! out. Piece `k` uses slot parity `k % 2`; a member cannot write parity `k % 2` again before
//! the leader has published piece `k + 1`, by which time it has read piece `k`, and the leader
//! cannot overwrite its result slot of piece `k` before every member has announced piece
//! `k + 1`, which each does only after copying piece `k` out.
//!
//! Failure: neighbours still hold the ring's TCP connections. A rank waiting here peeks at
//! them between sleeps: end-of-file means a neighbour died (or failed and shut them), data
//! means a neighbour runs a different, TCP-path operation. Both fail the wait with the
//! neighbour named, as the TCP path would. Except where the neighbour is on another host and
//! this rank waits for its leader's result (hierarchical): such a neighbour may legitimately
//! have finished the operation already (its own leader was quicker) and moved on to the next
//! operation's TCP header, or closed its sockets after its last operation, so there only a
//! header of the same or an earlier operation counts as a mismatch; the neighbour's failures
//! reach this rank through the leaders' ring and this host's failure mark instead.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::GradientPiece;
use crate::wire::{HEADER_LEN, Header};

const MAGIC: u64 = u64::from_le_bytes(*b"GANTRYSM");
const HEADER_BYTES: usize = 4096;
/// Bytes of header per rank: two cache lines.
const RANK_BYTES: usize = 128;
/// Offsets of the global fields.
const MAGIC_AT: usize = 0;
const WORLD_AT: usize = 8;
const SLOT_AT: usize = 16;
const FAILED_AT: usize = 24;
/// Per-rank lines: ticket (u32) at +0, then one encoded header per slot at +8 and +48.
const RANK_LINES_AT: usize = RANK_BYTES;
const HEADERS_AT: usize = 8;
const _: () = assert!(HEADERS_AT + 2 * HEADER_LEN <= RANK_BYTES);
/// Largest world size whose per-rank lines fit in the header.
pub(crate) const MAX_RANKS: usize = HEADER_BYTES / RANK_BYTES - 1;
/// Default slot: gradients up to this size take one barrier; larger ones are cut into
/// pieces of this size.
pub(crate) const DEFAULT_SLOT_BYTES: usize = 4 << 20;
/// Busy-wait iterations before sleeping on the futex: ranks usually arrive within
/// microseconds of each other, and a sleep/wake pair costs more than that.
const SPIN_ITERATIONS: u32 = 4000;
/// Longest single futex sleep, so liveness and deadlines are checked regularly.
const SLEEP_SLICE: Duration = Duration::from_millis(2);

/// Why a wait for a peer ended without the peer arriving.
#[derive(Debug)]
pub(crate) enum WaitError {
    /// This rank was aborted (its `AbortHandle`).
    Aborted,
    /// `rank` recorded a failure in the header.
    PeerFailed { rank: usize },
    /// A neighbour's TCP connection ended (`left` says which one).
    NeighbourClosed { left: bool },
    /// A neighbour sent TCP data: it runs an operation that does not use shared memory.
    NeighbourOnTcp { left: bool },
    /// `rank` did not arrive within the timeout.
    Timeout { rank: usize },
    /// A socket error while checking a neighbour.
    Io { left: bool, source: io::Error },
}

/// A mapped region; see the module docs.
#[derive(Debug)]
pub(crate) struct SharedRegion {
    base: NonNull<u8>,
    len: usize,
    world_size: usize,
    rank: usize,
    slot_bytes: usize,
    /// The ticket of this rank's last operation (the next one uses `ticket + 1`).
    ticket: u32,
}

// SAFETY: the region is plain shared memory; all cross-rank access goes through atomics and
// the barrier protocol above, and the struct itself is only used through `&mut self` methods
// or atomics.
unsafe impl Send for SharedRegion {}

fn region_len(world_size: usize, slot_bytes: usize) -> usize {
    HEADER_BYTES + world_size * 2 * slot_bytes
}

/// Where regions are created: `/dev/shm` (memory-backed on Linux), else the temp directory.
fn region_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// A name no other group on this host uses, and that a stale process of an earlier group
/// cannot guess (only rank 0 knows it until it broadcasts it).
fn unique_name() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    hasher.finish()
}

/// Names this machine and boot: ranks with different identities cannot share memory, even if
/// a file of the same name happens to exist for both.
pub(crate) fn host_identity() -> String {
    let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}/{}", host.trim(), boot.trim())
}

impl SharedRegion {
    /// Creates (rank 0) a zeroed region file with its pages reserved, so that running out of
    /// `/dev/shm` space shows up here as an error and never later as SIGBUS.
    pub(crate) fn create(world_size: usize, slot_bytes: usize) -> io::Result<(PathBuf, Self)> {
        let path = region_dir().join(format!("gantry-allreduce-{:016x}", unique_name()));
        // Owner-only: another user on the host has no business reading the gradients.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let len = region_len(world_size, slot_bytes);
        let reserved = i64::try_from(len)
            .map_err(io::Error::other)
            .and_then(|len| {
                // SAFETY: a valid descriptor and range.
                match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) } {
                    0 => Ok(()),
                    code => Err(io::Error::from_raw_os_error(code)),
                }
            });
        if let Err(e) = reserved {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        let region = match Self::map(&file, len, world_size, 0, slot_bytes) {
            Ok(region) => region,
            Err(e) => {
                let _ = fs::remove_file(&path);
                return Err(e);
            }
        };
        region
            .word64(WORLD_AT)
            .store(world_size as u64, Ordering::Relaxed);
        region
            .word64(SLOT_AT)
            .store(slot_bytes as u64, Ordering::Relaxed);
        region.word64(MAGIC_AT).store(MAGIC, Ordering::Release);
        Ok((path, region))
    }

    /// Maps the region rank 0 created at `path`, checking its header.
    pub(crate) fn open(
        path: &Path,
        world_size: usize,
        rank: usize,
        slot_bytes: usize,
    ) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = region_len(world_size, slot_bytes);
        if file.metadata()?.len() != len as u64 {
            return Err(io::Error::other(format!(
                "{} has the wrong size for {world_size} ranks",
                path.display()
            )));
        }
        let region = Self::map(&file, len, world_size, rank, slot_bytes)?;
        let header_ok = region.word64(MAGIC_AT).load(Ordering::Acquire) == MAGIC
            && region.word64(WORLD_AT).load(Ordering::Relaxed) == world_size as u64
            && region.word64(SLOT_AT).load(Ordering::Relaxed) == slot_bytes as u64;
        if !header_ok {
            return Err(io::Error::other(format!(
                "{} is not this group's region",
                path.display()
            )));
        }
        Ok(region)
    }

    fn map(
        file: &File,
        len: usize,
        world_size: usize,
        rank: usize,
        slot_bytes: usize,
    ) -> io::Result<Self> {
        if world_size == 0
            || world_size > MAX_RANKS
            || !slot_bytes.is_multiple_of(64)
            || slot_bytes == 0
        {
            return Err(io::Error::other(format!(
                "unsupported shared-memory geometry: {world_size} ranks, {slot_bytes}-byte slots"
            )));
        }
        // SAFETY: a shared read-write mapping of a file of `len` bytes; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap: null"))?;
        Ok(Self {
            base,
            len,
            world_size,
            rank,
            slot_bytes,
            ticket: 0,
        })
    }

    pub(crate) fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    pub(crate) fn slot_elems(&self) -> usize {
        self.slot_bytes / size_of::<f32>()
    }

    fn word64(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset.is_multiple_of(8) && offset + 8 <= HEADER_BYTES);
        // SAFETY: inside the mapped header, 8-byte aligned (the mapping is page aligned);
        // AtomicU64 has u64's layout, and the memory lives as long as `self`.
        unsafe { &*self.base.as_ptr().add(offset).cast::<AtomicU64>() }
    }

    fn failed(&self) -> &AtomicU32 {
        // SAFETY: as in `word64`, 4-byte aligned.
        unsafe { &*self.base.as_ptr().add(FAILED_AT).cast::<AtomicU32>() }
    }

    fn ticket_of(&self, rank: usize) -> &AtomicU32 {
        // SAFETY: as in `word64`; rank < world_size ≤ MAX_RANKS keeps it in the header.
        unsafe {
            &*self
                .base
                .as_ptr()
                .add(RANK_LINES_AT + rank * RANK_BYTES)
                .cast::<AtomicU32>()
        }
    }

    fn header_ptr(&self, rank: usize, parity: usize) -> *mut [u8; HEADER_LEN] {
        let at = RANK_LINES_AT + rank * RANK_BYTES + HEADERS_AT + parity * HEADER_LEN;
        // SAFETY: inside rank `rank`'s header lines (see the assertion by HEADERS_AT).
        unsafe { self.base.as_ptr().add(at).cast::<[u8; HEADER_LEN]>() }
    }

    fn slot_ptr(&self, rank: usize, parity: usize) -> *mut f32 {
        let offset = HEADER_BYTES + (rank * 2 + parity) * self.slot_bytes;
        debug_assert!(offset + self.slot_bytes <= self.len);
        // SAFETY: inside the mapping (checked above), 64-byte aligned.
        unsafe { self.base.as_ptr().add(offset).cast::<f32>() }
    }

    /// Records that this rank failed, for every other rank to see, and wakes sleepers.
    pub(crate) fn mark_failed(&self) {
        let _ = self.failed().compare_exchange(
            0,
            self.rank as u32 + 1,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        for r in 0..self.world_size {
            futex_wake(self.ticket_of(r));
        }
    }

    /// One piece of an all-reduce (`data.len() ≤ slot_elems()`): every rank's `data` summed in
    /// rank order (then divided by the world size when `average`), written back into `data`.
    /// `ours` describes the whole operation; `check` gets each peer's header as it decoded (or
    /// what was wrong with it) and returns the error to fail with.
    pub(crate) fn all_reduce_piece<E>(
        &mut self,
        data: &mut [f32],
        ours: &Header,
        average: bool,
        mut wait: impl FnMut(&mut Waiter<'_>) -> Result<(), E>,
        mut check: impl FnMut(usize, Result<Header, String>) -> Result<(), E>,
    ) -> Result<(), E> {
        assert!(data.len() <= self.slot_elems(), "piece larger than a slot");
        let n = data.len();
        let parity = self.exchange(
            ours,
            |slot| {
                // SAFETY: `slot` is our own slot of this parity (see `exchange`), `slot_elems()
                // ≥ n` floats long.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), slot.cast::<f32>(), n) }
            },
            &mut wait,
            &mut check,
        )?;
        // Every rank's piece for this ticket is in place and stays so until each rank has
        // announced the next, which cannot happen before we do.
        let slots: Vec<&[f32]> = (0..self.world_size)
            .map(|r| {
                // SAFETY: see above; `n` elements were written by rank `r` for this ticket.
                unsafe { std::slice::from_raw_parts(self.slot_ptr(r, parity).cast_const(), n) }
            })
            .collect();
        reduce_into(data, &slots, self.rank, average);
        Ok(())
    }

    /// One operation's exchange: `fill` writes this rank's data into its own slot of the
    /// operation's parity (it gets the slot's start), the header is written and the ticket
    /// announced; then every peer's announcement is waited for and its header checked.
    /// Returns the parity, whose slots every rank may read until this rank announces the
    /// next ticket.
    fn exchange<E>(
        &mut self,
        ours: &Header,
        fill: impl FnOnce(*mut u8),
        wait: &mut impl FnMut(&mut Waiter<'_>) -> Result<(), E>,
        check: &mut impl FnMut(usize, Result<Header, String>) -> Result<(), E>,
    ) -> Result<usize, E> {
        let ticket = self.ticket.wrapping_add(1);
        let parity = (ticket % 2) as usize;
        // Our own slot of this parity: no peer reads it until we announce `ticket`, and every
        // peer has finished reading it for `ticket - 2` (it announced `ticket - 1`, which we
        // waited for in the previous operation).
        fill(self.slot_ptr(self.rank, parity).cast::<u8>());
        // SAFETY: our own header of this parity, as for the slot above; published by the
        // Release store of the ticket below.
        unsafe { self.header_ptr(self.rank, parity).write(ours.encode()) };
        self.ticket = ticket;
        self.ticket_of(self.rank).store(ticket, Ordering::Release);
        futex_wake(self.ticket_of(self.rank));

        for peer in (0..self.world_size).filter(|&r| r != self.rank) {
            wait(&mut Waiter {
                region: self,
                peer,
                ticket,
            })?;
            // SAFETY: the peer wrote it before announcing `ticket` (Acquire in the wait), and
            // does not write this parity again before we announce `ticket + 1`.
            let theirs = unsafe { self.header_ptr(peer, parity).read() };
            check(peer, Header::decode(&theirs))?;
        }
        Ok(parity)
    }

    /// An all-reduce of gradient pieces (see [`crate::Collective::all_reduce_pieces`]), one
    /// chunk of [`PieceLayout`] per ticket: each segment goes into this rank's slot as it is
    /// (bf16 in half the bytes of f32); once every rank has announced the chunk, every element
    /// is summed in rank order from the slots (this rank's term from its own piece, as
    /// [`reduce_into`] does), divided by the world size for an average and written into
    /// `out`. The sums are exactly those of [`Self::all_reduce_piece`] on the widened values.
    /// Returns whether every result is finite, found in the same pass.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn all_reduce_pieces<E>(
        &mut self,
        pieces: &[GradientPiece<'_>],
        layout: &PieceLayout,
        out: &mut [f32],
        ours: &Header,
        average: bool,
        mut wait: impl FnMut(&mut Waiter<'_>) -> Result<(), E>,
        mut check: impl FnMut(usize, Result<Header, String>) -> Result<(), E>,
    ) -> Result<bool, E> {
        assert_eq!(
            layout.slot_bytes, self.slot_bytes,
            "layout for another slot size"
        );
        let scale = self.world_size as f32;
        let mut non_finite = 0u32;
        for chunk in &layout.chunks {
            let parity = self.exchange(
                ours,
                |slot| {
                    for seg in chunk {
                        // SAFETY: our own slot (see `exchange`); the layout keeps every segment
                        // inside it, apart from the others and aligned for its kind.
                        unsafe {
                            let to = slot.add(seg.at);
                            match pieces[seg.piece].segment(seg.start, seg.len) {
                                GradientPiece::F32(v) => std::ptr::copy_nonoverlapping(
                                    v.as_ptr(),
                                    to.cast::<f32>(),
                                    v.len(),
                                ),
                                GradientPiece::Bf16(v) => std::ptr::copy_nonoverlapping(
                                    v.as_ptr(),
                                    to.cast::<u16>(),
                                    v.len(),
                                ),
                            }
                        }
                    }
                },
                &mut wait,
                &mut check,
            )?;
            for seg in chunk {
                let ours = pieces[seg.piece].segment(seg.start, seg.len);
                let terms: Vec<GradientPiece<'_>> = (0..self.world_size)
                    .map(|r| {
                        if r == self.rank {
                            return ours;
                        }
                        // SAFETY: rank `r` wrote this segment, of the same kind and length (its
                        // header carries the pieces' fingerprint, checked above, and the layout
                        // follows from the pieces and the slot size, which every rank shares),
                        // before announcing, and does not write this parity again before we
                        // announce the next ticket.
                        unsafe {
                            let from = self
                                .slot_ptr(r, parity)
                                .cast::<u8>()
                                .add(seg.at)
                                .cast_const();
                            match ours {
                                GradientPiece::F32(_) => GradientPiece::F32(
                                    std::slice::from_raw_parts(from.cast::<f32>(), seg.len),
                                ),
                                GradientPiece::Bf16(_) => GradientPiece::Bf16(
                                    std::slice::from_raw_parts(from.cast::<u16>(), seg.len),
                                ),
                            }
                        }
                    })
                    .collect();
                let into = &mut out[seg.out..seg.out + seg.len];
                non_finite |= reduce_terms_into(into, &terms, average.then_some(scale));
            }
        }
        Ok(non_finite == 0)
    }
}

/// Where [`SharedRegion::all_reduce_pieces`] puts the pieces: in chunks of at most a slot, one
/// ticket each, pieces cut where a chunk is full; each segment starts on a cache line of its
/// own, so it is aligned for its kind.
#[derive(Debug)]
pub(crate) struct PieceLayout {
    pub chunks: Vec<Vec<Segment>>,
    slot_bytes: usize,
}

/// Elements `start..start + len` of piece `piece`, at byte `at` of the chunk's slot and
/// element `out` of the result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    pub piece: usize,
    pub start: usize,
    pub len: usize,
    pub at: usize,
    pub out: usize,
}

impl PieceLayout {
    /// The layout of `pieces` in slots of `slot_bytes` (at least 64). Empty pieces take no
    /// room; no pieces at all still take one (empty) chunk, so the ranks meet once.
    pub fn of(pieces: &[GradientPiece<'_>], slot_bytes: usize) -> Self {
        const LINE: usize = 64;
        let mut chunks = vec![Vec::new()];
        let mut used = 0;
        let mut out = 0;
        for (piece, p) in pieces.iter().enumerate() {
            let size = p.bytes() / p.len().max(1);
            let mut start = 0;
            while start < p.len() {
                let room = slot_bytes.saturating_sub(used) / size;
                if room == 0 {
                    chunks.push(Vec::new());
                    used = 0;
                    continue;
                }
                let len = room.min(p.len() - start);
                chunks
                    .last_mut()
                    .expect("one chunk at least")
                    .push(Segment {
                        piece,
                        start,
                        len,
                        at: used,
                        out,
                    });
                used = (used + len * size).next_multiple_of(LINE);
                start += len;
                out += len;
            }
        }
        Self { chunks, slot_bytes }
    }
}

gantry_simd::widest! {
    /// `into ← (Σ_r terms[r]) [/ scale]`, in rank order, every term widened to f32 exactly (the
    /// same additions as [`reduce_into`] makes on the widened values); returns non-zero when a
    /// result is not finite.
    fn reduce_terms_into(into: &mut [f32], terms: &[GradientPiece<'_>], scale: Option<f32>) -> u32 => sum_terms
}

#[inline(always)]
fn sum_terms(into: &mut [f32], terms: &[GradientPiece<'_>], scale: Option<f32>) -> u32 {
    const BLOCK: usize = 1024;
    let mut acc = [0.0f32; BLOCK];
    let mut non_finite = 0u32;
    for start in (0..into.len()).step_by(BLOCK) {
        let end = (start + BLOCK).min(into.len());
        let acc = &mut acc[..end - start];
        for (r, term) in terms.iter().enumerate() {
            match (r, term) {
                (0, GradientPiece::F32(v)) => acc.copy_from_slice(&v[start..end]),
                (0, GradientPiece::Bf16(v)) => {
                    for (a, b) in acc.iter_mut().zip(&v[start..end]) {
                        *a = widen(*b);
                    }
                }
                (_, GradientPiece::F32(v)) => {
                    for (a, b) in acc.iter_mut().zip(&v[start..end]) {
                        *a += *b;
                    }
                }
                (_, GradientPiece::Bf16(v)) => {
                    for (a, b) in acc.iter_mut().zip(&v[start..end]) {
                        *a += widen(*b);
                    }
                }
            }
        }
        if let Some(scale) = scale {
            for a in acc.iter_mut() {
                *a /= scale;
            }
        }
        for (o, a) in into[start..end].iter_mut().zip(acc.iter()) {
            *o = *a;
            // An exponent of all ones: an infinity or a NaN.
            non_finite |= u32::from(a.to_bits() & 0x7f80_0000 == 0x7f80_0000);
        }
    }
    non_finite
}

/// A bf16 value (its bits) as f32: exact.
#[inline(always)]
fn widen(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

impl SharedRegion {
    /// Hierarchical, the leader's side of one piece (see the module docs): waits for every
    /// member's piece, sums all of them in local rank order into `data`, lets `finish` turn
    /// the host sum into the result, and publishes that for the members. `wait` and `check`
    /// are as for [`Self::all_reduce_piece`].
    pub(crate) fn lead_piece<E>(
        &mut self,
        data: &mut [f32],
        ours: &Header,
        mut wait: impl FnMut(&mut Waiter<'_>) -> Result<(), E>,
        mut check: impl FnMut(usize, Result<Header, String>) -> Result<(), E>,
        finish: impl FnOnce(&mut [f32]) -> Result<(), E>,
    ) -> Result<(), E> {
        assert!(data.len() <= self.slot_elems(), "piece larger than a slot");
        debug_assert_eq!(self.rank, 0, "local rank 0 leads");
        let (contributed, published, parity) = self.piece_tickets();
        let n = data.len();
        for peer in 1..self.world_size {
            wait(&mut Waiter {
                region: self,
                peer,
                ticket: contributed,
            })?;
            // SAFETY: the member wrote it before announcing `contributed` (Acquire in the
            // wait), and does not write this parity again before we publish.
            let theirs = unsafe { self.header_ptr(peer, parity).read() };
            check(peer, Header::decode(&theirs))?;
        }
        {
            let slots: Vec<&[f32]> = (0..self.world_size)
                .map(|r| {
                    // SAFETY: every member's piece is in place (waited for above) and stays so
                    // until we publish; our own slot is not read (`reduce_into` takes our term
                    // from `data`).
                    unsafe { std::slice::from_raw_parts(self.slot_ptr(r, parity).cast_const(), n) }
                })
                .collect();
            reduce_into(data, &slots, 0, false);
        }
        finish(data)?;
        // SAFETY: our slot and header of this parity: members last read them for the piece
        // before the previous one, and have all announced the previous piece since.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.slot_ptr(0, parity), n);
            self.header_ptr(0, parity).write(ours.encode());
        }
        self.ticket = published;
        self.ticket_of(0).store(published, Ordering::Release);
        futex_wake(self.ticket_of(0));
        Ok(())
    }

    /// Hierarchical, a member's side of one piece: hands `data` to the leader and replaces it
    /// with the leader's result. `check` gets the leader's header (as it decoded).
    pub(crate) fn follow_piece<E>(
        &mut self,
        data: &mut [f32],
        ours: &Header,
        wait: impl FnOnce(&mut Waiter<'_>) -> Result<(), E>,
        check: impl FnOnce(Result<Header, String>) -> Result<(), E>,
    ) -> Result<(), E> {
        assert!(data.len() <= self.slot_elems(), "piece larger than a slot");
        debug_assert_ne!(self.rank, 0, "local rank 0 leads");
        let (contributed, published, parity) = self.piece_tickets();
        let n = data.len();
        // SAFETY: our own slot and header of this parity: the leader read them for the piece
        // before the previous one before publishing that, which we waited for.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.slot_ptr(self.rank, parity), n);
            self.header_ptr(self.rank, parity).write(ours.encode());
        }
        self.ticket_of(self.rank)
            .store(contributed, Ordering::Release);
        futex_wake(self.ticket_of(self.rank));
        wait(&mut Waiter {
            region: self,
            peer: 0,
            ticket: published,
        })?;
        // SAFETY: the leader wrote its header and result before publishing (Acquire in the
        // wait) and does not write this parity again before we announce the next piece.
        let theirs = unsafe { self.header_ptr(0, parity).read() };
        check(Header::decode(&theirs))?;
        // SAFETY: as above; `n` elements, since the header check found the same operation.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.slot_ptr(0, parity).cast_const(),
                data.as_mut_ptr(),
                n,
            )
        };
        self.ticket = published;
        Ok(())
    }

    /// The tickets of the next hierarchical piece (members announce the first, the leader
    /// the second) and its slot parity.
    fn piece_tickets(&self) -> (u32, u32, usize) {
        let contributed = self.ticket.wrapping_add(1);
        let published = self.ticket.wrapping_add(2);
        // `ticket` is even here (two per piece), so this is the piece number's parity.
        let parity = ((self.ticket / 2) % 2) as usize;
        (contributed, published, parity)
    }
}

gantry_simd::widest! {
    /// `data ← (Σ_r slots[r]) [/ n]`, summed in rank order so every rank gets the same bits, in
    /// one pass over memory: blocks small enough to stay in L1 collect the sum, and this rank's
    /// own term is read from `data` (equal to its slot) rather than from shared memory.
    fn reduce_into(data: &mut [f32], slots: &[&[f32]], me: usize, average: bool) => sum_slots
}

#[inline(always)]
fn sum_slots(data: &mut [f32], slots: &[&[f32]], me: usize, average: bool) {
    const BLOCK: usize = 1024;
    let scale = slots.len() as f32;
    let mut acc = [0.0f32; BLOCK];
    for start in (0..data.len()).step_by(BLOCK) {
        let end = (start + BLOCK).min(data.len());
        let acc = &mut acc[..end - start];
        for (r, slot) in slots.iter().enumerate() {
            let term = if r == me {
                &data[start..end]
            } else {
                &slot[start..end]
            };
            if r == 0 {
                acc.copy_from_slice(term);
            } else {
                for (a, b) in acc.iter_mut().zip(term) {
                    *a += *b;
                }
            }
        }
        if average {
            for a in acc.iter_mut() {
                *a /= scale;
            }
        }
        data[start..end].copy_from_slice(acc);
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

/// One rank waiting for one peer to announce a ticket; see [`Waiter::wait`].
#[derive(Debug)]
pub(crate) struct Waiter<'r> {
    region: &'r SharedRegion,
    peer: usize,
    ticket: u32,
}

impl Waiter<'_> {
    /// Waits until the peer has announced this ticket (or the next one). Spins briefly, then
    /// sleeps on the peer's futex word in short slices, checking between them for this rank's
    /// abort flag, a failure recorded by any rank, the neighbours' TCP connections and the
    /// deadline.
    ///
    /// `may_be_ahead[i]` is `Some(seq)` when neighbour `i` (left, right) may already have
    /// finished operation `seq` (see the module docs): its closing is then no failure, nor its
    /// TCP data if that starts with a header of a later operation.
    pub(crate) fn wait(
        &mut self,
        timeout: Duration,
        aborted: impl Fn() -> bool,
        neighbours: [&TcpStream; 2],
        may_be_ahead: [Option<u64>; 2],
    ) -> Result<(), WaitError> {
        let word = self.region.ticket_of(self.peer);
        let arrived = |seen: u32| (seen.wrapping_sub(self.ticket) as i32) >= 0;
        for _ in 0..SPIN_ITERATIONS {
            if arrived(word.load(Ordering::Acquire)) {
                return Ok(());
            }
            std::hint::spin_loop();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let seen = word.load(Ordering::Acquire);
            if arrived(seen) {
                return Ok(());
            }
            if let Err(e) = self.trouble(&aborted, neighbours, may_be_ahead, deadline) {
                // The peer may have arrived, finished, and moved on to a TCP operation or
                // closed its connections (its last operation done) since the load above:
                // that is not a failure of this operation.
                if arrived(word.load(Ordering::Acquire)) {
                    return Ok(());
                }
                return Err(e);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            futex_wait(word, seen, SLEEP_SLICE.min(left));
        }
    }

    /// Anything that ends the wait other than the peer's arrival.
    fn trouble(
        &self,
        aborted: &impl Fn() -> bool,
        neighbours: [&TcpStream; 2],
        may_be_ahead: [Option<u64>; 2],
        deadline: Instant,
    ) -> Result<(), WaitError> {
        if aborted() {
            return Err(WaitError::Aborted);
        }
        match self.region.failed().load(Ordering::SeqCst) {
            0 => {}
            failed => {
                return Err(WaitError::PeerFailed {
                    rank: failed as usize - 1,
                });
            }
        }
        for ((left, stream), ahead) in [(true, neighbours[0]), (false, neighbours[1])]
            .into_iter()
            .zip(may_be_ahead)
        {
            let peeked = match ahead {
                None => peek(stream),
                Some(seq) => peek_tolerating_later(stream, seq),
            };
            match peeked {
                Ok(Peeked::Nothing) => {}
                Ok(Peeked::Closed) => return Err(WaitError::NeighbourClosed { left }),
                Ok(Peeked::Data) => return Err(WaitError::NeighbourOnTcp { left }),
                Err(source) => return Err(WaitError::Io { left, source }),
            }
        }
        if Instant::now() >= deadline {
            return Err(WaitError::Timeout { rank: self.peer });
        }
        Ok(())
    }
}

enum Peeked {
    Nothing,
    Data,
    Closed,
}

/// Looks at a socket without blocking or consuming anything.
fn peek(stream: &TcpStream) -> io::Result<Peeked> {
    let mut byte = 0u8;
    // SAFETY: a valid socket and a one-byte buffer.
    let got = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            (&raw mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match got {
        0 => Ok(Peeked::Closed),
        n if n > 0 => Ok(Peeked::Data),
        _ => {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(Peeked::Nothing),
                io::ErrorKind::ConnectionReset
                | io::ErrorKind::NotConnected
                | io::ErrorKind::BrokenPipe => Ok(Peeked::Closed),
                _ => Err(e),
            }
        }
    }
}

/// [`peek`] for a neighbour that may have finished operation `seq` (see the module docs):
/// closed, or a header of a later operation, or part of a header, reads as nothing; only a
/// whole header of operation `seq` or earlier (or garbage) as data.
fn peek_tolerating_later(stream: &TcpStream, seq: u64) -> io::Result<Peeked> {
    let mut raw = [0u8; HEADER_LEN];
    // SAFETY: a valid socket and a buffer of HEADER_LEN bytes.
    let got = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            raw.as_mut_ptr().cast(),
            HEADER_LEN,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match got {
        n if n >= HEADER_LEN as isize => match Header::decode(&raw) {
            Ok(header) if header.seq > seq => Ok(Peeked::Nothing),
            _ => Ok(Peeked::Data),
        },
        n if n >= 0 => Ok(Peeked::Nothing),
        _ => {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::Interrupted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::NotConnected
                | io::ErrorKind::BrokenPipe => Ok(Peeked::Nothing),
                _ => Err(e),
            }
        }
    }
}

/// Sleeps while `*word == expected`, at most `timeout` (spurious wake-ups are fine: callers
/// loop). Not FUTEX_PRIVATE: the word is shared between processes.
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: a valid, aligned futex word and timespec for the call's duration.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &raw const ts,
            std::ptr::null::<u32>(),
            0,
        );
    }
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: a valid, aligned futex word.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piece_layouts_cover_every_element_once_within_aligned_slots() {
        let halves = vec![0u16; 37];
        let fulls = vec![0f32; 100];
        let pieces = [
            GradientPiece::Bf16(&halves),
            GradientPiece::F32(&[]),
            GradientPiece::F32(&fulls),
            GradientPiece::Bf16(&halves[..1]),
        ];
        for slot_bytes in [64, 100, 4096] {
            let layout = PieceLayout::of(&pieces, slot_bytes);
            let mut covered = vec![Vec::new(); pieces.len()];
            let mut next_out = 0;
            for chunk in &layout.chunks {
                let mut end = 0;
                for seg in chunk {
                    let size = pieces[seg.piece].bytes() / pieces[seg.piece].len();
                    assert!(
                        seg.at >= end && seg.at % 64 == 0,
                        "{seg:?}: overlaps or unaligned"
                    );
                    end = seg.at + seg.len * size;
                    assert!(end <= slot_bytes, "{seg:?} leaves a slot of {slot_bytes}");
                    assert_eq!(seg.out, next_out, "{seg:?}: results in piece order");
                    next_out += seg.len;
                    covered[seg.piece].extend(seg.start..seg.start + seg.len);
                }
            }
            for (piece, got) in pieces.iter().zip(&covered) {
                assert_eq!(
                    *got,
                    (0..piece.len()).collect::<Vec<_>>(),
                    "slot {slot_bytes}"
                );
            }
        }
        assert_eq!(
            PieceLayout::of(&pieces, 4096).chunks.len(),
            1,
            "fits one slot"
        );
        assert!(
            PieceLayout::of(&pieces, 64).chunks.len() > 1,
            "cut into chunks"
        );
        let nothing = PieceLayout::of(&[], 64);
        assert_eq!(
            nothing.chunks.len(),
            1,
            "nothing still meets the others once"
        );
    }

    #[test]
    fn open_refuses_a_region_of_another_geometry() {
        let (path, _owner) = SharedRegion::create(2, 4096).unwrap();
        assert!(SharedRegion::open(&path, 2, 1, 4096).is_ok());
        let err = SharedRegion::open(&path, 3, 1, 4096).unwrap_err();
        assert!(err.to_string().contains("wrong size"), "{err}");
        let err = SharedRegion::open(&path, 2, 1, 2048).unwrap_err();
        assert!(err.to_string().contains("wrong size"), "{err}");
        fs::remove_file(&path).unwrap();
        assert!(SharedRegion::open(&path, 2, 1, 4096).is_err());
    }
}
