//! The kernel command line: space-separated words, `key=value` or bare.

/// A parsed view of the command line.
#[derive(Clone, Copy, Debug)]
pub struct Cmdline<'a>(&'a str);

impl<'a> Cmdline<'a> {
    /// Wraps the command line text.
    pub fn new(text: &'a str) -> Self {
        Self(text)
    }

    /// The value of the last `key=value` word with this key (a later word
    /// overrides an earlier one). Unknown keys are simply never asked for.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.0
            .split_ascii_whitespace()
            .filter_map(|word| word.split_once('='))
            .filter(|(k, _)| *k == key)
            .map(|(_, value)| value)
            .next_back()
    }
}

/// Parses an unsigned number: decimal, or hexadecimal after `0x`; `_` may
/// separate digits (`requests=1_000`, `counters=0x40_0000`).
pub fn parse_u64(text: &str) -> Option<u64> {
    let (digits, radix) = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (text, 10),
    };
    let mut value: u64 = 0;
    let mut any = false;
    for c in digits.chars() {
        if c == '_' {
            continue;
        }
        let digit = c.to_digit(radix)?;
        value = value
            .checked_mul(u64::from(radix))?
            .checked_add(u64::from(digit))?;
        any = true;
    }
    any.then_some(value)
}
