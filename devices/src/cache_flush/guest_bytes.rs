//! Small reads and writes of guest memory on a request's path: descriptors,
//! request headers and segments, status bytes.
//!
//! vm-memory's `Bytes` methods on `GuestMemoryMmap` accept an access that
//! spans regions, and pay for it on every access: they walk the regions
//! through an iterator (as `check_range` does), then copy. For a 16-byte
//! descriptor that is ~150 instructions, run cold after every exit. Nearly
//! every access lies inside one region, where one region lookup and one
//! copy do the same; the general method stays the fallback, so what is
//! accepted and refused is unchanged (an access spanning two contiguous
//! regions still works, one outside guest memory still fails).

use vm_memory::bytes::ByteValued;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap};

/// Fills `buf` from guest memory at `addr`.
pub(crate) fn read(
    memory: &GuestMemoryMmap,
    buf: &mut [u8],
    addr: GuestAddress,
) -> Result<(), GuestMemoryError> {
    match memory.get_slice(addr, buf.len()) {
        Ok(slice) => {
            // The slice is exactly `buf.len()` bytes long.
            slice.copy_to(buf);
            Ok(())
        }
        Err(_) => memory.read_slice(buf, addr),
    }
}

/// Reads a `T` from guest memory at `addr` (any alignment).
pub(crate) fn read_obj<T: ByteValued>(
    memory: &GuestMemoryMmap,
    addr: GuestAddress,
) -> Result<T, GuestMemoryError> {
    let mut value = T::zeroed();
    read(memory, value.as_mut_slice(), addr)?;
    Ok(value)
}

/// Writes `bytes` to guest memory at `addr`.
pub(crate) fn write(
    memory: &GuestMemoryMmap,
    bytes: &[u8],
    addr: GuestAddress,
) -> Result<(), GuestMemoryError> {
    match memory.get_slice(addr, bytes.len()) {
        Ok(slice) => {
            slice.copy_from(bytes);
            Ok(())
        }
        Err(_) => memory.write_slice(bytes, addr),
    }
}

/// True if every byte of `[addr, addr + len)` is guest memory.
pub(crate) fn in_memory(memory: &GuestMemoryMmap, addr: GuestAddress, len: usize) -> bool {
    memory.get_slice(addr, len).is_ok() || memory.check_range(addr, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two contiguous regions of one page each, and a gap after them.
    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)])
            .unwrap()
    }

    #[test]
    fn accesses_inside_one_region_and_across_two_read_what_was_written() {
        let memory = memory();
        for addr in [0x10u64, 0xff8, 0x1ff0] {
            let bytes: Vec<u8> = (1..=16).collect();
            write(&memory, &bytes, GuestAddress(addr)).unwrap();
            let mut back = [0u8; 16];
            read(&memory, &mut back, GuestAddress(addr)).unwrap();
            assert_eq!(&back[..], &bytes[..], "{addr:#x}");
            let mut general = [0u8; 16];
            memory.read_slice(&mut general, GuestAddress(addr)).unwrap();
            assert_eq!(back, general, "{addr:#x}: as vm-memory's own read");
            let value: u128 = read_obj(&memory, GuestAddress(addr)).unwrap();
            assert_eq!(value.to_le_bytes(), back, "{addr:#x}");
            assert!(in_memory(&memory, GuestAddress(addr), 16), "{addr:#x}");
        }
    }

    #[test]
    fn accesses_that_leave_guest_memory_fail_like_vm_memorys() {
        let memory = memory();
        let mut buf = [0u8; 16];
        for addr in [0x1ff8u64, 0x2000, u64::MAX - 4] {
            let at = GuestAddress(addr);
            assert!(read(&memory, &mut buf, at).is_err(), "{addr:#x}");
            assert!(memory.read_slice(&mut buf, at).is_err(), "{addr:#x}");
            assert!(write(&memory, &buf, at).is_err(), "{addr:#x}");
            assert!(read_obj::<u128>(&memory, at).is_err(), "{addr:#x}");
            assert!(!in_memory(&memory, at, 16), "{addr:#x}");
            assert!(!memory.check_range(at, 16), "{addr:#x}");
        }
    }
}
