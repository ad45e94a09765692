//! The runner agent: PID 1 inside every microVM. It prepares the guest,
//! dials the host over vsock, runs exactly one job and then powers off.
