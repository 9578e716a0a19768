//! A real API server (etcd and kube-apiserver from `KUBEBUILDER_ASSETS`,
//! started by hack/envtest.sh), kubectl, helm, and operator processes run the
//! way the chart's Deployment runs them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use crate::common::{Proc, binary, free_port};

pub const NAMESPACE: &str = "pingmesh-system";
/// The chart's release, and so its operator's name, Lease and RBAC objects.
pub const RELEASE: &str = "pingmesh";
pub const OPERATOR_SA: &str = "pingmesh-operator";

/// Tests share the machine's cores with an API server each; one at a time
/// keeps their timings honest.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// `PINGMESH_ENVTEST_KEEP=1`: leave each test's API server running for a look.
fn keep() -> bool {
    std::env::var_os("PINGMESH_ENVTEST_KEEP").is_some()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Panics with the command's output unless it succeeded; returns stdout.
pub fn ok(what: &str, out: &Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Server warnings kubectl printed (`Warning: ...` lines on stderr).
pub fn warnings(out: &Output) -> Vec<String> {
    text(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("Warning:") || l.contains("] Warning:"))
        .map(str::to_owned)
        .collect()
}

/// etcd and kube-apiserver on loopback, stopped (and their files removed)
/// when dropped.
pub struct ApiServer {
    pub dir: PathBuf,
    /// cluster-admin (a client certificate in `system:masters`).
    pub kubeconfig: PathBuf,
    pub server: String,
    kubectl: PathBuf,
}

impl ApiServer {
    /// Starts one, or prints why not and returns `None` when
    /// `KUBEBUILDER_ASSETS` is unset.
    pub fn start() -> Option<Self> {
        let Some(assets) = std::env::var_os("KUBEBUILDER_ASSETS").filter(|a| !a.is_empty()) else {
            crate::common::skip(
                "set KUBEBUILDER_ASSETS to a folder holding kube-apiserver and etcd \
                 (see hack/envtest.sh and docs/kubernetes.md)",
            );
            return None;
        };
        let mut start = Command::new(repo_root().join("hack/envtest.sh"));
        start.arg("start").stderr(Stdio::inherit());
        if !keep() {
            // An interrupted test run leaves no server behind.
            start.env("PINGMESH_ENVTEST_OWNER_PID", std::process::id().to_string());
        }
        let out = start.output().expect("run hack/envtest.sh");
        let kubeconfig = PathBuf::from(ok("hack/envtest.sh start", &out).trim());
        let dir = kubeconfig.parent().expect("envtest dir").to_path_buf();
        let server = std::fs::read_to_string(dir.join("server"))
            .expect("server URL")
            .trim()
            .to_owned();
        let bundled = Path::new(&assets).join("kubectl");
        let kubectl = if bundled.exists() {
            bundled
        } else {
            PathBuf::from("kubectl")
        };
        Some(Self {
            dir,
            kubeconfig,
            server,
            kubectl,
        })
    }

    /// kubectl with `kubeconfig`.
    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
        use std::io::Write as _;
        let mut child = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run {}: {e}", self.kubectl.display()));
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input.as_bytes())
                .expect("write kubectl stdin");
        }
        child.wait_with_output().expect("kubectl output")
    }

    /// kubectl as cluster-admin.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_as(&self.kubeconfig, args, None)
    }

    /// kubectl as cluster-admin; panics unless it succeeds; stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        ok(&format!("kubectl {}", args.join(" ")), &self.kubectl(args))
    }

    /// `kubectl apply -f -` of `yaml` as cluster-admin.
    pub fn apply(&self, yaml: &str) -> Output {
        self.kubectl_as(&self.kubeconfig, &["apply", "-f", "-"], Some(yaml))
    }

    /// `kubectl get ARGS -o json`; `None` when not found.
    pub fn get(&self, args: &[&str]) -> Option<Value> {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json", "--show-managed-fields"]);
        let out = self.kubectl(&all);
        if !out.status.success() {
            assert!(
                text(&out.stderr).contains("NotFound"),
                "kubectl {}: {}",
                all.join(" "),
                text(&out.stderr)
            );
            return None;
        }
        Some(serde_json::from_slice(&out.stdout).expect("kubectl JSON"))
    }

    /// helm (see `hack/envtest.sh helm`) against this server.
    pub fn helm(&self, args: &[&str]) -> Output {
        let out = Command::new(repo_root().join("hack/envtest.sh"))
            .arg("helm")
            .stderr(Stdio::inherit())
            .output()
            .expect("run hack/envtest.sh helm");
        let helm = ok("hack/envtest.sh helm", &out).trim().to_owned();
        Command::new(helm)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .current_dir(repo_root())
            .output()
            .expect("run helm")
    }

    /// `helm install pingmesh charts/pingmesh` into [`NAMESPACE`] with `set`
    /// values; the namespace is labelled for the agents' privileges as
    /// docs/kubernetes.md says.
    pub fn install_chart(&self, set: &[&str]) {
        let mut args = vec![
            "install",
            RELEASE,
            "charts/pingmesh",
            "--namespace",
            NAMESPACE,
            "--create-namespace",
        ];
        for value in set {
            args.extend_from_slice(&["--set", value]);
        }
        let out = self.helm(&args);
        ok(&format!("helm {}", args.join(" ")), &out);
        // Server warnings (deprecated APIs, unknown formats, ...) reach helm's stderr.
        let stderr = text(&out.stderr);
        assert!(
            !stderr.to_ascii_lowercase().contains("warning"),
            "helm install drew warnings: {stderr}"
        );
        self.ok(&[
            "label",
            "namespace",
            NAMESPACE,
            "pod-security.kubernetes.io/enforce=privileged",
            "--overwrite",
        ]);
    }

    /// A kubeconfig in `dir` that authenticates with a token of the service
    /// account `namespace/name` (`kubectl create token`), so that whatever
    /// uses it has exactly that account's RBAC; `server` replaces the API
    /// server's URL (a proxy in front of it, say).
    pub fn token_kubeconfig(
        &self,
        dir: &Path,
        namespace: &str,
        name: &str,
        server: Option<&str>,
    ) -> PathBuf {
        let token = self.ok(&[
            "create",
            "token",
            name,
            "--namespace",
            namespace,
            "--duration",
            "2h",
        ]);
        let path = dir.join(format!("{name}-{}.kubeconfig", free_port("127.0.0.1")));
        let ca = self.dir.join("pki/ca.crt");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n  - name: envtest\n    cluster:\n      server: {}\n      certificate-authority: {}\nusers:\n  - name: {name}\n    user:\n      token: {}\ncontexts:\n  - name: envtest\n    context:\n      cluster: envtest\n      user: {name}\ncurrent-context: envtest\n",
                server.unwrap_or(&self.server),
                ca.display(),
                token.trim()
            ),
        )
        .expect("write kubeconfig");
        path
    }

    /// A Node object (nothing runs on it) with `labels`.
    pub fn node(&self, name: &str, labels: &[(&str, &str)]) {
        let labels = labels
            .iter()
            .map(|(k, v)| format!("    {k}: \"{v}\"\n"))
            .collect::<Vec<_>>()
            .concat();
        let yaml = format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels:\n    kubernetes.io/os: linux\n{labels}"
        );
        ok(&format!("create Node {name}"), &self.apply(&yaml));
    }

    /// Holder of the chart's leader Lease and its renew time.
    pub fn lease(&self) -> Option<(String, String, String)> {
        let lease = self.get(&["lease", "-n", NAMESPACE, &format!("{RELEASE}-operator")])?;
        let spec = &lease["spec"];
        Some((
            spec["holderIdentity"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            spec["renewTime"].as_str().unwrap_or_default().to_owned(),
            spec["acquireTime"].as_str().unwrap_or_default().to_owned(),
        ))
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if keep() {
            eprintln!(
                "PINGMESH_ENVTEST_KEEP: left running; KUBECONFIG={} (hack/envtest.sh stop {})",
                self.kubeconfig.display(),
                self.dir.display()
            );
            return;
        }
        let _ = Command::new(repo_root().join("hack/envtest.sh"))
            .arg("stop")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// An operator process started as the chart's Deployment starts it.
pub struct Operator {
    pub proc: Proc,
    pub name: String,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub log: PathBuf,
}

/// Starts `pingmesh-operator` with the args and environment of the chart's
/// Deployment as the API server stores it (the downward API filled in as a
/// kubelet would: `POD_NAME` = `name`, `POD_IP` = 127.0.0.1), on free
/// loopback ports, a SQLite registry in `dir`, and `kubeconfig`.
/// The pod's Secret volumes written out as the kubelet would mount them:
/// (mount path in the pod, folder here) for each, from the Secrets the
/// chart created in the API server.
fn mount_secret_volumes(
    api: &ApiServer,
    root: &Path,
    deployment: &Value,
) -> Vec<(String, PathBuf)> {
    let pod = &deployment["spec"]["template"]["spec"];
    let mut mounted = Vec::new();
    for mount in pod["containers"][0]["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let volume_name = mount["name"].as_str().expect("volumeMount name");
        let Some(secret_name) = pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"].as_str() == Some(volume_name))
            .and_then(|v| v["secret"]["secretName"].as_str())
        else {
            continue;
        };
        let secret = api
            .get(&["secret", "-n", NAMESPACE, secret_name])
            .unwrap_or_else(|| panic!("Secret {secret_name} of volume {volume_name}"));
        let folder = root.join(volume_name);
        std::fs::create_dir_all(&folder).expect("volume folder");
        for (key, encoded) in secret["data"].as_object().into_iter().flatten() {
            let bytes = base64_decode(encoded.as_str().expect("secret data is a string"));
            std::fs::write(folder.join(key), bytes).expect("secret file");
        }
        let path = mount["mountPath"].as_str().expect("mountPath").to_owned();
        mounted.push((path, folder));
    }
    mounted
}

/// `value` with a pod mount path replaced by where that volume lies here.
fn local_path(mounts: &[(String, PathBuf)], value: &str) -> String {
    for (in_pod, here) in mounts {
        if let Some(rest) = value.strip_prefix(in_pod.as_str())
            && (rest.is_empty() || rest.starts_with('/'))
        {
            return format!("{}{rest}", here.display());
        }
    }
    value.to_owned()
}

/// Secret data as the API server returns it (standard base64), through
/// coreutils' `base64 -d`.
pub fn base64_decode(encoded: &str) -> Vec<u8> {
    use std::io::Write as _;
    let mut child = Command::new("base64")
        .arg("-d")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("base64 (coreutils)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(encoded.as_bytes())
        .expect("write to base64");
    let out = child.wait_with_output().expect("base64 -d");
    assert!(out.status.success(), "base64 -d refused the Secret's data");
    out.stdout
}

/// Chart values for tests whose agents and API clients run outside any pod
/// and so have no projected token: plain text on the agent port (loopback
/// here), no agent or API authentication.
pub const AGENTS_OUTSIDE_PODS: &[&str] = &[
    "operator.grpcTls.mode=disabled",
    "operator.agentAuth.enabled=false",
    "operator.apiAuth.enabled=false",
];

pub fn start_operator(
    api: &ApiServer,
    dir: &Path,
    name: &str,
    kubeconfig: &Path,
    extra_env: &[(&str, &str)],
) -> Operator {
    let deployment = api
        .get(&[
            "deployment",
            "-n",
            NAMESPACE,
            &format!("{RELEASE}-operator"),
        ])
        .expect("the chart's operator Deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let grpc = SocketAddr::from(([127, 0, 0, 1], free_port("127.0.0.1")));
    let http = SocketAddr::from(([127, 0, 0, 1], free_port("127.0.0.1")));
    let mut args: Vec<String> = container["args"]
        .as_array()
        .expect("container args")
        .iter()
        .map(|a| a.as_str().expect("string arg").to_owned())
        .collect();
    if let Some(i) = args.iter().position(|a| a == "--registry") {
        args[i + 1] = format!("sqlite://{}", dir.join(format!("{name}.db")).display());
    }
    let mounts = mount_secret_volumes(api, &dir.join(format!("{name}-volumes")), &deployment);
    let mut command = Command::new(binary("pingmesh-operator"));
    command.args(&args).env_clear();
    for keep in ["PATH", "HOME", "TMPDIR"] {
        if let Some(v) = std::env::var_os(keep) {
            command.env(keep, v);
        }
    }
    for env in container["env"].as_array().expect("container env") {
        let key = env["name"].as_str().expect("env name");
        let value = match (
            env["value"].as_str(),
            env["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        ) {
            (Some(v), _) => local_path(&mounts, v),
            (None, Some("metadata.name")) => name.to_owned(),
            (None, Some("metadata.namespace")) => NAMESPACE.to_owned(),
            (None, Some("status.podIP")) => "127.0.0.1".to_owned(),
            other => panic!("env {key}: unexpected source {other:?}"),
        };
        command.env(key, value);
    }
    command
        .env("PINGMESH_GRPC_ADDR", grpc.to_string())
        .env("PINGMESH_HTTP_ADDR", http.to_string())
        .env("KUBECONFIG", kubeconfig);
    for (k, v) in extra_env {
        command.env(k, v);
    }
    let log = dir.join(format!("{name}.log"));
    let file = std::fs::File::create(&log).expect("operator log");
    let child = command
        .stdout(file.try_clone().expect("log fd"))
        .stderr(file)
        .spawn()
        .expect("start pingmesh-operator");
    Operator {
        proc: Proc {
            name: name.to_owned(),
            child,
        },
        name: name.to_owned(),
        http,
        grpc,
        log,
    }
}

impl Operator {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/readyz`: status code and body; `None` while nothing answers.
    pub fn readyz(&self) -> Option<(u16, String)> {
        http_get(self.http, "/readyz")
    }

    pub fn is_ready_leader(&self) -> bool {
        self.readyz()
            .is_some_and(|(code, body)| code == 200 && body == "ready")
    }

    /// Waits for the process to exit; its wall-clock exit time (observed
    /// within 20 ms).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<SystemTime> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.proc.child.try_wait().expect("wait").is_some() {
                return Some(SystemTime::now());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// Plain HTTP GET on a loopback address: status code and body.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    http_get_as(addr, path, None)
}

/// [`http_get`] with `Authorization: Bearer <token>` when a token is given.
pub fn http_get_as(addr: SocketAddr, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let authorization = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{authorization}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let raw = String::from_utf8(raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let code = head.split(' ').nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

/// Polls `check` every 100 ms until it returns `Some`, or panics after `limit`
/// naming `what` (and printing `context()`).
pub fn eventually<T>(
    limit: Duration,
    what: &str,
    context: impl Fn() -> String,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// RFC 3339 in UTC (as the API server and the Lease write it) to `SystemTime`.
pub fn parse_time(rfc3339: &str) -> SystemTime {
    // "2026-12-05T19:45:32.064107Z", or without the fraction.
    let (date, time) = rfc3339
        .trim_end_matches('Z')
        .split_once('T')
        .expect("RFC 3339 time");
    let numbers = |text: &str, sep: char| -> Vec<i64> {
        text.split(sep)
            .map(|part| part.parse().expect("RFC 3339 number"))
            .collect()
    };
    let (hms, fraction) = time.split_once('.').unwrap_or((time, "0"));
    let (ymd, hms) = (numbers(date, '-'), numbers(hms, ':'));
    let nanos: u32 = format!("{fraction:0<9}")[..9].parse().expect("fraction");
    // Days since 1970-01-01 of the civil date (Howard Hinnant's algorithm).
    let (month, day) = (ymd[1], ymd[2]);
    let year = if month <= 2 { ymd[0] - 1 } else { ymd[0] };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    let secs = days * 86_400 + hms[0] * 3_600 + hms[1] * 60 + hms[2];
    SystemTime::UNIX_EPOCH + Duration::new(u64::try_from(secs).expect("after 1970"), nanos)
}
