//! Reading the index of a [safetensors](https://huggingface.co/docs/safetensors) file without
//! loading its data: an 8-byte little-endian header length `N`, `N` bytes of JSON mapping each
//! tensor name to `{dtype, shape, data_offsets: [begin, end]}` (relative to the end of the
//! header), optionally `__metadata__`, then the tensor bytes.
//!
//! [`parse_index`] checks what a reader would rely on: known dtypes, sizes that match shapes,
//! offsets inside the file, no overlaps and no gaps.

use serde::{Deserialize, Serialize};

/// Largest safetensors JSON header accepted (the reference implementation's limit).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor of a safetensors file, with absolute byte offsets into the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// Tensor name, e.g. `fc1.weight`.
    pub name: String,
    /// Element type as safetensors names it (`F32`, `BF16`, ...).
    pub dtype: String,
    /// Shape.
    pub shape: Vec<u64>,
    /// First byte of the tensor's data in the file.
    pub start: u64,
    /// One past its last byte.
    pub end: u64,
}

/// Size in bytes of one element of `dtype`, or `None` for an unknown dtype.
pub fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

/// The JSON header's length from the file's first 8 bytes, checked against the file size.
pub fn header_len(first_bytes: &[u8], file_size: u64) -> Result<u64, String> {
    let prefix: [u8; 8] = first_bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or("not a safetensors file: shorter than 8 bytes")?;
    let len = u64::from_le_bytes(prefix);
    if len > MAX_HEADER_BYTES || len.saturating_add(8) > file_size {
        return Err(format!(
            "not a safetensors file: header length {len} does not fit a {file_size}-byte file"
        ));
    }
    Ok(len)
}

#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// Parses the JSON header (`header` is the `N` bytes after the length prefix) of a file of
/// `file_size` bytes and returns its tensors sorted by offset.
pub fn parse_index(header: &[u8], file_size: u64) -> Result<Vec<TensorEntry>, String> {
    let bad = |m: String| Err(format!("not a valid safetensors file: {m}"));
    let map: serde_json::Map<String, serde_json::Value> = match serde_json::from_slice(header) {
        Ok(m) => m,
        Err(e) => return bad(format!("header is not a JSON object ({e})")),
    };
    let data_start = 8 + header.len() as u64;
    let data_len = file_size.saturating_sub(data_start);
    let mut tensors = Vec::with_capacity(map.len());
    for (name, value) in map {
        if name == "__metadata__" {
            continue;
        }
        let raw: RawEntry = match serde_json::from_value(value) {
            Ok(r) => r,
            Err(e) => return bad(format!("tensor '{name}': {e}")),
        };
        let Some(size) = dtype_size(&raw.dtype) else {
            return bad(format!("tensor '{name}' has unknown dtype {}", raw.dtype));
        };
        let elements = raw
            .shape
            .iter()
            .try_fold(1u64, |acc, d| acc.checked_mul(*d))
            .and_then(|n| n.checked_mul(size));
        let [begin, end] = raw.data_offsets;
        if begin > end || end > data_len || elements != Some(end - begin) {
            return bad(format!(
                "tensor '{name}' ({} {:?}) has data offsets {begin}..{end} that do not match \
                 its shape or the file",
                raw.dtype, raw.shape
            ));
        }
        tensors.push(TensorEntry {
            name,
            dtype: raw.dtype,
            shape: raw.shape,
            start: data_start + begin,
            end: data_start + end,
        });
    }
    tensors.sort_by_key(|t| (t.start, t.end));
    let mut cursor = data_start;
    for t in &tensors {
        if t.start != cursor {
            return bad(format!(
                "tensor '{}' overlaps another or leaves a gap",
                t.name
            ));
        }
        cursor = t.end;
    }
    if cursor != file_size {
        return bad(format!(
            "{} bytes after the last tensor",
            file_size.saturating_sub(cursor)
        ));
    }
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file with an F32 [2,2] and a U8 [3] tensor.
    fn sample() -> Vec<u8> {
        let header = br#"{"__metadata__":{"k":"v"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"U8","shape":[3],"data_offsets":[16,19]}}"#;
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header);
        file.extend_from_slice(&[7; 19]);
        file
    }

    fn parse(file: &[u8]) -> Result<Vec<TensorEntry>, String> {
        let n = header_len(file, file.len() as u64)? as usize;
        parse_index(&file[8..8 + n], file.len() as u64)
    }

    #[test]
    fn a_well_formed_file_yields_absolute_offsets() {
        let file = sample();
        let tensors = parse(&file).unwrap();
        let data_start = file.len() as u64 - 19;
        assert_eq!(tensors.len(), 2);
        assert_eq!(tensors[0].name, "a");
        assert_eq!(tensors[0].start, data_start);
        assert_eq!(tensors[1].end, file.len() as u64);
    }

    #[test]
    fn malformed_files_are_refused() {
        assert!(parse(b"abc").is_err());
        assert!(parse(&[0xff; 64]).is_err());
        let mut truncated = sample();
        truncated.pop();
        assert!(parse(&truncated).is_err());
        let mut extra = sample();
        extra.push(0);
        assert!(parse(&extra).is_err());
        let text = b"hello world, not a model at all".to_vec();
        assert!(parse(&text).is_err());
    }
}
