//! What a node publishes is exactly what it read, and what it accepts is what the reference
//! safetensors reader opens: process-level tests of `--publish` and `POST /publish`.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::process::{run, Running, Stream, LOOPBACK};
use common::{http_get, http_post_json};

const QUICK: Duration = Duration::from_secs(60);

fn args<'a>(base: &[&'a str]) -> Vec<&'a str> {
    let mut v = base.to_vec();
    v.extend(LOOPBACK);
    v
}

/// Entries of the node's model store (version folders and leftovers alike).
fn store_entries(data_dir: &Path) -> Vec<String> {
    std::fs::read_dir(data_dir.join("models"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// `--publish FILE` on a fresh data dir: the exit code and the last stderr line.
fn publish_once(data_dir: &Path, file: &Path) -> (i32, String) {
    let (code, _, stderr) = run(
        &args(&[
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--publish",
            file.to_str().unwrap(),
        ]),
        QUICK,
    );
    let last = stderr.lines().last().unwrap_or_default().to_string();
    (code, last)
}

#[test]
fn a_file_rewritten_in_place_while_published_over_the_api_is_refused() {
    let (files, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (file, bytes) = common::model_file(files.path(), "race.safetensors", 64, 3);
    let mut node = Running::start(&args(&["--data-dir", dir.path().to_str().unwrap()]));
    let api = node.api_addr();

    // A writer that keeps overwriting the second half in place (same size) for as long as
    // the publish runs, the way a trainer rewriting its output would.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, file) = (Arc::clone(&stop), file.clone());
        let half = bytes.len() as u64 / 2;
        let len = bytes.len() as u64 - half;
        std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
            let mut round = 0u8;
            while !stop.load(Ordering::Relaxed) {
                round = round.wrapping_add(1);
                let piece = vec![round; 1 << 20];
                let mut offset = half;
                while offset < half + len && !stop.load(Ordering::Relaxed) {
                    let n = (half + len - offset).min(piece.len() as u64) as usize;
                    f.write_all_at(&piece[..n], offset).unwrap();
                    offset += n as u64;
                }
            }
        })
    };
    let body = format!(r#"{{"path":"{}","model":"race"}}"#, file.to_str().unwrap());
    let (status, answer) = http_post_json(api, "/publish", &body).unwrap();
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(status, 400, "a file that changed was published: {answer}");
    assert!(
        answer.contains("changed while being read; publish it again once it is written"),
        "{answer}"
    );
    assert_eq!(store_entries(dir.path()), Vec::<String>::new());

    // Once written, the same file publishes, and the stored version is exactly its bytes.
    let (status, answer) = http_post_json(api, "/publish", &body).unwrap();
    assert_eq!(status, 200, "{answer}");
    let (_, models) = http_get(api, "/models").unwrap();
    let models: serde_json::Value = serde_json::from_str(&models).unwrap();
    let stored = std::fs::read(models[0]["path"].as_str().unwrap()).unwrap();
    assert!(
        stored == std::fs::read(&file).unwrap(),
        "stored bytes differ from the file"
    );
    drop(node);
}

#[test]
fn metadata_that_is_not_a_string_map_is_refused_at_publish() {
    let (files, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for (i, metadata) in [r#"{"step":0}"#, r#"{"k":{"a":"b"}}"#, r#"{"k":["a"]}"#]
        .iter()
        .enumerate()
    {
        let header = format!(
            r#"{{"__metadata__":{metadata},"w":{{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}}}"#
        );
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend([1, 2, 3, 4]);
        let file = files.path().join(format!("meta{i}.safetensors"));
        std::fs::write(&file, &bytes).unwrap();
        let (code, last) = publish_once(dir.path(), &file);
        assert_eq!(code, 1, "{metadata}: {last}");
        assert!(
            last.starts_with("error: ") && last.contains("not a valid safetensors file"),
            "{metadata}: {last}"
        );
        assert_eq!(store_entries(dir.path()), Vec::<String>::new());
    }
}

/// 300,000 one-byte U8 tensors: a valid file (a 20 MB header, within the reference reader's
/// 100 MB) with far more tensors than a manifest of its size may list.
#[test]
fn a_tensor_index_too_large_for_a_manifest_is_refused_and_leaves_nothing() {
    let (files, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let n = 300_000;
    let tensors: Vec<(String, Vec<u8>)> = (0..n).map(|i| (format!("t{i}"), vec![1u8])).collect();
    let refs: Vec<(&str, Vec<u8>)> = tensors
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    let file = files.path().join("many.safetensors");
    common::write_safetensors(&file, &refs);
    let (code, last) = publish_once(dir.path(), &file);
    assert_eq!(code, 1, "{last}");
    assert!(last.contains("has 300000 tensors"), "{last}");
    assert!(last.contains("may have at most"), "{last}");
    assert!(!last.contains("manifest.cbor"), "an internal path: {last}");
    assert_eq!(store_entries(dir.path()), Vec::<String>::new());

    // Nothing damaged is left to warn about at the next start.
    let mut node = Running::start(&args(&["--data-dir", dir.path().to_str().unwrap()]));
    node.api_addr();
    let (_, lines) = node.terminate(QUICK);
    assert!(
        !lines
            .iter()
            .any(|(s, l)| *s == Stream::Stderr && l.contains("damaged")),
        "{lines:#?}"
    );
}
