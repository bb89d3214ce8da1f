//! Training speed on this machine's CPU: steps per second of the digits MLP and of the
//! character transformer, with the shapes and batch sizes of the README's specs, plus the cost
//! of the parameter math a round adds (flatten, mix back in). Figures, not pass/fail. Run with
//! `scripts/bench-train` (or `cargo bench -p p2p-models --bench train_steps`).

#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;
use std::time::{Duration, Instant};

use p2p_models::data::{Dataset, Vocab};
use p2p_models::params;
use p2p_models::spec::RunSpec;
use p2p_models::train::Trainer;
use p2p_models::Device;

/// Each figure is measured over at least this long, after a warm-up.
const MEASURE_FOR: Duration = Duration::from_secs(3);
const WARM_UP_STEPS: u64 = 10;

fn main() {
    let device = Device::Cpu;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("CPU, {threads} threads available to candle");
    println!(
        "{:<52} {:>10} {:>12} {:>10}",
        "model", "params", "steps/s", "samples/s"
    );

    let mlp = RunSpec::parse(
        "model = \"digits-mlp\"\ndataset = \"digits\"\nbatch_size = 32\nlearning_rate = 0.05\n",
    )
    .unwrap();
    let widths: Vec<String> = mlp.hidden.iter().map(|w| w.to_string()).collect();
    let name = format!("digits-mlp (64-{}-10), batch 32", widths.join("-"));
    measure(&name, &mlp, None, &device);

    let text = corpus();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &text).unwrap();
    let mut transformer = RunSpec::parse(&format!(
        "model = \"char-transformer\"\ndataset = \"text:{}\"\nbatch_size = 16\nlearning_rate = 0.003\n",
        file.path().display()
    ))
    .unwrap();
    transformer.transformer.vocab = Vocab::from_text(&text).chars();
    let t = &transformer.transformer;
    let name = format!(
        "char-transformer ({} layers, dim {}, ctx {}), batch 16",
        t.layers, t.dim, t.context
    );
    measure(&name, &transformer, Some(file.path()), &device);
}

fn measure(name: &str, spec: &RunSpec, data: Option<&Path>, device: &Device) {
    let dataset = Dataset::load(spec, data).unwrap();
    let mut trainer = Trainer::new(spec, dataset, device, 1).unwrap();
    for _ in 0..WARM_UP_STEPS {
        trainer.train_step().unwrap();
    }
    let started = Instant::now();
    let mut steps = 0u64;
    while started.elapsed() < MEASURE_FOR {
        trainer.train_step().unwrap();
        steps += 1;
    }
    let per_second = steps as f64 / started.elapsed().as_secs_f64();
    let values = trainer.params().unwrap();
    println!(
        "{name:<52} {:>10} {per_second:>12.1} {:>10.0}",
        values.len(),
        per_second * spec.batch_size as f64
    );

    // What one averaging round adds to the trainer: read the weights out, mix a peer's in,
    // write them back.
    let peer: Vec<f32> = values.iter().map(|v| v * 0.5).collect();
    let rounds = 50;
    let started = Instant::now();
    for _ in 0..rounds {
        let mut local = trainer.params().unwrap();
        params::mix_into(&mut local, &values, &peer, 0.5).unwrap();
        trainer.set_params(&local).unwrap();
    }
    let round = started.elapsed().as_secs_f64() / rounds as f64;
    println!(
        "{:<52} {:>10} {:>12} {:>10}   = {:.2} training steps",
        "  + parameter math of one round",
        "",
        format!("{:.3} ms", round * 1e3),
        "",
        round * per_second
    );
}

/// Real UTF-8 text for the transformer: this workspace's documentation and sources.
fn corpus() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut files = Vec::new();
    for dir in ["", "protocol/src", "models/src", "node/src"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if matches!(path.extension().and_then(|e| e.to_str()), Some("md" | "rs")) {
                files.push(path);
            }
        }
    }
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect()
}
