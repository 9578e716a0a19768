//! Compiles the C BPF programs with clang when the `build-bpf` feature is on and
//! the target is Linux. Elsewhere nothing is compiled and nothing is needed.
use std::env;
use std::path::PathBuf;
use std::process::Command;

const SOURCES: &[&str] = &[
    "bpf/tracer.bpf.c",
    "bpf/ib_core.bpf.c",
    "bpf/kernel_types.h",
    "bpf/ib_core_types.h",
    "bpf/events.h",
    "bpf/maps.h",
    "bpf/ibverbs_abi.h",
];

/// The objects built: (source, object file in `OUT_DIR`). Two objects, so that
/// a kernel without `ib_core`'s BTF never fails the main one's load.
const OBJECTS: &[(&str, &str)] = &[
    ("bpf/tracer.bpf.c", "tracer.bpf.o"),
    ("bpf/ib_core.bpf.c", "ib_core.bpf.o"),
];

fn main() {
    for source in SOURCES {
        println!("cargo:rerun-if-changed={source}");
    }
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-env-changed=BPF_EXTRA_CFLAGS");
    let build_bpf = env::var_os("CARGO_FEATURE_BUILD_BPF").is_some();
    let linux = env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    if !(build_bpf && linux) {
        return;
    }
    let arch = match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => "x86",
        Ok("aarch64") => "arm64",
        Ok(other) => fail(&format!("no BPF build for target architecture {other}")),
        Err(_) => fail("CARGO_CFG_TARGET_ARCH is not set"),
    };
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap_or_else(|| fail("OUT_DIR is not set")));
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    for (source, object) in OBJECTS {
        let object = out.join(object);
        let mut cmd = Command::new(&clang);
        cmd.args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
            .arg(format!("-D__TARGET_ARCH_{arch}"))
            .args(["-I", "bpf"]);
        if let Ok(extra) = env::var("BPF_EXTRA_CFLAGS") {
            cmd.args(extra.split_whitespace());
        }
        cmd.args(["-c", source, "-o"]).arg(&object);
        match cmd.status() {
            Ok(status) if status.success() => {}
            Ok(status) => fail(&format!(
                "{clang} failed ({status}) compiling {source}; it needs libbpf's headers \
                 (Debian: libbpf-dev, see hack/deps.sh)"
            )),
            Err(err) => fail(&format!(
                "cannot run {clang} ({err}): building the BPF programs needs clang (hack/deps.sh)"
            )),
        }
    }
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}
