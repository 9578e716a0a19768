//! The eBPF tracer (Linux, `ebpf` feature), loaded with aya.
use std::collections::{BTreeSet, HashSet};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::time::Duration;

use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::programs::{TracePoint, UProbe, uprobe::UProbeScope};
use aya::{Ebpf, EbpfLoader};
use pingmesh_ebpf_probes::{TRACER_OBJECT, programs};

use super::ib_core::{self, IbCore, chain};
use super::procmaps::{LIBIBVERBS, find_loaded_libraries};
use super::{Hook, IbCoreState, KernelPaths, TraceEvent, TracerError, TracerOptions, parse_event};

/// The loaded BPF programs, their attached hooks and the ring buffer reader.
/// Dropping it detaches everything.
pub struct Tracer {
    ebpf: Ebpf,
    events: RingBuf<MapData>,
    /// Records the main object could not reserve (full ring buffer).
    lost: PerCpuArray<MapData, u64>,
    /// The kernel RDMA hooks, when attached (a second object and ring buffer).
    ib_core: Option<IbCore>,
    ib_core_state: IbCoreState,
    options: TracerOptions,
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
            .field("ib_core", &self.ib_core_state)
            .finish_non_exhaustive()
    }
}

impl Tracer {
    /// Loads the object into the kernel (verifying every program) without
    /// attaching anything. Needs `CAP_BPF` and `CAP_PERFMON` (or root) and BTF.
    pub fn load() -> Result<Self, TracerError> {
        Self::load_with(TracerOptions::default())
    }

    /// [`Tracer::load`] with settings (a smaller ring buffer, for tests).
    pub fn load_with(options: TracerOptions) -> Result<Self, TracerError> {
        let mut loader = EbpfLoader::new();
        if let Some(bytes) = options.ring_bytes {
            loader.map_max_entries(programs::EVENTS_MAP, bytes);
        }
        let mut ebpf = loader
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
        let lost = ebpf
            .take_map(programs::LOST_MAP)
            .ok_or_else(|| TracerError::Load(format!("no map {}", programs::LOST_MAP)))?;
        let lost = PerCpuArray::try_from(lost).map_err(|e| TracerError::Load(chain(&e)))?;
        Ok(Self {
            ebpf,
            events,
            lost,
            ib_core: None,
            ib_core_state: IbCoreState::NotTried,
            options,
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

    /// Loads the kernel RDMA hooks (a second object, relocated against
    /// `ib_core`'s BTF) and attaches them with fentry, else kprobe. Never
    /// fails: where they cannot run the state says why
    /// ([`IbCoreState::Off`]). Does nothing once they are on.
    pub fn attach_ib_core(&mut self) -> &IbCoreState {
        self.attach_ib_core_at(&KernelPaths::default())
    }

    /// [`Tracer::attach_ib_core`] with another `/sys/kernel/btf` and `/sys/module`.
    pub fn attach_ib_core_at(&mut self, paths: &KernelPaths) -> &IbCoreState {
        if self.ib_core.is_some() {
            return &self.ib_core_state;
        }
        match ib_core::attach(paths, self.options.ring_bytes) {
            Ok(hooks) => {
                self.hooks.insert(Hook::KernelModifyQp(hooks.how));
                self.hooks.insert(Hook::KernelDestroyQp(hooks.how));
                self.ib_core_state = IbCoreState::On(hooks.how);
                self.ib_core = Some(hooks);
            }
            Err((reason, detail)) => self.ib_core_state = IbCoreState::Off { reason, detail },
        }
        &self.ib_core_state
    }

    /// Where the kernel RDMA hooks stand.
    pub fn ib_core_state(&self) -> &IbCoreState {
        &self.ib_core_state
    }

    /// Whether `ib_core` is present now (loaded since the last try, say).
    pub fn ib_core_present(&self) -> bool {
        ib_core::module_present(&KernelPaths::default())
    }

    /// Records the BPF programs could not write because a ring buffer was
    /// full, since load (both objects). Counters that cannot be read are
    /// left out (and logged at debug).
    pub fn lost_records(&self) -> u64 {
        let maps = std::iter::once(&self.lost).chain(self.ib_core.as_ref().map(|k| &k.lost));
        maps.map(|map| {
            ib_core::lost_total(map).unwrap_or_else(|e| {
                tracing::debug!(error = %e, "reading a LOST counter failed");
                0
            })
        })
        .fold(0u64, u64::saturating_add)
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
        let pollfd = |fd: i32| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let mut pfds = [pollfd(self.events.as_fd().as_raw_fd()), pollfd(-1)];
        if let Some(k) = &self.ib_core {
            pfds[1] = pollfd(k.events.as_fd().as_raw_fd());
        }
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: valid pollfds (a negative fd is ignored by poll), owned by
        // this frame, for the call's duration.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), 2, ms) };
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
        let rings =
            std::iter::once(&mut self.events).chain(self.ib_core.as_mut().map(|k| &mut k.events));
        for ring in rings {
            while let Some(record) = ring.next() {
                match parse_event(&record) {
                    Ok(event) => out.push(event),
                    Err(err) => {
                        self.malformed += 1;
                        tracing::debug!(%err, "malformed tracer record");
                    }
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
