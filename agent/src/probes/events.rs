//! The consumer side of the kernel's event ring buffer (`BPF_MAP_TYPE_RINGBUF`), mapped into
//! this process.
//!
//! The kernel reads the consumer position on every record it reserves, and the consumer
//! position lives in a cache line of its own that this process writes. Publishing it after
//! every record would make each event the programs send wait for that line to come back
//! from this process's CPU; here it is published once per [`PUBLISH_BYTES`] of records (a
//! quarter of the ring, if that is less) and whenever a drain ends, so the producers mostly
//! find it in their own cache. Space is freed a little later than it could be, never more
//! than that share of the ring.

use std::{
    os::fd::{AsFd as _, AsRawFd, RawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicUsize, Ordering, fence},
};

use aya::maps::MapData;

/// Record header bits (`BPF_RINGBUF_BUSY_BIT`, `BPF_RINGBUF_DISCARD_BIT`) and size.
const BUSY: u32 = 1 << 31;
const DISCARD: u32 = 1 << 30;
const HEADER: usize = 8;

/// Bytes of records taken between two publications of the consumer position.
pub const PUBLISH_BYTES: usize = 64 * 1024;

/// One mapping, unmapped on drop.
struct Mapping {
    at: NonNull<libc::c_void>,
    len: usize,
}

impl Mapping {
    fn new(fd: RawFd, len: usize, prot: libc::c_int, offset: usize) -> std::io::Result<Self> {
        // SAFETY: a fresh shared mapping of the map's file descriptor; the kernel checks the
        // length, protection and offset against the ring buffer's layout.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd,
                offset as libc::off_t,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            at: NonNull::new(at).ok_or_else(|| std::io::Error::other("mmap returned null"))?,
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.at.as_ptr(), self.len) };
    }
}

/// The event ring buffer, read in place.
pub struct EventRing {
    map: MapData,
    /// The consumer position's page (writable).
    consumer: Mapping,
    /// The producer position's page followed by the data pages, mapped twice in a row by
    /// the kernel so that a record that wraps around reads as one slice.
    producer: Mapping,
    page: usize,
    mask: usize,
    /// Bytes of records taken between two publications of the consumer position.
    publish_bytes: usize,
    /// Where this consumer is, and what the kernel was last told.
    pos: usize,
    published: usize,
}

// SAFETY: the mappings belong to this value alone; nothing else in the process touches them.
unsafe impl Send for EventRing {}

impl EventRing {
    /// Maps the ring buffer `map` of `size` bytes (a power of two, a multiple of the page).
    pub fn new(map: MapData, size: usize) -> std::io::Result<Self> {
        // SAFETY: no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let fd = map.fd().as_fd().as_raw_fd();
        let consumer = Mapping::new(fd, page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = Mapping::new(fd, page + 2 * size, libc::PROT_READ, page)?;
        let mut ring = Self {
            map,
            consumer,
            producer,
            page,
            mask: size - 1,
            publish_bytes: PUBLISH_BYTES.min(size / 4),
            pos: 0,
            published: 0,
        };
        ring.pos = ring.consumer_pos().load(Ordering::Acquire);
        ring.published = ring.pos;
        Ok(ring)
    }

    fn consumer_pos(&self) -> &AtomicUsize {
        // SAFETY: the first word of the consumer page, which the kernel never moves.
        unsafe { self.consumer.at.cast::<AtomicUsize>().as_ref() }
    }

    fn producer_pos(&self) -> &AtomicUsize {
        // SAFETY: the first word of the producer page.
        unsafe { self.producer.at.cast::<AtomicUsize>().as_ref() }
    }

    fn data(&self) -> *const u8 {
        // SAFETY: the data pages follow the producer page in the mapping.
        unsafe { self.producer.at.as_ptr().cast::<u8>().add(self.page) }
    }

    /// Tells the kernel the space up to the current position is free.
    fn publish(&mut self) {
        if self.published != self.pos {
            // Released after the records were read: the kernel pairs it with an acquire load
            // before it reuses their space.
            self.consumer_pos().store(self.pos, Ordering::Release);
            self.published = self.pos;
        }
    }

    /// Hands up to `max` records to `f`, in the order the kernel reserved them; returns how
    /// many it handed (discarded records count). Stops early at a record still being written
    /// (a later drain takes it). An error from `f` ends the drain; the record that caused it
    /// is not taken.
    pub fn drain<E>(
        &mut self,
        max: usize,
        mut f: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<usize, E> {
        let mut handled = 0;
        let mut producer = self.producer_pos().load(Ordering::Acquire);
        let result = loop {
            if handled >= max {
                break Ok(());
            }
            if self.pos == producer {
                // Caught up: free the space, then look once more for a record committed
                // meanwhile.
                self.publish();
                fence(Ordering::SeqCst);
                producer = self.producer_pos().load(Ordering::Acquire);
                if self.pos == producer {
                    break Ok(());
                }
            }
            let offset = self.pos & self.mask;
            // SAFETY: `offset` is inside the first copy of the data pages and every header is
            // 8-byte aligned.
            let header = unsafe { &*self.data().add(offset).cast::<AtomicU32>() };
            // Paired with the kernel's ordered commit of the header.
            let header = header.load(Ordering::Acquire);
            if header & BUSY != 0 {
                break Ok(());
            }
            let len = (header & !(BUSY | DISCARD)) as usize;
            if header & DISCARD == 0 {
                // SAFETY: the record lies within the two copies of the data pages (records
                // are at most the ring's size).
                let record =
                    unsafe { std::slice::from_raw_parts(self.data().add(offset + HEADER), len) };
                if let Err(e) = f(record) {
                    break Err(e);
                }
            }
            self.pos += (HEADER + len).next_multiple_of(8);
            handled += 1;
            if self.pos - self.published >= self.publish_bytes {
                self.publish();
            }
        };
        self.publish();
        result.map(|()| handled)
    }
}

impl AsRawFd for EventRing {
    fn as_raw_fd(&self) -> RawFd {
        self.map.fd().as_fd().as_raw_fd()
    }
}
