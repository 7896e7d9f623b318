//! What a receiver does with a unit of one (conversation, origin) stream (spec F§6), given
//! the contiguous high-water mark and what it already holds. Pure: the server feeds it
//! from its store, simulations from memory.

/// The content hash of a unit.
pub type Hash = [u8; 32];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Next in line: store it (and then release whatever held units follow).
    Store,
    /// Beyond a gap: keep it aside and ask for `first..=last`.
    Hold { first: u64, last: u64 },
    /// Already stored or held with the same content: acknowledge, change nothing.
    Duplicate,
    /// Same identity, other content: refuse and log.
    Equivocation,
}

/// `head`: highest seq stored with no gap below. `known`: the hash already stored or held
/// for this seq, if any.
pub fn admit(head: u64, seq: u64, known: Option<Hash>, hash: Hash) -> Decision {
    match known {
        Some(k) if k == hash => Decision::Duplicate,
        Some(_) => Decision::Equivocation,
        None if seq <= head => Decision::Equivocation, // below the mark yet unknown: impossible for an honest origin
        None if seq == head + 1 => Decision::Store,
        None => Decision::Hold { first: head + 1, last: seq - 1 },
    }
}

/// After storing up to `head`, the held seqs that now follow without a gap.
pub fn releasable(head: u64, held: impl IntoIterator<Item = u64>) -> Vec<u64> {
    let mut held: Vec<u64> = held.into_iter().filter(|s| *s > head).collect();
    held.sort_unstable();
    held.dedup();
    held.into_iter().zip(head + 1..).take_while(|(s, want)| s == want).map(|(s, _)| s).collect()
}

/// The ranges still missing below the highest held seq, given what is held.
pub fn missing(head: u64, held: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut held: Vec<u64> = held.into_iter().filter(|s| *s > head).collect();
    held.sort_unstable();
    held.dedup();
    let mut out = Vec::new();
    let mut next = head + 1;
    for s in held {
        if s > next {
            out.push((next, s - 1));
        }
        next = s + 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions() {
        let h = [1u8; 32];
        assert_eq!(admit(4, 5, None, h), Decision::Store);
        assert_eq!(admit(4, 7, None, h), Decision::Hold { first: 5, last: 6 });
        assert_eq!(admit(4, 3, Some(h), h), Decision::Duplicate);
        assert_eq!(admit(4, 3, Some([2; 32]), h), Decision::Equivocation);
        assert_eq!(admit(4, 7, Some(h), h), Decision::Duplicate, "held twice is a duplicate");
        assert_eq!(releasable(4, [9, 6, 5, 7]), vec![5, 6, 7]);
        assert_eq!(releasable(4, [6, 7]), Vec::<u64>::new());
        assert_eq!(missing(4, [7, 9, 10, 13]), vec![(5, 6), (8, 8), (11, 12)]);
    }
}
