//! The probe wire format, shared by every transport.
//!
//! 40 bytes, big-endian (56 when authenticated):
//!
//! ```text
//! 0      4       5      6       7        8           16    24    32    40      56
//! | PMSH | ver=1 | type | flags | key id | prober_id | seq | t3  | t4  | [tag] |
//! ```
//!
//! `prober_id` is random per prober instance, so ACKs meant for a previous run of
//! an agent (same port, new process) are told apart from ours. `t3`/`t4` are the
//! responder's receive and first-ACK send timestamps; only ACK2 carries them.
//!
//! An authenticated message (the mesh hands out probe keys, see
//! [`super::auth`]) sets [`FLAG_AUTHENTICATED`], carries the key id in byte 7
//! and is followed by a 16-byte tag over the first 40 bytes: 56 bytes in all.
//! A plain message keeps byte 7 zero, so agents without keys speak exactly the
//! 40-byte format of before. Decoding checks the framing only; whether the tag
//! is right is [`super::auth`]'s separate step.

use thiserror::Error;

pub const MAGIC: [u8; 4] = *b"PMSH";
pub const VERSION: u8 = 1;
pub const MESSAGE_LEN: usize = 40;
/// An authenticated message: the 40 bytes, then the tag.
pub const AUTHENTICATED_LEN: usize = MESSAGE_LEN + TAG_LEN;
pub use pingmesh_proto::probe_auth::TAG_LEN;

/// ACK2 flag: the responder had no kernel/NIC timestamps; t3/t4 are host monotonic.
pub const FLAG_RESPONDER_SOFTWARE_TIMED: u8 = 0b0000_0001;
/// The message is 56 bytes: byte 7 names the key, a tag follows (see above).
/// A framing bit: [`Message::decode`] takes it off, [`Message::encode`] never
/// sets it ([`Message::encode_authenticated`] does).
pub const FLAG_AUTHENTICATED: u8 = 0b0000_0010;
const KNOWN_FLAGS: u8 = FLAG_RESPONDER_SOFTWARE_TIMED | FLAG_AUTHENTICATED;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    Probe = 1,
    Ack1 = 2,
    Ack2 = 3,
}

impl MessageType {
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Probe),
            2 => Some(Self::Ack1),
            3 => Some(Self::Ack2),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message {
    pub kind: MessageType,
    pub flags: u8,
    pub prober_id: u64,
    pub seq: u64,
    pub t3_ns: u64,
    pub t4_ns: u64,
}

impl Message {
    pub fn probe(prober_id: u64, seq: u64) -> Self {
        Self {
            kind: MessageType::Probe,
            flags: 0,
            prober_id,
            seq,
            t3_ns: 0,
            t4_ns: 0,
        }
    }

    /// The first ACK for `probe`: sent at once, carries nothing but identity.
    pub fn ack1(probe: &Message) -> Self {
        Self {
            kind: MessageType::Ack1,
            flags: 0,
            t3_ns: 0,
            t4_ns: 0,
            ..*probe
        }
    }

    /// The second ACK for `probe`, carrying the responder's T3 and T4.
    pub fn ack2(probe: &Message, t3_ns: u64, t4_ns: u64, software_timed: bool) -> Self {
        let flags = if software_timed {
            FLAG_RESPONDER_SOFTWARE_TIMED
        } else {
            0
        };
        Self {
            kind: MessageType::Ack2,
            flags,
            t3_ns,
            t4_ns,
            ..*probe
        }
    }

    pub fn responder_software_timed(&self) -> bool {
        self.flags & FLAG_RESPONDER_SOFTWARE_TIMED != 0
    }

    pub fn encode(&self) -> [u8; MESSAGE_LEN] {
        let mut out = [0u8; MESSAGE_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[5] = self.kind as u8;
        // The authenticated flag is framing, set only with the tag.
        out[6] = self.flags & !FLAG_AUTHENTICATED;
        out[8..16].copy_from_slice(&self.prober_id.to_be_bytes());
        out[16..24].copy_from_slice(&self.seq.to_be_bytes());
        out[24..32].copy_from_slice(&self.t3_ns.to_be_bytes());
        out[32..40].copy_from_slice(&self.t4_ns.to_be_bytes());
        out
    }

    /// The authenticated form: flag set, `key_id` in byte 7, `tag` (made by
    /// the caller's `tag_of` over the first 40 bytes) after.
    pub fn encode_authenticated(
        &self,
        key_id: u8,
        tag_of: impl FnOnce(&[u8]) -> [u8; TAG_LEN],
    ) -> [u8; AUTHENTICATED_LEN] {
        let mut out = [0u8; AUTHENTICATED_LEN];
        out[..MESSAGE_LEN].copy_from_slice(&self.encode());
        out[6] |= FLAG_AUTHENTICATED;
        out[7] = key_id;
        let tag = tag_of(&out[..MESSAGE_LEN]);
        out[MESSAGE_LEN..].copy_from_slice(&tag);
        out
    }

    /// Strict decoding: anything but a well-formed message of this version is
    /// an error. Takes plain (40-byte) and authenticated (56-byte) messages;
    /// the tag of an authenticated one is not checked here.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let authenticated = match buf.len() {
            MESSAGE_LEN => false,
            AUTHENTICATED_LEN => true,
            len => return Err(DecodeError::WrongLength(len)),
        };
        let mut bytes = [0u8; MESSAGE_LEN];
        bytes.copy_from_slice(&buf[..MESSAGE_LEN]);
        if bytes[0..4] != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        if bytes[4] != VERSION {
            return Err(DecodeError::UnsupportedVersion(bytes[4]));
        }
        let kind = MessageType::from_byte(bytes[5]).ok_or(DecodeError::UnknownType(bytes[5]))?;
        let flags = bytes[6];
        if flags & !KNOWN_FLAGS != 0 {
            return Err(DecodeError::ReservedBitsSet);
        }
        // Flag, key id and length must agree: a plain message has byte 7 zero,
        // an authenticated one names a key (ids are 1..=255).
        let flagged = flags & FLAG_AUTHENTICATED != 0;
        if flagged != authenticated || (bytes[7] != 0) != authenticated {
            return Err(DecodeError::AuthFraming);
        }
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[at..at + 8]);
            u64::from_be_bytes(w)
        };
        Ok(Self {
            kind,
            flags: flags & !FLAG_AUTHENTICATED,
            prober_id: word(8),
            seq: word(16),
            t3_ns: word(24),
            t4_ns: word(32),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("probe message must be {MESSAGE_LEN} or {AUTHENTICATED_LEN} bytes, got {0}")]
    WrongLength(usize),
    #[error("probe message does not start with the PMSH magic")]
    BadMagic,
    #[error("probe message version {0} is not supported (this agent speaks {VERSION})")]
    UnsupportedVersion(u8),
    #[error("probe message type {0} is unknown")]
    UnknownType(u8),
    #[error("probe message sets reserved flag bits")]
    ReservedBitsSet,
    #[error("probe message's authenticated flag, key id and length disagree")]
    AuthFraming,
}

impl DecodeError {
    /// Bounded label for the malformed-packet counter.
    pub fn category(&self) -> &'static str {
        match self {
            Self::WrongLength(_) => "wrong_length",
            Self::BadMagic => "bad_magic",
            Self::UnsupportedVersion(_) => "unsupported_version",
            Self::UnknownType(_) => "unknown_type",
            Self::ReservedBitsSet => "reserved_bits",
            Self::AuthFraming => "auth_framing",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_message_type_round_trips() {
        let probe = Message::probe(0xDEAD_BEEF, 42);
        for m in [
            probe,
            Message::ack1(&probe),
            Message::ack2(&probe, 7, 9, true),
        ] {
            assert_eq!(Message::decode(&m.encode()), Ok(m));
        }
        assert!(Message::ack2(&probe, 1, 2, true).responder_software_timed());
        assert!(!Message::ack2(&probe, 1, 2, false).responder_software_timed());
    }

    #[test]
    fn malformed_messages_are_typed_errors() {
        let good = Message::probe(1, 2).encode();
        assert_eq!(
            Message::decode(&good[..39]),
            Err(DecodeError::WrongLength(39))
        );
        assert_eq!(Message::decode(&[]), Err(DecodeError::WrongLength(0)));
        let mut long = good.to_vec();
        long.push(0);
        assert_eq!(Message::decode(&long), Err(DecodeError::WrongLength(41)));
        let mut bad = good;
        bad[0] = b'X';
        assert_eq!(Message::decode(&bad), Err(DecodeError::BadMagic));
        let mut bad = good;
        bad[4] = 2;
        assert_eq!(
            Message::decode(&bad),
            Err(DecodeError::UnsupportedVersion(2))
        );
        let mut bad = good;
        bad[5] = 0;
        assert_eq!(Message::decode(&bad), Err(DecodeError::UnknownType(0)));
        let mut bad = good;
        bad[6] = 0x80;
        assert_eq!(Message::decode(&bad), Err(DecodeError::ReservedBitsSet));
        let mut bad = good;
        bad[7] = 1;
        assert_eq!(Message::decode(&bad), Err(DecodeError::AuthFraming));
        let mut bad = good;
        bad[6] = FLAG_AUTHENTICATED;
        assert_eq!(Message::decode(&bad), Err(DecodeError::AuthFraming));
        // A message whose flags claim authentication still encodes plain.
        let claims = Message {
            flags: FLAG_AUTHENTICATED,
            ..Message::probe(1, 2)
        };
        assert_eq!(Message::decode(&claims.encode()), Ok(Message::probe(1, 2)));
    }

    #[test]
    fn authenticated_framing_round_trips_and_must_agree_with_the_length() {
        let probe = Message::probe(0xDEAD_BEEF, 42);
        for m in [
            probe,
            Message::ack1(&probe),
            Message::ack2(&probe, 7, 9, true),
        ] {
            let sealed = m.encode_authenticated(9, |_| [0xAB; TAG_LEN]);
            assert_eq!(sealed.len(), AUTHENTICATED_LEN);
            assert_eq!(&sealed[..6], &m.encode()[..6]);
            assert_eq!(
                (sealed[6] & FLAG_AUTHENTICATED, sealed[7]),
                (FLAG_AUTHENTICATED, 9)
            );
            assert_eq!(&sealed[MESSAGE_LEN..], &[0xAB; TAG_LEN]);
            // The flag is framing: the decoded message is the one encoded.
            assert_eq!(Message::decode(&sealed), Ok(m));
        }
        let sealed = probe.encode_authenticated(9, |_| [0; TAG_LEN]);
        // Key id 0 means "none": not allowed with a tag.
        let mut bad = sealed;
        bad[7] = 0;
        assert_eq!(Message::decode(&bad), Err(DecodeError::AuthFraming));
        // Tag without the flag.
        let mut bad = sealed;
        bad[6] &= !FLAG_AUTHENTICATED;
        assert_eq!(Message::decode(&bad), Err(DecodeError::AuthFraming));
        // Flag and key id without the tag.
        assert_eq!(
            Message::decode(&sealed[..MESSAGE_LEN]),
            Err(DecodeError::AuthFraming)
        );
        assert_eq!(
            Message::decode(&sealed[..AUTHENTICATED_LEN - 1]),
            Err(DecodeError::WrongLength(AUTHENTICATED_LEN - 1))
        );
    }

    proptest! {
        #[test]
        fn decoder_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = Message::decode(&bytes);
        }

        #[test]
        fn decoder_accepts_exactly_what_the_encoder_writes(
            kind in 1u8..=3, soft in any::<bool>(), id in any::<u64>(), seq in any::<u64>(),
            t3 in any::<u64>(), t4 in any::<u64>(), key in 1u8..=255
        ) {
            let probe = Message::probe(id, seq);
            let m = match kind {
                1 => probe,
                2 => Message::ack1(&probe),
                _ => Message::ack2(&probe, t3, t4, soft),
            };
            prop_assert_eq!(Message::decode(&m.encode()), Ok(m));
            prop_assert_eq!(Message::decode(&m.encode_authenticated(key, |_| [0; TAG_LEN])), Ok(m));
        }

        #[test]
        fn a_mutated_header_byte_never_decodes_to_a_different_valid_header(
            pos in 0usize..8, val in any::<u8>()
        ) {
            let mut bytes = Message::probe(1, 2).encode();
            let original = bytes[pos];
            bytes[pos] = val;
            let decoded = Message::decode(&bytes);
            if val == original {
                prop_assert!(decoded.is_ok());
            } else if let Ok(m) = decoded {
                // Only a type change to another known type, or the known
                // software-timed flag, may still decode.
                prop_assert!(pos == 5 || (pos == 6 && val == FLAG_RESPONDER_SOFTWARE_TIMED), "byte {} changed yet decoded: {:?}", pos, m);
            }
        }
    }
}
