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
