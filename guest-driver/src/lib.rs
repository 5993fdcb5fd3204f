//! Guest side of the paravirtual cache-flush service, for any guest kernel:
//! finds the device in the boot device table, initialises it, and offers
//! `invalidate_range_all_caches(va, len)` and `invalidate_all_caches()`.
#![no_std]
