//! Runs the fuzz bodies over deterministic pseudo-random mutations of valid
//! inputs, so `cargo test` exercises them without a fuzzing toolchain. Each
//! run is bounded by an input count and a wall-clock budget, and checks that
//! the mutator reached every outcome (so the test fails if it degenerates).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::{Duration, Instant};

use super::*;
use crate::frame::encode_frame;
use crate::limits::MAX_FRAME_LEN;
use crate::message::tests::{every_guest_message, every_host_message};

/// xorshift64*: small, fast, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n.max(1) as u64).unwrap()
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Applies 1 to 4 random byte-level mutations to a copy of a random seed.
fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], dictionary: &[&[u8]]) -> Vec<u8> {
    let mut data = rng.pick(seeds).clone();
    for _ in 0..=rng.below(4) {
        let len = data.len();
        let at = rng.below(len + 1);
        match rng.below(10) {
            0 if len > 0 => data[at.min(len - 1)] ^= 1 << rng.below(8),
            1 if len > 0 => {
                data[at.min(len - 1)] = *rng.pick(&[0, 1, 0x7f, 0x80, 0xff, b'\n', b' '])
            }
            2 => {
                let bytes: Vec<u8> = (0..=rng.below(8)).map(|_| rng.next() as u8).collect();
                data.splice(at..at, bytes);
            }
            3 => {
                let end = (at + rng.below(16)).min(len);
                data.drain(at..end);
            }
            4 => {
                let end = (at + rng.below(32)).min(len);
                let copy = data[at..end].to_vec();
                let to = rng.below(data.len() + 1);
                data.splice(to..to, copy);
            }
            5 => data.truncate(at),
            6 if len >= 4 => {
                let value = *rng.pick(&[
                    0,
                    1,
                    u32::try_from(MAX_FRAME_LEN).unwrap(),
                    u32::try_from(MAX_FRAME_LEN).unwrap() + 1,
                    u32::MAX,
                    u32::try_from(len).unwrap_or(0),
                ]);
                let at = at.min(len - 4);
                data[at..at + 4].copy_from_slice(&value.to_be_bytes());
            }
            7 => {
                let other = rng.pick(seeds);
                let start = rng.below(other.len());
                let end = (start + rng.below(64)).min(other.len());
                data.splice(at..at, other[start..end].iter().copied());
            }
            8 if !dictionary.is_empty() => {
                let token = *rng.pick(dictionary);
                data.splice(at..at, token.iter().copied());
            }
            _ => {
                let to = rng.below(len + 1);
                let end = (to + rng.below(8)).min(len);
                let bytes: Vec<u8> = (to..end).map(|_| rng.next() as u8).collect();
                data.splice(to..end, bytes);
            }
        }
    }
    data
}

/// What a run saw: inputs run, and per outcome how often and the index of
/// the first input that produced it.
struct Report<O> {
    ran: usize,
    outcomes: BTreeMap<O, (usize, usize)>,
}

/// The input count within which every expected outcome must show up. The
/// generator is deterministic, so this holds on any machine; it is also the
/// least a run must reach before its time budget ends.
const MUST_COVER_WITHIN: usize = 20_000;

/// Runs `body` on the seeds, then on up to `count` mutated inputs within
/// `budget`; `body` returns the outcomes an input produced.
fn run<O: Ord + Debug>(
    seed: u64,
    seeds: &[Vec<u8>],
    dictionary: &[&[u8]],
    count: usize,
    budget: Duration,
    mut body: impl FnMut(&[u8]) -> Vec<O>,
) -> Report<O> {
    let mut rng = Rng(seed);
    let mut outcomes = BTreeMap::new();
    let mut record = |index: usize, found: Vec<O>| {
        for outcome in found {
            outcomes.entry(outcome).or_insert((0, index)).0 += 1;
        }
    };
    for input in seeds {
        record(0, body(input));
    }
    let started = Instant::now();
    let mut ran = 0;
    while ran < count && started.elapsed() < budget {
        let input = mutate(&mut rng, seeds, dictionary);
        record(ran, body(&input));
        ran += 1;
    }
    assert!(
        ran >= MUST_COVER_WITHIN,
        "only {ran} inputs within {budget:?}"
    );
    Report { ran, outcomes }
}

impl<O: Ord + Debug> Report<O> {
    /// Fails unless `outcome` occurred within the first [`MUST_COVER_WITHIN`] inputs.
    #[track_caller]
    fn assert_covered(&self, outcome: O) {
        match self.outcomes.get(&outcome) {
            Some(&(_, first)) if first < MUST_COVER_WITHIN => {}
            found => panic!("{outcome:?} not reached early enough ({found:?}): {self:?}"),
        }
    }
}

impl<O: Debug> Debug for Report<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} mutated inputs; outcome: (count, first at) ",
            self.ran
        )?;
        f.debug_map().entries(&self.outcomes).finish()
    }
}

fn frame_seeds() -> Vec<Vec<u8>> {
    let guest: Vec<Vec<u8>> = every_guest_message()
        .iter()
        .map(|msg| encode_frame(msg).unwrap())
        .collect();
    let host: Vec<Vec<u8>> = every_host_message()
        .iter()
        .map(|msg| encode_frame(msg).unwrap())
        .collect();
    let mut seeds = Vec::new();
    for (i, frame) in guest.iter().chain(&host).enumerate() {
        // First byte: the fuzz body's split-size selector.
        seeds.push([&[i as u8][..], frame].concat());
    }
    seeds.push([&[3][..], &guest.concat()].concat());
    seeds.push([&[7][..], &host.concat()].concat());
    seeds
}

#[test]
fn frame_decoder_survives_mutated_streams() {
    let report = run(
        0x5EED_F4A3,
        &frame_seeds(),
        &[],
        300_000,
        Duration::from_secs(120),
        |data| match run_frame_decoder(data) {
            Some((guest, host)) => vec![("guest", guest), ("host", host)],
            None => vec![],
        },
    );
    eprintln!("frame_decoder: {report:?}");
    for direction in ["guest", "host"] {
        for end in [
            End::Clean,
            End::Truncated,
            End::TooLarge,
            End::Malformed,
            End::TrailingBytes,
            End::UnknownVersion,
            End::Invalid,
        ] {
            report.assert_covered((direction, end));
        }
    }
}

const SPEC_SEEDS: &[&str] = &[
    "name: build\nruns-on: [linux, x64]\ntimeout-minutes: 10\nenv: { CARGO_TERM_COLOR: always }\nsteps:\n  - name: hello\n    run: echo \"hello from $(uname -r)\"\n",
    "name: t\nruns-on: linux\nenv:\n  A: 1\n  B: yes\nsteps:\n  - run: |\n      make\n      make test\n  - name: lint\n    run: make lint\n    working-directory: src\n    env: {X: y}\n    timeout-minutes: 5\n",
    "name: a\nruns-on: l\nsteps:\n  - run: &s echo hi\n  - run: *s\n",
    r#"{"name":"j","runs-on":["linux"],"timeout-minutes":3,"env":{"K":"v"},"steps":[{"run":"true","name":"n","working-directory":"/w","env":{"Z":"1"},"timeout-minutes":2}]}"#,
];

const SPEC_DICTIONARY: &[&[u8]] = &[
    b"\n",
    b"  ",
    b"- ",
    b": ",
    b"[",
    b"]",
    b"{",
    b"}",
    b",",
    b"\"",
    b"'",
    b"#",
    b"&a ",
    b"*a",
    b"!!binary ",
    b"---\n",
    b"~",
    b"null",
    b"0",
    b"-1",
    b"99999999999",
    b"1440",
    b"name: x\n",
    b"run: ",
    b"steps:\n",
    b"  - run: a\n",
    b"timeout-minutes: ",
    b"env: ",
    b"runs-on: ",
    b"working-directory: ",
    b"<<: ",
    b"\\u0000",
    b"\t",
    b"|\n",
    b">-\n",
    b"%YAML 1.2\n",
];

#[test]
fn job_spec_parser_survives_mutated_documents() {
    let seeds: Vec<Vec<u8>> = SPEC_SEEDS.iter().map(|s| s.as_bytes().to_vec()).collect();
    let report = run(
        0x5EED_5BEC,
        &seeds,
        SPEC_DICTIONARY,
        200_000,
        Duration::from_secs(120),
        // Mostly text: random bytes would make nearly half the inputs invalid UTF-8.
        |data| {
            let (yaml, json) = match data.first() {
                Some(byte) if byte % 8 == 0 => run_job_spec(data),
                _ => run_job_spec(String::from_utf8_lossy(data).as_bytes()),
            };
            vec![("yaml", yaml), ("json", json)]
        },
    );
    eprintln!("job_spec: {report:?}");
    for format in ["yaml", "json"] {
        for verdict in [
            Verdict::NotUtf8,
            Verdict::Accepted,
            Verdict::Syntax,
            Verdict::Invalid,
        ] {
            report.assert_covered((format, verdict));
        }
    }
}
