//! Subnet arithmetic.
