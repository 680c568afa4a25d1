//! Which subnet a node should hold: upstream's acquisition order.
