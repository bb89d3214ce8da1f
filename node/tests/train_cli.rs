//! `p2p-node train` as a user runs it: real processes on loopback. A node killed with SIGKILL
//! mid-run resumes from its last checkpoint and rejoins averaging; bad specs, data and shards
//! get one-line errors and non-zero exit codes.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::path::Path;
use std::time::Duration;

use common::http_get;
use common::process::{poll, run, Running, Stream, LOOPBACK};

const QUICK: Duration = Duration::from_secs(60);
const SLOW: Duration = Duration::from_secs(300);

/// Long enough that the node killed at step 300 restarts well before its peers finish.
const SPEC: &str = r#"
model = "digits-mlp"
dataset = "digits"
partition = "by-label"
shards = 3
steps = 4000
batch_size = 32
learning_rate = 0.05
average_every = 10
checkpoint_every = 100
"#;

fn train(dir: &Path, extra: &[&str]) -> Running {
    let mut args = vec!["train", "--data-dir", dir.to_str().unwrap()];
    args.extend(extra);
    args.extend(LOOPBACK);
    Running::start(&args)
}

/// The `training` object of the node whose data dir is `dir`, once its API answers.
fn training(dir: &Path) -> Option<serde_json::Value> {
    let api = std::fs::read_to_string(dir.join("api-addr")).ok()?;
    let (_, body) = http_get(api.trim().parse().ok()?, "/status").ok()?;
    let status: serde_json::Value = serde_json::from_str(&body).ok()?;
    Some(status["training"].clone()).filter(|t| !t.is_null())
}

fn field(t: &serde_json::Value, name: &str) -> u64 {
    t[name].as_u64().unwrap_or_else(|| panic!("{name} in {t}"))
}

#[test]
fn a_node_killed_mid_run_resumes_from_its_checkpoint_and_rejoins_averaging() {
    let files = tempfile::tempdir().unwrap();
    let spec = files.path().join("digits.toml");
    std::fs::write(&spec, SPEC).unwrap();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();

    let mut creator = train(
        dirs[0].path(),
        &["--create", spec.to_str().unwrap(), "--shard", "0/3"],
    );
    let join = creator.join_addr();
    let _second = train(dirs[1].path(), &["--bootstrap", &join, "--shard", "1/3"]);
    let victim_args = ["--bootstrap", join.as_str(), "--shard", "2/3"];
    let victim = train(dirs[2].path(), &victim_args);

    // Kill the third node with SIGKILL once its checkpoint holds step 300 or later and it has
    // averaged (the step counter passes 300 before that checkpoint is on disk).
    let victim_dir = dirs[2].path();
    poll(SLOW, "the third node to reach step 300", || {
        training(victim_dir).filter(|t| {
            t["checkpoint_step"].as_u64().is_some_and(|s| s >= 300)
                && field(t, "averaging_rounds") > 0
        })
    });
    drop(victim); // SIGKILL: no chance to save anything
    let creator_step = field(&training(dirs[0].path()).unwrap(), "step");

    let mut restarted = train(victim_dir, &victim_args);
    let resumed = restarted.wait_line(Stream::Stderr, QUICK, |l| {
        l.contains("resumed from the local checkpoint at step")
    });
    let step: u64 = resumed
        .split("at step ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a step in {resumed}"));
    eprintln!("resumed: {resumed}");
    assert!(step >= 300, "resumed at step {step}, not from scratch");
    assert!(step < 4000, "the kill came before the end: {step}");

    // The restarted process averages with the survivors again (its counters start at zero).
    let after = poll(SLOW, "the restarted node to average again", || {
        training(victim_dir).filter(|t| field(t, "averaging_rounds") >= 3)
    });
    eprintln!("after restart: {after}");
    assert!(field(&after, "step") >= step, "{after}");
    assert!(
        after["last_peer"].is_string(),
        "it averaged with a peer: {after}"
    );
    // The others never stopped.
    poll(SLOW, "the creator to train on", || {
        training(dirs[0].path()).filter(|t| field(t, "step") > creator_step)
    });

    let (code, _) = restarted.terminate(QUICK);
    assert_eq!(code, 0);
    let (code, _) = creator.terminate(QUICK);
    assert_eq!(code, 0);
}

#[test]
fn bad_specs_data_and_shards_are_one_line_errors_with_nonzero_exit() {
    let files = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let path = |name: &str| files.path().join(name).to_str().unwrap().to_string();
    let write = |name: &str, text: &str| std::fs::write(files.path().join(name), text).unwrap();
    write("ok.toml", "model = \"digits-mlp\"\ndataset = \"digits\"\n");
    write("model.toml", "model = \"resnet\"\ndataset = \"digits\"\n");
    write(
        "dataset.toml",
        "model = \"digits-mlp\"\ndataset = \"imagenet\"\n",
    );
    let mnist = files.path().join("mnist");
    std::fs::create_dir(&mnist).unwrap();
    for f in [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ] {
        std::fs::write(mnist.join(f), b"not an IDX file at all").unwrap();
    }
    write(
        "mnist.toml",
        &format!(
            "model = \"digits-mlp\"\ndataset = \"mnist:{}\"\n",
            mnist.display()
        ),
    );
    write("steps.toml", "model = \"digits-mlp\"\nsteps = \"many\"\n");

    let d = data.path().to_str().unwrap();
    let cases: [(Vec<String>, i32, &str); 6] = [
        (
            vec!["--create".into(), path("model.toml")],
            1,
            "unknown variant `resnet`",
        ),
        (vec!["--create".into(), path("dataset.toml")], 1, "imagenet"),
        (vec!["--create".into(), path("mnist.toml")], 1, "not IDX3"),
        (vec!["--create".into(), path("steps.toml")], 1, "line 2"),
        (
            vec!["--create".into(), path("missing.toml")],
            1,
            "cannot read",
        ),
        (
            vec![
                "--create".into(),
                path("ok.toml"),
                "--shard".into(),
                "5/4".into(),
            ],
            2,
            "shard '5/4'",
        ),
    ];
    for (extra, code, message) in cases {
        let mut args = vec!["train", "--data-dir", d];
        args.extend(extra.iter().map(String::as_str));
        args.extend(LOOPBACK);
        let (got, _stdout, stderr) = run(&args, QUICK);
        assert_eq!(got, code, "{args:?}: {stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "one error line for {args:?}: {stderr}");
        assert!(errors[0].contains(message), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// The run id a `train` process prints: `training run <id> (model ...)`.
fn printed_run(node: &mut Running) -> String {
    let line = node.wait_line(Stream::Stdout, SLOW, |l| l.starts_with("training run "));
    line.split_whitespace().nth(2).unwrap().to_string()
}

/// `train --create SPEC` killed with SIGKILL and run again identically resumes the same run
/// (same id, its checkpoint) instead of forking a new one; another spec is refused in one
/// line naming the run; `--new-run` starts a new run deliberately.
#[test]
fn the_creator_restarted_with_the_same_command_resumes_its_run() {
    let files = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = files.path().join("digits.toml");
    // No name: the run's generated name must still match on restart.
    std::fs::write(
        &spec,
        "model = \"digits-mlp\"\ndataset = \"digits\"\nsteps = 100000\ncheckpoint_every = 50\nbatch_size = 32\n",
    )
    .unwrap();
    let create = ["--create", spec.to_str().unwrap(), "--no-averaging"];
    let mut first = train(dir.path(), &create);
    let run_id = printed_run(&mut first);
    poll(SLOW, "a checkpoint past step 100", || {
        training(dir.path()).filter(|t| field(t, "step") >= 100 && t["checkpoint_path"].is_string())
    });
    drop(first); // SIGKILL

    let mut again = train(dir.path(), &create);
    again.wait_line(Stream::Stderr, SLOW, |l| {
        l.contains("already trains the run created from this spec; resuming it")
    });
    assert_eq!(
        printed_run(&mut again),
        run_id,
        "the same command forked the run"
    );
    again.wait_line(Stream::Stderr, QUICK, |l| {
        l.contains("resumed from the local checkpoint at step")
    });
    let (code, _) = again.terminate(QUICK);
    assert_eq!(code, 0);

    // Another spec on the same data dir: refused, naming the run and the way out.
    let other = files.path().join("other.toml");
    std::fs::write(
        &other,
        "model = \"digits-mlp\"\ndataset = \"digits\"\nsteps = 100000\nlearning_rate = 0.2\n",
    )
    .unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let mut refused = vec![
        "train",
        "--data-dir",
        data_dir,
        "--create",
        other.to_str().unwrap(),
    ];
    refused.extend(LOOPBACK);
    let (code, _, stderr) = run(&refused, QUICK);
    assert_eq!(code, 1, "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains(&run_id),
        "{stderr}"
    );
    assert!(last.contains("--new-run"), "{last}");

    // --new-run: a new run on purpose.
    let mut new_run = train(
        dir.path(),
        &[
            "--create",
            other.to_str().unwrap(),
            "--new-run",
            "--no-averaging",
        ],
    );
    let new_id = printed_run(&mut new_run);
    assert_ne!(new_id, run_id);
    let (code, _) = new_run.terminate(QUICK);
    assert_eq!(code, 0);
}
