//! `p2p-fuzz`: fuzzes every decoder of network input for a set time and prints what it tried.
//! `scripts/fuzz` runs it in release mode; see the library docs for how it works.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use p2p_fuzz::{fuzz, targets, Budget};

/// Fuzz the decoders of network input.
#[derive(Debug, Parser)]
#[command(name = "p2p-fuzz")]
struct Args {
    /// Seconds per target.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Only this target (repeatable) [default: all].
    #[arg(long, value_name = "NAME")]
    target: Vec<String>,
    /// Seed of the mutation choices (the same seed and budget repeat a run exactly).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write crashing inputs to this directory.
    #[arg(long, value_name = "DIR", default_value = "target/fuzz-crashes")]
    crashes: std::path::PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let all = targets();
    let known: Vec<&str> = all.iter().map(|t| t.name).collect();
    if let Some(bad) = args.target.iter().find(|t| !known.contains(&t.as_str())) {
        eprintln!(
            "error: unknown target {bad:?}; targets: {}",
            known.join(", ")
        );
        return ExitCode::from(2);
    }
    let (mut total, mut crashes) = (0u64, 0u64);
    println!(
        "{:<18} {:>12} {:>10} {:>12} {:>8}",
        "target", "inputs", "accepted", "inputs/s", "crashes"
    );
    for target in all
        .iter()
        .filter(|t| args.target.is_empty() || args.target.iter().any(|n| n == t.name))
    {
        let report = fuzz(
            target,
            Budget::Time(Duration::from_secs(args.seconds)),
            args.seed,
        );
        let rate = report.inputs as f64 / report.elapsed.as_secs_f64().max(1e-9);
        println!(
            "{:<18} {:>12} {:>10} {:>12.0} {:>8}",
            report.name, report.inputs, report.accepted, rate, report.crash_count
        );
        for (i, input) in report.crashes.iter().enumerate() {
            let path = args.crashes.join(format!("{}-{i}.bin", report.name));
            let written =
                std::fs::create_dir_all(&args.crashes).and_then(|()| std::fs::write(&path, input));
            match written {
                Ok(()) => println!("  crash input: {}", path.display()),
                Err(e) => eprintln!("  cannot write {}: {e}", path.display()),
            }
        }
        total += report.inputs;
        crashes += report.crash_count;
    }
    println!("total: {total} inputs, {crashes} crashes");
    if crashes > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
