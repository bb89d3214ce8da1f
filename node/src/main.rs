//! The `p2p-node` binary: parse the CLI, start logging, run the node until Ctrl-C or SIGTERM.
//!
//! Exit codes: 0 success (including a signal-driven shutdown), 1 a runtime error (port in use,
//! unwritable data dir, corrupt identity, ...), 2 bad command-line usage.

use std::process::ExitCode;

use anyhow::Result;
use clap::error::ErrorKind;
use p2p_node::cli::QueryArgs;
use p2p_node::cli::{Cli, Command};
use p2p_node::config::prepare_data_dir;
use p2p_node::shutdown::ShutdownSignal;
use p2p_node::{commands, config_file, identity, logging, query};

fn main() -> ExitCode {
    let parsed = match config_file::parse(std::env::args_os().collect()) {
        Ok(parsed) => parsed,
        Err(config_file::Error::Usage(e)) => return usage_error(e),
        Err(config_file::Error::File(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let cli = parsed.cli;
    if let Err(e) = cli.common.validate() {
        return usage_error(e);
    }
    logging::init(cli.common.log_format);
    if matches!(cli.command, Some(Command::Train(_))) {
        // Training allocates and frees the same large tensors every step: keep them.
        p2p_models::memory::keep_freed_memory();
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let file = parsed.file.map(|(_, table)| table);
    match runtime.block_on(run(cli, parsed.matches, file)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// Help and version go to stdout with exit 0; anything else is one line on stderr, exit 2.
fn usage_error(e: clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        _ => {
            let rendered = e.render().to_string();
            let mut lines = rendered.lines();
            let mut first = lines
                .next()
                .unwrap_or("error: invalid arguments")
                .to_string();
            // "the following required arguments were not provided:" lists them on the
            // indented lines that follow: keep them on the one line.
            for more in lines.take_while(|l| l.starts_with("  ")) {
                first.push(' ');
                first.push_str(more.trim());
            }
            eprintln!("{first} (see p2p-node --help)");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli, matches: clap::ArgMatches, file: Option<toml::Table>) -> Result<()> {
    // Before anything starts: a signal from here on stops the node gracefully.
    let mut shutdown = ShutdownSignal::install();
    let config = cli.common.node_config()?;
    match cli.command.unwrap_or(Command::Run) {
        Command::Id => {
            prepare_data_dir(&config.data_dir)?;
            let key = identity::load_or_create(&config.identity_path())?;
            println!("{}", key.public().to_peer_id());
            Ok(())
        }
        Command::Run => {
            commands::run_node(
                config,
                &cli.common.publish,
                cli.common.model.as_deref(),
                &mut shutdown,
            )
            .await
        }
        Command::Fetch(args) => {
            if !cli.common.publish.is_empty() {
                anyhow::bail!("--publish belongs to a running node, not to fetch");
            }
            commands::fetch(config, &args, &mut shutdown).await
        }
        Command::SwarmKey(args) => {
            let key = p2p_node::network::closed::write_new_swarm_key(&args.out)?;
            println!(
                "wrote a new swarm key to {} (fingerprint {}); give every node of the network \
                 this file with --swarm-key",
                args.out.display(),
                key.fingerprint()
            );
            Ok(())
        }
        Command::Config(_) => {
            let listen = config.listen.iter().map(|a| a.to_string()).collect();
            let data_dir = vec![config.data_dir.display().to_string()];
            print!(
                "{}",
                config_file::dump(
                    &matches,
                    file.as_ref(),
                    &[("data_dir", data_dir), ("listen", listen)]
                )
            );
            Ok(())
        }
        Command::Status(args) => query(&config, &args, "/status", query::format_status),
        Command::Peers(args) => query(&config, &args, "/peers", query::format_peers),
        Command::Models(args) => query(&config, &args, "/models", query::format_models),
        Command::Train(args) => {
            if !cli.common.publish.is_empty() {
                anyhow::bail!("--publish belongs to a running node, not to train");
            }
            commands::train(config, &args, &mut shutdown).await
        }
    }
}

/// Asks the node running on the data dir (or at `--api`, or at the configured API address)
/// for `path` and prints the answer.
fn query(
    config: &p2p_node::config::NodeConfig,
    args: &QueryArgs,
    path: &str,
    format: fn(&serde_json::Value) -> String,
) -> Result<()> {
    let addr = match args.api {
        Some(addr) => addr,
        None => query::find_api(&config.api_addr_path(), config.api_addr)?,
    };
    let answer = query::get(addr, path)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        println!("{}", format(&answer));
    }
    Ok(())
}
