//! UDP header (RFC 768).
use super::{be16, put16, Truncated};

pub const HEADER_LEN: usize = 8;

pub struct Datagram<T> {
    buf: T,
}

impl<T: AsRef<[u8]>> Datagram<T> {
    /// Checks that the header fits and that the length field covers the header and fits the
    /// buffer (which may be longer: IP padding).
    pub fn new_checked(buf: T) -> Result<Self, Truncated> {
        let b = buf.as_ref();
        if b.len() < HEADER_LEN {
            return Err(Truncated);
        }
        let len = usize::from(be16(b, 4));
        if len < HEADER_LEN || len > b.len() {
            return Err(Truncated);
        }
        Ok(Self { buf })
    }
    pub fn src_port(&self) -> u16 {
        be16(self.buf.as_ref(), 0)
    }
    pub fn dst_port(&self) -> u16 {
        be16(self.buf.as_ref(), 2)
    }
    pub fn len(&self) -> usize {
        usize::from(be16(self.buf.as_ref(), 4))
    }
    pub fn is_empty(&self) -> bool {
        self.len() == HEADER_LEN
    }
    pub fn checksum(&self) -> u16 {
        be16(self.buf.as_ref(), 6)
    }
    pub fn payload(&self) -> &[u8] {
        &self.buf.as_ref()[HEADER_LEN..self.len()]
    }
}

/// Writes a UDP header with checksum 0 ("no checksum", allowed over IPv4; RFC 7348 section 5
/// recommends it for VXLAN) at the start of `buf`.
pub fn emit(
    buf: &mut [u8],
    src_port: u16,
    dst_port: u16,
    payload_len: usize,
) -> Result<(), Truncated> {
    let len = HEADER_LEN + payload_len;
    if buf.len() < HEADER_LEN || len > usize::from(u16::MAX) {
        return Err(Truncated);
    }
    put16(buf, 0, src_port);
    put16(buf, 2, dst_port);
    put16(buf, 4, len as u16);
    put16(buf, 6, 0);
    Ok(())
}
