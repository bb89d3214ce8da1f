//! Data sets: the bundled UCI digits set, MNIST IDX files, and UTF-8 text; deterministic
//! train/test splits; shards of the training set for each peer.
//!
//! * **Digits** (bundled, `models/data/digits.csv.gz`, CC BY 4.0, Alpaydin & Kaynak 1998):
//!   1797 8x8 images with 64 features in 0..=16 (divided by 16 here) and a label 0..=9. The
//!   split shuffles with the run's seed and holds out `test_fraction` for testing.
//! * **MNIST**: `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`
//!   and `t10k-labels-idx1-ubyte` in a directory (each may end in `.gz`); pixels divided by
//!   255; the official train/test split.
//! * **Text**: a UTF-8 file read as characters of the run's vocabulary (unknown characters map
//!   to index 0); the last `test_fraction` of the text is the test split (held out: never
//!   trained on).
//! * **Austen** (bundled, `models/data/austen.txt.gz`, public domain): Jane Austen's six novels,
//!   4,025,034 bytes of English text, 81 distinct characters, read as text.
//!
//! Shards: `iid` cuts a seeded shuffle of the training set into equal parts; `by-label` sorts
//! it by label first, so that each part holds only a few labels. Text shards are contiguous
//! parts of the training text. Every node uses the full test split.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::spec::{DatasetSpec, Partition, RunSpec, MAX_VOCAB};
use crate::{Error, Result};

/// The bundled digits set, gzipped CSV.
const DIGITS_CSV_GZ: &[u8] = include_bytes!("../data/digits.csv.gz");

/// The bundled Austen corpus, gzipped UTF-8 text.
const AUSTEN_TXT_GZ: &[u8] = include_bytes!("../data/austen.txt.gz");

/// Largest data file read (text or IDX, after decompression).
pub const MAX_DATA_BYTES: u64 = 2 << 30;

/// Labelled samples: `labels.len()` rows of `dim` features each.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Labeled {
    /// Row-major features.
    pub features: Vec<f32>,
    /// One label per row.
    pub labels: Vec<u32>,
    /// Features per row.
    pub dim: usize,
}

impl Labeled {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Features of sample `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.features[i * self.dim..(i + 1) * self.dim]
    }

    /// The samples at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Self {
        let mut features = Vec::with_capacity(indices.len() * self.dim);
        indices
            .iter()
            .for_each(|i| features.extend_from_slice(self.row(*i)));
        Self {
            features,
            labels: indices.iter().map(|i| self.labels[*i]).collect(),
            dim: self.dim,
        }
    }

    /// Distinct labels present.
    pub fn label_set(&self) -> Vec<u32> {
        let mut set: Vec<u32> = self.labels.clone();
        set.sort_unstable();
        set.dedup();
        set
    }
}

/// A character vocabulary: index 0 is "unknown", then the characters in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vocab {
    chars: Vec<char>,
    index: BTreeMap<char, u32>,
}

impl Vocab {
    /// The vocabulary whose characters (from index 1) are those of `chars`, in order.
    pub fn new(chars: &str) -> Self {
        let chars: Vec<char> = chars.chars().collect();
        let index = chars
            .iter()
            .enumerate()
            .map(|(i, c)| (*c, i as u32 + 1))
            .collect();
        Self { chars, index }
    }

    /// The most frequent characters of `text` (at most [`MAX_VOCAB`]), sorted.
    pub fn from_text(text: &str) -> Self {
        let mut counts: BTreeMap<char, u64> = BTreeMap::new();
        text.chars()
            .for_each(|c| *counts.entry(c).or_insert(0) += 1);
        let mut by_count: Vec<(char, u64)> = counts.into_iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        by_count.truncate(MAX_VOCAB);
        let mut chars: Vec<char> = by_count.into_iter().map(|(c, _)| c).collect();
        chars.sort_unstable();
        Self::new(&chars.into_iter().collect::<String>())
    }

    /// Number of token ids (characters plus "unknown").
    pub fn size(&self) -> usize {
        self.chars.len() + 1
    }

    /// The characters, in index order from 1.
    pub fn chars(&self) -> String {
        self.chars.iter().collect()
    }

    /// Token ids of `text`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        text.chars()
            .map(|c| self.index.get(&c).copied().unwrap_or(0))
            .collect()
    }

    /// Text of token ids (unknown ids become U+FFFD).
    pub fn decode(&self, tokens: &[u32]) -> String {
        tokens
            .iter()
            .map(|t| {
                (*t as usize)
                    .checked_sub(1)
                    .and_then(|i| self.chars.get(i))
                    .copied()
                    .unwrap_or('\u{fffd}')
            })
            .collect()
    }
}

/// A data set split into training and test parts.
#[derive(Debug, Clone, PartialEq)]
pub enum Dataset {
    /// Labelled samples (digits, MNIST).
    Labeled {
        /// Training samples (one shard of them, after [`Dataset::shard`]).
        train: Labeled,
        /// Test samples (always the full test split).
        test: Labeled,
        /// Number of classes.
        classes: usize,
    },
    /// Character tokens (text).
    Text {
        /// Training tokens.
        train: Vec<u32>,
        /// Test tokens.
        test: Vec<u32>,
        /// Vocabulary size (ids are below it).
        vocab_size: usize,
    },
}

impl Dataset {
    /// Loads the data set a spec names (or `data_path` instead of the spec's path) and splits
    /// it into training and test parts.
    pub fn load(spec: &RunSpec, data_path: Option<&Path>) -> Result<Self> {
        let source = match data_path {
            Some(p) => spec.dataset.with_path(p)?,
            None => spec.dataset.clone(),
        };
        match source {
            DatasetSpec::Digits => {
                let all = digits()?;
                let (train, test) = split(&all, spec.test_fraction, spec.seed);
                Ok(Self::Labeled {
                    train,
                    test,
                    classes: 10,
                })
            }
            DatasetSpec::Mnist(dir) => {
                let (train, test) = mnist(&dir)?;
                Ok(Self::Labeled {
                    train,
                    test,
                    classes: 10,
                })
            }
            DatasetSpec::Text(_) | DatasetSpec::Austen => {
                let text = source.read_text()?;
                let vocab = Vocab::new(&spec.transformer.vocab);
                let tokens = vocab.encode(&text);
                let context = spec.transformer.context;
                let cut = ((tokens.len() as f64) * (1.0 - spec.test_fraction)) as usize;
                let (train, test) = tokens.split_at(cut);
                if train.len() <= context || test.len() <= context {
                    return Err(Error::Data(format!(
                        "{source} is too short: both the training and the test part must be longer than the context of {context} characters"
                    )));
                }
                Ok(Self::Text {
                    train: train.to_vec(),
                    test: test.to_vec(),
                    vocab_size: vocab.size(),
                })
            }
        }
    }

    /// Keeps shard `index` of `count` of the training set (the test set stays whole).
    pub fn shard(self, index: u32, count: u32, partition: Partition, seed: u64) -> Result<Self> {
        if count == 0 || index >= count {
            return Err(Error::Data(format!(
                "shard {index}/{count} does not exist; expected I/N with 0 <= I < N"
            )));
        }
        let part = |len: usize| {
            let (i, n) = (index as usize, count as usize);
            (len * i / n)..(len * (i + 1) / n)
        };
        match self {
            Self::Labeled {
                train,
                test,
                classes,
            } => {
                let mut order: Vec<usize> = (0..train.len()).collect();
                order.shuffle(&mut StdRng::seed_from_u64(seed.wrapping_add(1)));
                if partition == Partition::ByLabel {
                    order.sort_by_key(|i| train.labels[*i]); // stable: shuffled within a label
                }
                let mine = &order[part(order.len())];
                if mine.is_empty() {
                    return Err(Error::Data(format!(
                        "shard {index}/{count} of {} training samples is empty; use fewer shards",
                        train.len()
                    )));
                }
                Ok(Self::Labeled {
                    train: train.select(mine),
                    test,
                    classes,
                })
            }
            Self::Text {
                train,
                test,
                vocab_size,
            } => {
                let mine = train[part(train.len())].to_vec();
                Ok(Self::Text {
                    train: mine,
                    test,
                    vocab_size,
                })
            }
        }
    }

    /// Number of training samples (labelled) or tokens (text).
    pub fn train_len(&self) -> usize {
        match self {
            Self::Labeled { train, .. } => train.len(),
            Self::Text { train, .. } => train.len(),
        }
    }
}

/// The bundled Austen corpus as text.
pub fn austen() -> Result<String> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(AUSTEN_TXT_GZ)
        .read_to_string(&mut text)
        .map_err(|e| Error::Data(format!("the bundled austen corpus is damaged: {e}")))?;
    Ok(text)
}

impl DatasetSpec {
    /// The text of a text data set (an error for the others).
    pub fn read_text(&self) -> Result<String> {
        match self {
            DatasetSpec::Text(path) => read_text(path),
            DatasetSpec::Austen => austen(),
            other => Err(Error::Data(format!("{other} is not a text data set"))),
        }
    }
}

/// The bundled digits set, all 1797 samples, features divided by 16.
pub fn digits() -> Result<Labeled> {
    let mut csv = String::new();
    flate2::read::GzDecoder::new(DIGITS_CSV_GZ)
        .read_to_string(&mut csv)
        .map_err(|e| Error::Data(format!("bundled digits set is unreadable: {e}")))?;
    parse_digits_csv(&csv)
}

/// Parses digits CSV rows: 64 values in 0..=16, then the label.
pub fn parse_digits_csv(csv: &str) -> Result<Labeled> {
    let mut out = Labeled {
        dim: 64,
        ..Labeled::default()
    };
    for (n, line) in csv
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let values: Vec<u32> = line
            .split(',')
            .map(|v| v.trim().parse::<u32>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::Data(format!("digits line {}: {e}", n + 1)))?;
        if values.len() != 65 || values[..64].iter().any(|v| *v > 16) || values[64] > 9 {
            return Err(Error::Data(format!(
                "digits line {}: expected 64 values in 0..=16 and a label 0..=9",
                n + 1
            )));
        }
        out.features
            .extend(values[..64].iter().map(|v| *v as f32 / 16.0));
        out.labels.push(values[64]);
    }
    Ok(out)
}

/// A seeded shuffle of `all`, the first `test_fraction` of it held out for testing.
pub fn split(all: &Labeled, test_fraction: f64, seed: u64) -> (Labeled, Labeled) {
    let mut order: Vec<usize> = (0..all.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    let n_test = ((all.len() as f64) * test_fraction).round() as usize;
    let (test, train) = order.split_at(n_test.min(all.len()));
    (all.select(train), all.select(test))
}

/// MNIST from the four IDX files in `dir`: (train, test).
pub fn mnist(dir: &Path) -> Result<(Labeled, Labeled)> {
    let load = |prefix: &str| -> Result<Labeled> {
        let images = read_idx_file(dir, &format!("{prefix}-images-idx3-ubyte"))?;
        let labels = read_idx_file(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
        parse_idx_pair(&images, &labels)
            .map_err(|e| Error::Data(format!("MNIST {prefix} files in {}: {e}", dir.display())))
    };
    Ok((load("train")?, load("t10k")?))
}

/// Parses an IDX image file (magic 2051, n x rows x cols bytes) and label file (magic 2049,
/// n labels 0..=9), pixels divided by 255.
pub fn parse_idx_pair(images: &[u8], labels: &[u8]) -> std::result::Result<Labeled, String> {
    let be = |b: &[u8], at: usize| -> std::result::Result<usize, String> {
        b.get(at..at + 4)
            .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize)
            .ok_or_else(|| "file too short for its header".to_string())
    };
    if be(images, 0)? != 0x0803 {
        return Err("the image file is not IDX3 (magic 2051)".into());
    }
    if be(labels, 0)? != 0x0801 {
        return Err("the label file is not IDX1 (magic 2049)".into());
    }
    let (n, rows, cols) = (be(images, 4)?, be(images, 8)?, be(images, 12)?);
    let dim = rows.checked_mul(cols).ok_or("image size overflows")?;
    if dim != 28 * 28 {
        return Err(format!("images are {rows}x{cols}, not 28x28"));
    }
    if be(labels, 4)? != n {
        return Err(format!("{n} images but {} labels", be(labels, 4)?));
    }
    let pixels = images
        .get(16..)
        .filter(|p| p.len() == n * dim)
        .ok_or("the image file's length does not match its header")?;
    let label_bytes = labels
        .get(8..)
        .filter(|l| l.len() == n)
        .ok_or("the label file's length does not match its header")?;
    if label_bytes.iter().any(|l| *l > 9) {
        return Err("a label is not a digit 0..=9".into());
    }
    Ok(Labeled {
        features: pixels.iter().map(|p| f32::from(*p) / 255.0).collect(),
        labels: label_bytes.iter().map(|l| u32::from(*l)).collect(),
        dim,
    })
}

/// Reads `dir/name`, or `dir/name.gz` decompressed, up to [`MAX_DATA_BYTES`].
fn read_idx_file(dir: &Path, name: &str) -> Result<Vec<u8>> {
    let plain = dir.join(name);
    let gz = dir.join(format!("{name}.gz"));
    let dotted = dir.join(name.replacen("-idx", ".idx", 1));
    let (path, zipped) = [(plain, false), (dotted, false), (gz, true)]
        .into_iter()
        .find(|(p, _)| p.is_file())
        .ok_or_else(|| Error::Data(format!("no {name} (or {name}.gz) in {}", dir.display())))?;
    let file = std::fs::File::open(&path)
        .map_err(|e| Error::Data(format!("cannot read {}: {e}", path.display())))?;
    let mut bytes = Vec::new();
    let limit = MAX_DATA_BYTES + 1;
    let read = if zipped {
        flate2::read::GzDecoder::new(file)
            .take(limit)
            .read_to_end(&mut bytes)
    } else {
        file.take(limit).read_to_end(&mut bytes)
    };
    read.map_err(|e| Error::Data(format!("cannot read {}: {e}", path.display())))?;
    if bytes.len() as u64 > MAX_DATA_BYTES {
        return Err(Error::Data(format!(
            "{} is larger than 2 GiB",
            path.display()
        )));
    }
    Ok(bytes)
}

/// Reads a UTF-8 text file of at most [`MAX_DATA_BYTES`].
pub fn read_text(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::Data(format!("cannot read {}: {e}", path.display())))?;
    if meta.len() > MAX_DATA_BYTES {
        return Err(Error::Data(format!(
            "{} is larger than 2 GiB",
            path.display()
        )));
    }
    let bytes = std::fs::read(path)
        .map_err(|e| Error::Data(format!("cannot read {}: {e}", path.display())))?;
    String::from_utf8(bytes)
        .map_err(|e| Error::Data(format!("{} is not UTF-8 text ({e})", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> RunSpec {
        RunSpec::parse(text).unwrap()
    }

    #[test]
    fn the_bundled_austen_corpus_loads_with_a_held_out_tail() {
        let text = austen().unwrap();
        assert_eq!(text.len(), 4_025_034);
        assert!(text.starts_with("SENSE AND SENSIBILITY"));
        let vocab = Vocab::from_text(&text);
        assert_eq!(vocab.size(), 82, "81 characters and the unknown id");
        let mut spec = spec("model = \"char-transformer\"\ndataset = \"austen\"");
        spec.transformer.vocab = vocab.chars();
        let Dataset::Text { train, test, .. } = Dataset::load(&spec, None).unwrap() else {
            panic!("austen is text");
        };
        // The last fifth is held out: the end of the text, never trained on.
        assert_eq!(train.len() + test.len(), text.chars().count());
        assert!((test.len() as f64 / text.chars().count() as f64 - 0.2).abs() < 1e-3);
        assert_eq!(
            vocab.decode(&test[test.len() - 20..]),
            text.chars()
                .skip(text.chars().count() - 20)
                .collect::<String>()
        );
        assert!(Dataset::load(&spec, Some(Path::new("x.txt"))).is_err());
    }

    #[test]
    fn bundled_digits_load_and_split_deterministically() {
        let all = digits().unwrap();
        assert_eq!((all.len(), all.dim), (1797, 64));
        assert!(all.features.iter().all(|v| (0.0..=1.0).contains(v)));
        assert_eq!(all.label_set(), (0..10).collect::<Vec<_>>());
        let (train, test) = split(&all, 0.2, 7);
        assert_eq!((train.len(), test.len()), (1438, 359));
        assert_eq!(split(&all, 0.2, 7), (train, test), "same seed, same split");
    }

    #[test]
    fn by_label_shards_are_disjoint_and_see_few_labels() {
        let s = spec("model = \"digits-mlp\"\ndataset = \"digits\"");
        let full = Dataset::load(&s, None).unwrap();
        let mut seen = 0;
        for i in 0..4 {
            let shard = full.clone().shard(i, 4, Partition::ByLabel, 1).unwrap();
            let Dataset::Labeled { train, test, .. } = shard else {
                panic!("labelled")
            };
            assert!(train.label_set().len() <= 4, "{:?}", train.label_set());
            assert_eq!(test.len(), 359, "the test split stays whole");
            seen += train.len();
        }
        assert_eq!(seen, full.train_len(), "shards cover the training set once");
        let iid = full.clone().shard(0, 4, Partition::Iid, 1).unwrap();
        let Dataset::Labeled { train, .. } = iid else {
            panic!("labelled")
        };
        assert_eq!(train.label_set().len(), 10, "an iid shard sees every label");
        assert!(full.shard(4, 4, Partition::Iid, 1).is_err());
    }

    #[test]
    fn vocab_round_trips_and_maps_unknowns_to_zero() {
        let v = Vocab::from_text("hello world");
        assert_eq!(v.chars(), " dehlorw");
        assert_eq!(v.size(), 9);
        let ids = v.encode("hold!");
        assert_eq!(ids[4], 0);
        assert_eq!(v.decode(&ids), "hold\u{fffd}");
    }

    #[test]
    fn idx_files_are_checked() {
        let mut images = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28];
        images.extend(vec![255u8; 2 * 784]);
        let labels = vec![0, 0, 8, 1, 0, 0, 0, 2, 3, 9];
        let set = parse_idx_pair(&images, &labels).unwrap();
        assert_eq!((set.len(), set.dim), (2, 784));
        assert_eq!(set.labels, vec![3, 9]);
        assert_eq!(set.features[0], 1.0);
        assert!(parse_idx_pair(&images[..100], &labels).is_err());
        assert!(parse_idx_pair(&labels, &images)
            .unwrap_err()
            .contains("IDX3"));
        let mut bad_label = labels.clone();
        bad_label[9] = 10;
        assert!(parse_idx_pair(&images, &bad_label).is_err());
    }

    #[test]
    fn a_missing_or_binary_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = mnist(dir.path()).unwrap_err().to_string();
        assert!(e.contains("train-images-idx3-ubyte"), "{e}");
        let bin = dir.path().join("x.txt");
        std::fs::write(&bin, [0xff, 0xfe, 0x00]).unwrap();
        assert!(read_text(&bin).unwrap_err().to_string().contains("UTF-8"));
    }
}
