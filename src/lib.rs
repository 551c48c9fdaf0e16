//! Stasis: stateful swapout of virtual machines.
//!
//! Data flows device -> frontend -> store -> layers:
//! - [`blockdev`]: the small trait every device frontend serves.
//! - [`store`]: the branching copy-on-write block store (golden, delta and write layers, and
//!   the registry that ties them into a branch tree).
//! - [`frontend`]: device frontends over the trait (NBD now; ublk next), with the I/O gate
//!   and statistics they share.
//! - [`control`]: the per-disk control socket (status, stats, flush, freeze, thaw).
//! - [`cli`]: the `stasis` command.
//!
//! The device frontends (ublk, NBD), the control socket, the repository, the swap engine and
//! the hypervisor drivers build on these (see README.md for the plan).

pub mod blockdev;
pub mod cli;
pub mod control;
pub mod frontend;
pub mod repo;
pub mod store;
pub mod swap;
pub mod units;
