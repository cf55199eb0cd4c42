//! Fixed-size little-endian messages exchanged between ring neighbours.
//!
//! Fixed sizes keep parsing trivial and let a garbage or foreign connection be
//! rejected after reading a few bytes (magic and version come first).

/// "GNTRYCOL": rejects connections from unrelated programs early.
pub(crate) const MAGIC: u64 = u64::from_le_bytes(*b"GNTRYCOL");
/// Bumped whenever any message layout or the data order changes (2: the handshake proves
/// the ring secret; 3: joining shared memory starts by gathering every rank's host, and may
/// build a ring of host leaders).
pub(crate) const VERSION: u32 = 3;

/// Random bytes each side of a handshake contributes, so that no proof can be replayed.
pub(crate) const NONCE_LEN: usize = 16;
/// An HMAC-SHA256 proof.
pub(crate) const PROOF_LEN: usize = 32;

/// Which side of a handshake a proof comes from (the two proofs of one handshake differ, so
/// neither can be reflected back as the other).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// The rank that dialled its right neighbour.
    Dialer,
    /// The rank that accepted its left neighbour.
    Acceptor,
}

/// HMAC-SHA256 under the ring secret of everything both sides said in the handshake: who each
/// claims to be and both nonces. Only a holder of the secret (handed out in the authenticated
/// Join reply) can compute it.
fn keyed(
    secret: &[u8],
    side: Side,
    dialer: &Hello,
    acceptor: &Hello,
    nonces: (&[u8; NONCE_LEN], &[u8; NONCE_LEN]),
) -> hmac::Hmac<sha2::Sha256> {
    use hmac::Mac;
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    let label: &[u8] = match side {
        Side::Dialer => b"gantry ring dialer",
        Side::Acceptor => b"gantry ring acceptor",
    };
    mac.update(label);
    mac.update(&dialer.encode());
    mac.update(&acceptor.encode());
    mac.update(nonces.0);
    mac.update(nonces.1);
    mac
}

/// The proof `side` sends (see [`keyed`]).
pub(crate) fn proof(
    secret: &[u8],
    side: Side,
    dialer: &Hello,
    acceptor: &Hello,
    nonces: (&[u8; NONCE_LEN], &[u8; NONCE_LEN]),
) -> [u8; PROOF_LEN] {
    use hmac::Mac;
    keyed(secret, side, dialer, acceptor, nonces)
        .finalize()
        .into_bytes()
        .into()
}

/// Whether `presented` is `side`'s proof, compared in constant time.
pub(crate) fn proven(
    presented: &[u8; PROOF_LEN],
    secret: &[u8],
    side: Side,
    dialer: &Hello,
    acceptor: &Hello,
    nonces: (&[u8; NONCE_LEN], &[u8; NONCE_LEN]),
) -> bool {
    use hmac::Mac;
    keyed(secret, side, dialer, acceptor, nonces)
        .verify_slice(presented)
        .is_ok()
}

/// The secret of a ring that the group's ring secret authorises but that must not accept a
/// handshake proven for the group's own ring (nor the reverse): HMAC-SHA256 of `label` under
/// the group's secret. Only a holder of the group's secret can compute it; an empty group
/// secret gives a key anyone can compute, as it does for the group's ring.
pub(crate) fn derived_secret(secret: &[u8], label: &[u8]) -> Vec<u8> {
    use hmac::Mac;
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(label);
    mac.finalize().into_bytes().to_vec()
}

/// Sent by the connecting rank right after connecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hello {
    pub version: u32,
    pub rank: u32,
    pub world_size: u32,
    pub session_id: u64,
}

pub(crate) const HELLO_LEN: usize = 32;

impl Hello {
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.rank.to_le_bytes());
        b[16..20].copy_from_slice(&self.world_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.session_id.to_le_bytes());
        b
    }

    /// `None` when the magic is wrong: the sender is not a Gantry rank at all.
    pub fn decode(b: &[u8; HELLO_LEN]) -> Option<Self> {
        if u64::from_le_bytes(b[0..8].try_into().ok()?) != MAGIC {
            return None;
        }
        Some(Hello {
            version: u32::from_le_bytes(b[8..12].try_into().ok()?),
            rank: u32::from_le_bytes(b[12..16].try_into().ok()?),
            world_size: u32::from_le_bytes(b[16..20].try_into().ok()?),
            session_id: u64::from_le_bytes(b[24..32].try_into().ok()?),
        })
    }
}

/// The accepting side answers a [`Hello`] with its own identity plus a verdict,
/// so both ends verify each other and the refused side learns why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ack {
    pub accepted: bool,
    pub me: Hello,
}

pub(crate) const ACK_LEN: usize = HELLO_LEN + 8;

impl Ack {
    pub fn encode(&self) -> [u8; ACK_LEN] {
        let mut b = [0u8; ACK_LEN];
        b[..HELLO_LEN].copy_from_slice(&self.me.encode());
        b[HELLO_LEN] = u8::from(self.accepted);
        b
    }

    pub fn decode(b: &[u8; ACK_LEN]) -> Option<Self> {
        let me = Hello::decode(b[..HELLO_LEN].try_into().ok()?)?;
        Some(Ack {
            accepted: b[HELLO_LEN] == 1,
            me,
        })
    }
}

/// Which collective an operation header announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum OpKind {
    AllReduce = 1,
    BroadcastF32 = 2,
    BroadcastBytes = 3,
    Barrier = 4,
    /// An all-reduce of gradient pieces through shared memory; see
    /// [`crate::Collective::all_reduce_pieces`].
    AllReducePieces = 5,
}

impl OpKind {
    pub fn name(self) -> &'static str {
        match self {
            OpKind::AllReduce => "all-reduce",
            OpKind::BroadcastF32 => "broadcast",
            OpKind::BroadcastBytes => "broadcast-bytes",
            OpKind::Barrier => "barrier",
            OpKind::AllReducePieces => "all-reduce of gradient pieces",
        }
    }

    fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => OpKind::AllReduce,
            2 => OpKind::BroadcastF32,
            3 => OpKind::BroadcastBytes,
            4 => OpKind::Barrier,
            5 => OpKind::AllReducePieces,
            _ => return None,
        })
    }
}

/// Precedes every operation's data so that ranks disagreeing on what they
/// are doing (operation, order, length, root or reduce op) fail loudly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub kind: OpKind,
    pub seq: u64,
    /// Elements (f32 operations) or bytes (byte broadcast).
    pub count: u64,
    /// Root rank for broadcasts, [`crate::ReduceOp::code`] for reductions (for an
    /// all-reduce of pieces, in the lowest bit, above it a fingerprint of the pieces' kinds
    /// and lengths).
    pub extra: u64,
}

pub(crate) const HEADER_LEN: usize = 40;

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        b[8..12].copy_from_slice(&(self.kind as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.count.to_le_bytes());
        b[32..40].copy_from_slice(&self.extra.to_le_bytes());
        b
    }

    /// `Err` carries a description of what was wrong with the bytes.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, String> {
        let magic = u64::from_le_bytes(b[0..8].try_into().expect("8 bytes"));
        if magic != MAGIC {
            return Err(format!(
                "bad header magic {magic:#018x}: the byte stream is out of step"
            ));
        }
        let kind_raw = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        let kind =
            OpKind::from_u32(kind_raw).ok_or_else(|| format!("unknown operation {kind_raw}"))?;
        Ok(Header {
            kind,
            seq: u64::from_le_bytes(b[16..24].try_into().expect("8 bytes")),
            count: u64::from_le_bytes(b[24..32].try_into().expect("8 bytes")),
            extra: u64::from_le_bytes(b[32..40].try_into().expect("8 bytes")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_rejects_bad_magic() {
        let h = Header {
            kind: OpKind::BroadcastBytes,
            seq: 7,
            count: 1 << 40,
            extra: 3,
        };
        let mut b = h.encode();
        assert_eq!(Header::decode(&b), Ok(h));
        b[0] ^= 1;
        assert!(Header::decode(&b).unwrap_err().contains("magic"));
    }

    #[test]
    fn derived_secrets_differ_by_label_and_by_secret() {
        let leaders = derived_secret(b"s", b"leaders");
        assert_eq!(leaders, derived_secret(b"s", b"leaders"));
        assert_eq!(leaders.len(), 32);
        assert_ne!(leaders, derived_secret(b"s", b"other"));
        assert_ne!(leaders, derived_secret(b"t", b"leaders"));
        assert_ne!(leaders, b"s".to_vec());
    }

    #[test]
    fn hello_and_ack_round_trip() {
        let me = Hello {
            version: VERSION,
            rank: 2,
            world_size: 4,
            session_id: 0xdead_beef,
        };
        assert_eq!(Hello::decode(&me.encode()), Some(me));
        let ack = Ack {
            accepted: false,
            me,
        };
        assert_eq!(Ack::decode(&ack.encode()), Some(ack));
        assert_eq!(Hello::decode(&[0u8; HELLO_LEN]), None);
    }
}
