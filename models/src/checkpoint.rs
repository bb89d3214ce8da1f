//! Checkpoints: plain safetensors files (F32 tensors named as in the model's [`Layout`]) with
//! one metadata key, `p2p-node`, holding [`CheckpointMeta`] as JSON. One key keeps the bytes
//! of a checkpoint a pure function of its contents (the safetensors writer orders several
//! keys arbitrarily), so identical weights and metadata give the same version id.
//!
//! Files are written atomically: a temporary file in the same directory, fsync, rename, fsync of
//! the directory. A crash leaves either the old file or the new one, never a torn one.
//! Loading checks names, shapes, dtype and that every value is finite.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::params::Layout;
use crate::{Error, Result};

/// The metadata key of a checkpoint.
pub const METADATA_KEY: &str = "p2p-node";

/// Largest checkpoint file loaded.
pub const MAX_CHECKPOINT_BYTES: u64 = 8 << 30;

/// Training state stored with the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct CheckpointMeta {
    /// The run (its version-0 id, hex); empty in version 0 itself.
    #[serde(default)]
    pub run: String,
    /// Local steps of the node that wrote it.
    pub step: u64,
    /// Samples the weights have been trained on (the averaging weight).
    pub samples_seen: u64,
    /// Test loss when written, if evaluated.
    #[serde(default)]
    pub loss: Option<f64>,
    /// Test accuracy when written, if evaluated.
    #[serde(default)]
    pub accuracy: Option<f64>,
    /// For a character model: the test loss in bits per character, if evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits_per_char: Option<f64>,
}

/// The safetensors bytes of `values` laid out as `layout`, with `meta`.
pub fn to_bytes(layout: &Layout, values: &[f32], meta: &CheckpointMeta) -> Result<Vec<u8>> {
    if values.len() != layout.len() {
        return Err(Error::Checkpoint(format!(
            "{} values for a layout of {}",
            values.len(),
            layout.len()
        )));
    }
    let bytes: Vec<Vec<u8>> = layout
        .ranges()
        .map(|(_, range)| values[range].iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views = layout
        .tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            TensorView::new(Dtype::F32, t.shape.clone(), b)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| Error::Checkpoint(format!("tensor {}: {e}", t.name)))
        })
        .collect::<Result<Vec<_>>>()?;
    let json = serde_json::to_string(meta).map_err(|e| Error::Checkpoint(e.to_string()))?;
    let metadata = HashMap::from([(METADATA_KEY.to_string(), json)]);
    safetensors::tensor::serialize(views, Some(metadata))
        .map_err(|e| Error::Checkpoint(format!("cannot encode the checkpoint: {e}")))
}

/// Writes a checkpoint atomically.
pub fn save(path: &Path, layout: &Layout, values: &[f32], meta: &CheckpointMeta) -> Result<()> {
    let bytes = to_bytes(layout, values, meta)?;
    write_atomic(path, &bytes)
        .map_err(|e| Error::Checkpoint(format!("cannot write {}: {e}", path.display())))
}

/// Reads a checkpoint for a model of `layout`: the flat weights and the metadata (if any).
pub fn load(path: &Path, layout: &Layout) -> Result<(Vec<f32>, Option<CheckpointMeta>)> {
    let size = std::fs::metadata(path)
        .map_err(|e| Error::Checkpoint(format!("cannot read {}: {e}", path.display())))?
        .len();
    if size > MAX_CHECKPOINT_BYTES {
        return Err(Error::Checkpoint(format!(
            "{} is larger than 8 GiB",
            path.display()
        )));
    }
    let bytes = std::fs::read(path)
        .map_err(|e| Error::Checkpoint(format!("cannot read {}: {e}", path.display())))?;
    from_bytes(&bytes, layout).map_err(|e| Error::Checkpoint(format!("{}: {e}", path.display())))
}

/// Decodes checkpoint bytes for a model of `layout`.
pub fn from_bytes(
    bytes: &[u8],
    layout: &Layout,
) -> std::result::Result<(Vec<f32>, Option<CheckpointMeta>), String> {
    let file =
        SafeTensors::deserialize(bytes).map_err(|e| format!("not a safetensors file ({e})"))?;
    let names = file.names();
    if names.len() != layout.tensors.len() {
        return Err(format!(
            "{} tensors where the run's model has {}",
            names.len(),
            layout.tensors.len()
        ));
    }
    let mut values = Vec::with_capacity(layout.len());
    for t in &layout.tensors {
        let view = file
            .tensor(&t.name)
            .map_err(|_| format!("no tensor {}", t.name))?;
        if view.dtype() != Dtype::F32 || view.shape() != t.shape.as_slice() {
            return Err(format!(
                "tensor {} is {:?} {:?}, expected F32 {:?}",
                t.name,
                view.dtype(),
                view.shape(),
                t.shape
            ));
        }
        values.extend(
            view.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
    }
    if let Some(i) = crate::params::first_non_finite(&values) {
        return Err(format!("parameter {i} is not finite"));
    }
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
    let meta = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(METADATA_KEY))
        .map(|json| serde_json::from_str::<CheckpointMeta>(json))
        .transpose()
        .map_err(|e| format!("malformed {METADATA_KEY} metadata ({e})"))?;
    Ok((values, meta))
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::TensorShape;

    fn layout() -> Layout {
        Layout::new(vec![
            TensorShape {
                name: "fc1.weight".into(),
                shape: vec![2, 3],
            },
            TensorShape {
                name: "fc1.bias".into(),
                shape: vec![2],
            },
        ])
    }

    #[test]
    fn checkpoints_round_trip_with_their_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        let values: Vec<f32> = (0..8).map(|i| i as f32 * 0.5).collect();
        let meta = CheckpointMeta {
            run: "ab".into(),
            step: 7,
            samples_seen: 224,
            loss: Some(0.25),
            accuracy: Some(0.9),
            bits_per_char: None,
        };
        save(&path, &layout(), &values, &meta).unwrap();
        let (back, got) = load(&path, &layout()).unwrap();
        assert_eq!(back, values);
        assert_eq!(got, Some(meta.clone()));
        let again = to_bytes(&layout(), &values, &meta).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            again,
            "bytes are deterministic"
        );
    }

    #[test]
    fn a_checkpoint_of_another_model_or_garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        let other = Layout::new(vec![TensorShape {
            name: "fc1.weight".into(),
            shape: vec![3, 2],
        }]);
        save(&path, &other, &[0.0; 6], &CheckpointMeta::default()).unwrap();
        let e = load(&path, &layout()).unwrap_err().to_string();
        assert!(e.contains("tensors"), "{e}");
        std::fs::write(&path, b"garbage").unwrap();
        let e = load(&path, &layout()).unwrap_err().to_string();
        assert!(e.contains("not a safetensors file"), "{e}");
        let mut values = vec![0.0f32; 8];
        values[2] = f32::INFINITY;
        let bytes = to_bytes(&layout(), &values, &CheckpointMeta::default()).unwrap();
        assert!(from_bytes(&bytes, &layout())
            .unwrap_err()
            .contains("finite"));
    }
}
