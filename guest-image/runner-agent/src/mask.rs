//! Secret masking of the log stream.
//!
//! Every byte a step writes passes through a [`Masker`] (one per output
//! stream) before it leaves the guest. Each occurrence of a secret value is
//! replaced by [`MASK`] (`***`).
//!
//! # Secrets that span chunks
//!
//! Output arrives in arbitrary pieces (pipe reads), so a secret may start at
//! the end of one read and finish in the next. The masker therefore holds
//! back the **longest suffix of what it has seen that is a proper prefix of
//! some secret**: nothing before that suffix can be the start of a future
//! match, so it is safe to emit. The suffix is at most `max_len - 1` bytes,
//! and usually empty (plain output like `hello\n` is not a prefix of any
//! secret and goes out at once; there is no fixed delay). One refinement
//! keeps overlapping secrets whole: if a complete match straddles that cut
//! point, the cut moves back to the start of the match, so the held tail can
//! reach `2 * max_len - 2` bytes in that rare case. Chunked and one-shot
//! masking give identical output (tested).
//!
//! Matches are found with an Aho-Corasick automaton in overlapping mode;
//! overlapping matches are merged and replaced by a single `***`, so secrets
//! `abcd` and `cdef` in `abcdef` give `***` and no fragment of either leaks.
//! The held suffix is found with each secret's KMP failure function over the
//! last `len - 1` bytes: linear time, whatever the secrets and the output.
//!
//! # Policy
//!
//! * Empty secrets are ignored (the protocol already rejects them).
//! * There is **no minimum length**: every non-empty secret is masked, even a
//!   one-byte one. Leaving a short secret visible would be a leak; masking it
//!   only costs readability (a secret `a` turns every `a` into `***`), which
//!   the job owner sees at once and fixes by choosing a real secret. Other CI
//!   systems that skip short secrets trade safety for that readability; we
//!   do not.
//! * A multi-line secret (a PEM key, say) is masked as a whole, and each of
//!   its lines (without a trailing `\r`) of at least
//!   [`MIN_LINE_FRAGMENT_LEN`] bytes is masked on its own too, so a tool that
//!   re-wraps or re-ends the lines still cannot reveal it. Shorter lines are
//!   not masked on their own: they would be common words (`-----`, `==`).
//! * Matching is byte-exact: encodings of a secret (base64, URL-escaped) are
//!   not recognised.
//! * At the end of a stream ([`Masker::finish`]) the held tail is masked and
//!   emitted: an unfinished prefix of a secret is not a secret.

use std::collections::BTreeSet;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind};

/// What replaces each (merged) secret occurrence.
pub const MASK: &[u8] = b"***";

/// Shortest line of a multi-line secret that is also masked on its own.
pub const MIN_LINE_FRAGMENT_LEN: usize = 4;

/// Why a secret set could not be built.
#[derive(Debug, thiserror::Error)]
pub enum MaskError {
    /// The matcher could not be built (too many or too long secrets).
    #[error("cannot build the secret matcher: {0}")]
    Matcher(#[from] aho_corasick::BuildError),
}

/// The byte strings to mask, compiled for matching. Shared by every
/// [`Masker`] of a job. Its `Debug` output never shows the values.
pub struct SecretSet {
    matcher: Option<AhoCorasick>,
    patterns: Vec<Pattern>,
    max_len: usize,
}

/// One byte string to mask, with its KMP failure function.
struct Pattern {
    bytes: Vec<u8>,
    /// `failure[i]`: length of the longest proper prefix of `bytes[..=i]`
    /// that is also a suffix of it.
    failure: Vec<u32>,
}

impl fmt::Debug for SecretSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretSet")
            .field("patterns", &self.patterns.len())
            .field("max_len", &self.max_len)
            .finish()
    }
}

impl SecretSet {
    /// Compiles the secret `values` (see the module docs for the policy).
    pub fn new<I, S>(values: I) -> Result<Self, MaskError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<[u8]>,
    {
        let mut unique = BTreeSet::new();
        for value in values {
            let value = value.as_ref();
            if value.is_empty() {
                continue;
            }
            unique.insert(value.to_vec());
            if value.contains(&b'\n') {
                for line in value.split(|&b| b == b'\n') {
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    if line.len() >= MIN_LINE_FRAGMENT_LEN {
                        unique.insert(line.to_vec());
                    }
                }
            }
        }
        let patterns: Vec<Pattern> = unique.into_iter().map(Pattern::new).collect();
        let max_len = patterns.iter().map(|p| p.bytes.len()).max().unwrap_or(0);
        let matcher = if patterns.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .match_kind(MatchKind::Standard)
                    // Compact whatever the secrets: a DFA could be large.
                    .kind(Some(AhoCorasickKind::ContiguousNFA))
                    .build(patterns.iter().map(|p| &p.bytes))?,
            )
        };
        Ok(Self {
            matcher,
            patterns,
            max_len,
        })
    }

    /// A set that masks nothing.
    pub fn empty() -> Self {
        Self {
            matcher: None,
            patterns: Vec::new(),
            max_len: 0,
        }
    }

    /// Whether there is nothing to mask.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Length of the longest byte string masked.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Occurrences of any secret in `haystack`, overlapping ones merged,
    /// sorted by start.
    fn spans(&self, haystack: &[u8]) -> Vec<Range<usize>> {
        let Some(matcher) = &self.matcher else {
            return Vec::new();
        };
        let mut found: Vec<Range<usize>> = matcher
            .find_overlapping_iter(haystack)
            .map(|m| m.range())
            .collect();
        found.sort_unstable_by_key(|r| (r.start, r.end));
        let mut merged: Vec<Range<usize>> = Vec::with_capacity(found.len());
        for span in found {
            match merged.last_mut() {
                Some(last) if span.start < last.end => last.end = last.end.max(span.end),
                _ => merged.push(span),
            }
        }
        merged
    }

    /// Length of the longest suffix of `data` that is a proper prefix of a
    /// secret (what might still become a match).
    fn longest_open_prefix(&self, data: &[u8]) -> usize {
        self.patterns
            .iter()
            .map(|p| p.open_prefix_len(data))
            .max()
            .unwrap_or(0)
    }
}

impl Pattern {
    fn new(bytes: Vec<u8>) -> Self {
        let mut failure = vec![0u32; bytes.len()];
        let mut k = 0usize;
        for i in 1..bytes.len() {
            while k > 0 && bytes[i] != bytes[k] {
                k = failure[k - 1] as usize;
            }
            if bytes[i] == bytes[k] {
                k += 1;
            }
            // k < bytes.len() <= the protocol's 48 KiB secret bound.
            failure[i] = u32::try_from(k).unwrap_or(u32::MAX);
        }
        Self { bytes, failure }
    }

    /// Length of the longest suffix of `data` that is a proper prefix of
    /// this pattern: KMP over the last `len - 1` bytes of `data`.
    fn open_prefix_len(&self, data: &[u8]) -> usize {
        let len = self.bytes.len();
        let window = &data[data.len().saturating_sub(len - 1)..];
        let mut state = 0usize;
        for &byte in window {
            while state > 0 && self.bytes[state] != byte {
                state = self.failure[state - 1] as usize;
            }
            if self.bytes[state] == byte {
                state += 1;
            }
            if state == len {
                // Unreachable with a window shorter than the pattern; kept
                // so the automaton stays correct for any input.
                state = self.failure[len - 1] as usize;
            }
        }
        state
    }
}

/// Streaming masker for one output stream.
#[derive(Debug)]
pub struct Masker {
    secrets: Arc<SecretSet>,
    pending: Vec<u8>,
}

impl Masker {
    /// A masker with nothing held back.
    pub fn new(secrets: Arc<SecretSet>) -> Self {
        Self {
            secrets,
            pending: Vec::new(),
        }
    }

    /// Feeds `input`; appends to `out` whatever is now safe to emit, masked.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        if self.secrets.is_empty() {
            out.extend_from_slice(input);
            return;
        }
        self.pending.extend_from_slice(input);
        let spans = self.secrets.spans(&self.pending);
        let mut cut = self.pending.len() - self.secrets.longest_open_prefix(&self.pending);
        if let Some(straddling) = spans.iter().find(|s| s.start < cut && s.end > cut) {
            cut = straddling.start;
        }
        write_masked(&self.pending[..cut], &spans, out);
        self.pending.drain(..cut);
    }

    /// End of stream: masks and appends everything still held back.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let spans = self.secrets.spans(&self.pending);
        write_masked(&self.pending, &spans, out);
        self.pending.clear();
    }

    /// Bytes currently held back.
    pub fn held_back(&self) -> usize {
        self.pending.len()
    }
}

/// Appends `data` to `out` with each span that lies inside it replaced by
/// [`MASK`] (spans beyond `data` are ignored).
fn write_masked(data: &[u8], spans: &[Range<usize>], out: &mut Vec<u8>) {
    let mut pos = 0;
    for span in spans.iter().take_while(|s| s.end <= data.len()) {
        out.extend_from_slice(&data[pos..span.start]);
        out.extend_from_slice(MASK);
        pos = span.end;
    }
    out.extend_from_slice(&data[pos..]);
}

#[cfg(test)]
mod tests;
