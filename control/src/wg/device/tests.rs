use super::*;

const S: u64 = 1_000_000_000;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

struct Net {
    a: Device,
    b: Device,
    ka: PublicKey,
    kb: PublicKey,
    addr_a: SocketAddr,
    addr_b: SocketAddr,
}

fn net(timers: Timers) -> Net {
    let (pa, pb) = (
        PrivateKey::from_bytes([1; 32]),
        PrivateKey::from_bytes([2; 32]),
    );
    let (ka, kb) = (pa.public_key(), pb.public_key());
    let (addr_a, addr_b) = (addr("10.0.0.1:51871"), addr("10.0.0.2:51871"));
    let mut a = Device::new(&pa, timers, 0, 1_700_000_000 * S);
    let mut b = Device::new(&pb, timers, 0, 1_700_000_000 * S);
    a.add_peer(PeerConfig {
        public_key: kb,
        endpoint: addr_b,
    });
    b.add_peer(PeerConfig {
        public_key: ka,
        endpoint: addr_a,
    });
    Net {
        a,
        b,
        ka,
        kb,
        addr_a,
        addr_b,
    }
}

fn sends(actions: &[Action]) -> Vec<(SocketAddr, Vec<u8>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { to, bytes } => Some((*to, bytes.clone())),
            _ => None,
        })
        .collect()
}

fn sessions(actions: &[Action]) -> Vec<Session> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SessionEstablished { session, .. } => Some(session.clone()),
            _ => None,
        })
        .collect()
}

/// A initiates, B responds, A consumes: returns (A's session, B's session).
fn handshake(n: &mut Net, now: u64) -> (Session, Session) {
    let init = sends(&n.a.want_session(&n.kb, now));
    assert_eq!(init.len(), 1);
    assert_eq!(init[0].0, n.addr_b);
    assert_eq!(init[0].1.len(), noise::INITIATION_LEN);
    let b_actions = n.b.handle_datagram(n.addr_a, &init[0].1, now);
    let resp = sends(&b_actions);
    assert_eq!(resp.len(), 1, "{b_actions:?}");
    assert_eq!(resp[0].1.len(), noise::RESPONSE_LEN);
    let sb = sessions(&b_actions).pop().expect("responder session");
    let a_actions = n.a.handle_datagram(n.addr_b, &resp[0].1, now);
    let sa = sessions(&a_actions).pop().expect("initiator session");
    assert!(a_actions.contains(&Action::SendKeepalive { peer: n.kb }));
    (sa, sb)
}

#[test]
fn full_handshake_between_two_devices() {
    let mut n = net(Timers::default());
    let (sa, sb) = handshake(&mut n, 1);
    assert_eq!(sa.send_key, sb.recv_key);
    assert_eq!(sa.recv_key, sb.send_key);
    assert_eq!(
        (sa.local_index, sa.remote_index),
        (sb.remote_index, sb.local_index)
    );
    assert_eq!(n.a.counters().handshakes_completed, 1);
    assert_eq!(n.a.latest_handshake(&n.kb), Some(1));
    // Responder: receive-only until confirmed.
    assert_eq!(n.b.latest_handshake(&n.ka), None);
    assert!(!n.b.peer_statuses(1)[0].has_session);
    let c = n.b.session_confirmed(&n.ka, sb.local_index, 2);
    assert_eq!(
        c,
        vec![Action::SessionConfirmed {
            peer: n.ka,
            local_index: sb.local_index
        }]
    );
    assert!(n.b.peer_statuses(2)[0].has_session);
    assert_eq!(n.b.latest_handshake(&n.ka), Some(2));
    // No second initiation while the session is fresh.
    assert!(n.a.want_session(&n.kb, 3).is_empty());
}

#[test]
fn rekey_keeps_previous_session_and_retires_older_ones() {
    let t = Timers::default();
    let mut n = net(t);
    let (first, _) = handshake(&mut n, 0);
    let now = t.rekey_after_time_ns;
    let (second, _) = handshake(&mut n, now);
    assert_ne!(first.local_index, second.local_index);
    // Third handshake retires the first (it was `previous`).
    let now3 = 2 * t.rekey_after_time_ns;
    let init = sends(&n.a.want_session(&n.kb, now3));
    let b_actions = n.b.handle_datagram(n.addr_a, &init[0].1, now3);
    let a_actions = n.a.handle_datagram(n.addr_b, &sends(&b_actions)[0].1, now3);
    assert!(
        a_actions.contains(&Action::SessionReplaced {
            peer: n.kb,
            local_index: first.local_index
        }) || a_actions
            .iter()
            .any(|a| matches!(a, Action::SessionExpired { .. })),
        "{a_actions:?}"
    );
}

#[test]
fn sessions_expire_after_reject_time() {
    let t = Timers::default();
    let mut n = net(t);
    let (sa, _) = handshake(&mut n, 0);
    assert!(!n
        .a
        .tick(t.reject_after_time_ns - 1)
        .iter()
        .any(|a| matches!(a, Action::SessionExpired { .. })));
    let expired = n.a.tick(t.reject_after_time_ns);
    assert!(expired.contains(&Action::SessionExpired {
        peer: n.kb,
        local_index: sa.local_index
    }));
    assert!(!n.a.peer_statuses(t.reject_after_time_ns)[0].has_session);
}

#[test]
fn lost_response_is_retried_then_given_up() {
    let t = Timers {
        rekey_timeout_ns: S,
        rekey_attempt_time_ns: 3 * S,
        rekey_timeout_jitter_max_ns: 0,
        ..Timers::default()
    };
    let mut n = net(t);
    assert_eq!(sends(&n.a.want_session(&n.kb, 0)).len(), 1);
    let mut sent = 1;
    let mut gave_up = false;
    for step in 1..=10 {
        let actions = n.a.tick(step * S);
        sent += sends(&actions).len();
        if actions.contains(&Action::HandshakeGaveUp { peer: n.kb }) {
            gave_up = true;
            break;
        }
    }
    assert!(gave_up);
    assert_eq!(
        sent, 4,
        "first initiation plus max_handshake_attempts retries"
    );
    assert_eq!(n.a.counters().initiations_sent, 4);
}

#[test]
fn under_load_requires_cookie_then_completes() {
    let mut n = net(Timers::default());
    n.b.set_under_load(true);
    let init = sends(&n.a.want_session(&n.kb, 0));
    let b_actions = n.b.handle_datagram(n.addr_a, &init[0].1, 0);
    let reply = sends(&b_actions);
    assert_eq!(reply.len(), 1);
    assert_eq!(reply[0].1.len(), noise::COOKIE_REPLY_LEN);
    assert!(sessions(&b_actions).is_empty());
    assert_eq!(n.b.counters().cookie_replies_sent, 1);
    assert_eq!(n.b.counters().failures_for(NoiseError::CookieRequired), 1);
    assert!(n.a.handle_datagram(n.addr_b, &reply[0].1, 1).is_empty());
    assert_eq!(n.a.counters().cookie_replies_received, 1);
    // The retry (after REKEY_TIMEOUT + jitter) carries MAC2 and is processed under load.
    let retry = sends(&n.a.tick(6 * S));
    assert_eq!(retry.len(), 1);
    let b_actions = n.b.handle_datagram(n.addr_a, &retry[0].1, 6 * S);
    assert_eq!(sessions(&b_actions).len(), 1, "{b_actions:?}");
    // From another source address the cookie does not count.
    let other = addr("10.0.0.9:51871");
    let init2 = sends(&n.a.want_session(&n.kb, 20 * S));
    let actions = n.b.handle_datagram(other, &init2[0].1, 20 * S);
    assert!(sessions(&actions).is_empty());
}

#[test]
fn replayed_initiation_gives_no_session() {
    let mut n = net(Timers::default());
    let init = sends(&n.a.want_session(&n.kb, 0));
    assert_eq!(
        sessions(&n.b.handle_datagram(n.addr_a, &init[0].1, 0)).len(),
        1
    );
    let again = n.b.handle_datagram(n.addr_a, &init[0].1, 10 * S);
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(n.b.counters().failures_for(NoiseError::Replay), 1);
}

#[test]
fn wrong_key_gives_no_session() {
    let mut n = net(Timers::default());
    // A believes B has another key: MAC1 fails at B.
    let stranger = PrivateKey::from_bytes([7; 32]).public_key();
    n.a.add_peer(PeerConfig {
        public_key: stranger,
        endpoint: n.addr_b,
    });
    let init = sends(&n.a.want_session(&stranger, 0));
    assert!(n.b.handle_datagram(n.addr_a, &init[0].1, 0).is_empty());
    assert_eq!(n.b.counters().failures_for(NoiseError::BadMac1), 1);
    // B does not know A's key: unknown peer.
    n.b.remove_peer(&n.ka);
    let init = sends(&n.a.want_session(&n.kb, 0));
    assert!(n.b.handle_datagram(n.addr_a, &init[0].1, 0).is_empty());
    assert_eq!(n.b.counters().failures_for(NoiseError::UnknownPeer), 1);
}

#[test]
fn garbage_datagrams_are_counted_not_fatal() {
    let mut n = net(Timers::default());
    for len in 0..200usize {
        for first in [0u8, 1, 2, 3, 4, 9] {
            let mut msg = vec![0u8; len];
            if let Some(b) = msg.first_mut() {
                *b = first;
            }
            assert!(sends(&n.b.handle_datagram(n.addr_a, &msg, 0)).is_empty());
        }
    }
    assert!(n.b.counters().failures.iter().sum::<u64>() >= 1200);
}
