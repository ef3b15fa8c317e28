//! IPv4 header (RFC 791).
use std::net::Ipv4Addr;

use super::{be16, be32, checksum, put16, put32, Truncated};

pub const MIN_HEADER_LEN: usize = 20;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// Why an IPv4 header is unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// Fewer bytes than the header (or total length) needs.
    Truncated,
    /// Version is not 4, IHL < 5, or total length < IHL.
    Header,
}

pub struct Packet<T> {
    buf: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Checks version, IHL and that the buffer holds `total_length` bytes (it may hold more:
    /// Ethernet padding). Does not verify the checksum (see [`Packet::verify_checksum`]).
    pub fn new_checked(buf: T) -> Result<Self, Malformed> {
        let b = buf.as_ref();
        if b.len() < MIN_HEADER_LEN {
            return Err(Malformed::Truncated);
        }
        if b[0] >> 4 != 4 {
            return Err(Malformed::Header);
        }
        let ihl = usize::from(b[0] & 0x0f) * 4;
        let total = usize::from(be16(b, 2));
        if ihl < MIN_HEADER_LEN || total < ihl {
            return Err(Malformed::Header);
        }
        if b.len() < total {
            return Err(Malformed::Truncated);
        }
        Ok(Self { buf })
    }
    pub fn header_len(&self) -> usize {
        usize::from(self.buf.as_ref()[0] & 0x0f) * 4
    }
    pub fn total_len(&self) -> usize {
        usize::from(be16(self.buf.as_ref(), 2))
    }
    pub fn ttl(&self) -> u8 {
        self.buf.as_ref()[8]
    }
    pub fn protocol(&self) -> u8 {
        self.buf.as_ref()[9]
    }
    pub fn checksum(&self) -> u16 {
        be16(self.buf.as_ref(), 10)
    }
    pub fn src(&self) -> Ipv4Addr {
        Ipv4Addr::from(be32(self.buf.as_ref(), 12))
    }
    pub fn dst(&self) -> Ipv4Addr {
        Ipv4Addr::from(be32(self.buf.as_ref(), 16))
    }
    /// Fragment offset in 8-byte units (0 for unfragmented and first fragments).
    pub fn frag_offset(&self) -> u16 {
        be16(self.buf.as_ref(), 6) & 0x1fff
    }
    /// The DF (don't fragment) flag.
    pub fn dont_fragment(&self) -> bool {
        be16(self.buf.as_ref(), 6) & 0x4000 != 0
    }
    /// The MF (more fragments) flag.
    pub fn more_fragments(&self) -> bool {
        be16(self.buf.as_ref(), 6) & 0x2000 != 0
    }
    pub fn verify_checksum(&self) -> bool {
        checksum::verify(&self.buf.as_ref()[..self.header_len()])
    }
    pub fn payload(&self) -> &[u8] {
        &self.buf.as_ref()[self.header_len()..self.total_len()]
    }
}

/// Decrements the TTL of the IPv4 header at the start of `header` (already validated by
/// [`Packet::new_checked`]: at least 20 bytes) and updates its checksum incrementally
/// (RFC 1624). TTL must be > 0. Returns `Err` if `header` is shorter than 20 bytes.
#[inline]
pub fn decrement_ttl(header: &mut [u8]) -> Result<(), Truncated> {
    if header.len() < MIN_HEADER_LEN {
        return Err(Truncated);
    }
    let old = be16(header, 8);
    header[8] = header[8].wrapping_sub(1);
    let new = be16(header, 8);
    let c = checksum::update16(be16(header, 10), old, new);
    put16(header, 10, c);
    Ok(())
}

/// What [`emit`] writes: a 20-byte header without options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Repr {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    pub ttl: u8,
    pub payload_len: usize,
}

/// Flags/fragment-offset word with DF set (identification may then be anything: RFC 6864).
pub const FLAGS_DF: u16 = 0x4000;

/// Like [`emit`], with DF set.
pub fn emit_df(buf: &mut [u8], repr: &Repr) -> Result<(), Truncated> {
    emit(buf, repr)?;
    let old = be16(buf, 6);
    put16(buf, 6, FLAGS_DF);
    let c = checksum::update16(be16(buf, 10), old, FLAGS_DF);
    put16(buf, 10, c);
    Ok(())
}

/// Writes `repr` as a 20-byte header (DF clear, id 0, checksum computed) at the start of `buf`.
pub fn emit(buf: &mut [u8], repr: &Repr) -> Result<(), Truncated> {
    let total = MIN_HEADER_LEN + repr.payload_len;
    if buf.len() < MIN_HEADER_LEN || total > usize::from(u16::MAX) {
        return Err(Truncated);
    }
    buf[0] = 0x45;
    buf[1] = 0;
    put16(buf, 2, total as u16);
    put32(buf, 4, 0);
    buf[8] = repr.ttl;
    buf[9] = repr.protocol;
    put16(buf, 10, 0);
    put32(buf, 12, u32::from(repr.src));
    put32(buf, 16, u32::from(repr.dst));
    let c = checksum::checksum(&buf[..MIN_HEADER_LEN]);
    put16(buf, 10, c);
    Ok(())
}
