//! Object ids as CRIU numbers them: each kind of kernel object (fd table, mm, fs, sighand,
//! namespace, open file) gets small integers from its own counter, starting at 1, and objects
//! found to be the same get the same id.

/// A counter handing out ids for one kind of object, keyed by whatever identifies it.
#[derive(Debug)]
pub struct IdTable<K> {
    known: Vec<(K, u32)>,
    next: u32,
}

impl<K: PartialEq> Default for IdTable<K> {
    fn default() -> Self {
        IdTable {
            known: Vec::new(),
            next: 1,
        }
    }
}

impl<K: PartialEq> IdTable<K> {
    /// The id of `key`, and whether it was new.
    pub fn get_or_insert(&mut self, key: K) -> (u32, bool) {
        if let Some((_, id)) = self.known.iter().find(|(k, _)| *k == key) {
            return (*id, false);
        }
        let id = self.next;
        self.next += 1;
        self.known.push((key, id));
        (id, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_same_id_and_counting_starts_at_one() {
        let mut table = IdTable::default();
        assert_eq!(table.get_or_insert(10u64), (1, true));
        assert_eq!(table.get_or_insert(20u64), (2, true));
        assert_eq!(table.get_or_insert(10u64), (1, false));
    }
}
