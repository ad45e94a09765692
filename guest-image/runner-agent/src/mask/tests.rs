use super::*;

fn set(values: &[&str]) -> Arc<SecretSet> {
    Arc::new(SecretSet::new(values.iter().map(|v| v.as_bytes())).unwrap())
}

/// Feeds `chunks` one by one, then finishes; returns every emitted byte.
fn mask_chunks(secrets: &Arc<SecretSet>, chunks: &[&[u8]]) -> Vec<u8> {
    let mut masker = Masker::new(Arc::clone(secrets));
    let mut out = Vec::new();
    for chunk in chunks {
        masker.push(chunk, &mut out);
    }
    masker.finish(&mut out);
    out
}

fn mask_str(values: &[&str], chunks: &[&str]) -> String {
    let chunks: Vec<&[u8]> = chunks.iter().map(|c| c.as_bytes()).collect();
    String::from_utf8(mask_chunks(&set(values), &chunks)).unwrap()
}

/// Reference: brute-force search of every secret at every position, merge
/// overlapping occurrences, replace each by the mask.
fn reference_mask(values: &[Vec<u8>], data: &[u8]) -> Vec<u8> {
    let mut spans = Vec::new();
    for value in values.iter().filter(|v| !v.is_empty()) {
        for start in 0..data.len() {
            if data[start..].starts_with(value) {
                spans.push(start..start + value.len());
            }
        }
    }
    spans.sort_by_key(|s| (s.start, s.end));
    let mut merged: Vec<Range<usize>> = Vec::new();
    for span in spans {
        match merged.last_mut() {
            Some(last) if span.start < last.end => last.end = last.end.max(span.end),
            _ => merged.push(span),
        }
    }
    let mut out = Vec::new();
    write_masked(data, &merged, &mut out);
    out
}

#[test]
fn without_secrets_output_passes_through_untouched() {
    let secrets = Arc::new(SecretSet::empty());
    let mut masker = Masker::new(secrets);
    let mut out = Vec::new();
    masker.push(b"hunter2 and friends", &mut out);
    assert_eq!(out, b"hunter2 and friends");
    assert_eq!(masker.held_back(), 0);
}

#[test]
fn empty_secrets_are_ignored() {
    let secrets = set(&["", ""]);
    assert!(secrets.is_empty());
    assert_eq!(mask_str(&[""], &["abc"]), "abc");
}

#[test]
fn masks_every_occurrence_within_a_chunk() {
    assert_eq!(
        mask_str(&["hunter2"], &["pw=hunter2, again hunter2\n"]),
        "pw=***, again ***\n"
    );
}

#[test]
fn secret_spanning_two_chunks_is_masked() {
    assert_eq!(
        mask_str(&["hunter2"], &["token: hun", "ter2 done\n"]),
        "token: *** done\n"
    );
}

#[test]
fn secret_fed_byte_by_byte_is_masked() {
    let text = "a hunter2 b";
    let chunks: Vec<String> = text.chars().map(String::from).collect();
    let chunks: Vec<&str> = chunks.iter().map(String::as_str).collect();
    assert_eq!(mask_str(&["hunter2"], &chunks), "a *** b");
}

#[test]
fn partial_prefix_is_held_then_released_when_it_diverges() {
    let secrets = set(&["hunter2"]);
    let mut masker = Masker::new(secrets);
    let mut out = Vec::new();
    masker.push(b"the hunt", &mut out);
    assert_eq!(out, b"the ", "'hunt' may become the secret");
    assert_eq!(masker.held_back(), 4);
    masker.push(b"ing season\n", &mut out);
    assert_eq!(out, b"the hunting season\n");
    assert_eq!(masker.held_back(), 0);
}

#[test]
fn plain_output_is_not_delayed() {
    let secrets = set(&["hunter2", "s3cr3t-value"]);
    let mut masker = Masker::new(secrets);
    let mut out = Vec::new();
    masker.push(b"Compiling foo v0.1.0\n", &mut out);
    assert_eq!(out, b"Compiling foo v0.1.0\n");
}

#[test]
fn secret_at_end_of_stream_is_masked() {
    let secrets = set(&["hunter2"]);
    let mut masker = Masker::new(secrets);
    let mut out = Vec::new();
    masker.push(b"value: hunter", &mut out);
    masker.push(b"2", &mut out);
    masker.finish(&mut out);
    assert_eq!(out, b"value: ***");
}

#[test]
fn unfinished_prefix_at_end_of_stream_is_emitted() {
    assert_eq!(mask_str(&["hunter2"], &["value: hunte"]), "value: hunte");
}

#[test]
fn overlapping_secrets_are_masked_as_one() {
    assert_eq!(mask_str(&["abcd", "cdef"], &["xxabcdefyy"]), "xx***yy");
    assert_eq!(
        mask_str(&["abcd", "cdef"], &["xxab", "cd", "efyy"]),
        "xx***yy"
    );
}

#[test]
fn nested_secrets_leave_nothing_visible() {
    assert_eq!(mask_str(&["hunter", "hunter2"], &["hunter2"]), "***");
    assert_eq!(mask_str(&["hunter", "hunter2"], &["hunter3"]), "***3");
    assert_eq!(mask_str(&["unte"], &["hunter"]), "h***r");
}

#[test]
fn complete_match_inside_a_longer_open_prefix_is_kept_whole() {
    // "abc" is complete, but "bc" may start "bcdefg": the whole "abc" is
    // held, so "defg" cannot leak when it arrives.
    let secrets = set(&["abc", "bcdefg"]);
    let mut masker = Masker::new(secrets);
    let mut out = Vec::new();
    masker.push(b"abc", &mut out);
    assert_eq!(out, b"");
    masker.push(b"defg!", &mut out);
    masker.finish(&mut out);
    assert_eq!(out, b"***!");
}

#[test]
fn adjacent_occurrences_are_masked_separately() {
    assert_eq!(mask_str(&["ab"], &["abab"]), "******");
}

#[test]
fn one_byte_secrets_are_masked() {
    assert_eq!(mask_str(&["x"], &["a x b", "x"]), "a *** b***");
}

#[test]
fn lines_of_multi_line_secrets_are_masked_on_their_own() {
    let key = "-----BEGIN KEY-----\r\nAAAAsecretline\r\nxy\r\n-----END KEY-----";
    assert_eq!(
        mask_str(&[key], &["dump: AAAAsecretline and xy\n"]),
        "dump: *** and xy\n"
    );
    assert_eq!(mask_str(&[key], &[key]), "***");
}

#[test]
fn held_tail_stays_bounded() {
    let secret = "0123456789abcdef";
    let secrets = set(&[secret, "89abcdefXYZ"]);
    let mut masker = Masker::new(secrets);
    let mut out = Vec::new();
    for _ in 0..10_000 {
        masker.push(b"0123456789abcde", &mut out);
        assert!(
            masker.held_back() < 2 * secret.len(),
            "{}",
            masker.held_back()
        );
    }
}

#[test]
fn debug_output_hides_values() {
    let text = format!("{:?}", set(&["hunter2"]));
    assert!(!text.contains("hunter2"), "{text}");
}

/// Small deterministic generator (no external crate needed for this).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn chunked_masking_equals_reference_on_random_streams() {
    let mut rng = Lcg(0x5eed);
    // A tiny alphabet makes overlaps, near-misses and repeats frequent.
    let alphabet = b"abc";
    for round in 0..400 {
        let secret_count = 1 + rng.below(4) as usize;
        let values: Vec<Vec<u8>> = (0..secret_count)
            .map(|_| {
                let len = 1 + rng.below(6) as usize;
                (0..len).map(|_| alphabet[rng.below(3) as usize]).collect()
            })
            .collect();
        let data: Vec<u8> = (0..rng.below(200))
            .map(|_| alphabet[rng.below(3) as usize])
            .collect();
        let mut chunks = Vec::new();
        let mut rest = &data[..];
        while !rest.is_empty() {
            let take = 1 + rng.below(rest.len() as u64) as usize;
            let (head, tail) = rest.split_at(take.min(rest.len()));
            chunks.push(head);
            rest = tail;
        }
        let secrets = Arc::new(SecretSet::new(&values).unwrap());
        let got = mask_chunks(&secrets, &chunks);
        let want = reference_mask(&values, &data);
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "round {round}: secrets {values:?}, chunks {chunks:?}"
        );
    }
}

#[test]
fn kmp_open_prefix_matches_brute_force() {
    let pattern = Pattern::new(b"abaabab".to_vec());
    for data in [
        &b"xxabaaba"[..],
        b"ab",
        b"abab",
        b"aba",
        b"abaabab",
        b"",
        b"b",
    ] {
        let brute = (1..pattern.bytes.len())
            .rev()
            .find(|&k| data.ends_with(&pattern.bytes[..k]))
            .unwrap_or(0);
        assert_eq!(
            pattern.open_prefix_len(data),
            brute,
            "{:?}",
            String::from_utf8_lossy(data)
        );
    }
}
