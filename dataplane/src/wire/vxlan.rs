//! VXLAN header (RFC 7348 section 5):
//!
//! ```text
//!  0                   1                   2                   3
//! |R|R|R|R|I|R|R|R|            Reserved                           |
//! |                VXLAN Network Identifier (VNI) |   Reserved    |
//! ```
//! "The I flag MUST be set to 1 for a valid VXLAN Network ID (VNI). The other 7 bits
//! (designated "R") are reserved fields and MUST be set to zero on transmission and ignored on
//! receipt." So a receiver checks only the I flag, and the VNI.
use super::{be32, put32, Truncated};

pub const HEADER_LEN: usize = 8;
/// The I flag in the first byte.
pub const FLAG_VNI_VALID: u8 = 0x08;
/// Largest VNI (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;
/// Outer Ethernet + IPv4 (no options) + UDP + VXLAN.
pub const OVERHEAD_BYTES: usize = 14 + 20 + 8 + HEADER_LEN;

/// Why a VXLAN header is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    Truncated,
    /// The I flag is clear.
    NoVni,
}

pub struct Packet<T> {
    buf: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    pub fn new_checked(buf: T) -> Result<Self, Malformed> {
        let b = buf.as_ref();
        if b.len() < HEADER_LEN {
            return Err(Malformed::Truncated);
        }
        if b[0] & FLAG_VNI_VALID == 0 {
            return Err(Malformed::NoVni);
        }
        Ok(Self { buf })
    }
    pub fn vni(&self) -> u32 {
        be32(self.buf.as_ref(), 4) >> 8
    }
    /// The inner Ethernet frame.
    pub fn payload(&self) -> &[u8] {
        &self.buf.as_ref()[HEADER_LEN..]
    }
}

/// Writes a VXLAN header for `vni` (I flag set, reserved bits zero) at the start of `buf`.
pub fn emit(buf: &mut [u8], vni: u32) -> Result<(), Truncated> {
    if buf.len() < HEADER_LEN || vni > MAX_VNI {
        return Err(Truncated);
    }
    put32(buf, 0, u32::from(FLAG_VNI_VALID) << 24);
    put32(buf, 4, vni << 8);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc7348_layout() {
        let mut b = [0xffu8; 8];
        emit(&mut b, 0x123456).expect("fits");
        assert_eq!(b, [0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0]);
        let p = Packet::new_checked(&b[..]).expect("valid");
        assert_eq!(p.vni(), 0x123456);
        // Reserved bits are ignored on receipt.
        let r = [0xff, 0xff, 0xff, 0xff, 0, 0, 1, 0xff];
        assert_eq!(Packet::new_checked(&r[..]).map(|p| p.vni()), Ok(1));
        assert_eq!(
            Packet::new_checked(&[0u8; 8][..]).err(),
            Some(Malformed::NoVni)
        );
        assert_eq!(
            Packet::new_checked(&[8u8; 7][..]).err(),
            Some(Malformed::Truncated)
        );
        assert!(emit(&mut [0u8; 8], MAX_VNI + 1).is_err());
    }

    proptest! {
        #[test]
        fn emit_then_parse_is_identity(vni in 0u32..=MAX_VNI) {
            let mut b = [0u8; 8];
            emit(&mut b, vni).expect("fits");
            prop_assert_eq!(Packet::new_checked(&b[..]).map(|p| p.vni()), Ok(vni));
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..32)) {
            if let Ok(p) = Packet::new_checked(&bytes[..]) {
                prop_assert!(p.vni() <= MAX_VNI);
                prop_assert_eq!(p.payload().len(), bytes.len() - HEADER_LEN);
            }
        }
    }
}
