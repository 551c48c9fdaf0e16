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
    /// The recorded device cannot be taken over; nothing was changed.
    #[error("ublk: cannot recover /dev/ublkb{dev_id}: {why}")]
    NotRecoverable { dev_id: u32, why: String },
}

impl From<UblkError> for UblkFrontendError {
    fn from(e: UblkError) -> Self {
        UblkFrontendError::Ublk(e.to_string())
    }
}

/// Every device is created so that a dead server does not take it along: the driver quiesces
/// it, keeps /dev/ublkbN (and its mounts), and re-issues the requests the dead server had
/// taken to the next server (`--recover`). Re-issuing is safe for the store: every request is
/// idempotent (kernel-notes/ublk.md section 3.2).
const RECOVERABLE: u64 = (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;

/// Which kernel device serves a disk, recorded in the store's run directory so that a new
/// server can take it over after a crash. `tag` is random per device and is also kept by the
/// kernel (dev_info.ublksrv_flags, immutable for the device's life): device ids are reused and
/// forgotten at reboot, the tag proves the device is still ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceRecord {
    pub dev_id: u32,
    pub tag: u64,
}

impl DeviceRecord {
    pub fn load(path: &std::path::Path) -> Option<DeviceRecord> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    /// Written whole or not at all (temporary file, then rename).
    pub fn save(&self, path: &std::path::Path) -> std::io::Result<()> {
        let tmp = path.with_extension("ublk.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(tmp, path)
    }
}

/// A random non-zero tag for a new device.
pub fn new_tag() -> u64 {
    let mut tag = 0u64;
    while tag == 0 {
        // SAFETY: getrandom writes at most 8 bytes into `tag`.
        let n = unsafe { libc::getrandom(std::ptr::addr_of_mut!(tag).cast(), 8, 0) };
        if n != 8 {
            // No entropy source: time and pid still make a collision with a stale id unlikely.
            tag = crate::frontend::unix_now() ^ ((std::process::id() as u64) << 32) | 1;
        }
    }
    tag
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

/// Creates the device (not started yet), recoverable, carrying `tag`.
pub fn create(
    name: &str,
    opts: &UblkOptions,
    tag: u64,
) -> Result<Arc<UblkCtrl>, UblkFrontendError> {
    let ctrl = UblkCtrlBuilder::default()
        .name(name)
        .nr_queues(opts.queues)
        .depth(opts.depth)
        .ctrl_flags(RECOVERABLE)
        .ctrl_target_flags(tag)
        .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
        .build()?;
    Ok(Arc::new(ctrl))
}

/// The device a record names, if it still exists and carries the record's tag (ids are
/// reused, and forgotten at reboot). Changes nothing.
pub fn recorded_device(record: &DeviceRecord) -> Option<sys::ublksrv_ctrl_dev_info> {
    recorded_device_any_state(record).filter(|info| {
        matches!(
            info.state as u32,
            sys::UBLK_S_DEV_LIVE | sys::UBLK_S_DEV_QUIESCED
        )
    })
}

/// Like [`recorded_device`], in any state (also DEAD: added or stopped, never started or not
/// yet deleted, as a server that died at the wrong moment leaves it).
fn recorded_device_any_state(record: &DeviceRecord) -> Option<sys::ublksrv_ctrl_dev_info> {
    let id = i32::try_from(record.dev_id).ok()?;
    let info = UblkCtrl::new_simple(id).ok()?.dev_info();
    (info.ublksrv_flags == record.tag).then_some(info)
}

/// The store's disk guard (`Store::set_disk_guard`): a disk whose ublk server died may
/// still have its device, quiesced, with a filesystem mounted on it and writes cached above
/// it. Serving, changing or removing the disk then would fork its history under that
/// filesystem; only `serve --ublk --recover` and `ublk delete` may touch it. Asked with the
/// disk's lock held, which proves no server runs it.
pub fn orphan_guard(store: &crate::store::Store, disk: &str) -> Result<(), String> {
    let Some(record) = DeviceRecord::load(&store.frontend_record(disk, "ublk")) else {
        return Ok(());
    };
    match recorded_device(&record) {
        Some(_) => Err(format!(
            "disk {disk}'s ublk server died and left /dev/ublkb{} waiting: take it over with \
             `stasis serve {disk} --ublk --recover`, or give it up with `stasis ublk delete {disk}`",
            record.dev_id
        )),
        None => Ok(()),
    }
}

/// Checks, without changing anything, that the recorded device can be taken over. The
/// caller must hold the disk's lock: that proves the server that ran the device has exited
/// or is exiting, so a device still LIVE is only on its way to QUIESCED (the driver gets
/// there once the dead server's /dev/ublkcN is released; START_USER_RECOVERY waits for it).
pub fn check_recoverable(
    record: &DeviceRecord,
) -> Result<sys::ublksrv_ctrl_dev_info, UblkFrontendError> {
    let not = |why: &str| UblkFrontendError::NotRecoverable {
        dev_id: record.dev_id,
        why: why.to_string(),
    };
    // Only LIVE or QUIESCED devices are returned: a DEAD one cannot be recovered.
    let info = recorded_device(record).ok_or_else(|| {
        not("the device is gone (deleted, or the machine rebooted), or its id was reused")
    })?;
    if info.flags & RECOVERABLE != RECOVERABLE {
        return Err(not("the device was created without user recovery"));
    }
    Ok(info)
}

/// Takes over a device whose server died: START_USER_RECOVERY (which must succeed: any
/// other answer leaves the device untouched), then a control that will send
/// END_USER_RECOVERY instead of START_DEV once `serve` has set up the queues.
pub fn reattach(record: &DeviceRecord) -> Result<Arc<UblkCtrl>, UblkFrontendError> {
    let info = check_recoverable(record)?;
    let id = record.dev_id as i32;
    // The driver answers EBUSY until the dead server's /dev/ublkcN is released and the
    // device QUIESCED; libublk retries that for 30 s and then returns Ok(-EBUSY): only 0
    // means the driver accepted.
    match UblkCtrl::new_simple(id)?.start_user_recover() {
        Ok(0) => {}
        Ok(r) | Err(UblkError::OtherError(r)) => {
            return Err(UblkFrontendError::NotRecoverable {
                dev_id: record.dev_id,
                why: format!(
                    "START_USER_RECOVERY: {}",
                    std::io::Error::from_raw_os_error(-r)
                ),
            })
        }
        Err(e) => return Err(e.into()),
    }
    let ctrl = UblkCtrlBuilder::default()
        .name("stasis")
        .id(id)
        .nr_queues(info.nr_hw_queues)
        .depth(info.queue_depth)
        .io_buf_bytes(info.max_io_buf_bytes)
        .ctrl_flags(info.flags)
        .ctrl_target_flags(record.tag)
        .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
        .build()?;
    Ok(Arc::new(ctrl))
}

/// Deletes a recorded device whose server is gone, in whatever state it was left (the
/// caller holds the disk's lock: no server runs it; the tag proves it is that device). A filesystem still mounted on it sees I/O errors.
pub fn delete_orphan(record: &DeviceRecord) -> Result<(), UblkFrontendError> {
    recorded_device_any_state(record).ok_or_else(|| UblkFrontendError::NotRecoverable {
        dev_id: record.dev_id,
        why: "the device is gone (deleted, or the machine rebooted), or its id was reused".into(),
    })?;
    UblkCtrl::new_simple(record.dev_id as i32)?.del_dev()?;
    Ok(())
}

/// Serves `dev` on the device until it is stopped (`kill_dev` from another thread); calls
/// `started` with the device id once /dev/ublkbN exists (or is live again, for a reattached
/// device). Deletes the device once stopped, and when a new device fails to start; a
/// reattached device that fails to start is left for another `--recover` (it holds a mount).
pub fn serve<D: BlockDevice + 'static>(
    ctrl: &UblkCtrl,
    dev: Arc<D>,
    reattached: bool,
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
    if reattached && result.is_err() {
        ctrl.disown();
        return result.map(|_| ()).map_err(Into::into);
    }
    let deleted = ctrl.del_dev();
    result?;
    deleted?;
    Ok(())
}

/// Detaches, in this process's mount namespace only, every mount of /dev/ublkb`dev_id`.
/// A recovering server's private namespace is a copy of its parent's, so it holds the very
/// filesystem the guest mounted on the device it is about to serve; such a mount would keep
/// that filesystem alive after the user unmounts it, and would make the server's own exit
/// wait on the device (kernel-notes/ublk.md section 1.6). Call only after unsharing.
pub fn detach_own_mounts(dev_id: u32) -> std::io::Result<usize> {
    let dev = std::fs::read_to_string(format!("/sys/block/ublkb{dev_id}/dev"))?;
    let dev = dev.trim();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut points: Vec<std::ffi::CString> = mountinfo
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let (Some(majmin), Some(point)) = (fields.nth(2), fields.nth(1)) else {
                return None;
            };
            (majmin == dev).then(|| unescape_mount_path(point))
        })
        .collect();
    // Innermost (listed last) first.
    points.reverse();
    for point in &points {
        // SAFETY: umount2 on a NUL-terminated path.
        if unsafe { libc::umount2(point.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(points.len())
}

/// /proc/self/mountinfo writes space, tab, newline and backslash as \ooo octal escapes.
fn unescape_mount_path(s: &str) -> std::ffi::CString {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push(d.iter().fold(0u8, |v, c| v.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    std::ffi::CString::new(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(
            super::unescape_mount_path(r"/mnt/a\040b\134c").to_bytes(),
            b"/mnt/a b\\c"
        );
        assert_eq!(super::unescape_mount_path(r"/x\04").to_bytes(), br"/x\04");
    }
}
