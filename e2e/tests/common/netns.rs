//! Running code inside a network namespace of the test fabric (hack/fabric.sh).

const CLONE_NEWNET: i32 = 0x4000_0000;

unsafe extern "C" {
    fn setns(fd: i32, nstype: i32) -> i32;
}

/// Runs `f` on a thread that has joined network namespace `ns` (a network
/// namespace belongs to a thread, so the rest of the test stays where it is).
/// `None` when the namespace cannot be joined.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Option<T> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(format!("/run/netns/{ns}")).ok()?;
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns(2) with an open namespace file and CLONE_NEWNET moves
            // only the calling thread, which ends with this closure.
            let rc = unsafe { setns(file.as_raw_fd(), CLONE_NEWNET) };
            (rc == 0).then(f)
        })
        .join()
        .ok()
        .flatten()
    })
}
