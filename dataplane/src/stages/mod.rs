//! The pipeline's stages, one module each, each with a verb for its entry point.
pub mod arp;
pub mod decap;
pub mod egress;
pub mod encap;
pub mod gateway;
pub mod icmp_error;
pub mod lb;
pub mod nat;
pub mod neighbor;
pub mod reject;
pub mod route;
