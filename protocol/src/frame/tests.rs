use std::io::Cursor;

use super::*;
use crate::limits;
use crate::message::tests::{every_guest_message, every_host_message};
use crate::message::{GuestHello, GuestMessage, HostMessage, LogChunk, OutputStream};

fn raw_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = u32::try_from(payload.len()).unwrap().to_be_bytes().to_vec();
    frame.extend_from_slice(payload);
    frame
}

fn guest_stream() -> (Vec<u8>, Vec<GuestMessage>) {
    let messages = every_guest_message();
    let bytes = messages
        .iter()
        .flat_map(|msg| encode_frame(msg).unwrap())
        .collect();
    (bytes, messages)
}

/// Feeds `chunks` in order, draining after each; returns every message.
fn decode_chunks<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> Vec<GuestMessage> {
    let mut decoder = FrameDecoder::<GuestMessage>::new();
    let mut out = Vec::new();
    for chunk in chunks {
        decoder.feed(chunk);
        while let Some(msg) = decoder.next_message().unwrap() {
            out.push(msg);
        }
    }
    decoder.finish().unwrap();
    out
}

#[test]
fn every_message_round_trips_through_frames() {
    for msg in every_guest_message() {
        let frame = encode_frame(&msg).unwrap();
        assert_eq!(
            read_frame::<GuestMessage>(&mut Cursor::new(&frame)).unwrap(),
            msg
        );
    }
    for msg in every_host_message() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &msg).unwrap();
        let mut decoder = FrameDecoder::<HostMessage>::new();
        decoder.feed(&wire);
        assert_eq!(decoder.next_message().unwrap(), Some(msg));
        assert_eq!(decoder.next_message().unwrap(), None);
        decoder.finish().unwrap();
    }
}

#[test]
fn header_is_big_endian_payload_length() {
    let frame = encode_frame(&GuestMessage::Ready).unwrap();
    assert_eq!(frame, [0, 0, 0, 1, 1]);
}

#[test]
fn stream_split_at_every_position_decodes_identically() {
    let (bytes, messages) = guest_stream();
    for split in 0..=bytes.len() {
        let (head, tail) = bytes.split_at(split);
        assert_eq!(decode_chunks([head, tail]), messages, "split at {split}");
    }
}

#[test]
fn stream_fed_one_byte_at_a_time_decodes_identically() {
    let (bytes, messages) = guest_stream();
    assert_eq!(decode_chunks(bytes.chunks(1)), messages);
}

#[test]
fn stream_in_pseudo_random_chunks_decodes_identically() {
    let (bytes, messages) = guest_stream();
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..500 {
        let mut chunks = Vec::new();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let take = usize::try_from(rng % 40).unwrap().min(rest.len());
            let (chunk, tail) = rest.split_at(take);
            chunks.push(chunk);
            rest = tail;
        }
        assert_eq!(decode_chunks(chunks), messages);
    }
}

#[test]
fn truncated_stream_is_reported_at_every_cut() {
    let frame = encode_frame(&every_guest_message()[0]).unwrap();
    for cut in 1..frame.len() {
        let mut decoder = FrameDecoder::<GuestMessage>::new();
        decoder.feed(&frame[..cut]);
        assert_eq!(decoder.next_message().unwrap(), None);
        let needed = if cut < FRAME_HEADER_LEN {
            FRAME_HEADER_LEN
        } else {
            frame.len()
        };
        match decoder.finish() {
            Err(FrameError::Truncated { needed: n, got }) => {
                assert_eq!((n, got), (needed, cut), "cut at {cut}");
            }
            other => panic!("cut at {cut}: {other:?}"),
        }
        match read_frame::<GuestMessage>(&mut Cursor::new(&frame[..cut])) {
            Err(FrameError::Truncated { needed: n, got }) => {
                assert_eq!((n, got), (needed, cut), "cut at {cut}");
            }
            other => panic!("cut at {cut}: {other:?}"),
        }
    }
}

#[test]
fn empty_stream_reads_as_closed() {
    let empty: &[u8] = &[];
    assert!(matches!(
        read_frame::<GuestMessage>(&mut Cursor::new(empty)),
        Err(FrameError::Closed)
    ));
    FrameDecoder::<GuestMessage>::new().finish().unwrap();
}

#[test]
fn oversized_length_is_refused_from_the_header_alone() {
    for len in [limits::MAX_FRAME_LEN as u32 + 1, u32::MAX] {
        let header = len.to_be_bytes();
        let mut decoder = FrameDecoder::<GuestMessage>::new();
        decoder.feed(&header);
        match decoder.next_message() {
            Err(FrameError::TooLarge { len: got, max }) => {
                assert_eq!((got, max), (len as usize, limits::MAX_FRAME_LEN));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(decoder.next_message(), Err(FrameError::Poisoned)));
        assert_eq!(decoder.buffered_len(), 0);
        assert!(matches!(
            read_frame::<GuestMessage>(&mut Cursor::new(header)),
            Err(FrameError::TooLarge { .. })
        ));
    }
}

#[test]
fn malformed_payloads_are_rejected() {
    let cases: &[(&str, Vec<u8>)] = &[
        ("empty payload", vec![]),
        ("unknown variant", vec![200]),
        (
            "huge variant varint",
            vec![0xff, 0xff, 0xff, 0xff, 0xff, 0x0f],
        ),
        // StepStarted{step: 0, name: len 2, invalid UTF-8}
        ("bad utf-8", vec![3, 0, 2, 0xc3, 0x28]),
        // StepFinished{step 0, exit_code: Option tag 7}
        ("bad option tag", vec![4, 0, 7]),
        // LogChunk{step 0, stream 0, seq 0, data len 10 but 1 byte}
        ("short byte string", vec![2, 0, 0, 0, 10, 1]),
        // LogChunk with a length varint that never ends
        (
            "endless varint",
            vec![2, 0, 0, 0, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80],
        ),
    ];
    for (name, payload) in cases {
        let mut decoder = FrameDecoder::<GuestMessage>::new();
        decoder.feed(&raw_frame(payload));
        assert!(
            matches!(decoder.next_message(), Err(FrameError::Malformed(_))),
            "{name}"
        );
        assert!(
            matches!(
                read_frame::<GuestMessage>(&mut Cursor::new(raw_frame(payload))),
                Err(FrameError::Malformed(_))
            ),
            "{name}"
        );
    }
}

#[test]
fn trailing_bytes_after_a_message_are_rejected() {
    // Ready followed by a stray byte inside the same frame.
    let mut decoder = FrameDecoder::<GuestMessage>::new();
    decoder.feed(&raw_frame(&[1, 0]));
    assert!(matches!(
        decoder.next_message(),
        Err(FrameError::TrailingBytes { count: 1 })
    ));
}

#[test]
fn unknown_version_is_reported_even_if_the_rest_is_unreadable() {
    let mut hello = every_guest_message()[0].clone();
    if let GuestMessage::Hello(GuestHello {
        protocol_version, ..
    }) = &mut hello
    {
        *protocol_version = PROTOCOL_VERSION + 1;
    }
    let payload = postcard::to_stdvec(&hello).unwrap();
    // A future Hello of an unknown layout: variant 0, version 2, then junk.
    let future = [0, 2, 0xff, 0xff, 0xff];
    for payload in [&payload[..], &future] {
        match read_frame::<GuestMessage>(&mut Cursor::new(raw_frame(payload))) {
            Err(FrameError::UnknownVersion { offered, supported }) => {
                assert_eq!(
                    (offered, supported),
                    (PROTOCOL_VERSION + 1, PROTOCOL_VERSION)
                );
            }
            other => panic!("{other:?}"),
        }
    }
    // The guest side checks the host's answer the same way.
    let ack = [0, 9];
    assert!(matches!(
        read_frame::<HostMessage>(&mut Cursor::new(raw_frame(&ack))),
        Err(FrameError::UnknownVersion { offered: 9, .. })
    ));
}

#[test]
fn message_breaking_a_bound_is_invalid_on_both_ends() {
    let chunk = GuestMessage::LogChunk(LogChunk {
        step: 0,
        stream: OutputStream::Stdout,
        seq: 0,
        data: vec![b'x'; limits::MAX_LOG_CHUNK_BYTES + 1],
    });
    assert!(matches!(
        encode_frame(&chunk),
        Err(FrameError::Invalid {
            kind: "LogChunk",
            ..
        })
    ));
    let payload = postcard::to_stdvec(&chunk).unwrap();
    assert!(matches!(
        read_frame::<GuestMessage>(&mut Cursor::new(raw_frame(&payload))),
        Err(FrameError::Invalid {
            kind: "LogChunk",
            ..
        })
    ));
}

#[test]
fn decoder_is_poisoned_after_an_error() {
    let mut decoder = FrameDecoder::<GuestMessage>::new();
    decoder.feed(&raw_frame(&[200]));
    decoder.feed(&encode_frame(&GuestMessage::Ready).unwrap());
    assert!(decoder.next_message().is_err());
    assert!(matches!(decoder.next_message(), Err(FrameError::Poisoned)));
    assert!(matches!(decoder.finish(), Err(FrameError::Poisoned)));
}

#[test]
fn read_frame_retries_interrupted_reads_and_reports_io_errors() {
    struct Flaky {
        data: Vec<u8>,
        pos: usize,
        calls: usize,
        fail_with: Option<io::ErrorKind>,
    }
    impl Read for Flaky {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.calls += 1;
            if self.calls % 2 == 1 {
                return Err(self.fail_with.unwrap_or(io::ErrorKind::Interrupted).into());
            }
            let n = buf.len().min(1).min(self.data.len() - self.pos);
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }
    let frame = encode_frame(&GuestMessage::Heartbeat).unwrap();
    let mut flaky = Flaky {
        data: frame.clone(),
        pos: 0,
        calls: 0,
        fail_with: None,
    };
    assert_eq!(
        read_frame::<GuestMessage>(&mut flaky).unwrap(),
        GuestMessage::Heartbeat
    );
    let mut broken = Flaky {
        data: frame,
        pos: 0,
        calls: 0,
        fail_with: Some(io::ErrorKind::ConnectionReset),
    };
    assert!(matches!(
        read_frame::<GuestMessage>(&mut broken),
        Err(FrameError::Io(err)) if err.kind() == io::ErrorKind::ConnectionReset
    ));
}

#[cfg(feature = "tokio")]
#[tokio::test]
async fn async_helpers_round_trip_and_detect_truncation() {
    let (mut a, mut b) = tokio::io::duplex(64);
    let sender = tokio::spawn(async move {
        for msg in every_host_message() {
            write_frame_async(&mut a, &msg).await.unwrap();
        }
    });
    for msg in every_host_message() {
        assert_eq!(read_frame_async::<HostMessage>(&mut b).await.unwrap(), msg);
    }
    sender.await.unwrap();
    assert!(matches!(
        read_frame_async::<HostMessage>(&mut b).await,
        Err(FrameError::Closed)
    ));
    let frame = encode_frame(&HostMessage::Shutdown).unwrap();
    let mut cut = &frame[..frame.len() - 1];
    assert!(matches!(
        read_frame_async::<HostMessage>(&mut cut).await,
        Err(FrameError::Truncated { .. })
    ));
}
