//! Finding the copies of a shared library that running processes have mapped,
//! from `/proc/<pid>/maps`. Services load libibverbs from their own container
//! images, so the same soname is a different file per image: the uprobes go
//! on each file, reached through `/proc/<pid>/root` (the agent needs the host
//! PID namespace to see the services' processes).
use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

/// One mapped library file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedLibrary {
    /// The first process seen mapping it.
    pub pid: u32,
    /// The path inside that process's mount namespace, as maps shows it.
    pub path: PathBuf,
    /// The same file from the agent's side: `<proc>/<pid>/root/<path>`.
    pub host_path: PathBuf,
    /// `major:minor` of the device holding the file.
    pub dev: String,
    pub inode: u64,
}

/// libibverbs' file names: `libibverbs.so`, `libibverbs.so.1`, `libibverbs.so.1.14.50.0`.
pub const LIBIBVERBS: &str = "libibverbs.so";

/// Every distinct file (device and inode) whose name starts with `prefix`
/// mapped by a process under `proc_root` (normally `/proc`). Processes that
/// vanish or cannot be read are skipped; deleted files are left out.
pub fn find_loaded_libraries(proc_root: &Path, prefix: &str) -> Vec<LoadedLibrary> {
    let Ok(entries) = fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    let mut seen = HashSet::new();
    let mut found = Vec::new();
    for pid in pids {
        let pid_dir = proc_root.join(pid.to_string());
        let Ok(maps) = fs::read_to_string(pid_dir.join("maps")) else {
            continue;
        };
        for line in maps.lines() {
            let Some(mapping) = parse_maps_line(line) else {
                continue;
            };
            let matches = Path::new(mapping.path)
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix));
            if !matches
                || mapping.inode == 0
                || !seen.insert((mapping.dev.to_owned(), mapping.inode))
            {
                continue;
            }
            let inside = mapping.path.trim_start_matches('/');
            found.push(LoadedLibrary {
                pid,
                path: PathBuf::from(mapping.path),
                host_path: pid_dir.join("root").join(inside),
                dev: mapping.dev.to_owned(),
                inode: mapping.inode,
            });
        }
    }
    found
}

struct Mapping<'a> {
    dev: &'a str,
    inode: u64,
    path: &'a str,
}

/// `address perms offset dev inode pathname`; the path may hold spaces.
fn parse_maps_line(line: &str) -> Option<Mapping<'_>> {
    let mut rest = line;
    let mut fields = [""; 5];
    for field in &mut fields {
        rest = rest.trim_start();
        let end = rest.find(' ')?;
        *field = &rest[..end];
        rest = &rest[end..];
    }
    let path = rest.trim();
    if !path.starts_with('/') || path.ends_with(" (deleted)") {
        return None;
    }
    Some(Mapping {
        dev: fields[3],
        inode: fields[4].parse().ok()?,
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_maps(root: &Path, pid: &str, maps: &str) {
        let dir = root.join(pid);
        fs::create_dir_all(&dir).unwrap_or_else(|e| unreachable!("{e}"));
        fs::write(dir.join("maps"), maps).unwrap_or_else(|e| unreachable!("{e}"));
    }

    #[test]
    fn finds_each_copy_once_through_the_process_root() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let root = tmp.path();
        let lib = "7f0000000000-7f0000010000 r-xp 00000000 fd:01 1234        /usr/lib/x86_64-linux-gnu/libibverbs.so.1.14.50.0\n";
        // Two processes of one image map the same file: attached once.
        write_maps(
            root,
            "100",
            &format!("00400000-00401000 r-xp 00000000 fd:01 1 /usr/bin/trainer\n{lib}"),
        );
        write_maps(root, "200", lib);
        // Another image's copy: same path, other device and inode.
        write_maps(
            root,
            "300",
            "7f0000000000-7f0000010000 r-xp 00000000 00:2a 99 /usr/lib64/libibverbs.so.1\n\
             7f0000020000-7f0000030000 r-xp 00000000 00:2a 98 /usr/lib64/libibverbs/libmlx5-rdmav34.so\n\
             7f0000040000-7f0000050000 rw-p 00000000 00:00 0 \n\
             7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]\n",
        );
        // Deleted files, other libraries, non-pid entries and unreadable pids are skipped.
        write_maps(
            root,
            "400",
            "7f00-7f10 r-xp 00000000 fd:01 55 /opt/libibverbs.so.1 (deleted)\n",
        );
        write_maps(root, "self", lib);
        fs::create_dir_all(root.join("500")).unwrap_or_else(|e| unreachable!("{e}"));
        write_maps(
            root,
            "600",
            "7f00-7f10 r-xp 00000000 fd:01 56 /opt/my dir/libibverbs.so\n",
        );

        let found = find_loaded_libraries(root, LIBIBVERBS);
        let summary: Vec<_> = found
            .iter()
            .map(|l| {
                (
                    l.pid,
                    l.path.to_string_lossy().into_owned(),
                    l.dev.as_str(),
                    l.inode,
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    100,
                    "/usr/lib/x86_64-linux-gnu/libibverbs.so.1.14.50.0".to_owned(),
                    "fd:01",
                    1234
                ),
                (300, "/usr/lib64/libibverbs.so.1".to_owned(), "00:2a", 99),
                (600, "/opt/my dir/libibverbs.so".to_owned(), "fd:01", 56),
            ]
        );
        assert_eq!(
            found[1].host_path,
            root.join("300/root/usr/lib64/libibverbs.so.1")
        );
    }

    #[test]
    fn a_missing_proc_root_finds_nothing() {
        assert!(find_loaded_libraries(Path::new("/nonexistent/proc"), LIBIBVERBS).is_empty());
    }

    #[test]
    fn finds_this_process_own_libraries() {
        // Every Linux test binary maps libc; elsewhere there is no /proc.
        if cfg!(target_os = "linux") {
            let found = find_loaded_libraries(Path::new("/proc"), "libc.so");
            assert!(!found.is_empty());
        }
    }
}
