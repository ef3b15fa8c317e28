//! `--source file:PATH`: re-read the cluster file when its content changes.
//!
//! The agent calls [`FileSource::poll`] from its own loop; no thread or inotify watch lives
//! here. A change is detected by a hash of the file's bytes (not its mtime, which editors and
//! `kubectl ... > file` can leave unchanged or bump without a change). `poll` answers only on a
//! change of what it sees, so an unchanged broken file or a still-missing file is reported once,
//! and the caller keeps its last good state in between.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::error::ClusterError;
use super::{load_bytes, ClusterState};

/// What the last read saw: the file's content (by length and hash) or the read error's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Content { len: usize, hash: u64 },
    Unreadable(std::io::ErrorKind),
}

/// A cluster file polled for changes.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    poll_interval: Duration,
    last_read: Option<Instant>,
    seen: Option<Seen>,
}

impl FileSource {
    /// Watches `path`; [`poll`](Self::poll) reads it at most once per `poll_interval`.
    pub fn new(path: impl Into<PathBuf>, poll_interval: Duration) -> Self {
        FileSource {
            path: path.into(),
            poll_interval,
            last_read: None,
            seen: None,
        }
    }

    /// The watched file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How often the file is read at most; a good sleep for the caller's loop.
    pub fn poll_interval(&self) -> Duration {
        self.poll_interval
    }

    /// [`poll_at`](Self::poll_at) with the current time.
    pub fn poll(&mut self) -> Option<Result<ClusterState, ClusterError>> {
        self.poll_at(Instant::now())
    }

    /// Reads the file if `poll_interval` has passed since the last read (the first call always
    /// reads). Returns `None` when nothing changed since the last read, `Some(Ok)` with the new
    /// state, or `Some(Err)` when the new content does not parse or the file cannot be read
    /// (e.g. it was removed). After an error, the next change (a fix, or the file coming back)
    /// is reported again, even when it restores the last good content.
    pub fn poll_at(&mut self, now: Instant) -> Option<Result<ClusterState, ClusterError>> {
        if let Some(last) = self.last_read {
            if now.saturating_duration_since(last) < self.poll_interval {
                return None;
            }
        }
        self.last_read = Some(now);
        match std::fs::read(&self.path) {
            Ok(bytes) => {
                let mut hasher = DefaultHasher::new();
                bytes.hash(&mut hasher);
                let seen = Seen::Content {
                    len: bytes.len(),
                    hash: hasher.finish(),
                };
                if self.seen.replace(seen) == Some(seen) {
                    return None;
                }
                Some(load_bytes(&bytes, &self.path))
            }
            Err(error) => {
                let seen = Seen::Unreadable(error.kind());
                if self.seen.replace(seen) == Some(seen) {
                    return None;
                }
                Some(Err(ClusterError::Read {
                    path: self.path.clone(),
                    reason: error.to_string(),
                    source: Some(error),
                }))
            }
        }
    }
}
