//! The kernel RDMA hooks: `bpf/ib_core.bpf.c` on `ib_core`'s modify-QP and
//! destroy-QP paths, a separate object loaded after the main one.
//!
//! Load-time probe, in order:
//! 1. **Target BTF.** `ib_core` built into the kernel: its types and functions
//!    are in `/sys/kernel/btf/vmlinux`. Loaded as a module: its split BTF at
//!    `/sys/kernel/btf/ib_core`, merged with vmlinux's ([`super::btf`]).
//!    Neither: the hooks are off (`no_ib_core`, or `no_ib_core_btf` when the
//!    module is loaded without BTF).
//! 2. **Load** the object, relocated (CO-RE) against that BTF (`load_failed`).
//! 3. **fentry** on `ib_modify_qp`, `ib_modify_qp_with_udata` and
//!    `ib_destroy_qp_user`. Only where `ib_core` is built in: fentry on a
//!    module's function must name the module's BTF object at load time
//!    (`attach_btf_obj_fd`), which aya 0.14's `FEntry::load` does not pass.
//! 4. **kprobe** on the same functions (one program serves both modify
//!    entry points).
//!
//! All of a mechanism's hooks attach or none is kept; when neither
//! mechanism attaches the hooks are off (`attach_failed`) with both reasons.
use std::fs;

use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::programs::{FEntry, KProbe, ProgramError};
use aya::{Btf, Ebpf, EbpfLoader, Endianness};
use aya_obj::btf::BtfKind;
use pingmesh_ebpf_probes::programs::{self, ib_core as names};

use super::btf::merge_split_btf;
use super::{IbCoreOff, KernelHook, KernelPaths};

/// The loaded and attached kernel hooks. Dropping it detaches them.
pub(super) struct IbCore {
    /// Owns the programs and their links.
    _ebpf: Ebpf,
    pub(super) events: RingBuf<MapData>,
    pub(super) lost: PerCpuArray<MapData, u64>,
    pub(super) how: KernelHook,
}

/// Why the hooks are off: the bounded reason and a sentence for the log.
pub(super) type Off = (IbCoreOff, String);

/// The BTF to relocate against and whether `ib_core` is built into vmlinux.
fn target_btf(paths: &KernelPaths) -> Result<(Btf, bool), Off> {
    let vmlinux_path = paths.btf_dir.join("vmlinux");
    let module_btf = paths.btf_dir.join("ib_core");
    let module_loaded = paths.module_dir.join("ib_core").exists();
    let no_btf = |what: String| (IbCoreOff::NoIbCoreBtf, what);
    let vmlinux = fs::read(&vmlinux_path)
        .map_err(|e| no_btf(format!("reading {}: {e}", vmlinux_path.display())))?;
    if module_btf.exists() {
        let split = fs::read(&module_btf)
            .map_err(|e| no_btf(format!("reading {}: {e}", module_btf.display())))?;
        let merged = merge_split_btf(&vmlinux, &split)
            .map_err(|e| no_btf(format!("merging {}: {e}", module_btf.display())))?;
        let btf = Btf::parse(&merged, Endianness::default())
            .map_err(|e| no_btf(format!("parsing {}: {}", module_btf.display(), chain(&e))))?;
        return Ok((btf, false));
    }
    if !module_loaded {
        // A built-in ib_core has no /sys/module entry without parameters,
        // so vmlinux is looked at before saying it is absent.
        let btf = Btf::parse(&vmlinux, Endianness::default())
            .map_err(|e| no_btf(format!("parsing {}: {}", vmlinux_path.display(), chain(&e))))?;
        if btf
            .id_by_type_name_kind(names::DESTROY_FUNCTION, BtfKind::Func)
            .is_ok()
        {
            return Ok((btf, true));
        }
        return Err((
            IbCoreOff::NoIbCore,
            format!(
                "ib_core is not loaded ({} is missing) and not built into the kernel \
                 ({} has no {}); the kernel RDMA hooks need an RDMA stack \
                 (an RNIC driver, or `modprobe rdma_rxe`)",
                paths.module_dir.join("ib_core").display(),
                vmlinux_path.display(),
                names::DESTROY_FUNCTION
            ),
        ));
    }
    Err(no_btf(format!(
        "ib_core is loaded but {} is missing (kernel built without \
         CONFIG_DEBUG_INFO_BTF_MODULES): its structures cannot be relocated",
        module_btf.display()
    )))
}

/// Loads the object and attaches fentry, else kprobe.
pub(super) fn attach(paths: &KernelPaths, ring_bytes: Option<u32>) -> Result<IbCore, Off> {
    let (btf, builtin) = target_btf(paths)?;
    let mut loader = EbpfLoader::new();
    loader.btf(Some(&btf));
    if let Some(bytes) = ring_bytes {
        loader.map_max_entries(programs::EVENTS_MAP, bytes);
    }
    let mut ebpf = loader
        .load(pingmesh_ebpf_probes::IB_CORE_OBJECT)
        .map_err(|e| (IbCoreOff::LoadFailed, chain(&e)))?;
    let fentry = if builtin {
        try_fentry(&mut ebpf, &btf)
    } else {
        Err(
            "ib_core is a module: fentry on a module's function needs the module's BTF \
             object at load time, which aya 0.14 does not pass"
                .to_owned(),
        )
    };
    let how = match fentry {
        Ok(()) => KernelHook::Fentry,
        Err(fentry_err) => match try_kprobe(&mut ebpf) {
            Ok(()) => {
                tracing::debug!(reason = %fentry_err, "ib_core hooks: fentry not used");
                KernelHook::Kprobe
            }
            Err(kprobe_err) => {
                return Err((
                    IbCoreOff::AttachFailed,
                    format!("fentry: {fentry_err}; kprobe: {kprobe_err}"),
                ));
            }
        },
    };
    let load_failed = |what: String| (IbCoreOff::LoadFailed, what);
    let events = ebpf
        .take_map(programs::EVENTS_MAP)
        .ok_or_else(|| load_failed(format!("no map {}", programs::EVENTS_MAP)))?;
    let events = RingBuf::try_from(events).map_err(|e| load_failed(chain(&e)))?;
    let lost = ebpf
        .take_map(programs::LOST_MAP)
        .ok_or_else(|| load_failed(format!("no map {}", programs::LOST_MAP)))?;
    let lost = PerCpuArray::try_from(lost).map_err(|e| load_failed(chain(&e)))?;
    Ok(IbCore {
        _ebpf: ebpf,
        events,
        lost,
        how,
    })
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, String>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| format!("no program {name}"))?
        .try_into()
        .map_err(|e: ProgramError| format!("{name}: {}", chain(&e)))
}

/// fentry on the three functions; on any failure nothing stays loaded.
fn try_fentry(ebpf: &mut Ebpf, btf: &Btf) -> Result<(), String> {
    let plan = [
        (names::FENTRY_MODIFY_QP, names::MODIFY_FUNCTIONS[0]),
        (
            names::FENTRY_MODIFY_QP_WITH_UDATA,
            names::MODIFY_FUNCTIONS[1],
        ),
        (names::FENTRY_DESTROY_QP, names::DESTROY_FUNCTION),
    ];
    let mut done = Vec::new();
    for (name, function) in plan {
        let attached = program::<FEntry>(ebpf, name).and_then(|p| {
            p.load(function, btf)
                .and_then(|()| p.attach())
                .map(|_| ())
                .map_err(|e| format!("{function}: {}", chain(&e)))
        });
        done.push(name);
        if let Err(e) = attached {
            for name in done {
                if let Ok(p) = program::<FEntry>(ebpf, name) {
                    // Detaches its links too; failing to unload a program that
                    // never loaded is expected.
                    let _ = p.unload();
                }
            }
            return Err(e);
        }
    }
    Ok(())
}

/// kprobes on the three functions; on any failure nothing stays attached.
fn try_kprobe(ebpf: &mut Ebpf) -> Result<(), String> {
    let plan = [
        (names::KPROBE_MODIFY_QP, &names::MODIFY_FUNCTIONS[..]),
        (names::KPROBE_DESTROY_QP, &[names::DESTROY_FUNCTION][..]),
    ];
    let mut done = Vec::new();
    for (name, functions) in plan {
        done.push(name);
        let attached = program::<KProbe>(ebpf, name).and_then(|p| {
            p.load().map_err(|e| format!("{name}: {}", chain(&e)))?;
            for function in functions {
                p.attach(function, 0)
                    .map_err(|e| format!("{function}: {}", chain(&e)))?;
            }
            Ok(())
        });
        if let Err(e) = attached {
            for name in done {
                if let Ok(p) = program::<KProbe>(ebpf, name) {
                    let _ = p.unload();
                }
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Sum of a `LOST` map's per-CPU counters.
pub(super) fn lost_total(map: &PerCpuArray<MapData, u64>) -> Result<u64, String> {
    let values = map.get(&0, 0).map_err(|e| chain(&e))?;
    Ok(values.iter().fold(0u64, |sum, v| sum.saturating_add(*v)))
}

/// Whether `ib_core` has appeared since (a module loaded after the agent).
pub(super) fn module_present(paths: &KernelPaths) -> bool {
    paths.module_dir.join("ib_core").exists() || paths.btf_dir.join("ib_core").exists()
}

/// An error with its sources, `a: b: c`.
pub(super) fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        s.push_str(": ");
        s.push_str(&e.to_string());
        source = e.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::super::btf::testdata;
    use super::*;

    fn fake_sys(
        vmlinux: Option<&[u8]>,
        ib_core_btf: Option<&[u8]>,
        module: bool,
    ) -> (tempfile::TempDir, KernelPaths) {
        let dir = tempfile::tempdir().unwrap();
        let paths = KernelPaths {
            btf_dir: dir.path().join("btf"),
            module_dir: dir.path().join("module"),
        };
        fs::create_dir_all(&paths.btf_dir).unwrap();
        fs::create_dir_all(&paths.module_dir).unwrap();
        if let Some(v) = vmlinux {
            fs::write(paths.btf_dir.join("vmlinux"), v).unwrap();
        }
        if let Some(m) = ib_core_btf {
            fs::write(paths.btf_dir.join("ib_core"), m).unwrap();
        }
        if module {
            fs::create_dir_all(paths.module_dir.join("ib_core")).unwrap();
        }
        (dir, paths)
    }

    #[test]
    fn a_module_btf_is_merged_with_vmlinux_and_its_types_resolve() {
        let (_dir, paths) = fake_sys(Some(&testdata::base()), Some(&testdata::split()), true);
        let (btf, builtin) = target_btf(&paths).unwrap();
        assert!(!builtin);
        assert_eq!(
            btf.id_by_type_name_kind("ib_qp", BtfKind::Struct).unwrap(),
            2
        );
        assert_eq!(btf.id_by_type_name_kind("int", BtfKind::Int).unwrap(), 1);
    }

    #[test]
    fn without_ib_core_the_hooks_are_off_with_the_reason() {
        let (_dir, paths) = fake_sys(Some(&testdata::base()), None, false);
        let Err((reason, detail)) = target_btf(&paths) else {
            panic!("no ib_core here");
        };
        assert_eq!(reason, IbCoreOff::NoIbCore);
        assert!(detail.contains("not loaded"), "{detail}");

        let (_dir, paths) = fake_sys(Some(&testdata::base()), None, true);
        let Err((reason, detail)) = target_btf(&paths) else {
            panic!("no ib_core BTF here");
        };
        assert_eq!(reason, IbCoreOff::NoIbCoreBtf);
        assert!(detail.contains("CONFIG_DEBUG_INFO_BTF_MODULES"), "{detail}");

        let (_dir, paths) = fake_sys(None, Some(&testdata::split()), true);
        assert_eq!(
            target_btf(&paths).err().map(|o| o.0),
            Some(IbCoreOff::NoIbCoreBtf)
        );
        let (_dir, paths) = fake_sys(Some(&testdata::base()), Some(b"garbage"), true);
        assert_eq!(
            target_btf(&paths).err().map(|o| o.0),
            Some(IbCoreOff::NoIbCoreBtf)
        );
    }
}
