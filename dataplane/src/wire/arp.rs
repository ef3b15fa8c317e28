//! ARP for IPv4 over Ethernet (RFC 826): htype 1, ptype 0x0800, hlen 6, plen 4.
use std::net::Ipv4Addr;

use super::{be16, be32, put16, put32, Mac, Truncated};

pub const PACKET_LEN: usize = 28;
pub const OP_REQUEST: u16 = 1;
pub const OP_REPLY: u16 = 2;

pub struct Packet<T> {
    buf: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Checks the length and that this is Ethernet/IPv4 ARP.
    pub fn new_checked(buf: T) -> Result<Self, Truncated> {
        let b = buf.as_ref();
        if b.len() < PACKET_LEN || be16(b, 0) != 1 || be16(b, 2) != 0x0800 || b[4] != 6 || b[5] != 4
        {
            return Err(Truncated);
        }
        Ok(Self { buf })
    }
    pub fn operation(&self) -> u16 {
        be16(self.buf.as_ref(), 6)
    }
    pub fn sender_mac(&self) -> Mac {
        let mut m = [0; 6];
        m.copy_from_slice(&self.buf.as_ref()[8..14]);
        Mac(m)
    }
    pub fn sender_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(be32(self.buf.as_ref(), 14))
    }
    pub fn target_mac(&self) -> Mac {
        let mut m = [0; 6];
        m.copy_from_slice(&self.buf.as_ref()[18..24]);
        Mac(m)
    }
    pub fn target_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(be32(self.buf.as_ref(), 24))
    }
}

/// Writes an Ethernet/IPv4 ARP packet into the first [`PACKET_LEN`] bytes of `buf`.
pub fn emit(
    buf: &mut [u8],
    op: u16,
    sender_mac: Mac,
    sender_ip: Ipv4Addr,
    target_mac: Mac,
    target_ip: Ipv4Addr,
) -> Result<(), Truncated> {
    if buf.len() < PACKET_LEN {
        return Err(Truncated);
    }
    put16(buf, 0, 1);
    put16(buf, 2, 0x0800);
    buf[4] = 6;
    buf[5] = 4;
    put16(buf, 6, op);
    buf[8..14].copy_from_slice(&sender_mac.0);
    put32(buf, 14, u32::from(sender_ip));
    buf[18..24].copy_from_slice(&target_mac.0);
    put32(buf, 24, u32::from(target_ip));
    Ok(())
}
