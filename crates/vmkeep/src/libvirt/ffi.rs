//! The libvirt calls that the `virt` crate offers only as raw C functions in `virt::sys`:
//! pull-mode backup, checkpoints, job abort and job statistics, block pull and its
//! progress, the guest agent's freeze and thaw, and the hole of a sparse stream.
//!
//! This is the only file of vmkeep with `unsafe` for libvirt. Every wrapper turns a NULL or
//! `-1` return into an [`FfiError`] carrying libvirt's own message (`virGetLastError`,
//! read at once because libvirt keeps it per thread), copies every string libvirt
//! allocates and frees it with `libc::free`, and frees every checkpoint handle in `Drop`.
//!
//! Two calls are wrapped here although `virt` 0.5 has them, because its versions are
//! unsound: `Domain::job_stats` hands libvirt's `malloc`ed parameter array to
//! `Vec::from_raw_parts` (Rust's allocator then frees memory it did not allocate) and never
//! frees the string parameters, which carry the error message vmkeep needs; and
//! `Domain::block_info` ignores a failed `virDomainGetBlockInfo` and reads the
//! uninitialised result (an empty CD-ROM drive is enough to fail it).

use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int, c_uint};
use std::ptr;

use virt::domain::Domain;
use virt::error::{Error as VirtError, ErrorNumber};
use virt::sys;

/// A failed libvirt call: libvirt's error code and message.
#[derive(Debug, Clone)]
pub(crate) struct FfiError {
    /// `virErrorNumber`, or `None` when libvirt set no error (or the argument was bad
    /// before libvirt was called).
    pub code: Option<ErrorNumber>,
    pub message: String,
}

impl FfiError {
    /// The error libvirt recorded for the failed call on this thread.
    fn last() -> Self {
        let err = VirtError::last_error();
        let code = match err.code() {
            virt::enumutil::Enum::Known(code) => Some(code),
            virt::enumutil::Enum::Unknown(_) => None,
        };
        FfiError {
            code,
            message: err.message().to_string(),
        }
    }

    fn argument(what: &str) -> Self {
        FfiError {
            code: None,
            message: format!("{what} contains a NUL byte"),
        }
    }

    pub fn is(&self, code: ErrorNumber) -> bool {
        self.code == Some(code)
    }
}

impl std::fmt::Display for FfiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

pub(crate) type FfiResult<T> = Result<T, FfiError>;

fn c_string(value: &str, what: &str) -> FfiResult<CString> {
    CString::new(value).map_err(|_| FfiError::argument(what))
}

/// `-1` (or any negative return) becomes libvirt's last error.
fn check(rc: c_int) -> FfiResult<c_int> {
    if rc < 0 {
        Err(FfiError::last())
    } else {
        Ok(rc)
    }
}

/// Copy a string that libvirt allocated for the caller and free it; NULL is the failure
/// return of every function that hands out such a string.
fn take_string(raw: *mut c_char) -> FfiResult<String> {
    if raw.is_null() {
        return Err(FfiError::last());
    }
    // SAFETY: libvirt returned a non-NULL, NUL-terminated string that it allocated with
    // malloc for the caller; we copy it before freeing it exactly once.
    unsafe {
        let text = CStr::from_ptr(raw).to_string_lossy().into_owned();
        libc::free(raw.cast());
        Ok(text)
    }
}

/// The raw domain pointer for a call. `virt` keeps the pointer valid (one reference) for
/// as long as the `Domain` lives, and every caller below borrows the `Domain` for the
/// whole call.
fn dom_ptr(dom: &Domain) -> sys::virDomainPtr {
    // SAFETY: as_ptr only copies the pointer; the borrow of `dom` keeps it valid for the
    // duration of the libvirt call it is passed to.
    unsafe { dom.as_ptr() }
}

/// Start a backup job (`virDomainBackupBegin`), optionally creating a checkpoint at the
/// same instant.
pub(crate) fn backup_begin(
    dom: &Domain,
    backup_xml: &str,
    checkpoint_xml: Option<&str>,
    flags: c_uint,
) -> FfiResult<()> {
    let backup = c_string(backup_xml, "backup XML")?;
    let checkpoint = checkpoint_xml
        .map(|xml| c_string(xml, "checkpoint XML"))
        .transpose()?;
    let checkpoint_ptr = checkpoint.as_ref().map_or(ptr::null(), |c| c.as_ptr());
    // SAFETY: the domain pointer is valid (see dom_ptr); both strings are NUL-terminated
    // and outlive the call; libvirt accepts NULL for "no checkpoint".
    let rc =
        unsafe { sys::virDomainBackupBegin(dom_ptr(dom), backup.as_ptr(), checkpoint_ptr, flags) };
    check(rc).map(drop)
}

/// The XML of the running backup job (`virDomainBackupGetXMLDesc`).
pub(crate) fn backup_xml_desc(dom: &Domain) -> FfiResult<String> {
    // SAFETY: valid domain pointer; the returned string is owned by us (take_string).
    take_string(unsafe { sys::virDomainBackupGetXMLDesc(dom_ptr(dom), 0) })
}

/// Abort the domain's current job (`virDomainAbortJob`); for a pull-mode backup this is
/// the normal way to end it.
pub(crate) fn abort_job(dom: &Domain) -> FfiResult<()> {
    // SAFETY: valid domain pointer, no other arguments.
    check(unsafe { sys::virDomainAbortJob(dom_ptr(dom)) }).map(drop)
}

/// Send a hole of `length` bytes on a sparse stream (`virStreamSendHole`; the stream was
/// opened for a sparse upload).
pub(crate) fn stream_send_hole(stream: &virt::stream::Stream, length: i64) -> FfiResult<()> {
    // SAFETY: `stream` is a live stream borrowed for the call; virStreamSendHole only
    // reads its arguments and keeps no pointer.
    check(unsafe { sys::virStreamSendHole(stream.as_ptr(), length, 0) }).map(drop)
}

/// Capacity (guest-visible size) of a domain disk in bytes (`virDomainGetBlockInfo`);
/// works on shut-off domains for local files too.
pub(crate) fn block_capacity(dom: &Domain, disk: &str) -> FfiResult<u64> {
    let disk = c_string(disk, "disk name")?;
    let mut info = sys::virDomainBlockInfo {
        capacity: 0,
        allocation: 0,
        physical: 0,
    };
    // SAFETY: valid domain pointer, NUL-terminated disk name, and `info` is a live,
    // initialised struct that libvirt fills on success.
    check(unsafe { sys::virDomainGetBlockInfo(dom_ptr(dom), disk.as_ptr(), &mut info, 0) })?;
    Ok(info.capacity)
}

/// Start pulling every block of disk `disk`'s backing chain into its top image
/// (`virDomainBlockPull`, no bandwidth limit): when the job completes the disk no longer
/// has a backing file.
pub(crate) fn block_pull(dom: &Domain, disk: &str) -> FfiResult<()> {
    let disk = c_string(disk, "disk name")?;
    // SAFETY: valid domain pointer and NUL-terminated disk name, both live for the call.
    check(unsafe { sys::virDomainBlockPull(dom_ptr(dom), disk.as_ptr(), 0, 0) }).map(drop)
}

/// The progress of disk `disk`'s block job (`virDomainGetBlockJobInfo`): `None` when the
/// disk has no block job, else (bytes done, bytes in all) as QEMU counts them.
pub(crate) fn block_job_progress(dom: &Domain, disk: &str) -> FfiResult<Option<(u64, u64)>> {
    let disk = c_string(disk, "disk name")?;
    let mut info = sys::virDomainBlockJobInfo {
        type_: 0,
        bandwidth: 0,
        cur: 0,
        end: 0,
    };
    // SAFETY: valid domain pointer, NUL-terminated disk name, and `info` is a live,
    // initialised struct that libvirt fills when it returns 1.
    let rc =
        check(unsafe { sys::virDomainGetBlockJobInfo(dom_ptr(dom), disk.as_ptr(), &mut info, 0) })?;
    Ok((rc == 1).then_some((info.cur, info.end)))
}

/// Freeze every file system of the guest through its agent (`virDomainFSFreeze`, all
/// mount points): the number frozen.
pub(crate) fn fs_freeze(dom: &Domain) -> FfiResult<u32> {
    // SAFETY: valid domain pointer; NULL and 0 mean "every mount point".
    check(unsafe { sys::virDomainFSFreeze(dom_ptr(dom), ptr::null_mut(), 0, 0) }).map(|n| n as u32)
}

/// Thaw every file system of the guest (`virDomainFSThaw`): the number thawed.
pub(crate) fn fs_thaw(dom: &Domain) -> FfiResult<u32> {
    // SAFETY: valid domain pointer; NULL and 0 mean "every mount point".
    check(unsafe { sys::virDomainFSThaw(dom_ptr(dom), ptr::null_mut(), 0, 0) }).map(|n| n as u32)
}

/// How long libvirt waits for the guest agent's answers, in seconds
/// (`virDomainAgentSetResponseTimeout`; -1: libvirt's default).
pub(crate) fn agent_timeout(dom: &Domain, seconds: c_int) -> FfiResult<()> {
    // SAFETY: valid domain pointer; plain integers.
    check(unsafe { sys::virDomainAgentSetResponseTimeout(dom_ptr(dom), seconds, 0) }).map(drop)
}

/// What `virDomainGetJobStats` reports about the current or the last completed job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct JobStats {
    /// `virDomainJobType`: none, bounded, unbounded (running), completed, failed,
    /// cancelled.
    pub job_type: c_int,
    /// `virDomainJobOperation` (backup is 9), when reported.
    pub operation: Option<c_int>,
    /// The job's error message, when it failed or was cancelled.
    pub error: Option<String>,
    pub time_elapsed_ms: Option<u64>,
    /// Bytes of scratch space used and allocated by a pull-mode backup.
    pub temp_used: Option<u64>,
    pub temp_total: Option<u64>,
}

/// Statistics of the current job, or with `VIR_DOMAIN_JOB_STATS_COMPLETED` of the last
/// completed one.
pub(crate) fn job_stats(dom: &Domain, flags: c_uint) -> FfiResult<JobStats> {
    let mut job_type: c_int = 0;
    let mut params: sys::virTypedParameterPtr = ptr::null_mut();
    let mut nparams: c_int = 0;
    // SAFETY: valid domain pointer; libvirt fills the three out-pointers, which point to
    // live locals, and allocates `params` for us.
    let rc = unsafe {
        sys::virDomainGetJobStats(
            dom_ptr(dom),
            &mut job_type,
            &mut params,
            &mut nparams,
            flags,
        )
    };
    check(rc)?;
    let stats = JobStats {
        job_type,
        operation: typed_int(params, nparams, sys::VIR_DOMAIN_JOB_OPERATION),
        error: typed_string(params, nparams, sys::VIR_DOMAIN_JOB_ERRMSG),
        time_elapsed_ms: typed_ullong(params, nparams, sys::VIR_DOMAIN_JOB_TIME_ELAPSED),
        temp_used: typed_ullong(params, nparams, sys::VIR_DOMAIN_JOB_DISK_TEMP_USED),
        temp_total: typed_ullong(params, nparams, sys::VIR_DOMAIN_JOB_DISK_TEMP_TOTAL),
    };
    // SAFETY: `params`/`nparams` are exactly what libvirt returned (NULL/0 is allowed);
    // virTypedParamsFree frees the strings inside and the array, once.
    unsafe { sys::virTypedParamsFree(params, nparams) };
    Ok(stats)
}

fn typed_int(params: sys::virTypedParameterPtr, n: c_int, name: &CStr) -> Option<c_int> {
    let mut value: c_int = 0;
    // SAFETY: `params` is libvirt's array of `n` parameters (or NULL with n == 0), still
    // allocated; `name` is NUL-terminated; `value` is a live local.
    let rc = unsafe { sys::virTypedParamsGetInt(params, n, name.as_ptr(), &mut value) };
    (rc == 1).then_some(value)
}

fn typed_ullong(params: sys::virTypedParameterPtr, n: c_int, name: &CStr) -> Option<u64> {
    let mut value: std::os::raw::c_ulonglong = 0;
    // SAFETY: as in typed_int.
    let rc = unsafe { sys::virTypedParamsGetULLong(params, n, name.as_ptr(), &mut value) };
    (rc == 1).then_some(value)
}

fn typed_string(params: sys::virTypedParameterPtr, n: c_int, name: &CStr) -> Option<String> {
    let mut value: *const c_char = ptr::null();
    // SAFETY: as in typed_int; on success `value` points into `params`, which stays
    // allocated until the caller frees it after this copy.
    let rc = unsafe { sys::virTypedParamsGetString(params, n, name.as_ptr(), &mut value) };
    if rc != 1 || value.is_null() {
        return None;
    }
    // SAFETY: libvirt returned a non-NULL NUL-terminated string owned by `params`.
    Some(
        unsafe { CStr::from_ptr(value) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// An owned reference to a libvirt checkpoint object; freed on drop.
pub(crate) struct Checkpoint(sys::virDomainCheckpointPtr);

impl Drop for Checkpoint {
    fn drop(&mut self) {
        // SAFETY: the pointer is non-NULL and we own exactly one reference to it.
        unsafe { sys::virDomainCheckpointFree(self.0) };
    }
}

impl Checkpoint {
    fn from_raw(raw: sys::virDomainCheckpointPtr) -> FfiResult<Self> {
        if raw.is_null() {
            Err(FfiError::last())
        } else {
            Ok(Checkpoint(raw))
        }
    }

    /// The checkpoint's XML (`virDomainCheckpointGetXMLDesc`).
    pub fn xml_desc(&self, flags: c_uint) -> FfiResult<String> {
        // SAFETY: valid checkpoint pointer; the string is ours to free (take_string).
        take_string(unsafe { sys::virDomainCheckpointGetXMLDesc(self.0, flags) })
    }

    /// Delete the checkpoint (`virDomainCheckpointDelete`); the handle is freed after.
    pub fn delete(self, flags: c_uint) -> FfiResult<()> {
        // SAFETY: valid checkpoint pointer; deleting does not free our reference, which
        // Drop releases afterwards.
        check(unsafe { sys::virDomainCheckpointDelete(self.0, flags) }).map(drop)
    }
}

/// Create a checkpoint outside a backup (`virDomainCheckpointCreateXML`).
pub(crate) fn checkpoint_create_xml(
    dom: &Domain,
    xml: &str,
    flags: c_uint,
) -> FfiResult<Checkpoint> {
    let xml = c_string(xml, "checkpoint XML")?;
    // SAFETY: valid domain pointer and NUL-terminated XML; the returned handle (or NULL)
    // is owned by us.
    Checkpoint::from_raw(unsafe {
        sys::virDomainCheckpointCreateXML(dom_ptr(dom), xml.as_ptr(), flags)
    })
}

/// Look a checkpoint up by name (`virDomainCheckpointLookupByName`).
pub(crate) fn checkpoint_lookup(dom: &Domain, name: &str) -> FfiResult<Checkpoint> {
    let name = c_string(name, "checkpoint name")?;
    // SAFETY: as in checkpoint_create_xml.
    Checkpoint::from_raw(unsafe {
        sys::virDomainCheckpointLookupByName(dom_ptr(dom), name.as_ptr(), 0)
    })
}

/// Every checkpoint of the domain (`virDomainListAllCheckpoints`).
pub(crate) fn list_all_checkpoints(dom: &Domain, flags: c_uint) -> FfiResult<Vec<Checkpoint>> {
    let mut array: *mut sys::virDomainCheckpointPtr = ptr::null_mut();
    // SAFETY: valid domain pointer; libvirt allocates the array and stores it in `array`.
    let count =
        check(unsafe { sys::virDomainListAllCheckpoints(dom_ptr(dom), &mut array, flags) })?;
    let mut out = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        // SAFETY: libvirt returned `count` non-NULL handles in a malloc'd array; each
        // handle's reference moves into a Checkpoint, which frees it.
        out.push(Checkpoint(unsafe { *array.add(i) }));
    }
    if !array.is_null() {
        // SAFETY: the array itself (not its handles, now owned by `out`) is ours to free.
        unsafe { libc::free(array.cast()) };
    }
    Ok(out)
}
