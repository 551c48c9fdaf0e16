//! Stasis: stateful swapout of virtual machines.
//!
//! Data flows device -> frontend -> store -> layers; the swap engine reads layers; the
//! repository knows nothing of block devices:
//! - [`blockdev`]: the small trait every device frontend serves.
//! - [`store`]: the branching copy-on-write block store (golden, delta and write layers, the
//!   registry that ties them into a branch tree, and hydration of swapped-in deltas).
//! - [`frontend`]: device frontends over the trait (ublk, NBD), with the I/O gate (freeze,
//!   swapout pin, retirement) and statistics they share.
//! - [`control`]: the per-disk control socket (status, stats, flush, freeze, thaw, swapout).
//! - [`repo`]: the content-addressed repository: metadata (redb), bricks (directories, S3),
//!   manifests, and its HTTP server and client with session tokens.
//! - [`swap`]: swapout (hash, negotiate, upload, commit) and lazy swapin with prefetch.
//! - [`hypervisor`]: checkpoint hooks (QEMU over QMP, Xen over `xl`, exec hooks), one trait
//!   dispatched statically.
//! - [`vm`]: whole-VM and experiment swapout and swapin over the drivers, the swap engine and
//!   the repository.
//! - [`cli`]: the `stasis` command.
//! - [`fsutil`]: the durable small-file write every layer uses.

pub mod blockdev;
pub mod cli;
pub mod control;
pub mod frontend;
pub mod fsutil;
pub mod hypervisor;
pub mod repo;
pub mod store;
pub mod swap;
pub mod units;
pub mod vm;
