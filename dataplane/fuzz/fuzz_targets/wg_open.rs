//! Arbitrary bytes as a WireGuard transport message (a UDP 51871 payload): `classify` and
//! `open` must never panic, only accept or refuse. The first input byte picks how the message
//! is dressed up, so the fuzzer also reaches the paths behind the header checks:
//! - as is (mostly refused early: short, bad type, unknown index);
//! - with a valid header for the known session (type 4, its receiver index): reaches the replay
//!   window and the AEAD with arbitrary counters and ciphertexts;
//! - sealed properly with the session's peer key around the rest of the input: reaches the
//!   authenticated paths (keepalive, not IPv4, inner length, replay of earlier inputs).
#![no_main]
use std::sync::{Arc, OnceLock};

use dataplane::wireguard::{
    classify, open, seal, CounterBlock, Session, SessionKeys, SessionTable,
};
use libfuzzer_sys::fuzz_target;

const INDEX: u32 = 0x0102_0304;

struct World {
    sender: Session,
    table: SessionTable,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let keys = SessionKeys {
            receiver_index: INDEX,
            peer_index: 9,
            send_key: [3; 32],
            recv_key: [4; 32],
            created_ns: 0,
            initiator: false,
            peer: 1,
        };
        let peer = SessionKeys {
            receiver_index: 9,
            peer_index: INDEX,
            send_key: keys.recv_key,
            recv_key: keys.send_key,
            created_ns: 0,
            initiator: true,
            peer: 2,
        };
        World {
            sender: Session::new(&peer).expect("session"),
            table: SessionTable::new([Arc::new(Session::new(&keys).expect("session"))]),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if rest.len() > 2000 {
        return;
    }
    let w = world();
    let mut buf = [0u8; 2100];
    let msg = match mode % 3 {
        0 => {
            buf[..rest.len()].copy_from_slice(rest);
            0..rest.len()
        }
        1 => {
            buf[..rest.len()].copy_from_slice(rest);
            if rest.len() >= 8 {
                buf[..4].copy_from_slice(&[4, 0, 0, 0]);
                buf[4..8].copy_from_slice(&INDEX.to_le_bytes());
            }
            0..rest.len()
        }
        _ => {
            buf[16..16 + rest.len()].copy_from_slice(rest);
            let mut block = CounterBlock::default();
            match seal(&w.sender, &mut block, &mut buf, 16..16 + rest.len(), 1) {
                Ok(r) => r,
                Err(_) => return,
            }
        }
    };
    let _ = classify(&buf[msg.clone()]);
    if let Ok(opened) = open(&w.table, &mut buf[msg.clone()], 1) {
        // What open promises: the plaintext lies inside the message, after the header.
        assert!(opened.plaintext.start == 16 && opened.plaintext.end <= msg.len());
    }
});
