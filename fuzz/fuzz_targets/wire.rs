//! The probe wire decoder and the tag check behind it: every datagram a
//! responder or prober receives from the fabric goes through
//! `Message::decode`, then (when the mesh authenticates probes) through
//! `auth::verify`. Arbitrary bytes must give a message or a categorized
//! error, whatever decodes must survive an encode/decode round trip
//! unchanged, and a tag must pass exactly when it is the tag the key of its
//! id makes for those bytes and the responder's endpoint id.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use pingmesh_agent::probe::auth::{self, AuthFailure};
use pingmesh_agent::probe::wire::{AUTHENTICATED_LEN, Message};
use pingmesh_proto::probe_auth::{KeySet, keys_around};

/// The keys of one epoch of a fixed master (the seeds are signed with them).
static KEYS: LazyLock<KeySet> = LazyLock::new(|| {
    KeySet::from_proto(&keys_around(
        pingmesh_fuzz::WIRE_MASTER,
        pingmesh_fuzz::WIRE_EPOCH,
    ))
    .expect("keys derived by the controller's own code")
});

fuzz_target!(|data: &[u8]| {
    match Message::decode(data) {
        Ok(message) => {
            let again = Message::decode(&message.encode());
            assert_eq!(again, Ok(message), "decode(encode(m)) != m");
            let _ = message.responder_software_timed();
            check_tag(data, &message);
        }
        Err(e) => {
            // Every refusal has a metric label.
            assert!(!e.category().is_empty());
        }
    }
});

/// `data` decoded to `message`: its tag verdict must agree with re-signing.
fn check_tag(data: &[u8], message: &Message) {
    assert_eq!(
        auth::verify(None, data, pingmesh_fuzz::WIRE_RESPONDER),
        Ok(()),
        "no keys: nothing is checked"
    );
    let verdict = auth::verify(Some(&KEYS), data, pingmesh_fuzz::WIRE_RESPONDER);
    if data.len() != AUTHENTICATED_LEN {
        assert_eq!(verdict, Err(AuthFailure::MissingTag));
        return;
    }
    let id = data[7];
    match KEYS.get(id) {
        None => assert_eq!(verdict, Err(AuthFailure::UnknownKey(id))),
        Some(key) => {
            let resigned = message.encode_authenticated(id, |bytes| {
                key.tag_parts(&[bytes, pingmesh_fuzz::WIRE_RESPONDER.as_bytes()])
            });
            // Every one of the 40 bytes is a field the decoder checked, so
            // re-signing reproduces them; only the tag can differ.
            assert_eq!(resigned[..40], data[..40], "decode lost a byte");
            let expected = if resigned[40..] == data[40..] {
                Ok(())
            } else {
                Err(AuthFailure::BadTag)
            };
            assert_eq!(verdict, expected, "tag verdict disagrees with re-signing");
        }
    }
}
