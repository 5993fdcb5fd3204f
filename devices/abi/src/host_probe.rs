//! The mailbox protocol of the bundled guest's `host-probe` scenario: the
//! host times reloads of guest memory through its *own* mappings (the VMM's
//! mapping of guest RAM, and a second alias mapping of the same memfd) after
//! the guest asked the device for a flush. It is the host-side half of the
//! effectiveness proof: a flush requested by guest-physical address leaves
//! no line of that memory cached under any virtual mapping.
//!
//! Defined here, once, because the guest kernel (`host-probe` scenario) and
//! the host (`vmm_tools::reload_probe`) must agree on every number.
//!
//! # Layout
//!
//! A region of [`REGION_BYTES`] at the guest-physical address given as
//! `buffer=GPA` (default [`DEFAULT_REGION`]):
//!
//! | offset            | what                                              |
//! |-------------------|---------------------------------------------------|
//! | [`COMMAND`]       | `u64` written by the host: `seq << 8 \| op`       |
//! | [`REPLY`]         | `u64` written by the guest: `seq << 8 \| reply`   |
//! | [`TARGET`]        | [`BUFFER_BYTES`] the requests act on              |
//! | [`CONTROL`]       | [`BUFFER_BYTES`] no request flushes (but one line, see [`op::FLUSH_ELSEWHERE`]) |
//!
//! # Rounds
//!
//! The host writes a command with a sequence number one higher than the last
//! (starting at 1); the guest (vCPU 0) carries out `op` and then writes the
//! reply with the same sequence number. The host acts only on a reply whose
//! sequence number matches its command; the guest ignores any other
//! sequence number (and names it if it then times out). The guest never
//! touches the target or control buffer itself: every cached line of them is
//! the host's. It clears REPLY when it starts, so a region the host filled
//! before boot cannot hold a stale answer.
//!
//! The guest ends the run with exit status 0 after [`op::FINISH`], and with
//! status 1 (after one line on the console) if no new command arrives within
//! `timeout=SECS` (default [`DEFAULT_TIMEOUT_SECS`], at least 1) or a
//! command has an unknown op (it replies [`reply::BAD_OP`] first).

/// Default guest-physical address of the region: 16 MiB, inside the scratch
/// RAM of any guest of at least 17 MiB.
pub const DEFAULT_REGION: u64 = 0x100_0000;
/// Default `timeout=`: seconds the guest waits for the next command.
pub const DEFAULT_TIMEOUT_SECS: u64 = 10;

/// Offset of the host's command word.
pub const COMMAND: u64 = 0;
/// Offset of the guest's reply word (its own cache line).
pub const REPLY: u64 = 64;
/// Bytes of each of the two probe buffers: 4096 lines of 64 bytes.
pub const BUFFER_BYTES: u64 = 4096 * 64;
/// Offset of the target buffer (page-aligned).
pub const TARGET: u64 = 4096;
/// Offset of the control buffer (page-aligned).
pub const CONTROL: u64 = TARGET + BUFFER_BYTES;
/// Bytes of the whole region.
pub const REGION_BYTES: u64 = CONTROL + BUFFER_BYTES;
/// Offset of the one line [`op::FLUSH_ELSEWHERE`] flushes: the control
/// buffer's last.
pub const ELSEWHERE: u64 = CONTROL + BUFFER_BYTES - ELSEWHERE_BYTES;
/// Bytes [`op::FLUSH_ELSEWHERE`] flushes: one line.
pub const ELSEWHERE_BYTES: u64 = 64;

/// The `op` byte of a command.
pub mod op {
    /// A range flush of the whole target buffer.
    pub const FLUSH_TARGET: u8 = 1;
    /// A full flush (FLUSH_ALL); answered [`super::reply::UNSUPPORTED`]
    /// when the device does not offer it.
    pub const FLUSH_ALL: u8 = 2;
    /// One exit to the VMM that pauses nothing and flushes nothing (a read
    /// of a device register): the control for "an exit alone evicts".
    pub const NOOP_EXIT: u8 = 3;
    /// A range flush of one line elsewhere (the last line of the control
    /// buffer): the same pause as a flush, without flushing the target.
    pub const FLUSH_ELSEWHERE: u8 = 4;
    /// End the run: the guest replies, then exits with status 0.
    pub const FINISH: u8 = 0xff;
}

/// The `reply` byte of a reply.
pub mod reply {
    /// Done.
    pub const DONE: u8 = 0;
    /// The device does not offer this request (FLUSH_ALL without the
    /// feature).
    pub const UNSUPPORTED: u8 = 1;
    /// The device answered the request with an error status.
    pub const FAILED: u8 = 2;
    /// Unknown `op`; the guest exits with status 1 after this reply.
    pub const BAD_OP: u8 = 3;
}

/// The command word for `op` in round `seq`.
pub const fn command(seq: u64, op: u8) -> u64 {
    (seq << 8) | op as u64
}

/// The reply word for `reply` in round `seq`.
pub const fn reply_word(seq: u64, reply: u8) -> u64 {
    (seq << 8) | reply as u64
}

/// Splits a command or reply word into `(seq, low byte)`.
pub const fn split(word: u64) -> (u64, u8) {
    (word >> 8, word as u8)
}
