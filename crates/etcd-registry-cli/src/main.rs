//! `etcd-registry`: register, list, watch and elect on etcd from the shell.

mod args;
mod campaign;
mod commands;
mod dns;
mod error;
mod lock;
mod metrics;
mod output;
mod register;
mod shutdown;
mod status;
mod supervise;
mod ui;

use std::io::IsTerminal as _;
use std::process::ExitCode;

use crate::error::CliError;

fn main() -> ExitCode {
    // Usage errors exit 2 here, with clap's message.
    let cli = args::Cli::parse_checked();
    init_logging(cli.global.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return CliError::msg(format!("cannot start the async runtime: {e}")).report(),
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => e.report(),
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
