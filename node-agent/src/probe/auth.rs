//! Probe authentication on the agent: signs every probe and ACK with the
//! mesh's current key and drops what carries no valid tag, so a forged ACK
//! cannot complete a probe (and hide loss) and a forged probe is counted.
//!
//! The keys come with the pinglist (see `pingmesh_proto::probe_auth` for how
//! the controller derives them). Without keys, authentication is off: plain
//! 40-byte messages go out, and whatever is received is taken untested, as
//! before. See docs/security.md, "Probe authentication".

use std::sync::{Arc, RwLock};

use pingmesh_proto::probe_auth::KeySet;
use pingmesh_proto::v1;

use super::wire::{AUTHENTICATED_LEN, MESSAGE_LEN, Message, MessageType};

/// The keys in force, shared by an agent's probers and responders.
#[derive(Debug, Default)]
pub struct ProbeKeyRing {
    state: RwLock<Option<Held>>,
}

#[derive(Debug)]
struct Held {
    /// As the controller sent it, to skip rebuilding an unchanged set.
    source: v1::ProbeKeys,
    keys: Arc<KeySet>,
}

impl ProbeKeyRing {
    /// A ring without keys: authentication off until a pinglist brings some.
    pub fn off() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Takes the keys of a new pinglist: `None` turns authentication off. Keys
    /// the agent cannot use (a controller bug) are refused with an error and
    /// the keys held stay in force.
    pub fn update(
        &self,
        keys: Option<&v1::ProbeKeys>,
    ) -> Result<(), pingmesh_proto::probe_auth::KeysError> {
        let mut state = self
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match keys {
            None => *state = None,
            Some(keys) if state.as_ref().is_some_and(|h| h.source == *keys) => {}
            Some(keys) => {
                let set = KeySet::from_proto(keys)?;
                *state = Some(Held {
                    source: keys.clone(),
                    keys: Arc::new(set),
                });
            }
        }
        Ok(())
    }

    /// The keys in force; `None` while authentication is off.
    pub fn keys(&self) -> Option<Arc<KeySet>> {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|h| h.keys.clone())
    }
}

/// A message ready to send: 40 bytes plain, 56 authenticated.
#[derive(Debug, Clone, Copy)]
pub struct Sealed {
    bytes: [u8; AUTHENTICATED_LEN],
    len: usize,
}

impl Sealed {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// `message` encoded, and signed with the current key when there are keys.
///
/// The tag covers the 40 message bytes followed by `responder`, the endpoint
/// id of the responder the exchange is with (the probe's target, or the
/// responder sending the ACK). Without it in the tag, someone on the path
/// could copy a probe signed for one responder (perhaps a dead one) to
/// another, with the prober's address as source, and the second responder's
/// ACKs would complete the probe to the first: loss hidden.
pub fn seal(keys: Option<&KeySet>, message: &Message, responder: &str) -> Sealed {
    if let Some(keys) = keys {
        let key = keys.current();
        return Sealed {
            bytes: message.encode_authenticated(key.id(), |data| {
                key.tag_parts(&[data, responder.as_bytes()])
            }),
            len: AUTHENTICATED_LEN,
        };
    }
    let mut bytes = [0u8; AUTHENTICATED_LEN];
    bytes[..MESSAGE_LEN].copy_from_slice(&message.encode());
    Sealed {
        bytes,
        len: MESSAGE_LEN,
    }
}

/// Why a received message was dropped unauthenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// A plain message where keys are in force.
    MissingTag,
    /// Signed with a key this agent does not hold (forged, or a peer more
    /// than an epoch apart).
    UnknownKey(u8),
    /// The tag is not the key's tag of the message: forged or corrupted.
    BadTag,
}

impl AuthFailure {
    /// Bounded label for `pingmesh_probe_auth_failures_total{reason}`.
    pub fn category(self) -> &'static str {
        match self {
            Self::MissingTag => "missing_tag",
            Self::UnknownKey(_) => "unknown_key",
            Self::BadTag => "bad_tag",
        }
    }
}

/// Checks the tag of `bytes`, a message that already decoded, as a tag for an
/// exchange with the responder of endpoint id `responder` (see [`seal`]).
/// Without keys everything passes (authentication off).
pub fn verify(keys: Option<&KeySet>, bytes: &[u8], responder: &str) -> Result<(), AuthFailure> {
    let Some(keys) = keys else { return Ok(()) };
    if bytes.len() != AUTHENTICATED_LEN {
        return Err(AuthFailure::MissingTag);
    }
    let id = bytes[7];
    let key = keys.get(id).ok_or(AuthFailure::UnknownKey(id))?;
    if key.verify_parts(
        &[&bytes[..MESSAGE_LEN], responder.as_bytes()],
        &bytes[MESSAGE_LEN..],
    ) {
        Ok(())
    } else {
        Err(AuthFailure::BadTag)
    }
}

/// Bounded label for `pingmesh_probe_auth_failures_total{kind}`.
pub fn kind_label(kind: MessageType) -> &'static str {
    match kind {
        MessageType::Probe => "probe",
        MessageType::Ack1 => "ack1",
        MessageType::Ack2 => "ack2",
    }
}

#[cfg(test)]
mod tests {
    use pingmesh_proto::probe_auth::{derive_key, key_id, keys_around};

    use super::*;

    const MASTER: &[u8] = b"0123456789abcdef0123456789abcdef";
    const RESPONDER: &str = "b/udp0";

    fn keys(epoch: u64) -> Arc<KeySet> {
        Arc::new(KeySet::from_proto(&keys_around(MASTER, epoch)).unwrap())
    }

    fn messages() -> [Message; 3] {
        let probe = Message::probe(0x0123_4567_89AB_CDEF, 77);
        [
            probe,
            Message::ack1(&probe),
            Message::ack2(&probe, 1_000, 2_000, false),
        ]
    }

    #[test]
    fn sealed_messages_decode_and_verify_under_the_same_keys() {
        let keys = keys(10);
        for m in messages() {
            let sealed = seal(Some(&keys), &m, RESPONDER);
            assert_eq!(sealed.as_bytes().len(), AUTHENTICATED_LEN);
            assert_eq!(sealed.as_bytes()[7], key_id(10));
            assert_eq!(Message::decode(sealed.as_bytes()), Ok(m));
            assert_eq!(verify(Some(&keys), sealed.as_bytes(), RESPONDER), Ok(()));
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_fails_decoding_or_verification() {
        let keys = keys(10);
        for m in messages() {
            let sealed = seal(Some(&keys), &m, RESPONDER);
            for byte in 0..AUTHENTICATED_LEN {
                for bit in 0..8 {
                    let mut bytes = *sealed
                        .as_bytes()
                        .first_chunk::<AUTHENTICATED_LEN>()
                        .unwrap();
                    bytes[byte] ^= 1 << bit;
                    let accepted = Message::decode(&bytes).is_ok()
                        && verify(Some(&keys), &bytes, RESPONDER).is_ok();
                    assert!(
                        !accepted,
                        "bit {bit} of byte {byte} flipped, still accepted ({m:?})"
                    );
                }
            }
        }
    }

    #[test]
    fn neighbouring_epochs_verify_and_far_ones_are_unknown_keys() {
        let signer = keys(10);
        let sealed = seal(Some(&signer), &messages()[2], RESPONDER);
        // A peer an epoch behind or ahead holds the key.
        assert_eq!(verify(Some(&keys(9)), sealed.as_bytes(), RESPONDER), Ok(()));
        assert_eq!(
            verify(Some(&keys(11)), sealed.as_bytes(), RESPONDER),
            Ok(())
        );
        assert_eq!(
            verify(Some(&keys(13)), sealed.as_bytes(), RESPONDER),
            Err(AuthFailure::UnknownKey(key_id(10)))
        );
        // Same id, other mesh (master secret): the tag is wrong.
        let other =
            KeySet::from_proto(&keys_around(b"another mesh's master secret....", 10)).unwrap();
        assert_eq!(
            verify(Some(&other), sealed.as_bytes(), RESPONDER),
            Err(AuthFailure::BadTag)
        );
    }

    #[test]
    fn a_tag_is_valid_only_for_the_responder_it_was_made_for() {
        // A probe signed for responder "a/udp0", replayed to "b/udp0" (or
        // an ACK from "b/udp0" offered for a probe to "a/udp0"), fails.
        let keys = keys(10);
        for m in messages() {
            let sealed = seal(Some(&keys), &m, "a/udp0");
            assert_eq!(verify(Some(&keys), sealed.as_bytes(), "a/udp0"), Ok(()));
            assert_eq!(
                verify(Some(&keys), sealed.as_bytes(), "b/udp0"),
                Err(AuthFailure::BadTag)
            );
            assert_eq!(
                verify(Some(&keys), sealed.as_bytes(), "a/udp"),
                Err(AuthFailure::BadTag)
            );
        }
    }

    #[test]
    fn plain_messages_fail_only_where_keys_are_in_force() {
        let plain = seal(None, &messages()[2], RESPONDER);
        assert_eq!(plain.as_bytes(), &messages()[2].encode());
        assert_eq!(verify(None, plain.as_bytes(), RESPONDER), Ok(()));
        assert_eq!(
            verify(Some(&keys(1)), plain.as_bytes(), RESPONDER),
            Err(AuthFailure::MissingTag)
        );
        // A forger who copies a key id but not the key: bad tag.
        let forged = messages()[2].encode_authenticated(key_id(1), |_| [0; 16]);
        assert_eq!(
            verify(Some(&keys(1)), &forged, RESPONDER),
            Err(AuthFailure::BadTag)
        );
        // Without keys the agent takes signed messages from peers that have some.
        assert_eq!(verify(None, &forged, RESPONDER), Ok(()));
    }

    #[test]
    fn the_ring_follows_the_pinglists_keys_and_keeps_them_on_bad_ones() {
        let ring = ProbeKeyRing::off();
        assert!(ring.keys().is_none());
        ring.update(Some(&keys_around(MASTER, 5))).unwrap();
        assert_eq!(ring.keys().unwrap().current().id(), key_id(5));
        let held = ring.keys().unwrap();
        ring.update(Some(&keys_around(MASTER, 5))).unwrap();
        assert!(
            Arc::ptr_eq(&held, &ring.keys().unwrap()),
            "unchanged keys are not rebuilt"
        );
        let bad = v1::ProbeKeys {
            current_id: 1,
            keys: vec![v1::ProbeKey {
                id: 1,
                key: derive_key(MASTER, 1)[..8].to_vec(),
            }],
        };
        assert!(ring.update(Some(&bad)).is_err());
        assert_eq!(ring.keys().unwrap().current().id(), key_id(5));
        ring.update(None).unwrap();
        assert!(ring.keys().is_none());
    }
}
