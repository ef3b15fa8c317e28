//! Parse once: the Ethernet and IPv4 headers are checked here and their offsets and fields
//! kept in a small `Copy` struct; later stages use it and never re-parse.
use std::net::Ipv4Addr;

use crate::{
    drop_reason::DropReason,
    wire::{arp, ethernet, ipv4, Mac},
};

/// What the frame is, with the facts later stages need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Arp(ArpMeta),
    Ipv4(Ipv4Meta),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArpMeta {
    pub operation: u16,
    pub sender_mac: Mac,
    pub sender_ip: Ipv4Addr,
    pub target_ip: Ipv4Addr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Meta {
    /// Offset of the IPv4 header in the frame.
    pub l3: usize,
    /// Offset of the transport header (l3 + IHL).
    pub l4: usize,
    /// IPv4 total length (the frame may carry Ethernet padding beyond it).
    pub total_len: usize,
    pub protocol: u8,
    pub ttl: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub src_mac: Mac,
    /// True for non-first fragments (no transport header).
    pub later_fragment: bool,
    /// True for any fragment (MF set or offset non-zero).
    pub fragment: bool,
    /// The DF (don't fragment) flag.
    pub dont_fragment: bool,
}

/// Classifies an Ethernet frame. Every failure is a drop reason; nothing here panics.
#[inline]
pub fn classify(frame: &[u8]) -> Result<Class, DropReason> {
    let eth = ethernet::Frame::new_checked(frame).map_err(|_| DropReason::FrameTooShort)?;
    match eth.ethertype() {
        ethernet::ETHERTYPE_ARP => {
            let a =
                arp::Packet::new_checked(eth.payload()).map_err(|_| DropReason::ArpMalformed)?;
            Ok(Class::Arp(ArpMeta {
                operation: a.operation(),
                sender_mac: a.sender_mac(),
                sender_ip: a.sender_ip(),
                target_ip: a.target_ip(),
            }))
        }
        ethernet::ETHERTYPE_IPV4 => {
            let ip = ipv4::Packet::new_checked(eth.payload()).map_err(|e| match e {
                ipv4::Malformed::Truncated => DropReason::FrameTooShort,
                ipv4::Malformed::Header => DropReason::Ipv4Malformed,
            })?;
            if !ip.verify_checksum() {
                return Err(DropReason::Ipv4Checksum);
            }
            let l3 = ethernet::HEADER_LEN;
            Ok(Class::Ipv4(Ipv4Meta {
                l3,
                l4: l3 + ip.header_len(),
                total_len: ip.total_len(),
                protocol: ip.protocol(),
                ttl: ip.ttl(),
                src: ip.src(),
                dst: ip.dst(),
                src_mac: eth.src(),
                later_fragment: ip.frag_offset() != 0,
                fragment: ip.frag_offset() != 0 || ip.more_fragments(),
                dont_fragment: ip.dont_fragment(),
            }))
        }
        ethernet::ETHERTYPE_IPV6 => Err(DropReason::Ipv6Unsupported),
        _ => Err(DropReason::UnsupportedEthertype),
    }
}
