//! Failure reasons that always fit the protocol.
//!
//! A job's error reason travels in `JobFinished`, which the orchestrator
//! refuses when the reason is longer than [`MAX_REASON_LEN`] bytes or holds
//! a NUL; a refused `JobFinished` loses the real reason (the job then ends
//! as "VM deregistered"). Every reason the host agent builds therefore goes
//! through [`bounded_reason`]: NULs and other control characters become
//! spaces, and an overlong text keeps its start (what failed) and its end
//! (the last lines of a log tail), joined by [`ELLIPSIS`].

use protocol::limits::MAX_REASON_LEN;

/// What stands for the bytes cut out of the middle of a long reason.
pub const ELLIPSIS: &str = " [...] ";

/// How much of an overlong reason's start is kept, in bytes.
const HEAD_BYTES: usize = 1024;

/// `text` as a reason the protocol accepts: control characters (NUL
/// included) become spaces, and if it is longer than [`MAX_REASON_LEN`]
/// bytes, its middle is replaced by [`ELLIPSIS`] (cut on char boundaries).
pub fn bounded_reason(text: &str) -> String {
    bounded(text, MAX_REASON_LEN)
}

/// [`bounded_reason`] with any byte budget (at least the ellipsis' length).
pub fn bounded(text: &str, max: usize) -> String {
    let clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.len() <= max {
        return clean;
    }
    let budget = max.saturating_sub(ELLIPSIS.len());
    let head_len = floor_char_boundary(&clean, HEAD_BYTES.min(budget / 2));
    let tail_budget = budget - head_len;
    let tail_start = ceil_char_boundary(&clean, clean.len() - tail_budget);
    format!("{}{ELLIPSIS}{}", &clean[..head_len], &clean[tail_start..])
}

/// The largest char boundary of `s` at or below `i`.
pub(crate) fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The smallest char boundary of `s` at or above `i`.
fn ceil_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_reasons_pass_unchanged() {
        assert_eq!(bounded_reason("vm exited"), "vm exited");
        assert_eq!(bounded_reason(""), "");
    }

    #[test]
    fn long_reasons_keep_their_start_and_end_and_fit() {
        let text = format!("vm exited with 1 during step 2: {}END", "x".repeat(20_000));
        let r = bounded_reason(&text);
        assert!(r.len() <= MAX_REASON_LEN, "{}", r.len());
        assert!(r.starts_with("vm exited with 1 during step 2: "), "{r}");
        assert!(r.ends_with("END"), "{r}");
        assert!(r.contains(ELLIPSIS));
    }

    #[test]
    fn cuts_fall_on_char_boundaries() {
        // Multi-byte chars everywhere: any byte cut would panic or break UTF-8.
        let text = "é€😀".repeat(5_000);
        for max in [MAX_REASON_LEN, 100, 17, 8] {
            let r = bounded(&text, max);
            assert!(r.len() <= max, "{max}: {}", r.len());
        }
    }

    #[test]
    fn control_characters_and_nuls_never_reach_the_protocol() {
        let r = bounded_reason("a\0b\x1b[31mc\r\nd");
        assert_eq!(r, "a b [31mc  d");
        let zeros = "\0".repeat(10_000);
        let r = bounded_reason(&zeros);
        assert!(!r.contains('\0') && r.len() <= MAX_REASON_LEN);
    }
}
