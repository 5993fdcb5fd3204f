//! `alias`: the range call on memory mapped at several virtual addresses.
//!
//! vCPU 0 maps 16 KiB of scratch RAM (4 pages at `P`, 2 MiB-aligned, see
//! [`crate::scratch`]) a second time and more, in PML4 slot 1 (virtual
//! 512 GiB up, which the boot identity map never reaches), with page-table
//! pages from an aligned static:
//!
//! | alias | virtual | pages | maps |
//! | --- | --- | --- | --- |
//! | O | `P` | 2 MiB (boot identity map) | itself |
//! | A | 512 GiB | four 4 KiB | `P .. P + 16 KiB` in order |
//! | B | 512 GiB + 1 MiB | four 4 KiB | the same |
//! | R | 512 GiB + 32 KiB | four 4 KiB | the same pages in reverse order |
//! | D | 512 GiB + 2 MiB | one 2 MiB | `P .. P + 2 MiB` |
//! | E | 512 GiB + 4 MiB | one 2 MiB | the same |
//!
//! Only non-present entries are filled (the last write links the PML4 entry),
//! so no TLB flush is needed, and ring 3 may write the tables: the boot
//! tables are user-writable. Then, checked through the driver's own
//! translation: every alias resolves to the same physical bytes (and the
//! translation's contiguous length is the rest of its page); a value written
//! through each alias reads back through every other; a range flush of each
//! alias, of the original and of D's whole 2 MiB succeeds and leaves the data
//! intact; a range that runs from A into the unmapped page after it is
//! refused with `Unmapped` naming that page. Finally every other vCPU reads
//! the values through R and E and flushes R on its own queue.

use core::cell::UnsafeCell;

use cache_flush_abi::boot::{BOOT_PML4_GPA, LARGE_PAGE_SIZE, PAGE_SIZE};
use guest_driver::{Error, Mapping};

use super::{Env, Outcome, Scenario};
use crate::cpu::timed;
use crate::flush::Flush;
use crate::ring0::MAX_CPUS;
use crate::scratch::Scratch;
use crate::status;
use crate::sync::SpinMutex;

pub const SCENARIO: Scenario = Scenario {
    name: "alias",
    description: "one physical range at 6 virtual addresses (4 KiB, 2 MiB, reversed): translate, write/read, flush",
    run,
};

/// PML4 slot of the aliases: virtual `[512 GiB, 1 TiB)`.
const PML4_SLOT: u64 = 1;
const ALIAS_BASE: u64 = PML4_SLOT << 39;
/// Pages aliased by the 4 KiB aliases.
const PAGES: u64 = 4;
/// Bytes every alias shares.
const SPAN: u64 = PAGES * PAGE_SIZE;
/// Present, writable, user-accessible.
const TABLE_FLAGS: u64 = 0x7;
/// Page-size bit of a PD entry: maps a 2 MiB page.
const LARGE: u64 = 0x80;

/// How an alias maps the shared bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The boot identity map (2 MiB pages).
    Identity,
    /// 4 KiB pages in order.
    Small,
    /// 4 KiB pages in reverse order: byte `q` of the span is at page
    /// `PAGES - 1 - q / 4096` of the alias.
    Reversed,
    /// One 2 MiB page.
    Large,
}

#[derive(Clone, Copy)]
struct Alias {
    name: &'static str,
    va: u64,
    kind: Kind,
}

impl Alias {
    /// Virtual address of byte `q` of the shared span.
    fn va_of(&self, q: u64) -> u64 {
        match self.kind {
            Kind::Reversed => self.va + (PAGES - 1 - q / PAGE_SIZE) * PAGE_SIZE + q % PAGE_SIZE,
            _ => self.va + q,
        }
    }

    /// What the driver's translation must say for byte `q`.
    fn expected(&self, p: u64, q: u64) -> Mapping {
        let page = match self.kind {
            Kind::Small | Kind::Reversed => PAGE_SIZE,
            Kind::Identity | Kind::Large => LARGE_PAGE_SIZE,
        };
        Mapping {
            phys: p + q,
            len: page - self.va_of(q) % page,
        }
    }
}

#[rustfmt::skip]
fn aliases(p: u64) -> [Alias; 6] {
    [
        Alias { name: "O (original, identity)", va: p, kind: Kind::Identity },
        Alias { name: "A (4 KiB pages)", va: ALIAS_BASE, kind: Kind::Small },
        Alias { name: "B (4 KiB pages)", va: ALIAS_BASE + 0x10_0000, kind: Kind::Small },
        Alias { name: "R (4 KiB pages, reversed)", va: ALIAS_BASE + 0x8000, kind: Kind::Reversed },
        Alias { name: "D (2 MiB page)", va: ALIAS_BASE + LARGE_PAGE_SIZE, kind: Kind::Large },
        Alias { name: "E (2 MiB page)", va: ALIAS_BASE + 2 * LARGE_PAGE_SIZE, kind: Kind::Large },
    ]
}

/// The page-table pages of the aliases: one PDPT, one PD, one PT.
#[repr(C, align(4096))]
struct Tables {
    pdpt: [u64; 512],
    pd: [u64; 512],
    pt: [u64; 512],
}

struct TablesCell(UnsafeCell<Tables>);
// SAFETY: only vCPU 0 writes the tables, through raw pointers, before the
// barrier that lets the other vCPUs use the mappings; afterwards the CPU's
// page walker reads them and nothing writes them.
unsafe impl Sync for TablesCell {}

static TABLES: TablesCell = TablesCell(UnsafeCell::new(Tables {
    pdpt: [0; 512],
    pd: [0; 512],
    pt: [0; 512],
}));

/// Byte of the span each alias writes its value at (8-aligned, spread over
/// the four pages).
fn slot(index: usize) -> u64 {
    index as u64 * 0xa48 + 8
}

fn value(index: usize) -> u64 {
    0xa1a5_0000_0000_0000 | (index as u64) << 32 | slot(index)
}

/// The other vCPUs' findings.
static OTHERS: SpinMutex<[Option<&'static str>; MAX_CPUS]> = SpinMutex::new([None; MAX_CPUS]);

fn run(env: &Env) -> Outcome {
    let flush = match crate::flush::setup(env) {
        Ok(flush) => flush,
        Err(outcome) => return outcome,
    };
    let p = match Scratch::new(env.boot_info).take(LARGE_PAGE_SIZE, LARGE_PAGE_SIZE) {
        Ok(p) => p,
        Err(e) => {
            return if env.is_first() {
                crate::fail!("alias: {e}")
            } else {
                Outcome::Park
            }
        }
    };
    let aliases = aliases(p);
    if env.is_first() {
        if let Err(outcome) = first(&flush, p, &aliases) {
            return outcome;
        }
    }
    // The mappings exist from here on.
    env.barrier();
    if !env.is_first() {
        OTHERS.lock()[env.vcpu as usize] = Some(other(&flush, &aliases));
    }
    env.barrier();
    if !env.is_first() {
        return Outcome::Park;
    }
    let others = *OTHERS.lock();
    for (vcpu, finding) in others.iter().enumerate().take(env.vcpu_count as usize).skip(1) {
        let finding = finding.unwrap_or("no report");
        crate::println!("alias: vcpu {vcpu}: {finding}");
        if finding != OTHER_OK {
            return crate::fail!("alias: FAILED: vcpu {vcpu} sees the aliases differently: {finding}");
        }
    }
    crate::println!(
        "alias: {} aliases of {} KiB at {p:#x} translate, share data and flush as expected",
        aliases.len(),
        SPAN / 1024
    );
    Outcome::Exit(status::SUCCESS)
}

const OTHER_OK: &str = "reads every value through R and E, flushes R on its own queue: Ok";

/// A vCPU other than 0: reads through the aliases and flushes one.
fn other(flush: &Flush, aliases: &[Alias; 6]) -> &'static str {
    let [_, _, _, r, _, e] = aliases;
    for index in 0..aliases.len() {
        for alias in [r, e] {
            // SAFETY: vCPU 0 mapped the aliases before the barrier; the span
            // is scratch RAM this scenario owns; 8-aligned.
            let seen = unsafe { (alias.va_of(slot(index)) as *const u64).read_volatile() };
            if seen != value(index) {
                return "a value read through R or E differs";
            }
        }
    }
    match flush.range(r.va, SPAN) {
        Ok(()) => OTHER_OK,
        Err(_) => "the range flush of R failed",
    }
}

/// vCPU 0: maps, checks, flushes. `Err` carries the failure outcome.
fn first(flush: &Flush, p: u64, aliases: &[Alias; 6]) -> Result<(), Outcome> {
    let pml4_entry = (BOOT_PML4_GPA + 8 * PML4_SLOT) as *mut u64;
    // SAFETY: the boot PML4 is identity-mapped, user-accessible page-table
    // memory; reading an entry has no side effect.
    let old = unsafe { pml4_entry.read_volatile() };
    if old != 0 {
        return Err(crate::fail!(
            "alias: PML4 slot {PML4_SLOT} (virtual {ALIAS_BASE:#x}) is already in use ({old:#x})"
        ));
    }
    map(p, pml4_entry);
    crate::println!(
        "alias: mapped {} KiB of RAM at {p:#x} again in PML4 slot {PML4_SLOT}:",
        SPAN / 1024
    );
    for alias in aliases {
        crate::println!("alias:   {:<26} at {:#014x}", alias.name, alias.va);
    }

    // 1. The driver's translation: every alias names the same bytes.
    for alias in aliases {
        for q in [0, 0x123, PAGE_SIZE + 0x456, 2 * PAGE_SIZE, SPAN - 1] {
            let va = alias.va_of(q);
            let found = flush.translate(va);
            let expected = alias.expected(p, q);
            if found != Some(expected) {
                return Err(crate::fail!(
                    "alias: FAILED: {} at {va:#x} translates to {found:?}, expected {expected:?}",
                    alias.name
                ));
            }
        }
    }
    crate::println!("alias: every alias translates to the same physical bytes {p:#x}..{:#x}", p + SPAN);

    // 2. Write through each alias, read through all.
    for (index, alias) in aliases.iter().enumerate() {
        // SAFETY: the alias maps scratch RAM this scenario owns; 8-aligned.
        unsafe { (alias.va_of(slot(index)) as *mut u64).write_volatile(value(index)) };
    }
    check_values(aliases, "written")?;
    crate::println!("alias: a value written through each alias reads back through every other");

    // 3. Flush each alias, and D's whole 2 MiB page.
    let [_, a, _, _, d, _] = aliases;
    let mut cases: [(&str, u64, u64); 7] = [("", 0, 0); 7];
    for (case, alias) in cases.iter_mut().zip(aliases) {
        *case = (alias.name, alias.va, SPAN);
    }
    cases[6] = ("D, its whole 2 MiB page", d.va, LARGE_PAGE_SIZE);
    for (name, va, len) in cases {
        let (result, cycles) = timed(|| flush.range(va, len));
        match result {
            Ok(()) => crate::println!("alias: range flush of {name}, {} KiB: Ok in {cycles} cycles", len / 1024),
            Err(e) => return Err(crate::fail!("alias: FAILED: range flush of {name} at {va:#x}: {e}")),
        }
    }
    check_values(aliases, "flushed")?;

    // 4. A range running from A into the unmapped page after it.
    let gap = a.va + SPAN;
    match flush.range(a.va, SPAN + PAGE_SIZE) {
        Err(Error::Unmapped { va }) if va == gap => {
            crate::println!("alias: a range from A into the unmapped page after it: refused, {va:#x} is not mapped")
        }
        other => {
            return Err(crate::fail!(
                "alias: FAILED: a range from A into the unmapped page {gap:#x} gave {other:?}"
            ))
        }
    }
    Ok(())
}

/// Every value, read through every alias.
fn check_values(aliases: &[Alias; 6], when: &str) -> Result<(), Outcome> {
    for index in 0..aliases.len() {
        for alias in aliases {
            let va = alias.va_of(slot(index));
            // SAFETY: mapped scratch RAM this scenario owns; 8-aligned.
            let seen = unsafe { (va as *const u64).read_volatile() };
            if seen != value(index) {
                return Err(crate::fail!(
                    "alias: FAILED: {when}: {} at {va:#x} reads {seen:#x}, expected {:#x}",
                    alias.name,
                    value(index)
                ));
            }
        }
    }
    Ok(())
}

/// Builds the alias tables and links them into the boot PML4 (last).
fn map(p: u64, pml4_entry: *mut u64) {
    let tables = TABLES.0.get();
    // SAFETY: only vCPU 0 gets here, once; the tables are a static nobody
    // else writes, and the entries written are non-present before (so the
    // CPU has nothing cached for them). The PML4 entry was checked to be 0
    // and is written last, so the hierarchy is complete when it appears.
    unsafe {
        let pdpt = core::ptr::addr_of_mut!((*tables).pdpt).cast::<u64>();
        let pd = core::ptr::addr_of_mut!((*tables).pd).cast::<u64>();
        let pt = core::ptr::addr_of_mut!((*tables).pt).cast::<u64>();
        // The tables are statics of the identity-mapped image: their virtual
        // address is their physical address.
        for page in 0..PAGES {
            let frame = p + page * PAGE_SIZE;
            // A at PT index 0.., B at 256.., R at 8.. (reversed).
            pt.add(page as usize).write_volatile(frame | TABLE_FLAGS);
            pt.add(256 + page as usize).write_volatile(frame | TABLE_FLAGS);
            pt.add(8 + (PAGES - 1 - page) as usize).write_volatile(frame | TABLE_FLAGS);
        }
        pd.write_volatile(pt as u64 | TABLE_FLAGS);
        pd.add(1).write_volatile(p | LARGE | TABLE_FLAGS);
        pd.add(2).write_volatile(p | LARGE | TABLE_FLAGS);
        pdpt.write_volatile(pd as u64 | TABLE_FLAGS);
        pml4_entry.write_volatile(pdpt as u64 | TABLE_FLAGS);
    }
}
