//! Probe authentication keys, shared by the controller (which derives them)
//! and the agents (which sign and verify probes and ACKs with them).
//!
//! The MAC is HMAC-SHA256 truncated to [`TAG_LEN`] bytes. Keys of one mesh are
//! derived from one master secret and the rotation epoch, so every controller
//! replica and every restart derives the same keys without coordinating:
//!
//! ```text
//! key(epoch)    = HMAC-SHA256(master, "pingmesh probe key" || epoch as u64 big-endian)
//! key_id(epoch) = (epoch mod 255) + 1        (0 means "no key" on the wire)
//! ```
//!
//! See docs/security.md, "Probe authentication".

use ring::hmac;

use crate::v1;

/// Bytes of one probe key.
pub const KEY_LEN: usize = 32;
/// Bytes of the tag after an authenticated message.
pub const TAG_LEN: usize = 16;
/// Shortest master secret accepted: 32 bytes (256 bits as text of letters and
/// digits would need 43; the Helm chart generates 64).
pub const MIN_MASTER_LEN: usize = 32;
/// Most keys an agent accepts from one pinglist (the controller sends three).
pub const MAX_KEYS: usize = 8;

const DERIVATION_LABEL: &[u8] = b"pingmesh probe key";

/// The wire id of the key of `epoch`: 1..=255, never 0.
pub fn key_id(epoch: u64) -> u8 {
    // (epoch % 255) < 255, so the sum fits a u8.
    u8::try_from(epoch % 255).map_or(1, |id| id + 1)
}

/// The probe key of `epoch`, derived from the mesh's master secret.
pub fn derive_key(master: &[u8], epoch: u64) -> [u8; KEY_LEN] {
    let master = hmac::Key::new(hmac::HMAC_SHA256, master);
    let mut ctx = hmac::Context::with_key(&master);
    ctx.update(DERIVATION_LABEL);
    ctx.update(&epoch.to_be_bytes());
    let tag = ctx.sign();
    let mut key = [0u8; KEY_LEN];
    key.copy_from_slice(tag.as_ref());
    key
}

/// The previous, current and next keys of `epoch`, the current one marked.
pub fn keys_around(master: &[u8], epoch: u64) -> v1::ProbeKeys {
    let epochs = [epoch.saturating_sub(1), epoch, epoch.saturating_add(1)];
    let mut keys: Vec<v1::ProbeKey> = Vec::with_capacity(3);
    for e in epochs {
        let id = u32::from(key_id(e));
        // Epoch 0 has no previous one: do not send its key twice.
        if keys.iter().all(|k| k.id != id) {
            keys.push(v1::ProbeKey {
                id,
                key: derive_key(master, e).to_vec(),
            });
        }
    }
    v1::ProbeKeys {
        current_id: u32::from(key_id(epoch)),
        keys,
    }
}

impl std::fmt::Debug for v1::ProbeKey {
    // Generated without Debug (build.rs): the key bytes never go into a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// One key ready to sign and verify with.
#[derive(Clone)]
pub struct MacKey {
    id: u8,
    key: hmac::Key,
}

impl std::fmt::Debug for MacKey {
    // The key itself never goes into a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MacKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl MacKey {
    pub fn new(id: u8, key: &[u8; KEY_LEN]) -> Self {
        Self {
            id,
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
        }
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    /// The truncated HMAC-SHA256 of `data`.
    pub fn tag(&self, data: &[u8]) -> [u8; TAG_LEN] {
        self.tag_parts(&[data])
    }

    /// The truncated HMAC-SHA256 of `parts` one after the other, as if
    /// concatenated (a probe's 40 bytes and the responder's endpoint id).
    pub fn tag_parts(&self, parts: &[&[u8]]) -> [u8; TAG_LEN] {
        let mut ctx = hmac::Context::with_key(&self.key);
        for part in parts {
            ctx.update(part);
        }
        let full = ctx.sign();
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&full.as_ref()[..TAG_LEN]);
        tag
    }

    /// Whether `tag` is this key's tag of `data`, compared in constant time.
    pub fn verify(&self, data: &[u8], tag: &[u8]) -> bool {
        self.verify_parts(&[data], tag)
    }

    /// Whether `tag` is this key's tag of `parts` concatenated, compared in
    /// constant time.
    pub fn verify_parts(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        let Ok(tag) = <&[u8; TAG_LEN]>::try_from(tag) else {
            return false;
        };
        tags_equal(&self.tag_parts(parts), tag)
    }
}

/// Compares every byte whatever the first difference, so the time taken does
/// not tell a forger how many leading tag bytes were right. (ring's own
/// comparison is deprecated for outside use, and its `hmac::verify` wants the
/// untruncated tag.)
fn tags_equal(a: &[u8; TAG_LEN], b: &[u8; TAG_LEN]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Why a pinglist's keys were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeysError {
    #[error("probe key id {0} is outside 1..=255")]
    BadId(u32),
    #[error("probe key {id} has {len} bytes, not {KEY_LEN}")]
    BadLength { id: u32, len: usize },
    #[error("{0} probe keys; at most {MAX_KEYS}")]
    TooMany(usize),
    #[error("the current probe key id {0} is not among the keys")]
    NoCurrent(u32),
}

/// The keys an agent holds: one to sign with, all to verify with.
#[derive(Debug, Clone)]
pub struct KeySet {
    current: MacKey,
    /// Indexed by key id; at most [`MAX_KEYS`] are `Some`.
    by_id: Box<[Option<MacKey>; 256]>,
}

impl KeySet {
    /// The keys a pinglist carries, checked.
    pub fn from_proto(keys: &v1::ProbeKeys) -> Result<Self, KeysError> {
        if keys.keys.len() > MAX_KEYS {
            return Err(KeysError::TooMany(keys.keys.len()));
        }
        let mut by_id: Box<[Option<MacKey>; 256]> = Box::new(std::array::from_fn(|_| None));
        for k in &keys.keys {
            let id = u8::try_from(k.id)
                .ok()
                .filter(|id| *id != 0)
                .ok_or(KeysError::BadId(k.id))?;
            let bytes: &[u8; KEY_LEN] =
                k.key
                    .as_slice()
                    .try_into()
                    .map_err(|_| KeysError::BadLength {
                        id: k.id,
                        len: k.key.len(),
                    })?;
            by_id[usize::from(id)] = Some(MacKey::new(id, bytes));
        }
        let current = u8::try_from(keys.current_id)
            .ok()
            .and_then(|id| by_id[usize::from(id)].clone())
            .ok_or(KeysError::NoCurrent(keys.current_id))?;
        Ok(Self { current, by_id })
    }

    /// The key to sign with.
    pub fn current(&self) -> &MacKey {
        &self.current
    }

    /// The key of wire id `id`, if this set holds it.
    pub fn get(&self, id: u8) -> Option<&MacKey> {
        self.by_id[usize::from(id)].as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASTER: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn derivation_is_deterministic_and_differs_per_epoch_and_master() {
        assert_eq!(derive_key(MASTER, 7), derive_key(MASTER, 7));
        assert_ne!(derive_key(MASTER, 7), derive_key(MASTER, 8));
        assert_ne!(
            derive_key(MASTER, 7),
            derive_key(b"another master secret, 32 bytes!", 7)
        );
        // The documented formula, computed independently: a change to the
        // derivation (which would split a mesh whose controller and agents
        // run different versions) is noticed.
        let k = hmac::Key::new(hmac::HMAC_SHA256, MASTER);
        let mut data = b"pingmesh probe key".to_vec();
        data.extend_from_slice(&1u64.to_be_bytes());
        assert_eq!(&derive_key(MASTER, 1)[..], hmac::sign(&k, &data).as_ref());
    }

    #[test]
    fn key_ids_are_never_zero_and_cycle_through_255() {
        assert_eq!(key_id(0), 1);
        assert_eq!(key_id(254), 255);
        assert_eq!(key_id(255), 1);
        assert!((0..10_000).all(|e| key_id(e) != 0));
    }

    #[test]
    fn keys_around_an_epoch_are_previous_current_and_next() {
        let keys = keys_around(MASTER, 100);
        let ids: Vec<u32> = keys.keys.iter().map(|k| k.id).collect();
        assert_eq!(ids, [key_id(99), key_id(100), key_id(101)].map(u32::from));
        assert_eq!(keys.current_id, u32::from(key_id(100)));
        assert_eq!(keys.keys[1].key, derive_key(MASTER, 100));
        assert_eq!(keys_around(MASTER, 0).keys.len(), 2);
        let set = KeySet::from_proto(&keys).unwrap();
        assert_eq!(set.current().id(), key_id(100));
        assert!(set.get(key_id(99)).is_some() && set.get(key_id(102)).is_none());
    }

    #[test]
    fn a_tag_verifies_only_its_data_under_its_key() {
        let key = MacKey::new(1, &derive_key(MASTER, 1));
        let other = MacKey::new(2, &derive_key(MASTER, 2));
        let tag = key.tag(b"hello");
        assert!(key.verify(b"hello", &tag));
        assert!(!key.verify(b"hellp", &tag));
        assert!(!other.verify(b"hello", &tag));
        assert!(!key.verify(b"hello", &tag[..15]));
        let mut flipped = tag;
        flipped[15] ^= 1;
        assert!(!key.verify(b"hello", &flipped));
        // Parts are tagged as their concatenation.
        assert_eq!(key.tag_parts(&[b"hel", b"lo"]), tag);
        assert!(key.verify_parts(&[b"he", b"llo"], &tag));
        assert!(!key.verify_parts(&[b"hello", b"!"], &tag));
    }

    #[test]
    fn malformed_key_sets_are_typed_errors() {
        let key = |id, len| v1::ProbeKey {
            id,
            key: vec![1; len],
        };
        let set = |current_id, keys| v1::ProbeKeys { current_id, keys };
        assert_eq!(
            KeySet::from_proto(&set(1, vec![key(0, 32)])).unwrap_err(),
            KeysError::BadId(0)
        );
        assert_eq!(
            KeySet::from_proto(&set(1, vec![key(256, 32)])).unwrap_err(),
            KeysError::BadId(256)
        );
        assert_eq!(
            KeySet::from_proto(&set(1, vec![key(1, 16)])).unwrap_err(),
            KeysError::BadLength { id: 1, len: 16 }
        );
        assert_eq!(
            KeySet::from_proto(&set(2, vec![key(1, 32)])).unwrap_err(),
            KeysError::NoCurrent(2)
        );
        assert_eq!(
            KeySet::from_proto(&set(1, (1..=9).map(|i| key(i, 32)).collect())).unwrap_err(),
            KeysError::TooMany(9)
        );
        let debug = format!(
            "{:?}",
            KeySet::from_proto(&set(1, vec![key(1, 32)])).unwrap()
        );
        assert!(
            !debug.contains("[1, 1"),
            "keys must not be printed: {debug}"
        );
        let debug = format!("{:?}", set(1, vec![key(1, 32)]));
        assert!(
            !debug.contains("[1, 1"),
            "keys must not be printed: {debug}"
        );
    }
}
