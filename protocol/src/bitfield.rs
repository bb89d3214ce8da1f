//! [`Bitfield`]: one bit per chunk, set when the chunk is held and verified.

use serde::{Deserialize, Serialize};

/// A fixed-length set of chunk indices. On the wire: the length and a byte string, bit `i` in
/// byte `i / 8`, least significant bit first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bitfield {
    len: u32,
    #[serde(with = "serde_bytes")]
    bits: Vec<u8>,
}

impl Bitfield {
    /// An empty set over `len` chunks.
    pub fn new(len: u32) -> Self {
        Self {
            len,
            bits: vec![0; (len as usize).div_ceil(8)],
        }
    }

    /// A full set over `len` chunks.
    pub fn full(len: u32) -> Self {
        let mut b = Self::new(len);
        (0..len).for_each(|i| b.set(i));
        b
    }

    /// Rebuilds a bitfield from its parts, refusing inconsistent ones (bytes of the wrong
    /// length, or bits set past `len`).
    pub fn from_bytes(len: u32, bits: Vec<u8>) -> Option<Self> {
        let b = Self { len, bits };
        let well_formed = b.bits.len() == (len as usize).div_ceil(8)
            && (len..b.bits.len() as u32 * 8).all(|i| !b.raw_get(i));
        well_formed.then_some(b)
    }

    /// Whether the bytes agree with the length (for values decoded from the network).
    pub fn is_well_formed(&self) -> bool {
        Self::from_bytes(self.len, self.bits.clone()).is_some()
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }

    /// Number of chunks covered.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether it covers no chunk at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn raw_get(&self, i: u32) -> bool {
        self.bits
            .get(i as usize / 8)
            .is_some_and(|byte| byte & (1 << (i % 8)) != 0)
    }

    /// Whether chunk `i` is in the set (false past the end).
    pub fn get(&self, i: u32) -> bool {
        i < self.len && self.raw_get(i)
    }

    /// Adds chunk `i`; ignored past the end.
    pub fn set(&mut self, i: u32) {
        if i < self.len {
            self.bits[i as usize / 8] |= 1 << (i % 8);
        }
    }

    /// Removes chunk `i`.
    pub fn clear(&mut self, i: u32) {
        if i < self.len {
            self.bits[i as usize / 8] &= !(1 << (i % 8));
        }
    }

    /// Number of chunks in the set.
    pub fn count(&self) -> u32 {
        self.bits.iter().map(|b| b.count_ones()).sum()
    }

    /// Whether every chunk is in the set.
    pub fn is_complete(&self) -> bool {
        self.count() == self.len
    }

    /// The chunk indices in the set, ascending.
    pub fn ones(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len).filter(|i| self.raw_get(*i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_count_and_bounds() {
        let mut b = Bitfield::new(10);
        b.set(0);
        b.set(9);
        b.set(10);
        b.set(5);
        b.clear(5);
        assert!(b.get(0) && b.get(9) && !b.get(10) && !b.get(5));
        assert_eq!(b.count(), 2);
        assert_eq!(b.ones().collect::<Vec<_>>(), vec![0, 9]);
        assert!(Bitfield::full(10).is_complete());
    }

    #[test]
    fn inconsistent_wire_values_are_refused() {
        assert!(Bitfield::from_bytes(10, vec![0; 3]).is_none());
        assert!(Bitfield::from_bytes(10, vec![0, 0b100]).is_none());
        assert!(Bitfield::from_bytes(10, vec![0xff, 0b11]).is_some());
    }
}
