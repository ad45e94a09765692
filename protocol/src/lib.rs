//! Wire protocol between the host agent and the runner agent (vsock frames),
//! and the types of the orchestrator's HTTP API.
//!
//! This crate is plain data plus validation; it performs no networking of its
//! own beyond the frame read/write helpers over any `std::io` (or, with the
//! `tokio` feature, any tokio) stream. Its users:
//!
//! * the **runner agent** (guest PID 1, blocking std I/O): [`frame::write_frame`],
//!   [`frame::read_frame`], [`session::guest_handshake`];
//! * the **host agent** (tokio): [`frame::FrameDecoder`] or the async helpers,
//!   [`session::HostSession`] to police what the guest sends, and the [`api`]
//!   types to talk to the orchestrator;
//! * the **orchestrator**: [`job::JobSpec`] and the [`api`] types.
//!
//! Modules:
//! * [`frame`]: length-prefixed frame codec (postcard payloads), sans-IO decoder.
//! * [`message`]: guest <-> host message types and the protocol version.
//! * [`session`]: handshake and the host-side checker of the guest's messages.
//! * [`ports`]: fixed vsock CIDs and ports.
//! * [`job`]: the user-facing job spec (YAML/JSON) and its validation.
//! * [`api`]: orchestrator HTTP request/response bodies and routes.
//! * [`limits`]: every size, count and time bound in one place.
//! * [`validation`]: the shared "field path + problem" error vocabulary.

pub mod api;
mod bytes_serde;
pub mod frame;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod job;
pub mod limits;
pub mod message;
pub mod ports;
pub mod session;
pub mod validation;

pub use frame::{FrameDecoder, FrameError, read_frame, write_frame};
pub use message::{GuestMessage, HostMessage, PROTOCOL_VERSION};
