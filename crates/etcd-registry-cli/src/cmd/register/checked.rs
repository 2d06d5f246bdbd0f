//! `register` with health checks, a drain, and `-- CMD` (a sidecar for a
//! process in any language): the instance is discoverable only while CMD
//! runs and passes its checks, and it leaves before CMD is asked to stop.

use std::process::Stdio;
use std::time::Duration;

use etcd_registry::health::{self, GrpcCheck, HttpCheck, TcpCheck};
use etcd_registry::{
    HealthCheck, HealthPolicy, HealthState, Registration, Registry, ServiceInstance,
};

use crate::common::error::{CliError, CliResult};
use crate::common::output::{self, line};
use crate::common::shutdown::Shutdown;
use crate::supervise::{Ended, Supervisor, say};

/// How long the sidecar waits between deregistering and signalling CMD.
const SIDECAR_DRAIN: Duration = Duration::from_secs(5);

/// One `register` invocation with checks, a drain or a CMD.
pub struct Run {
    pub instance: ServiceInstance,
    pub checks: Checks,
    pub policy: HealthPolicy,
    pub drain: Option<Duration>,
    pub for_secs: Option<Duration>,
    pub supervisor: Option<Supervisor>,
}

/// The policy of the command-line options.
pub fn policy(interval: Duration, timeout: Option<Duration>, rise: u32, fall: u32) -> HealthPolicy {
    let policy = HealthPolicy::new().interval(interval).rise(rise).fall(fall);
    match timeout {
        Some(t) => policy.timeout(t),
        None => policy,
    }
}

impl Run {
    pub async fn run(self, registry: &Registry, mut shutdown: Shutdown) -> CliResult {
        let sidecar = self.supervisor.is_some();
        let note = |text: String| {
            if sidecar {
                say(text);
            } else {
                // A closed stdout must not stop the registration.
                let _ = line(&text);
            }
        };
        let i = self.instance.clone();
        let checked = !self.checks.is_empty();
        let registration = if checked {
            registry
                .register_checked(self.instance, self.checks, self.policy)
                .await?
        } else {
            registry.register(self.instance).await?
        };
        let key = registration.key().to_owned();
        if checked {
            note(format!(
                "registering {}/{} at {} (key {key}) while its checks pass",
                i.name,
                i.id,
                i.endpoint()
            ));
        } else {
            let lease = registry
                .lease_id()
                .map_or_else(|| "none yet".to_owned(), output::lease_hex);
            note(format!(
                "registered {}/{} at {} (lease {lease}, key {key})",
                i.name,
                i.id,
                i.endpoint()
            ));
        }
        let report = report(registry, &registration, note);

        let Some(supervisor) = self.supervisor else {
            let timer = sleep_for(self.for_secs);
            let signalled = shutdown.signalled();
            tokio::pin!(report, timer, signalled);
            let why = tokio::select! {
                never = &mut report => match never {},
                name = &mut signalled => format!("received {name}"),
                _ = &mut timer => "--for elapsed".to_owned(),
            };
            let drain = self.drain.unwrap_or_default();
            if drain.is_zero() {
                note(format!("{why}; closing"));
                return Ok(());
            }
            note(format!(
                "{why}; deregistered, closing in {}",
                humantime::format_duration(drain)
            ));
            return registry.shutdown(drain).await.map_err(CliError::from);
        };

        let drain = self.drain.unwrap_or(SIDECAR_DRAIN);
        let env = [
            ("ETCD_REGISTRY_SERVICE", i.name.clone()),
            ("ETCD_REGISTRY_ID", i.id.clone()),
            ("ETCD_REGISTRY_KEY", key),
        ];
        say(format!("starting `{}`", supervisor.display()));
        let ended = supervisor
            .run_draining(&env, report, &mut shutdown, async |signal| {
                say(format!(
                    "received {}; deregistering, then forwarding it to the command in {}",
                    signal.name(),
                    humantime::format_duration(drain)
                ));
                if let Err(error) = registry.shutdown(drain).await {
                    say(format!(
                        "could not deregister: {error}; the lease expires after the TTL"
                    ));
                }
            })
            .await?;
        let status = match ended {
            Ended::Exited(status) => {
                say(format!("the command {status}; deregistering"));
                if let Err(error) = registration.deregister().await {
                    say(format!(
                        "could not deregister: {error}; closing the registry removes it"
                    ));
                }
                status
            }
            Ended::Signalled { signal, status } => {
                say(format!("the command {status} after {}", signal.name()));
                status
            }
            Ended::Stopped { reason, .. } => match reason {},
        };
        // CMD has ended; a signal during the close ends the CLI at once.
        shutdown.exit_on_next();
        status.into_result()
    }
}

/// Prints every health transition and lease state change; never resolves.
async fn report(
    registry: &Registry,
    registration: &Registration,
    note: impl Fn(String),
) -> std::convert::Infallible {
    let i = registration.instance();
    let mut health = registration.health();
    let mut state = registry.state();
    let mut last = health.borrow_and_update().state;
    state.borrow_and_update();
    loop {
        tokio::select! {
            changed = health.changed() => {
                if changed.is_err() {
                    return std::future::pending().await;
                }
                let h = health.borrow_and_update().clone();
                if h.state == last {
                    continue;
                }
                last = h.state;
                match h.state {
                    HealthState::Healthy => note(format!("healthy: registered {}/{}", i.name, i.id)),
                    HealthState::Unhealthy => note(format!(
                        "unhealthy ({} failures in a row, last: {}): deregistered {}/{}",
                        h.failures,
                        h.last_error.as_deref().unwrap_or("?"),
                        i.name,
                        i.id
                    )),
                    HealthState::Pending => {}
                }
            }
            changed = state.changed() => {
                if changed.is_err() {
                    return std::future::pending().await;
                }
                let now = *state.borrow_and_update();
                note(format!("lease state: {}", output::state_text(&now)));
            }
        }
    }
}

async fn sleep_for(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// The checks of the command line; all of them must pass.
pub struct Checks(Vec<Check>);

enum Check {
    Http(Box<HttpCheck>),
    Tcp(TcpCheck),
    Grpc(Box<GrpcCheck>),
    Cmd(String),
}

impl Checks {
    /// Validates every target before anything reaches etcd (exit 2 on a bad one).
    pub fn parse(
        http: Option<String>,
        tcp: Option<String>,
        grpc: Option<String>,
        cmd: Option<String>,
    ) -> CliResult<Self> {
        let option = |flag: &str, e: etcd_registry::Error| CliError::from(e).context(flag);
        let mut checks = Vec::new();
        if let Some(url) = http {
            checks.push(Check::Http(Box::new(
                health::http(&url).map_err(|e| option("--check-http", e))?,
            )));
        }
        if let Some(addr) = tcp {
            checks.push(Check::Tcp(
                health::tcp(addr).map_err(|e| option("--check-tcp", e))?,
            ));
        }
        if let Some(target) = grpc {
            // HOST:PORT[/SERVICE]; a service name holds no '/'.
            let (addr, service) = target.split_once('/').unwrap_or((target.as_str(), ""));
            health::tcp(addr).map_err(|e| option("--check-grpc", e))?;
            checks.push(Check::Grpc(Box::new(
                health::grpc(addr, service).map_err(|e| option("--check-grpc", e))?,
            )));
        }
        if let Some(cmd) = cmd {
            if cmd.trim().is_empty() {
                return Err(CliError::Usage {
                    message: "--check-cmd: empty command".into(),
                    hint: None,
                });
            }
            checks.push(Check::Cmd(cmd));
        }
        Ok(Checks(checks))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl HealthCheck for Checks {
    async fn check(&self) -> Result<(), String> {
        let results = futures::future::join_all(self.0.iter().map(Check::run)).await;
        let failures: Vec<String> = results.into_iter().filter_map(Result::err).collect();
        match failures.is_empty() {
            true => Ok(()),
            false => Err(failures.join("; ")),
        }
    }
}

impl Check {
    async fn run(&self) -> Result<(), String> {
        match self {
            Check::Http(c) => c.check().await,
            Check::Tcp(c) => c.check().await,
            Check::Grpc(c) => c.check().await,
            Check::Cmd(cmd) => run_cmd(cmd).await,
        }
    }
}

/// `sh -c CMD`: exit 0 is passing. Killed if the check times out.
async fn run_cmd(cmd: &str) -> Result<(), String> {
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("`{cmd}`: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let status = crate::supervise::describe(out.status);
    match last {
        "" => Err(format!("`{cmd}` {status}")),
        text => Err(format!("`{cmd}` {status}: {text}")),
    }
}
