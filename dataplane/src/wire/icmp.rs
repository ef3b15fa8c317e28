//! ICMPv4 (RFC 792): the types the dataplane emits or inspects.
use super::{checksum, put16, Truncated};

pub const HEADER_LEN: usize = 8;
pub const TYPE_ECHO_REPLY: u8 = 0;
pub const TYPE_DEST_UNREACHABLE: u8 = 3;
pub const TYPE_SOURCE_QUENCH: u8 = 4;
pub const TYPE_REDIRECT: u8 = 5;
pub const TYPE_ECHO_REQUEST: u8 = 8;
pub const TYPE_TIME_EXCEEDED: u8 = 11;
pub const TYPE_PARAMETER_PROBLEM: u8 = 12;
pub const CODE_TTL_EXCEEDED_IN_TRANSIT: u8 = 0;
/// Destination unreachable: port unreachable (RFC 792).
pub const CODE_PORT_UNREACHABLE: u8 = 3;
/// Destination unreachable: fragmentation needed and DF set (RFC 792, RFC 1191).
pub const CODE_FRAG_NEEDED: u8 = 4;

/// True for ICMP error messages, about which no ICMP error is sent (RFC 1122 3.2.2).
pub fn is_error(icmp_type: u8) -> bool {
    matches!(
        icmp_type,
        TYPE_DEST_UNREACHABLE
            | TYPE_SOURCE_QUENCH
            | TYPE_REDIRECT
            | TYPE_TIME_EXCEEDED
            | TYPE_PARAMETER_PROBLEM
    )
}

/// Writes an ICMP header (`icmp_type`, `code`, the 4-byte `rest`) in front of the
/// `body_len` bytes that already follow it in `buf`, and the checksum over both.
pub fn emit(
    buf: &mut [u8],
    icmp_type: u8,
    code: u8,
    rest: [u8; 4],
    body_len: usize,
) -> Result<(), Truncated> {
    let len = HEADER_LEN + body_len;
    if buf.len() < len {
        return Err(Truncated);
    }
    buf[0] = icmp_type;
    buf[1] = code;
    put16(buf, 2, 0);
    buf[4..8].copy_from_slice(&rest);
    let c = checksum::checksum(&buf[..len]);
    put16(buf, 2, c);
    Ok(())
}
