//! Lease stores: the [`Store`] abstraction and the local directory store.
