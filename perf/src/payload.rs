//! The 18-byte header every `sluice-perf` UDP payload starts with.
//!
//! # Frame size and payload size
//!
//! `--size` is the Ethernet frame size *including* the 4-byte FCS, as in RFC 2544 and in the
//! line-rate anchors (14.88 Mpps at 64 B on 10G). So the UDP payload is
//! `size - 14 (Ethernet) - 20 (IPv4) - 8 (UDP) - 4 (FCS)`: 18 bytes for a 64-byte frame, which is
//! why the header is exactly 18 bytes. On a veth there is no FCS: a 64-byte frame is the 60 bytes
//! the kernel moves.
//!
//! # Layout (network byte order)
//!
//! ```text
//!  0      2    3    4       6              10                      18
//!  +------+----+----+-------+---------------+-----------------------+---- zero padding
//!  | magic| ver|kind| flow  |  seq (u32)    | send ts (u64 ns, CLOCK_MONOTONIC)
//!  +------+----+----+-------+---------------+-----------------------+
//! ```
//!
//! `seq` is per flow and wraps at 2^32; [`crate::seq`] unwraps it. The timestamp is the sender's
//! `CLOCK_MONOTONIC`, which every network namespace on one machine shares, so the receiver's
//! clock minus it is a one-way latency.

use thiserror::Error;

/// "5C1E": sluice.
pub const MAGIC: u16 = 0x5C1E;
/// Bumped when the layout changes.
pub const VERSION: u8 = 1;
/// Bytes of [`Header`] on the wire.
pub const HEADER_BYTES: usize = 18;
/// Ethernet + IPv4 + UDP headers + FCS: what a frame carries besides the UDP payload.
pub const FRAME_OVERHEAD_BYTES: usize = 14 + 20 + 8 + 4;
/// Smallest `--size`: a 64-byte frame leaves exactly [`HEADER_BYTES`] of payload.
pub const MIN_FRAME_BYTES: usize = FRAME_OVERHEAD_BYTES + HEADER_BYTES;
/// Largest `--size` on a 1500-byte MTU link (1500 IP bytes + 14 + 4).
pub const MAX_FRAME_BYTES: usize = 1518;

/// What a packet is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// One-way traffic from `gen` to `sink`.
    Data = 0,
    /// A ping-pong request.
    Ping = 1,
    /// A ping-pong answer (the request with the kind changed).
    Pong = 2,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Data),
            1 => Some(Self::Ping),
            2 => Some(Self::Pong),
            _ => None,
        }
    }
}

/// The decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub flow: u16,
    pub seq: u32,
    pub send_ts_ns: u64,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PayloadError {
    #[error("payload of {len} bytes is shorter than the {HEADER_BYTES}-byte sluice-perf header")]
    Short { len: usize },
    #[error("payload magic {found:#06x} is not sluice-perf's {MAGIC:#06x}: not our traffic")]
    Magic { found: u16 },
    #[error(
        "payload header version {found} is not {VERSION}: generator and sink are different builds"
    )]
    Version { found: u8 },
    #[error("payload kind {found} is unknown (0 data, 1 ping, 2 pong)")]
    Kind { found: u8 },
    #[error(
        "frame size {size} B is outside {MIN_FRAME_BYTES}..={MAX_FRAME_BYTES} \
         (Ethernet frame including FCS); pass --size 64 .. 1518"
    )]
    FrameSize { size: usize },
}

/// UDP payload bytes for an Ethernet frame of `frame_bytes` (FCS included).
pub fn payload_len_for_frame(frame_bytes: usize) -> Result<usize, PayloadError> {
    if !(MIN_FRAME_BYTES..=MAX_FRAME_BYTES).contains(&frame_bytes) {
        return Err(PayloadError::FrameSize { size: frame_bytes });
    }
    Ok(frame_bytes - FRAME_OVERHEAD_BYTES)
}

impl Header {
    /// Writes the header into the start of `buf`; the rest of `buf` is left as it is.
    pub fn encode(&self, buf: &mut [u8]) -> Result<(), PayloadError> {
        let Some(h) = buf.get_mut(..HEADER_BYTES) else {
            return Err(PayloadError::Short { len: buf.len() });
        };
        h[0..2].copy_from_slice(&MAGIC.to_be_bytes());
        h[2] = VERSION;
        h[3] = self.kind as u8;
        h[4..6].copy_from_slice(&self.flow.to_be_bytes());
        h[6..10].copy_from_slice(&self.seq.to_be_bytes());
        h[10..18].copy_from_slice(&self.send_ts_ns.to_be_bytes());
        Ok(())
    }

    /// Reads the header from the start of `buf`; never panics on arbitrary bytes.
    pub fn decode(buf: &[u8]) -> Result<Self, PayloadError> {
        let Some(h) = buf.get(..HEADER_BYTES) else {
            return Err(PayloadError::Short { len: buf.len() });
        };
        let magic = u16::from_be_bytes([h[0], h[1]]);
        if magic != MAGIC {
            return Err(PayloadError::Magic { found: magic });
        }
        if h[2] != VERSION {
            return Err(PayloadError::Version { found: h[2] });
        }
        let kind = Kind::from_u8(h[3]).ok_or(PayloadError::Kind { found: h[3] })?;
        let mut seq = [0u8; 4];
        seq.copy_from_slice(&h[6..10]);
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&h[10..18]);
        Ok(Self {
            kind,
            flow: u16::from_be_bytes([h[4], h[5]]),
            seq: u32::from_be_bytes(seq),
            send_ts_ns: u64::from_be_bytes(ts),
        })
    }

    /// Rewrites only the kind byte in place (the ping-pong server turns a ping into a pong
    /// without decoding the rest).
    pub fn set_kind(buf: &mut [u8], kind: Kind) -> Result<(), PayloadError> {
        if buf.len() < HEADER_BYTES {
            return Err(PayloadError::Short { len: buf.len() });
        }
        buf[3] = kind as u8;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fixture_bytes() {
        let h = Header {
            kind: Kind::Ping,
            flow: 0x0102,
            seq: 0x0304_0506,
            send_ts_ns: 0x0708_090a_0b0c_0d0e,
        };
        let mut buf = [0xffu8; 20];
        h.encode(&mut buf).expect("20 bytes fit the header");
        assert_eq!(
            buf,
            [0x5c, 0x1e, 1, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 0xff, 0xff]
        );
    }

    #[test]
    fn frame_sizes() {
        assert_eq!(payload_len_for_frame(64), Ok(18));
        assert_eq!(payload_len_for_frame(1400), Ok(1354));
        assert_eq!(payload_len_for_frame(1518), Ok(1472));
        assert_eq!(
            payload_len_for_frame(63),
            Err(PayloadError::FrameSize { size: 63 })
        );
        assert_eq!(
            payload_len_for_frame(1519),
            Err(PayloadError::FrameSize { size: 1519 })
        );
    }

    #[test]
    fn rejects_short_foreign_and_unknown() {
        assert_eq!(
            Header::decode(&[0; 17]),
            Err(PayloadError::Short { len: 17 })
        );
        assert_eq!(
            Header::decode(&[0; 18]),
            Err(PayloadError::Magic { found: 0 })
        );
        let mut buf = [0u8; 18];
        Header {
            kind: Kind::Data,
            flow: 0,
            seq: 0,
            send_ts_ns: 0,
        }
        .encode(&mut buf)
        .expect("fits");
        buf[2] = 9;
        assert_eq!(
            Header::decode(&buf),
            Err(PayloadError::Version { found: 9 })
        );
        buf[2] = VERSION;
        buf[3] = 7;
        assert_eq!(Header::decode(&buf), Err(PayloadError::Kind { found: 7 }));
        assert_eq!(
            Header {
                kind: Kind::Data,
                flow: 0,
                seq: 0,
                send_ts_ns: 0
            }
            .encode(&mut [0u8; 4]),
            Err(PayloadError::Short { len: 4 })
        );
    }

    #[test]
    fn set_kind_turns_ping_into_pong() {
        let mut buf = [0u8; 18];
        let h = Header {
            kind: Kind::Ping,
            flow: 3,
            seq: 9,
            send_ts_ns: 77,
        };
        h.encode(&mut buf).expect("fits");
        Header::set_kind(&mut buf, Kind::Pong).expect("fits");
        assert_eq!(
            Header::decode(&buf),
            Ok(Header {
                kind: Kind::Pong,
                ..h
            })
        );
        assert!(Header::set_kind(&mut [0u8; 5], Kind::Pong).is_err());
    }

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![Just(Kind::Data), Just(Kind::Ping), Just(Kind::Pong)]
    }

    proptest! {
        #[test]
        fn encode_then_decode_is_identity(
            k in kind(), flow: u16, seq: u32, ts: u64, extra in 0usize..64
        ) {
            let h = Header { kind: k, flow, seq, send_ts_ns: ts };
            let mut buf = vec![0u8; HEADER_BYTES + extra];
            h.encode(&mut buf).expect("buffer is at least a header long");
            prop_assert_eq!(Header::decode(&buf), Ok(h));
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Header::decode(&bytes);
        }
    }
}
