//! Training step time on this machine's CPU, one line per case:
//! `<case>: <X> ms/step (forward+loss A, backward B, optimizer C)`. Each case trains on one
//! fixed random batch (as `scripts/bench_train_torch.py` does for PyTorch), so only the step
//! itself is timed. Figures, not pass/fail. Run with `scripts/bench-train` (which pins the
//! thread count and can run PyTorch on the same cases), or
//! `cargo bench -p p2p-models --bench train_steps`.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use p2p_models::model::{Batch, Model};
use p2p_models::optim::Optimizer;
use p2p_models::spec::RunSpec;
use p2p_models::Device;

/// Each case is timed for at least this long (and at least `MIN_STEPS` steps), after warm-up.
const MEASURE_FOR: Duration = Duration::from_secs(3);
const MIN_STEPS: u32 = 5;
const WARM_UP_STEPS: u32 = 3;

/// The cases, shared with the PyTorch script: name, spec, batch shape.
fn cases() -> Vec<(&'static str, String)> {
    let printable: String = (' '..='~').collect();
    vec![
        (
            "mlp-784-512-512-10 b128 adamw",
            "model = \"digits-mlp\"\ndataset = \"mnist:unused\"\nhidden = [512, 512]\n\
             batch_size = 128\noptimizer = \"adamw\"\nlearning_rate = 0.001\n"
                .to_string(),
        ),
        (
            "digits-mlp-64-64-10 b32 sgd-momentum",
            "model = \"digits-mlp\"\ndataset = \"digits\"\nbatch_size = 32\nlearning_rate = 0.05\n"
                .to_string(),
        ),
        (
            "char-transformer-4x256-ctx128 b8 adamw (the austen run)",
            format!(
                "model = \"char-transformer\"\ndataset = \"text:unused\"\nbatch_size = 8\n\
                 optimizer = \"adamw\"\nlearning_rate = 0.001\n[transformer]\ncontext = 128\n\
                 dim = 256\nheads = 8\nlayers = 4\nvocab = {:?}\n",
                printable
            ),
        ),
        (
            "char-transformer-2x64-ctx64 b16 adamw",
            format!(
                "model = \"char-transformer\"\ndataset = \"text:unused\"\nbatch_size = 16\n\
                 optimizer = \"adamw\"\nlearning_rate = 0.003\n[transformer]\nvocab = {:?}\n",
                printable
            ),
        ),
    ]
}

fn main() {
    // As `p2p-node train` does (see p2p_models::memory).
    let kept = p2p_models::memory::keep_freed_memory();
    let device = Device::Cpu;
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .to_string()
    });
    println!("candle, CPU, {threads} threads, freed memory kept for reuse: {kept}");
    // `cargo bench ... -- transformer` runs only the cases whose name contains "transformer".
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    for (name, spec) in cases() {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let spec = RunSpec::parse(&spec).unwrap();
        let model = Model::new(&spec, &device).unwrap();
        let mut optimizer = Optimizer::new(&spec, model.vars().to_vec()).unwrap();
        let batch = random_batch(&spec, &device);
        let step = |optimizer: &mut Optimizer| -> [Duration; 3] {
            let t0 = Instant::now();
            let loss = model.loss(&batch).unwrap();
            let _ = loss.to_scalar::<f32>().unwrap();
            let t1 = Instant::now();
            let grads = loss.backward().unwrap();
            let t2 = Instant::now();
            optimizer.step(&grads).unwrap();
            [t1 - t0, t2 - t1, t2.elapsed()]
        };
        for _ in 0..WARM_UP_STEPS {
            step(&mut optimizer);
        }
        let (mut steps, mut phases) = (0u32, [Duration::ZERO; 3]);
        let started = Instant::now();
        while steps < MIN_STEPS || started.elapsed() < MEASURE_FOR {
            for (sum, t) in phases.iter_mut().zip(step(&mut optimizer)) {
                *sum += t;
            }
            steps += 1;
        }
        let ms = |d: Duration| d.as_secs_f64() * 1e3 / f64::from(steps);
        println!(
            "{name}: {:.2} ms/step (forward+loss {:.2}, backward {:.2}, optimizer {:.2})",
            ms(started.elapsed()),
            ms(phases[0]),
            ms(phases[1]),
            ms(phases[2]),
        );
    }
}

/// One batch of seeded random inputs and targets of the shape the spec trains on.
fn random_batch(spec: &RunSpec, device: &Device) -> Batch {
    let b = spec.batch_size;
    if spec.transformer.vocab.is_empty() {
        let inputs = Tensor::rand(0f32, 1f32, (b, spec.input_dim()), device).unwrap();
        let targets: Vec<u32> = (0..b as u32).map(|i| i % 10).collect();
        Batch {
            inputs,
            targets: Tensor::new(targets, device).unwrap(),
        }
    } else {
        let (t, vocab) = (
            spec.transformer.context,
            spec.transformer.vocab.chars().count() as u32 + 1,
        );
        let ids = |offset: u32| -> Tensor {
            let v: Vec<u32> = (0..(b * t) as u32)
                .map(|i| (i * 7 + offset) % vocab)
                .collect();
            Tensor::from_vec(v, (b, t), device).unwrap()
        };
        let batch = Batch {
            inputs: ids(0),
            targets: ids(1),
        };
        assert_eq!(batch.inputs.dtype(), DType::U32);
        batch
    }
}
