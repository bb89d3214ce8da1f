//! Reading the index of a [safetensors](https://huggingface.co/docs/safetensors) file without
//! loading its data: an 8-byte little-endian header length `N`, `N` bytes of JSON mapping each
//! tensor name to `{dtype, shape, data_offsets: [begin, end]}` (relative to the end of the
//! header), optionally `__metadata__` (a map of strings to strings), then the tensor bytes.
//!
//! The header is parsed and validated by the reference implementation itself (the
//! `safetensors` crate's [`Metadata`], the code behind `SafeTensors::deserialize`), so the set
//! of files accepted here is exactly the set the reference reader opens: UTF-8 JSON, a string
//! map as `__metadata__`, known dtypes, offsets that start at 0 and leave no gap or overlap,
//! sizes that match shapes, and data that ends exactly at the end of the file. The only
//! difference is that this module never needs the tensor bytes: it works on the header and the
//! file's size, so callers can check a file of any size before copying it.

use std::collections::HashMap;

use ::safetensors::tensor::Metadata;
use serde::{Deserialize, Serialize};

/// Largest safetensors JSON header accepted: the reference implementation's limit (100 MB).
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

/// The parsed header of a safetensors file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Tensors sorted by offset.
    pub tensors: Vec<TensorEntry>,
    /// The `__metadata__` map, if the file has one.
    pub metadata: Option<HashMap<String, String>>,
}

/// Why a file is not a safetensors file the reference reader opens.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SafetensorsError {
    /// Fewer than the 8 bytes of the length prefix.
    #[error("not a safetensors file: shorter than 8 bytes")]
    TooShort,
    /// The length prefix is larger than the file or than the reference reader's limit.
    #[error(
        "not a safetensors file: header length {len} does not fit a {file_size}-byte file \
         (at most {MAX_HEADER_BYTES} bytes of header)"
    )]
    HeaderLength {
        /// The length the prefix claims.
        len: u64,
        /// The file's size.
        file_size: u64,
    },
    /// The header is not valid UTF-8.
    #[error("not a valid safetensors file: the header is not UTF-8 text")]
    NotUtf8,
    /// The reference reader refuses the header (its message).
    #[error("not a valid safetensors file: {0}")]
    Invalid(String),
    /// The tensors' data does not end exactly at the end of the file.
    #[error(
        "not a valid safetensors file: the header describes {described} bytes of tensor data \
         but the file holds {actual}"
    )]
    DataSize {
        /// Bytes of data the header describes.
        described: u64,
        /// Bytes after the header.
        actual: u64,
    },
}

/// The JSON header's length from the file's first 8 bytes, checked against the file size and
/// [`MAX_HEADER_BYTES`].
pub fn header_len(first_bytes: &[u8], file_size: u64) -> Result<u64, SafetensorsError> {
    let prefix: [u8; 8] = first_bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or(SafetensorsError::TooShort)?;
    let len = u64::from_le_bytes(prefix);
    if len > MAX_HEADER_BYTES || len.saturating_add(8) > file_size {
        return Err(SafetensorsError::HeaderLength { len, file_size });
    }
    Ok(len)
}

/// Parses the JSON header (`header` is the `N` bytes after the length prefix) of a file of
/// `file_size` bytes with the reference implementation and returns its tensors (sorted by
/// offset, then name; with absolute offsets) and metadata.
pub fn parse_header(header: &[u8], file_size: u64) -> Result<Header, SafetensorsError> {
    let text = std::str::from_utf8(header).map_err(|_| SafetensorsError::NotUtf8)?;
    let metadata: Metadata =
        serde_json::from_str(text).map_err(|e| SafetensorsError::Invalid(e.to_string()))?;
    let data_start = 8 + header.len() as u64;
    let described = metadata.data_len() as u64;
    let actual = file_size.saturating_sub(data_start);
    if described != actual {
        return Err(SafetensorsError::DataSize { described, actual });
    }
    let infos = metadata.tensors();
    let mut tensors: Vec<TensorEntry> = metadata
        .offset_keys()
        .into_iter()
        .filter_map(|name| {
            let info = infos.get(&name)?;
            let (begin, end) = info.data_offsets;
            Some(TensorEntry {
                dtype: info.dtype.to_string(),
                shape: info.shape.iter().map(|d| *d as u64).collect(),
                start: data_start + begin as u64,
                end: data_start + end as u64,
                name,
            })
        })
        .collect();
    // Empty tensors share an offset, and the reference reader orders those as its hash map
    // does (differently from run to run): the name breaks the tie, so that the same file
    // always gives the same index (and the same version id).
    tensors.sort_by(|a, b| (a.start, a.end, &a.name).cmp(&(b.start, b.end, &b.name)));
    Ok(Header {
        tensors,
        metadata: metadata.metadata().clone(),
    })
}

/// Parses a whole file held in memory (for tests and small files): prefix, header, sizes.
pub fn parse_file(file: &[u8]) -> Result<Header, SafetensorsError> {
    let size = file.len() as u64;
    let n = header_len(file, size)? as usize;
    parse_header(&file[8..8 + n], size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::safetensors::SafeTensors;
    use proptest::prelude::*;

    fn file_of(header: &str, data_len: usize) -> Vec<u8> {
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header.as_bytes());
        file.extend(std::iter::repeat_n(7u8, data_len));
        file
    }

    /// A file with an F32 [2,2] and a U8 [3] tensor.
    fn sample() -> Vec<u8> {
        file_of(
            r#"{"__metadata__":{"k":"v"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"U8","shape":[3],"data_offsets":[16,19]}}"#,
            19,
        )
    }

    fn reference_accepts(file: &[u8]) -> bool {
        SafeTensors::deserialize(file).is_ok()
    }

    #[test]
    fn a_well_formed_file_yields_absolute_offsets_and_metadata() {
        let file = sample();
        let header = parse_file(&file).unwrap();
        let data_start = file.len() as u64 - 19;
        assert_eq!(header.tensors.len(), 2);
        assert_eq!(header.tensors[0].name, "a");
        assert_eq!(header.tensors[0].dtype, "F32");
        assert_eq!(header.tensors[0].start, data_start);
        assert_eq!(header.tensors[1].end, file.len() as u64);
        assert_eq!(header.metadata.unwrap()["k"], "v");
    }

    #[test]
    fn malformed_files_are_refused() {
        assert!(parse_file(b"abc").is_err());
        assert!(parse_file(&[0xff; 64]).is_err());
        let mut truncated = sample();
        truncated.pop();
        assert!(parse_file(&truncated).is_err());
        let mut extra = sample();
        extra.push(0);
        assert!(parse_file(&extra).is_err());
        assert!(parse_file(b"hello world, not a model at all").is_err());
    }

    /// Metadata that is not a map of strings: the reference reader refuses these files, so
    /// publishing them would hand fetchers something they cannot open.
    #[test]
    fn metadata_that_is_not_a_string_map_is_refused_as_the_reference_reader_does() {
        for metadata in [
            r#"{"step":0}"#,
            r#"{"k":{"nested":"v"}}"#,
            r#"{"k":["a","b"]}"#,
            r#"{"k":null}"#,
            r#"["k","v"]"#,
        ] {
            let header = format!(
                r#"{{"__metadata__":{metadata},"a":{{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}}}"#
            );
            let file = file_of(&header, 2);
            assert!(!reference_accepts(&file), "{metadata}");
            let err = parse_file(&file).unwrap_err();
            assert!(
                matches!(err, SafetensorsError::Invalid(_)),
                "{metadata}: {err}"
            );
        }
    }

    #[test]
    fn dtypes_the_reference_reader_knows_are_accepted() {
        for (dtype, bytes) in [("F8_E8M0", 4), ("C64", 32), ("F4", 2), ("BF16", 8)] {
            let header =
                format!(r#"{{"t":{{"dtype":"{dtype}","shape":[4],"data_offsets":[0,{bytes}]}}}}"#);
            let file = file_of(&header, bytes);
            assert!(reference_accepts(&file), "{dtype}");
            assert_eq!(parse_file(&file).unwrap().tensors[0].dtype, dtype);
        }
    }

    /// Empty tensors share an offset: the index must not depend on hash-map order.
    #[test]
    fn tensors_at_one_offset_always_come_in_the_same_order() {
        let header = r#"{"b":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"c":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"d":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#;
        let file = file_of(header, 2);
        let first = parse_file(&file).unwrap();
        let names: Vec<&str> = first.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "d"]);
        for _ in 0..50 {
            assert_eq!(parse_file(&file).unwrap(), first);
        }
    }

    #[test]
    fn a_file_without_tensors_is_what_the_reference_reader_says() {
        for header in ["{}", r#"{"__metadata__":{"a":"b"}}"#] {
            let file = file_of(header, 0);
            assert_eq!(parse_file(&file).is_ok(), reference_accepts(&file));
            assert!(parse_file(&file).is_ok());
        }
    }

    const DTYPES: [&str; 8] = ["F32", "U8", "BF16", "F4", "C64", "F64", "BOOL", "Q4"];

    /// A header of 0-4 tensors, each written the way a careless or hostile writer might.
    fn arb_file() -> impl Strategy<Value = Vec<u8>> {
        let tensor = (
            prop::sample::select(&DTYPES[..]),
            prop::collection::vec(0usize..5, 0..3),
            -2i64..3,      // offset error added to the begin offset
            -2i64..3,      // and to the end offset
            any::<bool>(), // the name collides with the previous one
        );
        let metadata = prop_oneof![
            Just(String::new()),
            Just(r#""__metadata__":{"a":"b"},"#.to_string()),
            Just(r#""__metadata__":{"step":0},"#.to_string()),
            Just(r#""__metadata__":{},"#.to_string()),
            Just(r#""__metadata__":"x","#.to_string()),
        ];
        (
            prop::collection::vec(tensor, 0..5),
            metadata,
            -2i64..3, // extra or missing bytes at the end of the file
            any::<bool>(), // pad the header with spaces (allowed)
        )
            .prop_map(|(tensors, metadata, tail, pad)| {
                let mut entries = Vec::new();
                let mut offset = 0i64;
                for (i, (dtype, shape, e1, e2, collide)) in tensors.iter().enumerate() {
                    let elements: usize = shape.iter().product();
                    let bits = match *dtype {
                        "F32" => 32,
                        "U8" | "BOOL" => 8,
                        "BF16" => 16,
                        "F4" => 4,
                        _ => 64,
                    };
                    let size = (elements * bits).div_ceil(8) as i64;
                    let begin = offset + e1;
                    let end = offset + size + e2;
                    let name = if *collide && i > 0 { i - 1 } else { i };
                    entries.push(format!(
                        r#""t{name}":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{begin},{end}]}}"#
                    ));
                    offset += size;
                }
                let mut header = format!("{{{metadata}{}}}", entries.join(","));
                if pad {
                    header.push_str("    ");
                }
                let data = (offset + tail).max(0) as usize;
                file_of(&header, data)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The set of files accepted is the set the reference reader opens.
        #[test]
        fn accepts_a_generated_file_iff_the_reference_reader_does(file in arb_file()) {
            prop_assert_eq!(parse_file(&file).is_ok(), reference_accepts(&file));
        }

        /// The same for files mutated byte by byte (length prefix and JSON included).
        #[test]
        fn accepts_a_mutated_file_iff_the_reference_reader_does(
            position in 0usize..200,
            value in any::<u8>(),
        ) {
            let mut file = sample();
            let i = position % file.len();
            file[i] = value;
            prop_assert_eq!(parse_file(&file).is_ok(), reference_accepts(&file));
        }

        /// Any bytes at all: no panic, and the same verdict.
        #[test]
        fn arbitrary_bytes_get_the_reference_verdict(
            file in prop::collection::vec(any::<u8>(), 0..64)
        ) {
            prop_assert_eq!(parse_file(&file).is_ok(), reference_accepts(&file));
        }
    }
}
