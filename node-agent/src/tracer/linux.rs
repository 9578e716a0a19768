//! The eBPF tracer (Linux, `ebpf` feature), loaded with aya.
use std::collections::{BTreeSet, HashSet};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use aya::programs::{TracePoint, UProbe, uprobe::UProbeScope};
use aya::{Ebpf, EbpfLoader};
use pingmesh_ebpf_probes::{TRACER_OBJECT, programs};

use super::procmaps::{LIBIBVERBS, find_loaded_libraries};
use super::{Hook, TraceEvent, TracerError, parse_event};

/// The loaded BPF programs, their attached hooks and the ring buffer reader.
/// Dropping it detaches everything.
pub struct Tracer {
    ebpf: Ebpf,
    events: RingBuf<MapData>,
    hooks: BTreeSet<Hook>,
    /// Library files attached by `attach_loaded_verbs`, by (device, inode):
    /// one file reached through several processes' roots is attached once.
    attached_files: HashSet<(String, u64)>,
    malformed: u64,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("hooks", &self.active_hooks())
            .field("malformed", &self.malformed)
            .finish_non_exhaustive()
    }
}

impl Tracer {
    /// Loads the object into the kernel (verifying every program) without
    /// attaching anything. Needs `CAP_BPF` and `CAP_PERFMON` (or root) and BTF.
    pub fn load() -> Result<Self, TracerError> {
        let mut ebpf = EbpfLoader::new()
            .load(TRACER_OBJECT)
            .map_err(|e| TracerError::Load(chain(&e)))?;
        for name in [programs::IBV_MODIFY_QP, programs::IBV_DESTROY_QP] {
            uprobe(&mut ebpf, name)?
                .load()
                .map_err(|e| TracerError::Load(format!("{name}: {}", chain(&e))))?;
        }
        let tp = tracepoint(&mut ebpf)?;
        tp.load()
            .map_err(|e| TracerError::Load(format!("{}: {}", programs::TCP_STATE, chain(&e))))?;
        let map = ebpf
            .take_map(programs::EVENTS_MAP)
            .ok_or_else(|| TracerError::Load(format!("no map {}", programs::EVENTS_MAP)))?;
        let events = RingBuf::try_from(map).map_err(|e| TracerError::Load(chain(&e)))?;
        Ok(Self {
            ebpf,
            events,
            hooks: BTreeSet::new(),
            attached_files: HashSet::new(),
            malformed: 0,
        })
    }

    /// Attaches the `sock:inet_sock_set_state` tracepoint (needs tracefs
    /// mounted at /sys/kernel/tracing).
    pub fn attach_tcp(&mut self) -> Result<(), TracerError> {
        let hook = Hook::TcpStateTracepoint;
        if self.hooks.contains(&hook) {
            return Ok(());
        }
        tracepoint(&mut self.ebpf)?
            .attach("sock", "inet_sock_set_state")
            .map_err(|e| attach_error(&hook, &e))?;
        self.hooks.insert(hook);
        Ok(())
    }

    /// Attaches the `ibv_modify_qp` and `ibv_destroy_qp` uprobes to one
    /// library file, for every process that maps it (now or later).
    pub fn attach_verbs(&mut self, library: &Path) -> Result<(), TracerError> {
        let pairs = [
            (
                programs::IBV_MODIFY_QP,
                "ibv_modify_qp",
                Hook::IbvModifyQp {
                    library: library.to_owned(),
                },
            ),
            (
                programs::IBV_DESTROY_QP,
                "ibv_destroy_qp",
                Hook::IbvDestroyQp {
                    library: library.to_owned(),
                },
            ),
        ];
        for (program, symbol, hook) in pairs {
            if self.hooks.contains(&hook) {
                continue;
            }
            uprobe(&mut self.ebpf, program)?
                .attach(symbol, library, UProbeScope::AllProcesses)
                .map_err(|e| attach_error(&hook, &e))?;
            self.hooks.insert(hook);
        }
        Ok(())
    }

    /// Scans `proc_root` (normally `/proc`, the host's) for mapped copies of
    /// libibverbs and attaches to each one not attached yet. Call it again
    /// periodically to catch processes started later. Returns the failures.
    pub fn attach_loaded_verbs(&mut self, proc_root: &Path) -> Vec<(Hook, TracerError)> {
        let mut failures = Vec::new();
        for lib in find_loaded_libraries(proc_root, LIBIBVERBS) {
            let file = (lib.dev.clone(), lib.inode);
            if self.attached_files.contains(&file) {
                continue;
            }
            match self.attach_verbs(&lib.host_path) {
                Ok(()) => {
                    self.attached_files.insert(file);
                }
                Err(e) => failures.push((
                    Hook::IbvModifyQp {
                        library: lib.host_path,
                    },
                    e,
                )),
            }
        }
        failures
    }

    /// The hooks attached so far.
    pub fn active_hooks(&self) -> Vec<Hook> {
        self.hooks.iter().cloned().collect()
    }

    /// Waits up to `timeout` for records, then returns all that are ready.
    pub fn poll(&mut self, timeout: Duration) -> Result<Vec<TraceEvent>, TracerError> {
        let ready = self.drain();
        if !ready.is_empty() {
            return Ok(ready);
        }
        let mut pfd = libc::pollfd {
            fd: self.events.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd, owned by this frame, for the call's duration.
        let rc = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err.into());
            }
        }
        Ok(self.drain())
    }

    /// Every record ready now, parsed. Malformed ones are counted and dropped.
    pub fn drain(&mut self) -> Vec<TraceEvent> {
        let mut out = Vec::new();
        while let Some(record) = self.events.next() {
            match parse_event(&record) {
                Ok(event) => out.push(event),
                Err(err) => {
                    self.malformed += 1;
                    tracing::debug!(%err, "malformed tracer record");
                }
            }
        }
        out
    }

    /// Records dropped because they could not be parsed.
    pub fn malformed_records(&self) -> u64 {
        self.malformed
    }
}

fn tracepoint(ebpf: &mut Ebpf) -> Result<&mut TracePoint, TracerError> {
    ebpf.program_mut(programs::TCP_STATE)
        .ok_or_else(|| TracerError::Load(format!("no program {}", programs::TCP_STATE)))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| TracerError::Load(chain(&e)))
}

fn uprobe<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut UProbe, TracerError> {
    ebpf.program_mut(name)
        .ok_or_else(|| TracerError::Load(format!("no program {name}")))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| TracerError::Load(chain(&e)))
}

fn attach_error(hook: &Hook, err: &dyn std::error::Error) -> TracerError {
    TracerError::Attach {
        hook: hook.to_string(),
        reason: chain(err),
    }
}

/// An error with its sources, `a: b: c`.
fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        s.push_str(": ");
        s.push_str(&e.to_string());
        source = e.source();
    }
    s
}
