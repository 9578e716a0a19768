//! The probe wire decoder: every datagram a responder or prober receives from
//! the fabric goes through `Message::decode` first. Arbitrary bytes must give
//! a message or a categorized error, and whatever decodes must survive an
//! encode/decode round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pingmesh_agent::probe::wire::Message;

fuzz_target!(|data: &[u8]| {
    match Message::decode(data) {
        Ok(message) => {
            let again = Message::decode(&message.encode());
            assert_eq!(again, Ok(message), "decode(encode(m)) != m");
            let _ = message.responder_software_timed();
        }
        Err(e) => {
            // Every refusal has a metric label.
            assert!(!e.category().is_empty());
        }
    }
});
