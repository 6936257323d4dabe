//! Names from the system's user and group databases (`getpwnam_r`, `getgrnam_r`), as the
//! daemon's options and the authz file give them: a name, or a number.

use std::io;

/// Scratch space each lookup gives libc for the entry's strings.
const LOOKUP_BUF_BYTES: usize = 16 << 10;

/// The uid of user `name` (a name from the password database, or a number).
pub fn user_id(name: &str) -> io::Result<u32> {
    if let Ok(uid) = name.parse::<u32>() {
        return Ok(uid);
    }
    lookup(
        name,
        "user",
        // SAFETY: `lookup` passes a NUL-terminated name, a writable `passwd`, a buffer
        // writable for the length it gives and a writable result pointer.
        |n, entry: &mut libc::passwd, buf, len, result| unsafe {
            libc::getpwnam_r(n, entry, buf, len, result)
        },
        |pw| pw.pw_uid,
    )
}

/// The id of group `name` (a name from the group database, or a number).
pub fn group_id(name: &str) -> io::Result<u32> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    lookup(
        name,
        "group",
        // SAFETY: as in `user_id`, with a writable `group`.
        |n, entry: &mut libc::group, buf, len, result| unsafe {
            libc::getgrnam_r(n, entry, buf, len, result)
        },
        |g| g.gr_gid,
    )
}

/// Looks `name` up with `call` (a `get*nam_r`) and returns `id` of the entry found, read
/// while the buffer its strings point into is still alive. `T` must be a plain C struct
/// for which all-zero bytes are a valid value (`passwd`, `group`).
fn lookup<T>(
    name: &str,
    kind: &str,
    call: impl FnOnce(*const libc::c_char, &mut T, *mut libc::c_char, usize, *mut *mut T) -> libc::c_int,
    id: impl FnOnce(&T) -> u32,
) -> io::Result<u32> {
    // The callers name `name` in their own messages.
    let not_found = || io::Error::new(io::ErrorKind::NotFound, format!("no such {kind}"));
    let c_name = std::ffi::CString::new(name).map_err(|_| not_found())?;
    let mut buf = vec![0u8; LOOKUP_BUF_BYTES];
    // SAFETY: the callers' `T` (`passwd`, `group`) are plain C structs; all-zero is valid.
    let mut entry: T = unsafe { std::mem::zeroed() };
    let mut result: *mut T = std::ptr::null_mut();
    let rc = call(
        c_name.as_ptr(),
        &mut entry,
        buf.as_mut_ptr().cast::<libc::c_char>(),
        buf.len(),
        &mut result,
    );
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    if result.is_null() {
        return Err(not_found());
    }
    Ok(id(&entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        assert_eq!(user_id("root").unwrap(), 0);
        assert_eq!(user_id("4242").unwrap(), 4242);
        assert!(user_id("no-such-user-here").is_err());
        assert_eq!(group_id("root").unwrap(), 0);
        assert_eq!(group_id("4242").unwrap(), 4242);
        assert!(group_id("no-such-group-here").is_err());
        assert!(group_id("nul\0inside").is_err());
    }
}
