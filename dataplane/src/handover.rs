//! Hot restart: what a worker hands to the worker of the next agent.
//!
//! A planned restart (an upgrade) must not lose packets. The running agent's workers stop
//! between two batches, in two phases (all stop reading their rx rings, then each empties its
//! handoff lanes), and give up everything the kernel and the flows depend on:
//!
//! ```text
//!  old worker                         unix socket (SCM_RIGHTS)           new worker
//!  UMEM memfd ----------------------------- fd ---------------------->  mmap the same frames
//!  AF_XDP sockets (rings: rx waiting, ---- fds -------------------->  map the same rings,
//!    fill topped up, tx not yet sent)                                  continue at their indices
//!  owner[frame], port ids, fill sizes ---- PortMeta/WorkerMeta ----->  same frame accounting
//!  conntrack (time left per flow) -------- flow records ------------>  inserted in a new table
//! ```
//!
//! The kernel never sees a change: the sockets stay bound and registered in the XSKMAPs (whose
//! XDP links travel the same way, see `xdp-redirect`), so frames arriving while neither process
//! runs a worker wait in the rx rings, in the frames the old worker put in the fill rings
//! before it stopped. Loss happens only if that gap outlasts the rings.
//!
//! Requirements: the same number of workers (flows are steered to a worker by their key), the
//! same UMEM geometry and ring sizes (the rings are mapped with the sizes they were created
//! with). The conntrack table may be resized. The session-affinity table is the dataplane's,
//! not a worker's: it travels beside the workers (`Dataplane::export_affinity`, then
//! `import_affinity` in the next agent), so a client keeps its backend even where the backend
//! set changed since it was placed (a fresh choice could differ).
use std::os::fd::{BorrowedFd, OwnedFd};

use crate::xsk::{RingSizes, UmemArea, UmemConfig, XskSocket};

/// One port (socket) of a handed-over worker.
pub struct PortState {
    pub id: u16,
    pub kind: crate::worker::PortKind,
    pub fill_target: u32,
    pub filled: u32,
    pub socket: XskSocket,
}

/// Everything a worker hands over ([`crate::worker::Command::Handover`]).
pub struct WorkerState {
    pub id: usize,
    pub umem: UmemArea,
    pub ports: Vec<PortState>,
    /// Per frame: the worker (`u16::MAX`), leaked (`u16::MAX - 1`) or a port id.
    pub owner: Vec<u16>,
    pub next_port_id: u16,
    /// `Conntrack::export` records.
    pub flows: Vec<u8>,
    pub flow_count: usize,
}

/// A port as it travels: its socket is the fd at the same position.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortMeta {
    pub id: u16,
    /// Absent from an agent that did not tell (an endpoint, as it treated every port).
    #[serde(default)]
    pub kind: crate::worker::PortKind,
    pub ifindex: u32,
    pub queue: u32,
    pub fill_target: u32,
    pub filled: u32,
}

/// A worker as it travels: the UMEM is its first fd, then one fd per port.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WorkerMeta {
    pub id: usize,
    pub frames: u32,
    pub frame_size: u32,
    pub headroom: u32,
    pub rings: [u32; 4],
    pub ports: Vec<PortMeta>,
    pub owner: Vec<u16>,
    pub next_port_id: u16,
    pub flow_count: usize,
}

/// Why a handed-over worker cannot be taken over.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error(
        "worker {worker}: the running agent's {what} is {theirs}, this agent's {ours}; a hot \
         restart keeps them (stop the running agent for a cold restart to change it)"
    )]
    Mismatch {
        worker: usize,
        what: &'static str,
        theirs: String,
        ours: String,
    },
    #[error("worker {worker}: {fds} file descriptors handed over, {want} expected")]
    Fds {
        worker: usize,
        fds: usize,
        want: usize,
    },
    #[error("worker {worker}: the owner table has {have} frames, the UMEM {want}")]
    Owner {
        worker: usize,
        have: usize,
        want: usize,
    },
    #[error("worker {worker}: {source}")]
    Umem {
        worker: usize,
        #[source]
        source: crate::xsk::UmemError,
    },
    #[error("worker {worker}: {source}")]
    Socket {
        worker: usize,
        #[source]
        source: crate::xsk::socket::SocketError,
    },
}

fn ring_array(r: RingSizes) -> [u32; 4] {
    [r.rx, r.tx, r.fill, r.completion]
}

impl WorkerState {
    /// The state as it travels: its description, and the fds to pass in that order.
    pub fn meta(&self, rings: RingSizes) -> (WorkerMeta, Vec<BorrowedFd<'_>>) {
        let c = self.umem.config();
        let mut fds = vec![self.umem.fd()];
        let mut ports = Vec::with_capacity(self.ports.len());
        for p in &self.ports {
            ports.push(PortMeta {
                id: p.id,
                kind: p.kind,
                ifindex: p.socket.ifindex(),
                queue: p.socket.queue(),
                fill_target: p.fill_target,
                filled: p.filled,
            });
            fds.push(p.socket.fd());
        }
        (
            WorkerMeta {
                id: self.id,
                frames: c.frames,
                frame_size: c.frame_size,
                headroom: c.headroom,
                rings: ring_array(rings),
                ports,
                owner: self.owner.clone(),
                next_port_id: self.next_port_id,
                flow_count: self.flow_count,
            },
            fds,
        )
    }

    /// Rebuilds a handed-over worker in this process: maps its UMEM and rings from `fds`
    /// (in [`WorkerState::meta`] order). `umem` and `rings` are this agent's settings, which
    /// must match the running agent's.
    pub fn from_meta(
        meta: WorkerMeta,
        fds: Vec<OwnedFd>,
        flows: Vec<u8>,
        umem: UmemConfig,
        rings: RingSizes,
    ) -> Result<WorkerState, HandoverError> {
        let worker = meta.id;
        let mismatch = |what, theirs: String, ours: String| HandoverError::Mismatch {
            worker,
            what,
            theirs,
            ours,
        };
        if (meta.frames, meta.frame_size) != (umem.frames, umem.frame_size) {
            return Err(mismatch(
                "UMEM (frames x frame size)",
                format!("{} x {}", meta.frames, meta.frame_size),
                format!("{} x {}", umem.frames, umem.frame_size),
            ));
        }
        if meta.headroom != umem.headroom {
            return Err(mismatch(
                "UMEM headroom",
                meta.headroom.to_string(),
                umem.headroom.to_string(),
            ));
        }
        if meta.rings != ring_array(rings) {
            return Err(mismatch(
                "ring sizes (rx, tx, fill, completion)",
                format!("{:?}", meta.rings),
                format!("{:?}", ring_array(rings)),
            ));
        }
        if fds.len() != meta.ports.len() + 1 {
            return Err(HandoverError::Fds {
                worker,
                fds: fds.len(),
                want: meta.ports.len() + 1,
            });
        }
        if meta.owner.len() != umem.frames as usize {
            return Err(HandoverError::Owner {
                worker,
                have: meta.owner.len(),
                want: umem.frames as usize,
            });
        }
        let mut fds = fds.into_iter();
        let umem_fd = fds.next().ok_or(HandoverError::Fds {
            worker,
            fds: 0,
            want: 1,
        })?;
        let area = UmemArea::from_fd(umem_fd, umem)
            .map_err(|source| HandoverError::Umem { worker, source })?;
        let mut ports = Vec::with_capacity(meta.ports.len());
        for (p, fd) in meta.ports.iter().zip(fds) {
            let socket = XskSocket::adopt(fd, p.ifindex, p.queue, rings)
                .map_err(|source| HandoverError::Socket { worker, source })?;
            ports.push(PortState {
                id: p.id,
                kind: p.kind,
                fill_target: p.fill_target,
                filled: p.filled,
                socket,
            });
        }
        Ok(WorkerState {
            id: worker,
            umem: area,
            ports,
            owner: meta.owner,
            next_port_id: meta.next_port_id,
            flows,
            flow_count: meta.flow_count,
        })
    }
}
