//! `etcd-registry`: register, list, watch and elect on etcd from the shell.

mod cli;
mod cmd;
mod common;
mod supervise;

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::CommandFactory as _;

use crate::cli::{Cli, Command};
use crate::common::error::{CliError, CliResult};

fn main() -> ExitCode {
    // Usage errors exit 2 here, with clap's message.
    let cli = Cli::parse_checked();
    init_logging(cli.global.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return CliError::msg(format!("cannot start the async runtime: {e}")).report(),
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => e.report(),
    }
}

/// Runs the one command; every command but `dev` connects with the shared
/// flags and closes the registry (revoking its lease) before it returns.
async fn run(cli: Cli) -> CliResult {
    let g = &cli.global;
    common::metrics::serve(cli.command.metrics_addr())?;
    match cli.command {
        Command::Dev => cmd::dev::run().await,
        Command::Completions(a) => cmd::completions::run(a, Cli::command()),
        Command::Man => cmd::man::run(Cli::command()),
        Command::Status(a) => cmd::status::run(g, a).await,
        Command::List(a) => cmd::list::run(g, a).await,
        Command::Watch(a) => cmd::watch::run(g, a).await,
        Command::Register(a) => cmd::register::run(g, a).await,
        Command::Deregister(a) => cmd::deregister::run(g, a).await,
        Command::DeleteService(a) => cmd::delete_service::run(g, a).await,
        Command::Leader(a) => cmd::leader::run(g, a).await,
        Command::Campaign(a) => cmd::campaign::run(g, a).await,
        Command::Lock(a) => cmd::lock::run(g, a).await,
        Command::Observe(a) => cmd::observe::run(g, a).await,
        Command::Ui(a) => cmd::ui::run(g, a).await,
        Command::Dns(a) => cmd::dns::run(g, a).await,
    }
}

/// Logs go to stderr: warnings by default, more with each -v; RUST_LOG wins.
fn init_logging(verbose: u8) {
    let ours = |level: &str| {
        format!(
            "warn,etcd_registry={level},etcd_registry_cli={level},etcd_registry_testkit={level}"
        )
    };
    let directives = match verbose {
        0 => "warn".to_owned(),
        1 => ours("info"),
        2 => ours("debug"),
        _ => "trace".to_owned(),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(directives));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
