//! Sockets, created by ckpt-restore before the tree is forked (see [`crate::objects`]).

pub mod inet;
pub mod unix;
