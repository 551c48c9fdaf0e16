//! Stasis: stateful swapout of virtual machines.
//!
//! Data flows device -> frontend -> store -> layers:
//! - [`blockdev`]: the small trait every device frontend serves.
//! - [`store`]: the branching copy-on-write block store (golden, delta and write layers, and
//!   the registry that ties them into a branch tree).
//! - [`cli`]: the `stasis` command.
//!
//! The device frontends (ublk, NBD), the control socket, the repository, the swap engine and
//! the hypervisor drivers build on these (see README.md for the plan).

pub mod blockdev;
pub mod cli;
pub mod store;
pub mod units;
