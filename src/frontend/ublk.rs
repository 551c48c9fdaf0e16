//! ublk frontend: serves a disk as /dev/ublkbN through the kernel's userspace block driver
//! (libublk 0.4.8, pinned: its API changes every minor release; io_uring underneath).
//!
//! One queue per CPU by default, queue depth 128; each queue thread runs one task per tag.
//! Device parameters tell the kernel the truth: 512-byte logical and 4 KiB physical blocks, a
//! volatile write cache and FUA (so FLUSH and FUA reach us), discard and write-zeroes at 4 KiB
//! granularity. FLUSH carries no real sector range (start_sector = u64::MAX on 6.12): it is
//! handled before any bounds check. An error fails that request only (-errno).

use std::sync::Arc;

use libublk::io::{UblkDev, UblkQueue};
use libublk::{
    ctrl::UblkCtrl, ctrl::UblkCtrlBuilder, helpers::IoBuf, sys, BufDesc, UblkError, UblkFlags,
};

use crate::blockdev::BlockDevice;

#[derive(Debug, thiserror::Error)]
pub enum UblkFrontendError {
    #[error(
        "ublk: {0} (is the ublk_drv module loaded, /dev/ublk-control present, and are we root?)"
    )]
    Ublk(String),
}

impl From<UblkError> for UblkFrontendError {
    fn from(e: UblkError) -> Self {
        UblkFrontendError::Ublk(e.to_string())
    }
}

pub struct UblkOptions {
    pub queues: u16,
    pub depth: u16,
}

impl Default for UblkOptions {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u16;
        UblkOptions {
            queues: cpus.clamp(1, 32),
            depth: 128,
        }
    }
}

/// Carries out one request; returns what the kernel expects: bytes done, or -errno.
fn handle<D: BlockDevice>(dev: &D, iod: &sys::ublksrv_io_desc, buf: &mut [u8]) -> i32 {
    let op = iod.op_flags & 0xff;
    let fua = iod.op_flags & sys::UBLK_IO_F_FUA != 0;
    // FLUSH first: its sector is not an offset (u64::MAX), so no range check may see it.
    if op == sys::UBLK_IO_OP_FLUSH {
        return match dev.flush() {
            Ok(()) => 0,
            Err(e) => -e.errno(),
        };
    }
    let (Some(offset), Some(bytes)) = (
        iod.start_sector.checked_mul(512),
        (iod.nr_sectors as u64).checked_mul(512),
    ) else {
        return -libc::EINVAL;
    };
    let result = match op {
        sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE if bytes as usize > buf.len() => {
            return -libc::EINVAL
        }
        sys::UBLK_IO_OP_READ => dev.read_at(offset, &mut buf[..bytes as usize]),
        sys::UBLK_IO_OP_WRITE => dev.write_at(offset, &buf[..bytes as usize], fua),
        sys::UBLK_IO_OP_DISCARD => dev.discard(offset, bytes, fua),
        sys::UBLK_IO_OP_WRITE_ZEROES => dev.write_zeroes(offset, bytes, fua),
        _ => return -libc::EOPNOTSUPP,
    };
    match result {
        // Reads and writes report their bytes (at most the tag's buffer, far below 2 GiB);
        // discard and write-zeroes report 0: their length can be 2 GiB, which does not fit
        // the i32 result (a kernel ignores non-negative results for them).
        Ok(()) if matches!(op, sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE) => bytes as i32,
        Ok(()) => 0,
        Err(e) => {
            tracing::warn!(op, offset, bytes, "ublk: request failed: {e}");
            -e.errno()
        }
    }
}

async fn io_task<D: BlockDevice>(q: &UblkQueue<'_>, tag: u16, dev: &D) -> Result<(), UblkError> {
    let buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        // SAFETY: between a request's arrival and its commit the kernel does not touch this
        // tag's buffer, and only this task uses it.
        let data = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr(), buf.len()) };
        let res = handle(dev, q.get_iod(tag), data);
        q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
            .await?;
    }
}

fn queue_thread<D: BlockDevice + 'static>(qid: u16, udev: &UblkDev, dev: Arc<D>) {
    let q = match UblkQueue::new(qid, udev) {
        Ok(q) => std::rc::Rc::new(q),
        Err(e) => {
            tracing::error!("ublk: queue {qid}: {e}");
            return;
        }
    };
    let exe_rc = std::rc::Rc::new(smol::LocalExecutor::new());
    let exe = exe_rc.clone();
    let mut tasks = Vec::new();
    for tag in 0..udev.dev_info.queue_depth {
        let (q, dev) = (q.clone(), dev.clone());
        tasks.push(exe.spawn(async move { io_task(&q, tag, &*dev).await }));
    }
    smol::block_on(exe_rc.run(async move {
        let run_ops = || while exe.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&q, Some(20), run_ops, done).await {
            tracing::debug!("ublk: queue {qid}: {e}");
        }
    }));
}

/// Runs the libublk control ring on this thread (it is thread-local in 0.4.8: a thread that
/// did not create it must before it calls kill_dev or del_dev).
pub fn init_control_ring() -> Result<(), UblkFrontendError> {
    libublk::ublk_init_ctrl_task_ring(|r| {
        if r.is_none() {
            *r = Some(
                io_uring::IoUring::builder()
                    .build(16)
                    .map_err(UblkError::IOError)?,
            );
        }
        Ok(())
    })
    .map_err(UblkFrontendError::from)
}

/// Creates the device (not started yet).
pub fn create(name: &str, opts: &UblkOptions) -> Result<Arc<UblkCtrl>, UblkFrontendError> {
    let ctrl = UblkCtrlBuilder::default()
        .name(name)
        .nr_queues(opts.queues)
        .depth(opts.depth)
        .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
        .build()?;
    Ok(Arc::new(ctrl))
}

/// Serves `dev` on the device until it is stopped (`kill_dev` from another thread); calls
/// `started` with the device id once /dev/ublkbN exists. Deletes the device before returning.
pub fn serve<D: BlockDevice + 'static>(
    ctrl: &UblkCtrl,
    dev: Arc<D>,
    started: impl FnOnce(u32) + Send + Sync + 'static,
) -> Result<(), UblkFrontendError> {
    let size = dev.size();
    let result = ctrl.run_target(
        move |udev| {
            udev.set_default_params(size);
            let p = &mut udev.tgt.params;
            p.basic.attrs |= sys::UBLK_ATTR_FUA;
            p.types |= sys::UBLK_PARAM_TYPE_DISCARD;
            p.discard.discard_granularity = crate::store::BLOCK_SIZE as u32;
            p.discard.max_discard_sectors = 1 << 22;
            p.discard.max_write_zeroes_sectors = 1 << 22;
            p.discard.max_discard_segments = 1;
            Ok(())
        },
        move |qid, udev| queue_thread(qid, udev, dev.clone()),
        move |c| started(c.dev_info().dev_id),
    );
    let deleted = ctrl.del_dev();
    result?;
    deleted?;
    Ok(())
}
