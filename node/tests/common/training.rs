//! Helpers of the training tests: start nodes, start training on them, run a run to the end.

use std::path::Path;
use std::time::Duration;

use p2p_node::training::coordinator::{self, TrainingHandle};
use p2p_node::training::run::TrainOptions;
use p2p_node::training::TrainingStatus;

use super::{start_node, TestNode};

/// Generous: debug builds on a busy 2-core machine.
pub const TRAIN_TIMEOUT: Duration = Duration::from_secs(600);

/// The outer-steps spec of the tests: three by-label shards, 10 local steps per outer step, a
/// model wide enough that an inner phase takes about as long as an exchange on loopback.
pub const OUTER_SPEC: &str =
    "model = \"digits-mlp\"\ndataset = \"digits\"\npartition = \"by-label\"\n\
    shards = 3\nsteps = 600\naveraging = \"outer\"\ninner_steps = 10\ncompression = \"int8\"\n\
    checkpoint_every = 100\nhidden = [512, 512]\n";

pub fn options(shard: (u32, u32), averaging: bool) -> TrainOptions {
    TrainOptions {
        shard: Some(shard),
        no_averaging: !averaging,
        find_timeout: Duration::from_secs(120),
        ..TrainOptions::default()
    }
}

pub async fn train(node: &TestNode, options: TrainOptions) -> TrainingHandle {
    coordinator::start(
        node.handle.client.clone(),
        node.peer_id(),
        node.dir.path(),
        options,
    )
    .await
    .unwrap()
}

/// Starts `nodes.len()` training nodes (the first creates the run from `spec`) with the given
/// options, and waits until each has finished its local steps.
pub async fn run_to_completion(
    nodes: &[TestNode],
    spec: &Path,
    mut each: impl FnMut(usize) -> TrainOptions,
) -> (Vec<TrainingStatus>, Vec<TrainingHandle>) {
    let mut creator_options = each(0);
    creator_options.create = Some(spec.to_path_buf());
    let starts = nodes.iter().enumerate().map(|(i, node)| {
        let opts = if i == 0 {
            creator_options.clone()
        } else {
            each(i)
        };
        train(node, opts)
    });
    let mut handles = futures::future::join_all(starts).await;
    for h in &mut handles {
        tokio::time::timeout(TRAIN_TIMEOUT, h.finished())
            .await
            .expect("training finished in time")
            .unwrap();
    }
    // Finished nodes still answer rounds that others open, and evaluate again after them:
    // wait until every node's evaluation describes its current parameters.
    let finals = super::wait_for(
        "evaluations of the final parameters",
        TRAIN_TIMEOUT,
        || async {
            let statuses: Vec<TrainingStatus> =
                handles.iter().map(|h| h.status.borrow().clone()).collect();
            statuses
                .iter()
                .all(|s| s.evaluated_after_rounds == s.averaging_rounds)
                .then_some(statuses)
        },
    )
    .await;
    (finals, handles)
}

pub async fn start_nodes(n: usize) -> Vec<TestNode> {
    super::init_logs();
    let first = start_node(vec![]).await;
    let mut nodes = vec![];
    for _ in 1..n {
        nodes.push(start_node(vec![first.bootstrap_addr()]).await);
    }
    nodes.insert(0, first);
    nodes
}

pub fn accuracies(statuses: &[TrainingStatus]) -> Vec<f64> {
    statuses.iter().map(|s| s.accuracy.unwrap()).collect()
}

pub async fn stop_all(handles: Vec<TrainingHandle>, nodes: Vec<TestNode>) {
    for h in handles {
        h.stop().await.unwrap();
    }
    for n in nodes {
        n.handle.stop().await.unwrap();
    }
}
