//! Scratch RAM for the scenarios: the guest RAM past the kernel image.
//!
//! The kernel image (code, data, `.bss`, the stacks) must fit below 4 MiB
//! because the VMM's smallest guest has 4 MiB, so buffers of megabytes cannot
//! be statics. Everything from the first 2 MiB boundary after the image to the
//! end of the RAM region that holds the image is free: the VMM writes nothing
//! there and the boot page tables identity-map it (2 MiB pages, user-writable),
//! so a scratch address is both the virtual and the guest-physical address.
//! With the default 256 MiB that is `[4 MiB, 256 MiB)`.

use cache_flush_abi::boot::{BootInfo, KERNEL_MIN_GPA, LARGE_PAGE_SIZE};

extern "C" {
    /// First byte of the image (the linker script's `__image_start`).
    static __image_start: u8;
    /// One past the image's last byte, `.bss` included (`__image_end`).
    static __image_end: u8;
}

/// Guest-physical (= virtual) range of the kernel image.
pub fn image() -> (u64, u64) {
    // Only the symbols' addresses are taken (safe for an extern static);
    // nothing is read through them.
    (
        core::ptr::addr_of!(__image_start) as u64,
        core::ptr::addr_of!(__image_end) as u64,
    )
}

/// Hands out scratch RAM front to back. Every vCPU that builds one from the
/// same boot information and asks for the same sizes gets the same addresses,
/// which is how the scenarios agree on buffers without talking.
pub struct Scratch {
    next: u64,
    end: u64,
}

/// Not enough scratch RAM for a request.
#[derive(Clone, Copy, Debug)]
pub struct OutOfScratch {
    /// Bytes asked for.
    pub wanted: u64,
    /// Bytes left.
    pub left: u64,
}

impl core::fmt::Display for OutOfScratch {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "needs {} of RAM past the kernel image but only {} are left; run the VMM with a larger --memory",
            Size(self.wanted),
            Size(self.left)
        )
    }
}

/// A byte count in KiB, or in MiB from 1 MiB on (rounded down).
struct Size(u64);

impl core::fmt::Display for Size {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.0 >= 1 << 20 {
            write!(f, "{} MiB", self.0 >> 20)
        } else {
            write!(f, "{} KiB", self.0 >> 10)
        }
    }
}

impl Scratch {
    /// The scratch RAM of this guest: from the first 2 MiB boundary after the
    /// image to the end of the RAM region (and of the identity map) holding it.
    pub fn new(boot_info: &BootInfo) -> Self {
        let (_, image_end) = image();
        let start = image_end.next_multiple_of(LARGE_PAGE_SIZE);
        let end = boot_info
            .ram_regions()
            .iter()
            .find(|r| r.base <= image_end && image_end <= r.base.saturating_add(r.size))
            .map_or(start, |r| r.base + r.size)
            .min(boot_info.identity_map_end);
        Self {
            next: start,
            end: end.max(start),
        }
    }

    /// `len` bytes aligned to `align` (a power of two).
    pub fn take(&mut self, len: u64, align: u64) -> Result<u64, OutOfScratch> {
        let start = self.next.next_multiple_of(align);
        match start.checked_add(len) {
            Some(end) if end <= self.end => {
                self.next = end;
                Ok(start)
            }
            _ => Err(OutOfScratch {
                wanted: len,
                left: self.end.saturating_sub(start),
            }),
        }
    }
}

/// Carves one `slice`-byte piece per vCPU out of scratch RAM (the same array
/// on every vCPU) and returns (array base, this vCPU's piece). When RAM is
/// short, vCPU 0 fails `scenario` with the reason and the others park.
pub fn per_vcpu_slices(
    env: &crate::scenarios::Env,
    scenario: &str,
    slice: u64,
) -> Result<(u64, u64), crate::scenarios::Outcome> {
    match Scratch::new(env.boot_info).take(slice * u64::from(env.vcpu_count), slice) {
        Ok(base) => Ok((base, base + slice * u64::from(env.vcpu))),
        Err(e) if env.is_first() => Err(crate::fail!("{scenario}: {e}")),
        Err(_) => Err(crate::scenarios::Outcome::Park),
    }
}

/// Whether `[gpa, gpa + len)` is RAM a scenario may use by guest-physical
/// address: above the VMM's boot structures, inside one RAM region and the
/// identity map, clear of the kernel image. Each error says which rule broke.
pub fn check_free_ram(boot_info: &BootInfo, gpa: u64, len: u64) -> Result<(), &'static str> {
    let end = gpa.checked_add(len).ok_or("overflows")?;
    if gpa < KERNEL_MIN_GPA {
        return Err("below 1 MiB (the VMM's boot structures)");
    }
    if end > boot_info.identity_map_end
        || !boot_info
            .ram_regions()
            .iter()
            .any(|r| r.base <= gpa && end <= r.base + r.size)
    {
        return Err(NOT_IN_ONE_RAM_REGION);
    }
    let (image_start, image_end) = image();
    if gpa < image_end && image_start < end {
        return Err("overlaps the kernel image");
    }
    Ok(())
}

/// The error [`check_free_ram`] gives for a range outside one RAM region.
pub const NOT_IN_ONE_RAM_REGION: &str = "not inside one RAM region";
