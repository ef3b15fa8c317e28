//! WireGuard's timers (whitepaper §6, wireguard-go `device/timers.go` and `constants.go`),
//! sans-IO: each peer keeps deadlines in nanoseconds of the caller's clock, the events of
//! wireguard-go's `timers*` functions move them, and [`PeerTimers::poll`] reports the deadlines
//! that have passed. Every duration is a field of [`Timers`] so tests can shorten them.

/// Durations (nanoseconds) and limits of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    /// Initiator starts a new handshake when its session is this old and it sends (120 s).
    pub rekey_after_time_ns: u64,
    /// No session older than this is used (180 s).
    pub reject_after_time_ns: u64,
    /// Retries of one handshake stop after this long (90 s).
    pub rekey_attempt_time_ns: u64,
    /// An unanswered initiation is retried after this (5 s) plus jitter.
    pub rekey_timeout_ns: u64,
    /// Largest random jitter added to `rekey_timeout_ns` (334 ms).
    pub rekey_timeout_jitter_max_ns: u64,
    /// Keepalive sent this long after receiving data when nothing was sent back (10 s).
    pub keepalive_timeout_ns: u64,
    /// Cookie secret lifetime, and how long a received cookie is used (120 s).
    pub cookie_refresh_time_ns: u64,
    /// Initiations from one peer closer together than this are refused (20 ms).
    pub handshake_initiation_rate_ns: u64,
    /// Sessions are rekeyed after this many messages (2^60).
    pub rekey_after_messages: u64,
    /// Persistent keepalive interval, or 0 for none.
    pub persistent_keepalive_ns: u64,
}

const SECOND_NS: u64 = 1_000_000_000;

impl Default for Timers {
    fn default() -> Self {
        Self {
            rekey_after_time_ns: 120 * SECOND_NS,
            reject_after_time_ns: 180 * SECOND_NS,
            rekey_attempt_time_ns: 90 * SECOND_NS,
            rekey_timeout_ns: 5 * SECOND_NS,
            rekey_timeout_jitter_max_ns: 334_000_000,
            keepalive_timeout_ns: 10 * SECOND_NS,
            cookie_refresh_time_ns: 120 * SECOND_NS,
            handshake_initiation_rate_ns: SECOND_NS / 50,
            rekey_after_messages: 1 << 60,
            persistent_keepalive_ns: 0,
        }
    }
}

impl Timers {
    /// Initiations sent for one handshake before giving up (`REKEY_ATTEMPT_TIME /
    /// REKEY_TIMEOUT`, 18 with the defaults).
    pub fn max_handshake_attempts(&self) -> u32 {
        u32::try_from(self.rekey_attempt_time_ns / self.rekey_timeout_ns.max(1)).unwrap_or(u32::MAX)
    }

    /// Age at which a responder asks for a rekey when it keeps receiving on an old session
    /// (`REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT`, 165 s).
    pub fn rekey_on_receive_ns(&self) -> u64 {
        self.reject_after_time_ns
            .saturating_sub(self.keepalive_timeout_ns)
            .saturating_sub(self.rekey_timeout_ns)
    }
}

/// What a passed deadline asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerEvent {
    /// Resend the initiation (attempt number given).
    RetransmitHandshake { attempt: u32 },
    /// Retries exhausted: stop trying; the keys are zeroed later.
    HandshakeGaveUp,
    /// Send a keepalive (data received, nothing sent back).
    SendKeepalive,
    /// Data was sent but nothing came back: start a new handshake.
    NewHandshake,
    /// No handshake for 3 × REJECT_AFTER_TIME: drop all sessions.
    ZeroKeyMaterial,
    /// Persistent keepalive interval passed.
    PersistentKeepalive,
}

/// One peer's deadlines (wireguard-go's per-peer timers).
#[derive(Debug, Clone, Default)]
pub struct PeerTimers {
    retransmit_handshake_at: Option<u64>,
    send_keepalive_at: Option<u64>,
    new_handshake_at: Option<u64>,
    zero_key_material_at: Option<u64>,
    persistent_keepalive_at: Option<u64>,
    /// Initiations sent for the current handshake after the first.
    pub handshake_attempts: u32,
    /// When the last handshake completed.
    pub latest_handshake_ns: Option<u64>,
    /// When we last sent an initiation (rate limit: one per REKEY_TIMEOUT unless retrying).
    pub last_initiation_sent_ns: Option<u64>,
}

impl PeerTimers {
    /// An initiation was sent; `jitter_ns` is random in `0..=rekey_timeout_jitter_max_ns`.
    pub fn handshake_initiated(&mut self, t: &Timers, now_ns: u64, jitter_ns: u64) {
        self.last_initiation_sent_ns = Some(now_ns);
        self.retransmit_handshake_at = Some(now_ns + t.rekey_timeout_ns + jitter_ns);
    }

    /// A handshake completed (initiator got the response, or responder saw the first data).
    pub fn handshake_complete(&mut self, now_ns: u64) {
        self.retransmit_handshake_at = None;
        self.handshake_attempts = 0;
        self.latest_handshake_ns = Some(now_ns);
    }

    /// New session keys were derived.
    pub fn session_derived(&mut self, t: &Timers, now_ns: u64) {
        self.zero_key_material_at = Some(now_ns + 3 * t.reject_after_time_ns);
    }

    /// Whether an initiation waits for its response.
    pub fn handshake_pending(&self) -> bool {
        self.retransmit_handshake_at.is_some()
    }

    /// A data packet (not a keepalive) was sent.
    pub fn data_sent(&mut self, t: &Timers, now_ns: u64) {
        if self.new_handshake_at.is_none() {
            self.new_handshake_at = Some(now_ns + t.keepalive_timeout_ns + t.rekey_timeout_ns);
        }
    }

    /// A data packet (not a keepalive) was received.
    pub fn data_received(&mut self, t: &Timers, now_ns: u64) {
        if self.send_keepalive_at.is_none() {
            self.send_keepalive_at = Some(now_ns + t.keepalive_timeout_ns);
        }
    }

    /// Any authenticated packet (handshake, data or keepalive) was sent.
    pub fn any_authenticated_sent(&mut self, t: &Timers, now_ns: u64) {
        self.send_keepalive_at = None;
        if t.persistent_keepalive_ns > 0 {
            self.persistent_keepalive_at = Some(now_ns + t.persistent_keepalive_ns);
        }
    }

    /// Any authenticated packet was received.
    pub fn any_authenticated_received(&mut self) {
        self.new_handshake_at = None;
    }

    /// Deadlines that passed by `now_ns`, each reported once.
    pub fn poll(&mut self, t: &Timers, now_ns: u64) -> Vec<TimerEvent> {
        let mut events = Vec::new();
        let due = |at: &mut Option<u64>| match *at {
            Some(when) if when <= now_ns => {
                *at = None;
                true
            }
            _ => false,
        };
        if due(&mut self.retransmit_handshake_at) {
            if self.handshake_attempts >= t.max_handshake_attempts() {
                events.push(TimerEvent::HandshakeGaveUp);
                self.handshake_attempts = 0;
                if self.zero_key_material_at.is_none() {
                    self.zero_key_material_at = Some(now_ns + 3 * t.reject_after_time_ns);
                }
            } else {
                self.handshake_attempts += 1;
                events.push(TimerEvent::RetransmitHandshake {
                    attempt: self.handshake_attempts,
                });
            }
        }
        if due(&mut self.send_keepalive_at) {
            events.push(TimerEvent::SendKeepalive);
        }
        if due(&mut self.new_handshake_at) {
            events.push(TimerEvent::NewHandshake);
        }
        if due(&mut self.zero_key_material_at) {
            events.push(TimerEvent::ZeroKeyMaterial);
        }
        if due(&mut self.persistent_keepalive_at) {
            events.push(TimerEvent::PersistentKeepalive);
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_wireguards() {
        let t = Timers::default();
        assert_eq!(t.max_handshake_attempts(), 18);
        assert_eq!(t.rekey_on_receive_ns(), 165 * SECOND_NS);
    }

    #[test]
    fn retransmits_until_attempt_time_then_gives_up() {
        let t = Timers::default();
        let mut p = PeerTimers::default();
        let mut now = 0;
        p.handshake_initiated(&t, now, 0);
        let mut retries = 0;
        for _ in 0..100 {
            now += t.rekey_timeout_ns;
            let ev = p.poll(&t, now);
            if ev.contains(&TimerEvent::HandshakeGaveUp) {
                break;
            }
            assert_eq!(
                ev,
                vec![TimerEvent::RetransmitHandshake {
                    attempt: retries + 1
                }]
            );
            retries += 1;
            p.handshake_initiated(&t, now, 0);
        }
        assert_eq!(retries, 18);
        assert!(!p.handshake_pending());
    }

    #[test]
    fn completion_stops_retransmits() {
        let t = Timers::default();
        let mut p = PeerTimers::default();
        p.handshake_initiated(&t, 0, 10);
        assert!(
            p.poll(&t, t.rekey_timeout_ns).is_empty(),
            "jitter delays the retry"
        );
        p.handshake_complete(1);
        assert!(p.poll(&t, 10 * t.rekey_timeout_ns).is_empty());
        assert_eq!(p.latest_handshake_ns, Some(1));
    }

    #[test]
    fn keepalive_after_receive_without_send_and_handshake_after_send_without_receive() {
        let t = Timers::default();
        let mut p = PeerTimers::default();
        p.data_received(&t, 0);
        assert!(p.poll(&t, t.keepalive_timeout_ns - 1).is_empty());
        assert_eq!(
            p.poll(&t, t.keepalive_timeout_ns),
            vec![TimerEvent::SendKeepalive]
        );
        p.data_received(&t, 100);
        p.any_authenticated_sent(&t, 101);
        assert!(
            p.poll(&t, 100 * t.keepalive_timeout_ns).is_empty(),
            "reply cancels keepalive"
        );
        p.data_sent(&t, 0);
        let deadline = t.keepalive_timeout_ns + t.rekey_timeout_ns;
        assert_eq!(p.poll(&t, deadline), vec![TimerEvent::NewHandshake]);
        p.data_sent(&t, 0);
        p.any_authenticated_received();
        assert!(
            p.poll(&t, 2 * deadline).is_empty(),
            "an answer cancels the new handshake"
        );
    }

    #[test]
    fn keys_are_zeroed_after_three_reject_times() {
        let t = Timers::default();
        let mut p = PeerTimers::default();
        p.session_derived(&t, 0);
        assert!(p.poll(&t, 3 * t.reject_after_time_ns - 1).is_empty());
        assert_eq!(
            p.poll(&t, 3 * t.reject_after_time_ns),
            vec![TimerEvent::ZeroKeyMaterial]
        );
    }
}
