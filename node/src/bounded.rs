//! Maps keyed by peer that must not grow past a limit (identities are cheap, so anything a
//! remote peer can add an entry to is bounded). Pure helpers, no I/O.

use std::collections::HashMap;
use std::hash::Hash;

/// Makes room in `map` for `key` before an insert: when `key` is absent and `map` already holds
/// `max` entries or more, removes the entry whose value has the lowest `rank` (the oldest, the
/// least recent). An entry already present is left alone (the insert replaces it).
pub fn make_room<K, V, R>(map: &mut HashMap<K, V>, key: &K, max: usize, rank: impl Fn(&V) -> R)
where
    K: Eq + Hash + Copy,
    R: Ord,
{
    if map.len() < max || map.contains_key(key) {
        return;
    }
    if let Some(lowest) = map.iter().min_by_key(|(_, v)| rank(v)).map(|(k, _)| *k) {
        map.remove(&lowest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_map_forgets_its_lowest_entry_for_a_new_key_only() {
        let mut map: HashMap<u32, u64> = [(1, 30), (2, 10), (3, 20)].into();
        make_room(&mut map, &2, 3, |v| *v);
        assert_eq!(map.len(), 3, "a key present needs no room");
        make_room(&mut map, &4, 3, |v| *v);
        assert_eq!(
            map.keys()
                .copied()
                .collect::<std::collections::BTreeSet<_>>(),
            [1, 3].into()
        );
        make_room(&mut map, &5, 3, |v| *v);
        assert_eq!(map.len(), 2, "below the limit nothing goes");
    }
}
