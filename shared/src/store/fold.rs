//! Folding writes: the mutations of one transaction, or of a run of transactions committed in
//! one store transaction, as the fewest statements with the same effect; and whether a run's
//! checks can all be read before any of its writes.
//!
//! Invariants:
//! - [`Folded`] applied as *range clears, then point clears, then sets* leaves every key as
//!   the mutations applied one by one, in order, would: a point write that a later range clear
//!   covers is dropped, a later write of a key replaces an earlier one, and a write after a
//!   range clear survives it;
//! - [`checks_independent`] is true only when no check of a transaction reads a key (or a key
//!   of a range) that an earlier transaction of the run writes; only then may every check of
//!   the run be evaluated against the state before the run and still give the verdicts that
//!   checking each transaction after the writes of the ones before it would give.

use std::collections::BTreeMap;
use std::ops::Bound;

use super::{Check, KeyRange, Mutation, Txn};

/// A run of mutations folded into three batches (see the module invariant for the order).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Folded<'m> {
    /// Ranges cleared, in the order they were cleared.
    pub ranges: Vec<&'m KeyRange>,
    /// Keys cleared after every range clear that covers them, ascending.
    pub clears: Vec<&'m [u8]>,
    /// Keys set (the last value of each) after every range clear that covers them, ascending.
    pub sets: Vec<(&'m [u8], &'m [u8])>,
}

/// Folds `mutations`, applied in order.
pub fn fold<'m>(mutations: impl IntoIterator<Item = &'m Mutation>) -> Folded<'m> {
    // The last point write of each key since the last range clear covering it.
    let mut points: BTreeMap<&'m [u8], Option<&'m [u8]>> = BTreeMap::new();
    let mut ranges = Vec::new();
    for m in mutations {
        match m {
            Mutation::Set { key, value } => {
                points.insert(key, Some(value));
            }
            Mutation::Clear { key } => {
                points.insert(key, None);
            }
            Mutation::ClearRange { range } => {
                if range.start >= range.end {
                    // Clears nothing (and is no valid BTreeMap range).
                    continue;
                }
                let covered: Vec<&[u8]> = points.range::<[u8], _>(covered_by(range)).map(|(k, _)| *k).collect();
                for key in covered {
                    points.remove(key);
                }
                ranges.push(range);
            }
        }
    }
    let mut folded = Folded { ranges, ..Folded::default() };
    for (key, value) in points {
        match value {
            Some(value) => folded.sets.push((key, value)),
            None => folded.clears.push(key),
        }
    }
    folded
}

/// The keys of `range` as bounds over byte-slice keys.
fn covered_by(range: &KeyRange) -> (Bound<&[u8]>, Bound<&[u8]>) {
    (Bound::Included(range.start.as_slice()), Bound::Excluded(range.end.as_slice()))
}

/// What the earlier transactions of a run write: point keys and cleared ranges.
#[derive(Default)]
struct Written<'t> {
    keys: std::collections::BTreeSet<&'t [u8]>,
    ranges: Vec<&'t KeyRange>,
}

impl<'t> Written<'t> {
    fn add(&mut self, txn: &'t Txn) {
        for m in &txn.mutations {
            match m {
                Mutation::Set { key, .. } | Mutation::Clear { key } => {
                    self.keys.insert(key);
                }
                Mutation::ClearRange { range } => self.ranges.push(range),
            }
        }
    }

    fn touches_key(&self, key: &[u8]) -> bool {
        self.keys.contains(key) || self.ranges.iter().any(|r| r.contains(key))
    }

    fn touches_range(&self, range: &KeyRange) -> bool {
        if range.start >= range.end {
            return false;
        }
        self.keys.range::<[u8], _>(covered_by(range)).next().is_some()
            || self.ranges.iter().any(|r| r.start < range.end && range.start < r.end)
    }
}

/// Whether every check of the run can be read before any of its writes (see the module doc).
pub fn checks_independent<'t>(run: impl IntoIterator<Item = &'t Txn>) -> bool {
    let mut written = Written::default();
    for txn in run {
        let reads_earlier_writes = txn.checks.iter().any(|c| match c {
            Check::Value { key, .. } => written.touches_key(key),
            Check::RangeDigest { range, .. } => written.touches_range(range),
        });
        if reads_earlier_writes {
            return false;
        }
        written.add(txn);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(a: &[u8], b: &[u8]) -> KeyRange {
        KeyRange::new(a, b)
    }

    /// Applies mutations one by one to a map: what folding must agree with.
    fn one_by_one(mutations: &[Mutation]) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let mut map = BTreeMap::from([(b"b".to_vec(), b"old".to_vec()), (b"q".to_vec(), b"old".to_vec())]);
        for m in mutations {
            match m {
                Mutation::Set { key, value } => {
                    map.insert(key.clone(), value.clone());
                }
                Mutation::Clear { key } => {
                    map.remove(key);
                }
                Mutation::ClearRange { range } => map.retain(|k, _| !range.contains(k)),
            }
        }
        map
    }

    fn folded_applied(mutations: &[Mutation]) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let f = fold(mutations);
        let mut map = BTreeMap::from([(b"b".to_vec(), b"old".to_vec()), (b"q".to_vec(), b"old".to_vec())]);
        for r in &f.ranges {
            map.retain(|k, _| !r.contains(k));
        }
        for k in &f.clears {
            map.remove(*k);
        }
        for (k, v) in &f.sets {
            map.insert(k.to_vec(), v.to_vec());
        }
        map
    }

    fn set(k: &[u8], v: &[u8]) -> Mutation {
        Mutation::Set { key: k.to_vec(), value: v.to_vec() }
    }

    fn clear(k: &[u8]) -> Mutation {
        Mutation::Clear { key: k.to_vec() }
    }

    fn clear_range(a: &[u8], b: &[u8]) -> Mutation {
        Mutation::ClearRange { range: range(a, b) }
    }

    #[test]
    fn folding_gives_what_applying_one_by_one_gives() {
        let cases: Vec<Vec<Mutation>> = vec![
            // A write after a range clear survives it; one before it does not.
            vec![set(b"c", b"1"), clear_range(b"a", b"m"), set(b"d", b"2")],
            // The last write of a key wins, a clear after a set included.
            vec![set(b"x", b"1"), set(b"x", b"2"), set(b"y", b"1"), clear(b"y")],
            vec![clear(b"z"), set(b"z", b"3")],
            // A point clear a range clear covers is the range's.
            vec![clear(b"c"), clear_range(b"a", b"m"), set(b"q", b"new")],
            // An empty range clears nothing.
            vec![set(b"c", b"1"), clear_range(b"m", b"a"), clear_range(b"c", b"c")],
            // Two transactions' writes in a row, the second clearing a range the first wrote.
            vec![set(b"b", b"t1"), set(b"r", b"t1"), clear_range(b"a", b"c"), set(b"s", b"t2")],
        ];
        for mutations in cases {
            assert_eq!(folded_applied(&mutations), one_by_one(&mutations), "{mutations:?}");
        }
    }

    #[test]
    fn folded_points_are_unique_and_ascending() {
        let m = [set(b"b", b"1"), set(b"a", b"1"), set(b"b", b"2"), clear(b"d"), clear(b"c"), clear(b"d")];
        let f = fold(&m);
        assert_eq!(f.sets, vec![(&b"a"[..], &b"1"[..]), (&b"b"[..], &b"2"[..])]);
        assert_eq!(f.clears, vec![&b"c"[..], &b"d"[..]]);
        assert!(f.ranges.is_empty());
    }

    fn txn(checks: &[Check], mutations: &[Mutation]) -> Txn {
        Txn { checks: checks.to_vec(), mutations: mutations.to_vec() }
    }

    fn value(k: &[u8]) -> Check {
        Check::Value { key: k.to_vec(), expected: None }
    }

    fn digest(a: &[u8], b: &[u8]) -> Check {
        Check::RangeDigest { range: range(a, b), expected: 0 }
    }

    #[test]
    fn transactions_of_different_keys_are_independent() {
        let run = [
            txn(&[value(b"a/meta"), digest(b"a/0", b"a/9")], &[set(b"a/meta", b"1"), clear_range(b"a/p0", b"a/p9")]),
            txn(&[value(b"b/meta"), digest(b"b/0", b"b/9")], &[set(b"b/meta", b"1"), clear(b"b/lease")]),
        ];
        assert!(checks_independent(&run));
    }

    #[test]
    fn a_check_reading_an_earlier_write_makes_the_run_dependent() {
        let first = txn(&[], &[set(b"k", b"1"), clear_range(b"r0", b"r5")]);
        for later in [value(b"k"), value(b"r3"), digest(b"j", b"l"), digest(b"r4", b"r9")] {
            let run = [first.clone(), txn(std::slice::from_ref(&later), &[])];
            assert!(!checks_independent(&run), "{later:?}");
        }
        // A transaction's own writes come after its own checks: alone it is independent.
        assert!(checks_independent(&[txn(&[value(b"k")], &[set(b"k", b"1")])]));
        // Ranges that only touch at an end do not overlap.
        assert!(checks_independent(&[first, txn(&[digest(b"r5", b"r9"), digest(b"k\0", b"l")], &[])]));
    }
}
