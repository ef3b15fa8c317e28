//! A frame inside its buffer (a UMEM chunk, or any byte slice in tests): the bytes
//! `buf[head..head + len]`, with `buf[..head]` free for headers to be pushed in front
//! (encapsulation) and `buf[head + len..]` free at the tail (tags, ICMP quotes).
pub struct PacketBuf<'a> {
    buf: &'a mut [u8],
    head: usize,
    len: usize,
}

/// The frame would not fit in its buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoRoom;

impl<'a> PacketBuf<'a> {
    /// `None` when `head + len` exceeds the buffer.
    pub fn new(buf: &'a mut [u8], head: usize, len: usize) -> Option<Self> {
        if head.checked_add(len)? > buf.len() {
            return None;
        }
        Some(Self { buf, head, len })
    }
    #[inline]
    pub fn data(&self) -> &[u8] {
        &self.buf[self.head..self.head + self.len]
    }
    #[inline]
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.head..self.head + self.len]
    }
    pub fn head(&self) -> usize {
        self.head
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Bytes available behind the frame.
    pub fn tailroom(&self) -> usize {
        self.buf.len() - self.head - self.len
    }
    /// Bytes available in front of the frame.
    pub fn headroom(&self) -> usize {
        self.head
    }
    /// Sets the frame length (grow into tailroom or shrink).
    pub fn set_len(&mut self, len: usize) -> Result<(), NoRoom> {
        if self.head + len > self.buf.len() {
            return Err(NoRoom);
        }
        self.len = len;
        Ok(())
    }
    /// Prepends `n` bytes (uninitialised contents: the caller writes them).
    pub fn push_front(&mut self, n: usize) -> Result<(), NoRoom> {
        if n > self.head {
            return Err(NoRoom);
        }
        self.head -= n;
        self.len += n;
        Ok(())
    }
    /// Removes `n` bytes from the front.
    pub fn pull_front(&mut self, n: usize) -> Result<(), NoRoom> {
        if n > self.len {
            return Err(NoRoom);
        }
        self.head += n;
        self.len -= n;
        Ok(())
    }
    /// Moves the bytes `data[src..src + n]` to `data[dst..dst + n]` within a frame of new
    /// length `new_len` (overlap allowed).
    pub fn copy_within(
        &mut self,
        src: usize,
        n: usize,
        dst: usize,
        new_len: usize,
    ) -> Result<(), NoRoom> {
        let end = self.head.checked_add(new_len).ok_or(NoRoom)?;
        if end > self.buf.len() || src + n > self.len || dst + n > new_len {
            return Err(NoRoom);
        }
        let h = self.head;
        self.buf.copy_within(h + src..h + src + n, h + dst);
        self.len = new_len;
        Ok(())
    }
}
