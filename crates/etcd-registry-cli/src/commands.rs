//! One function per subcommand.
//!
//! Every command but `dev` connects with [`connect`] and hands the registry
//! back through [`finish`], which closes it (revoking its lease) on success
//! and on failure alike.

use std::time::Duration;

use etcd_registry::{Registry, RegistryBuilder, ServiceEvent, ServiceInstance};
use etcd_registry_testkit::EtcdServer;
use futures::StreamExt;
use tokio::time::{Instant, sleep_until};

use crate::args::{Cli, Command, Global};
use crate::error::{CliError, CliResult};
use crate::output::{self, line};
use crate::shutdown::Shutdown;
use crate::supervise::Supervisor;

pub async fn run(cli: Cli) -> CliResult {
    let g = &cli.global;
    crate::metrics::serve(cli.command.metrics_addr())?;
    match cli.command {
        Command::Dev => dev().await,
        Command::Completions { shell } => output::completions(shell),
        Command::Man => output::man(),
        Command::Status { json } => crate::status::status(g, json).await,
        Command::Ui {
            listen,
            all_namespaces,
        } => crate::ui::run(g, listen, all_namespaces).await,
        Command::Dns {
            listen,
            domain,
            record_ttl,
            ..
        } => {
            let opts = crate::dns::Options {
                listen,
                domain,
                ttl: record_ttl,
            };
            crate::dns::run(g, opts).await
        }
        Command::List {
            grpc_naming: Some(target),
            json,
            ..
        } => {
            etcd_registry::naming::validate_target(&target)?;
            with_registry(g, async |r| list_grpc_naming(r, &target, json).await).await
        }
        Command::List {
            service, raw: true, ..
        } => with_registry(g, async |r| list_raw(r, service.as_deref()).await).await,
        Command::List { service, json, .. } => {
            with_registry(g, async |r| list(r, service.as_deref(), json).await).await
        }
        Command::Watch {
            service,
            json,
            count,
            timeout,
            ..
        } => {
            let shutdown = Shutdown::listen()?;
            let deadline = timeout.map(|d| Instant::now() + d);
            with_registry(g, async |r| {
                watch(r, service.as_deref(), json, count, deadline, shutdown).await
            })
            .await
        }
        Command::Register {
            name,
            id,
            address,
            port,
            version,
            weight,
            meta,
            for_secs,
            check_http,
            check_tcp,
            check_grpc,
            check_cmd,
            interval,
            timeout,
            rise,
            fall,
            drain,
            grace,
            cmd,
            grpc_naming,
            ..
        } => {
            let shutdown = Shutdown::listen()?;
            let mut instance = ServiceInstance::new(name, id, address, port)
                .with_version(version)
                .with_weight(weight);
            instance.metadata.extend(meta);
            // Reject bad input before reaching etcd: no connection, no lease, no write.
            instance.validate()?;
            let mut settings = builder(g)?;
            if let Some(target) = grpc_naming {
                etcd_registry::naming::validate_target(&target)?;
                etcd_registry::naming::endpoint_addr(&instance)?;
                settings = settings.publish_grpc_naming(target);
            }
            let checks =
                crate::register::Checks::parse(check_http, check_tcp, check_grpc, check_cmd)?;
            if !checks.is_empty() || !cmd.is_empty() || drain.is_some() {
                let run = crate::register::Run {
                    instance,
                    checks,
                    policy: crate::register::policy(interval, timeout, rise, fall),
                    drain,
                    for_secs,
                    supervisor: match cmd.is_empty() {
                        true => None,
                        false => Some(Supervisor::new(cmd, grace)?),
                    },
                };
                return with_builder(settings, async |r| run.run(r, shutdown).await).await;
            }
            with_builder(settings, async |r| {
                register(r, instance, for_secs, shutdown).await
            })
            .await?;
            line("closed: lease revoked, the instance is gone")
        }
        Command::Deregister { name, id } => {
            with_registry(g, async |r| {
                if r.delete_instance(&name, &id).await? {
                    line(&format!("deleted {name}/{id}"))
                } else {
                    let ns = r.config().namespace();
                    Err(CliError::msg(format!(
                        "no instance {name}/{id} in namespace {ns}"
                    )))
                }
            })
            .await
        }
        Command::DeleteService { name } => {
            with_registry(g, async |r| {
                let n = r.delete_service(&name).await?;
                let s = if n == 1 { "" } else { "s" };
                line(&format!("deleted {n} instance{s} of {name}"))
            })
            .await
        }
        Command::Leader { election, json } => {
            with_registry(g, async |r| {
                let leader = r.election(&election)?.leader().await?;
                line(&if json {
                    output::leader_json(leader.as_ref())
                } else {
                    output::leader_text(leader.as_ref())
                })
            })
            .await
        }
        Command::Campaign {
            election,
            proposal,
            for_secs,
            once,
            grace,
            cmd,
            ..
        } => {
            let mut shutdown = Shutdown::listen()?;
            if cmd.is_empty() {
                return with_registry(g, async |r| {
                    campaign(r, &election, proposal, for_secs, shutdown).await
                })
                .await;
            }
            let supervisor = Supervisor::new(cmd, grace)?;
            with_registry(g, async move |r| {
                let run = crate::campaign::Run {
                    election: r.election(&election)?,
                    proposal,
                    once,
                    supervisor,
                };
                let result = run.run(&mut shutdown).await;
                // CMD has ended; a signal during the close ends the CLI at once.
                shutdown.exit_on_next();
                result
            })
            .await
        }
        Command::Lock {
            name,
            timeout,
            grace,
            cmd,
            ..
        } => {
            let mut shutdown = Shutdown::listen()?;
            let supervisor = if cmd.is_empty() {
                None
            } else {
                Some(Supervisor::new(cmd, grace)?)
            };
            let run = crate::lock::Run {
                name,
                timeout,
                supervisor,
            };
            with_registry(g, async move |r| {
                let result = run.run(r, &mut shutdown).await;
                // The lock is released; a signal during the close ends the CLI at once.
                shutdown.exit_on_next();
                result
            })
            .await
        }
        Command::Observe {
            election,
            json,
            count,
            ..
        } => {
            let shutdown = Shutdown::listen()?;
            with_registry(g, async |r| {
                observe(r, &election, json, count, shutdown).await
            })
            .await
        }
    }
}

/// Connects, runs `body`, and closes the registry whatever `body` returned.
pub async fn with_registry<T>(
    g: &Global,
    body: impl AsyncFnOnce(&Registry) -> CliResult<T>,
) -> CliResult<T> {
    let registry = connect(g).await?;
    let result = body(&registry).await;
    finish(registry, result).await
}

/// [`with_registry`] with settings beyond the global options.
async fn with_builder<T>(
    settings: RegistryBuilder,
    body: impl AsyncFnOnce(&Registry) -> CliResult<T>,
) -> CliResult<T> {
    let registry = settings.connect().await?;
    tracing::debug!(?registry, "connected");
    let result = body(&registry).await;
    finish(registry, result).await
}

async fn connect(g: &Global) -> CliResult<Registry> {
    let registry = builder(g)?.connect().await?;
    tracing::debug!(?registry, "connected");
    Ok(registry)
}

/// The registry settings of the global options. Fails when a TLS file
/// cannot be read.
pub fn builder(g: &Global) -> CliResult<RegistryBuilder> {
    let endpoints: Vec<String> = g
        .endpoints
        .iter()
        .map(|e| e.trim().to_owned())
        .filter(|e| !e.is_empty())
        .collect();
    let mut builder = Registry::builder()
        .endpoints(endpoints)
        .namespace(&g.namespace)
        .key_prefix(&g.prefix)
        .ttl(g.ttl)
        .dial_timeout(g.dial_timeout);
    // Checked here rather than with clap's `requires`: clap does not see a
    // global flag's partner when one comes from the environment and the
    // other from the command line.
    match (&g.user, &g.password) {
        (Some(user), Some(password)) => builder = builder.auth(user, password),
        (None, None) => {}
        (Some(_), None) => {
            return Err(CliError::Usage {
                message: "--user needs --password (or ETCD_PASSWORD)".into(),
                hint: None,
            });
        }
        (None, Some(_)) => {
            return Err(CliError::Usage {
                message: "--password needs --user (or ETCD_USER)".into(),
                hint: None,
            });
        }
    }
    if let Some(tls) = tls_config(g)? {
        builder = builder.tls(tls);
    }
    Ok(builder)
}

/// TLS settings from --cacert, --cert and --key; `None` when none is given.
fn tls_config(g: &Global) -> CliResult<Option<etcd_registry::TlsConfig>> {
    if g.cacert.is_none() && g.cert.is_none() {
        return Ok(None);
    }
    let mut tls = etcd_registry::TlsConfig::new();
    if let Some(ca) = &g.cacert {
        tls = tls.ca_certificate_file(ca)?;
    }
    if let (Some(cert), Some(key)) = (&g.cert, &g.key) {
        tls = tls.identity_files(cert, key)?;
    }
    Ok(Some(tls))
}

/// Closes the registry; the command's own error wins over a close error.
async fn finish<T>(registry: Registry, result: CliResult<T>) -> CliResult<T> {
    let closed = registry.close().await;
    match (result, closed) {
        (Ok(value), Ok(())) => Ok(value),
        (Ok(_), Err(e)) => Err(CliError::from(e)
            .context("closing the registry")
            .with_hint("its lease (and anything under it) expires after the TTL on its own")),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(close)) => {
            tracing::warn!(error = %close, "closing the registry failed");
            Err(e)
        }
    }
}

/// Sleeps for `d`, or forever when `None`.
async fn sleep_for(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `deadline`, or forever when `None`.
async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn dev() -> CliResult {
    let shutdown = Shutdown::listen()?;
    let mut server = EtcdServer::builder()
        .name("etcd-registry-dev")
        .start()
        .await
        .map_err(|e| CliError::from(e).context("starting etcd"))?;
    let endpoint = server.endpoint();
    line(&endpoint)?;
    line(&format!("export ETCD_ENDPOINTS={endpoint}"))?;
    eprintln!(
        "etcd is running (pid {}, data in a temporary directory); Ctrl-C stops it and deletes the data",
        server.pid().unwrap_or_default()
    );
    let signalled = shutdown.signalled();
    tokio::pin!(signalled);
    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = &mut signalled => break,
            _ = check.tick() => {
                if !server.is_running() {
                    return Err(CliError::msg(format!(
                        "etcd exited on its own; last lines of its log:\n{}",
                        server.log_tail(20)
                    )));
                }
            }
        }
    }
    server
        .stop()
        .await
        .map_err(|e| CliError::from(e).context("stopping etcd"))?;
    eprintln!("etcd stopped");
    Ok(())
}

async fn list(registry: &Registry, service: Option<&str>, json: bool) -> CliResult {
    let instances = match service {
        Some(name) => registry.instances(name).await?,
        None => registry.all_instances().await?,
    };
    if json {
        line(&output::instances_json(&instances))?;
    } else if instances.is_empty() {
        let ns = registry.config().namespace();
        match service {
            Some(name) => eprintln!("no instances of {name} in namespace {ns}"),
            None => eprintln!("no instances in namespace {ns}"),
        }
    } else {
        for row in output::table(&instances) {
            line(&row)?;
        }
    }
    Ok(())
}

async fn list_grpc_naming(registry: &Registry, target: &str, json: bool) -> CliResult {
    let instances = registry.grpc_naming_instances(target).await?;
    if json {
        line(&output::instances_json(&instances))?;
    } else if instances.is_empty() {
        eprintln!("no endpoints under gRPC naming target {target}");
    } else {
        for row in output::table(&instances) {
            line(&row)?;
        }
    }
    Ok(())
}

async fn watch(
    registry: &Registry,
    service: Option<&str>,
    json: bool,
    count: Option<u64>,
    deadline: Option<Instant>,
    shutdown: Shutdown,
) -> CliResult {
    let mut events = match service {
        Some(name) => registry.watch(name)?,
        None => registry.watch_all()?,
    };
    let signalled = shutdown.signalled();
    let timer = sleep_until_opt(deadline);
    tokio::pin!(signalled, timer);
    let mut seen = 0u64;
    loop {
        let event = tokio::select! {
            _ = &mut signalled => return Ok(()),
            _ = &mut timer => {
                return match count {
                    Some(n) => Err(CliError::msg(format!(
                        "--timeout elapsed after {seen} of {n} events"
                    ))),
                    None => Ok(()),
                };
            }
            event = events.next() => event,
        };
        let Some(event) = event else {
            return Err(match events.error() {
                Some(e) => e.into(),
                None => CliError::msg("the watch ended: the registry was closed"),
            });
        };
        match &event {
            ServiceEvent::Snapshot(all) => {
                if json {
                    line(&output::snapshot_json(all))?;
                } else {
                    let s = if all.len() == 1 { "" } else { "s" };
                    line(&format!("snapshot: {} instance{s}", all.len()))?;
                    for i in all {
                        line(&format!("  {}", output::instance_line(i)))?;
                    }
                }
            }
            ServiceEvent::Added(instance)
            | ServiceEvent::Updated(instance)
            | ServiceEvent::Removed(instance) => {
                seen += 1;
                let kind = output::event_name(&event);
                if json {
                    line(&output::event_json(kind, instance))?;
                } else {
                    line(&format!("{kind} {}", output::instance_line(instance)))?;
                }
            }
        }
        if count.is_some_and(|n| seen >= n) {
            return Ok(());
        }
    }
}

async fn register(
    registry: &Registry,
    instance: ServiceInstance,
    for_secs: Option<Duration>,
    shutdown: Shutdown,
) -> CliResult {
    let mut state = registry.state();
    let registration = registry.register(instance).await?;
    let i = registration.instance();
    let lease = registry
        .lease_id()
        .map_or_else(|| "none yet".to_owned(), output::lease_hex);
    line(&format!(
        "registered {}/{} at {} (lease {lease}, key {})",
        i.name,
        i.id,
        i.endpoint(),
        registration.key()
    ))?;
    state.borrow_and_update();
    let signalled = shutdown.signalled();
    let timer = sleep_for(for_secs);
    tokio::pin!(signalled, timer);
    loop {
        tokio::select! {
            name = &mut signalled => {
                line(&format!("received {name}; closing"))?;
                return Ok(());
            }
            _ = &mut timer => {
                line("--for elapsed; closing")?;
                return Ok(());
            }
            changed = state.changed() => {
                if changed.is_err() {
                    return Err(CliError::msg("the registry stopped unexpectedly"));
                }
                let now = *state.borrow_and_update();
                line(&format!("lease state: {}", output::state_text(&now)))?;
            }
        }
    }
}

async fn campaign(
    registry: &Registry,
    election: &str,
    proposal: String,
    for_secs: Option<Duration>,
    shutdown: Shutdown,
) -> CliResult {
    let election = registry.election(election)?;
    let signalled = shutdown.signalled();
    tokio::pin!(signalled);
    line(&format!(
        "campaigning in {} as {proposal:?}",
        election.etcd_name()
    ))?;
    // Dropping the campaign future (on a signal) withdraws the candidacy.
    let leadership = tokio::select! {
        won = election.campaign(proposal) => won?,
        name = &mut signalled => {
            line(&format!("received {name} while campaigning; withdrawing"))?;
            return Ok(());
        }
    };
    line(&format!(
        "leader (fencing token {})",
        leadership.fencing_token()
    ))?;
    let why = tokio::select! {
        reason = leadership.lost() => {
            // Harmless after a loss; deletes the key if it is still ours.
            if let Err(e) = leadership.resign().await {
                tracing::warn!(error = %e, "resign after losing leadership failed");
            }
            return Err(CliError::msg(format!("leadership lost: {reason}")));
        }
        name = &mut signalled => format!("received {name}"),
        _ = sleep_for(for_secs) => "--for elapsed".to_owned(),
    };
    line(&format!("{why}; resigning"))?;
    leadership.resign().await?;
    line("resigned")
}

async fn observe(
    registry: &Registry,
    election: &str,
    json: bool,
    count: Option<u64>,
    shutdown: Shutdown,
) -> CliResult {
    let mut leaders = registry.election(election)?.observe();
    let signalled = shutdown.signalled();
    tokio::pin!(signalled);
    // The first item is the current leader; --count counts the changes after it.
    let mut items = 0u64;
    loop {
        let leader = tokio::select! {
            _ = &mut signalled => return Ok(()),
            leader = leaders.next() => leader,
        };
        let Some(leader) = leader else {
            return Err(CliError::msg(
                "the observation ended: the registry was closed",
            ));
        };
        line(&if json {
            output::leader_json(leader.as_ref())
        } else {
            output::leader_text(leader.as_ref())
        })?;
        if count.is_some_and(|n| items >= n) {
            return Ok(());
        }
        items += 1;
    }
}

/// `list --raw`: the stored values, unparsed, so that nothing is hidden by a
/// re-encoding (values only another client could have written included).
async fn list_raw(registry: &Registry, service: Option<&str>) -> CliResult {
    for (_key, value) in registry.stored_values(service).await? {
        output::raw_line(&value)?;
    }
    Ok(())
}
