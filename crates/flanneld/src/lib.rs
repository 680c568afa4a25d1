//! The node daemon: interface selection, lease acquisition, the level-triggered reconciler and backends.
