//! Fuzz bodies, shared by the cargo-fuzz targets in `protocol/fuzz` and by
//! the deterministic mutation tests that run them under `cargo test`.
//!
//! Each body takes arbitrary bytes, must never panic, and asserts the
//! properties that must hold for any input:
//!
//! * [`frame_decoder`]: decoding does not depend on how the stream is split;
//!   the blocking reader agrees with the incremental decoder; every decoded
//!   message re-encodes and decodes to itself.
//! * [`job_spec`]: the YAML and JSON parsers return `Ok` or a typed error;
//!   an accepted spec is valid, converts to a job that fits in one frame,
//!   and survives a JSON round trip.

use std::io::Cursor;

use crate::frame::{FrameDecoder, FrameError, encode_frame, read_frame};
use crate::job::{JobSpec, SpecError};
use crate::message::{GuestMessage, HostMessage, JobId, Secrets, WireMessage};

/// Fuzz body for the frame decoder. The first byte chooses the chunk size
/// used to feed the rest of the input.
pub fn frame_decoder(data: &[u8]) {
    run_frame_decoder(data);
}

/// [`frame_decoder`], returning how the stream ended for each direction.
pub(crate) fn run_frame_decoder(data: &[u8]) -> Option<(End, End)> {
    let (&split, stream) = data.split_first()?;
    let chunk = usize::from(split % 16) + 1;
    Some((
        check_stream::<GuestMessage>(stream, chunk),
        check_stream::<HostMessage>(stream, chunk),
    ))
}

/// What decoding a whole stream gave: the messages, then how it ended.
#[derive(Debug, PartialEq)]
struct Outcome<M> {
    messages: Vec<M>,
    end: End,
}

/// How a stream ended (the error kind only: I/O details do not compare).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum End {
    Clean,
    Truncated,
    TooLarge,
    Malformed,
    TrailingBytes,
    UnknownVersion,
    Invalid,
}

fn end_of(err: &FrameError) -> End {
    match err {
        FrameError::Truncated { .. } => End::Truncated,
        FrameError::TooLarge { .. } => End::TooLarge,
        FrameError::Malformed(_) => End::Malformed,
        FrameError::TrailingBytes { .. } => End::TrailingBytes,
        FrameError::UnknownVersion { .. } => End::UnknownVersion,
        FrameError::Invalid { .. } => End::Invalid,
        FrameError::Closed | FrameError::Poisoned | FrameError::Io(_) => {
            panic!("impossible error decoding an in-memory stream: {err}")
        }
    }
}

fn decode_in_chunks<M: WireMessage>(stream: &[u8], chunk: usize) -> Outcome<M> {
    let mut decoder = FrameDecoder::<M>::new();
    let mut messages = Vec::new();
    for piece in stream.chunks(chunk) {
        decoder.feed(piece);
        loop {
            match decoder.next_message() {
                Ok(Some(msg)) => messages.push(msg),
                Ok(None) => break,
                Err(err) => {
                    assert!(matches!(decoder.next_message(), Err(FrameError::Poisoned)));
                    let end = end_of(&err);
                    return Outcome { messages, end };
                }
            }
        }
    }
    let end = match decoder.finish() {
        Ok(()) => End::Clean,
        Err(err) => end_of(&err),
    };
    Outcome { messages, end }
}

fn read_blocking<M: WireMessage>(stream: &[u8]) -> Outcome<M> {
    let mut reader = Cursor::new(stream);
    let mut messages = Vec::new();
    loop {
        match read_frame::<M>(&mut reader) {
            Ok(msg) => messages.push(msg),
            Err(FrameError::Closed) => {
                return Outcome {
                    messages,
                    end: End::Clean,
                };
            }
            Err(err) => {
                let end = end_of(&err);
                return Outcome { messages, end };
            }
        }
    }
}

fn check_stream<M: WireMessage + PartialEq>(stream: &[u8], chunk: usize) -> End {
    let whole = decode_in_chunks::<M>(stream, stream.len().max(1));
    let chunked = decode_in_chunks::<M>(stream, chunk);
    assert_eq!(whole, chunked, "decoding depends on the split");
    let blocking = read_blocking::<M>(stream);
    assert_eq!(
        whole, blocking,
        "blocking reader disagrees with the decoder"
    );
    for msg in &whole.messages {
        let frame = encode_frame(msg).expect("a decoded message re-encodes");
        let again = read_frame::<M>(&mut Cursor::new(&frame)).expect("and decodes again");
        assert_eq!(&again, msg);
    }
    whole.end
}

/// Fuzz body for the job spec parsers (YAML and JSON).
pub fn job_spec(data: &[u8]) {
    run_job_spec(data);
}

/// How a parser treated an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Verdict {
    NotUtf8,
    Accepted,
    TooLarge,
    Syntax,
    Invalid,
}

/// [`job_spec`], returning the YAML and the JSON parser's verdicts.
pub(crate) fn run_job_spec(data: &[u8]) -> (Verdict, Verdict) {
    let Ok(text) = std::str::from_utf8(data) else {
        return (Verdict::NotUtf8, Verdict::NotUtf8);
    };
    (
        check_spec(JobSpec::from_yaml(text)),
        check_spec(JobSpec::from_json(text)),
    )
}

fn check_spec(parsed: Result<JobSpec, SpecError>) -> Verdict {
    let spec = match parsed {
        Ok(spec) => spec,
        Err(SpecError::TooLarge { .. }) => return Verdict::TooLarge,
        Err(SpecError::Syntax { .. }) => return Verdict::Syntax,
        Err(SpecError::Invalid(_)) => return Verdict::Invalid,
    };
    spec.validate().expect("an accepted spec is valid");
    let job = spec
        .to_job(JobId("fuzz-job".into()), Secrets::default())
        .expect("an accepted spec converts to a job");
    encode_frame(&HostMessage::Job(job)).expect("its job fits in one frame");
    let json = serde_json::to_string(&spec).expect("a spec serializes");
    if json.len() <= crate::limits::MAX_SPEC_BYTES {
        assert_eq!(JobSpec::from_json(&json).expect("and parses back"), spec);
    }
    Verdict::Accepted
}

#[cfg(test)]
mod tests;
