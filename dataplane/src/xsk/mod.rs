//! AF_XDP I/O: UMEM, rings and sockets. Almost all `unsafe` in the dataplane lives here, each
//! block with the invariant it relies on; the rest are three plain syscalls/instructions
//! (poll(2) and the eventfd read in `worker.rs`, the eventfd write in `runtime.rs`, `rdtsc` in
//! `latency.rs`).
pub mod ring;
pub mod socket;
pub mod sys;
pub mod umem;

pub use socket::{BindMode, RingSizes, SocketError, XskSocket};
pub use umem::{UmemArea, UmemConfig, UmemError, UmemRegion};
