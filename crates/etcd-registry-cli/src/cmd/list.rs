//! `list`: the instances of one service or of all, in one consistent read.

use etcd_registry::Registry;

use crate::common::args::Global;
use crate::common::connect::with_registry;
use crate::common::error::CliResult;
use crate::common::output::{self, line};

// Its `about` is the doc comment of its variant in `cli.rs`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The service; all services of the namespace when omitted.
    pub service: Option<String>,
    /// One JSON array of instances in the Go library's wire format.
    #[arg(long)]
    pub json: bool,
    /// Each stored value byte for byte, one per line, as no re-encoding
    /// can: whatever a client wrote, unknown fields and spelling included.
    #[arg(long, conflicts_with = "json")]
    pub raw: bool,
    /// List the endpoints under gRPC's etcd naming target TARGET
    /// (`{TARGET}/{addr}`, as etcd's Go `naming/endpoints` writes them)
    /// instead of a service: id = address, metadata as read.
    #[arg(long, value_name = "TARGET", conflicts_with_all = ["service", "raw"])]
    pub grpc_naming: Option<String>,
}

pub async fn run(g: &Global, args: Args) -> CliResult {
    match args {
        Args {
            grpc_naming: Some(target),
            json,
            ..
        } => {
            etcd_registry::naming::validate_target(&target)?;
            with_registry(g, async |r| list_grpc_naming(r, &target, json).await).await
        }
        Args {
            service, raw: true, ..
        } => with_registry(g, async |r| list_raw(r, service.as_deref()).await).await,
        Args { service, json, .. } => {
            with_registry(g, async |r| list(r, service.as_deref(), json).await).await
        }
    }
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

/// `list --raw`: the stored values, unparsed, so that nothing is hidden by a
/// re-encoding (values only another client could have written included).
async fn list_raw(registry: &Registry, service: Option<&str>) -> CliResult {
    for (_key, value) in registry.stored_values(service).await? {
        output::raw_line(&value)?;
    }
    Ok(())
}
