//! /run/flannel/subnet.env in upstream's format.
