//! The host's users and groups, and who this process is.

use std::ffi::CString;

/// A user's ids.
#[derive(Debug, Clone, Copy)]
pub(crate) struct User {
    /// User id.
    pub uid: libc::uid_t,
    /// Primary group id; `None` for a number with no passwd entry.
    pub gid: Option<libc::gid_t>,
}

/// Look a user up by name, or by number (with its passwd entry, if any).
pub(crate) fn lookup_user(name: &str) -> Result<User, String> {
    let cname = CString::new(name).map_err(|_| format!("'{name}' is not a user name"))?;
    let number = name.parse::<libc::uid_t>().ok();
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: passwd is plain old data; getpw*_r write into it and into buf,
    // whose length we pass, and set result to null or to &pwd.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result = std::ptr::null_mut();
    let rc = unsafe {
        match number {
            Some(uid) => libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result),
            None => libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            ),
        }
    };
    match (rc == 0 && !result.is_null(), number) {
        (true, _) => Ok(User {
            uid: pwd.pw_uid,
            gid: Some(pwd.pw_gid),
        }),
        (false, Some(uid)) => Ok(User { uid, gid: None }),
        (false, None) => Err(format!(
            "no such user '{name}' (a user name from /etc/passwd or a number)"
        )),
    }
}

/// Look a group up by name, or take a number as it is.
pub(crate) fn lookup_group(name: &str) -> Result<libc::gid_t, String> {
    if let Ok(gid) = name.parse::<libc::gid_t>() {
        return Ok(gid);
    }
    let cname = CString::new(name).map_err(|_| format!("'{name}' is not a group name"))?;
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: as in lookup_user, with getgrnam_r and struct group.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut result = std::ptr::null_mut();
    let rc = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc == 0 && !result.is_null() {
        return Ok(grp.gr_gid);
    }
    Err(format!(
        "no such group '{name}' (a group name from /etc/group or a number)"
    ))
}

/// The effective user id.
pub(crate) fn euid() -> libc::uid_t {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether the process runs as root, and so can change owners and drop privileges.
pub(crate) fn is_root() -> bool {
    euid() == 0
}
