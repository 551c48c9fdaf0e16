//! The one small trait every device frontend (ublk, NBD) serves. Implemented by the store's
//! [`crate::store::Disk`]; frontends know nothing else about the store.

/// A request that could not be carried out. Frontends turn it into the protocol's error for
/// that request only (ublk: a negative errno; NBD: an error reply).
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("request at offset {offset} length {len} is beyond the device end ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// The backing storage failed; the message names the file and operation.
    #[error("{0}")]
    Storage(Box<dyn std::error::Error + Send + Sync>),
}

impl BlockError {
    /// The errno a kernel frontend should complete the request with.
    pub fn errno(&self) -> i32 {
        match self {
            BlockError::OutOfRange { .. } => libc::EINVAL,
            BlockError::Storage(_) => libc::EIO,
        }
    }
}

/// A virtual block device. All methods may be called from several threads at once.
/// Offsets and lengths are in bytes and need not be aligned.
pub trait BlockDevice: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError>;
    /// With `fua`, the data is durable when this returns.
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BlockError>;
    /// After this the range reads as zeros.
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError>;
    /// The range's content is no longer needed. Whole blocks in it read as zeros afterwards;
    /// partial blocks at its edges are left as they were (discard is advisory). With `fua`,
    /// it is durable when this returns.
    fn discard(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError>;
    /// Every write completed before this call is durable when it returns.
    fn flush(&self) -> Result<(), BlockError>;
}

/// Checks that `[offset, offset + len)` lies inside a device of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), BlockError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}
