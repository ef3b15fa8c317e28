//! AF_XDP I/O: UMEM, rings and sockets. The only `unsafe` in the dataplane lives here, each
//! block with the invariant it relies on.
pub mod ring;
pub mod socket;
pub mod sys;
pub mod umem;

pub use socket::{BindMode, RingSizes, SocketError, XskSocket};
pub use umem::{UmemArea, UmemConfig, UmemError};
