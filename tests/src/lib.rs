//! Nested-virtualization harness.
