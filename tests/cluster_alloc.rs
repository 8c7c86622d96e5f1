//! Decoding a cluster frame allocates no more than the frame's own size can justify: a few
//! bytes from anyone at the cluster port, before it proved the secret, claiming a huge string,
//! cost the node that string's allocation (zeroed) before the decode found the bytes missing.
//! A test binary of its own: it counts every allocation of the process.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Largest;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOC: Largest = Largest;

#[test]
fn a_short_frame_claiming_a_huge_string_allocates_little() {
    use mailroom::cluster::proto::{decode, encode, Frame};
    // A `Hello` (variant 0) whose cluster name claims 0x03F00000 (66,060,288) bytes, in 6 bytes.
    let hostile = [0u8, 0xFC, 0x00, 0x00, 0xF0, 0x03];
    // A `Refused` whose reason claims 7 MiB, with 16 KiB behind it (the handshake's cap).
    let mut long = vec![3u8, 0xFC];
    long.extend_from_slice(&(7u32 << 20).to_le_bytes());
    long.resize(16 * 1024, b'a');
    LARGEST.store(0, Ordering::Relaxed);
    assert!(decode(&hostile).is_err());
    assert!(decode(&long).is_err());
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(largest < 256 * 1024, "decoding allocated {largest} bytes at once");

    // Frames as large as they really are still decode.
    let reason = "r".repeat(6 << 20);
    let big = encode(&Frame::Refused { reason: reason.clone() }).unwrap();
    assert!(matches!(decode(&big), Ok(Frame::Refused { reason: r }) if r == reason));
}
