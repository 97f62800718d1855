//! Users, groups and (later) detaching: the parts of running as a system daemon.

use std::ffi::CString;

/// A user's ids, as `getpwnam(3)` gives them.
#[derive(Debug, Clone, Copy)]
pub struct User {
    /// User id.
    pub uid: libc::uid_t,
    /// Primary group id.
    pub gid: libc::gid_t,
}

/// Look a user up by name, or by number when the name is numeric.
pub fn lookup_user(name: &str) -> Result<User, String> {
    let cname = CString::new(name).map_err(|_| format!("'{name}' is not a user name"))?;
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: passwd is plain old data; getpwnam_r writes into it and into buf,
    // whose length we pass, and sets result to null or to &pwd.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result = std::ptr::null_mut();
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc == 0 && !result.is_null() {
        return Ok(User {
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        });
    }
    if let Ok(uid) = name.parse::<libc::uid_t>() {
        return Ok(User { uid, gid: uid });
    }
    Err(format!(
        "no such user '{name}' (a user name from /etc/passwd or a number)"
    ))
}

/// Look a group up by name, or by number when the name is numeric.
pub fn lookup_group(name: &str) -> Result<libc::gid_t, String> {
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
    if let Ok(gid) = name.parse::<libc::gid_t>() {
        return Ok(gid);
    }
    Err(format!(
        "no such group '{name}' (a group name from /etc/group or a number)"
    ))
}

/// Whether the process runs as root, and so can change owners and drop privileges.
pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}
