//! The uprobes read libibverbs' structures at the offsets of
//! `bpf/ibverbs_abi.h`; this compiles `tests/abi_check.c`, which asserts each one
//! against the real `<infiniband/verbs.h>` (libibverbs-dev, hack/deps.sh).
#![cfg(target_os = "linux")]

use std::path::Path;
use std::process::Command;

#[test]
fn ibverbs_offsets_match_the_real_verbs_h() {
    if !Path::new("/usr/include/infiniband/verbs.h").exists() {
        eprintln!("skipped: no /usr/include/infiniband/verbs.h (install libibverbs-dev)");
        return;
    }
    let dir = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".to_owned()))
        .args([
            "-fsyntax-only",
            "-Wall",
            "-Werror",
            "-include",
            "linux/types.h",
            "-I",
        ])
        .arg(format!("{dir}/bpf"))
        .arg(format!("{dir}/tests/abi_check.c"))
        .output();
    let out = match out {
        Ok(out) => out,
        Err(e) => unreachable!("cannot run cc: {e}"),
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
